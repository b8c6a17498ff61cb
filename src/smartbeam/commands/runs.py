"""``smartbeam runs``: list and inspect stored runs."""

from __future__ import annotations

import argparse
import datetime
import json

__all__ = ["register"]


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` / ``--uri`` / ``--api-key``, shared by commands that open the store."""
    parser.add_argument("--data-dir", default=None,
                        help="embedded store directory (default $SMARTBEAM_DATA_DIR or the "
                             "user data dir)")
    parser.add_argument("--uri", default=None, help="URI of a running Tiled server instead")
    parser.add_argument("--api-key", default=None, help="API key of that server "
                        "(default $TILED_API_KEY)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("runs", help="list stored runs (filter by plan, sample, ...)",
                                   description="List runs in the store, newest last.")
    add_storage_arguments(parser)
    parser.add_argument("--plan", default=None, help="only runs of this plan name")
    parser.add_argument("--sample", default=None, help="only runs of this sample")
    parser.add_argument("--limit", type=int, default=20, help="show at most this many (newest)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..storage import Storage

    with Storage(args.data_dir, uri=args.uri, api_key=args.api_key) as store:
        runs = store.find(plan_name=args.plan, sample=args.sample)[-args.limit:]
        rows = []
        for run in runs:
            start = run.metadata["start"]
            stop = run.metadata.get("stop") or {}
            rows.append({
                "scan_id": start.get("scan_id"), "uid": start["uid"][:8],
                "time": datetime.datetime.fromtimestamp(start["time"]).isoformat(timespec="seconds"),
                "plan": start.get("plan_name"), "sample": start.get("sample", ""),
                "streams": sorted(run), "exit": stop.get("exit_status", "running"),
            })
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['scan_id']!s:>5} {r['uid']} {r['time']} {r['plan']!s:<24} "
                  f"{r['sample']!s:<16} {r['exit']:<8} {','.join(r['streams'])}")
    return 0
