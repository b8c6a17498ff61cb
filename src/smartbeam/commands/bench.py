"""``smartbeam bench NAME [--json] ...``: the benchmarks that print the project's figures."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

__all__ = ["BENCHMARKS", "register", "run_benchmark"]

BENCHMARKS = {
    "kde": "live KDE smoothing of SANS frames: speed-up at equal MSE, throughput",
    "adaptive": "GP-adaptive XMCD scans against uniform/expert/max-variance/... strategies",
    "tendq": "10Dq estimation: robustness per similarity measure, rejection, throughput",
    "stxm": "adaptive STXM stacks, 10Dq maps and batch throughput",
    "storage": "queue overhead, Tiled write rates and query latency",
    "faults": "injected faults: what happened and what was lost",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="run a benchmark and print its figures",
        description="Run a benchmark; `smartbeam bench NAME --help` lists its options. "
                    "Benchmarks: " + "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="options of that benchmark (see `smartbeam bench NAME --help`)")
    parser.set_defaults(func=_run)


def run_benchmark(name: str, argv: list[str]) -> tuple[dict, bool]:
    """Parse ``argv`` with the benchmark's own options, run it, return (figures, as_json)."""
    try:
        module = importlib.import_module(f"smartbeam.bench.{name}")
    except ModuleNotFoundError as exc:
        raise ValueError(f"benchmark {name!r} is not available in this installation ({exc})") from None
    # "resolve": a benchmark may declare --json itself; ours (the same flag) wins.
    parser = argparse.ArgumentParser(prog=f"smartbeam bench {name}", description=BENCHMARKS[name],
                                     conflict_handler="resolve")
    module.add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = parser.parse_args(argv)
    return module.run(args), args.json


def _run(args: argparse.Namespace) -> int:
    result, as_json = run_benchmark(args.name, args.options)
    if as_json:
        print(json.dumps(result, indent=2, default=float))
    else:
        _print_readable(result)
    return 0


def _print_readable(result: dict, indent: int = 0) -> None:
    pad = "  " * indent
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{pad}{key}:")
            _print_readable(value, indent + 1)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{pad}{key}:")
            for item in value:
                print(f"{pad}  - " + ", ".join(f"{k}={_fmt(v)}" for k, v in item.items()))
        else:
            print(f"{pad}{key}: {_fmt(value)}")
    sys.stdout.flush()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)
