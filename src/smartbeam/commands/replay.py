"""``smartbeam replay DIR``: put runs journaled during a storage outage into Tiled."""

from __future__ import annotations

import argparse
import json

from .runs import add_storage_arguments

__all__ = ["register"]


def register(subparsers) -> None:
    """Add the ``replay`` sub-command to ``subparsers``."""
    parser = subparsers.add_parser(
        "replay", help="put runs from a backup (journal) directory into Tiled",
        description="Write every run journaled in DIR (by a writer made with "
                    "backup_directory=DIR while Tiled was unreachable) into the store. "
                    "Runs already stored complete are skipped; partial ones are replaced, "
                    "so the result equals an undisturbed run. Safe to run again.")
    parser.add_argument("directory", metavar="DIR", help="the backup (journal) directory")
    add_storage_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=100,
                        help="events per write request (default 100)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..errors import SmartbeamInputError
    from ..storage import Storage

    if args.batch_size < 1:
        raise SmartbeamInputError(f"--batch-size {args.batch_size}: expected an integer >= 1")
    from pathlib import Path

    if not Path(args.directory).expanduser().is_dir():  # before starting a server for nothing
        raise SmartbeamInputError(f"backup directory {args.directory!r} does not exist; "
                                  "expected the directory given as backup_directory")
    with Storage(args.data_dir, uri=args.uri, api_key=args.api_key) as store:
        report = store.replay(args.directory, batch_size=args.batch_size)
        location = store.location
    summary = report.as_dict()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"replayed into {location}: {len(report.written)} written "
              f"({len(report.replaced)} replacing partial runs), {len(report.skipped)} already "
              f"complete, {len(report.incomplete)} without a stop document")
        for uid in report.written:
            print(f"  written {uid}")
    return 0
