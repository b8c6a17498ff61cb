"""LiveKDE: smooth SANS frames as they arrive and write a ``kde`` stream into the same run.

Every ``cadence`` frames (and once at the end of the run) the accumulated raw counts are
smoothed with bandwidths chosen by cross-validation (:mod:`smartbeam.analysis.kde`) and a
row is written: smoothed frame, variance map, bandwidths per band, exposures so far, the
cross-validated relative error and the predicted total time to reach the target. A bad
frame (wrong shape, NaN/inf/negative counts, an external-resource reference) becomes a row
with ``error`` set; the raw documents are always forwarded and the scan never stops.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from event_model import unpack_event_page

from smartbeam.analysis.kde import Geometry, KDEResult
from smartbeam.analysis.kde_stream import StreamingKDE
from smartbeam.errors import SmartbeamInputError

from .derived import DerivedStreamRouter, DocumentCallback

__all__ = ["LiveKDE"]

logger = logging.getLogger(__name__)


class LiveKDE(DerivedStreamRouter):
    """Live kernel smoothing of area-detector frames, written as a ``kde`` stream.

    Parameters
    ----------
    mask
        Valid-pixel mask (True = valid) of the detector.
    beam_centre
        ``(x, y)`` in pixels; checked at construction (off the detector raises).
    image_key
        Data key of the frames; default: the first 2-D array key of ``source_stream``.
    product
        ``"map"``, ``"sector"`` or ``"radial"``: what bandwidths are chosen for.
    cadence
        Write a row every ``cadence`` frames (and at the end of the run).
    target_rel_error
        Target relative error for the time-to-target prediction.
    exposure
        Seconds per frame, used when no ``acquire_time`` is found in the configuration.
    source_stream
        Stream holding the frames.
    stream_name
        Name of the derived stream.
    png_path
        Where to save the raw-vs-smoothed figure at the end (``None``: no PNG).
    live_plot
        Update a matplotlib figure at every row (Agg backend without a display).
    sector
        ``(angle_deg, half_width_deg)`` of the sector product.
    seed
        Seed of the cross-validation thinning.
    downstream
        Next consumer (Tiled writer or another router).
    """

    def __init__(self, mask: np.ndarray, beam_centre: tuple[float, float], *,
                 image_key: str | None = None, product: str = "map", cadence: int = 10,
                 target_rel_error: float = 0.05, exposure: float = 1.0,
                 source_stream: str = "primary", stream_name: str = "kde",
                 png_path: str | os.PathLike | None = None, live_plot: bool = False,
                 sector: tuple[float, float] = (0.0, 10.0), seed: int | None = 0,
                 downstream: DocumentCallback | None = None) -> None:
        super().__init__(downstream)
        if int(cadence) < 1:
            raise SmartbeamInputError(f"cadence={cadence!r}: expected an integer >= 1")
        if not (np.isfinite(target_rel_error) and target_rel_error > 0):
            raise SmartbeamInputError(f"target_rel_error={target_rel_error!r}: expected > 0")
        self.geometry = Geometry(np.asarray(mask, bool), beam_centre, sector=sector)
        self.image_key = image_key
        self.product = product
        self.cadence = int(cadence)
        self.target_rel_error = float(target_rel_error)
        self.default_exposure = float(exposure)
        self.source_stream = source_stream
        self.stream_name = stream_name
        self.png_path = None if png_path is None else Path(png_path)
        self.live_plot = live_plot
        self.seed = seed
        self.stream: StreamingKDE | None = None
        self.last: KDEResult | None = None
        self.rows: list[dict] = []
        self._descriptors: dict[str, tuple[str, float]] = {}
        self._since_emit = 0
        self._fig = None

    # -- document hooks ----------------------------------------------------------------
    def start(self, doc):
        self.stream = StreamingKDE(self.geometry, product=self.product, seed=self.seed)
        self.last = None
        self.rows = []
        self._descriptors = {}
        self._since_emit = 0
        return doc

    def descriptor(self, doc):
        if doc.get("name") != self.source_stream:
            return doc
        key = self.image_key
        if key is None:
            key = next((k for k, v in doc["data_keys"].items()
                        if v.get("dtype") == "array" and len(v.get("shape") or []) == 2), None)
        if key is None or key not in doc["data_keys"]:
            self._record_error(f"LiveKDE: no 2-D image key {self.image_key!r} in stream "
                               f"{self.source_stream!r}")
            return doc
        exposure = self.default_exposure
        for obj in (doc.get("configuration") or {}).values():
            for k, v in (obj.get("data") or {}).items():
                if k.endswith("acquire_time"):
                    exposure = float(v)
        self._descriptors[doc["uid"]] = (key, exposure)
        return doc

    def event(self, doc):
        if doc["descriptor"] not in self._descriptors or self.stream is None:
            return doc
        key, exposure = self._descriptors[doc["descriptor"]]
        frame = doc["data"].get(key)
        try:
            if frame is None or isinstance(frame, str) or doc.get("filled", {}).get(key) is False:
                raise SmartbeamInputError(f"event {doc.get('seq_num')}: {key!r} is an external "
                                          "resource reference: expected the frame in the event")
            self.stream.add(np.asarray(frame), exposure)
        except SmartbeamInputError as exc:
            self._flag(str(exc))
            return doc
        self._since_emit += 1
        if self._since_emit >= self.cadence:
            self._emit_row()
        return doc

    def event_page(self, doc):
        for ev in unpack_event_page(doc):
            self.event(ev)
        return doc

    def finalize(self, stop_doc: dict) -> None:
        if self.stream is not None and self._since_emit > 0:
            self._emit_row()
        if self.png_path is not None and self.last is not None:
            self._draw()
            self._fig.savefig(self.png_path, dpi=100)

    # -- rows ----------------------------------------------------------------------------
    def _row(self, res: KDEResult | None, error: str = "") -> dict:
        s = self.stream
        shape = self.geometry.shape
        nb = self.geometry.n_bands
        if res is None:
            sm = np.full(shape, np.nan, np.float32)
            var = sm.copy()
            sq = np.full(nb, np.nan)
            sr = sq.copy()
            rel = pred = float("nan")
            desc = ""
        else:
            sm = res.smoothed.astype(np.float32)
            var = res.variance.astype(np.float32)
            sq, sr = res.sigma_q_bands, res.sigma_ring_bands
            rel = float(res.rel_error)
            pred = float(s.predicted_time(self.target_rel_error))
            desc = res.kernel_description()
        return {"smoothed": sm, "variance": var, "sigma_q": sq.astype(np.float64),
                "sigma_ring": sr.astype(np.float64), "band_edges": self.geometry.band_edges[1:],
                "n_exposures": np.int64(s.n_frames if s else 0),
                "exposure_s": float(s.exposure if s else 0.0), "cv_rel_error": rel,
                "predicted_time_s": pred, "target_rel_error": self.target_rel_error,
                "kernel": desc, "error": error}

    def _dims(self) -> dict:
        img = (f"{self.stream_name}_y", f"{self.stream_name}_x")
        band = (f"{self.stream_name}_band",)
        return {"smoothed": img, "variance": img, "sigma_q": band, "sigma_ring": band,
                "band_edges": band}

    def _emit_row(self) -> None:
        self._since_emit = 0
        try:
            res = self.stream.result()
        except Exception as exc:  # the scan goes on; the row says why
            self._flag(f"LiveKDE analysis failed: {exc!r}")
            return
        self.last = res
        row = self._row(res)
        self.rows.append(row)
        self.emit(self.stream_name, row, dims=self._dims(),
                  units={"exposure_s": "s", "predicted_time_s": "s"})
        if self.live_plot:
            self._draw()

    def _flag(self, message: str) -> None:
        self._record_error(message)
        row = self._row(None, error=message)
        self.rows.append(row)
        self.emit(self.stream_name, row, dims=self._dims())

    # -- view ------------------------------------------------------------------------------
    def _draw(self) -> None:
        import matplotlib
        if not os.environ.get("DISPLAY") and matplotlib.get_backend().lower() != "agg":
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm

        if self._fig is None:
            self._fig, self._axes = plt.subplots(1, 2, figsize=(9, 4.2))
        raw = np.where(self.geometry.mask, self.stream.acc.total, np.nan).astype(float)
        sm = np.where(self.geometry.mask, self.last.smoothed, np.nan)
        pos = sm[np.isfinite(sm) & (sm > 0)]
        vmin = max(pos.min(), 1e-3) if pos.size else 1e-3
        vmax = max(pos.max(), vmin * 10) if pos.size else 1.0
        for ax, img, title in ((self._axes[0], raw, "raw sum"),
                               (self._axes[1], sm, "KDE smoothed")):
            ax.clear()
            ax.imshow(np.where(img > 0, img, vmin), origin="lower",
                      norm=LogNorm(vmin=vmin, vmax=vmax))
            ax.set_title(f"{title} ({self.stream.n_frames} exposures)")
        self._fig.suptitle(f"rel. error {self.last.rel_error:.3g}, predicted time to "
                           f"{self.target_rel_error:g}: "
                           f"{self.stream.predicted_time(self.target_rel_error):.3g} s")
        self._fig.canvas.draw_idle()
