"""Smoothed values at the scored pixels only, for the cross-validation of large detectors.

The cross-validation scores the candidate kernels on a subset of the valid pixels (whole
detector rows, see :meth:`smartbeam.analysis.kde.Geometry.score_rows`). A separable kernel
evaluated on K rows needs its vertical pass on those K rows only (a gather of the rows
within the kernel radius and one matrix product for every sigma at once) and its
horizontal pass on K rows: O(K * nx * radius) instead of a full-frame convolution per
candidate. Ring kernels are filtered along the ring on the polar grid (FFT per ring, as in
:class:`~smartbeam.analysis.kde_filters.PolarGrid`) and along q at the scored cells only.

The values equal those of the full-frame filters (same truncated kernels, same zero
borders, same cached mask normalisers) at the scored pixels, to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from smartbeam.errors import SmartbeamInputError

from .kde_filters import gaussian_kernel_1d

if TYPE_CHECKING:  # pragma: no cover
    from .kde import Geometry

__all__ = ["RowScorer"]

_ONE = np.ones(1, np.float32)


class RowScorer:
    """Evaluate isotropic and ring kernels at the valid pixels of a set of detector rows.

    Parameters
    ----------
    geometry
        :class:`~smartbeam.analysis.kde.Geometry` of the detector.
    rows
        Sorted detector row indices that hold the scored pixels.
    idx
        Sorted flat indices of the scored (valid) pixels, all within ``rows``.
    """

    def __init__(self, geometry: Geometry, rows: np.ndarray, idx: np.ndarray) -> None:
        self.geometry = geometry
        self.rows = np.asarray(rows, np.int64)
        self.idx = np.asarray(idx, np.int64)
        ny, nx = geometry.shape
        y, x = np.divmod(self.idx, nx)
        # position of each scored pixel in the (K, nx) block of the scored rows
        self.loc = np.searchsorted(self.rows, y) * nx + x
        polar = geometry.polar
        cells = polar.cell.ravel()[self.idx]
        rho, phi = np.divmod(cells, polar.n_phi)
        # ring gathers walk the transposed polar grid in (phi, rho) order (cache-friendly),
        # then the values are put back in the order of ``idx``
        self._order = np.lexsort((rho, phi))
        self._back = np.empty_like(self._order)
        self._back[self._order] = np.arange(self._order.size)
        self.cells = cells[self._order]
        self.rho, self.phi = rho[self._order], phi[self._order]
        self._inv_iso: dict[float, np.ndarray] = {}
        self._inv_ring: dict[tuple[float, float], np.ndarray] = {}

    def iso(self, frame: np.ndarray, sigmas: Sequence[float]) -> list[np.ndarray]:
        """Masked, normalised isotropic smoothing of ``frame`` at the scored pixels.

        Parameters
        ----------
        frame
            float32 ``(ny, nx)`` counts, zero outside the mask.
        sigmas
            Standard deviations (> 0), px.

        Returns
        -------
        list of numpy.ndarray
            float32 values at the scored pixels, one array per sigma.
        """
        g = self.geometry
        ny = g.shape[0]
        filters = [g.iso_filter(s) for s in sigmas]
        if not filters:
            return []
        rad = max(f.radius for f in filters)
        src = self.rows[None, :] + np.arange(-rad, rad + 1)[:, None]
        gathered = frame[np.clip(src, 0, ny - 1)]  # (2 rad + 1, K, nx)
        gathered[(src < 0) | (src >= ny)] = 0.0  # zero border, like the full-frame filter
        w = np.zeros((len(filters), 2 * rad + 1), np.float32)
        for i, f in enumerate(filters):
            w[i, rad - f.radius:rad + f.radius + 1] = f.k
        # the vertical pass of every sigma at once: one matrix product
        vert = (w @ gathered.reshape(2 * rad + 1, -1)).reshape((len(filters),)
                                                                + gathered.shape[1:])
        out = []
        for i, f in enumerate(filters):
            h = cv2.sepFilter2D(vert[i], -1, f.k, _ONE, borderType=cv2.BORDER_CONSTANT)
            out.append(h.ravel()[self.loc] * self._iso_inv(f.sigma))
        return out

    def _iso_inv(self, sigma: float) -> np.ndarray:
        if sigma not in self._inv_iso:
            self._inv_iso[sigma] = self.geometry.iso_filter(sigma).inv_den.ravel()[self.idx]
        return self._inv_iso[sigma]

    def prepare_ring(self, ring_filtered: np.ndarray, rad: int) -> np.ndarray:
        """The cells along q around each scored cell of a ring-filtered polar grid.

        Parameters
        ----------
        ring_filtered
            ``(n_r, n_phi)`` polar cell sums filtered along the ring (or the raw sums).
        rad
            Largest q-kernel radius (cells) that :meth:`ring` will apply to them.

        Returns
        -------
        numpy.ndarray
            float32 ``(n_scored, 2 rad + 1)``: row ``s`` holds the cells ``rho_s - rad``
            to ``rho_s + rad`` at the scored cell's azimuth (zero beyond the grid, the
            border of the full-grid q filter), in the scorer's internal order.
        """
        # transposed (rho contiguous) and zero-padded along rho: each window is then one
        # contiguous run of cells
        grid_t = cv2.transpose(np.ascontiguousarray(ring_filtered, np.float32))
        grid_t = cv2.copyMakeBorder(grid_t, 0, 0, rad, rad, cv2.BORDER_CONSTANT, value=0)
        return sliding_window_view(grid_t, 2 * rad + 1, axis=1)[self.phi, self.rho]

    def ring(self, windows: np.ndarray, sigma_ring: float, sigma_qs: Sequence[float]
             ) -> list[np.ndarray]:
        """Ring kernels at the scored pixels from a grid already filtered along the ring.

        Parameters
        ----------
        windows
            :meth:`prepare_ring` of the polar cell sums filtered along the ring with
            ``sigma_ring`` (the raw cell sums for ``sigma_ring == 0``), with a radius at
            least that of every q kernel asked for.
        sigma_ring
            The along-ring standard deviation used (selects the mask normaliser).
        sigma_qs
            Standard deviations along q (>= 0), px.

        Returns
        -------
        list of numpy.ndarray
            float32 values at the scored pixels, one array per ``sigma_q``.
        """
        if not len(sigma_qs):
            return []
        pad = (windows.shape[1] - 1) // 2
        ks = [gaussian_kernel_1d(s).astype(np.float32) if s > 0 else _ONE for s in sigma_qs]
        rad = max(k.size // 2 for k in ks)
        if rad > pad:
            raise SmartbeamInputError(f"q-kernel radius {rad} cells: expected at most the "
                                      f"radius of the prepared windows ({pad})")
        w = np.zeros((2 * pad + 1, len(ks)), np.float32)
        for i, k in enumerate(ks):
            w[pad - k.size // 2:pad + k.size // 2 + 1, i] = k
        vals = (windows @ w).T
        return [(vals[i] * self._ring_inv(float(s), float(sigma_ring)))[self._back]
                for i, s in enumerate(sigma_qs)]

    def _ring_inv(self, sigma_q: float, sigma_ring: float) -> np.ndarray:
        key = (sigma_q, sigma_ring)
        if key not in self._inv_ring:
            inv = self.geometry.polar.inv_den(sigma_q, sigma_ring)
            self._inv_ring[key] = inv.ravel()[self.cells]
        return self._inv_ring[key]
