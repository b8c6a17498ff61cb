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

from .kde_filters import PolarGrid, masked_gaussian, ring_gaussian

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
        self._mask_weight: dict[float, np.ndarray] = {}

    def mask_weight(self, sigma: float) -> np.ndarray:
        """Smoothed mask for an isotropic ``sigma`` (cached: the mask does not change)."""
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
        Convolution backend for isotropic kernels (``"cv2"`` or ``"scipy"``).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if kernel.kind == "iso":
        mw = geometry.mask_weight(kernel.sigma_q) if kernel.sigma_q > 0 and backend == "cv2" \
            else None
        return masked_gaussian(counts, geometry.mask, kernel.sigma_q, density=density,
                               backend=backend, mask_weight=mw)
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
    """Binomial thinning: two independent Poisson frames with means p*mu and (1-p)*mu."""
    x = np.asarray(counts)
    if x.dtype.kind == "f":
        x = np.rint(x).astype(np.int64)
    a = rng.binomial(x, p)
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
    """

    product: str
    kernels: list[Kernel]
    band_edges: np.ndarray
    cv_score: np.ndarray
    candidates: list[Kernel]
    rel_error_half: float
    rel_error_half_bands: np.ndarray


def select_bandwidths(counts: np.ndarray, geometry: Geometry, *, product: str = "map",
                      candidates: Sequence[Kernel] = DEFAULT_CANDIDATES, n_splits: int = 2,
                      rng: np.random.Generator | int | None = None) -> Selection:
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
    # chi^2 weights from a pilot estimate, floored so empty regions do not dominate
    pilot, _ = smooth(x, geometry, Kernel.ring(2.0, 8.0))
    pilot_mean = pilot[geometry.mask].mean()
    floor = max(0.05 * pilot_mean, 1e-12)
    pilot_p = product_profile(np.maximum(pilot, floor), geometry, product)
    nb = _bin_counts(geometry, product)
    band_of = _bin_band(geometry, product)
    ok = np.isfinite(pilot_p) & (nb > 0)
    # raw variance of each product bin per unit pilot density: mu / N_bin
    weight = np.where(ok, nb / np.where(ok, pilot_p, 1.0), 0.0)
    n_bands = geometry.n_bands
    score = np.zeros((len(candidates), n_bands))
    mse = np.zeros((len(candidates), n_bands))
    sig2 = np.zeros(n_bands)
    for _ in range(n_splits):
        a, b = thin(x, rng)
        b = b.astype(np.float64)
        pb = np.where(ok, product_profile(b, geometry, product), 0.0)
        noise_b = np.where(ok, pb / np.where(nb > 0, nb, 1.0), 0.0)
        for c, kern in enumerate(candidates):
            sa, _ = smooth(a, geometry, kern)
            pa = np.where(ok, product_profile(sa, geometry, product), 0.0)
            err = (pa - pb) ** 2
            score[c] += np.bincount(band_of, weights=err * weight, minlength=n_bands)
            # unbiased for E(est - mu/2)^2: subtract the Poisson variance of the B profile
            mse[c] += np.bincount(band_of, weights=err - noise_b, minlength=n_bands)
        sig2 += np.bincount(band_of, weights=(pilot_p * ok / 2) ** 2 if product == "map"
                            else np.where(ok, (pilot_p / 2) ** 2, 0.0), minlength=n_bands)
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
    return Selection(product, kernels, geometry.band_edges.copy(), score / n_splits,
                     candidates, rel, rel_bands)


@dataclass
class KDEResult:
    """A smoothed frame with everything needed to use it correctly.

    Attributes
    ----------
    smoothed
        Estimated mean counts per pixel of the accumulated frame (0 outside ``mask``).
    variance
        Poisson variance of each smoothed pixel (0 outside ``mask``). Pixels are
        correlated through the kernel: this is the diagonal only.
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
    variance: np.ndarray
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
                  backend: str = "cv2") -> tuple[np.ndarray, np.ndarray]:
    """Smooth with a kernel per radial band; returns (smoothed, variance)."""
    x = np.asarray(counts, dtype=np.float64)
    if len(kernels) != geometry.n_bands:
        raise SmartbeamInputError(f"{len(kernels)} kernels given: expected one per band "
                                  f"({geometry.n_bands})")
    # pilot density for the variance map: the estimate itself, per kernel
    out = np.zeros(geometry.shape)
    var = np.zeros(geometry.shape)
    for kern in dict.fromkeys(kernels):
        bands = [i for i, k in enumerate(kernels) if k == kern]
        sel = np.isin(geometry.band, bands)
        sm, _ = smooth(x, geometry, kern, backend=backend)
        _, v = smooth(x, geometry, kern, density=np.maximum(sm, 0.0), backend=backend)
        out[sel] = sm[sel]
        var[sel] = v[sel]
    return out, var


def kde_estimate(counts: np.ndarray, geometry: Geometry, *, product: str = "map",
                 candidates: Sequence[Kernel] = DEFAULT_CANDIDATES, n_splits: int = 2,
                 rng: np.random.Generator | int | None = None,
                 kernels: Sequence[Kernel] | None = None) -> KDEResult:
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
    sm, var = apply_kernels(x, geometry, list(kernels))
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
