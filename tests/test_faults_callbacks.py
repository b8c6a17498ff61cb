"""Fault: exceptions injected into the analysis callbacks.

Each failure must be logged and written as the ``error`` field of the callback's stream;
the scan finishes and its raw data are forwarded complete.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import count, scan
from ophyd.sim import SynAxis, det

from sim_devices.ophyd_twins.sans import SimSANSDetector
from sim_devices.physics.sans import SANSSample
from smartbeam.analysis.kde_stream import StreamingKDE
from smartbeam.callbacks.derived import DerivedStreamRouter
from smartbeam.callbacks.live_kde import LiveKDE


class Injected(RuntimeError):
    """The fault injected by these tests."""


def _run(cb, plan):
    docs = []
    cb.downstream = lambda name, doc: docs.append((name, doc))
    RE = RunEngine({})
    RE.subscribe(cb)
    RE(plan)
    return docs


def _stream(docs, name):
    descs = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    return [d["data"] for n, d in docs if n == "event" and descs[d["descriptor"]] == name]


def _raw_ok(docs, n_primary):
    stop = docs[-1][1]
    assert docs[-1][0] == "stop" and stop["exit_status"] == "success"
    assert len(_stream(docs, "primary")) == n_primary
    assert stop["num_events"]["primary"] == n_primary


@pytest.fixture(scope="module")
def sans():
    sample = SANSSample("realistic", shape=(32, 32), count_rate=3000.0, pixel_size_mm=30.0)
    det = SimSANSDetector(sample, rng=np.random.default_rng(1))
    det.shutter.put("open")
    return det


def test_livekde_analysis_failure_is_an_error_row(sans, monkeypatch, caplog):
    calls = {"n": 0}
    real = StreamingKDE.result

    def flaky(self, *a, **k):  # the second smoothing of the run fails
        calls["n"] += 1
        if calls["n"] == 2:
            raise Injected("injected smoothing failure")
        return real(self, *a, **k)

    monkeypatch.setattr(StreamingKDE, "result", flaky)
    cb = LiveKDE(cadence=3)
    with caplog.at_level(logging.ERROR):
        docs = _run(cb, count([sans], num=9))
    _raw_ok(docs, 9)
    rows = _stream(docs, "kde")
    errors = [r["error"] for r in rows]
    assert errors[0] == "" and "injected smoothing failure" in errors[1] and errors[2] == ""
    assert np.isnan(rows[1]["smoothed"]).all() and np.isfinite(rows[2]["smoothed"]).all()
    assert rows[2]["n_exposures"] == 9  # no frame lost to the failure
    assert "injected smoothing failure" in caplog.text


def test_livekde_unexpected_exception_in_event_is_an_error_row(sans, monkeypatch):
    real = StreamingKDE.add

    def flaky(self, frame, exposure=1.0):
        if self.n_frames == 4:
            raise Injected("injected accumulation failure")
        return real(self, frame, exposure)

    monkeypatch.setattr(StreamingKDE, "add", flaky)
    cb = LiveKDE(cadence=3)
    docs = _run(cb, count([sans], num=9))
    _raw_ok(docs, 9)  # this part holds: the scan and raw data are unaffected
    assert cb.errors and "injected accumulation failure" in cb.errors[0]
    assert any("injected accumulation failure" in r["error"] for r in _stream(docs, "kde"))


def test_tendq_failure_is_an_error_row(monkeypatch, caplog):
    from smartbeam.analysis.tendq import TenDqFitter
    from smartbeam.callbacks.tendq import TenDqEstimator
    from smartbeam.library_store import load_packaged_library, load_threshold

    lib = load_packaged_library()
    fitter = TenDqFitter(threshold=load_threshold(lib)).fit(lib)

    def broken(*a, **k):
        raise Injected("injected library failure")

    monkeypatch.setattr(fitter, "predict", broken)
    motor = SynAxis(name="energy")
    cb = TenDqEstimator(fitter, energy_key="energy", intensity_key="det", i0_key="")
    with caplog.at_level(logging.ERROR):
        docs = _run(cb, scan([det], motor, 630, 660, 11))
    _raw_ok(docs, 11)
    (row,) = _stream(docs, "analysis")
    assert "injected library failure" in row["error"] and np.isnan(row["ten_dq"])
    assert "injected library failure" in caplog.text


class _Doubler(DerivedStreamRouter):
    """A router that writes 2x the detector value, and fails where told to."""

    def __init__(self, fail_at=None, fail_finalize=False):
        super().__init__()
        self.fail_at, self.fail_finalize = fail_at, fail_finalize

    def event(self, doc):
        if doc["seq_num"] == self.fail_at:
            # No emit_error here: the router base writes the error row itself.
            raise Injected(f"injected failure at event {doc['seq_num']}")
        if "det" in doc["data"]:
            self.emit("double", {"value": 2.0 * doc["data"]["det"]})
        return doc

    def finalize(self, stop_doc):
        if self.fail_finalize:
            raise Injected("injected failure in finalize")


def test_router_base_contains_hook_and_finalize_failures(caplog):
    cb = _Doubler(fail_at=3, fail_finalize=True)
    with caplog.at_level(logging.ERROR):
        docs = _run(cb, count([det], num=5))
    _raw_ok(docs, 5)
    rows = _stream(docs, "double")
    errors = [r["error"] for r in rows]
    assert errors[:2] == ["", ""] and errors[3:] == ["", ""]
    assert "injected failure at event 3" in errors[2]
    assert np.isnan(rows[2]["value"])
    assert docs[-1][1]["num_events"]["double"] == 5
    assert any("event 3" in e for e in cb.errors) and any("finalize" in e for e in cb.errors)
    assert "injected failure in finalize" in caplog.text


def test_router_downstream_failure_is_not_hidden():
    """A failing *writer* is a storage fault, not an analysis one: it must reach the
    RunEngine (the journaled writer of smartbeam.storage handles it), never be swallowed."""
    cb = _Doubler()

    def broken_writer(name, doc):
        if name == "event":
            raise Injected("writer down")

    cb.downstream = broken_writer
    RE = RunEngine({})
    RE.subscribe(cb)
    with pytest.raises(Injected):
        RE(count([det], num=2))
