"""Reader for raw NIST NCNR 128x128 SANS frames in the IGOR "ASC" ASCII export.

Layout: a text header (FILE/LABEL lines, a ``MON CNT LAMBDA(A) DET_OFF(cm) DET_DIST(m)
TRANS THICK(cm) [COUNT TIME]`` line followed by its values, a ``BCENT(X,Y) A1(mm) A2(mm)
A1A2DIST(m) DL/L BSTOP(mm) DET_TYP`` line followed by its values, optionally a
``PIXELS(X) PIXELS(Y) PIXELSIZE X (mm) PIXELSIZE Y (mm)`` block), a line starting with
``ASCII data created`` or ``RAW SAM FILE``, then one count per line, row by row
(Y = 1..128, X = 1..128).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smartbeam.errors import SmartbeamInputError

__all__ = ["NISTSANSFrame", "read_nist_sans"]

_DATA_MARKERS = ("ASCII data created", "RAW SAM FILE")


@dataclass
class NISTSANSFrame:
    """A raw NIST SANS frame with its header.

    Attributes
    ----------
    counts
        float64 ``(ny, nx)`` raw counts, ``counts[y - 1, x - 1]`` for 1-based pixel (x, y).
    beam_centre
        ``(x, y)`` beam centre in 0-based pixels (the file gives 1-based values).
    wavelength_nm, distance_m, pixel_size_mm, monitor, count_time_s
        Instrument header values (``count_time_s`` is ``None`` when absent).
    header
        All parsed header values by their file names (e.g. ``"DL/L"``, ``"BSTOP(mm)"``).
    """

    path: str
    counts: np.ndarray
    beam_centre: tuple[float, float]
    wavelength_nm: float
    distance_m: float
    pixel_size_mm: float
    monitor: float
    count_time_s: float | None
    label: str = ""
    header: dict[str, float | str] = field(default_factory=dict)


def _values(path: Path, lines: list[str], k: int, names: list[str], n_min: int) -> dict:
    if k + 1 >= len(lines):
        raise SmartbeamInputError(f"{path}:{k + 1}: header line {lines[k]!r} has no value "
                                  "line after it")
    vals = lines[k + 1].split()
    if len(vals) < n_min:
        raise SmartbeamInputError(f"{path}:{k + 2}: {lines[k + 1]!r}: expected at least "
                                  f"{n_min} values for {names[:n_min]}")
    out: dict[str, float | str] = {}
    for name, v in zip(names, vals, strict=False):
        try:
            out[name] = float(v)
        except ValueError:
            out[name] = v
    return out


def read_nist_sans(path: str | Path, shape: tuple[int, int] = (128, 128)) -> NISTSANSFrame:
    """Read a raw NIST NCNR SANS ASCII frame.

    Parameters
    ----------
    path
        File name (``.ASC``).
    shape
        Detector shape ``(ny, nx)``; overridden by a ``PIXELS(X) PIXELS(Y)`` header.

    Returns
    -------
    NISTSANSFrame

    Raises
    ------
    SmartbeamInputError
        Missing header blocks or data, non-numeric or negative counts, wrong number of
        values; the message names the file, the line and what was expected.
    """
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise SmartbeamInputError(f"{path}: cannot be read ({exc.strerror}): expected a "
                                  "readable NIST SANS .ASC file") from None
    lines = text.replace("\r", "").split("\n")
    header: dict[str, float | str] = {}
    start = None
    for k, line in enumerate(lines):
        s = line.strip()
        if s.startswith("LABEL:"):
            header["LABEL"] = s[6:].strip()
        elif s.startswith("MON CNT"):
            header.update(_values(path, lines, k, ["MON CNT", "LAMBDA(A)", "DET_OFF(cm)",
                                                   "DET_DIST(m)", "TRANS", "THICK(cm)",
                                                   "COUNT TIME"], 4))
        elif s.startswith("BCENT"):
            header.update(_values(path, lines, k, ["BCENT_X", "BCENT_Y", "A1(mm)", "A2(mm)",
                                                   "A1A2DIST(m)", "DL/L", "BSTOP(mm)",
                                                   "DET_TYP"], 2))
        elif s.startswith("PIXELS(X)"):
            header.update(_values(path, lines, k, ["PIXELS(X)", "PIXELS(Y)",
                                                   "PIXELSIZE X (mm)", "PIXELSIZE Y (mm)"], 2))
        elif s.startswith(_DATA_MARKERS):
            start = k + 1
            break
    for key, where in (("MON CNT", "MON CNT"), ("BCENT_X", "BCENT(X,Y)")):
        if key not in header:
            raise SmartbeamInputError(f"{path}: no {where!r} header block found: expected a "
                                      "NIST NCNR raw SANS ASCII header")
    if start is None:
        raise SmartbeamInputError(f"{path}: no line starting with {' or '.join(map(repr, _DATA_MARKERS))}: "
                                  "expected the data section marker")
    if "PIXELS(X)" in header:
        shape = (int(header["PIXELS(Y)"]), int(header["PIXELS(X)"]))
    values = []
    for k in range(start, len(lines)):
        s = lines[k].strip()
        if not s:
            continue
        try:
            v = float(s.split()[0])
        except ValueError:
            raise SmartbeamInputError(f"{path}:{k + 1}: {s!r}: expected one count per line"
                                      ) from None
        if not np.isfinite(v) or v < 0:
            raise SmartbeamInputError(f"{path}:{k + 1}: count {s!r}: expected a finite "
                                      "count >= 0")
        values.append(v)
    n = shape[0] * shape[1]
    if len(values) != n:
        raise SmartbeamInputError(f"{path}: {len(values)} counts after line {start}: expected "
                                  f"{n} ({shape[1]} x {shape[0]} pixels)")
    counts = np.asarray(values).reshape(shape)
    pix = float(header.get("PIXELSIZE X (mm)", 5.08))
    ct = header.get("COUNT TIME")
    return NISTSANSFrame(
        path=str(path), counts=counts,
        beam_centre=(float(header["BCENT_X"]) - 1.0, float(header["BCENT_Y"]) - 1.0),
        wavelength_nm=float(header["LAMBDA(A)"]) / 10.0,
        distance_m=float(header["DET_DIST(m)"]), pixel_size_mm=pix,
        monitor=float(header["MON CNT"]),
        count_time_s=float(ct) if isinstance(ct, float) else None,
        label=str(header.get("LABEL", "")), header=header)
