"""LiveKDE: smooth SANS frames as they arrive and write a ``kde`` stream into the same run.

Every ``cadence`` frames (and once at the end of the run) the accumulated raw counts are
smoothed with bandwidths chosen by cross-validation (:mod:`smartbeam.analysis.kde`) and a
row is written: smoothed frame, variance map, bandwidths per band, exposures so far, the
cross-validated relative error and the predicted total time to reach the target. A bad
frame (wrong shape, NaN/inf/negative counts, an external-resource reference) becomes a row
with ``error`` set; the raw documents are always forwarded and the scan never stops.
A repeated frame (the detector sent the previous frame again: its counter did not
advance, or the content is bit-identical; the rule of :func:`smartbeam.faults.check_frame`)
is left out of the sum and counted (``n_repeated`` in every row), as are frames the
counter says never arrived (``n_missing``).

It is meant to sit permanently in the session's document chain: without a mask or beam
centre of its own it takes them from each run's start document (``beam_centre``,
``beamstop_radius_px``, as written by :func:`smartbeam.plans.sans_kde_count`) and the
frame shape from the descriptor; runs without a 2-D image data key, or whose start
document says ``"kde": False``, pass through untouched (inert).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from event_model import unpack_event_page

from smartbeam.analysis.kde import PRODUCTS, Geometry, KDEResult
from smartbeam.analysis.kde_stream import StreamingKDE
from smartbeam.errors import SmartbeamInputError

from .derived import DerivedStreamRouter, DocumentCallback

__all__ = ["LiveKDE"]

logger = logging.getLogger(__name__)


def _centre_from_start(start: dict, shape: tuple[int, int]) -> tuple[tuple[float, float], str]:
    centre = start.get("beam_centre")
    if centre is None:
        # no calibration in the run: assume the frame centre (and say so in the stream)
        return ((shape[1] - 1) / 2, (shape[0] - 1) / 2), "frame centre (none in start doc)"
    return tuple(centre), "start document"


class LiveKDE(DerivedStreamRouter):
    """Live kernel smoothing of area-detector frames, written as a ``kde`` stream.

    Parameters
    ----------
    mask
        Valid-pixel mask (True = valid) of the detector. ``None``: every pixel outside
        the start document's ``beamstop_radius_px`` around the beam centre.
    beam_centre
        ``(x, y)`` in pixels; checked at construction (off the detector raises).
        ``None``: the start document's ``beam_centre`` (the frame centre if absent).
    image_key
        Data key of the frames; default: the first 2-D array key of ``source_stream``.
    product
        ``"map"``, ``"sector"`` or ``"radial"``: what bandwidths are chosen for
        (overridden by a ``kde_product`` in the start document).
    cadence
        Write a row every ``cadence`` frames (and at the end of the run).
    target_rel_error
        Target relative error for the time-to-target prediction (overridden by the
        start document's ``target_rel_error``).
    exposure
        Seconds per frame, used when no ``acquire_time`` is found in the configuration.
    source_stream
        Stream holding the frames.
    stream_name
        Name of the derived stream.
    png_path
        Where to save the raw-vs-smoothed figure at the end: a file, or an existing
        directory (then ``kde_<uid8>.png`` per run). ``None``: no PNG.
    live_plot
        Update a matplotlib figure at every row (Agg backend without a display).
    sector
        ``(angle_deg, half_width_deg)`` of the sector product.
    seed
        Seed of the cross-validation thinning.
    variance_every
        Compute the variance map every this many rows (and always in the last row);
        rows in between carry NaN variance. 1 = every row.
    downstream
        Next consumer (Tiled writer or another router).

    Notes
    -----
    Fields of each ``kde`` row: ``smoothed`` and ``variance`` (float32 frames; variance
    is the per-pixel diagonal only, smoothed pixels are correlated), ``sigma_q``,
    ``sigma_ring``, ``pixels_averaged`` and ``band_edges`` per radial band (a ring kernel
    such as ``sigma_q=0, sigma_ring=60`` smooths strongly along the ring: read
    ``sigma_q`` together with ``sigma_ring``), ``n_exposures``, ``exposure_s``,
    ``cv_rel_error`` (relative RMS error of the product, sqrt(sum MSE / sum mu^2), from
    the cross-validated bias-variance model), ``predicted_time_s`` (total exposure to
    reach the target, from that model pooled over the run's rows; see
    :meth:`smartbeam.analysis.kde_stream.StreamingKDE.predicted_time`),
    ``target_rel_error``, ``kernel``,
    ``beam_centre_source``, ``error``, ``n_repeated`` (frames skipped as repeats of the
    previous one, not summed), ``n_missing`` (frames the detector's counter says never
    arrived), and ``cv_speedup_half`` /
    ``raw_equivalent_exposures`` (= speed-up x exposures). The speed-up is the
    cross-validated chi^2-MSE ratio raw / smoothed measured on the thinned *half* of the
    counts; it is a difference of noisy sums and usually falls with counts, so treat
    ``raw_equivalent_exposures`` as indicative (it tends to overstate), not calibrated.

    ``rows`` keeps every row written, but only the last ``KEEP_MAPS`` keep their
    ``smoothed`` and ``variance`` maps (``None`` in older rows; every map is in the
    stream): memory stays bounded in long counts.
    """

    KEEP_MAPS = 8

    def __init__(self, mask: np.ndarray | None = None,
                 beam_centre: tuple[float, float] | None = None, *,
                 image_key: str | None = None, product: str = "map", cadence: int = 10,
                 target_rel_error: float = 0.05, exposure: float = 1.0,
                 source_stream: str = "primary", stream_name: str = "kde",
                 png_path: str | os.PathLike | None = None, live_plot: bool = False,
                 sector: tuple[float, float] = (0.0, 10.0), seed: int | None = 0,
                 variance_every: int = 1,
                 downstream: DocumentCallback | None = None) -> None:
        super().__init__(downstream)
        if int(cadence) < 1:
            raise SmartbeamInputError(f"cadence={cadence!r}: expected an integer >= 1")
        if int(variance_every) < 1:
            raise SmartbeamInputError(f"variance_every={variance_every!r}: expected an "
                                      "integer >= 1")
        if not (np.isfinite(target_rel_error) and target_rel_error > 0):
            raise SmartbeamInputError(f"target_rel_error={target_rel_error!r}: expected > 0")
        if product not in PRODUCTS:
            raise SmartbeamInputError(f"product={product!r}: expected one of {PRODUCTS}")
        self.mask = None if mask is None else np.asarray(mask, bool)
        self.beam_centre = None if beam_centre is None else tuple(beam_centre)
        self.sector = sector
        # fixed geometry, checked now, when both are given
        self.fixed_geometry = (Geometry(self.mask, self.beam_centre, sector=sector)
                               if self.mask is not None and self.beam_centre is not None
                               else None)
        self.image_key = image_key
        self.default_product = product
        self.product = product
        self.cadence = int(cadence)
        self.variance_every = int(variance_every)
        self.default_target = float(target_rel_error)
        self.target_rel_error = float(target_rel_error)
        self.default_exposure = float(exposure)
        self.source_stream = source_stream
        self.stream_name = stream_name
        self.png_path = None if png_path is None else Path(png_path)
        self.live_plot = live_plot
        self.seed = seed
        self.geometry: Geometry | None = self.fixed_geometry
        self.geometry_note = "given"
        self.stream: StreamingKDE | None = None
        self.last: KDEResult | None = None
        self.rows: list[dict] = []
        self.active = False
        self._start: dict = {}
        self._geometries: dict = {}
        self._descriptors: dict[str, tuple[str, float, str | None]] = {}
        self._since_emit = 0
        self.n_repeated = 0
        self.n_missing = 0
        self._frames = None  # smartbeam.faults.FrameSequence of the current run
        self._n_rows = 0
        self._bad_shape: tuple[int, int] | None = None
        self._fig = None
        self.last_png: Path | None = None

    # -- document hooks ----------------------------------------------------------------
    def start(self, doc):
        self._start = doc
        self.active = doc.get("kde", True) is not False
        self.product = doc.get("kde_product", self.default_product)
        if self.product not in PRODUCTS:
            self._record_error(f"LiveKDE: kde_product={self.product!r} in the start document: "
                               f"expected one of {PRODUCTS}; using {self.default_product!r}")
            self.product = self.default_product
        tre = doc.get("target_rel_error", self.default_target)
        self.target_rel_error = (float(tre) if isinstance(tre, (int, float)) and tre > 0
                                 else self.default_target)
        self.geometry = self.fixed_geometry
        self.stream = None
        self.last = None
        self.rows = []
        self._descriptors = {}
        self._since_emit = 0
        self._n_rows = 0
        self._bad_shape = None
        self.n_repeated = 0
        self.n_missing = 0
        self._frames = None
        return doc

    def _geometry_for(self, shape: tuple[int, int]) -> Geometry:
        """Geometry for this run's frame shape: given, or from the start document."""
        if self.fixed_geometry is not None:
            if self.fixed_geometry.shape != shape:
                raise SmartbeamInputError(f"frames of shape {shape}: expected "
                                          f"{self.fixed_geometry.shape} (the mask given to "
                                          "LiveKDE)")
            return self.fixed_geometry
        if self.beam_centre is not None:
            centre, self.geometry_note = self.beam_centre, "given"
        else:
            centre, self.geometry_note = _centre_from_start(self._start, shape)
        stop_r = self._start.get("beamstop_radius_px") or 0.0
        key = (shape, tuple(float(c) for c in centre), float(stop_r),
               None if self.mask is None else id(self.mask))
        if key not in self._geometries:
            mask = (np.ones(shape, bool) if self.mask is None
                    else np.asarray(self.mask, bool).copy())
            if mask.shape != shape:
                raise SmartbeamInputError(f"frames of shape {shape}: expected {mask.shape} "
                                          "(the mask given to LiveKDE)")
            if stop_r:
                yy, xx = np.indices(shape)
                try:
                    cx, cy = (float(c) for c in centre)
                except (TypeError, ValueError):
                    raise SmartbeamInputError(f"beam centre {centre!r}: expected (x, y) in "
                                              "pixels") from None
                mask &= np.hypot(xx - cx, yy - cy) > float(stop_r)
            # geometries are cached: the polar grid and kernel normalisers are reused
            self._geometries = {key: Geometry(mask, centre, sector=self.sector)}
        return self._geometries[key]

    def descriptor(self, doc):
        if not self.active or doc.get("name") != self.source_stream:
            return doc
        keys = doc["data_keys"]
        key = self.image_key
        if key is None:
            key = next((k for k, v in keys.items()
                        if v.get("dtype") == "array" and len(v.get("shape") or []) == 2), None)
        if key is None or key not in keys or len(keys[key].get("shape") or []) != 2:
            if self.image_key is not None:
                self._record_error(f"LiveKDE: no 2-D image key {self.image_key!r} in stream "
                                   f"{self.source_stream!r}")
            return doc  # no 2-D frames in this run: inert
        shape = tuple(int(n) for n in keys[key]["shape"])
        exposure = self.default_exposure
        for obj in (doc.get("configuration") or {}).values():
            for k, v in (obj.get("data") or {}).items():
                if k.endswith("acquire_time"):
                    exposure = float(v)
        ckey = next((k for k in keys if k.endswith("array_counter")), None)
        self._descriptors[doc["uid"]] = (key, exposure, ckey)
        if self.stream is None:
            try:
                self.geometry = self._geometry_for(shape)
            except SmartbeamInputError as exc:
                self._bad_shape = shape
                self._flag(f"LiveKDE geometry: {exc}")
                return doc
            self.stream = StreamingKDE(self.geometry, product=self.product, seed=self.seed)
        return doc

    def event(self, doc):
        if doc["descriptor"] not in self._descriptors or self.stream is None:
            return doc
        key, exposure, ckey = self._descriptors[doc["descriptor"]]
        frame = doc["data"].get(key)
        try:
            if frame is None or isinstance(frame, str) or doc.get("filled", {}).get(key) is False:
                raise SmartbeamInputError(f"event {doc.get('seq_num')}: {key!r} is an external "
                                          "resource reference: expected the frame in the event")
            frame = np.asarray(frame)
            if self._repeated(frame, doc["data"].get(ckey) if ckey else None, doc):
                return doc
            self.stream.add(frame, exposure)
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

    def _repeated(self, frame: np.ndarray, counter, doc: dict) -> bool:
        """Apply the repeated/dropped rules of :func:`smartbeam.faults.check_frame`; True
        means: skip the frame (counted in ``n_repeated``). Bad values and shapes are left
        to the smoothing's own checks, which flag them."""
        # imported here: smartbeam.faults imports this package (callbacks.derived)
        from smartbeam.faults import FrameSequence, as_frame_counter

        if self._frames is None:
            self._frames = FrameSequence()
        verdict = self._frames.check(frame, as_frame_counter(counter))
        self.n_missing += verdict.n_dropped
        if verdict.flag == "repeated":
            self.n_repeated += 1
            logger.warning("LiveKDE: frame %s not summed: %s", doc.get("seq_num"),
                           verdict.detail)
            return True
        return False

    def finalize(self, stop_doc: dict) -> None:
        if self.stream is not None and self._since_emit > 0:
            self._emit_row(final=True)
        if self.png_path is not None and self.last is not None:
            path = self.png_path
            if path.is_dir():
                path = path / f"kde_{self._start.get('uid', 'run')[:8]}.png"
            self._draw()
            self._fig.savefig(path, dpi=100)
            self.last_png = path

    # -- rows ----------------------------------------------------------------------------
    def _row(self, res: KDEResult | None, error: str = "") -> dict:
        s = self.stream
        g = self.geometry
        shape = g.shape if g is not None else self._bad_shape
        nb = g.n_bands if g is not None else 1
        edges = g.band_edges[1:] if g is not None else np.full(1, np.nan)
        sq = np.full(nb, np.nan)
        sr = sq.copy()
        npix = sq.copy()
        rel = pred = speedup = float("nan")
        desc = ""
        sm = np.full(shape, np.nan, np.float32)
        var = sm.copy()
        if res is not None:
            sm = res.smoothed.astype(np.float32)
            if res.variance is not None:
                var = res.variance.astype(np.float32)
            sq, sr = res.sigma_q_bands, res.sigma_ring_bands
            npix = np.array([k.pixels_averaged for k in res.kernels], float)
            rel = float(res.rel_error)
            pred = float(s.predicted_time(self.target_rel_error))
            desc = res.kernel_description()
            if res.selection is not None:
                speedup = float(res.selection.speedup_half)
        n = s.n_frames if s else 0
        return {"smoothed": sm, "variance": var, "sigma_q": sq.astype(np.float64),
                "sigma_ring": sr.astype(np.float64), "band_edges": edges.astype(np.float64),
                "pixels_averaged": npix,
                "n_exposures": np.int64(n),
                "exposure_s": float(s.exposure if s else 0.0), "cv_rel_error": rel,
                "predicted_time_s": pred, "target_rel_error": self.target_rel_error,
                "cv_speedup_half": speedup, "raw_equivalent_exposures": speedup * n,
                "kernel": desc, "beam_centre_source": self.geometry_note,
                "n_repeated": np.int64(self.n_repeated), "n_missing": np.int64(self.n_missing),
                "error": error}

    def _dims(self) -> dict:
        img = (f"{self.stream_name}_y", f"{self.stream_name}_x")
        band = (f"{self.stream_name}_band",)
        return {"smoothed": img, "variance": img, "sigma_q": band, "sigma_ring": band,
                "band_edges": band, "pixels_averaged": band}

    def _emit_row(self, final: bool = False) -> None:
        self._since_emit = 0
        with_var = final or self._n_rows % self.variance_every == 0
        self._n_rows += 1
        try:
            res = self.stream.result(variance=with_var)
        except Exception as exc:  # the scan goes on; the row says why
            self._flag(f"LiveKDE analysis failed: {exc!r}")
            return
        self.last = res
        row = self._row(res)
        self._keep(row)
        self.emit(self.stream_name, row, dims=self._dims(),
                  units={"exposure_s": "s", "predicted_time_s": "s"})
        if self.live_plot:
            self._draw()

    def _flag(self, message: str) -> None:
        self._record_error(message)
        row = self._row(None, error=message)
        self._keep(row)
        self.emit(self.stream_name, row, dims=self._dims())

    def _keep(self, row: dict) -> None:
        """Keep the row; rows older than the last ``KEEP_MAPS`` drop their frame-sized maps
        so that a run of any length holds bounded memory (a 10-hour count has thousands)."""
        self.rows.append(row)
        if len(self.rows) > self.KEEP_MAPS:
            old = self.rows[-self.KEEP_MAPS - 1]
            old["smoothed"] = old["variance"] = None

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
