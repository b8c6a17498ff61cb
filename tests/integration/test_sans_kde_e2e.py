"""End to end: sans_kde_count on the caproto SANS twin, LiveKDE in front of real Tiled."""

from __future__ import annotations

import numpy as np
from bluesky import RunEngine

from sim_devices.ophyd_twins.sans import SimSANSDetector
from sim_devices.physics.sans import SANSSample
from smartbeam.callbacks.live_kde import LiveKDE
from smartbeam.plans.sans import sans_kde_count
from smartbeam.storage import read_stream


def test_kde_stream_from_epics_twin_read_back_from_tiled(beamline_devices, storage, RE):
    sans = beamline_devices["sans"]
    cb = LiveKDE(cadence=4, downstream=storage.writer())
    RE.subscribe(cb)
    # the twin's calibration (SANSSample defaults): beam centre and a 4 px beam stop
    (uid,) = RE(sans_kde_count(sans, exposure=1.0, max_exposures=12, cadence=4,
                               target_rel_error=1e-4, beam_centre=[63.7, 64.2],
                               beamstop_radius_px=4.0), sample="silica e2e")
    run = storage.runs[uid]
    frames = run["primary"]["sans_det_image"].read()
    assert frames.dtype == np.int32 and frames.shape == (12, 128, 128)
    kde = read_stream(run, "kde")
    n = kde["n_exposures"]
    np.testing.assert_array_equal(n, [4, 8, 12])
    assert run.metadata["stop"]["num_events"] == {"primary": 12, "kde": 3}
    assert all(e == "" for e in kde["error"])
    sm, var = kde["smoothed"], kde["variance"]
    assert sm.shape == (3, 128, 128) and var.shape == (3, 128, 128)
    mask = cb.geometry.mask
    # the smoothed map estimates the summed counts: totals agree to a few per cent
    total = frames.sum(axis=0)[mask].sum()
    assert abs(sm[-1][mask].sum() / total - 1) < 0.05
    # zero variance only where the (unsmoothed) estimate is itself zero
    assert np.all(var[-1][mask] >= 0) and np.all(var[-1][mask][sm[-1][mask] > 0] > 0)
    assert np.all(sm[-1][~mask] == 0)
    assert kde["sigma_q"].shape == (3, cb.geometry.n_bands)
    assert np.all(np.isfinite(kde["cv_rel_error"])) and np.all(kde["predicted_time_s"] > 0)
    # the error falls as exposures accumulate
    assert kde["cv_rel_error"][-1] < kde["cv_rel_error"][0]
    assert run.metadata["start"]["beam_centre"] == [63.7, 64.2]


class _GlitchingDetector(SimSANSDetector):
    """In-process twin whose third frame comes back corrupt (negative counts)."""

    def trigger(self):
        status = super().trigger()
        if int(self.array_counter.get()) == 3:
            bad = self.image.get().copy()
            bad[10, 20] = -5
            self.image.put(bad)
        return status


def test_corrupt_frame_flagged_raw_still_written(storage):
    sample = SANSSample("realistic", shape=(64, 64), pixel_size_mm=15.0, count_rate=5000.0)
    det = _GlitchingDetector(sample, rng=np.random.default_rng(0))
    RE = RunEngine({})
    cb = LiveKDE(cadence=2, downstream=storage.writer())
    RE.subscribe(cb)
    (uid,) = RE(sans_kde_count(det, exposure=1.0, max_exposures=5, cadence=2,
                               target_rel_error=1e-4, beamstop_radius_px=4.0))
    run = storage.runs[uid]
    frames = run["primary"]["sans_det_image"].read()
    assert frames.shape == (5, 64, 64) and frames[2, 10, 20] == -5
    kde = read_stream(run, "kde")
    errors = [e for e in kde["error"] if e]
    assert len(errors) == 1 and "frame #3" in errors[0] and ">= 0" in errors[0]
    good = kde["n_exposures"][np.array([e == "" for e in kde["error"]])]
    # four good frames accumulated: rows at 2 and 4 exposures
    np.testing.assert_array_equal(good, [2, 4])
    assert run.metadata["stop"]["exit_status"] == "success"
