"""The session's document chain flags bad frames of any area-detector run.

``smartbeam.session.analysis_chain`` (used by the IPython profile and the demo) puts a
FrameQualityMonitor in front of LiveKDE: a plain ``count`` of the in-process SANS twin
gets a ``frame_quality`` stream, and a detector that sends the previous frame again is
flagged there and left out of LiveKDE's sum (counted in the ``kde`` stream).
"""

from __future__ import annotations

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import count
from ophyd.sim import det as scalar_det
from ophyd.status import DeviceStatus

from sim_devices.ophyd_twins.sans import SimSANSDetector
from sim_devices.physics.sans import SANSSample
from smartbeam.session import analysis_chain

REPEAT_AT = (4, 5, 9)  # 1-based triggers at which the detector sends the previous frame


class StuckSANS(SimSANSDetector):
    """SANS twin whose readout repeats the previous frame at some triggers, with its frame
    counter stuck (``counter="stuck"``) or still advancing (``counter="advancing"``)."""

    def __init__(self, *args, counter: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.counter_mode = counter
        self.n_trig = 0

    def trigger(self):
        self.n_trig += 1
        if self.n_trig not in REPEAT_AT:
            return super().trigger()
        if self.counter_mode == "advancing":
            self.array_counter.put(int(self.array_counter.get()) + 1)
        st = DeviceStatus(self)
        st.set_finished()
        return st


def _streams(docs):
    descs = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    out: dict[str, list] = {}
    for n, d in docs:
        if n == "event":
            out.setdefault(descs[d["descriptor"]], []).append(d["data"])
    return out


@pytest.mark.parametrize("counter", ["stuck", "advancing"])
def test_session_chain_flags_repeated_frames_and_kde_skips_them(counter, tmp_path):
    sample = SANSSample("realistic", shape=(32, 32), pixel_size_mm=30.0, count_rate=2000.0)
    det = StuckSANS(sample, rng=np.random.default_rng(4), counter=counter)
    det.shutter.put("open")
    docs = []
    chain = analysis_chain(lambda n, d: docs.append((n, d)), png_dir=tmp_path)
    RE = RunEngine({})
    RE.subscribe(chain)
    RE(count([det], num=12))  # a plain count, not the SANS plan: any area-detector run
    streams = _streams(docs)
    assert {"primary", "frame_quality", "kde"} <= set(streams)
    assert len(streams["primary"]) == 12  # raw frames all written
    flags = [r["flag"] for r in streams["frame_quality"]]
    assert [i + 1 for i, f in enumerate(flags) if f == "repeated"] == list(REPEAT_AT)
    assert set(flags) == {"ok", "repeated"}
    # LiveKDE summed each distinct frame once and says how many it skipped
    kde_last = streams["kde"][-1]
    assert kde_last["n_repeated"] == len(REPEAT_AT) and kde_last["error"] == ""
    assert kde_last["n_exposures"] == 12 - len(REPEAT_AT)
    frames = [np.asarray(r["sans_det_image"]) for r in streams["primary"]]
    distinct = [f for i, f in enumerate(frames) if i + 1 not in REPEAT_AT]
    kde = chain.downstream.downstream
    np.testing.assert_array_equal(kde.stream.acc.total, np.sum(distinct, axis=0))
    assert [n for n, _ in docs][-1] == "stop"
    assert docs[-1][1]["num_events"]["frame_quality"] == 12


def test_session_chain_is_inert_for_runs_without_frames(tmp_path):
    docs = []
    RE = RunEngine({})
    RE.subscribe(analysis_chain(lambda n, d: docs.append((n, d)), png_dir=tmp_path))
    RE(count([scalar_det], num=3))
    assert set(_streams(docs)) == {"primary"}
