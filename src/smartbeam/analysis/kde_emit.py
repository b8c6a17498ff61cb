"""Emitted ring smoothing of wide ring kernels on a coarser azimuthal grid.

The emitted ring smoothing (:func:`smartbeam.analysis.kde.apply_kernels`) works on a polar
grid of ~1 px of arc at the detector corner: 1449 x 9216 cells (13.4 M, 53 MB in float32)
for a 2048^2 detector, 3x its pixels, so binning, both DFTs and the q filter are bound by
that grid. A ring kernel of ``sigma_ring`` px of arc keeps no harmonic above
~5.3 r / sigma_ring, so for wide kernels the counts are binned on a grid of
``sigma_ring / 5`` px of arc at the corner (:func:`coarse_n_phi`) and the smoothed cells
are linearly interpolated along the ring to each pixel's azimuth (:func:`lerp_to_pixels`).
The coarser cells add their box width in quadrature to the kernel: (1/5)^2 / 12 = 0.3 % of
sigma_ring^2 at the corner (less inside); the interpolation attenuates the kept harmonics
by at most ~0.4 % (both measured by the tests against the 1 px-of-arc path).
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

__all__ = ["ARC_STEP", "MIN_N_PHI", "coarse_n_phi", "lerp_tables", "lerp_to_pixels"]

ARC_STEP = 0.2  # coarse cell, in units of sigma_ring, px of arc at the outermost radius
# the 1 px-of-arc grid is kept below this many cells per ring (detectors under ~650 px
# across): it is cheap there, and small detectors keep the exact emitted values
MIN_N_PHI = 4096

_kernel = None


def coarse_n_phi(n_r: int, n_phi: int, sigma_ring: float) -> int | None:
    """Azimuthal cells of the coarse grid for ``sigma_ring``, or ``None`` when it would not
    be at least 1.5x coarser than ``n_phi`` or ``n_phi < MIN_N_PHI`` (the 1 px-of-arc
    grid is kept)."""
    if not sigma_ring > 0 or n_phi < MIN_N_PHI:
        return None
    n = 2 * sfft.next_fast_len(int(np.ceil(np.pi * n_r / (ARC_STEP * sigma_ring))),
                               real=True)  # even: OpenCV's odd-length DFTs are ~3x slower
    return n if 1.5 * n <= n_phi else None


def lerp_tables(rho: np.ndarray, phi: np.ndarray, n_phi: int, first_row: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat cells (rows from ``first_row``) on both sides of each pixel's azimuth, and the
    linear weight of the second; cell ``i`` of a ring is taken at its centre."""
    u = (phi + np.pi) / (2 * np.pi)
    pos = u * n_phi - 0.5
    fl = np.floor(pos)
    i0 = fl.astype(np.int64) % n_phi
    base = (rho.astype(np.int64) - first_row) * n_phi
    return base + i0, base + (i0 + 1) % n_phi, (pos - fl).astype(np.float32)


def lerp_to_pixels(values: np.ndarray, tables: tuple, flat_sel: np.ndarray,
                   out: np.ndarray) -> None:
    """``out.flat[flat_sel] = values.flat[c0] + f * (values.flat[c1] - values.flat[c0])``
    in one numba pass (numpy needs five passes over ~3 M pixels at 2048^2)."""
    global _kernel
    if _kernel is None:
        import numba

        @numba.njit(nogil=True, cache=True)
        def lerp(v, c0, c1, f, sel, o):  # pragma: no cover - runs compiled
            for k in range(sel.size):
                a = v[c0[k]]
                o[sel[k]] = a + f[k] * (v[c1[k]] - a)

        _kernel = lerp
    c0, c1, f = tables
    _kernel(np.ascontiguousarray(values, np.float32).reshape(-1), c0, c1, f, flat_sel,
            out.reshape(-1))
