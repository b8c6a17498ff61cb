"""``smartbeam demo``: run the main job on the simulated beamline."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run every method on the simulated beamline and the embedded store",
        description="Start the simulated twins (caproto IOCs over real EPICS CA) and the "
                    "embedded Tiled store, run an adaptive XMCD scan with a dense reference, "
                    "an STXM image and a live-KDE SANS count, print a summary and where the "
                    "data and PNG plots went, and stop everything it started.")
    parser.add_argument("--data-dir", default=None,
                        help="store directory (default $SMARTBEAM_DATA_DIR or the user data dir)")
    parser.add_argument("--output", default="demo-output", help="directory for PNGs and logs")
    parser.add_argument("--time-scale", type=float, default=0.2,
                        help="simulated time factor (1 = real dwell and motion times)")
    parser.add_argument("--quick", action="store_true", help="fewer points everywhere")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    if args.time_scale <= 0:
        raise ValueError(f"--time-scale {args.time_scale}: expected a positive factor")
    print("smartbeam demo: starting the simulated beamline and the embedded store ...",
          flush=True)
    result = run_demo(args.data_dir, args.output, time_scale=args.time_scale, quick=args.quick)
    print()
    print(result.table())
    print()
    print(f"data:  {result.data_dir} (embedded Tiled; `smartbeam runs --data-dir "
          f"{result.data_dir}` lists them)")
    for png in result.pngs:
        print(f"plot:  {png}")
    return 0
