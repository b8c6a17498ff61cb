"""Load, save and cache multiplet libraries (the file I/O kept out of ``analysis/``).

Libraries are stored as ``<library_id>.npz`` (arrays) plus ``<library_id>.json``
(parameters and metadata). The id is a hash of every parameter, the code schema and the
edrixs version, so a changed parameter never returns a stale library. The default Mn2+
library ships with the package (``smartbeam/data``) and loads instantly.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import numpy as np

from .analysis.library import LibraryParams, SpectrumLibrary, compute_library
from .errors import SmartbeamInputError

__all__ = [
    "PACKAGED_LIBRARY",
    "cache_dir",
    "save_library",
    "load_library_file",
    "load_packaged_library",
    "cached_libraries",
    "get_library",
    "save_calibration",
    "load_threshold",
    "make_fitter",
]

#: Base name of the shipped default (Mn2+) library inside ``smartbeam/data``.
PACKAGED_LIBRARY = "library_Mn2p_default"
_ENV = "SMARTBEAM_CACHE_DIR"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Directory of cached libraries: ``override``, ``$SMARTBEAM_CACHE_DIR`` or the
    platformdirs user cache dir (``.../smartbeam/libraries``)."""
    if override is not None:
        return Path(override)
    if os.environ.get(_ENV):
        return Path(os.environ[_ENV])
    import platformdirs

    return Path(platformdirs.user_cache_dir("smartbeam")) / "libraries"


def save_library(lib: SpectrumLibrary, directory: str | os.PathLike,
                 stem: str | None = None) -> Path:
    """Write ``lib`` as ``<stem>.npz`` + ``<stem>.json`` (stem defaults to the library id).

    Returns
    -------
    Path of the .npz file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = stem or lib.library_id
    npz = directory / f"{stem}.npz"
    tmp = directory / f".{stem}.tmp.npz"
    np.savez_compressed(tmp, ten_dq=lib.ten_dq, energy=lib.energy, spectra=lib.spectra,
                        spin=lib.spin, segment=lib.segment)
    os.replace(tmp, npz)  # atomic: a concurrent reader never sees half a file
    meta = {"library_id": lib.library_id, "params": lib.params.to_dict(),
            "crossovers_eV": lib.crossovers, "meta": lib.meta}
    (directory / f"{stem}.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return npz


def _from_arrays(arrays, meta: dict) -> SpectrumLibrary:
    params = LibraryParams(**meta["params"])
    return SpectrumLibrary(ten_dq=arrays["ten_dq"], energy=arrays["energy"],
                           spectra=arrays["spectra"], spin=arrays["spin"],
                           segment=arrays["segment"], params=params,
                           meta=dict(meta.get("meta", {}), library_id=meta.get("library_id")))


def load_library_file(path: str | os.PathLike) -> SpectrumLibrary:
    """Load a library from ``<stem>.npz`` (its ``<stem>.json`` must sit next to it)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(".npz")
    meta_path = path.with_suffix(".json")
    if not path.exists() or not meta_path.exists():
        raise SmartbeamInputError(f"library file {path} (with {meta_path.name}) not found: "
                                  "expected a .npz + .json pair written by save_library")
    with np.load(path) as arrays:
        return _from_arrays(arrays, json.loads(meta_path.read_text()))


def load_packaged_library() -> SpectrumLibrary:
    """The shipped default Mn2+ library (0-3 eV, 0.1 eV step), via importlib.resources."""
    base = resources.files("smartbeam") / "data"
    meta = json.loads((base / f"{PACKAGED_LIBRARY}.json").read_text())
    with (base / f"{PACKAGED_LIBRARY}.npz").open("rb") as fh, np.load(fh) as arrays:
        return _from_arrays(arrays, meta)


def cached_libraries(directory: str | os.PathLike | None = None) -> list[dict]:
    """Metadata of the packaged library and of every library in the cache directory."""
    out = []
    base = resources.files("smartbeam") / "data"
    meta_file = base / f"{PACKAGED_LIBRARY}.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        out.append({"location": "package", "path": str(meta_file), **meta})
    d = cache_dir(directory)
    if d.is_dir():
        for f in sorted(d.glob("*.json")):
            try:
                meta = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            out.append({"location": "cache", "path": str(f), **meta})
    return out


def get_library(params: LibraryParams | None = None, *, directory: str | os.PathLike | None = None,
                compute: bool = True, n_jobs: int | None = None,
                progress: bool = True) -> SpectrumLibrary:
    """Return the library for ``params``: packaged, cached, or computed and cached.

    Parameters
    ----------
    params
        Library parameters; ``None`` is the default Mn2+ library.
    directory
        Cache directory override (see :func:`cache_dir`).
    compute
        Compute the library when it is neither packaged nor cached; otherwise raise.
    n_jobs, progress
        Passed to :func:`smartbeam.analysis.library.compute_library`.
    """
    params = params or LibraryParams()
    lib_id = params.library_id()
    try:
        packaged = load_packaged_library()
        if packaged.library_id == lib_id:
            return packaged
    except (FileNotFoundError, OSError, KeyError):
        pass
    d = cache_dir(directory)
    path = d / f"{lib_id}.npz"
    if path.exists():
        return load_library_file(path)
    if not compute:
        raise SmartbeamInputError(f"library {lib_id} for {params.ion} is not cached in {d}: "
                                  "expected it to be built first (smartbeam library build)")
    lib = compute_library(params, n_jobs=n_jobs, progress=progress)
    save_library(lib, d)
    return lib


def save_calibration(lib: SpectrumLibrary, calibration: dict,
                     directory: str | os.PathLike, stem: str | None = None) -> Path:
    """Write the rejection calibration of ``lib`` as ``<stem>.rejection.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem or lib.library_id}.rejection.json"
    path.write_text(json.dumps(calibration, indent=2, sort_keys=True))
    return path


def load_threshold(lib: SpectrumLibrary, directory: str | os.PathLike | None = None
                   ) -> float | None:
    """Calibrated rejection threshold of ``lib`` (packaged or cached), ``None`` if absent."""
    candidates = [resources.files("smartbeam") / "data" / f"{PACKAGED_LIBRARY}.rejection.json",
                  cache_dir(directory) / f"{lib.library_id}.rejection.json"]
    for c in candidates:
        try:
            cal = json.loads(c.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if cal.get("library_id") == lib.library_id:
            return float(cal["threshold"])
    return None


def make_fitter(ion: str = "Mn2+", measure: str = "all", *, offset_range: float = 2.0,
                params: LibraryParams | None = None, directory: str | os.PathLike | None = None,
                compute: bool = False):
    """A fitted :class:`~smartbeam.analysis.tendq.TenDqFitter` for ``ion`` with its
    calibrated rejection threshold (packaged library for the default Mn2+).

    Parameters
    ----------
    ion
        Ion of the library when ``params`` is not given (default grid and broadening).
    measure
        ``"all"`` (consensus of the live measures) or one measure name.
    offset_range
        Largest |energy offset| searched (eV).
    params, directory, compute
        See :func:`get_library`. Without ``compute`` a missing library raises.
    """
    from .analysis.similarity import LIVE_MEASURES, MEASURES
    from .analysis.tendq import TenDqFitter

    params = params or LibraryParams(ion=ion)
    lib = get_library(params, directory=directory, compute=compute)
    if measure == "all":
        measures = LIVE_MEASURES
    elif measure in MEASURES:
        measures = (measure,) if measure == "pearson" else (measure, "pearson")
    else:
        raise SmartbeamInputError(f"measure {measure!r} unknown: expected 'all' or one of "
                                  f"{MEASURES}")
    fitter = TenDqFitter(measures=measures, offset_range=offset_range,
                         threshold=load_threshold(lib, directory))
    if measure not in ("all", "pearson"):
        fitter.consensus = (measure,)
    return fitter.fit(lib)
