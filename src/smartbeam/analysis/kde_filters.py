"""Masked, normalised Gaussian smoothing primitives for area-detector counts.

Two kernel families, both normalised by the smoothed mask so that masked pixels (beam stop,
dead pixels, detector edges) neither contribute nor pull the estimate down:

* Cartesian isotropic Gaussian (``sigma`` px), separable. OpenCV's ``sepFilter2D`` is used
  because it measured ~5-10x faster than ``scipy.ndimage`` on one core (see
  ``smartbeam bench kde``); ``scipy`` stays available as a reference backend.
* Polar "ring" Gaussian around the beam centre: ``sigma_q`` px along the radius (q) and
  ``sigma_ring`` px of arc along the ring, computed on a polar grid of 1-px radial cells.

Every filter returns the estimate *and* its variance under a Poisson model, because
smoothed pixels are correlated and must not be treated as independent counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np
from scipy import ndimage

__all__ = ["PolarGrid", "gaussian_kernel_1d", "masked_gaussian", "ring_gaussian"]


def gaussian_kernel_1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised 1-D Gaussian weights of half-width ``ceil(truncate * sigma)``.

    Parameters
    ----------
    sigma
        Standard deviation in pixels (> 0).
    truncate
        Half-width in units of ``sigma``.
    """
    radius = max(1, int(np.ceil(truncate * sigma)))
    x = np.arange(-radius, radius + 1, dtype=float)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _sep(image: np.ndarray, k: np.ndarray, backend: str) -> np.ndarray:
    if backend == "cv2":
        return cv2.sepFilter2D(image, -1, k, k, borderType=cv2.BORDER_CONSTANT)
    out = ndimage.convolve1d(image, k, axis=0, mode="constant")
    return ndimage.convolve1d(out, k, axis=1, mode="constant")


def masked_gaussian(counts: np.ndarray, mask: np.ndarray, sigma: float, *,
                    density: np.ndarray | None = None, backend: str = "cv2",
                    mask_weight: np.ndarray | None = None,
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalised isotropic Gaussian smoothing of counts inside a mask.

    Parameters
    ----------
    counts
        2-D float64 counts (any value outside ``mask`` is ignored).
    mask
        Boolean, True = valid pixel.
    sigma
        Kernel standard deviation in pixels; 0 returns the counts unchanged.
    density
        Estimated mean counts per pixel; when given, the Poisson variance of the
        smoothed value is returned as well.
    backend
        ``"cv2"`` (default, fast) or ``"scipy"``.
    mask_weight
        Precomputed smoothed mask for this ``sigma`` (saves one convolution).

    Returns
    -------
    smoothed, variance
        ``smoothed`` is 0 outside the mask; ``variance`` is ``None`` without ``density``.
    """
    m = mask.astype(np.float64)
    if sigma <= 0:
        sm = np.where(mask, counts, 0.0)
        var = None if density is None else np.where(mask, density, 0.0)
        return sm, var
    k = gaussian_kernel_1d(sigma)
    den = _sep(m, k, backend) if mask_weight is None else mask_weight
    safe = np.where(den > 1e-12, den, 1.0)
    num = _sep(np.where(mask, counts, 0.0), k, backend)
    sm = np.where(mask, num / safe, 0.0)
    var = None
    if density is not None:
        # Var(sum_j w_j X_j / sum_j w_j) = sum_j w_j^2 mu_j / (sum_j w_j)^2
        v = _sep(np.where(mask, density, 0.0), k * k, backend)
        var = np.where(mask, v / safe**2, 0.0)
    return sm, var


@dataclass
class PolarGrid:
    """Polar cells (1 px in radius, ``n_phi`` sectors) around a beam centre.

    Parameters
    ----------
    mask
        Boolean valid-pixel mask.
    centre
        Beam centre ``(x, y)`` in pixels (0-based).
    n_phi
        Number of azimuthal cells; default gives ~1 px of arc at the detector corner.
    """

    mask: np.ndarray
    centre: tuple[float, float]
    n_phi: int | None = None

    def __post_init__(self) -> None:
        ny, nx = self.mask.shape
        yy, xx = np.mgrid[0:ny, 0:nx]
        dx = xx - self.centre[0]
        dy = yy - self.centre[1]
        self.r = np.hypot(dx, dy)
        self.phi = np.arctan2(dy, dx)
        self.n_r = int(self.r.max()) + 1
        if self.n_phi is None:
            self.n_phi = int(2 * np.ceil(np.pi * self.r.max()))
        self.n_phi = max(16, int(self.n_phi))
        rb = self.r.astype(np.int64)
        pb = ((self.phi + np.pi) / (2 * np.pi) * self.n_phi).astype(np.int64) % self.n_phi
        self.cell = rb * self.n_phi + pb
        self._valid_cell = self.cell[self.mask]
        self.n_cell = np.bincount(self._valid_cell, minlength=self.n_r * self.n_phi).astype(
            float).reshape(self.n_r, self.n_phi)
        self.r_centre = np.arange(self.n_r) + 0.5

    def to_cells(self, frame: np.ndarray) -> np.ndarray:
        """Sum of ``frame`` over the valid pixels of each polar cell, shape (n_r, n_phi)."""
        return np.bincount(self._valid_cell, weights=frame[self.mask],
                           minlength=self.n_r * self.n_phi).reshape(self.n_r, self.n_phi)

    @cached_property
    def _phi_freq(self) -> np.ndarray:
        return np.fft.rfftfreq(self.n_phi) * 2 * np.pi

    def phi_transfer(self, sigma_ring: float, squared: bool = False) -> np.ndarray:
        """Per-ring transfer function of the periodic azimuthal Gaussian, (n_r, n_phi//2+1)."""
        d = np.arange(self.n_phi)
        d = np.minimum(d, self.n_phi - d).astype(float)
        # arc per azimuthal cell on each ring, so sigma_ring is a length in px
        s = sigma_ring / (self.r_centre * 2 * np.pi / self.n_phi)
        s = np.maximum(s, 1e-3)[:, None]
        g = np.exp(-0.5 * (d[None, :] / s) ** 2)
        g /= g.sum(axis=1, keepdims=True)
        if squared:
            g = g * g
        return np.fft.rfft(g, axis=1)


def _ring_filter(cells: np.ndarray, grid: PolarGrid, sigma_q: float, sigma_ring: float,
                 squared: bool) -> np.ndarray:
    out = cells
    if sigma_ring > 0:
        out = np.fft.irfft(np.fft.rfft(out, axis=1) * grid.phi_transfer(sigma_ring, squared),
                           n=grid.n_phi, axis=1)
    if sigma_q > 0:
        k = gaussian_kernel_1d(sigma_q)
        out = ndimage.convolve1d(out, k * k if squared else k, axis=0, mode="constant")
    return out


def ring_gaussian(counts: np.ndarray, grid: PolarGrid, sigma_q: float, sigma_ring: float, *,
                  density: np.ndarray | None = None,
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalised polar Gaussian: narrow along q, long along the ring.

    Parameters
    ----------
    counts
        2-D counts.
    grid
        :class:`PolarGrid` for the same mask and beam centre.
    sigma_q
        Radial standard deviation in px (0: the 1-px radial cell only).
    sigma_ring
        Standard deviation along the ring, px of arc (0: the azimuthal cell only).
    density
        Estimated mean counts per pixel, to also return the Poisson variance.

    Returns
    -------
    smoothed, variance
        Per-pixel maps (0 outside the mask); all pixels of one polar cell share a value.
    """
    c = grid.to_cells(counts)
    n = grid.n_cell
    num = _ring_filter(c, grid, sigma_q, sigma_ring, False)
    den = _ring_filter(n, grid, sigma_q, sigma_ring, False)
    ok = den > 1e-9
    cell_val = np.where(ok, num / np.where(ok, den, 1.0), 0.0)
    sm = np.where(grid.mask, cell_val.ravel()[grid.cell], 0.0)
    var = None
    if density is not None:
        mu_cells = grid.to_cells(density)
        v = _ring_filter(mu_cells, grid, sigma_q, sigma_ring, True)
        cell_var = np.where(ok, v / np.where(ok, den, 1.0) ** 2, 0.0)
        var = np.where(grid.mask, cell_var.ravel()[grid.cell], 0.0)
    return sm, var
