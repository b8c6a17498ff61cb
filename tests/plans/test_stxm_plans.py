"""STXM stack plans on the caproto STXM twin, written to real Tiled."""

from __future__ import annotations

import numpy as np
import pytest

from smartbeam.errors import SmartbeamInputError
from smartbeam.plans import stxm_image, stxm_xas_map, stxm_xmcd_stack
from smartbeam.storage import read_stream

# A small field of view keeps the twin fast: 8 x 6 pixels of 60 nm.
FIELD = {"x_range": [0.0, 0.42], "y_range": [0.0, 0.30], "pixel": 0.06}


def test_adaptive_stack_writes_decisions_and_maps(beamline_devices, storage, RE, tmp_path):
    stxm = beamline_devices["stxm"]
    RE.subscribe(storage.writer())
    # Regression of the "confidently wrong map" bug (m_orb +0.15 +- 0.045 against a truth
    # of -0.09 with 16 energies): the stop is trusted only once both white lines are
    # sampled. A budget of 20 energies at 5 ms dwell stopped on tol (after 15-18) in 20 of
    # 20 noise draws offline, with the same assertions as below.
    (uid,) = RE(stxm_xmcd_stack(stxm, **FIELD, e_min=695.0, e_max=735.0, tol=0.5,
                                max_energies=20, n_init=8, dwell=0.005, dwell_factors=[1, 2],
                                edges=[707.8, 720.8], png_dir=str(tmp_path)),
                sample="Fe domains")
    # Pictures of the maps, named after the run, written after it closed.
    import matplotlib.image as mpimg

    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{uid[:8]}_clusters.png",
                                                          f"{uid[:8]}_moments.png"]
    assert mpimg.imread(tmp_path / f"{uid[:8]}_moments.png").shape[:2] == (720, 800)
    assert mpimg.imread(tmp_path / f"{uid[:8]}_clusters.png").shape[:2] == (360, 800)
    run = storage.runs[uid]
    assert {"primary", "decisions", "maps"} <= set(run)
    start = run.metadata["start"]
    assert start["plan_name"] == "stxm_xmcd_stack" and start["shape"] == [6, 8]
    images = run["primary"]["stxm_det_image"].read()
    n_img = images.shape[0]
    assert images.shape[1:] == (6, 8) and n_img % 2 == 0
    dec = read_stream(run, "decisions")
    maps = read_stream(run, "maps")
    for key in ("stack_m_orb", "stack_m_orb_sd", "stack_m_spin", "stack_m_spin_sd"):
        assert maps[key].shape == (1, 6, 8)
        assert np.all(np.isfinite(maps[key]))
    # One decision per model update; the last one is the stop, with its reason.
    assert dec["stack_decision_n_energies"][-1] == n_img // 2
    assert dec["stack_decision_stop_reason"][-1] != ""
    assert np.all(dec["stack_decision_stop_reason"][:-1] == "")
    # Stopped on the uncertainty target before the budget: that is what tol is for.
    assert "tol" in str(dec["stack_decision_stop_reason"][-1])
    assert n_img // 2 < 20
    # Every pair's dwell is one of the allowed ones (the stop row has none).
    dwells = dec["stack_decision_dwell_s"]
    assert np.isnan(dwells[-1]) and set(np.round(dwells[:-1], 6)) <= {0.005, 0.01}
    assert maps["stack_rms_sd"][0] <= 0.5 * maps["stack_rms_m_orb"][0]
    # Against the twin's ground truth (same default sample): the map agrees within its
    # stated uncertainty.
    truth = _twin_truth()
    m, sd = maps["stack_m_orb"][0], maps["stack_m_orb_sd"][0]
    assert np.mean(np.abs(m - truth) <= 3 * sd) > 0.8
    assert abs(np.mean(m) - np.mean(truth)) <= 3 * maps["stack_rms_sd"][0]


def _twin_truth() -> np.ndarray:
    from sim_devices.physics.stxm import STXMSample
    from sim_devices.runner import xmcd_sample_from

    sample = STXMSample(xmcd_sample_from(None))
    x = FIELD["x_range"][0] + FIELD["pixel"] * np.arange(8)
    y = FIELD["y_range"][0] + FIELD["pixel"] * np.arange(6)
    rows, cols = sample.pixel_index(*np.meshgrid(x, y))
    return sample.true_moment_maps()["m_orb"][rows, cols]


def test_conventional_stack_uses_the_fixed_energies(beamline_devices, storage, RE):
    stxm = beamline_devices["stxm"]
    RE.subscribe(storage.writer())
    energies = list(np.linspace(695.0, 735.0, 12))
    (uid,) = RE(stxm_xmcd_stack(stxm, **FIELD, e_min=695.0, e_max=735.0, adaptive=False,
                                energies=energies, dwell=0.002))
    run = storage.runs[uid]
    prim = read_stream(run, "primary", keys=["stxm_energy_readback", "stxm_pol_mode"]) \
        if "stxm_energy_readback" in run["primary"] else None
    images = run["primary"]["stxm_det_image"].read()
    assert images.shape == (24, 6, 8)
    if prim is not None:
        np.testing.assert_allclose(prim["stxm_energy_readback"][::2], energies, atol=1e-2)
    assert "decisions" not in run
    maps = read_stream(run, "maps")
    assert maps["stack_n_energies"][0] == 12
    assert maps["stack_m_orb"].shape == (1, 6, 8)


@pytest.mark.parametrize("kwargs, match", [
    ({"pixel": 0.5}, "larger than"),
    ({"x_range": [0.0, 50.0]}, "beyond the stage limits"),
    ({"dwell": 0.0}, "dwell"),
    ({"e_min": 740.0}, "e_min"),
    ({"tol": -1.0}, "tol"),
    ({"dwell_factors": [1.0, 0.0]}, "dwell_factors"),
])
def test_bad_input_refused_before_motion(beamline_devices, RE, kwargs, match):
    stxm = beamline_devices["stxm"]
    args = dict(FIELD, e_min=695.0, e_max=735.0, dwell=0.002)
    args.update(kwargs)
    before = (stxm.x.setpoint.get(), stxm.energy.setpoint.get())
    docs = []
    with pytest.raises(SmartbeamInputError, match=match):
        RE(stxm_xmcd_stack(stxm, **args), lambda name, doc: docs.append(name))
    assert docs == []  # no run opened
    assert (stxm.x.setpoint.get(), stxm.energy.setpoint.get()) == before


def test_stxm_image_still_works(beamline_devices, RE):
    stxm = beamline_devices["stxm"]
    docs = []
    RE(stxm_image(stxm, **FIELD, energies=[707.8], dwell=0.001),
       lambda name, doc: docs.append((name, doc)))
    events = [d for n, d in docs if n == "event"]
    assert len(events) == 2
    assert np.asarray(events[0]["data"]["stxm_det_image"]).shape == (6, 8)


@pytest.mark.parametrize("kwargs, match", [
    ({"measures": "fast"}, "measures"),
    ({"polarisation": "elliptic"}, "polarisation"),
    ({"energies": [640.0, 641.0]}, "energies"),
])
def test_xas_map_bad_input_refused_before_motion(beamline_devices, RE, kwargs, match):
    stxm = beamline_devices["stxm"]
    args = dict(FIELD, energies=list(np.arange(632.0, 660.0, 0.5)), dwell=0.002)
    args.update(kwargs)
    before = (stxm.x.setpoint.get(), stxm.energy.setpoint.get())
    docs = []
    with pytest.raises(SmartbeamInputError, match=match):
        RE(stxm_xas_map(stxm, **args), lambda name, doc: docs.append(name))
    assert docs == []
    assert (stxm.x.setpoint.get(), stxm.energy.setpoint.get()) == before
