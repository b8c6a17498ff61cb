"""gp_adaptive_scan on an ophyd.sim twin (SynAxis + Poisson SynGauss), no EPICS."""

import numpy as np
import pytest
from bluesky import RunEngine
from ophyd.sim import SynAxis, SynGauss

from smartbeam.errors import SmartbeamInputError
from smartbeam.plans.gp_scan import gp_adaptive_scan
from smartbeam.plans.xmcd import DetectorNaNError

CENTRE, SIGMA, IMAX = 0.7, 0.6, 2000.0


class PoissonGauss(SynGauss):
    """SynGauss with Poisson counts (ophyd 1.11's own 'poisson' noise calls int() on a
    size-1 array, which numpy 2.4 refuses)."""

    def _compute(self):
        m = self._motor.read()[self._motor_field]["value"]
        v = self.Imax.get() * np.exp(-((m - self.center.get()) ** 2)
                                     / (2 * self.sigma.get() ** 2))
        return int(self.random_state.poisson(v))


@pytest.fixture()
def setup():
    RE = RunEngine({})
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    motor = SynAxis(name="motor")
    det = PoissonGauss("det", motor, "motor", center=CENTRE, Imax=IMAX, sigma=SIGMA,
                       random_state=np.random.RandomState(3))
    return RE, docs, motor, det


def _stream(docs, stream):
    (desc,) = [d for n, d in docs if n == "descriptor" and d["name"] == stream]
    return [d["data"] for n, d in docs if n == "event" and d["descriptor"] == desc["uid"]]


def truth(x):
    return IMAX * np.exp(-0.5 * ((np.asarray(x) - CENTRE) / SIGMA) ** 2)


def test_scan_writes_primary_and_decisions_and_stops_on_tolerance(setup):
    RE, docs, motor, det = setup
    RE(gp_adaptive_scan([det], motor, -4.0, 4.0, key="det", tol=0.02, max_points=60,
                        n_init=8, sync_refits=True))
    assert [d for n, d in docs if n == "stop"][0]["exit_status"] == "success"
    primary = _stream(docs, "primary")
    decisions = _stream(docs, "decisions")
    assert len(decisions) == len(primary) - 8 + 1  # one decision per point + the stop
    last = decisions[-1]
    assert "rtol" in last["decision_stop_reason"]
    assert last["decision_sd"] <= 0.02 * last["decision_value"]
    assert len(primary) < 60
    # The measured points concentrate where the signal is (Poisson noise is largest
    # there), and the chosen positions are real motor positions inside the range.
    xs = np.array([r["motor"] for r in primary])
    assert np.all((xs >= -4.0) & (xs <= 4.0))
    near = np.abs(xs[8:] - CENTRE) < 2 * SIGMA
    assert near.mean() > 1.5 * (4 * SIGMA) / 8.0  # 1.5x the share of a uniform design
    # The reported signal range is the Gaussian's height within a few posterior sd.
    assert abs(last["decision_value"] - IMAX) < 5 * last["decision_sd"] + 0.02 * IMAX


def test_area_target_interval_covers_the_true_area(setup):
    RE, docs, motor, det = setup
    RE(gp_adaptive_scan([det], motor, -4.0, 4.0, key="det", target="area", tol=0.01,
                        max_points=40, n_init=8, sync_refits=True))
    last = _stream(docs, "decisions")[-1]
    grid = np.linspace(-4.0, 4.0, 2001)
    area = np.trapezoid(truth(grid), grid)
    assert abs(last["decision_value"] - area) < 4 * last["decision_sd"]


def test_background_refits_default(setup):
    RE, docs, motor, det = setup
    RE(gp_adaptive_scan([det], motor, -4.0, 4.0, tol=0.01, max_points=30, n_init=8))
    decisions = _stream(docs, "decisions")
    assert decisions[-1]["decision_n_points"] <= 30
    assert all(np.isfinite(d["decision_length"]) for d in decisions)
    start = [d for n, d in docs if n == "start"][0]
    assert start["plan_args"]["key"] == "det"  # default key: the detector's hinted field
    assert start["plan_args"]["sync_refits"] is False


@pytest.mark.parametrize("kwargs, match", [
    (dict(start=4.0, stop=-4.0), "start"),
    (dict(tol=0.0), "tol"),
    (dict(max_points=6, n_init=8), "max_points"),
    (dict(n_init=3), "n_init"),
    (dict(key="nope"), "nope"),
    (dict(target="peak"), "target"),
    (dict(noise="gaussian"), "noise"),
])
def test_bad_input_raises_before_run(setup, kwargs, match):
    RE, docs, motor, det = setup
    args = dict(start=-4.0, stop=4.0)
    args.update(kwargs)
    with pytest.raises(SmartbeamInputError, match=match):
        RE(gp_adaptive_scan([det], motor, args.pop("start"), args.pop("stop"), **args))
    assert not [d for n, d in docs if n == "start"]


def test_nan_twice_stops_with_clear_error_keeping_data(setup):
    RE, docs, motor, det = setup
    orig = det.trigger
    calls = {"n": 0}

    def trigger():
        calls["n"] += 1
        st = orig()
        if calls["n"] > 10:
            det.val.put(float("nan"))
        return st

    det.trigger = trigger
    with pytest.raises(DetectorNaNError, match="NaN twice"):
        RE(gp_adaptive_scan([det], motor, -4.0, 4.0, key="det", max_points=30,
                            sync_refits=True))
    assert [d for n, d in docs if n == "stop"][0]["exit_status"] == "fail"
    assert len(_stream(docs, "primary")) == 12  # 10 good points + the NaN and its repeat
    assert "NaN" in _stream(docs, "decisions")[-1]["decision_stop_reason"]


def test_suspension_rewind_keeps_gp_points_equal_to_stored_points(setup, monkeypatch):
    """A suspension mid-scan replays the interrupted point only; the GP was told exactly
    the stored points and the decisions stream goes on."""
    import asyncio

    from smartbeam.analysis.acquisition import AdaptiveSpectrum
    from smartbeam.faults import guard_run_engine
    from smartbeam.plans import gp_scan as gp_plans

    RE, docs, motor, det = setup
    guard_run_engine(RE)  # what installing an IOCSuspender does
    told = []

    class Recording(AdaptiveSpectrum):
        def tell(self, position, value, variance):
            told.append((position, value))
            return super().tell(position, value, variance)

    monkeypatch.setattr(gp_plans, "AdaptiveSpectrum", Recording)
    calls = {"n": 0}
    real = det.trigger

    def faulty():
        calls["n"] += 1
        if calls["n"] in (11, 15):  # in the adaptive phase, twice
            RE.request_suspend(lambda: asyncio.sleep(0.05), justification="test: IOC lost")
        return real()

    monkeypatch.setattr(det, "trigger", faulty)
    RE(gp_adaptive_scan([det], motor, -4.0, 4.0, key="det", tol=0.02, max_points=40,
                        n_init=8, sync_refits=True))
    assert [d for n, d in docs if n == "stop"][0]["exit_status"] == "success"
    primary = _stream(docs, "primary")
    assert calls["n"] > len(primary)  # the interrupted counts were replayed
    np.testing.assert_array_equal([(r["motor"], r["det"]) for r in primary], told)
    decisions = _stream(docs, "decisions")
    assert [d["decision_n_points"] for d in decisions] == list(range(8, len(told) + 1))
