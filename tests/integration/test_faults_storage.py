"""Fault: the Tiled server stops mid-run. Documents go to the journal (backup directory);
``smartbeam replay DIR`` puts them in; the replayed run equals an undisturbed one."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from bluesky import RunEngine

from sim_devices.ophyd_twins.sans import SimSANSDetector
from sim_devices.physics.sans import SANSSample
from smartbeam.callbacks.live_kde import LiveKDE
from smartbeam.commands import replay as replay_cmd
from smartbeam.plans.sans import sans_kde_count
from smartbeam.storage import Storage, read_journal


def _replay_cli(argv: list[str], capsys) -> dict:
    parser = argparse.ArgumentParser(prog="smartbeam")
    replay_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["replay", *argv, "--json"])
    assert args.func(args) == 0
    return json.loads(capsys.readouterr().out)


def _snapshot(run) -> dict:
    """Everything a user reads of a run: start/stop documents, streams, fields, arrays."""
    return {"start": run.metadata["start"], "stop": run.metadata["stop"],
            "streams": {s: {k: np.asarray(run[s][k].read()) for k in run[s]} for s in run}}


def _assert_same_run(a: dict, b: dict) -> None:
    """Same start/stop documents, same streams, same fields, same values and dtypes."""
    assert a["start"] == b["start"]
    assert a["stop"] == b["stop"]
    assert sorted(a["streams"]) == sorted(b["streams"])
    for stream, fields in a["streams"].items():
        assert sorted(fields) == sorted(b["streams"][stream]), stream
        for key, x in fields.items():
            y = b["streams"][stream][key]
            assert x.dtype == y.dtype and x.shape == y.shape, (stream, key)
            if x.dtype.kind == "f":
                np.testing.assert_array_equal(x, y)  # NaN == NaN here
            else:
                assert (x == y).all(), (stream, key)


@pytest.fixture
def fast_tiled_retries(monkeypatch):
    # Tiled retries a refused connection for up to 45 s; the outage is certain here
    import tiled.client.utils as tiled_utils

    monkeypatch.setattr(tiled_utils, "TILED_RETRY_ATTEMPTS", 2)
    monkeypatch.setattr(tiled_utils, "TILED_RETRY_TIMEOUT", 2.0)


@pytest.mark.slow  # ~80 s: three embedded servers and every field of two streams read back
def test_tiled_stops_mid_run_journal_replayed_equals_undisturbed(tmp_path, capsys,
                                                                 fast_tiled_retries):
    data_dir, backup = tmp_path / "tiled", tmp_path / "backup"
    store = Storage(data_dir).open()
    docs: list[tuple[str, dict]] = []
    stopped = {}

    def stop_server_at_event_6(name, doc):
        if name == "event" and doc["seq_num"] == 6 and not stopped and doc["data"].get(
                "sans_det_image") is not None:
            store.server.close()  # the real server goes away; the client stays
            stopped["at"] = doc["seq_num"]

    sample = SANSSample("realistic", shape=(32, 32), pixel_size_mm=30.0, count_rate=2000.0)
    det = SimSANSDetector(sample, rng=np.random.default_rng(3))
    RE = RunEngine({})
    writer = store.writer(batch_size=2, backup_directory=backup)

    def tee(name, doc):  # what the writer was given, to write undisturbed later
        docs.append((name, doc))
        writer(name, doc)

    RE.subscribe(LiveKDE(cadence=4, downstream=tee))
    RE.subscribe(stop_server_at_event_6)
    (uid,) = RE(sans_kde_count(det, exposure=1.0, max_exposures=12, cadence=4,
                               target_rel_error=1e-6, beamstop_radius_px=2.0))
    store.close()
    assert stopped == {"at": 6}
    assert RE.state == "idle"
    assert uid in writer.failures and "onnect" in writer.failures[uid]
    (kept,) = writer.kept
    assert kept.name == f"{uid}.jsonl"
    journal = list(read_journal(kept))
    # the journal has the whole run, frames included, exactly
    n_primary = sum(1 for n, d in journal if n == "event" and "sans_det_image" in d["data"])
    assert n_primary == 12 and journal[-1][0] == "stop"
    frame = next(d for n, d in journal if n == "event" and "sans_det_image" in d["data"])
    assert frame["data"]["sans_det_image"].dtype == np.int32

    # the server is back (same data directory): replay through the CLI
    with Storage(data_dir) as back:
        assert uid in back.runs and back.runs[uid].metadata.get("stop") is None  # partial
        report = _replay_cli([str(backup), "--data-dir", str(data_dir)], capsys)
        assert report["written"] == [uid] and report["replaced"] == [uid]
        # idempotent: a second replay changes nothing
        again = _replay_cli([str(backup), "--data-dir", str(data_dir)], capsys)
        assert again == {"written": [], "skipped": [], "replaced": [], "incomplete": []}
        replayed = _snapshot(back.runs[uid])
    # the same documents through an undisturbed store (one server at a time: two
    # embedded servers in one process confuse the client's API keys)
    with Storage(tmp_path / "undisturbed") as ref:
        w = ref.writer(batch_size=2)
        for name, doc in docs:
            w(name, doc)
        reference = _snapshot(ref.runs[uid])
    _assert_same_run(replayed, reference)
    assert replayed["stop"]["num_events"] == {"primary": 12, "kde": 3}
    assert replayed["streams"]["primary"]["sans_det_image"].shape == (12, 32, 32)
    assert replayed["streams"]["primary"]["sans_det_image"].dtype == np.int32


def test_replay_skips_complete_runs_and_rejects_bad_input(tmp_path, capsys):
    from smartbeam.errors import SmartbeamInputError
    from smartbeam.storage import encode_document, replay_backups

    with Storage(tmp_path / "tiled") as store:
        RE = RunEngine({})
        backup = tmp_path / "backup"
        writer = store.writer(backup_directory=backup)
        docs = []
        RE.subscribe(writer)
        RE.subscribe(lambda n, d: docs.append((n, d)))
        from bluesky.plans import count
        from ophyd.sim import det

        (uid,) = RE(count([det], num=3))
        # the write went through: no journal kept
        assert writer.kept == [] and list(backup.iterdir()) == []
        # a journal of a run already stored complete is skipped, not duplicated
        (backup / f"{uid}.jsonl").write_text(
            "".join(encode_document(n, d) + "\n" for n, d in docs))
        report = store.replay(backup)
        assert report.skipped == [uid] and report.written == []
        assert len(store.runs[uid]["primary"]["det"].read()) == 3

        with pytest.raises(SmartbeamInputError, match="does not exist"):
            replay_backups(store.runs, tmp_path / "nope", store.writer)
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "x.jsonl").write_text("not json\n{}\n")
        with pytest.raises(SmartbeamInputError, match="x.jsonl:1"):
            store.replay(bad)


def test_journal_keeps_numpy_exactly(tmp_path):
    from smartbeam.storage import decode_document, encode_document

    doc = {"data": {"a": np.arange(6, dtype=np.int32).reshape(2, 3),
                    "f": np.float32(1.5), "nan": float("nan"),
                    "s": np.array(["x", "yz"]), "t": (1, 2)}}
    name, back = decode_document(encode_document("event", doc))
    assert name == "event"
    assert back["data"]["a"].dtype == np.int32 and (back["data"]["a"] == doc["data"]["a"]).all()
    assert isinstance(back["data"]["f"], np.float32) and back["data"]["f"] == 1.5
    assert np.isnan(back["data"]["nan"]) and list(back["data"]["s"]) == ["x", "yz"]
    assert back["data"]["t"] == [1, 2]
