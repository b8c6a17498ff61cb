"""``smartbeam ioc xmcd|stxm|sans --port N``: serve one simulated instrument over EPICS CA."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(subparsers) -> None:
    from sim_devices.runner import add_ioc_arguments

    parser = subparsers.add_parser(
        "ioc", help="run a simulated instrument (caproto IOC) on a loopback port",
        description="Serve the PVs of one simulated instrument over real EPICS Channel Access. "
                    "Stop with Ctrl-C.")
    add_ioc_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from sim_devices.runner import run_ioc

    try:
        return run_ioc(args)
    except KeyboardInterrupt:
        return 0
