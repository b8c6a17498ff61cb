"""``smartbeam library build|list``: compute, cache and list multiplet libraries."""

from __future__ import annotations

import argparse
import json

from ..errors import SmartbeamInputError

__all__ = ["register"]


def register(subparsers) -> None:
    """Add ``library`` with its ``build`` and ``list`` sub-commands."""
    parser = subparsers.add_parser("library", help="build or list 10Dq multiplet libraries",
                                   description="Multiplet libraries of L2,3 spectra vs 10Dq "
                                               "(edrixs), cached on disk by parameter hash.")
    sub = parser.add_subparsers(dest="library_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="compute (or find cached) a library")
    b.add_argument("--ion", default="Mn2+", help="3d ion, e.g. Mn2+, Ni2+, Co2+, Fe2+, Fe3+")
    b.add_argument("--min", dest="ten_dq_min", type=float, default=0.0, help="lowest 10Dq (eV)")
    b.add_argument("--max", dest="ten_dq_max", type=float, default=3.0, help="highest 10Dq (eV)")
    b.add_argument("--step", dest="ten_dq_step", type=float, default=0.1, help="10Dq step (eV)")
    b.add_argument("--slater", dest="slater_scale", type=float, default=0.8,
                   help="Slater-integral scaling (default 0.8)")
    b.add_argument("--gamma-l3", type=float, default=0.2, help="Lorentzian HWHM of L3 (eV)")
    b.add_argument("--gamma-l2", type=float, default=0.4, help="Lorentzian HWHM of L2 (eV)")
    b.add_argument("--gaussian", dest="gaussian_fwhm", type=float, default=0.3,
                   help="Gaussian FWHM (eV)")
    b.add_argument("--temperature", type=float, default=300.0, help="temperature (K)")
    b.add_argument("--align", dest="align_energy", type=float, default=None,
                   help="energy of the L3 maximum at --align-dq (eV); default per ion")
    b.add_argument("--align-dq", dest="align_ten_dq", type=float, default=0.9,
                   help="10Dq of the alignment spectrum (eV)")
    b.add_argument("--jobs", type=int, default=None, help="worker processes (default: cores)")
    b.add_argument("--cache-dir", default=None, help="cache directory override")
    b.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="also calibrate the rejection threshold on N simulated spectra")
    b.add_argument("--json", action="store_true", help="print the library metadata as JSON")
    b.set_defaults(func=_build)
    ls = sub.add_parser("list", help="list the packaged and cached libraries")
    ls.add_argument("--cache-dir", default=None, help="cache directory override")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)


def _build(args: argparse.Namespace) -> int:
    from ..analysis.library import LibraryParams
    from ..library_store import cache_dir, get_library, save_calibration

    names = ("ion", "ten_dq_min", "ten_dq_max", "ten_dq_step", "slater_scale", "gamma_l3",
             "gamma_l2", "gaussian_fwhm", "temperature", "align_energy", "align_ten_dq")
    params = LibraryParams(**{k: getattr(args, k) for k in names})
    n = len(params.ten_dq_grid)
    if n > 2001:
        raise SmartbeamInputError(f"10Dq grid of {n} entries: expected at most 2001")
    lib = get_library(params, directory=args.cache_dir, compute=True, n_jobs=args.jobs)
    out = {"library_id": lib.library_id, "ion": params.ion, "entries": int(n),
           "crossovers_eV": lib.crossovers, "cache_dir": str(cache_dir(args.cache_dir))}
    if args.calibrate:
        from ..bench.tendq import calibrate

        cal = calibrate(lib, n=args.calibrate)
        save_calibration(lib, cal, cache_dir(args.cache_dir))
        out["rejection_threshold"] = cal["threshold"]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from ..library_store import cached_libraries

    libs = cached_libraries(args.cache_dir)
    if args.json:
        print(json.dumps(libs, indent=2))
        return 0
    for m in libs:
        p = m.get("params", {})
        print(f"{m.get('library_id')}  {p.get('ion')}  10Dq {p.get('ten_dq_min')}-"
              f"{p.get('ten_dq_max')} step {p.get('ten_dq_step')}  [{m['location']}]")
    return 0
