"""``smartbeam mds FILE... -o map.png``: MDS map of the library with measured spectra."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..analysis.similarity import MEASURES
from ..errors import SmartbeamInputError

__all__ = ["register"]


def register(subparsers) -> None:
    """Add the ``mds`` sub-command."""
    p = subparsers.add_parser("mds", help="MDS map of a 10Dq library with measured spectra",
                              description="Place measured spectra (offset-corrected, "
                                          "background removed) on an MDS map of the library.")
    p.add_argument("files", nargs="*", metavar="FILE", help="spectrum files (text/CSV, .msa)")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.add_argument("--ion", default="Mn2+", help="library ion (default Mn2+)")
    p.add_argument("--measure", default="pearson", choices=MEASURES, help="dissimilarity")
    p.add_argument("--offset-range", type=float, default=2.0, help="offset search, eV")
    p.add_argument("--cache-dir", default=None, help="library cache directory override")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..analysis.mds import mds_map
    from ..library_store import make_fitter
    from ..plots.mds import save_mds_png
    from ..readers.spectra import read_spectrum

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise SmartbeamInputError(f"output {out}: expected a .png file name")
    fitter = make_fitter(args.ion, "pearson", offset_range=args.offset_range,
                         directory=args.cache_dir)
    lib = fitter.library
    measured, labels = [], []
    for f in args.files:
        e, y = read_spectrum(f)
        r = fitter.predict(e, y, name=str(f))
        off = r.extra["per_measure_offset"]["pearson"]
        # Put the spectrum on the library grid with its fitted offset removed.
        ext = fitter.preprocess(e, y)
        measured.append(np.interp(lib.energy + off, fitter.grid_ext, ext))
        labels.append(Path(f).name + ("" if r.described else " (not described)"))
    m = mds_map(lib.spectra, lib.ten_dq, np.array(measured) if measured else None,
                measure=args.measure, step=fitter.step)
    save_mds_png(m, out, labels, title=f"{args.ion} library, {args.measure}")
    print(f"wrote {out} (stress {m.stress:.3g})")
    return 0
