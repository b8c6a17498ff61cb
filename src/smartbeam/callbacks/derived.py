"""Write derived results as extra streams inside the run they were computed from.

A :class:`DerivedStreamRouter` sits between the RunEngine and a downstream consumer
(usually the Tiled writer). It forwards every document unchanged and lets a subclass
emit extra streams (``kde``, ``analysis``, ...) *before* the stop document reaches the
writer, so the derived stream lands in the same run as the raw data. Routers chain:
``LiveKDE(downstream=TenDqEstimator(downstream=writer))``.

Analysis errors never propagate to the RunEngine: they are logged and written as an
``error`` field of the derived stream, and the raw documents are always forwarded.
"""

from __future__ import annotations

import logging
import time as ttime
from collections.abc import Callable
from typing import Any

import numpy as np
from event_model import DocumentRouter, compose_descriptor

logger = logging.getLogger(__name__)

DocumentCallback = Callable[[str, dict], Any]
# Error messages kept per run (all are logged; ``n_errors`` counts them all).
MAX_KEPT_ERRORS = 100


def data_key_for(value: Any, source: str = "smartbeam", dims: tuple[str, ...] | None = None,
                 units: str | None = None) -> dict:
    """Describe one derived value as an event-model data key.

    Parameters
    ----------
    value
        An example value (scalar, string, or array).
    source
        Where the value comes from, e.g. ``"smartbeam.kde"``.
    dims
        Dimension names for arrays; distinct names are generated when omitted, because
        Tiled otherwise gives a square image the same dimension name twice.
    units
        Optional units string.
    """
    if isinstance(value, str):
        key: dict[str, Any] = {"dtype": "string", "shape": [], "source": source}
    elif np.ndim(value) == 0:
        arr = np.asarray(value)
        if arr.dtype.kind == "b":
            key = {"dtype": "boolean", "shape": [], "source": source}
        elif arr.dtype.kind in "iu":
            key = {"dtype": "integer", "shape": [], "source": source}
        else:
            key = {"dtype": "number", "shape": [], "source": source}
        key["dtype_numpy"] = arr.dtype.str
    else:
        arr = np.asarray(value)
        key = {"dtype": "array", "shape": list(arr.shape), "source": source,
               "dtype_numpy": arr.dtype.str}
        key["dims"] = list(dims) if dims else [f"dim_{i}" for i in range(arr.ndim)]
    if units:
        key["units"] = units
    return key


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value


class DerivedStreamRouter(DocumentRouter):
    """Forward documents downstream and inject derived streams into the same run.

    Subclasses override the usual :class:`event_model.DocumentRouter` hooks
    (``start``, ``descriptor``, ``event``, ``event_page``, ``stop`` ...) to look at the
    data and call :meth:`emit` to write a row of a derived stream. They must call
    ``super()`` so that documents are forwarded. :meth:`finalize` is called just before
    the stop document is forwarded: emit end-of-run results there.

    Parameters
    ----------
    downstream
        Callable ``(name, doc)`` receiving every document, e.g. a ``TiledWriter`` or
        another router. ``None`` makes the router a plain consumer (useful in tests).
    """

    def __init__(self, downstream: DocumentCallback | None = None) -> None:
        super().__init__()
        self.downstream = downstream
        self._start_doc: dict | None = None
        self._event_counters: dict[str, int] = {}
        self._streams: dict[str, Any] = {}
        self._bundles: dict[str, Any] = {}
        self._data_keys: dict[str, dict] = {}
        self.errors: list[str] = []
        self.n_errors = 0

    # -- document flow -------------------------------------------------------------
    def __call__(self, name: str, doc: dict, validate: bool = False):
        if name == "start":
            self._start_doc = doc
            self._event_counters = {}
            self._streams = {}
            self._bundles = {}
            self._data_keys = {}
            self.errors = []
            self.n_errors = 0
        if name == "stop":
            # Derived rows must reach the writer before the stop closes the run.
            self._analyse(name, doc, validate)
            doc = self._before_stop(doc)
            self._forward(name, doc)
        else:
            # Raw data first, so nothing is lost if the analysis below fails.
            self._forward(name, doc)
            self._analyse(name, doc, validate)
        return name, doc

    def _analyse(self, name: str, doc: dict, validate: bool) -> None:
        try:
            super().__call__(name, doc, validate=validate)
        except Exception as exc:  # analysis never kills the scan
            message = f"{type(self).__name__}.{name}: {exc!r}"
            if not self._bundles:
                self._record_error(message)
            # Make the failure visible in the run too, in every stream already opened.
            for stream in list(self._bundles):
                try:
                    self.emit_error(stream, message)
                except Exception as emit_exc:
                    self._record_error(f"{message}; writing the error row failed: {emit_exc!r}")

    def _forward(self, name: str, doc: dict) -> None:
        if self.downstream is not None:
            self.downstream(name, doc)

    def _before_stop(self, doc: dict) -> dict:
        try:
            self.finalize(doc)
        except Exception as exc:
            self._record_error(f"{type(self).__name__}.finalize: {exc!r}")
        if not self._event_counters:
            return doc
        doc = dict(doc)
        num_events = dict(doc.get("num_events") or {})
        # event_model's counters hold the next seq_num, i.e. count + 1.
        num_events.update({k: v - 1 for k, v in self._event_counters.items()})
        doc["num_events"] = num_events
        return doc

    def finalize(self, stop_doc: dict) -> None:
        """Emit end-of-run results; called before the stop document is forwarded."""

    def _record_error(self, message: str) -> None:
        logger.error("derived-stream analysis failed: %s", message)
        self.n_errors += 1
        # Bounded: a long count with a bad detector must not grow memory without limit.
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(message)

    # -- emitting derived streams ------------------------------------------------
    def emit(self, stream: str, data: dict[str, Any], *, dims: dict[str, tuple[str, ...]] | None = None,
             units: dict[str, str] | None = None, timestamp: float | None = None) -> None:
        """Write one row of the derived stream ``stream`` into the current run.

        The first call for a stream fixes its data keys (an ``error`` string field is
        always added); later rows must carry the same keys. Values may be scalars,
        strings or numpy arrays.
        """
        if self._start_doc is None:
            raise RuntimeError("emit() called outside a run")
        now = ttime.time() if timestamp is None else timestamp
        data = dict(data)
        data.setdefault("error", "")
        if stream not in self._bundles:
            dims = dims or {}
            units = units or {}
            data_keys = {
                key: data_key_for(value, source=f"smartbeam.{stream}", dims=dims.get(key),
                                  units=units.get(key))
                for key, value in data.items()
            }
            bundle = compose_descriptor(
                start=self._start_doc, streams=self._streams,
                event_counters=self._event_counters, name=stream, data_keys=data_keys,
                object_keys={"smartbeam": list(data_keys)}, time=now,
            )
            self._bundles[stream] = bundle
            self._data_keys[stream] = data_keys
            self._forward("descriptor", bundle.descriptor_doc)
        data_keys = self._data_keys[stream]
        missing = set(data_keys) - set(data)
        extra = set(data) - set(data_keys)
        if missing or extra:
            raise ValueError(f"stream {stream!r}: row keys differ from the first row "
                             f"(missing {sorted(missing)}, unexpected {sorted(extra)})")
        data = {k: _jsonable(v) for k, v in data.items()}
        event = self._bundles[stream].compose_event(
            data=data, timestamps={k: now for k in data}, time=now)
        self._forward("event", event)

    def emit_error(self, stream: str, message: str) -> None:
        """Record an analysis error and, if the stream exists, write it as a row."""
        self._record_error(message)
        if stream in self._bundles:
            row = {}
            for key, spec in self._data_keys[stream].items():
                if spec["dtype"] == "string":
                    row[key] = ""
                elif spec["dtype"] == "array":
                    row[key] = np.full(spec["shape"], np.nan, dtype=spec.get("dtype_numpy", "<f8"))
                elif spec["dtype"] in ("integer", "boolean"):
                    row[key] = np.asarray(0, dtype=spec.get("dtype_numpy", "<i8"))
                else:
                    row[key] = float("nan")
            row["error"] = message
            self.emit(stream, row)
