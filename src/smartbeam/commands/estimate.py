"""``smartbeam estimate FILE...``: 10Dq of measured XAS/EELS spectra from a library."""

from __future__ import annotations

import argparse
import json

from ..analysis.similarity import MEASURES

__all__ = ["register", "estimate_files"]


def register(subparsers) -> None:
    """Add the ``estimate`` sub-command."""
    p = subparsers.add_parser(
        "estimate", help="estimate 10Dq of spectrum files (text/CSV or EMSA .msa)",
        description="Compare each spectrum with a multiplet library under the similarity "
                    "measures, fit the energy offset, report 10Dq or 'not described'.")
    p.add_argument("files", nargs="+", metavar="FILE", help="two-column text/CSV or .msa")
    p.add_argument("--ion", default="Mn2+", help="library ion (default Mn2+)")
    p.add_argument("--measure", default="all", choices=("all",) + MEASURES,
                   help="one measure or 'all' (consensus, default)")
    p.add_argument("--offset-range", type=float, default=2.0,
                   help="largest |energy offset| searched, eV (default 2)")
    p.add_argument("--cache-dir", default=None, help="library cache directory override")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run)


def estimate_files(files: list[str], ion: str = "Mn2+", measure: str = "all",
                   offset_range: float = 2.0, cache_dir: str | None = None) -> list[dict]:
    """Estimate 10Dq for each file; returns the JSON objects of ``--json``."""
    from ..library_store import make_fitter
    from ..readers.spectra import read_spectrum

    fitter = make_fitter(ion, measure, offset_range=offset_range, directory=cache_dir)
    out = []
    for f in files:
        e, y = read_spectrum(f)
        out.append(fitter.predict(e, y, name=str(f)).to_dict(file=str(f)))
    return out


def _run(args: argparse.Namespace) -> int:
    results = estimate_files(args.files, args.ion, args.measure, args.offset_range,
                             args.cache_dir)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
        return 0
    for r in results:
        if r["described"]:
            print(f"{r['file']}: 10Dq = {r['ten_dq_eV']:.3f} +- {r['sd_eV']:.3f} eV "
                  f"(offset {r['offset_eV']:+.2f} eV, {r['measure']}, score {r['score']:.3g})"
                  + (f" flags: {', '.join(r['flags'])}" if r["flags"] else ""))
        else:
            print(f"{r['file']}: not described by this library (score {r['score']:.3g} > "
                  f"threshold {r['threshold']:.3g})")
    return 0
