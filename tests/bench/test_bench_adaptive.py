"""The adaptive benchmark's baselines run the real plans and judge on a stated grid."""

import numpy as np

from sim_devices.physics.xmcd import XMCDSample, preset
from smartbeam.bench.adaptive import _adaptive_scan_design, _checkpoints


def test_bluesky_adaptive_scan_baseline_runs_the_plan_on_the_simulator():
    truth = preset("Fe")
    sample = XMCDSample(truth)
    coarse = _adaptive_scan_design(sample, truth.window, 0.8, np.random.default_rng(0), 1.0)
    fine = _adaptive_scan_design(sample, truth.window, 0.05, np.random.default_rng(0), 1.0)
    for rows in (coarse, fine):
        e = rows[:, 0]
        assert rows.shape[1] == 5
        assert e[0] == truth.window[0] and e.max() <= truth.window[1] + 4.0
        assert np.abs(np.diff(e)).max() <= 4.0 + 1e-9  # max_step
        # Both helicities counted, with positive variances, and they differ (XMCD).
        assert np.all(rows[:, 3:] > 0) and np.any(rows[:, 1] != rows[:, 2])
    # A smaller target change per step makes bluesky's rule take more points,
    # and its backstep rule revisits energies on the steep edge.
    assert len(fine) > len(coarse)
    assert np.any(np.diff(fine[:, 0]) < 0)


def test_checkpoint_grid():
    assert _checkpoints(12, 64) == [12, 16, 20, 24, 28, 32, 40, 48, 56, 64]
    fine = _checkpoints(12, 64, step=2)
    assert fine[0] == 12 and fine[-1] == 64 and np.all(np.diff(fine) == 2)
    assert _checkpoints(12, 100)[-2:] == [80, 100]
