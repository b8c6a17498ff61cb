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
