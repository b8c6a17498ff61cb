"""xmcd_adaptive_scan / xmcd_dense_scan against the in-process twin (no EPICS, no Tiled)."""

import numpy as np
import pytest
from bluesky import RunEngine

from sim_devices.ophyd_twins.xmcd import SimXMCDEndstation
from sim_devices.physics.xmcd import XMCDSample, preset
from smartbeam.errors import SmartbeamInputError
from smartbeam.plans.xmcd import DetectorNaNError, xmcd_adaptive_scan, xmcd_dense_scan

FE = preset("Fe")


@pytest.fixture()
def setup():
    RE = RunEngine({})
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    station = SimXMCDEndstation(XMCDSample(FE), name="xmcd", rng=np.random.default_rng(1))
    return RE, docs, station


def _stream(docs, stream):
    desc = [d for n, d in docs if n == "descriptor" and d["name"] == stream]
    assert len(desc) == 1, f"expected one {stream} descriptor"
    uid = desc[0]["uid"]
    return [d["data"] for n, d in docs if n == "event" and d["descriptor"] == uid]


def test_adaptive_scan_writes_primary_decisions_moments(setup):
    RE, docs, st = setup
    # inline refits: the point sequence (hence the 5 % check below) does not depend on
    # thread timing on a loaded machine
    RE(xmcd_adaptive_scan(st, *FE.window, edges=[FE.e_l3, FE.e_l2], n_h=FE.n_h, tol=0.05,
                          max_points=40, n_init=12, dwell=1.0, sync_refits=True))
    stop = [d for n, d in docs if n == "stop"][0]
    assert stop["exit_status"] == "success"
    primary = _stream(docs, "primary")
    decisions = _stream(docs, "decisions")
    moments = _stream(docs, "moments")
    assert len(moments) == 1
    n = moments[0]["moments_n_points"]
    assert 12 + 4 <= n <= 40
    assert len(primary) == 2 * n  # both helicities per energy
    assert {r[st.pol.mode.name] for r in primary} == {"circ+", "circ-"}
    assert decisions[-1]["decision_stop_reason"] != ""
    assert all(r["decision_stop_reason"] == "" for r in decisions[:-1])
    true = XMCDSample(FE).true_moments()
    m = moments[0]
    # The estimate agrees with the dense noiseless analysis within 4 posterior sd.
    assert abs(m["moments_m_orb"] - true["m_orb"]) < 4 * m["moments_m_orb_sd"] + 1e-3
    assert abs(m["moments_m_spin"] - true["m_spin"]) / true["m_spin"] < 0.05


def test_dense_scan_moments(setup):
    RE, docs, st = setup
    RE(xmcd_dense_scan(st, *FE.window, num=81, n_h=FE.n_h, dwell=1.0))
    m = _stream(docs, "moments")[0]
    true = XMCDSample(FE).true_moments()
    assert len(_stream(docs, "primary")) == 2 * 81
    assert abs(m["moments_m_spin"] / true["m_spin"] - 1) < 0.05
    assert abs(m["moments_m_orb"] / true["m_orb"] - 1) < 0.3


@pytest.mark.parametrize("kwargs, match", [
    (dict(e_min=730.0, e_max=700.0), "e_min"),
    (dict(tol=0.0), "tol"),
    (dict(tol=-1.0), "tol"),
    (dict(max_points=8, n_init=12), "max_points"),
    (dict(polarisations=["circ+", "circular"]), "circular"),
    (dict(e_min=500.0), "limits"),
    (dict(mono_speed=0.0), "mono_speed"),
])
def test_bad_input_raises_before_run(setup, kwargs, match):
    RE, docs, st = setup
    args = dict(e_min=695.0, e_max=735.0, n_h=3.39)
    args.update(kwargs)
    e_min, e_max = args.pop("e_min"), args.pop("e_max")
    with pytest.raises(SmartbeamInputError, match=match):
        RE(xmcd_adaptive_scan(st, e_min, e_max, **args))
    assert not [d for n, d in docs if n == "start"]


def test_twin_refuses_unknown_polarisation(setup):
    _, _, st = setup
    with pytest.raises(ValueError, match="circ"):
        st.pol.mode.set("helical").wait(1)


def test_nan_detector_remeasured_once(setup):
    RE, docs, st = setup
    st.nan_next = 1  # a single glitch: re-measured, scan completes
    RE(xmcd_adaptive_scan(st, *FE.window, n_h=FE.n_h, tol=0.5, max_points=20, n_init=12))
    assert [d for n, d in docs if n == "stop"][0]["exit_status"] == "success"


def test_nan_detector_twice_stops_keeping_data(setup):
    RE, docs, st = setup
    orig = st.trigger
    calls = {"n": 0}

    def trigger():
        calls["n"] += 1
        if calls["n"] > 10:  # after 5 good energies the detector dies
            st.nan_next = 1
        return orig()

    st.trigger = trigger
    with pytest.raises(DetectorNaNError, match="NaN twice"):
        RE(xmcd_adaptive_scan(st, *FE.window, n_h=FE.n_h, tol=0.02, max_points=30))
    stop = [d for n, d in docs if n == "stop"][0]
    assert stop["exit_status"] == "fail"
    primary = _stream(docs, "primary")
    assert len(primary) >= 10
    assert np.isfinite(primary[0][st.tey.name])
    dec = _stream(docs, "decisions")
    assert "NaN" in dec[-1]["decision_stop_reason"]


def test_live_plot_callback_saves_png(setup, tmp_path):
    from smartbeam.callbacks.xmcd_plot import XMCDLivePlot

    RE, docs, st = setup
    plot = XMCDLivePlot.for_endstation(st, png_path=tmp_path / "xmcd.png", update_every=50)
    RE.subscribe(plot)
    RE(xmcd_adaptive_scan(st, *FE.window, edges=[FE.e_l3, FE.e_l2], n_h=FE.n_h, tol=0.1,
                          max_points=24, n_init=12))
    assert plot.errors == []
    n = _stream(docs, "moments")[0]["moments_n_points"]
    assert len(plot.points) == n
    assert len(plot.history) == len(_stream(docs, "decisions"))
    assert plot.saved_path == tmp_path / "xmcd.png"
    assert (tmp_path / "xmcd.png").stat().st_size > 10_000
    pred = plot.model.predict()
    assert np.all(pred["mu_sd"] > 0)


@pytest.mark.parametrize("during", ["trigger", "read"])
def test_suspension_rewind_keeps_gp_points_equal_to_stored_points(setup, monkeypatch, during):
    """A suspension in the adaptive phase (as an IOCSuspender requests when the IOC dies)
    rewinds to the last checkpoint and replays the interrupted helicity: every energy the
    GP was told is stored exactly twice, with the values the GP got, and nothing else."""
    import asyncio

    from smartbeam.analysis.acquisition import AdaptiveXMCD
    from smartbeam.faults import guard_run_engine
    from smartbeam.plans import xmcd as xmcd_plans

    RE, docs, st = setup
    guard_run_engine(RE)  # what installing an IOCSuspender does
    told = []

    class Recording(AdaptiveXMCD):
        def tell(self, energy, mu_plus, mu_minus, *a, **k):
            told.append((energy, mu_plus, mu_minus))
            return super().tell(energy, mu_plus, mu_minus, *a, **k)

    monkeypatch.setattr(xmcd_plans, "AdaptiveXMCD", Recording)
    calls = {"n": 0}
    real = getattr(st, during)

    def faulty(*a, **k):
        calls["n"] += 1
        if calls["n"] == 31:  # the 4th energy chosen by the GP
            RE.request_suspend(lambda: asyncio.sleep(0.1), justification="test: IOC lost")
        return real(*a, **k)

    monkeypatch.setattr(st, during, faulty)
    RE(xmcd_adaptive_scan(st, *FE.window, edges=[FE.e_l3, FE.e_l2], n_h=FE.n_h, tol=0.05,
                          max_points=30, n_init=12, sync_refits=True))
    assert [d for n, d in docs if n == "stop"][0]["exit_status"] == "success"
    primary = _stream(docs, "primary")
    n = _stream(docs, "moments")[0]["moments_n_points"]
    assert len(told) == n and len(primary) == 2 * n
    if during == "trigger":  # requested during the count: it lands before the save
        assert calls["n"] > 2 * n  # the interrupted count was replayed
    seq = [d["seq_num"] for nm, d in docs if nm == "event"
           and d["descriptor"] == next(x["uid"] for m, x in docs
                                       if m == "descriptor" and x["name"] == "primary")]
    assert sorted(seq) == list(range(1, 2 * n + 1))
    for energy, mu_plus, mu_minus in told:
        rows = [r for r in primary if abs(r[st.energy.setpoint.name] - energy) < 1e-9]
        got = {r[st.pol.mode.name]: r[st.tey.name] / r[st.i0.name] for r in rows}
        assert len(rows) == 2 and got == pytest.approx({"circ+": mu_plus, "circ-": mu_minus})
    dec = _stream(docs, "decisions")
    assert [r["decision_n_points"] for r in dec] == list(range(12, n + 1))
