"""``smartbeam reprocess RUN...``: re-run stack analyses over stored runs on Dask.

Each raw run is read from Tiled, analysed on a Dask distributed cluster (a
``LocalCluster`` by default, ``--scheduler ADDRESS`` for a real one) and the result is
written as a *linked analysis run* (start keys ``analysis_of`` = raw uid, ``analysis``,
``analysis_version``) with a ``maps`` stream. Raw runs are only read, never written.
Re-running is idempotent: an existing analysis run of the same raw run, kind and
version is reported and kept (``--force`` writes a new one beside it).

Analyses: ``moments`` (XMCD stacks, per-pixel m_orb/m_spin; one task per run) and
``tendq`` (XAS stacks, per-pixel 10Dq; pixel chunks spread over the workers).
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

import numpy as np

from ..errors import SmartbeamError, SmartbeamInputError

__all__ = ["ANALYSIS_VERSION", "MIN_CHUNK", "moments_task", "read_stack", "register",
           "reprocess", "tendq_chunk", "tendq_task"]

#: Bumped when the analysis changes, so a re-run writes a new analysis run.
ANALYSIS_VERSION = 2  # 2: 10Dq maps with the map default measures (linear)
ANALYSES = ("auto", "moments", "tendq")
#: Fewest pixels per 10Dq task by default: chunks of the pooled stack this large take the
#: batched low-rank search (it pays from ~96 spectra on; see smartbeam.analysis.tendq_batch)
#: and dilute its fixed cost per chunk (its tables of ~15 basis rows x offsets x library):
#: measured on the bench's 32x32 field, one core, 160 / 420 / 990 / 2700 pixels/s at 32 /
#: 128 / 256 / 1024 pixels per task.
MIN_CHUNK = 256


def tendq_chunk(n_pixels: int, n_workers: int) -> int:
    """Default pixels per 10Dq task: one task per worker, at least :data:`MIN_CHUNK`."""
    return max(MIN_CHUNK, -(-int(n_pixels) // max(int(n_workers), 1)))


def _add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="embedded store directory (default $SMARTBEAM_DATA_DIR or the "
                             "user data dir)")
    parser.add_argument("--uri", default=None, help="URI of a running Tiled server instead")
    parser.add_argument("--api-key", default=None,
                        help="API key of that server (default $TILED_API_KEY)")


def register(subparsers) -> None:
    """Add the ``reprocess`` sub-command."""
    parser = subparsers.add_parser(
        "reprocess", help="re-run moment or 10Dq analysis of stored STXM stacks on Dask",
        description=__doc__.split("\n\n")[1])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="uid, partial uid or scan_id")
    parser.add_argument("--scheduler", default=None,
                        help="Dask scheduler address (default: a LocalCluster)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster workers")
    parser.add_argument("--analysis", choices=ANALYSES, default="auto",
                        help="which analysis (auto: from the run's plan)")
    parser.add_argument("--chunk", type=int, default=None,
                        help="pixels per 10Dq task (default: one task per worker, at least "
                             f"{MIN_CHUNK})")
    parser.add_argument("--force", action="store_true",
                        help="write a new analysis run even if one exists")
    parser.add_argument("--json", action="store_true", help="print JSON")
    _add_storage_arguments(parser)
    parser.set_defaults(func=_run)


# -- reading ---------------------------------------------------------------------------
def read_stack(run) -> dict[str, Any]:
    """Energies, polarisation modes and images (K, ny, nx) of a stored stack run."""
    start = run.metadata["start"]
    if "primary" not in run:
        raise SmartbeamInputError(f"run {start['uid'][:8]} has no primary stream: expected "
                                  "an STXM stack run")
    node = run["primary"]
    keys = list(node)
    image_key = next((k for k in keys if k.endswith("_det_image")), None)
    motor = (start.get("motors") or [None])[0]
    energy_key = motor if motor in keys else next((k for k in keys if k.endswith("_energy")),
                                                  None)
    pol_key = next((k for k in keys if k.endswith("_pol_mode")), None)
    if image_key is None or energy_key is None:
        raise SmartbeamInputError(f"run {start['uid'][:8]} ({start.get('plan_name')}): no "
                                  f"image/energy fields in {keys}; expected an STXM stack")
    pols = np.asarray(node[pol_key].read()).astype(str) if pol_key else None
    return {"energy": np.asarray(node[energy_key].read(), dtype=float),
            "pol": pols, "images": np.asarray(node[image_key].read()), "start": start}


# -- tasks (run on Dask workers; pure functions of arrays) ---------------------------
def moments_task(energy: np.ndarray, images_plus: np.ndarray, images_minus: np.ndarray,
                 e_min: float, e_max: float, n_h: float,
                 edges: tuple[float, float] | None) -> dict[str, Any]:
    """Per-pixel moment maps of one XMCD stack (images at matching energies)."""
    from threadpoolctl import threadpool_limits

    from ..analysis.stack import StackModel, optical_density

    with threadpool_limits(1):
        odp, vp = optical_density(images_plus)
        odm, vm = optical_density(images_minus)
        m = StackModel(e_min, e_max, n_h, edges=edges).fit(energy, odp, odm, vp, vm).moments()
    return {"m_orb": m.m_orb, "m_orb_sd": m.m_orb_sd, "m_spin": m.m_spin,
            "m_spin_sd": m.m_spin_sd, "rms_sd": m.rms_sd, "rms_m_orb": m.rms_m_orb,
            "e_l3": m.e_l3, "e_l2": m.e_l2, "n_energies": m.n_energies}


def tendq_task(energy: np.ndarray, spectra: np.ndarray, ion: str,
               measures: str | tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """10Dq, sd, described flag and score of a chunk of pixel spectra (n, K).

    ``measures``: as :func:`~smartbeam.analysis.stack.tendq_maps` (default its default,
    :data:`~smartbeam.analysis.tendq.MAP_MEASURES`). A chunk of a pooled stack with at
    least ~96 pixels takes the batched low-rank search.
    """
    from threadpoolctl import threadpool_limits

    from ..analysis.tendq import MAP_MEASURES
    from ..library_store import make_fitter

    with threadpool_limits(1):
        fitter = _cached_fitter(ion, make_fitter).with_measures(
            MAP_MEASURES if measures is None else measures)
        # pixels of one stack: one monochromator calibration (see tendq_maps)
        res = fitter.predict_map(energy, spectra, shared_offset=min(0.5, fitter.offset_range))
    return {"ten_dq": res["ten_dq"], "ten_dq_sd": res["sd"],
            "described": res["described"].astype(np.int8), "score": res["score"]}


_FITTERS: dict[str, Any] = {}


def _cached_fitter(ion: str, make):
    # One fitted library per worker process, not one per task.
    if ion not in _FITTERS:
        _FITTERS[ion] = make(ion)
    return _FITTERS[ion]


# -- orchestration ------------------------------------------------------------------------
def _kind(start: dict, requested: str) -> str:
    if requested != "auto":
        return requested
    kind = start.get("analysis")
    if kind in ("moments", "tendq"):
        return kind
    plan = start.get("plan_name")
    if plan == "stxm_xas_map":
        return "tendq"
    if plan in ("stxm_xmcd_stack", "stxm_image"):
        return "moments"
    raise SmartbeamInputError(f"run {start['uid'][:8]} of plan {plan!r}: expected an STXM "
                              "stack (stxm_xmcd_stack, stxm_image, stxm_xas_map) or "
                              "--analysis moments|tendq")


def _existing(store, uid: str, kind: str) -> list:
    from tiled.queries import Key

    res = store.runs.search(Key("start.analysis_of") == uid).search(
        Key("start.analysis") == kind).search(Key("start.analysis_version") == ANALYSIS_VERSION)
    return list(res.values())


def _submit(client, raw: dict, kind: str, chunk: int | None):
    """Submit the run's tasks; returns a function that gathers the maps."""
    start, e, images = raw["start"], raw["energy"], raw["images"]
    ny, nx = images.shape[1:]
    if kind == "moments":
        if raw["pol"] is None:
            raise SmartbeamInputError(f"run {start['uid'][:8]}: no polarisation field; "
                                      "expected circ+/circ- images for moments")
        plus, minus = raw["pol"] == "circ+", raw["pol"] == "circ-"
        ep, em = e[plus], e[minus]
        order_p, order_m = np.argsort(ep, kind="stable"), np.argsort(em, kind="stable")
        if plus.sum() != minus.sum() or not np.allclose(ep[order_p], em[order_m], atol=1e-2):
            raise SmartbeamInputError(f"run {start['uid'][:8]}: circ+ and circ- images at "
                                      "different energies; expected pairs")
        args = start.get("plan_args", {})
        e_min = float(args.get("e_min", e.min()))
        e_max = float(args.get("e_max", e.max()))
        edges = args.get("edges")
        fut = client.submit(moments_task, ep[order_p], images[plus][order_p],
                            images[minus][order_m], e_min, e_max,
                            float(start.get("n_h", args.get("n_h", 3.39))),
                            tuple(edges) if edges else None, pure=False)
        return lambda: client.gather(fut)
    from ..analysis.stack import lowrank_denoise, optical_density

    order = np.argsort(e, kind="stable")
    od, var = optical_density(images[order])
    # Same pooling as stxm_xas_map; it needs the whole stack (one K x K eigenproblem),
    # so it runs here and only the per-pixel estimates are spread over the workers.
    od, _ = lowrank_denoise(od, var)
    spectra = od.reshape(len(e), -1).T
    ion = start.get("ion", "Mn2+")
    e_sorted = e[order]
    e_fut = client.scatter(e_sorted, broadcast=True)
    if chunk is None:
        chunk = tendq_chunk(spectra.shape[0], len(client.scheduler_info()["workers"]))
    futs = [client.submit(tendq_task, e_fut, spectra[i:i + chunk], ion, pure=False)
            for i in range(0, spectra.shape[0], chunk)]

    def gather():
        parts = client.gather(futs)
        out = {k: np.concatenate([p[k] for p in parts]).reshape(ny, nx) for k in parts[0]}
        out["n_described"] = int(out["described"].sum())
        return out
    return gather


def _write_analysis_run(store, raw_start: dict, kind: str, maps: dict[str, Any],
                        elapsed: float) -> str:
    from event_model import compose_run

    from ..callbacks.derived import data_key_for

    writer = store.writer()
    md = {"plan_name": "reprocess", "analysis_of": raw_start["uid"], "analysis": kind,
          "analysis_version": ANALYSIS_VERSION, "raw_plan_name": raw_start.get("plan_name"),
          "shape": raw_start.get("shape"), "pixel_um": raw_start.get("pixel_um"),
          "sample": raw_start.get("sample", ""), "kde": False,
          "reprocess_id": uuid.uuid4().hex}
    bundle = compose_run(metadata=md)
    writer("start", bundle.start_doc)
    data = {k: (np.asarray(v) if np.ndim(v) else v) for k, v in maps.items()}
    data["elapsed_s"] = float(elapsed)
    dims = {k: ("map_y", "map_x") for k, v in data.items() if np.ndim(v) == 2}
    keys = {k: data_key_for(v, source="smartbeam.reprocess", dims=dims.get(k))
            for k, v in data.items()}
    desc = bundle.compose_descriptor(name="maps", data_keys=keys)
    writer("descriptor", desc.descriptor_doc)
    now = time.time()
    writer("event", desc.compose_event(data=data, timestamps={k: now for k in data}))
    writer("stop", bundle.compose_stop(exit_status="success"))
    return bundle.start_doc["uid"]


def reprocess(store, run_keys: list, client, *, analysis: str = "auto",
              chunk: int | None = None,
              force: bool = False) -> list[dict[str, Any]]:
    """Analyse stored runs on a Dask ``client`` and write linked analysis runs.

    Parameters
    ----------
    store
        An open :class:`smartbeam.storage.Storage`.
    run_keys
        uids, partial uids or scan_ids of raw runs.
    client
        A ``dask.distributed.Client``.
    analysis
        ``auto``, ``moments`` or ``tendq``.
    chunk
        Pixels per 10Dq task (default :func:`tendq_chunk`: one per worker, at least
        :data:`MIN_CHUNK`).
    force
        Write a new analysis run even when one exists.

    Returns
    -------
    list of dict
        Per run: raw uid, analysis, status (``written``/``exists``), analysis uid, seconds.
    """
    if analysis not in ANALYSES:
        raise SmartbeamInputError(f"analysis={analysis!r}: expected one of {ANALYSES}")
    if chunk is not None and chunk < 1:
        raise SmartbeamInputError(f"chunk={chunk!r}: expected a positive number of pixels")
    jobs = []
    for key in run_keys:
        run = store.run(int(key) if str(key).lstrip("-").isdigit() else key)
        start = run.metadata["start"]
        kind = _kind(start, analysis)
        found = _existing(store, start["uid"], kind)
        if found and not force:
            jobs.append({"raw_uid": start["uid"], "analysis": kind, "status": "exists",
                         "analysis_uid": found[-1].metadata["start"]["uid"], "seconds": 0.0})
            continue
        t0 = time.perf_counter()
        gather = _submit(client, read_stack(run), kind, chunk)
        jobs.append({"raw_uid": start["uid"], "analysis": kind, "start": start, "t0": t0,
                     "gather": gather})
    out = []
    for job in jobs:
        if "gather" not in job:
            out.append(job)
            continue
        maps = job["gather"]()
        elapsed = time.perf_counter() - job["t0"]
        uid = _write_analysis_run(store, job["start"], job["analysis"], maps, elapsed)
        out.append({"raw_uid": job["raw_uid"], "analysis": job["analysis"],
                    "status": "written", "analysis_uid": uid, "seconds": elapsed})
    return out


def _run(args: argparse.Namespace) -> int:
    from dask.distributed import Client, LocalCluster

    from ..storage import Storage

    with Storage(args.data_dir, uri=args.uri, api_key=args.api_key) as store:
        if args.scheduler:
            try:
                client = Client(args.scheduler, timeout=10)
            except OSError as exc:
                raise SmartbeamError(f"--scheduler {args.scheduler}: cannot connect ({exc})") \
                    from None
            cluster = None
        else:
            cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1,
                                   dashboard_address=None)
            client = Client(cluster)
        try:
            rows = reprocess(store, args.runs, client, analysis=args.analysis,
                             chunk=args.chunk, force=args.force)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['raw_uid'][:8]} {r['analysis']:<8} {r['status']:<8} -> "
                  f"{r['analysis_uid'][:8]} ({r['seconds']:.1f} s)")
    return 0
