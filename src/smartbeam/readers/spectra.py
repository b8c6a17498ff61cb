"""Read 1-D spectra: two-column text/CSV and EMSA/MSA (.msa) files.

Errors name the file, the line and what was expected.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import SmartbeamInputError

__all__ = ["read_spectrum", "read_columns", "read_msa", "check_spectrum"]


def read_spectrum(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read ``path`` as EMSA/MSA (``.msa``/``.ems``/``#FORMAT`` header) or two columns.

    Returns
    -------
    energy, intensity
        Float arrays, energy strictly increasing.
    """
    path = Path(path)
    if not path.is_file():
        raise SmartbeamInputError(f"{path}: file not found; expected a spectrum file")
    try:
        text = path.read_text(errors="strict")
    except UnicodeDecodeError as exc:
        raise SmartbeamInputError(f"{path}: not a text file ({exc.reason}); expected a "
                                  "two-column text/CSV or EMSA/MSA spectrum") from None
    if path.suffix.lower() in (".msa", ".ems", ".emsa") or text.lstrip().upper().startswith(
            "#FORMAT"):
        return read_msa(path, text)
    return read_columns(path, text)


def check_spectrum(path: str | os.PathLike, energy: np.ndarray, intensity: np.ndarray,
                   lines: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Common checks: not empty, finite, strictly increasing energy (errors cite lines)."""
    e = np.asarray(energy, dtype=float)
    y = np.asarray(intensity, dtype=float)
    lines = lines if lines is not None else list(range(1, len(e) + 1))
    if e.size == 0:
        raise SmartbeamInputError(f"{path}: no data lines; expected energy and intensity "
                                  "values")
    bad = ~(np.isfinite(e) & np.isfinite(y))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SmartbeamInputError(f"{path}, line {lines[i]}: non-finite value "
                                  f"(energy={e[i]}, intensity={y[i]}); expected numbers")
    d = np.diff(e)
    if np.any(d <= 0):
        i = int(np.flatnonzero(d <= 0)[0]) + 1
        raise SmartbeamInputError(
            f"{path}, line {lines[i]}: energy {e[i]} does not increase (previous {e[i - 1]}); "
            "expected strictly increasing energies")
    return e, y


_SPLIT = re.compile(r"[,;\s]+")


def read_columns(path: str | os.PathLike, text: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Two (or more) numeric columns: energy, intensity. ``#``/``%`` lines and a header
    line of non-numbers are skipped; separators: comma, semicolon, whitespace."""
    path = Path(path)
    text = path.read_text() if text is None else text
    energies, values, lines = [], [], []
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#%":
            continue
        fields = [f for f in _SPLIT.split(line) if f]
        try:
            nums = [float(f) for f in fields]
        except ValueError:
            if not energies:  # a header line before the data
                continue
            raise SmartbeamInputError(f"{path}, line {no}: {line[:60]!r} is not numeric; "
                                      "expected two numbers (energy, intensity)") from None
        if len(nums) < 2:
            raise SmartbeamInputError(f"{path}, line {no}: {len(nums)} column; expected two "
                                      "columns (energy, intensity)")
        energies.append(nums[0])
        values.append(nums[1])
        lines.append(no)
    return check_spectrum(path, np.array(energies), np.array(values), lines)


def read_msa(path: str | os.PathLike, text: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """EMSA/MAS 1.0 spectrum: ``Y`` data use ``#OFFSET`` + i * ``#XPERCHAN``; ``XY`` data
    give both columns. Units other than eV are rejected."""
    path = Path(path)
    text = path.read_text() if text is None else text
    header: dict[str, str] = {}
    data_lines: list[tuple[int, str]] = []
    in_data = False
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("#"):
            key, _, val = line[1:].partition(":")
            key = key.strip().upper()
            header[key] = val.strip()
            if key == "SPECTRUM":
                in_data = True
            elif key == "ENDOFDATA":
                in_data = False
            continue
        if in_data and line:
            data_lines.append((no, line))
    if "FORMAT" not in header:
        raise SmartbeamInputError(f"{path}, line 1: no '#FORMAT' header; expected an "
                                  "EMSA/MSA file")
    units = header.get("XUNITS", "eV").strip().lower()
    if units not in ("ev", ""):
        raise SmartbeamInputError(f"{path}: #XUNITS is {header['XUNITS']!r}; expected eV")
    datatype = header.get("DATATYPE", "Y").strip().upper()
    xs, ys, lines = [], [], []
    for no, line in data_lines:
        fields = [f for f in _SPLIT.split(line) if f]
        try:
            nums = [float(f) for f in fields]
        except ValueError:
            raise SmartbeamInputError(f"{path}, line {no}: {line[:60]!r} is not numeric; "
                                      "expected spectrum values") from None
        if datatype == "XY":
            if len(nums) % 2:
                raise SmartbeamInputError(f"{path}, line {no}: {len(nums)} values; expected "
                                          "x, y pairs (DATATYPE XY)")
            xs.extend(nums[0::2])
            ys.extend(nums[1::2])
            lines.extend([no] * (len(nums) // 2))
        else:
            ys.extend(nums)
            lines.extend([no] * len(nums))
    if datatype != "XY":
        try:
            step = float(header["XPERCHAN"])
            offset = float(header.get("OFFSET", "0"))
        except (KeyError, ValueError):
            raise SmartbeamInputError(f"{path}: #XPERCHAN/#OFFSET missing or not numeric; "
                                      "expected them for DATATYPE Y") from None
        xs = list(offset + step * np.arange(len(ys)))
    return check_spectrum(path, np.array(xs), np.array(ys), lines)
