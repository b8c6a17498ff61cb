"""Masked, normalised Gaussian smoothing primitives for area-detector counts.

Two kernel families, both normalised by the smoothed mask so that masked pixels (beam stop,
dead pixels, detector edges) neither contribute nor pull the estimate down:

* Cartesian isotropic Gaussian (``sigma`` px), separable. OpenCV in float32 is used
  because it measured ~10-40x faster than ``scipy.ndimage`` (float64, and ~15x in
  float32) on one core (see ``smartbeam bench kde``): ``cv2.GaussianBlur`` for the estimate
  (same kernel as ``sepFilter2D`` with :func:`gaussian_kernel_1d`, equal results, up to
  2x faster), ``sepFilter2D`` for the squared kernel of the variance; ``scipy`` stays
  available as a float64 reference.
* Polar "ring" Gaussian around the beam centre: ``sigma_q`` px along the radius (q) and
  ``sigma_ring`` px of arc along the ring, computed on a polar grid of 1-px radial cells.

The mask normalisation (the convolution of the mask) depends only on the geometry and the
kernel, so :class:`IsoFilter` and :class:`PolarGrid` compute it once and keep its
reciprocal: a smoothed frame then costs one convolution, and the multiplication by the
normaliser only where it differs from 1 (near the mask and the detector edges).

Every filter can return the estimate *and* its variance under a Poisson model, because
smoothed pixels are correlated and must not be treated as independent counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import scipy.fft as sfft
from scipy import ndimage

__all__ = ["IsoFilter", "PolarGrid", "gaussian_kernel_1d", "masked_gaussian", "pack_ccs",
           "ring_gaussian", "ring_transfer"]


def pack_ccs(tf: np.ndarray, n_phi: int) -> np.ndarray:
    """Real transfer functions of the rows, ``(n_r, >= n_phi // 2 + 1)`` harmonics, in
    OpenCV's packed (CCS) layout of a real DFT of ``n_phi`` samples (``Re0, Re1, Im1,
    ...``: each harmonic's value at its real and imaginary slot), float32 ``(n_r, n_phi)``.
    """
    ccs = np.empty((tf.shape[0], n_phi), np.float32)
    k = (n_phi - 1) // 2
    ccs[:, 0] = tf[:, 0]
    ccs[:, 1:2 * k + 1:2] = tf[:, 1:k + 1]
    ccs[:, 2:2 * k + 2:2] = tf[:, 1:k + 1]
    if n_phi % 2 == 0:
        ccs[:, -1] = tf[:, n_phi // 2]
    return ccs


def ring_transfer(r_centre: np.ndarray, n_phi: int, sigma_ring: float,
                  squared: bool = False, length: int | None = None) -> np.ndarray:
    """Transfer function of the periodic azimuthal Gaussian of ``sigma_ring`` px of arc on
    rings of radii ``r_centre`` sampled by ``n_phi`` cells, float32 ``(len(r_centre),
    length // 2 + 1)`` (real: the kernel is even); ``squared``: of the squared weights
    (the variance's kernel); ``length``: the period in cells (default ``n_phi``; a
    shorter one for rings whose unused cells were cut out)."""
    length = n_phi if length is None else int(length)
    d = np.arange(length)
    d = np.minimum(d, length - d).astype(float)
    # arc per azimuthal cell on each ring, so sigma_ring is a length in px
    s = sigma_ring / (np.asarray(r_centre, float) * 2 * np.pi / n_phi)
    s = np.maximum(s, 1e-3)[:, None]
    g = np.exp(-0.5 * (d[None, :] / s) ** 2)
    g /= g.sum(axis=1, keepdims=True)
    if squared:
        g = g * g
    # a real factor halves the cost of the per-candidate spectrum multiplication
    return np.ascontiguousarray(sfft.rfft(g.astype(np.float32), axis=1).real)


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


class IsoFilter:
    """Isotropic masked Gaussian for one mask and one ``sigma``, normaliser cached.

    Parameters
    ----------
    mask
        Boolean valid-pixel mask.
    sigma
        Standard deviation in px (> 0).

    Notes
    -----
    Inputs to :meth:`apply` and :meth:`variance` must already be zero outside the mask
    (see :meth:`PolarGrid` users in :mod:`smartbeam.analysis.kde`); outputs are float32
    and zero outside the mask.
    """

    def __init__(self, mask: np.ndarray, sigma: float) -> None:
        self.sigma = float(sigma)
        self.k = gaussian_kernel_1d(sigma).astype(np.float32)
        self.k2 = (self.k * self.k).astype(np.float32)
        self.radius = self.k.size // 2
        den = self._blur(mask.astype(np.float32))
        ok = mask & (den > 1e-12)
        self.inv_den = np.zeros(mask.shape, np.float32)
        np.divide(1.0, den, out=self.inv_den, where=ok)
        self._inv_den2: np.ndarray | None = None
        # Away from the mask and the detector edges the normaliser is 1 to float32
        # rounding: only the other pixels (and the masked ones, set to 0) need the
        # multiplication, which saves a full pass over the frame.
        fix = np.flatnonzero(np.abs(self.inv_den - 1.0) > 4e-7)
        self._fix = fix if fix.size < mask.size // 4 else None
        self._fix_inv = None if self._fix is None else self.inv_den.ravel()[fix]

    def _blur(self, img: np.ndarray, dst: np.ndarray | None = None) -> np.ndarray:
        # cv2.GaussianBlur builds the same float32 kernel as ``self.k`` (same sigma and
        # size; results compare equal) and measured up to 2x faster than sepFilter2D with
        # it on float32 frames (one core); both are 10-40x faster than scipy.ndimage.
        n = self.k.size
        return cv2.GaussianBlur(img, (n, n), self.sigma, dst=dst, sigmaY=self.sigma,
                                borderType=cv2.BORDER_CONSTANT)

    def apply(self, masked: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Smoothed estimate of float32 counts that are zero outside the mask."""
        num = self._blur(masked, dst=out)
        if self._fix is None:
            return np.multiply(num, self.inv_den, out=num)
        flat = num.reshape(-1)
        flat[self._fix] *= self._fix_inv
        return num

    def apply_window(self, masked: np.ndarray, ys: slice, xs: slice,
                     dst: np.ndarray | None = None) -> np.ndarray:
        """:meth:`apply` on the window ``masked[ys, xs]`` (exact ``radius`` px inside it);
        ``dst``: optional contiguous float32 output of the window's shape."""
        if (ys.start, ys.stop, xs.start, xs.stop) == (0, masked.shape[0], 0, masked.shape[1]):
            return self.apply(masked, out=dst)
        num = self._blur(masked[ys, xs], dst=dst)
        return np.multiply(num, self.inv_den[ys, xs], out=num)

    def variance_window(self, density: np.ndarray, ys: slice, xs: slice,
                        dst: np.ndarray | None = None) -> np.ndarray:
        """:meth:`variance` of a density given on the window ``[ys, xs]`` only; ``dst``:
        optional contiguous float32 output of the window's shape (not ``density``)."""
        if self._inv_den2 is None:
            self._inv_den2 = self.inv_den * self.inv_den
        v = cv2.sepFilter2D(density, -1, self.k2, self.k2, dst=dst,
                            borderType=cv2.BORDER_CONSTANT)
        return np.multiply(v, self._inv_den2[ys, xs], out=v)

    def variance(self, masked_density: np.ndarray) -> np.ndarray:
        """Poisson variance ``sum_j w_j^2 mu_j / (sum_j w_j)^2`` of the smoothed value."""
        if self._inv_den2 is None:
            self._inv_den2 = self.inv_den * self.inv_den
        v = cv2.sepFilter2D(masked_density, -1, self.k2, self.k2,
                            borderType=cv2.BORDER_CONSTANT)
        return np.multiply(v, self._inv_den2, out=v)


def masked_gaussian(counts: np.ndarray, mask: np.ndarray, sigma: float, *,
                    density: np.ndarray | None = None, backend: str = "scipy",
                    mask_weight: np.ndarray | None = None,
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalised isotropic Gaussian smoothing of counts inside a mask (float64 reference).

    Parameters
    ----------
    counts
        2-D counts (any value outside ``mask`` is ignored).
    mask
        Boolean, True = valid pixel.
    sigma
        Kernel standard deviation in pixels; 0 returns the counts unchanged.
    density
        Estimated mean counts per pixel; when given, the Poisson variance of the
        smoothed value is returned as well.
    backend
        ``"scipy"`` (default here) or ``"cv2"``; both in float64. The fast float32 path
        is :class:`IsoFilter`.
    mask_weight
        Precomputed smoothed mask for this ``sigma`` (saves one convolution).

    Returns
    -------
    smoothed, variance
        ``smoothed`` is 0 outside the mask; ``variance`` is ``None`` without ``density``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if sigma <= 0:
        sm = np.where(mask, counts, 0.0)
        var = None if density is None else np.where(mask, density, 0.0)
        return sm, var
    k = gaussian_kernel_1d(sigma)
    den = _sep(mask.astype(np.float64), k, backend) if mask_weight is None else mask_weight
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
        Number of azimuthal cells; default gives ~1 px of arc at the detector corner
        (rounded up to a fast FFT length).
    """

    mask: np.ndarray
    centre: tuple[float, float]
    n_phi: int | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        ny, nx = self.mask.shape
        yy, xx = np.mgrid[0:ny, 0:nx]
        dx = xx - self.centre[0]
        dy = yy - self.centre[1]
        self.r = np.hypot(dx, dy)
        self.phi = np.arctan2(dy, dx)
        self.n_r = int(self.r.max()) + 1
        if self.n_phi is None:
            # ~1 px of arc at the farthest pixel, rounded up to a length pocketfft
            # transforms fast (4550 -> 4608 at 1024^2: ~20% faster ring FFTs)
            self.n_phi = sfft.next_fast_len(int(2 * np.ceil(np.pi * self.r.max())), real=True)
        self.n_phi = max(16, int(self.n_phi))
        rb = self.r.astype(np.int64)
        pb = ((self.phi + np.pi) / (2 * np.pi) * self.n_phi).astype(np.int64) % self.n_phi
        self.cell = rb * self.n_phi + pb
        self._valid_cell = self.cell[self.mask]
        self._valid_flat = np.flatnonzero(self.mask)
        self.n_cell = np.bincount(self._valid_cell, minlength=self.n_r * self.n_phi).astype(
            np.float32).reshape(self.n_r, self.n_phi)
        self.r_centre = np.arange(self.n_r) + 0.5

    def to_cells(self, frame: np.ndarray) -> np.ndarray:
        """Sum of ``frame`` over the valid pixels of each polar cell, float32 (n_r, n_phi)."""
        # a flat take of the valid pixels is cheaper than boolean indexing
        return np.bincount(self._valid_cell, weights=np.take(frame, self._valid_flat),
                           minlength=self.n_r * self.n_phi).reshape(
                               self.n_r, self.n_phi).astype(np.float32)

    def cell_index32(self) -> np.ndarray:
        """Polar cell of each pixel, int32 ``(ny, nx)``; masked pixels get ``n_r * n_phi``
        (a spare cell past the grid). Cached.
        """
        if "cell32" not in self._cache:
            n = self.n_r * self.n_phi
            # int32 (when it fits): the binning pass is bound by reading it
            it = np.int32 if n < 2**31 - 1 else np.int64
            self._cache["cell32"] = np.ascontiguousarray(np.where(self.mask, self.cell, n)
                                                         .astype(it))
        return self._cache["cell32"]

    def to_pixels(self, cells: np.ndarray) -> np.ndarray:
        """Per-pixel map of cell values (0 outside the mask), float32."""
        out = np.zeros(self.mask.shape, np.float32)
        out[self.mask] = cells.ravel()[self._valid_cell]
        return out

    def phi_transfer(self, sigma_ring: float, squared: bool = False) -> np.ndarray:
        """Per-ring transfer function of the periodic azimuthal Gaussian, (n_r, n_phi//2+1).

        Cached per ``(sigma_ring, squared)``: it depends only on the grid.
        """
        key = ("phi", float(sigma_ring), squared)
        if key not in self._cache:
            self._cache[key] = ring_transfer(self.r_centre, self.n_phi, sigma_ring, squared)
        return self._cache[key]

    def filter_cells(self, cells: np.ndarray, sigma_q: float, sigma_ring: float,
                     squared: bool = False, first_row: int = 0) -> np.ndarray:
        """Gaussian along the ring (periodic, FFT) then along q (1-D convolution), float32.

        ``cells`` may be the rows ``first_row:first_row + len(cells)`` of the grid only.
        """
        out = cells
        if sigma_ring > 0:
            out = self.filter_ring(sfft.rfft(out, axis=1), sigma_ring, squared, first_row)
        return self.filter_q(out, sigma_q, squared)

    def filter_ring(self, spectrum: np.ndarray, sigma_ring: float, squared: bool = False,
                    first_row: int = 0) -> np.ndarray:
        """Ring Gaussian applied to ``scipy.fft.rfft(cells, axis=1)`` (reusable across kernels).

        ``spectrum`` may hold the rows from ``first_row`` on only (the ring kernel in
        cells depends on the radius of the row).
        """
        tf = self.phi_transfer(sigma_ring, squared)[first_row:first_row + spectrum.shape[0]]
        return sfft.irfft(spectrum * tf, n=self.n_phi, axis=1)

    def packed_transfer(self, sigma_ring: float, squared: bool = False) -> np.ndarray:
        """:meth:`phi_transfer` in OpenCV's packed (CCS) layout of a real DFT of the rows
        (``Re0, Re1, Im1, ...``: each harmonic's value at its real and imaginary slot),
        divided by ``n_phi`` (for an unscaled inverse), float32 ``(n_r, n_phi)``. Cached.
        """
        key = ("ccs", float(sigma_ring), squared)
        if key not in self._cache:
            tf = self.phi_transfer(sigma_ring, squared) * np.float32(1.0 / self.n_phi)
            self._cache[key] = pack_ccs(tf, self.n_phi)
        return self._cache[key]

    def filter_cells_cv(self, cells: np.ndarray, sigma_q: float, sigma_ring: float,
                        squared: bool = False, first_row: int = 0,
                        work: dict | None = None) -> np.ndarray:
        """:meth:`filter_cells` in float32 with OpenCV's packed real DFT along the ring
        (forward, real transfer function multiplied in place, unscaled inverse): same
        result to float32 rounding, ~2x faster than ``scipy.fft`` with its complex
        spectrum on the emitted grids (one core).

        ``work``: a dict of float32 buffers kept by the caller and reused between calls
        (the result is a view of one of them, overwritten by the next call with the same
        dict): fresh multi-MB outputs cost their page faults on every call (~7 ms for the
        three of a 941 x 2304 grid, more than the two DFTs). Each buffer grows to the
        largest grid asked for and smaller grids use its head.
        """
        out = np.ascontiguousarray(cells, np.float32)

        def buf(name: str) -> np.ndarray | None:
            if work is None:
                return None
            b = work.get(name)
            if b is None or b.size < out.size:
                b = work[name] = np.empty(out.size, np.float32)
            return b[: out.size].reshape(out.shape)

        if sigma_ring > 0:
            spec = cv2.dft(out, dst=buf("spec"), flags=cv2.DFT_ROWS)
            tf = self.packed_transfer(sigma_ring, squared)[first_row:first_row + len(out)]
            np.multiply(spec, tf, out=spec)
            out = cv2.dft(spec, dst=buf("ring"), flags=cv2.DFT_ROWS | cv2.DFT_INVERSE)
        return self.filter_q(out, sigma_q, squared, dst=buf("q"))

    def filter_q(self, cells: np.ndarray, sigma_q: float, squared: bool = False,
                 dst: np.ndarray | None = None) -> np.ndarray:
        """Gaussian along q (the cell rows) of ``sigma_q`` px; 0 returns ``cells``.
        ``dst``: float32 output of the shape of ``cells`` (not ``cells`` itself)."""
        if sigma_q <= 0:
            return cells
        k = gaussian_kernel_1d(sigma_q).astype(np.float32)
        k = k * k if squared else k
        return cv2.filter2D(np.ascontiguousarray(cells, np.float32), -1, k[:, None], dst=dst,
                            borderType=cv2.BORDER_CONSTANT)

    def inv_den(self, sigma_q: float, sigma_ring: float) -> np.ndarray:
        """Reciprocal of the filtered cell occupancy (0 where empty); cached per kernel."""
        key = ("den", float(sigma_q), float(sigma_ring))
        if key not in self._cache:
            den = self.filter_cells(self.n_cell, sigma_q, sigma_ring)
            inv = np.zeros(den.shape, np.float32)
            np.divide(1.0, den, out=inv, where=den > 1e-6)
            self._cache[key] = inv
        return self._cache[key]


def ring_gaussian(counts: np.ndarray, grid: PolarGrid, sigma_q: float, sigma_ring: float, *,
                  density: np.ndarray | None = None, cells: np.ndarray | None = None,
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
    cells
        ``grid.to_cells(counts)`` if already computed (saves the binning).

    Returns
    -------
    smoothed, variance
        Per-pixel float32 maps (0 outside the mask); all pixels of a cell share a value.
    """
    c = grid.to_cells(counts) if cells is None else cells
    inv = grid.inv_den(sigma_q, sigma_ring)
    cell_val = grid.filter_cells(c, sigma_q, sigma_ring) * inv
    sm = grid.to_pixels(cell_val)
    var = None
    if density is not None:
        v = grid.filter_cells(grid.to_cells(density), sigma_q, sigma_ring, squared=True)
        var = grid.to_pixels(v * inv * inv)
    return sm, var
