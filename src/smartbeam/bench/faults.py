"""``smartbeam bench faults``: inject faults for real and count what reached storage.

Each scenario injects one fault into a real run and reports what happened: points
requested, points read (events the RunEngine emitted), points stored (read back from
Tiled or from the forwarded documents) and data lost = read - stored. Scenarios:

``ioc_frozen`` / ``ioc_killed``
    A caproto XMCD twin IOC (subprocess on loopback) is frozen (SIGSTOP) or killed
    (SIGKILL, restarted on the same port) in the middle of a ``count``; an
    :class:`~smartbeam.faults.IOCSuspender` is installed. Points are read from Tiled.
``xmcd_adaptive_ioc_killed``
    The same IOC killed and restarted in the adaptive phase of ``xmcd_adaptive_scan``;
    reports whether the GP was told exactly the stored points, duplicates, and the moments
    next to those of an undisturbed run (skipped with ``--quick``).
``tiled_stopped``
    The embedded Tiled server is stopped in the middle of a SANS count (LiveKDE in the
    chain, journaled writer); the journal is replayed into a restarted server.
``callback_exception``
    The KDE smoothing raises in the middle of a SANS count.
``bad_frames``
    NaN, inf, negative, wrong-shape, repeated and dropped frames through
    :class:`~smartbeam.faults.FrameQualityMonitor`.
``repeated_frames``
    A SANS twin that sends the previous frame again (counter stuck, or advancing over an
    identical buffer) counted through the session chain
    (:func:`smartbeam.session.analysis_chain`): flagged in ``frame_quality``, not summed by
    LiveKDE (its sum is compared with the sum of the distinct frames).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the faults benchmark."""
    parser.add_argument("--quick", action="store_true", help="fewer points per scenario")
    parser.add_argument("--points", type=int, default=40, help="points per IOC scan")
    parser.add_argument("--down-s", type=float, default=3.0,
                        help="seconds the IOC stays frozen/dead")
    parser.add_argument("--skip-ioc", action="store_true", help="skip the IOC scenarios")
    parser.add_argument("--adaptive-points", type=int, default=30,
                        help="max_points of the adaptive XMCD scan")


def _row(fault, outcome, expected, read, stored, **extra) -> dict:
    return {"fault": fault, "outcome": outcome, "points_expected": int(expected),
            "points_read": int(read), "points_stored": int(stored),
            "data_lost": int(max(read - stored, 0)), **extra}


def _ioc_scenarios(args, workdir: Path, log) -> list[dict]:
    from sim_devices.launcher import IOCProcess, free_port
    from smartbeam.epics_env import configure_epics

    port = free_port()
    configure_epics([port])  # before ophyd is imported
    proc = IOCProcess("xmcd", port=port, log_path=str(workdir / "ioc.log"),
                      extra_args=["--time-scale", "0.02", "--seed", "1"]).start()
    rows = []
    try:
        from bluesky import RunEngine
        from bluesky.plans import count

        from smartbeam.beamline import make_devices
        from smartbeam.faults import install_ioc_suspenders
        from smartbeam.storage import Storage

        dev = make_devices({"xmcd": proc.prefix}, connect_timeout=20)["xmcd"]
        dev.dwell.set(0.5).wait(5)
        with Storage(workdir / "tiled-ioc") as store:
            for kind in ("ioc_frozen", "ioc_killed"):
                log(f"faults: {kind}")
                RE = RunEngine({})
                RE.subscribe(store.writer(batch_size=5))
                (susp,) = install_ioc_suspenders(RE, [dev], period=0.3, timeout=0.5, sleep=0.5)
                read = {"n": 0}
                fired = threading.Event()

                def inject(kind=kind):
                    if kind == "ioc_frozen":
                        os.killpg(proc.process.pid, signal.SIGSTOP)
                        time.sleep(args.down_s)
                        os.killpg(proc.process.pid, signal.SIGCONT)
                    else:
                        os.killpg(proc.process.pid, signal.SIGKILL)
                        proc.process.wait(10)
                        time.sleep(args.down_s)
                        proc.start()

                def cb(name, doc, inject=inject, read=read, fired=fired):
                    if name == "event":
                        read["n"] += 1
                        if read["n"] == args.points // 4 and not fired.is_set():
                            fired.set()
                            threading.Thread(target=inject, daemon=True).start()

                RE.subscribe(cb)
                t0 = time.monotonic()
                uid, error = None, ""
                try:
                    (uid,) = RE(count([dev], num=args.points, delay=0.05))
                except Exception as exc:  # the outcome is the figure
                    error = f"{type(exc).__name__}: {exc}"
                elapsed = time.monotonic() - t0
                RE.remove_suspender(susp)
                if not proc.alive:
                    proc.start()
                else:
                    os.killpg(proc.process.pid, signal.SIGCONT)
                dev.wait_for_connection(timeout=30)
                if uid is None:
                    uid = store.runs[-1].metadata["start"]["uid"]
                run = store.runs[uid]
                stop = run.metadata.get("stop") or {}
                stored = len(run["primary"]["seq_num"].read()) if "primary" in run else 0
                seq = run["primary"]["seq_num"].read() if "primary" in run else []
                exit_status = stop.get("exit_status", "?")
                outcome = (f"suspended ({susp.trips[0] if susp.trips else 'no trip'}); "
                           f"exit_status={exit_status}")
                if error:
                    outcome += f"; plan error: {error[:160]}"
                rows.append(_row(kind, outcome, args.points, read["n"], stored,
                                 duplicates=int(len(seq) - len(set(np.asarray(seq).tolist()))),
                                 completed=exit_status == "success",
                                 elapsed_s=round(elapsed, 2)))
            log("faults: xmcd_adaptive_ioc_killed")
            rows.append(_adaptive_killed(args, proc, dev, store))
    finally:
        proc.stop()
    return rows


def _adaptive_killed(args, proc, dev, store) -> dict:
    """Kill the XMCD IOC in the adaptive phase of xmcd_adaptive_scan; compare GP and Tiled."""
    from bluesky import RunEngine

    from sim_devices.physics.xmcd import preset
    from smartbeam.analysis.acquisition import AdaptiveXMCD
    from smartbeam.faults import install_ioc_suspenders
    from smartbeam.plans import xmcd as xmcd_plans
    from smartbeam.storage import read_stream

    fe = preset("Fe")
    told: list[tuple[float, float, float]] = []

    class Recording(AdaptiveXMCD):
        def tell(self, energy, mu_plus, mu_minus, *a, **k):
            told.append((energy, mu_plus, mu_minus))
            return super().tell(energy, mu_plus, mu_minus, *a, **k)

    kwargs = dict(edges=[fe.e_l3, fe.e_l2], n_h=fe.n_h, tol=0.05,
                  max_points=args.adaptive_points, n_init=12, dwell=1.0)
    real = xmcd_plans.AdaptiveXMCD
    xmcd_plans.AdaptiveXMCD = Recording  # records what the GP is told; nothing else changes
    try:
        RE = RunEngine({})
        RE.subscribe(store.writer(batch_size=5))
        (susp,) = install_ioc_suspenders(RE, [dev], period=0.3, timeout=0.5, sleep=0.5)
        ref = None
        if not args.quick:
            (ref_uid,) = RE(xmcd_plans.xmcd_adaptive_scan(dev, *fe.window, **kwargs))
            ref = {k: float(v[0]) for k, v in read_stream(store.runs[ref_uid], "moments",
                   keys=["moments_m_orb", "moments_m_orb_sd", "moments_m_spin",
                         "moments_m_spin_sd"]).items()}
            told.clear()
        read = {"n": 0}
        fired = threading.Event()
        primary: set[str] = set()

        def inject():
            os.killpg(proc.process.pid, signal.SIGKILL)
            proc.process.wait(10)
            time.sleep(args.down_s)
            proc.start()

        def cb(name, doc):
            if name == "descriptor" and doc["name"] == "primary":
                primary.add(doc["uid"])
            if name == "event" and doc["descriptor"] in primary:
                read["n"] += 1
                if read["n"] == 30 and not fired.is_set():  # the 3rd GP-chosen energy
                    fired.set()
                    threading.Thread(target=inject, daemon=True).start()

        RE.subscribe(cb)
        uid, error = None, ""
        t0 = time.monotonic()
        try:
            (uid,) = RE(xmcd_plans.xmcd_adaptive_scan(dev, *fe.window, **kwargs))
        except Exception as exc:  # the outcome is the figure
            error = f"{type(exc).__name__}: {exc}"
        elapsed = time.monotonic() - t0
        RE.remove_suspender(susp)
    finally:
        xmcd_plans.AdaptiveXMCD = real
    if not proc.alive:
        proc.start()
    dev.wait_for_connection(timeout=30)
    if uid is None:
        uid = store.runs[-1].metadata["start"]["uid"]
    run = store.runs[uid]
    stop = run.metadata.get("stop") or {}
    prim = read_stream(run, "primary") if "primary" in run else {}
    seq = run["primary"]["seq_num"].read() if "primary" in run else np.array([])
    n_dec = len(read_stream(run, "decisions", keys=["decision_n_points"])["decision_n_points"]) \
        if "decisions" in run else 0
    match = bool(prim) and len(seq) == 2 * len(told)
    if match:
        sp = prim[dev.energy.setpoint.name]
        mode = prim[dev.pol.mode.name]
        mu = prim[dev.tey.name] / prim[dev.i0.name]
        for energy, mp, mm in told:
            at = np.flatnonzero(np.abs(sp - energy) < 1e-6)
            got = dict(zip(mode[at], mu[at], strict=True)) if len(at) == 2 else {}
            if not (np.isclose(got.get("circ+", np.nan), mp, rtol=1e-12)
                    and np.isclose(got.get("circ-", np.nan), mm, rtol=1e-12)):
                match = False
                break
    mom = ({k: float(v[0]) for k, v in read_stream(run, "moments").items()
            if k in ("moments_m_orb", "moments_m_orb_sd", "moments_m_spin",
                     "moments_m_spin_sd")} if "moments" in run else {})
    outcome = (f"suspended ({susp.trips[0] if susp.trips else 'no trip'}); "
               f"exit_status={stop.get('exit_status', '?')}; GP points == stored points: "
               f"{match}")
    if error:
        outcome += f"; plan error: {error[:160]}"
    extra = {"gp_points": len(told), "gp_points_match_stored": match,
             "decision_rows": n_dec, "duplicates": int(len(seq) - len(set(seq.tolist()))),
             "completed": stop.get("exit_status") == "success", "elapsed_s": round(elapsed, 2),
             "moments": mom}
    if ref is not None:
        extra["moments_undisturbed"] = ref
        extra["moments_within_3sd"] = bool(mom) and all(
            abs(mom[f"moments_{k}"] - ref[f"moments_{k}"])
            < 3 * np.hypot(mom[f"moments_{k}_sd"], ref[f"moments_{k}_sd"])
            for k in ("m_orb", "m_spin"))
    return _row("xmcd_adaptive_ioc_killed", outcome, 2 * len(told), read["n"], len(seq),
                **extra)


def _sans_det(shape=(32, 32), seed=0):
    from sim_devices.ophyd_twins.sans import SimSANSDetector
    from sim_devices.physics.sans import SANSSample

    sample = SANSSample("realistic", shape=shape, pixel_size_mm=30.0, count_rate=2000.0)
    return SimSANSDetector(sample, rng=np.random.default_rng(seed))


def _tiled_stopped(args, workdir: Path) -> dict:
    import tiled.client.utils as tiled_utils
    from bluesky import RunEngine

    from smartbeam.callbacks.live_kde import LiveKDE
    from smartbeam.plans.sans import sans_kde_count
    from smartbeam.storage import Storage

    n = 12 if args.quick else 30
    # a certain outage: do not spend Tiled's default 45 s of retries on it
    tiled_utils.TILED_RETRY_ATTEMPTS, tiled_utils.TILED_RETRY_TIMEOUT = 2, 2.0
    data_dir, backup = workdir / "tiled-outage", workdir / "backup"
    store = Storage(data_dir).open()
    writer = store.writer(batch_size=5, backup_directory=backup)
    read = {"n": 0}

    def stopper(name, doc):
        if name == "event" and "sans_det_image" in doc["data"]:
            read["n"] += 1
            if read["n"] == n // 2:
                store.server.close()

    RE = RunEngine({})
    RE.subscribe(LiveKDE(cadence=5, downstream=writer))
    RE.subscribe(stopper)
    (uid,) = RE(sans_kde_count(_sans_det(), exposure=1.0, max_exposures=n, cadence=5,
                               target_rel_error=1e-6))
    store.close()
    with Storage(data_dir) as back:
        before = (len(back.runs[uid]["primary"]["seq_num"].read())
                  if uid in back.runs and "primary" in back.runs[uid] else 0)
        report = back.replay(backup)
        run = back.runs[uid]
        stored = len(run["primary"]["sans_det_image"].read())
        streams = sorted(run)
        exit_status = run.metadata["stop"]["exit_status"]
    return _row("tiled_stopped", f"journaled, replayed ({len(report.written)} run); "
                f"exit_status={exit_status}; streams={','.join(streams)}", n, read["n"],
                stored, stored_before_replay=before)


def _callback_exception(args) -> dict:
    from bluesky import RunEngine
    from bluesky.plans import count

    from smartbeam.analysis.kde_stream import StreamingKDE
    from smartbeam.callbacks.live_kde import LiveKDE

    n = 12 if args.quick else 30
    real = StreamingKDE.result
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected smoothing failure")
        return real(self, *a, **k)

    docs = []
    cb = LiveKDE(cadence=4, downstream=lambda nm, d: docs.append((nm, d)))
    RE = RunEngine({})
    RE.subscribe(cb)
    det = _sans_det(seed=1)
    det.shutter.put("open")
    StreamingKDE.result = flaky
    try:
        RE(count([det], num=n))
    finally:
        StreamingKDE.result = real
    descs = {d["uid"]: d["name"] for nm, d in docs if nm == "descriptor"}
    primary = sum(1 for nm, d in docs if nm == "event" and descs[d["descriptor"]] == "primary")
    errors = [d["data"]["error"] for nm, d in docs
              if nm == "event" and descs[d["descriptor"]] == "kde" and d["data"]["error"]]
    return _row("callback_exception", f"{len(errors)} kde row(s) with error set; "
                f"exit_status={docs[-1][1]['exit_status']}", n, n, primary)


def _bad_frames() -> dict:
    from event_model import compose_run

    from smartbeam.faults import FrameQualityMonitor

    rng = np.random.default_rng(2)
    good = [rng.poisson(5.0, (16, 16)).astype(np.int32) for _ in range(8)]
    nan, inf, neg = good[1].astype(float), good[2].astype(float), good[3].copy()
    nan[0, 0], inf[1, 1], neg[2, 2] = np.nan, np.inf, -3
    frames = [good[0], nan, inf, neg, np.zeros((8, 8), np.int32), good[4], good[4], good[5],
              good[6]]
    counters = [1, 2, 3, 4, 5, 6, 6, 9, 10]
    out = []
    mon = FrameQualityMonitor(downstream=lambda nm, d: out.append((nm, d)))
    b = compose_run()
    mon("start", b.start_doc)
    desc = b.compose_descriptor(name="primary", data_keys={
        "det_image": {"dtype": "array", "shape": [16, 16], "source": "sim"},
        "det_array_counter": {"dtype": "integer", "shape": [], "source": "sim"}})
    mon("descriptor", desc.descriptor_doc)
    for f, c in zip(frames, counters, strict=True):
        mon("event", desc.compose_event(data={"det_image": f, "det_array_counter": c},
                                        timestamps={"det_image": 0, "det_array_counter": 0}))
    mon("stop", b.compose_stop())
    descs = {d["uid"]: d["name"] for nm, d in out if nm == "descriptor"}
    raw = sum(1 for nm, d in out if nm == "event" and descs[d["descriptor"]] == "primary")
    flags = {k: v for k, v in mon.counts.items() if v}
    return _row("bad_frames", f"flagged {flags}; raw frames all forwarded",
                len(frames), len(frames), raw,
                detector_frames_missing=int(sum(max(b - a - 1, 0) for a, b in
                                                zip(counters, counters[1:], strict=False))))


def _repeated_frames(args, workdir: Path) -> dict:
    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd.status import DeviceStatus

    from sim_devices.ophyd_twins.sans import SimSANSDetector
    from sim_devices.physics.sans import SANSSample
    from smartbeam.session import analysis_chain

    n = 12 if args.quick else 30
    repeat_at = {4, 5, 9, 10}  # 1-based triggers; 4, 5 counter stuck; 9, 10 counter advancing

    class Stuck(SimSANSDetector):
        n_trig = 0

        def trigger(self):
            self.n_trig += 1
            if self.n_trig not in repeat_at:
                return super().trigger()
            if self.n_trig >= 9:
                self.array_counter.put(int(self.array_counter.get()) + 1)
            st = DeviceStatus(self)
            st.set_finished()
            return st

    sample = SANSSample("realistic", shape=(32, 32), pixel_size_mm=30.0, count_rate=2000.0)
    det = Stuck(sample, rng=np.random.default_rng(4))
    det.shutter.put("open")
    docs = []
    chain = analysis_chain(lambda nm, d: docs.append((nm, d)), png_dir=workdir)
    RE = RunEngine({})
    RE.subscribe(chain)
    RE(count([det], num=n))
    descs = {d["uid"]: d["name"] for nm, d in docs if nm == "descriptor"}
    rows = {}
    for nm, d in docs:
        if nm == "event":
            rows.setdefault(descs[d["descriptor"]], []).append(d["data"])
    frames = [np.asarray(r["sans_det_image"]) for r in rows.get("primary", [])]
    flags = [r["flag"] for r in rows.get("frame_quality", [])]
    flagged = [i + 1 for i, f in enumerate(flags) if f == "repeated"]
    kde = chain.downstream.downstream
    distinct = np.sum([f for i, f in enumerate(frames) if i + 1 not in repeat_at], axis=0)
    last = rows["kde"][-1] if rows.get("kde") else {}
    return _row("repeated_frames",
                f"flagged repeated at frames {flagged} of {sorted(repeat_at)} injected; "
                f"LiveKDE summed {int(last.get('n_exposures', -1))} of {n} frames, "
                f"n_repeated={int(last.get('n_repeated', -1))}",
                n, n, len(frames),
                kde_sum_equals_distinct_frames=bool(
                    kde.stream is not None and np.array_equal(kde.stream.acc.total, distinct)))


def run(args: argparse.Namespace) -> dict:
    """Run every scenario; returns ``{"faults": [...]}`` (see the module docstring)."""
    from tqdm import tqdm

    def log(msg):
        tqdm.write(msg, file=sys.stderr)

    rows = []
    # bluesky prints suspension notices on stdout, which carries the JSON: send them to stderr
    with contextlib.redirect_stdout(sys.stderr), \
            tempfile.TemporaryDirectory(prefix="smartbeam-faults-") as tmp:
        workdir = Path(tmp)
        steps = [] if args.skip_ioc else ["ioc"]
        steps += ["tiled_stopped", "callback_exception", "bad_frames", "repeated_frames"]
        for step in tqdm(steps, desc="fault scenarios", file=sys.stderr):
            if step == "ioc":
                rows += _ioc_scenarios(args, workdir, log)
            elif step == "tiled_stopped":
                rows.append(_tiled_stopped(args, workdir))
            elif step == "callback_exception":
                rows.append(_callback_exception(args))
            elif step == "repeated_frames":
                rows.append(_repeated_frames(args, workdir))
            else:
                rows.append(_bad_frames())
    return {"faults": rows, "total_data_lost": int(sum(r["data_lost"] for r in rows))}
