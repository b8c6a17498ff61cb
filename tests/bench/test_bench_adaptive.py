"""The adaptive benchmark's baselines run the real plans and judge on a stated grid."""

import numpy as np

from sim_devices.physics.xmcd import XMCDSample, preset
from smartbeam.analysis.gp import XMCDGP
from smartbeam.bench.adaptive import (
    _adaptive_scan_design,
    _checkpoints,
    _design_bound,
    _expected_point,
)


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


def test_design_bound_beats_a_uniform_design_with_the_same_model():
    truth = preset("Co")
    sample = XMCDSample(truth)
    hint = (truth.e_l3, truth.e_l2)
    out = _design_bound(dict(case=3, truth=truth.to_dict(), hint=hint, dwell=1.0,
                             sizes=[12, 16], candidates=25))
    greedy, best = out["greedy"], out["exchange"]
    assert out["case"] == 3 and set(best) == {12, 16}
    assert all(0 < best[n] <= greedy[n] for n in best)  # exchange starts from greedy
    assert best[16] < best[12]
    # Uniform 16-point design, same hyperparameters and noise: the bound must be lower.
    dense = sample.dense_grid(201)
    model = XMCDGP(*truth.window, truth.n_h, edges=hint)
    model.fit(dense, *_expected_point(sample, dense, 1.0))
    e = np.linspace(*truth.window, 16)
    uniform = model.spawn().fit(e, *_expected_point(sample, e, 1.0), refit=False)
    sd_uniform = uniform.moments()["m_orb_sd"] / abs(sample.true_moments()["m_orb"])
    assert best[16] < sd_uniform
