"""``smartbeam bench storage``: queue overhead, Tiled write rates, query latency.

Figures (medians; BLAS pinned to one thread):

- queue: item-add latency, and wall time per queued item from ``queue_start`` to idle for
  a no-op plan (``sleep 0``: pure queueserver overhead) and a one-point ``count`` (a run
  opened, written to Tiled and closed), on a real Redis + ``start-re-manager`` with the
  profile and the caproto twins;
- writes: events/s (three scalar fields) and frames/s (128x128 int32) through
  ``Storage.writer()`` (the plugin's batching, ``DEFAULT_BATCH_SIZE`` events per request)
  into the embedded store and into ``smartbeam serve`` on PostgreSQL with two workers,
  beside the RunEngine's own rate without a writer;
- queries: "find runs by sample and plan" (``find_runs``) over N stored runs, from a fresh
  client, on both backends.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

__all__ = ["add_arguments", "run"]

PLANS = ("xmcd_adaptive_scan", "xmcd_dense_scan", "stxm_image", "sans_kde_count", "count")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser``."""
    parser.add_argument("--quick", action="store_true",
                        help="fewer events, frames, runs and queue items")
    parser.add_argument("--runs", type=int, default=None,
                        help="runs stored for the query figure (default 1000; quick 200)")
    parser.add_argument("--events", type=int, default=None, help="scalar events (default 2000)")
    parser.add_argument("--frames", type=int, default=None, help="128x128 frames (default 200)")
    parser.add_argument("--items", type=int, default=None, help="queue items (default 20)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["queue", "embedded", "postgres"], help="parts to leave out")
    parser.add_argument("--json", action="store_true", help="(output is always JSON)")


def _median_ms(values: list[float]) -> float:
    return round(1e3 * statistics.median(values), 2)


# -- writes and queries ------------------------------------------------------------------
def _write_rates(store, n_events: int, n_frames: int) -> dict:
    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd.sim import SynSignal

    rng = np.random.default_rng(0)
    scalars = [SynSignal(func=lambda: float(rng.normal()), name=f"s{i}") for i in range(3)]
    frame = SynSignal(func=lambda: rng.poisson(3.0, (128, 128)).astype(np.int32), name="frame")
    out = {}
    for label, dets, n in (("events", scalars, n_events), ("frames", [frame], n_frames)):
        bare = RunEngine({})
        t0 = time.perf_counter()
        bare(count(dets, num=n))
        rate_bare = n / (time.perf_counter() - t0)
        RE = RunEngine({})
        RE.subscribe(store.writer())
        t0 = time.perf_counter()
        (uid,) = RE(count(dets, num=n))
        elapsed = time.perf_counter() - t0
        stored = store.runs[uid].metadata["stop"]["num_events"]["primary"]
        out[label] = {"n": n, "per_s_written": round(n / elapsed, 1),
                      "per_s_runengine_alone": round(rate_bare, 1), "stored": stored}
    return out


def _labels(i: int) -> tuple[str, str]:
    """Plan and sample of stored run ``i``: 5 plans x 50 samples, independent of each other."""
    return PLANS[i % len(PLANS)], f"sample-{(i // len(PLANS)) % 50:02d}"


def _fill_runs(store, n_runs: int, desc: str) -> float:
    """Write ``n_runs`` small runs (3 events) with metadata spread over samples and plans.

    Sequential on purpose: the time is spent in the Tiled server (~8 requests per run, the
    stop document alone ~0.7 s); 4 writer threads were no faster on this 2-core machine, on
    either backend (0.76 vs 0.83 s/run embedded, 0.77-1.04 vs 0.71-0.87 s/run PostgreSQL).
    """
    from event_model import compose_run

    writer = store.writer()
    t0 = time.perf_counter()
    for i in tqdm(range(n_runs), desc=desc, file=sys.stderr, leave=False):
        plan, sample = _labels(i)
        bundle = compose_run(metadata={"plan_name": plan, "sample": sample, "scan_id": i + 1})
        writer("start", bundle.start_doc)
        desc_bundle = bundle.compose_descriptor(
            name="primary", data_keys={"x": {"dtype": "number", "shape": [], "source": "x"}})
        writer("descriptor", desc_bundle.descriptor_doc)
        for k in range(3):
            writer("event", desc_bundle.compose_event(data={"x": float(k)},
                                                      timestamps={"x": time.time()}))
        writer("stop", bundle.compose_stop())
    return time.perf_counter() - t0


def _query_latency(uri: str, api_key: str | None, n_queries: int, n_runs: int) -> dict:
    from tiled.client import from_uri

    from ..storage import find_runs

    runs = from_uri(uri, api_key=api_key)["runs"]
    rng = np.random.default_rng(1)
    times, found = [], []
    for _ in range(n_queries):
        # The labels of a stored run: every query has at least one hit.
        plan, sample = _labels(int(rng.integers(n_runs)))
        t0 = time.perf_counter()
        hits = find_runs(runs, plan_name=plan, sample=sample)
        times.append(time.perf_counter() - t0)
        found.append(len(hits))
    t0 = time.perf_counter()
    total = len(runs)
    return {"find_by_sample_and_plan_median_ms": _median_ms(times),
            "find_p95_ms": round(1e3 * float(np.percentile(times, 95)), 2),
            "runs_found_median": statistics.median(found), "queries": n_queries,
            "stored_runs": total, "count_all_ms": round(1e3 * (time.perf_counter() - t0), 2)}


def _backend(store, uri: str, api_key: str | None, args, label: str) -> dict:
    out = {"write": _write_rates(store, args.events, args.frames)}
    fill_s = _fill_runs(store, args.runs, f"{label}: {args.runs} runs")
    out["fill_runs_per_s"] = round(args.runs / fill_s, 1)
    out["query"] = _query_latency(uri, api_key, 100 if not args.quick else 20, args.runs)
    return out


def _embedded(args) -> dict:
    from ..storage import Storage

    with tempfile.TemporaryDirectory() as tmp, Storage(tmp) as store:
        return _backend(store, store.server.uri, None, args, "embedded")


def _postgres(args) -> dict:
    from ..localservices import PostgresServer, TiledServe
    from ..storage import Storage

    if not PostgresServer.available():
        return {"skipped": "PostgreSQL binaries not installed"}
    key = secrets.token_hex(16)
    with tempfile.TemporaryDirectory() as tmp, PostgresServer() as pg, \
            TiledServe(Path(tmp) / "arrays", key, catalog=pg.uri, workers=2) as server:
        store = Storage(uri=server.uri, api_key=key).open()
        out = _backend(store, server.uri, key, args, "postgres")
        out["workers"] = 2
        return out


# -- queue -------------------------------------------------------------------------------
def _queue(args) -> dict:
    from bluesky_queueserver_api import BPlan
    from bluesky_queueserver_api.zmq import REManagerAPI

    from ..localservices import RedisServer, ReManager, TiledServe

    if not RedisServer.available():
        return {"skipped": "redis-server not installed"}
    startup = Path(__file__).resolve().parents[3] / "profile_collection" / "startup"
    if not startup.is_dir():
        return {"skipped": f"profile not found at {startup}"}
    key = secrets.token_hex(16)
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis, \
            TiledServe(Path(tmp) / "tiled", key) as tiled:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
        env.update(SMARTBEAM_SIM="1", SMARTBEAM_TIME_SCALE="0.02", MPLBACKEND="Agg",
                   SMARTBEAM_MD_DIR=str(Path(tmp) / "md"), SMARTBEAM_TILED_URI=tiled.uri,
                   TILED_API_KEY=key, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        with ReManager(redis.url, startup, env=env, log_path=Path(tmp) / "manager.log",
                       extra_args=["--existing-plans-devices",
                                   str(startup / "existing_plans_and_devices.yaml")]) as mgr:
            RM = REManagerAPI(zmq_control_addr=mgr.zmq_control, zmq_info_addr=mgr.zmq_info)
            RM.user_group = "primary"
            try:
                t0 = time.perf_counter()
                RM.environment_open()
                RM.wait_for_idle(timeout=300)
                env_open_s = time.perf_counter() - t0
                if not RM.status()["worker_environment_exists"]:
                    return {"error": "worker environment did not open"}
                out = {"environment_open_s": round(env_open_s, 2), "items": args.items}
                for label, item in (("sleep0", BPlan("sleep", 0)),
                                    ("count1", BPlan("count", ["xmcd"], num=1))):
                    adds = []
                    for _ in range(args.items):
                        t0 = time.perf_counter()
                        RM.item_add(item)
                        adds.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    RM.queue_start()
                    RM.wait_for_idle(timeout=600)
                    per_item = (time.perf_counter() - t0) / args.items
                    out[label] = {"item_add_median_ms": _median_ms(adds),
                                  "per_item_s": round(per_item, 3)}
                RM.environment_close()
                RM.wait_for_idle(timeout=60)
            finally:
                RM.close()
    out["note"] = ("per_item_s includes the API's status polling (1 s period in "
                   "wait_for_idle) spread over the items")
    return out


def run(args: argparse.Namespace) -> dict:
    """Run the storage benchmark; returns the figures (JSON-serialisable)."""
    from threadpoolctl import threadpool_limits

    args.runs = args.runs or (200 if args.quick else 1000)
    args.events = args.events or (500 if args.quick else 2000)
    args.frames = args.frames or (50 if args.quick else 200)
    args.items = args.items or (5 if args.quick else 20)
    from ..storage import DEFAULT_BATCH_SIZE

    # The machine is shared: the load average says how contended the timings were.
    result = {"batch_size": DEFAULT_BATCH_SIZE, "quick": bool(args.quick),
              "load_avg_1_5_15_at_start": [round(x, 2) for x in os.getloadavg()]}
    with threadpool_limits(1):
        if "embedded" not in args.skip:
            result["embedded"] = _embedded(args)
        if "postgres" not in args.skip:
            result["postgres"] = _postgres(args)
        if "queue" not in args.skip:
            result["queue"] = _queue(args)
    result["load_avg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result
