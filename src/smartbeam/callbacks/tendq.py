"""10Dq estimate of an XAS/EELS run, written as an ``analysis`` stream into the same run.

:class:`TenDqEstimator` wraps the Tiled writer (or any downstream callback). It collects
the energy and intensity of the primary stream; when the run ends it compares the spectrum
with the multiplet library and emits one ``analysis`` row before the stop document:
10Dq, its uncertainty, the measure, the similarity, the energy offset, one field per
measure, the flags (comma-separated string), the rejection score, and the library id and
parameters (JSON string). Analysis errors go into the row's ``error`` field, never into the
RunEngine. :func:`estimate_arrays` runs the same estimator post hoc on stored arrays.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from ..analysis.similarity import MEASURES
from ..analysis.tendq import TenDqFitter, TenDqResult
from .derived import DerivedStreamRouter, DocumentCallback

__all__ = ["TenDqEstimator", "estimate_arrays", "analysis_row"]

logger = logging.getLogger(__name__)


def analysis_row(result: TenDqResult | None, fitter: TenDqFitter, error: str = "") -> dict:
    """The ``analysis`` stream row for ``result`` (NaN/empty fields when ``None``)."""
    nan = float("nan")
    lib = fitter.library
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


class TenDqEstimator(DerivedStreamRouter):
    """Estimate 10Dq when an XAS/EELS run ends; write an ``analysis`` stream into it.

    Parameters
    ----------
    fitter
        A fitted :class:`~smartbeam.analysis.tendq.TenDqFitter` (e.g. from
        :func:`smartbeam.library_store.make_fitter`).
    downstream
        The Tiled writer or another router.
    energy_key
        Data key of the energy; default: the readback of the first motor in
        ``start['motors']`` (its own name, or ``<motor>_readback``).
    intensity_key
        Data key of the signal; default: ``<det>_tey`` divided by ``<det>_i0`` when both
        exist, else the first numeric non-energy key.
    i0_key
        Normalisation key (``None``: automatic as above; ``""``: none).
    stream
        Name of the stream read (default ``primary``).
    """

    def __init__(self, fitter: TenDqFitter, downstream: DocumentCallback | None = None, *,
                 energy_key: str | None = None, intensity_key: str | None = None,
                 i0_key: str | None = None, stream: str = "primary") -> None:
        super().__init__(downstream)
        if fitter.library is None:
            raise ValueError("TenDqEstimator needs a fitted TenDqFitter (call fit(library))")
        self.fitter = fitter
        self.energy_key = energy_key
        self.intensity_key = intensity_key
        self.i0_key = i0_key
        self.stream = stream
        self.last_row: dict | None = None

    def start(self, doc: dict) -> dict:
        self._motors = list(doc.get("motors") or [])
        self._descriptors: dict[str, dict] = {}
        self._rows: dict[str, list] = {}
        return doc

    def descriptor(self, doc: dict) -> dict:
        if doc.get("name") == self.stream:
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
        ekey = self.energy_key
        if ekey is None:
            for m in self._motors:
                for cand in (m, f"{m}_readback", f"{m}_energy"):
                    if cand in keys:
                        ekey = cand
                        break
                if ekey:
                    break
        if ekey is None or ekey not in keys:
            raise ValueError(f"energy key {ekey!r} not in the stream {self.stream!r} "
                             f"(keys {sorted(keys)}); expected energy_key or start['motors']")
        ikey, i0 = self.intensity_key, self.i0_key
        if ikey is None:
            tey = [k for k in keys if k.endswith("_tey")]
            if tey:
                ikey = tey[0]
                if i0 is None and ikey[:-4] + "_i0" in keys:
                    i0 = ikey[:-4] + "_i0"
            else:
                numeric = [k for k, v in keys.items() if v.get("dtype") in ("number", "integer")
                           and not v.get("shape") and k != ekey and not k.startswith(
                               tuple(self._motors))]
                if not numeric:
                    raise ValueError("no numeric detector key in the stream; expected "
                                     "intensity_key")
                ikey = numeric[0]
        if ikey not in keys:
            raise ValueError(f"intensity key {ikey!r} not in the stream (keys {sorted(keys)})")
        if i0 == "":
            i0 = None
        return ekey, ikey, i0

    def finalize(self, stop_doc: dict) -> None:
        if not self._descriptors:
            return  # not a run we analyse (no primary stream)
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
