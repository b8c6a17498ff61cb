"""TenDqEstimator: an analysis stream in the same run, errors recorded not raised."""

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import count, scan
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.sim import SynAxis

from smartbeam.analysis.tendq import TenDqFitter
from smartbeam.callbacks.tendq import TenDqEstimator, estimate_arrays
from smartbeam.library_store import load_packaged_library, load_threshold


class _Counts(Signal):
    """Counts at the current energy of a library spectrum (x i0)."""

    def __init__(self, *args, source=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._source = source

    def get(self, **kwargs):
        return float(self._source())


class SpectrumTwin(Device):
    """ophyd.sim-style XAS end station: tey = mu(E) * i0, i0 constant."""

    i0 = Cpt(Signal, value=1000.0, kind="hinted")
    tey = Cpt(_Counts, kind="hinted")

    def __init__(self, motor, energy, spectrum, **kwargs):
        super().__init__(**kwargs)
        self.tey._source = lambda: 1000.0 * np.interp(motor.position, energy, spectrum)


@pytest.fixture(scope="module")
def fitter():
    lib = load_packaged_library()
    return TenDqFitter(threshold=load_threshold(lib)).fit(lib)


def _run(plan_factory, fitter, **kwargs):
    lib = fitter.library
    docs = []
    cb = TenDqEstimator(fitter, downstream=lambda n, d: docs.append((n, d)), **kwargs)
    motor = SynAxis(name="energy")
    k = int(np.argmin(np.abs(lib.ten_dq - 1.2)))
    det = SpectrumTwin(motor, lib.energy, lib.spectra[k], name="xas")
    RE = RunEngine({})
    RE.subscribe(cb)
    RE(plan_factory(det, motor))
    return docs, cb


def _analysis_rows(docs):
    descs = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    return [d["data"] for n, d in docs if n == "event" and descs[d["descriptor"]] == "analysis"]


def test_analysis_stream_in_same_run(fitter):
    docs, cb = _run(lambda det, m: scan([det], m, 628.0, 664.0, 181), fitter)
    rows = _analysis_rows(docs)
    assert len(rows) == 1
    row = rows[0]
    assert row["error"] == ""
    assert row["ten_dq"] == pytest.approx(1.2, abs=0.03)
    assert row["described"] and np.isfinite(row["ten_dq_pearson"])
    assert row["library_id"] == fitter.library.library_id
    assert '"ion": "Mn2+"' in row["library_params"]
    names = [n for n, _ in docs]
    assert names[-1] == "stop" and docs[-1][1]["num_events"]["analysis"] == 1
    assert docs[-1][1]["num_events"]["primary"] == 181


def test_error_recorded_not_raised(fitter):
    # a count with no energy motor: the estimate fails, the run completes
    docs, cb = _run(lambda det, m: count([det, m], num=3), fitter)
    rows = _analysis_rows(docs)
    assert len(rows) == 1 and rows[0]["error"] != "" and np.isnan(rows[0]["ten_dq"])
    assert cb.errors and [n for n, _ in docs][-1] == "stop"


def test_post_hoc_on_arrays(fitter):
    lib = fitter.library
    row = estimate_arrays(lib.energy[::-1], 50 * lib.spectra[14][::-1], fitter,
                          i0=np.full(lib.energy.size, 50.0))
    assert row["error"] == "" and row["ten_dq"] == pytest.approx(lib.ten_dq[14], abs=0.03)


# -- the session member: self-configured from the start document -------------------------
@pytest.fixture(scope="module")
def xas_twin():
    from sim_devices.ophyd_twins.xmcd import SimXMCDEndstation
    from sim_devices.physics.xas import LibraryXASSample

    def make(ten_dq=0.9, offset=0.0, seed=1):
        return SimXMCDEndstation(LibraryXASSample(ten_dq=ten_dq, edge_offset=offset),
                                 name="xmcd", rng=np.random.default_rng(seed))
    return make


def _session_run(plan, **kwargs):
    docs = []
    cb = TenDqEstimator(downstream=lambda n, d: docs.append((n, d)), **kwargs)
    RE = RunEngine({})
    RE.subscribe(cb)
    RE(plan)
    return docs, cb


def test_plan_start_doc_configures_the_estimator(xas_twin):
    from smartbeam.plans import xas_tendq_scan

    dev = xas_twin(1.6, -0.4)
    docs, cb = _session_run(xas_tendq_scan(dev, 628.0, 668.0, num=101, dwell=0.2))
    start = docs[0][1]
    assert start["tendq"] == {"ion": "Mn2+", "energy_key": "xmcd_energy",
                              "intensity_key": "xmcd_tey", "i0_key": "xmcd_i0"}
    assert start["polarisation"] == "linear" and dev.pol.mode.get() == "linear"
    rows = _analysis_rows(docs)
    assert len(rows) == 1 and rows[0]["error"] == ""
    assert rows[0]["ten_dq"] == pytest.approx(1.6, abs=0.05)
    assert rows[0]["offset"] == pytest.approx(-0.4, abs=0.1)
    assert docs[-1][1]["num_events"] == {"primary": 101, "analysis": 1}


def test_inert_without_tendq_in_start(xas_twin):
    dev = xas_twin()
    docs, cb = _session_run(scan([dev], dev.energy, 630, 660, 20))
    assert _analysis_rows(docs) == [] and not cb.errors
    assert "analysis" not in docs[-1][1]["num_events"]


def test_missing_library_recorded_not_raised(xas_twin, tmp_path, monkeypatch):
    from smartbeam.plans import xas_tendq_scan

    monkeypatch.setenv("SMARTBEAM_CACHE_DIR", str(tmp_path))
    dev = xas_twin()
    docs, cb = _session_run(xas_tendq_scan(dev, 628.0, 668.0, num=20, ion="Co2+"))
    rows = _analysis_rows(docs)
    assert len(rows) == 1 and "not cached" in rows[0]["error"] and np.isnan(rows[0]["ten_dq"])
    assert cb.errors and docs[-1][0] == "stop"


@pytest.mark.parametrize("kwargs, match", [
    ({"e_min": 660.0, "e_max": 630.0}, "e_min"),
    ({"num": 5}, "num"),
    ({"dwell": 0.0}, "dwell"),
    ({"polarisation": "circular"}, "polarisation"),
    ({"ion": "Xx9+"}, "ion"),
    ({"e_min": 640.0, "e_max": 700.0}, "misses"),
    ({"e_min": 500.0, "e_max": 1000.0}, "limits"),
])
def test_plan_bad_input(xas_twin, kwargs, match):
    from smartbeam.errors import SmartbeamInputError
    from smartbeam.plans import xas_tendq_scan

    args = {"e_min": 628.0, "e_max": 668.0, **kwargs}
    with pytest.raises(SmartbeamInputError, match=match):
        list(xas_tendq_scan(xas_twin(), args.pop("e_min"), args.pop("e_max"), **args))


class _Node(dict):
    """A stand-in for a Tiled array node (``read()``)."""


class _Array:
    def __init__(self, v):
        self.v = np.asarray(v)

    def read(self):
        return self.v


def test_estimate_stored_run_same_as_live(xas_twin):
    from smartbeam.callbacks.tendq import estimate_stored_run
    from smartbeam.plans import xas_tendq_scan

    docs, cb = _session_run(xas_tendq_scan(xas_twin(1.1), 628.0, 668.0, num=161))
    start = docs[0][1]
    events = [d for n, d in docs if n == "event" and d["seq_num"] and "xmcd_tey" in d["data"]]
    primary = _Node({k: _Array([e["data"][k] for e in events])
                     for k in ("xmcd_energy", "xmcd_tey", "xmcd_i0", "xmcd_tfy")})

    class Run(dict):
        metadata = {"start": start}

    row = estimate_stored_run(Run(primary=primary))
    assert row["error"] == ""
    assert row["ten_dq"] == pytest.approx(cb.last_row["ten_dq"], abs=1e-12)
    assert row["ten_dq"] == pytest.approx(1.1, abs=0.05)
