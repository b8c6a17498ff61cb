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

from smartbeam.errors import SmartbeamInputError

from .kde_filters import IsoFilter, PolarGrid, masked_gaussian, ring_gaussian

__all__ = [
    "DEFAULT_CANDIDATES",
    "PRODUCTS",
    "Geometry",
    "KDEResult",
    "Kernel",
    "Selection",
    "apply_kernels",
    "kde_estimate",
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
    """

    def __init__(self, mask: np.ndarray, centre: Sequence[float], *, band_width_px: float = 8.0,
                 sector: tuple[float, float] = (0.0, 10.0)) -> None:
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
        self._iso: dict[float, IsoFilter] = {}
        self._score_index: dict[int, np.ndarray] = {}
        self._scratch: dict[int, np.ndarray] = {}
        self._mask_weight: dict[float, np.ndarray] = {}

    def iso_filter(self, sigma: float) -> IsoFilter:
        """Isotropic float32 filter with its mask normalisation (cached per ``sigma``)."""
        sigma = float(sigma)
        if sigma not in self._iso:
            self._iso[sigma] = IsoFilter(self.mask, sigma)
        return self._iso[sigma]

    def score_index(self, max_pixels: int | None) -> np.ndarray:
        """Sorted flat indices of the valid pixels scored by the cross-validation.

        All valid pixels when there are at most ``max_pixels`` of them; otherwise a fixed
        (seeded, so every call agrees) uniform random subsample, so each band keeps its
        share of pixels without the aliasing of a regular stride.
        """
        key = -1 if max_pixels is None else int(max_pixels)
        if key not in self._score_index:
            flat = np.flatnonzero(self.mask)
            if max_pixels is not None and flat.size > max_pixels:
                pick = np.random.default_rng(12345).choice(flat.size, int(max_pixels),
                                                           replace=False)
                flat = flat[np.sort(pick)]
            self._score_index[key] = flat
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
        return np.multiply(frame, self.maskf, out=buf, dtype=np.float32)

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
    """Result of cross-validated bandwidth selection.

    Attributes
    ----------
    product
        The product the bandwidths were chosen for.
    kernels
        Chosen :class:`Kernel` per radial band.
    band_edges
        Radii (px) of the band edges, ``len(kernels) + 1`` values.
    cv_score
        ``(n_candidates, n_bands)`` cross-validation score (lower is better).
    candidates
        The candidate kernels, in ``cv_score`` row order.
    rel_error_half
        Estimated relative RMS error of the product at *half* the counts (from the
        thinned half), overall; NaN if it cannot be estimated (e.g. no counts).
    rel_error_half_bands
        Same, per band.
    speedup_half
        Cross-validated speed-up at equal chi^2-MSE of the chosen kernels over no
        smoothing, at *half* the counts (the thinned half): MSE_raw / MSE_chosen with the
        Poisson noise of the scoring half subtracted from both. NaN when ``Kernel.iso(0)``
        is not a candidate or the estimate is not positive. The speed-up usually falls
        as counts grow, so at the full counts it is typically somewhat lower.
    """

    product: str
    kernels: list[Kernel]
    band_edges: np.ndarray
    cv_score: np.ndarray
    candidates: list[Kernel]
    rel_error_half: float
    rel_error_half_bands: np.ndarray
    speedup_half: float = float("nan")


def select_bandwidths(counts: np.ndarray, geometry: Geometry, *, product: str = "map",
                      candidates: Sequence[Kernel] = DEFAULT_CANDIDATES, n_splits: int = 2,
                      rng: np.random.Generator | int | None = None,
                      max_score_pixels: int | None = 65536) -> Selection:
    """Choose a kernel per radial band by cross-validation on binomially thinned halves.

    Parameters
    ----------
    counts
        Accumulated raw counts (integers, or floats holding integers).
    geometry
        :class:`Geometry` of the detector.
    product
        ``"map"`` (2-D map, chi^2-weighted per pixel), ``"sector"`` or ``"radial"``
        (1-px radial bins weighted by their raw variance).
    candidates
        Kernels to try; should include ``Kernel.iso(0)`` (no smoothing).
    n_splits
        Number of independent random halvings averaged (reduces CV noise).
    rng
        Random generator or seed for the thinning.
    max_score_pixels
        For the ``"map"`` product, score the candidates on at most this many valid
        pixels (a fixed random subsample; all of them on small detectors). The
        convolutions still run on the whole frame. ``None``: every valid pixel.

    Returns
    -------
    Selection
    """
    if product not in PRODUCTS:
        raise SmartbeamInputError(f"product={product!r}: expected one of {PRODUCTS}")
    if n_splits < 1:
        raise SmartbeamInputError(f"n_splits={n_splits!r}: expected >= 1")
    candidates = list(candidates)
    if not candidates:
        raise SmartbeamInputError("candidates is empty: expected at least one Kernel")
    x = validate_frame(counts, geometry.shape, "counts")
    rng = np.random.default_rng(rng)
    idx = geometry.score_index(max_score_pixels) if product == "map" else None

    def profile(frame: np.ndarray) -> np.ndarray:
        return frame.ravel()[idx] if idx is not None else product_profile(frame, geometry,
                                                                         product)

    # chi^2 weights from a pilot estimate, floored so empty regions do not dominate
    pilot, _ = smooth(x, geometry, Kernel.iso(2.0))
    pilot_mean = float(pilot[geometry.mask].mean())
    floor = max(0.05 * pilot_mean, 1e-12)
    pilot_p = profile(np.maximum(pilot, floor)).astype(np.float64)
    if idx is not None:
        nb = np.ones(idx.size)
        band_of = geometry.band.ravel()[idx]
    else:
        nb = _bin_counts(geometry, product)
        band_of = _bin_band(geometry, product)
    ok = np.isfinite(pilot_p) & (nb > 0)
    # raw variance of each product bin per unit pilot density: mu / N_bin
    weight = np.where(ok, nb / np.where(ok, pilot_p, 1.0), 0.0)
    n_bands = geometry.n_bands
    score = np.zeros((len(candidates), n_bands))
    mse = np.zeros((len(candidates), n_bands))
    sig2 = np.zeros(n_bands)
    chi2_noise = np.zeros(n_bands)
    polar = geometry.polar
    for _ in range(n_splits):
        a, b = thin(x, rng)
        pb = np.where(ok, profile(b).astype(np.float64), 0.0)
        noise_b = np.where(ok, pb / np.where(nb > 0, nb, 1.0), 0.0)
        chi2_noise += np.bincount(band_of, weights=noise_b * weight, minlength=n_bands)
        a32 = geometry.masked32(a, slot=2)
        a_cells = None
        for c, kern in enumerate(candidates):
            if kern.kind == "iso":
                sa = a32 if kern.sigma_q <= 0 else geometry.iso_filter(kern.sigma_q).apply(a32)
                pa = profile(sa)
            else:
                if a_cells is None:
                    a_cells = polar.to_cells(a32)
                cell_val = polar.filter_cells(a_cells, kern.sigma_q, kern.sigma_ring)
                cell_val *= polar.inv_den(kern.sigma_q, kern.sigma_ring)
                # only the scored pixels are read back from the polar cells
                pa = (cell_val.ravel()[polar.cell.ravel()[idx]] if idx is not None
                      else profile(polar.to_pixels(cell_val)))
            pa = np.where(ok, pa.astype(np.float64), 0.0)
            err = (pa - pb) ** 2
            score[c] += np.bincount(band_of, weights=err * weight, minlength=n_bands)
            # unbiased for E(est - mu/2)^2: subtract the Poisson variance of the B profile
            mse[c] += np.bincount(band_of, weights=err - noise_b, minlength=n_bands)
        sig2 += np.bincount(band_of, weights=np.where(ok, (pilot_p / 2) ** 2, 0.0),
                            minlength=n_bands)
    best = np.argmin(score, axis=0)
    present = np.bincount(band_of[ok], minlength=n_bands) > 0
    kernels = [candidates[int(best[b])] if present[b] else candidates[0] for b in range(n_bands)]
    mse_best = np.maximum(mse[best, np.arange(n_bands)] / n_splits, 0.0)
    sig2 /= n_splits
    with np.errstate(invalid="ignore", divide="ignore"):
        rel_bands = np.where(sig2 > 0, np.sqrt(mse_best / sig2), np.nan)
        total = sig2[present].sum()
        rel = float(np.sqrt(mse_best[present].sum() / total)) if total > 0 else float("nan")
    if not np.isfinite(x).all() or x.sum() == 0:
        rel = float("nan")
    speedup = float("nan")
    if Kernel.iso(0) in candidates and rel == rel:
        none = candidates.index(Kernel.iso(0))
        chosen = np.array([candidates.index(k) for k in kernels])
        noise = chi2_noise[present].sum()
        raw_err = score[none, present].sum() - noise
        est_err = score[chosen[present], np.flatnonzero(present)].sum() - noise
        if raw_err > 0 and est_err > 0:
            speedup = float(raw_err / est_err)
    return Selection(product, kernels, geometry.band_edges.copy(), score / n_splits,
                     candidates, rel, rel_bands, speedup)


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
    distinct = list(dict.fromkeys(kernels))
    # which distinct kernel serves each pixel; -1 outside the mask
    lut = np.array([distinct.index(k) for k in kernels] + [-1], np.int16)
    which = lut[geometry.band] if len(distinct) > 1 else None
    out = var = None
    masked = geometry.masked32(counts, slot=0) if backend == "cv2" else None
    for j, kern in enumerate(distinct):
        if backend == "cv2" and kern.kind == "iso" and kern.sigma_q > 0:
            f = geometry.iso_filter(kern.sigma_q)
            sm = f.apply(masked)
            v = f.variance(geometry.masked32(np.maximum(sm, 0.0), slot=1)) if variance \
                else None
        elif backend == "cv2" and kern.kind == "iso":
            sm = masked.copy()
            v = sm.copy() if variance else None
        else:
            sm, _ = smooth(counts, geometry, kern, backend=backend)
            v = smooth(counts, geometry, kern, density=np.maximum(sm, 0.0),
                       backend=backend)[1] if variance else None
        if which is None:
            out, var = sm, v
            break
        if out is None:
            out = np.zeros(geometry.shape, sm.dtype)
            var = np.zeros(geometry.shape, sm.dtype) if variance else None
        sel = which == j
        np.copyto(out, sm, where=sel)
        if variance:
            np.copyto(var, v, where=sel)
    return out, var


def kde_estimate(counts: np.ndarray, geometry: Geometry, *, product: str = "map",
                 candidates: Sequence[Kernel] = DEFAULT_CANDIDATES, n_splits: int = 2,
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
        # relative error falls ~ 1/sqrt(counts) at fixed kernel: half -> full counts
        rel = sel.rel_error_half / np.sqrt(2)
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
