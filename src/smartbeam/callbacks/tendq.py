"""10Dq estimate of an XAS/EELS run, written as an ``analysis`` stream into the same run.

:class:`TenDqEstimator` wraps the Tiled writer (or any downstream callback). It collects
the energy and intensity of the primary stream; when the run ends it compares the spectrum
with the multiplet library and emits one ``analysis`` row before the stop document:
10Dq, its uncertainty, the measure, the similarity, the energy offset, one field per
measure, the flags (comma-separated string), the rejection score, and the library id and
parameters (JSON string). Analysis errors go into the row's ``error`` field, never into the
RunEngine.

As a permanent member of the session chain it configures itself from each run's start
document: runs without a ``tendq`` entry pass through untouched; ``tendq: {"ion": ...,
"energy_key": ..., "intensity_key": ..., "i0_key": ..., "measure": ..., "offset_range": ...}``
(written by :func:`smartbeam.plans.xas.xas_tendq_scan`) selects the library and the keys.
:func:`estimate_arrays` and :func:`estimate_stored_run` run the same estimator post hoc.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from ..analysis.similarity import MEASURES
from ..analysis.tendq import TenDqFitter, TenDqResult
from .derived import DerivedStreamRouter, DocumentCallback

__all__ = ["TenDqEstimator", "estimate_arrays", "estimate_stored_run", "analysis_row",
           "fitter_for"]

logger = logging.getLogger(__name__)


def analysis_row(result: TenDqResult | None, fitter: TenDqFitter | None,
                 error: str = "") -> dict:
    """The ``analysis`` stream row for ``result`` (NaN/empty fields when ``None``).

    Parameters
    ----------
    result
        The estimate, or ``None`` when it failed.
    fitter
        The fitter used (library id and parameters); ``None`` when none could be made.
    error
        Error message recorded in the row.
    """
    nan = float("nan")
    lib = fitter.library if fitter is not None else None
    params = json.dumps(lib.params.to_dict(), sort_keys=True) if lib is not None else ""
    row: dict[str, Any] = {
        "ten_dq": nan, "ten_dq_sd": nan, "offset": nan, "similarity": nan, "score": nan,
        "described": False, "measure": "", "flags": "",
        "library_id": lib.library_id if lib is not None else "", "library_params": params,
    }
    for m in MEASURES:
        row[f"ten_dq_{m}"] = nan
    if result is not None:
        row.update({
            "ten_dq": _num(result.ten_dq), "ten_dq_sd": _num(result.sd),
            "offset": _num(result.offset), "similarity": _num(result.similarity),
            "score": _num(result.score), "described": bool(result.described),
            "measure": result.measure, "flags": ",".join(result.flags),
        })
        for m, v in result.per_measure.items():
            row[f"ten_dq_{m}"] = _num(v)
    row["error"] = error
    return row


def _num(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def estimate_arrays(energy: np.ndarray, intensity: np.ndarray, fitter: TenDqFitter,
                    i0: np.ndarray | None = None) -> dict:
    """Post hoc: the ``analysis`` row for stored arrays (intensity / i0 when i0 given).

    Points are sorted by energy and repeated energies averaged, as a scan may return.

    Parameters
    ----------
    energy, intensity
        The measured points (any order).
    fitter
        A fitted :class:`~smartbeam.analysis.tendq.TenDqFitter`.
    i0
        Incident-flux counts to divide by, or ``None``.
    """
    e = np.asarray(energy, dtype=float)
    y = np.asarray(intensity, dtype=float)
    if i0 is not None:
        y = y / np.asarray(i0, dtype=float)
    try:
        e, y = _sorted_unique(e, y)
        return analysis_row(fitter.predict(e, y, name="run"), fitter)
    except Exception as exc:  # recorded in the row, as in the live callback
        return analysis_row(None, fitter, error=f"{type(exc).__name__}: {exc}")


def _sorted_unique(e: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(e, kind="stable")
    e, y = e[order], y[order]
    uniq, inv = np.unique(e, return_inverse=True)
    if len(uniq) == len(e):
        return e, y
    sums = np.bincount(inv, weights=y)
    return uniq, sums / np.bincount(inv)


_FITTERS: dict[tuple, TenDqFitter] = {}


def fitter_for(ion: str = "Mn2+", measure: str = "all", offset_range: float = 2.0, *,
               directory: str | None = None, compute: bool = False) -> TenDqFitter:
    """A fitted estimator for ``ion`` with its calibrated threshold, cached per process.

    Parameters
    ----------
    ion
        Library ion (default library grid and broadening).
    measure
        ``"all"`` (consensus) or one measure name.
    offset_range
        Largest |energy offset| searched (eV).
    directory
        Library cache directory override.
    compute
        Compute a missing library (slow: seconds to minutes); otherwise raise.
    """
    from ..library_store import make_fitter

    key = (str(ion), str(measure), float(offset_range), str(directory))
    if key not in _FITTERS:
        _FITTERS[key] = make_fitter(ion, measure, offset_range=float(offset_range),
                                    directory=directory, compute=compute)
    return _FITTERS[key]


def _tendq_md(start: dict) -> dict | None:
    md = start.get("tendq")
    if md is None or md is False:
        return None
    if md is True:
        return {}
    if not isinstance(md, dict):
        raise ValueError(f"start['tendq']={md!r}: expected a dict of estimator options")
    return dict(md)


def _pick_keys(keys: dict, motors: list[str], energy_key: str | None,
               intensity_key: str | None, i0_key: str | None, stream: str
               ) -> tuple[str, str, str | None]:
    """Energy, intensity and I0 keys: given ones first, else guessed from the stream."""
    ekey = energy_key
    if ekey is None:
        for m in motors:
            for cand in (m, f"{m}_readback", f"{m}_energy"):
                if cand in keys:
                    ekey = cand
                    break
            if ekey:
                break
    if ekey is None or ekey not in keys:
        raise ValueError(f"energy key {ekey!r} not in the stream {stream!r} "
                         f"(keys {sorted(keys)}); expected energy_key or start['motors']")
    ikey, i0 = intensity_key, i0_key
    if ikey is None:
        tey = [k for k in keys if k.endswith("_tey")]
        if tey:
            ikey = tey[0]
            if i0 is None and ikey[:-4] + "_i0" in keys:
                i0 = ikey[:-4] + "_i0"
        else:
            numeric = [k for k, v in keys.items() if v.get("dtype") in ("number", "integer")
                       and not v.get("shape") and k != ekey and not k.startswith(tuple(motors))]
            if not numeric:
                raise ValueError("no numeric detector key in the stream; expected "
                                 "intensity_key")
            ikey = numeric[0]
    if ikey not in keys:
        raise ValueError(f"intensity key {ikey!r} not in the stream (keys {sorted(keys)})")
    if i0 == "":
        i0 = None
    if i0 is not None and i0 not in keys:
        raise ValueError(f"i0 key {i0!r} not in the stream (keys {sorted(keys)})")
    return ekey, ikey, i0


class TenDqEstimator(DerivedStreamRouter):
    """Estimate 10Dq when an XAS/EELS run ends; write an ``analysis`` stream into it.

    Parameters
    ----------
    fitter
        A fitted :class:`~smartbeam.analysis.tendq.TenDqFitter`; ``None`` (the session
        default) makes one per run from ``start['tendq']`` (ion, measure, offset_range)
        with :func:`fitter_for`.
    downstream
        The Tiled writer or another router.
    energy_key, intensity_key, i0_key
        Data keys (override ``start['tendq']``). Without either: the energy is the readback
        of the first motor in ``start['motors']``; the intensity ``<det>_tey`` divided by
        ``<det>_i0`` when both exist, else the first numeric non-energy key; ``i0_key=""``
        means no normalisation.
    stream
        Name of the stream read (default ``primary``).
    require_md
        Analyse only runs whose start document has a ``tendq`` entry (inert otherwise).
        Default: ``True`` without ``fitter``, ``False`` with one.
    library_dir
        Library cache directory override (with ``fitter=None``).
    """

    def __init__(self, fitter: TenDqFitter | None = None,
                 downstream: DocumentCallback | None = None, *, energy_key: str | None = None,
                 intensity_key: str | None = None, i0_key: str | None = None,
                 stream: str = "primary", require_md: bool | None = None,
                 library_dir: str | None = None) -> None:
        super().__init__(downstream)
        if fitter is not None and fitter.library is None:
            raise ValueError("TenDqEstimator needs a fitted TenDqFitter (call fit(library))")
        self.default_fitter = fitter
        self.fitter: TenDqFitter | None = fitter
        self.energy_key = energy_key
        self.intensity_key = intensity_key
        self.i0_key = i0_key
        self.stream = stream
        self.require_md = (fitter is None) if require_md is None else bool(require_md)
        self.library_dir = library_dir
        self.active = False
        self.last_row: dict | None = None
        self._setup_error = ""

    def start(self, doc: dict) -> dict:
        self._motors = list(doc.get("motors") or [])
        self._descriptors: dict[str, dict] = {}
        self._rows: dict[str, list] = {}
        self._setup_error = ""
        self.fitter = self.default_fitter
        try:
            md = _tendq_md(doc)
        except ValueError as exc:
            md, self._setup_error = {}, str(exc)
        self.active = md is not None or not self.require_md
        self._md = md or {}
        if self.active and self.fitter is None and not self._setup_error:
            # Loaded at the start, so the end of the run costs only the estimate.
            try:
                self.fitter = fitter_for(self._md.get("ion", "Mn2+"),
                                         self._md.get("measure", "all"),
                                         self._md.get("offset_range", 2.0),
                                         directory=self.library_dir)
            except Exception as exc:
                self._setup_error = f"{type(exc).__name__}: {exc}"
        return doc

    def descriptor(self, doc: dict) -> dict:
        if self.active and doc.get("name") == self.stream:
            self._descriptors[doc["uid"]] = doc
        return doc

    def event(self, doc: dict) -> dict:
        if doc["descriptor"] in self._descriptors:
            for k, v in doc["data"].items():
                self._rows.setdefault(k, []).append(v)
        return doc

    def event_page(self, doc: dict) -> dict:
        if doc["descriptor"] in self._descriptors:
            for k, v in doc["data"].items():
                self._rows.setdefault(k, []).extend(list(v))
        return doc

    def _keys(self) -> tuple[str, str, str | None]:
        keys = {}
        for d in self._descriptors.values():
            keys.update(d["data_keys"])

        def choose(name: str) -> str | None:
            given = getattr(self, name)
            return given if given is not None else self._md.get(name)

        return _pick_keys(keys, self._motors, choose("energy_key"), choose("intensity_key"),
                          choose("i0_key"), self.stream)

    def finalize(self, stop_doc: dict) -> None:
        if not self.active:
            return
        if not self._descriptors and not self._setup_error:
            return  # no primary stream: nothing measured to analyse
        if self._setup_error:
            row = analysis_row(None, self.fitter, error=self._setup_error)
        else:
            try:
                ekey, ikey, i0 = self._keys()
                e = np.asarray(self._rows.get(ekey, []), dtype=float)
                y = np.asarray(self._rows.get(ikey, []), dtype=float)
                n0 = np.asarray(self._rows[i0], dtype=float) if i0 else None
                row = estimate_arrays(e, y, self.fitter, n0)
            except Exception as exc:
                row = analysis_row(None, self.fitter, error=f"{type(exc).__name__}: {exc}")
        if row["error"]:
            self._record_error(row["error"])
        self.last_row = row
        self.emit("analysis", row, units={"ten_dq": "eV", "ten_dq_sd": "eV", "offset": "eV"})


def estimate_stored_run(run, fitter: TenDqFitter | None = None, *, stream: str = "primary",
                        library_dir: str | None = None) -> dict:
    """Post hoc: the ``analysis`` row of a stored run (a Tiled/databroker run client).

    Configured like the live estimator: ``start['tendq']`` gives the ion and the keys
    (else they are guessed from the stream and ``start['motors']``).

    Parameters
    ----------
    run
        A run client with ``metadata['start']`` and a ``stream`` node.
    fitter
        A fitted estimator; default: :func:`fitter_for` with the run's ``tendq`` options.
    stream
        Stream holding the spectrum.
    library_dir
        Library cache directory override.
    """
    start = run.metadata["start"]
    md = _tendq_md(start) or {}
    try:
        if fitter is None:
            fitter = fitter_for(md.get("ion", "Mn2+"), md.get("measure", "all"),
                                md.get("offset_range", 2.0), directory=library_dir)
        node = run[stream]
        keys = {k: {"dtype": "number", "shape": []} for k in node
                if not k.startswith("ts_") and k != "seq_num"}
        ekey, ikey, i0 = _pick_keys(keys, list(start.get("motors") or []),
                                    md.get("energy_key"), md.get("intensity_key"),
                                    md.get("i0_key"), stream)
        n0 = np.asarray(node[i0].read(), dtype=float) if i0 else None
        return estimate_arrays(np.asarray(node[ekey].read(), dtype=float),
                               np.asarray(node[ikey].read(), dtype=float), fitter, n0)
    except Exception as exc:
        return analysis_row(None, fitter, error=f"{type(exc).__name__}: {exc}")
