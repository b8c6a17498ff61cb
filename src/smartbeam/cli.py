"""The ``smartbeam`` command line: ``smartbeam demo|serve|ioc|runs|bench|...``.

Errors on bad input print one line and exit 1 (argparse usage errors exit 2); no
tracebacks. Heavy imports happen inside the sub-commands so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from . import __version__
from .errors import SmartbeamError

__all__ = ["build_parser", "main"]

# Sub-command modules exposing register(subparsers).
COMMAND_MODULES = (
    "smartbeam.commands.demo",
    "smartbeam.commands.ioc",
    "smartbeam.commands.serve",
    "smartbeam.commands.runs",
    "smartbeam.commands.library",
    "smartbeam.commands.estimate",
    "smartbeam.commands.mds",
    "smartbeam.commands.reprocess",
    "smartbeam.commands.replay",
    "smartbeam.commands.bench",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="smartbeam",
        description="Faster synchrotron/neutron measurements with the analysis inside the scan.",
    )
    parser.add_argument("--version", action="version", version=f"smartbeam {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("smartbeam: interrupted", file=sys.stderr)
        return 130
    except (SmartbeamError, ValueError, OSError, json.JSONDecodeError) as exc:
        print(f"smartbeam {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
