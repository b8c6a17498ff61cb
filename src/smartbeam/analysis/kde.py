"""Kernel smoothing of SANS/SAXS area-detector counts with data-chosen bandwidths.

The estimate of the mean counts per pixel is a masked, normalised Gaussian smoothing of
the accumulated raw counts. The kernel is chosen *per radial band* around the beam centre
by cross-validation on binomially thinned halves of the Poisson counts
(X_A ~ Binomial(X, 1/2), X_B = X - X_A are independent Poisson frames): smooth X_A, score
against X_B for the product the user wants (2-D map, sector average, radial average). The
candidate list always contains "no smoothing", so the choice is never worse than raw data
up to the noise of the cross-validation itself.

Smoothed pixels are correlated: every :class:`KDEResult` carries its variance map and a
description of the kernel; never feed ``smoothed`` to a Poisson-error integrator as if
its pixels were independent counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.fft as sfft

from smartbeam.errors import SmartbeamInputError

from .kde_emit import CellEmitPlan, RingEmitPlan, coarse_n_phi
from .kde_filters import (
    IsoFilter,
    PolarGrid,
    gaussian_kernel_1d,
    masked_gaussian,
    ring_gaussian,
)
from .kde_mrgrid import MultiPolar
from .kde_score import RowScorer, cv_band_sums, pilot_terms, split_terms
from .kde_thin import bin_cells, thin_masked

__all__ = [
    "DEFAULT_CANDIDATES",
    "PRODUCTS",
    "ErrorModel",
    "ErrorModelPool",
    "Geometry",
    "KDEResult",
    "Kernel",
    "Selection",
    "apply_kernels",
    "kde_estimate",
    "pool_adjacent_bands",
    "predict_time_to_target",
    "product_profile",
    "select_bandwidths",
    "smooth",
    "thin",
    "validate_frame",
]

PRODUCTS = ("map", "sector", "radial")


@dataclass(frozen=True)
class Kernel:
    """One smoothing kernel.

    Parameters
    ----------
    kind
        ``"iso"`` (Cartesian isotropic Gaussian, ``sigma_q == sigma_ring``) or ``"ring"``
        (polar Gaussian around the beam centre).
    sigma_q
        Standard deviation along the radius (q), px.
    sigma_ring
        Standard deviation along the ring, px of arc.
    """

    kind: str
    sigma_q: float
    sigma_ring: float

    @classmethod
    def iso(cls, sigma: float) -> Kernel:
        """Isotropic Gaussian of ``sigma`` px (0 = no smoothing)."""
        return cls("iso", float(sigma), float(sigma))

    @classmethod
    def ring(cls, sigma_q: float, sigma_ring: float) -> Kernel:
        """Polar Gaussian, ``sigma_q`` px along q and ``sigma_ring`` px along the ring."""
        return cls("ring", float(sigma_q), float(sigma_ring))

    def describe(self) -> str:
        """Short human-readable description, e.g. ``iso(sigma=1.5px)``."""
        if self.kind == "iso":
            return "none" if self.sigma_q == 0 else f"iso(sigma={self.sigma_q:g}px)"
        return f"ring(sigma_q={self.sigma_q:g}px, sigma_ring={self.sigma_ring:g}px)"

    @property
    def pixels_averaged(self) -> float:
        """Effective number of pixels averaged (4 pi sigma_q sigma_ring; 1 for none)."""
        return max(1.0, 4 * np.pi * max(self.sigma_q, 0.5) * max(self.sigma_ring, 0.5)) \
            if (self.sigma_q > 0 or self.kind == "ring") else 1.0


DEFAULT_CANDIDATES: tuple[Kernel, ...] = (
    *(Kernel.iso(s) for s in (0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0)),
    *(Kernel.ring(q, r) for q in (0.0, 1.0, 2.0, 4.0) for r in (3.0, 8.0, 20.0, 60.0)),
)


def validate_frame(frame: np.ndarray, shape: tuple[int, int] | None = None,
                   name: str = "frame") -> np.ndarray:
    """Check a counts frame: 2-D, expected shape, finite, non-negative.

    Returns
    -------
    numpy.ndarray
        The frame (not copied).

    Raises
    ------
    SmartbeamInputError
        With a message naming the bad value and what was expected.
    """
    a = np.asarray(frame)
    if a.ndim != 2:
        raise SmartbeamInputError(f"{name} has shape {a.shape}: expected a 2-D (ny, nx) frame")
    if shape is not None and a.shape != tuple(shape):
        raise SmartbeamInputError(f"{name} has shape {a.shape}: expected {tuple(shape)} "
                                  "(the shape of the frames accumulated so far)")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            y, x = np.argwhere(bad)[0]
            raise SmartbeamInputError(f"{name}[{y}, {x}] = {a[y, x]!r}: expected finite counts "
                                      f"({int(bad.sum())} non-finite pixels)")
    elif a.dtype.kind not in "iub":
        raise SmartbeamInputError(f"{name} has dtype {a.dtype}: expected integer or float counts")
    if a.dtype.kind in "if" and a.size and a.min() < 0:
        y, x = np.unravel_index(int(np.argmin(a)), a.shape)
        raise SmartbeamInputError(f"{name}[{y}, {x}] = {a[y, x]!r}: expected counts >= 0")
    return a


@dataclass
class _Region:
    """Where one distinct kernel of a per-band list applies (cached by the geometry)."""

    sel_full: np.ndarray  # bool (ny, nx): the pixels of its bands
    box: tuple[tuple[int, int], tuple[int, int]]  # bounding box ((y0, y1), (x0, x1))
    sel_box: np.ndarray  # sel_full within the box
    rows: tuple[int, int]  # polar rows (1-px radial cells) of its bands
    flat_sel: np.ndarray  # flat pixel indices of sel_full
    cell_of_sel: np.ndarray  # polar cell of each of those pixels
    inv_px: tuple | None = None  # ((kernel, rows), kde_emit.CellEmitPlan): 1 px-of-arc grid
    coarse: tuple | None = None  # (kernel, kde_emit.RingEmitPlan): coarse grids


class Geometry:
    """Detector geometry shared by smoothing, products and selection.

    Parameters
    ----------
    mask
        Boolean ``(ny, nx)``, True = valid pixel; at least one valid pixel.
    centre
        Beam centre ``(x, y)`` in pixels (0-based), inside the detector.
    band_width_px
        Width of the radial bands that get their own bandwidth.
    sector
        ``(angle_deg, half_width_deg)`` of the sector product; both opposite sides are used.
    score_arc_px
        Azimuthal cell size (px of arc at the outer radius of each group of radii) of the
        multi-resolution polar grid on which the cross-validation of large detectors
        scores ring kernels (:attr:`score_grid`; :attr:`score_polar` is the same size at
        the outermost pixel on one resolution); the emitted smoothing uses ~1 px, or
        ~sigma_ring / 5 for wide ring kernels on large detectors (:mod:`.kde_emit`).
        Default 3: at 1024^2 the re-selection measured ~10 % less thread CPU than with 2
        (paired medians), with the same kernel choices and true-MSE speed-ups in 9 of 12
        checks (realistic, sharp, anisotropic at 3 and 30 scans, two seeds each), higher
        in two (+26 %, +4 %) and 5 % lower in one; the scored ring values stay within
        0.8 % RMS of the emitted smoothing (sigma_ring = 3 px; 0.5 % with 2).
    """

    def __init__(self, mask: np.ndarray, centre: Sequence[float], *, band_width_px: float = 8.0,
                 sector: tuple[float, float] = (0.0, 10.0), score_arc_px: float = 3.0) -> None:
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.dtype != bool:
            raise SmartbeamInputError(f"mask of shape {mask.shape} and dtype {mask.dtype}: "
                                      "expected a 2-D boolean array (True = valid pixel)")
        if not mask.any():
            raise SmartbeamInputError("mask has no valid pixel: expected at least one True "
                                      "(the whole detector is masked)")
        ny, nx = mask.shape
        try:
            cx, cy = (float(c) for c in centre)
        except (TypeError, ValueError):
            raise SmartbeamInputError(f"beam centre {centre!r}: expected (x, y) in pixels"
                                      ) from None
        if not (np.isfinite(cx) and np.isfinite(cy) and -0.5 <= cx <= nx - 0.5
                and -0.5 <= cy <= ny - 0.5):
            raise SmartbeamInputError(f"beam centre (x, y) = ({cx}, {cy}) is off the detector: "
                                      f"expected x in [-0.5, {nx - 0.5}] and y in "
                                      f"[-0.5, {ny - 0.5}] pixels")
        if not (np.isfinite(score_arc_px) and score_arc_px > 0):
            raise SmartbeamInputError(f"score_arc_px={score_arc_px!r}: expected a cell size "
                                      "> 0 px of arc")
        self.score_arc_px = float(score_arc_px)
        if not band_width_px > 0:
            raise SmartbeamInputError(f"band_width_px={band_width_px!r}: expected > 0")
        self.mask = mask
        self.shape = mask.shape
        self.centre = (cx, cy)
        self.sector = (float(sector[0]), float(sector[1]))
        self.polar = PolarGrid(mask, self.centre)
        self.r = self.polar.r
        self.band = np.minimum((self.r / band_width_px).astype(np.int64), 10**6)
        self.band[~mask] = -1
        self.n_bands = int(self.band.max()) + 1
        self.band_edges = np.arange(self.n_bands + 1) * float(band_width_px)
        rbin = self.r.astype(np.int64)
        self.n_rbins = int(rbin.max()) + 1
        radial = np.where(mask, rbin, -1)
        d = np.angle(np.exp(2j * (self.polar.phi - np.deg2rad(self.sector[0])))) / 2
        in_sector = np.abs(d) <= np.deg2rad(self.sector[1])
        self.bins = {"radial": radial, "sector": np.where(in_sector, radial, -1)}
        self.maskf = mask.astype(np.float32)
        self.mask_u8 = np.ascontiguousarray(mask).view(np.uint8)  # for the numba kernels
        self._iso: dict[float, IsoFilter] = {}
        self._score_index: dict[int, tuple] = {}
        self._scratch: dict[int, np.ndarray] = {}
        self._mask_weight: dict[float, np.ndarray] = {}
        self._regions: dict[tuple, list] = {}
        self._score_polar: PolarGrid | None = None
        self._score_grid: MultiPolar | None = None
        self._emit_work: dict = {}  # work buffers of the ring emits (kde_emit plans)
        masked_flat = np.flatnonzero(~mask)
        self._masked_flat = masked_flat if masked_flat.size < mask.size // 4 else None
        self._n_valid = mask.size - masked_flat.size  # (a sum over the mask per search)

    def iso_filter(self, sigma: float) -> IsoFilter:
        """Isotropic float32 filter with its mask normalisation (cached per ``sigma``)."""
        sigma = float(sigma)
        if sigma not in self._iso:
            self._iso[sigma] = IsoFilter(self.mask, sigma)
        return self._iso[sigma]

    def kernel_regions(self, kernels: Sequence[Kernel]) -> list[tuple[Kernel, _Region]]:
        """Each distinct kernel of a per-band list with the region it serves (cached).

        The cache keeps the last few kernel lists: between emits of a live run the
        selected kernels rarely change.
        """
        key = tuple(kernels)
        if key not in self._regions:
            distinct = list(dict.fromkeys(kernels))
            lut = np.array([distinct.index(k) for k in kernels] + [-1], np.int16)
            which = lut[self.band]
            regs = []
            for j, kern in enumerate(distinct):
                sel = which == j
                rows_any = np.flatnonzero(sel.any(axis=1))
                cols_any = np.flatnonzero(sel.any(axis=0))
                if rows_any.size == 0:
                    continue
                box = ((int(rows_any[0]), int(rows_any[-1]) + 1),
                       (int(cols_any[0]), int(cols_any[-1]) + 1))
                flat = np.flatnonzero(sel)
                cell = self.polar.cell.ravel()[flat]
                rb = cell // self.polar.n_phi
                regs.append((kern, _Region(sel, box, sel[box[0][0]:box[0][1],
                                                         box[1][0]:box[1][1]],
                                           (int(rb.min()), int(rb.max()) + 1), flat, cell)))
            if len(self._regions) >= 4:
                self._regions.pop(next(iter(self._regions)))
            self._regions[key] = regs
        return self._regions[key]

    def score_index(self, max_pixels: int | None) -> np.ndarray:
        """Sorted flat indices of the valid pixels scored by the cross-validation.

        All valid pixels when there are at most ``max_pixels`` of them; otherwise the
        valid pixels of whole detector rows (:meth:`score_rows`).
        """
        return self.score_rows(max_pixels)[1]

    def score_rows(self, max_pixels: int | None) -> tuple[np.ndarray | None, np.ndarray]:
        """Rows and flat indices of the valid pixels scored by the cross-validation.

        With more than ``max_pixels`` valid pixels, a fixed (seeded, so every call
        agrees) stratified random set of whole rows (one per stratum of equal height)
        holding about ``max_pixels`` valid pixels: every radial band keeps its share of
        pixels on average, without the aliasing of a regular stride, and a separable
        kernel needs its second pass on those rows only (:mod:`.kde_score`).

        Returns
        -------
        rows, idx
            ``rows`` is ``None`` when every valid pixel is scored.
        """
        key = -1 if max_pixels is None else int(max_pixels)
        if key not in self._score_index:
            flat = np.flatnonzero(self.mask)
            rows = None
            if max_pixels is not None and flat.size > max_pixels:
                ny = self.shape[0]
                n_rows = int(np.ceil(max_pixels / (flat.size / ny)))
                if n_rows < ny:
                    edges = np.linspace(0, ny, n_rows + 1).astype(np.int64)
                    rng = np.random.default_rng(12345)
                    rows = np.unique(edges[:-1] + (rng.random(n_rows)
                                                   * (edges[1:] - edges[:-1])).astype(np.int64))
                    flat = flat[np.isin(flat // self.shape[1], rows)]
            self._score_index[key] = (rows, flat)
        return self._score_index[key]

    def row_scorer(self, max_pixels: int) -> RowScorer:
        """The :class:`~smartbeam.analysis.kde_score.RowScorer` of :meth:`score_rows`
        (cached: it keeps gather indices and normalisers of the scored pixels).

        Its pixels (``RowScorer.idx``) are those of :meth:`score_rows` ordered by radial
        band, so that per-band sums over them are sums of contiguous runs, and within a
        band by azimuth then radius on the scoring polar grid (the ring kernels' q windows
        of successive pixels then share grid rows in cache).
        """
        key = ("scorer", int(max_pixels))
        if key not in self._score_index:
            rows, idx = self.score_rows(max_pixels)
            grid = self.score_grid
            rho, phi = grid.cell_azimuth(grid.cell.ravel()[idx])
            idx = idx[np.lexsort((rho, phi, self.band.ravel()[idx]))]
            self._score_index[key] = RowScorer(self, rows, idx, grid)
        return self._score_index[key]

    def masked32(self, frame: np.ndarray, slot: int | None = None) -> np.ndarray:
        """``frame`` as float32 with zeros outside the mask (one pass).

        With ``slot``, the result is written into a work buffer kept by the geometry
        (reused by the next call with the same slot; freshly allocated 16 MB frames cost
        ~4 ms of page faults at 2048^2). Never hand a slot buffer out of the module.
        """
        if slot is None:
            return np.multiply(frame, self.maskf, dtype=np.float32)
        buf = self._scratch.get(slot)
        if buf is None:
            buf = self._scratch[slot] = np.empty(self.shape, np.float32)
        if self._masked_flat is None:
            return np.multiply(frame, self.maskf, out=buf, dtype=np.float32)
        # few masked pixels: convert, then zero them (cheaper than a multiply pass)
        np.copyto(buf, frame, casting="unsafe")
        buf.reshape(-1)[self._masked_flat] = 0.0
        return buf

    @property
    def score_polar(self) -> PolarGrid:
        """Polar grid of the ring kernels in the cross-validation of large detectors.

        ``score_arc_px`` (default 3) px of arc at the outermost pixel (``geometry.polar``
        has ~1 px): a third of the cells to bin, transform and filter per candidate. At
        3 px the smallest ring bandwidth of the default candidates (3 px of arc) is widened
        by ~4 % at the detector corner (2 px: ~2 %), less inside; the emitted smoothing
        keeps ``geometry.polar``. Built on first use.
        """
        if self._score_polar is None:
            n_phi = sfft.next_fast_len(int(np.ceil(2 * np.pi * self.r.max()
                                                   / self.score_arc_px)), real=True)
            self._score_polar = (self.polar if n_phi >= self.polar.n_phi
                                 else PolarGrid(self.mask, self.centre, n_phi=n_phi))
        return self._score_polar

    @property
    def score_grid(self) -> MultiPolar:
        """Multi-resolution polar grid of the ring kernels in the cross-validation of
        large detectors (what :meth:`row_scorer` uses).

        ``score_arc_px`` px of arc at the outer radius of each group of 128 radii
        (:class:`~smartbeam.analysis.kde_mrgrid.MultiPolar`): the inner rings get fewer
        cells than on :attr:`score_polar` (one resolution for all radii), ~half the cells
        at 1024^2. Built on first use.
        """
        if self._score_grid is None:
            self._score_grid = MultiPolar(self.mask, self.r, self.polar.phi,
                                          arc_px=self.score_arc_px)
        return self._score_grid

    def scratch(self, slot: int) -> np.ndarray:
        """A float32 work frame kept by the geometry (see :meth:`masked32`)."""
        buf = self._scratch.get(slot)
        if buf is None:
            buf = self._scratch[slot] = np.empty(self.shape, np.float32)
        return buf

    def mask_weight(self, sigma: float) -> np.ndarray:
        """Smoothed mask (float64) for an isotropic ``sigma`` (cached: the mask is fixed)."""
        if sigma not in self._mask_weight:
            from .kde_filters import _sep, gaussian_kernel_1d
            self._mask_weight[sigma] = _sep(self.mask.astype(np.float64),
                                            gaussian_kernel_1d(sigma), "cv2")
        return self._mask_weight[sigma]


def smooth(counts: np.ndarray, geometry: Geometry, kernel: Kernel, *,
           density: np.ndarray | None = None, backend: str = "cv2",
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Smooth counts with one kernel (masked, normalised); optionally also the variance.

    Parameters
    ----------
    counts
        2-D counts of the detector's shape.
    geometry
        :class:`Geometry` of the detector.
    kernel
        :class:`Kernel` to apply.
    density
        Estimated mean counts per pixel, to get the Poisson variance map.
    backend
        ``"cv2"`` (float32, cached normalisers; the default and the fast path) or
        ``"scipy"`` (float64 reference for isotropic kernels).

    Returns
    -------
    smoothed, variance
        0 outside the mask; ``variance`` is ``None`` without ``density``.
    """
    if kernel.kind == "iso":
        if backend == "scipy" or kernel.sigma_q <= 0:
            return masked_gaussian(counts, geometry.mask, kernel.sigma_q, density=density,
                                   backend="scipy")
        if backend != "cv2":
            raise SmartbeamInputError(f"backend={backend!r}: expected 'cv2' or 'scipy'")
        f = geometry.iso_filter(kernel.sigma_q)
        sm = f.apply(geometry.masked32(counts, slot=0))
        var = None if density is None else f.variance(geometry.masked32(density, slot=1))
        return sm, var
    if kernel.kind == "ring":
        return ring_gaussian(counts, geometry.polar, kernel.sigma_q, kernel.sigma_ring,
                             density=density)
    raise SmartbeamInputError(f"kernel kind {kernel.kind!r}: expected 'iso' or 'ring'")


def product_profile(frame: np.ndarray, geometry: Geometry, product: str) -> np.ndarray:
    """Reduce a per-pixel frame to the delivered product.

    ``"map"`` returns the valid pixels (1-D); ``"radial"`` and ``"sector"`` return the mean
    over 1-px radial bins (NaN for empty bins).
    """
    if product == "map":
        return frame[geometry.mask]
    if product not in PRODUCTS:
        raise SmartbeamInputError(f"product={product!r}: expected one of {PRODUCTS}")
    bins = geometry.bins[product]
    sel = bins >= 0
    s = np.bincount(bins[sel], weights=frame[sel], minlength=geometry.n_rbins)
    n = np.bincount(bins[sel], minlength=geometry.n_rbins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return s / n


def _bin_counts(geometry: Geometry, product: str) -> np.ndarray:
    if product == "map":
        return np.ones(int(geometry.mask.sum()))
    bins = geometry.bins[product]
    return np.bincount(bins[bins >= 0], minlength=geometry.n_rbins).astype(float)


def _bin_band(geometry: Geometry, product: str) -> np.ndarray:
    if product == "map":
        return geometry.band[geometry.mask]
    edges = geometry.band_edges
    centres = np.arange(geometry.n_rbins) + 0.5
    return np.clip(np.searchsorted(edges, centres, side="right") - 1, 0, geometry.n_bands - 1)


def thin(counts: np.ndarray, rng: np.random.Generator, p: float = 0.5
         ) -> tuple[np.ndarray, np.ndarray]:
    """Binomial thinning: two independent Poisson frames with means p*mu and (1-p)*mu.

    For ``p = 1/2`` a pixel with ``x <= 31`` counts gets ``A`` = the number of set bits
    among ``x`` random bits, which is exactly Binomial(x, 1/2) and ~7x cheaper than
    ``rng.binomial``; larger counts fall back to ``rng.binomial``.
    """
    x = np.asarray(counts)
    if x.dtype.kind == "f":
        x = np.rint(x).astype(np.int64)
    if p != 0.5:
        a = rng.binomial(x, p)
        return a, x - a
    bits = rng.integers(0, 2**32, x.shape, dtype=np.uint32)
    small = np.minimum(x, 31).astype(np.uint32)
    keep = np.left_shift(np.uint32(1), small) - np.uint32(1)
    a = np.bitwise_count(np.bitwise_and(bits, keep, out=bits)).astype(x.dtype)
    big = x > 31
    if big.any():
        a[big] = rng.binomial(x[big], 0.5)
    return a, x - a


@dataclass
class Selection:
    """Result of cross-validated bandwidth selection, with a bias-variance error model.

    All error terms are measured at *half* the counts (one thinned half) and summed over
    the product bins of each radial band. For a fixed kernel the squared bias grows like
    the counts squared and the variance like the counts, so relative to the signal the
    squared error at ``scale`` times the accumulated counts is
    ``(bias2 + variance / (2 * scale)) / signal2``; :meth:`rel_error_at` uses this, with
    the kernel per band that the chi^2 criterion would pick at that count level.

    Attributes
    ----------
    product
        The product the bandwidths were chosen for.
    kernels
        Chosen :class:`Kernel` per radial band.
    band_edges
        Radii (px) of the band edges, ``len(kernels) + 1`` values.
    cv_score
        ``(n_candidates, n_bands)`` chi^2-weighted cross-validation score (lower is better).
    candidates
        The candidate kernels, in ``cv_score`` row order.
    rel_error_half
        Estimated relative RMS error of the product at *half* the counts (from the
        thinned halves), overall; NaN if it cannot be estimated (e.g. no counts).
    rel_error_half_bands
        Same, per band.
    speedup_half
        Cross-validated speed-up at equal chi^2-MSE of the chosen kernels over no
        smoothing, at *half* the counts: MSE_raw / MSE_chosen with the Poisson noise of
        the scoring half subtracted from both. NaN when ``Kernel.iso(0)`` is not a
        candidate or the estimate is not positive. Indicative only (difference of noisy
        sums).
    bias2, variance
        ``(n_candidates, n_bands)`` unweighted squared bias (clipped at 0; exactly 0 for
        no smoothing) and variance of the product, at half the counts. The variance is
        measured as half the squared difference of the two smoothed halves.
    bias2_chi2, variance_chi2
        The same, chi^2-weighted (used to pick the kernel at another count level).
    signal2
        Per band, sum of the squared mean product at half the counts (pilot estimate).
    present
        Bands that hold at least one scored bin.
    """

    product: str
    kernels: list[Kernel]
    band_edges: np.ndarray
    cv_score: np.ndarray
    candidates: list[Kernel]
    rel_error_half: float
    rel_error_half_bands: np.ndarray
    speedup_half: float = float("nan")
    bias2: np.ndarray | None = None
    variance: np.ndarray | None = None
    bias2_chi2: np.ndarray | None = None
    variance_chi2: np.ndarray | None = None
    signal2: np.ndarray | None = None
    present: np.ndarray | None = None

    def error_model(self, exposure: float = 1.0) -> ErrorModel | None:
        """The bias-variance :class:`ErrorModel` of this selection.

        Parameters
        ----------
        exposure
            Counting time of the counts the selection was made on (any unit; the model's
            times are in the same unit).

        Returns
        -------
        ErrorModel or None
            ``None`` when the error terms cannot be estimated (e.g. no counts).
        """
        if (self.bias2 is None or self.signal2 is None or not np.isfinite(self.rel_error_half)
                or not exposure > 0):
            return None
        p = self.present
        total = float(self.signal2[p].sum())
        if not total > 0:
            return None
        half = exposure / 2.0
        chosen = np.array([self.candidates.index(k) for k in self.kernels])[p]
        return ErrorModel(rel_bias2=self.bias2[:, p] / total,
                          rel_var_time=self.variance[:, p] / total * half,
                          chi2_bias2_rate=self.bias2_chi2[:, p] / half,
                          chi2_var=self.variance_chi2[:, p].copy(), chosen=chosen,
                          exposure=float(exposure))

    def rel_error_at(self, scale: float, *, chosen: bool = False) -> float:
        """Predicted relative RMS error of the product at ``scale`` x the current counts.

        ``chosen``: keep the kernels chosen now instead of the kernel the chi^2 criterion
        would pick at that count level. NaN when the error model is unavailable.
        """
        model = self.error_model(1.0)
        return float("nan") if model is None else model.rel_error(scale, chosen=chosen)

    def scale_to_target(self, target: float) -> float:
        """Count level (x the current counts) at which the error model meets ``target``.

        ``< 1`` when the target is already met; ``inf`` when it is never met on the model
        or the model is unavailable.
        """
        if not (np.isfinite(target) and target > 0):
            raise SmartbeamInputError(f"target={target!r}: expected a relative error > 0")
        model = self.error_model(1.0)
        return float("inf") if model is None else model.time_to_target(target)


@dataclass
class ErrorModel:
    """Relative error of the KDE product as a function of counting time (stationary sample).

    For a fixed kernel the squared bias grows like the counts squared and the variance
    like the counts, so relative to the squared signal the bias term is constant and the
    variance term falls as 1/T. At each time the kernel per band is the one the chi^2
    cross-validation criterion would pick there (chi^2 bias grows like T, chi^2 variance
    is constant). All arrays are ``(n_candidates, n_bands)`` over the bands with data.

    Attributes
    ----------
    rel_bias2
        Squared bias / total squared signal.
    rel_var_time
        Variance / total squared signal x time.
    chi2_bias2_rate
        chi^2-weighted squared bias / time.
    chi2_var
        chi^2-weighted variance.
    chosen
        Candidate index of the kernels chosen at ``exposure``, per band.
    exposure
        Time of the counts the model was measured on (the latest, when pooled).
    """

    rel_bias2: np.ndarray
    rel_var_time: np.ndarray
    chi2_bias2_rate: np.ndarray
    chi2_var: np.ndarray
    chosen: np.ndarray
    exposure: float

    def rel_error_time(self, time: float | np.ndarray, *, chosen: bool = False
                       ) -> float | np.ndarray:
        """Predicted relative RMS error after a total counting time ``time`` (> 0)."""
        t = np.atleast_1d(np.asarray(time, dtype=float))[:, None, None]
        if chosen:
            cols = np.arange(self.chosen.size)
            err = (self.rel_bias2[self.chosen, cols][None]
                   + self.rel_var_time[self.chosen, cols][None] / t[:, 0])
        else:
            pick = np.argmin(self.chi2_bias2_rate[None] * t + self.chi2_var[None], axis=1)
            b2 = np.take_along_axis(np.broadcast_to(self.rel_bias2, (t.shape[0],)
                                                    + self.rel_bias2.shape),
                                    pick[:, None, :], axis=1)[:, 0]
            v = np.take_along_axis(np.broadcast_to(self.rel_var_time, (t.shape[0],)
                                                   + self.rel_var_time.shape),
                                   pick[:, None, :], axis=1)[:, 0]
            err = b2 + v / t[:, 0]
        rel = np.sqrt(err.sum(axis=1))
        return rel if np.ndim(time) else float(rel[0])

    def rel_error(self, scale: float, *, chosen: bool = False) -> float:
        """:meth:`rel_error_time` at ``scale`` x ``exposure``."""
        return float(self.rel_error_time(scale * self.exposure, chosen=chosen))

    def time_to_target(self, target: float) -> float:
        """Total counting time at which the predicted relative error meets ``target``.

        Returns
        -------
        float
            In the unit of ``exposure``; ``inf`` if never met on the model.
        """
        if not (np.isfinite(target) and target > 0):
            raise SmartbeamInputError(f"target={target!r}: expected a relative error > 0")
        log_t = np.log(self.exposure) + np.arange(-10.0, 30.0, 0.02) * np.log(2.0)
        rel = self.rel_error_time(np.exp(log_t))
        hit = np.flatnonzero(rel <= target)
        if hit.size == 0:
            return float("inf")
        i = int(hit[0])
        if i == 0:
            return float(np.exp(log_t[0]))
        # log-log interpolation between the grid points around the crossing
        y0, y1 = np.log(rel[i - 1]), np.log(rel[i])
        f = (y0 - np.log(target)) / (y0 - y1) if y0 != y1 else 1.0
        return float(np.exp(log_t[i - 1] + f * (log_t[i] - log_t[i - 1])))

    @classmethod
    def pooled(cls, models: Sequence[ErrorModel]) -> ErrorModel:
        """Average of models of one stationary sample, weighted by their exposure.

        Each model's terms are count-independent on a stationary sample, so averaging the
        models of successive emits (independent random halvings, more counts) lowers the
        noise of the prediction; later models, measured on more counts, weigh more.
        Models of another shape than the last one (another geometry or candidate list)
        are left out. See :class:`ErrorModelPool` for the same average kept as a count
        goes on.
        """
        models = [m for m in models if m is not None]
        if not models:
            raise SmartbeamInputError("no error model to pool: expected at least one")
        shape = models[-1].rel_bias2.shape
        pool = ErrorModelPool()
        for m in models:
            if m.rel_bias2.shape == shape:
                pool.add(m)
        return pool.pooled()


class ErrorModelPool:
    """Running exposure-weighted average of the :class:`ErrorModel` of successive emits.

    Keeps the weighted sums of the models' terms, not the models: memory and the cost
    of :meth:`pooled` stay the same however many emits a count makes (a list of models
    grew by ~10 kB per emit and was averaged whole at each one). A model of another
    shape than the previous one (another geometry or candidate list) starts a new pool.
    """

    _TERMS = ("rel_bias2", "rel_var_time", "chi2_bias2_rate", "chi2_var")

    def __init__(self) -> None:
        self._weight = 0.0
        self._sums: dict[str, np.ndarray] = {}
        self.last: ErrorModel | None = None
        self.n_models = 0

    def __bool__(self) -> bool:
        return self.last is not None

    def add(self, model: ErrorModel | None) -> None:
        """Add one emit's model (``None`` is ignored), weighted by its exposure."""
        if model is None:
            return
        if self.last is None or model.rel_bias2.shape != self.last.rel_bias2.shape:
            self._weight, self.n_models = 0.0, 0
            self._sums = {n: np.zeros(getattr(model, n).shape) for n in self._TERMS}
        w = float(model.exposure)
        self._weight += w
        for n in self._TERMS:
            self._sums[n] += w * getattr(model, n)
        self.last = model
        self.n_models += 1

    def pooled(self) -> ErrorModel:
        """The pooled :class:`ErrorModel` (chosen kernels and exposure of the last one)."""
        if self.last is None:
            raise SmartbeamInputError("no error model to pool: expected at least one")
        terms = [self._sums[n] / self._weight for n in self._TERMS]
        return ErrorModel(*terms, self.last.chosen.copy(), self.last.exposure)


# score (and error terms) of candidates a coarse-to-fine search did not evaluate: finite,
# so that averaging models never meets 0 * inf, and far above any real score
_UNSCORED = 1e30


class _SearchPlan:
    """Grid structure of a candidate list for the coarse-to-fine search.

    Isotropic kernels form a line (sorted by sigma), ring kernels a grid
    (sigma_q x sigma_ring); neighbours are the adjacent grid points.
    """

    def __init__(self, candidates: Sequence[Kernel]) -> None:
        self.candidates = list(candidates)
        self.iso = sorted({k.sigma_q for k in candidates if k.kind == "iso"})
        self.qs = sorted({k.sigma_q for k in candidates if k.kind == "ring"})
        self.rs = sorted({k.sigma_ring for k in candidates if k.kind == "ring"})
        self.pos = [self._pos(k) for k in self.candidates]
        self.at = {p: c for c, p in enumerate(self.pos)}

    def _pos(self, k: Kernel) -> tuple:
        if k.kind == "iso":
            return ("iso", self.iso.index(k.sigma_q))
        return ("ring", self.qs.index(k.sigma_q), self.rs.index(k.sigma_ring))

    def coarse(self) -> list[int]:
        """Every third isotropic sigma (and the largest), the four corner ring kernels,
        the first candidate and no smoothing."""
        n = len(self.iso)
        iso = set(range(0, n, 3)) | {n - 1} if n else set()
        corners = {(i, j) for i in {0, len(self.qs) - 1} for j in {0, len(self.rs) - 1}}
        picks = {self.at[("iso", i)] for i in iso if ("iso", i) in self.at}
        picks |= {self.at[("ring", i, j)] for i, j in corners if ("ring", i, j) in self.at}
        picks.add(0)
        if Kernel.iso(0) in self.candidates:
            picks.add(self.candidates.index(Kernel.iso(0)))
        return sorted(picks)

    def neighbours(self, c: int) -> list[int]:
        """Candidates adjacent to ``c`` on its grid."""
        p = self.pos[c]
        if p[0] == "iso":
            near = [("iso", p[1] - 1), ("iso", p[1] + 1)]
        else:
            near = [("ring", p[1] + d, p[2]) for d in (-1, 1)]
            near += [("ring", p[1], p[2] + d) for d in (-1, 1)]
        return [self.at[q] for q in near if q in self.at]


def _nbytes(v) -> int:
    if isinstance(v, dict):
        return sum(_nbytes(a) for a in v.values() if a is not None)
    return int(v.nbytes)


def select_bandwidths(counts: np.ndarray, geometry: Geometry, *, product: str = "map",
                      candidates: Sequence[Kernel] = DEFAULT_CANDIDATES, n_splits: int = 1,
                      rng: np.random.Generator | int | None = None,
                      max_score_pixels: int | None = 65536, search: str = "auto",
                      ) -> Selection:
    """Choose a kernel per radial band by cross-validation on binomially thinned halves.

    Each random halving ``A + B = X`` is used both ways (smooth A, score against B, and
    vice versa: two-fold CV); half the squared difference of the two smoothed halves
    measures each candidate's variance, which splits the CV error into bias and variance
    (:class:`Selection` error model).

    Parameters
    ----------
    counts
        Accumulated raw counts (integers, or floats holding integers).
    geometry
        :class:`Geometry` of the detector.
    product
        ``"map"`` (2-D map, chi^2-weighted per pixel), ``"sector"`` or ``"radial"``
        (1-px radial bins weighted by their raw variance). For the 1-D products a band
        holds only a few bins, so its CV score is noisy: each band's kernel is chosen on
        its score plus half those of the adjacent bands (:func:`pool_adjacent_bands`).
    candidates
        Kernels to try; should include ``Kernel.iso(0)`` (no smoothing). Repeats are
        dropped (the result's ``candidates`` keeps the first of each).
    n_splits
        Number of independent random halvings averaged (reduces CV noise); each costs
        two smoothings per candidate.
    rng
        Random generator or seed for the thinning.
    max_score_pixels
        For the ``"map"`` product, score the candidates on at most this many valid
        pixels (whole detector rows, :meth:`Geometry.score_rows`; all of them on small
        detectors). The kernels are then evaluated at those pixels only
        (:class:`~smartbeam.analysis.kde_score.RowScorer`; ring kernels on
        :attr:`Geometry.score_grid`). ``None``: every valid pixel.
    search
        ``"full"``: score every candidate. ``"coarse"``: score a coarse subset (every
        third isotropic sigma, the corner ring kernels, always no smoothing), then, per
        band, the grid neighbours of the band's best until no band's best has an
        unscored neighbour (hill climbing on the bias-variance curve). ``"auto"``:
        coarse on detectors with more than 65,536 valid pixels, full otherwise.
        Unscored candidates get a score of 1e30, so they are never chosen; no smoothing
        is always scored, which keeps the choice never worse than raw data.

    Returns
    -------
    Selection
    """
    if product not in PRODUCTS:
        raise SmartbeamInputError(f"product={product!r}: expected one of {PRODUCTS}")
    if n_splits < 1:
        raise SmartbeamInputError(f"n_splits={n_splits!r}: expected >= 1")
    candidates = list(dict.fromkeys(candidates))  # a repeated kernel is scored once
    if not candidates:
        raise SmartbeamInputError("candidates is empty: expected at least one Kernel")
    if search not in ("auto", "full", "coarse"):
        raise SmartbeamInputError(f"search={search!r}: expected 'auto', 'full' or 'coarse'")
    x = validate_frame(counts, geometry.shape, "counts")
    rng = np.random.default_rng(rng)
    rows, idx = geometry.score_rows(max_score_pixels) if product == "map" else (None, None)
    # scored rows only: candidates are evaluated on those rows, not on the whole frame
    scorer = None if rows is None else geometry.row_scorer(max_score_pixels)
    if scorer is not None:
        idx = scorer.idx  # the same pixels, ordered by band
    if search == "auto":
        search = "coarse" if geometry._n_valid > 65536 else "full"
    plan = _SearchPlan(candidates)

    def profile(frame: np.ndarray) -> np.ndarray:
        return frame.ravel()[idx] if idx is not None else product_profile(frame, geometry,
                                                                         product)

    # chi^2 weights from a pilot estimate, floored so empty regions do not dominate
    first = None  # the first split's halves when drawn for the pilot
    if scorer is None:
        pilot, _ = smooth(x, geometry, Kernel.iso(2.0))
        pilot_at = profile(pilot)
        pilot_mean = float(pilot[geometry.mask].mean())
    else:
        # at the scored pixels only (their mean stands for the frame's: a random row set)
        if x.dtype.kind in "iub":
            # integer counts: the first split is drawn now and the pilot smooths the sum
            # of its halves (exactly the masked counts in float32 below 2^24 per pixel),
            # which saves a converted copy of the frame (~0.8 ms at 1024^2); the thinning
            # draws from rng as it would below
            first = thin_masked(x, geometry, rng, out=(geometry.scratch(2),
                                                       geometry.scratch(3)))
            pilot_at = scorer.iso(first[0], [2.0], frame2=first[1])[0]
        else:
            pilot_at = scorer.iso(geometry.masked32(x, slot=0), [2.0])[0]
        pilot_mean = float(pilot_at.mean())
    floor = max(0.05 * pilot_mean, 1e-12)
    n_bands = geometry.n_bands
    n_ok = None
    if scorer is not None:
        # one pixel per bin: the same terms as below from one pass (pilot_terms)
        band_of = scorer.band_of  # cached with its runs of equal bands
        ok, weight, sig2_split, n_ok = pilot_terms(pilot_at, floor, band_of, n_bands)
    else:
        pilot_p = np.maximum(pilot_at, floor).astype(np.float64)
        # the signal (for relative errors) from the unfloored pilot
        pilot_signal = np.maximum(pilot_at, 0.0).astype(np.float64)
        if idx is not None:
            nb = np.ones(idx.size)
            band_of = geometry.band.ravel()[idx]
        else:
            nb = _bin_counts(geometry, product)
            band_of = _bin_band(geometry, product)
        ok = np.isfinite(pilot_p) & (nb > 0)
        nb_safe = np.where(nb > 0, nb, 1.0)
        # raw variance of each product bin per unit pilot density: mu / N_bin
        weight = np.where(ok, nb / np.where(ok, pilot_p, 1.0), 0.0)
        sig2_split = np.bincount(band_of, weights=np.where(ok, (pilot_signal / 2) ** 2, 0.0),
                                 minlength=n_bands)
    shape = (len(candidates), n_bands)
    score, mse, var, var_w = (np.zeros(shape) for _ in range(4))
    sig2 = np.zeros(n_bands)
    chi2_noise = np.zeros(n_bands)
    polar = geometry.polar

    def band_sum(values: np.ndarray) -> np.ndarray:
        return np.bincount(band_of, weights=values, minlength=n_bands)

    # (read back from the polar cells by ring_values: the path without a row scorer)
    scored_cells = polar.cell.ravel()[idx] if idx is not None and scorer is None else None
    splits = []
    for s_ in range(n_splits):
        if s_ == 0 and first is not None:
            h32 = list(first)
        else:
            h32 = list(thin_masked(x, geometry, rng, out=(geometry.scratch(2 + 2 * s_),
                                                           geometry.scratch(3 + 2 * s_))))
        if scorer is not None:
            *prof, raw_a, raw_b, noise, chi2 = split_terms(*h32, idx, ok, weight, band_of,
                                                            n_bands)
            raw = [raw_a, raw_b]
            chi2_noise += chi2
        else:
            prof = [profile(h) for h in h32]
            raw = [np.where(ok, p_.astype(np.float64), 0.0) for p_ in prof]
            # Poisson variance of one half's bin, estimated by its own (unbiased) counts
            noise = np.where(ok, 0.5 * (raw[0] + raw[1]) / nb_safe, 0.0)
            chi2_noise += band_sum(noise * weight)
        sig2 += sig2_split
        # ring kernels: one FFT along the ring per half, one inverse per sigma_ring, shared
        # by every sigma_q (the candidates come grouped by sigma_ring)
        splits.append({"h32": h32, "prof": prof, "raw": raw, "noise": noise,
                       "cells": [None, None],
                       "spectra": [None, None], "ring_done": {}})

    def ring_grid(sp: dict, j: int, sigma_ring: float) -> np.ndarray | dict:
        """Polar cells of half ``j`` filtered along the ring (cached per search); with the
        row scorer, ``{"grid": MultiRingGrid}`` (``None`` once every sigma_q of the
        sigma_ring is scored: :func:`fill_values`).
        """
        cells, spectra = sp["cells"], sp["spectra"]
        if cells[j] is None:
            cells[0], cells[1] = (bin_cells(*sp["h32"], polar) if scorer is None
                                  else scorer.bin_halves(*sp["h32"]))
        key = (j, sigma_ring)
        if key not in sp["ring_done"]:
            # keep ring-filtered grids for later search stages while they fit in ~100 MB
            held = sum(_nbytes(v) for v in sp["ring_done"].values())
            while sp["ring_done"] and held + cells[j].nbytes > 100e6:
                held -= _nbytes(sp["ring_done"].pop(next(iter(sp["ring_done"]))))
            if sigma_ring > 0 and spectra[j] is None:
                spectra[j] = (sfft.rfft(cells[j], axis=1) if scorer is None
                              else scorer.ring_spectrum(cells[j]))
            if scorer is not None:
                # the grid, kept for the sigma_q of later search stages (each costs a
                # pass over the q windows: computed when a stage scores it)
                grid = {"grid": scorer.ring_grid(spectra[j], cells[j], sigma_ring)}
            elif sigma_ring > 0:
                grid = polar.filter_ring(spectra[j], sigma_ring)
            else:
                grid = cells[j]
            sp["ring_done"][key] = grid
        return sp["ring_done"][key]

    n_q = {sr: len({k.sigma_q for k in candidates if k.kind == "ring" and k.sigma_ring == sr})
           for sr in {k.sigma_ring for k in candidates if k.kind == "ring"}}

    def ring_values(sp: dict, j: int, kern: Kernel) -> np.ndarray:
        cell_val = polar.filter_q(ring_grid(sp, j, kern.sigma_ring), kern.sigma_q)
        inv = polar.inv_den(kern.sigma_q, kern.sigma_ring)
        if idx is not None:
            # only the scored pixels are read back from the polar cells
            return cell_val.ravel()[scored_cells] * inv.ravel()[scored_cells]
        return profile(polar.to_pixels(cell_val * inv))

    def half_values(sp: dict, j: int, todo: Sequence[int]) -> dict[int, np.ndarray]:
        """Product values of every candidate in ``todo`` smoothed from half ``j`` (the
        path without a row scorer; :func:`fill_values` with one)."""
        h = sp["h32"][j]
        vals: dict[int, np.ndarray] = {}
        iso = [c for c in todo if candidates[c].kind == "iso" and candidates[c].sigma_q > 0]
        for c in todo:
            if candidates[c].kind == "iso" and candidates[c].sigma_q <= 0:
                vals[c] = sp["prof"][j]
        for c in iso:
            vals[c] = profile(geometry.iso_filter(candidates[c].sigma_q).apply(h))
        # ring candidates grouped by sigma_ring: one inverse FFT per sigma_ring, shared
        # by every sigma_q
        ring: dict[float, list[int]] = {}
        for c in todo:
            if candidates[c].kind == "ring":
                ring.setdefault(candidates[c].sigma_ring, []).append(c)
        for _, cs in sorted(ring.items()):
            for c in cs:
                vals[c] = ring_values(sp, j, candidates[c])
        return vals

    ring_qs_done: dict[tuple[int, float], set] = {}

    def fill_values(sp: dict, part: Sequence[int], est: np.ndarray) -> None:
        """Row scorer: the values of the candidates ``part`` smoothed from each half,
        written into ``est[j, i]`` (``part`` ordered by :func:`evaluate`:
        the ring kernels of a sigma_ring in adjacent rows, one pass for both halves)."""
        at = {c: i for i, c in enumerate(part)}
        iso = [c for c in part if candidates[c].kind == "iso" and candidates[c].sigma_q > 0]
        for c in part:
            if candidates[c].kind == "iso" and candidates[c].sigma_q <= 0:
                est[0, at[c]] = sp["prof"][0]
                est[1, at[c]] = sp["prof"][1]
        if iso:
            sig = [candidates[c].sigma_q for c in iso]
            for j in (0, 1):
                scorer.iso(sp["h32"][j], sig, out=[est[j, at[c]] for c in iso])
        ring: dict[float, list[int]] = {}
        for c in part:
            if candidates[c].kind == "ring":
                ring.setdefault(candidates[c].sigma_ring, []).append(c)
        for sr, cs in sorted(ring.items()):
            i0 = at[cs[0]]
            ga, gb = ring_grid(sp, 0, sr), ring_grid(sp, 1, sr)
            qs = [candidates[c].sigma_q for c in cs]
            scorer.ring_at_pair(ga["grid"], gb["grid"], qs,
                                out=(est[0, i0:i0 + len(cs)], est[1, i0:i0 + len(cs)]))
            done = ring_qs_done.setdefault((id(sp), sr), set())
            done.update(qs)
            if len(done) == n_q[sr]:
                ga["grid"] = gb["grid"] = None  # every sigma_q done: the grids can go

    # candidates per block: bounds the memory of the stacked values (~4M bins per block)
    block = max(1, 4_000_000 // max(band_of.size, 1))
    runs = scorer.runs[1:] if scorer is not None else None

    def evaluate(todo: Sequence[int]) -> None:
        todo = list(todo)
        for start in range(0, len(todo), block):
            part = todo[start:start + block]
            if scorer is not None:
                # the ring kernels of a sigma_ring in adjacent rows (the scores of a
                # candidate do not depend on its row)
                part = sorted(part, key=lambda c: (candidates[c].kind == "ring",
                                                   candidates[c].sigma_ring, c))
            rows_ = np.array(part)
            for sp in splits:
                raw, noise = sp["raw"], sp["noise"]
                if scorer is not None:
                    est = np.empty((2, len(part), band_of.size), np.float32)
                    fill_values(sp, part, est)
                else:
                    both = [half_values(sp, j, part) for j in (0, 1)]
                    est = [np.stack([both[j][c] for c in part]) for j in (0, 1)]
                # two-fold CV: each smoothed half scored against the other raw half;
                # E (est_A - est_B)^2 / 2 = Var(est) of one half (A, B independent); the
                # mse term is unbiased for E(est - mu/2)^2 (the raw half's Poisson
                # variance subtracted)
                sums = cv_band_sums(est[0], est[1], raw[0], raw[1], noise, weight, ok,
                                    band_of, n_bands, runs=runs)
                score[rows_] += sums[0]
                mse[rows_] += sums[1]
                var[rows_] += sums[2]
                var_w[rows_] += sums[3]

    if search == "full":
        evaluate(range(len(candidates)))
        scored = np.ones(len(candidates), bool)
    else:
        scored = np.zeros(len(candidates), bool)
        todo = plan.coarse()
        while todo:
            evaluate(todo)
            scored[todo] = True
            best_now = np.argmin(np.where(scored[:, None], score, np.inf), axis=0)
            todo = sorted({n for c in set(best_now.tolist()) for n in plan.neighbours(c)
                           if not scored[n]})
        for arr in (score, mse, var, var_w):
            arr[~scored] = _UNSCORED * n_splits
    for arr in (score, mse, var, var_w, sig2, chi2_noise):
        arr /= n_splits
    present = (n_ok if n_ok is not None else np.bincount(band_of[ok], minlength=n_bands)) > 0
    best = np.argmin(score if product == "map" else pool_adjacent_bands(score, present),
                     axis=0)
    kernels = [candidates[int(best[b])] if present[b] else candidates[0] for b in range(n_bands)]
    mse_best = np.maximum(mse[best, np.arange(n_bands)], 0.0)
    # bias^2 = MSE - variance (no smoothing is unbiased by construction). The MSE
    # estimate carries the noise of the raw half, (B - mu/2)^2 - B, common to every kernel
    # of a band: clipped at 0 it acts as a small bias floor, which makes predictions for
    # targets far below the current error conservative (counting longer, never beyond
    # what raw data would need). A soft threshold at that noise was tried and undershot.
    bias2 = np.maximum(mse - var, 0.0)
    bias2_w = np.maximum(score - chi2_noise[None, :] - var_w, 0.0)
    for c, kern in enumerate(candidates):
        if kern == Kernel.iso(0):
            bias2[c] = 0.0
            bias2_w[c] = 0.0
    # unscored candidates: never picked by the error model either
    bias2[~scored] = _UNSCORED
    bias2_w[~scored] = _UNSCORED
    with np.errstate(invalid="ignore", divide="ignore"):
        rel_bands = np.where(sig2 > 0, np.sqrt(mse_best / sig2), np.nan)
        total = sig2[present].sum()
        rel = float(np.sqrt(mse_best[present].sum() / total)) if total > 0 else float("nan")
    # no counts: the pilot, hence sig2 and ``total``, are exactly 0 and rel is NaN above
    # (a full-frame x.any() pass here measured ~0.3 ms at 1024^2 for the same answer)
    speedup = float("nan")
    if Kernel.iso(0) in candidates and rel == rel:
        none = candidates.index(Kernel.iso(0))
        chosen = np.array([candidates.index(k) for k in kernels])
        noise = chi2_noise[present].sum()
        raw_err = score[none, present].sum() - noise
        est_err = score[chosen[present], np.flatnonzero(present)].sum() - noise
        if raw_err > 0 and est_err > 0:
            speedup = float(raw_err / est_err)
    return Selection(product, kernels, geometry.band_edges.copy(), score, candidates, rel,
                     rel_bands, speedup, bias2, var, bias2_w, var_w, sig2, present)


def pool_adjacent_bands(score: np.ndarray, present: np.ndarray,
                        weight: float = 0.5) -> np.ndarray:
    """CV scores of each band plus ``weight`` times those of its adjacent bands.

    A sector or radial average has only a few 1-px bins per band, so a band's own CV
    score is noisy and the per-band argmin often picks a kernel that is wrong for that
    band; the best bandwidth changes slowly with the radius, so the neighbours' scores
    steady the choice. Since no smoothing is scored in every band, the chosen kernel is
    never worse than raw data on the pooled (three-band) CV score. Measured paired on
    identical draws of the simulated patterns (20 per case, 1-300 scans): the error of
    the 1-D products fell in every case against no pooling, by 1.25-2.5x for sector
    averages and 1.07-1.5x for radial averages; ``weight`` 0.5 was taken over 1 on the
    anisotropic sector average. Maps are not pooled: their bands hold thousands of
    pixels, and pooled choices were worse there (e.g. 25x -> 19x at 100 scans of the
    realistic pattern, 10x -> 5x of the sharp one, same draws).

    Parameters
    ----------
    score
        ``(n_candidates, n_bands)`` CV scores (lower is better).
    present
        Boolean ``(n_bands,)``: bands with bins; absent bands lend nothing.
    weight
        Weight of each adjacent band's score.

    Returns
    -------
    numpy.ndarray
        The pooled scores, same shape as ``score``.
    """
    lend = np.where(np.asarray(present, bool)[None, :], score, 0.0) * weight
    pooled = np.array(score, dtype=float, copy=True)
    pooled[:, 1:] += lend[:, :-1]
    pooled[:, :-1] += lend[:, 1:]
    return pooled


@dataclass
class KDEResult:
    """A smoothed frame with everything needed to use it correctly.

    Attributes
    ----------
    smoothed
        Estimated mean counts per pixel of the accumulated frame (0 outside ``mask``).
    variance
        Poisson variance of each smoothed pixel (0 outside ``mask``), or ``None`` when
        it was not asked for. Pixels are correlated through the kernel: this is the
        diagonal only.
    mask
        Valid pixels.
    kernels
        Kernel per radial band; ``band_edges`` gives the bands (px from the beam centre).
    band_edges
        Band edge radii, px.
    product
        Product the kernels were chosen for.
    rel_error
        Predicted relative RMS error of the product at the full counts (NaN if unknown).
    selection
        The :class:`Selection` behind the kernels, if any.
    correlated
        Always True: a reminder that smoothed pixels are not independent.
    """

    smoothed: np.ndarray
    variance: np.ndarray | None
    mask: np.ndarray
    kernels: list[Kernel]
    band_edges: np.ndarray
    product: str
    rel_error: float = float("nan")
    selection: Selection | None = None
    correlated: bool = field(default=True)

    def kernel_description(self) -> str:
        """One line per band: ``r=[0,8)px: iso(sigma=1px)``; plus the correlation warning."""
        lines = [f"r=[{self.band_edges[i]:g},{self.band_edges[i + 1]:g})px: {k.describe()}"
                 for i, k in enumerate(self.kernels)]
        lines.append("smoothed pixels are correlated (masked normalised Gaussian KDE); "
                     "variance is the per-pixel diagonal only")
        return "; ".join(lines)

    @property
    def sigma_q_bands(self) -> np.ndarray:
        """Radial (q) bandwidth per band, px."""
        return np.array([k.sigma_q for k in self.kernels])

    @property
    def sigma_ring_bands(self) -> np.ndarray:
        """Along-ring bandwidth per band, px (equal to sigma_q for isotropic kernels)."""
        return np.array([k.sigma_ring for k in self.kernels])


def apply_kernels(counts: np.ndarray, geometry: Geometry, kernels: Sequence[Kernel], *,
                  backend: str = "cv2", variance: bool = True,
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Smooth with a kernel per radial band.

    Parameters
    ----------
    counts
        Accumulated raw counts.
    geometry
        :class:`Geometry` of the detector.
    kernels
        One :class:`Kernel` per band of ``geometry``.
    backend
        ``"cv2"`` (float32, fast) or ``"scipy"`` (float64 reference, isotropic only).
    variance
        Also compute the variance map (one more convolution per distinct kernel),
        with the estimate itself as the Poisson density.

    Returns
    -------
    smoothed, variance
        float32 maps for ``"cv2"``; ``variance`` is ``None`` when not asked for.
    """
    if len(kernels) != geometry.n_bands:
        raise SmartbeamInputError(f"{len(kernels)} kernels given: expected one per band "
                                  f"({geometry.n_bands})")
    if backend != "cv2":
        return _apply_kernels_reference(counts, geometry, kernels, backend, variance)
    masked = geometry.masked32(counts, slot=0)
    regions = geometry.kernel_regions(kernels)
    if len(regions) == 1 and regions[0][0].kind == "iso" and regions[0][0].sigma_q > 0:
        # one kernel everywhere: the whole frame, no per-band copies
        f = geometry.iso_filter(regions[0][0].sigma_q)
        out = f.apply(masked)
        # the estimate is already 0 outside the mask: it is its own masked density
        var = f.variance(np.maximum(out, 0.0)) if variance else None
        return out, var
    out = np.zeros(geometry.shape, np.float32)
    var = np.zeros(geometry.shape, np.float32) if variance else None
    for kern, reg in regions:
        if kern.kind == "iso" and kern.sigma_q <= 0:
            np.copyto(out, masked, where=reg.sel_full)
            if variance:
                np.copyto(var, masked, where=reg.sel_full)
        elif kern.kind == "iso":
            _apply_iso_region(geometry.iso_filter(kern.sigma_q), masked, reg, out, var,
                              (geometry.scratch(_ISO_SLOTS[0]), geometry.scratch(_ISO_SLOTS[1])))
        else:
            if coarse_n_phi(geometry.polar.n_r, geometry.polar.n_phi, kern.sigma_ring):
                _apply_ring_region_coarse(geometry, counts, kern, reg, out, var)
            else:
                _apply_ring_region(geometry, counts, kern, reg, out, var)
    return out, var


# geometry work frames of the isotropic windows of an emit (apart from those that
# masked32 and the selection use): fresh multi-MB outputs cost their page faults per emit
_ISO_SLOTS = (16, 17)


def _apply_iso_region(f: IsoFilter, masked: np.ndarray, reg: _Region, out: np.ndarray,
                      var: np.ndarray | None, work: tuple | None = None) -> None:
    """Smooth only the bounding box of the bands served by ``f`` (+ kernel radius).

    The kernel is truncated at ``radius``, so a pixel depends only on inputs within it:
    the result in the box is exactly the full-frame result. The variance needs the
    estimate itself (its Poisson density) one radius further out.
    """
    ny, nx = masked.shape
    rad = f.radius
    pad = 2 * rad if var is not None else rad
    (y0, y1), (x0, x1) = reg.box
    ys = slice(max(y0 - pad, 0), min(y1 + pad, ny))
    xs = slice(max(x0 - pad, 0), min(x1 + pad, nx))
    inner = (slice(y0 - ys.start, y1 - ys.start), slice(x0 - xs.start, x1 - xs.start))
    shape = (ys.stop - ys.start, xs.stop - xs.start)
    dst = [None, None] if work is None else [w.reshape(-1)[:shape[0] * shape[1]].reshape(shape)
                                             for w in work]
    sm = f.apply_window(masked, ys, xs, dst=dst[0])
    box = (slice(y0, y1), slice(x0, x1))
    np.copyto(out[box], sm[inner], where=reg.sel_box)
    if var is not None:
        v = f.variance_window(np.maximum(sm, 0.0, out=sm), ys, xs, dst=dst[1])
        np.copyto(var[box], v[inner], where=reg.sel_box)


def _apply_ring_region_coarse(geometry: Geometry, counts: np.ndarray, kern: Kernel,
                              reg: _Region, out: np.ndarray, var: np.ndarray | None) -> None:
    """:func:`_apply_ring_region` of a wide ring kernel on coarser azimuthal grids, one
    per group of radii (:mod:`.kde_emit`), interpolated along the ring to the pixels.

    ``counts`` is read as given (masked pixels are skipped by the binning): no float32
    copy of the frame is needed for the ring bands.
    """
    # one plan serves both kinds of emit (a plan takes ~1 s to build at 2048^2)
    if reg.coarse is None or reg.coarse[0] != kern:
        reg.coarse = (kern, RingEmitPlan(geometry.polar, reg.rows, reg.sel_full, kern.sigma_q,
                                         kern.sigma_ring, geometry._emit_work))
    reg.coarse[1].emit(counts, out, var)


def _apply_ring_region(geometry: Geometry, counts: np.ndarray, kern: Kernel, reg: _Region,
                       out: np.ndarray, var: np.ndarray | None) -> None:
    """Ring kernel on the polar rows (radii) of its bands only (+ the q-kernel radius).

    Rows are filtered independently along the ring, and the q kernel is truncated, so the
    rows of the bands get exactly the full-grid result. The rows are those within two q
    radii of the bands with or without the variance (one
    :class:`~smartbeam.analysis.kde_emit.CellEmitPlan` serves both kinds of emit), and
    the grid is normalised at the pixels only (it has ~3x more cells than the region's
    pixels at 2048^2).
    """
    polar = geometry.polar
    rad = (gaussian_kernel_1d(kern.sigma_q).size // 2) if kern.sigma_q > 0 else 0
    r0, r1 = reg.rows
    a, b = max(r0 - 2 * rad, 0), min(r1 + 2 * rad, polar.n_r)
    inv = polar.inv_den(kern.sigma_q, kern.sigma_ring)[a:b]
    if reg.inv_px is None or reg.inv_px[0] != (kern, a, b):
        reg.inv_px = ((kern, a, b), CellEmitPlan(polar, (a, b), reg.sel_full, inv,
                                                         geometry._emit_work))
    plan = reg.inv_px[1]
    val = polar.filter_cells_cv(plan.bin(counts), kern.sigma_q, kern.sigma_ring, first_row=a,
                                work=plan.work)
    plan.to_pixels(val, out)
    if var is not None:
        # the density of each cell: the estimate times the valid pixels in it (over val:
        # the estimate is already at the pixels)
        dens = plan.density(val, inv, polar.n_cell[a:b])
        v = polar.filter_cells_cv(dens, kern.sigma_q, kern.sigma_ring, squared=True,
                                  first_row=a, work=plan.work)
        plan.to_pixels(v, var, squared=True)


def _apply_kernels_reference(counts, geometry, kernels, backend, variance):
    """Full-frame reference path of :func:`apply_kernels` (scipy backend)."""
    distinct = list(dict.fromkeys(kernels))
    lut = np.array([distinct.index(k) for k in kernels] + [-1], np.int16)
    which = lut[geometry.band]
    out = np.zeros(geometry.shape)
    var = np.zeros(geometry.shape) if variance else None
    for j, kern in enumerate(distinct):
        sm, _ = smooth(counts, geometry, kern, backend=backend)
        sel = which == j
        np.copyto(out, sm, where=sel)
        if variance:
            v = smooth(counts, geometry, kern, density=np.maximum(sm, 0.0), backend=backend)[1]
            np.copyto(var, v, where=sel)
    return out, var


def kde_estimate(counts: np.ndarray, geometry: Geometry, *, product: str = "map",
                 candidates: Sequence[Kernel] = DEFAULT_CANDIDATES, n_splits: int = 1,
                 rng: np.random.Generator | int | None = None,
                 kernels: Sequence[Kernel] | None = None,
                 variance: bool = True) -> KDEResult:
    """Select bandwidths (unless ``kernels`` is given) and smooth the counts.

    Parameters
    ----------
    counts
        Accumulated raw counts.
    geometry
        :class:`Geometry` of the detector.
    product
        ``"map"``, ``"sector"`` or ``"radial"``.
    candidates, n_splits, rng
        Passed to :func:`select_bandwidths`.
    kernels
        Fixed kernels per band (skips the selection), e.g. ``[Kernel.iso(1)] * n_bands``.
    variance
        Compute the variance map (``KDEResult.variance`` is ``None`` otherwise).

    Returns
    -------
    KDEResult
    """
    x = validate_frame(counts, geometry.shape, "counts")
    sel = None
    rel = float("nan")
    if kernels is None:
        sel = select_bandwidths(x, geometry, product=product, candidates=candidates,
                                n_splits=n_splits, rng=rng)
        kernels = sel.kernels
        # bias-variance model of the chosen kernels, from half to the full counts
        rel = sel.rel_error_at(1.0, chosen=True)
    sm, var = apply_kernels(x, geometry, list(kernels), variance=variance)
    return KDEResult(sm, var, geometry.mask, list(kernels), geometry.band_edges.copy(),
                     product, rel, sel)


def predict_time_to_target(times: Sequence[float], rel_errors: Sequence[float],
                           target: float, *, max_points: int = 8) -> float:
    """Predict the counting time at which the relative error reaches ``target``.

    Fits ``rel = a * t**(-beta)`` (least squares in log-log) to the most recent points,
    with beta clipped to [0.25, 1]; a single point assumes the Poisson rate beta = 1/2.

    Parameters
    ----------
    times
        Counting times (or exposures) at which errors were estimated, increasing.
    rel_errors
        Estimated relative errors at those times (non-finite values are ignored).
    target
        Target relative error (> 0).
    max_points
        Use at most this many of the latest points.

    Returns
    -------
    float
        Predicted total time (same unit as ``times``); ``inf`` if no usable point.
    """
    if not (np.isfinite(target) and target > 0):
        raise SmartbeamInputError(f"target={target!r}: expected a relative error > 0")
    t = np.asarray(times, dtype=float)
    e = np.asarray(rel_errors, dtype=float)
    if t.shape != e.shape:
        raise SmartbeamInputError(f"times ({t.shape}) and rel_errors ({e.shape}): expected "
                                  "the same length")
    ok = np.isfinite(t) & np.isfinite(e) & (t > 0) & (e > 0)
    t, e = t[ok][-max_points:], e[ok][-max_points:]
    if t.size == 0:
        return float("inf")
    if t.size == 1 or np.ptp(np.log(t)) < 1e-9:
        beta, log_a = 0.5, np.log(e[-1]) + 0.5 * np.log(t[-1])
    else:
        slope, log_a = np.polyfit(np.log(t), np.log(e), 1)
        beta = float(np.clip(-slope, 0.25, 1.0))
        # anchor the fit at the latest point (the most counts, the least noise)
        log_a = np.log(e[-1]) + beta * np.log(t[-1])
    if e[-1] <= target:
        return float(t[-1] * (e[-1] / target) ** (1 / beta))
    return float(np.exp((log_a - np.log(target)) / beta))
