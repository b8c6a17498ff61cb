"""Smoothed values at the scored pixels only, for the cross-validation of large detectors.

The cross-validation scores the candidate kernels on a subset of the valid pixels (whole
detector rows, see :meth:`smartbeam.analysis.kde.Geometry.score_rows`). A separable kernel
evaluated on K rows needs its vertical pass on those K rows only (one numba pass over the
rows within each kernel's radius) and its horizontal pass on K rows: O(K * nx * radius)
instead of a full-frame convolution per candidate. The isotropic values equal those of the
full-frame filters at the scored pixels (same truncated kernels, zero borders and mask
normalisers, the latter computed by the same row passes over the mask), to float32 rounding.

Ring kernels are evaluated on a polar grid of their own (:attr:`RowScorer.polar`). The
row scorer of :meth:`smartbeam.analysis.kde.Geometry.row_scorer` uses the
multi-resolution grid of :mod:`.kde_mrgrid` (``Geometry.score_arc_px``, 3 px of arc by
default, at the outer radius of each group of 128 radii: ~0.65 M cells at 1024^2; 2 px:
~0.98 M, against 1.67 M for one resolution at 2 px), filtered
along the ring per group with OpenCV's packed real DFT only up to the harmonics the kernel
keeps, then along q at the distinct scored cells only, both thinned halves in one pass
(:meth:`RowScorer.ring_at_pair`). A uniform :class:`~.kde_filters.PolarGrid` (the default
of :class:`RowScorer`) keeps the earlier path (:meth:`RowScorer.ring_grid`, stored
azimuth-major, :meth:`RowScorer.ring_at`). Both approximate the emitted smoothing
(:func:`smartbeam.analysis.kde.apply_kernels`) to a few 0.1 % of the smoothed value; the
coarser cells widen the narrowest ring kernel (sigma_ring = 3 px) by ~4 % at 3 px of arc
(tests measure both).

Where the time goes at 1024^2 (one core, thread CPU; ``smartbeam bench kde``,
``select_breakdown_cpu_ms_1024``): the q windows of the ring kernels (memory bound: each
scored cell reads a run of its grid), the DFTs of the ring grids, the thinning and binning
pass, the isotropic kernels at the scored rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np
import scipy.fft as sfft

from .kde_filters import gaussian_kernel_1d
from .kde_mrgrid import MultiPolar, MultiRingGrid, q_window, ring_q_multi, segments

if TYPE_CHECKING:  # pragma: no cover
    from .kde import Geometry
    from .kde_filters import PolarGrid

__all__ = ["RingGrid", "RowScorer", "band_runs", "cv_band_sums", "pilot_terms", "split_terms"]

_ONE = np.ones(1, np.float32)
# ring spectra are cut where the Gaussian's transfer function falls below exp(-TAIL^2/2)
# (TAIL = 5.3: < 1e-6 of the mean), and the ring-filtered rows are sampled at ARC_STEP
# sigma_ring px of arc (or finer) at the outermost radius, then linearly interpolated to
# the scored cells: the interpolation widens the kernel by ~(1/5)^2/6 ~ 0.7% in variance
_TAIL = 5.3
_ARC_STEP = 0.2


# cv2.filter2D switches to a DFT-based filter for float32 kernels of 130 taps or more
_FILTER2D_MAX_TAPS = 129


def _row_filter(block: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Horizontal pass of a separable filter (zero borders), float32.

    ``cv2.filter2D`` with a one-row kernel: equal (bitwise) to ``cv2.sepFilter2D`` with a
    one-tap vertical kernel and measured 1.5-2.6x faster on the (66, 1024) blocks of the
    1024^2 scoring rows (sigma 1-10, one core): it skips sepFilter2D's vertical pass.
    Longer kernels keep sepFilter2D (filter2D would change to its DFT path).
    """
    if k.size > _FILTER2D_MAX_TAPS:
        return cv2.sepFilter2D(block, -1, k, _ONE, borderType=cv2.BORDER_CONSTANT)
    return cv2.filter2D(block, -1, k.reshape(1, -1), borderType=cv2.BORDER_CONSTANT)


_ring_q_kernel = None


def _ring_q():
    """numba kernel: the q filters of every scored cell from a ring-filtered grid.

    The grid is stored azimuth-major (``gt[azimuth, radius]``), so the q window of a
    scored cell (the ``2 rad + 1`` radii around its own, zero beyond the grid: the
    border of the full-grid q filter) is a contiguous run of the two azimuth rows around
    the cell's azimuth. For the ``t``-th scored cell, q kernel ``i`` (taps
    ``lo[i]:hi[i]`` of ``w[i]``) is applied to both runs, the two results are
    interpolated linearly to the azimuth, multiplied by the normaliser ``inv[i, t]`` and
    written to ``out[i, t]``. Scored cells that follow each other in azimuth read the
    same grid rows (in cache). numba because no
    numpy/OpenCV call gathers, filters and interpolates in one pass: the gathered
    ``(n_scored, 2 rad + 1)`` windows and matrix product it replaces wrote and read ~9 MB
    per grid at 1024^2 (~5 ms per grid, one core, against ~2.5 ms).
    """
    global _ring_q_kernel
    if _ring_q_kernel is None:
        import numba

        # fastmath: lets LLVM vectorise the short dot products (reassociated sums)
        @numba.njit(nogil=True, cache=True, fastmath=True)
        def ring_q(gt, rho, i0, i1, f, w, lo, hi, inv, out):  # pragma: no cover
            n_r = gt.shape[1]
            rad = (w.shape[1] - 1) // 2
            for t in range(rho.size):
                ff = f[t]
                base = rho[t] - rad
                ga = gt[i0[t]]
                gb = gt[i1[t]]
                for i in range(w.shape[0]):
                    d0 = max(lo[i], -base)
                    d1 = max(min(hi[i], n_r - base), d0)
                    wa = w[i, d0:d1]
                    xa = ga[base + d0:base + d1]
                    sa = np.float32(0.0)
                    if ff == 0.0:
                        for j in range(d1 - d0):
                            sa += wa[j] * xa[j]
                    else:
                        xb = gb[base + d0:base + d1]
                        sb = np.float32(0.0)
                        for j in range(d1 - d0):
                            sa += wa[j] * xa[j]
                            sb += wa[j] * xb[j]
                        sa += ff * (sb - sa)
                    out[i, t] = sa * inv[i, t]

        _ring_q_kernel = ring_q
    return _ring_q_kernel


_vert_kernel = None


def _vertical():
    """numba kernel: vertical Gaussian passes at the scored detector rows (compiled once).

    ``out[i, k] = sum_d w[i, d] * frame[rows[k] + d - rad]`` over the taps of kernel ``i``
    (zero beyond the detector; ``frame + frame2`` when ``frame2`` is not empty). Reads the frame rows in place: the gathered
    ``(2 rad + 1, K, nx)`` block and matrix product it replaces copied ~20 MB per call
    at 1024^2 and spent the widest kernel's taps on every sigma.
    """
    global _vert_kernel
    if _vert_kernel is None:
        import numba

        @numba.njit(nogil=True, cache=True)
        def vert(frame, frame2, rows, w, rads, out):  # pragma: no cover - runs compiled
            # frame2 (when not empty) is added to frame as it is read
            ny, nx = frame.shape
            two = frame2.size > 0
            big = (w.shape[1] - 1) // 2
            for i in range(w.shape[0]):
                r = rads[i]
                for k in range(rows.size):
                    o = out[i, k]
                    o[:] = 0.0
                    for d in range(-r, r + 1):
                        y = rows[k] + d
                        if y < 0 or y >= ny:
                            continue
                        wt = w[i, big + d]
                        src = frame[y]
                        if two:
                            src2 = frame2[y]
                            for x in range(nx):
                                o[x] += wt * (src[x] + src2[x])
                        else:
                            for x in range(nx):
                                o[x] += wt * src[x]

        _vert_kernel = vert
    return _vert_kernel


_cv_kernel = None


def band_runs(band_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal values in ``band_of``: ``(starts, bands)``, ``starts`` of length
    ``n_runs + 1`` (the last is ``band_of.size``), as :func:`cv_band_sums` takes them."""
    band_of = np.ascontiguousarray(band_of, np.int64)
    if not band_of.size:
        return np.zeros(1, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.diff(band_of)) + 1
    starts = np.concatenate([[0], starts, [band_of.size]]).astype(np.int64)
    return starts, np.ascontiguousarray(band_of[starts[:-1]])


def cv_band_sums(est_a: np.ndarray, est_b: np.ndarray, raw_a: np.ndarray, raw_b: np.ndarray,
                 noise: np.ndarray, weight: np.ndarray, ok: np.ndarray, band_of: np.ndarray,
                 n_bands: int, runs: tuple[np.ndarray, np.ndarray] | None = None
                 ) -> np.ndarray:
    """Per-band sums of the two-fold cross-validation terms of a block of candidates.

    For candidate ``c`` and scored bin ``p`` (skipped unless ``ok[p]``), with
    ``err = ((est_a - raw_b)^2 + (est_b - raw_a)^2) / 2`` and
    ``d2 = (est_a - est_b)^2 / 2``, the terms are ``err * weight`` (chi^2 score),
    ``err - noise`` (unweighted MSE), ``d2`` (variance) and ``d2 * weight``.

    Parameters
    ----------
    est_a, est_b
        ``(n_candidates, n_bins)`` values smoothed from half A and from half B.
    raw_a, raw_b
        ``(n_bins,)`` raw halves.
    noise, weight
        ``(n_bins,)`` Poisson variance of a raw half and chi^2 weight.
    ok
        ``(n_bins,)`` bool, bins that count.
    band_of
        ``(n_bins,)`` radial band of each bin.
    n_bands
        Number of bands.
    runs
        :func:`band_runs` of ``band_of`` when the caller keeps it (a search sums several
        blocks over the same bins).

    Returns
    -------
    numpy.ndarray
        float64 ``(4, n_candidates, n_bands)``: score, mse, variance, chi^2 variance.

    Notes
    -----
    One numba pass instead of ~10 numpy temporaries of ``(n_candidates, n_bins)`` float64
    (~15 ms per block at 1024^2).
    """
    global _cv_kernel
    if _cv_kernel is None:
        import numba

        # fastmath: the sums of a band run vectorise (reassociated float64 adds, ~1.5x
        # faster at 1024^2; the order of the additions changes the sums by ~1e-15)
        @numba.njit(nogil=True, cache=True, fastmath=True)
        def kern(ea, eb, ra, rb, noise, weight, ok, starts, bands, out):  # pragma: no cover
            # one run of bins per band (the scored bins come sorted by band), read as
            # slices: zero-based loop indices let LLVM vectorise the sums
            n = ea.shape[0]
            for c in range(n):
                for r in range(bands.size):
                    p0 = starts[r]
                    m = starts[r + 1] - p0
                    k = bands[r]
                    xa = ea[c, p0:p0 + m]
                    xb = eb[c, p0:p0 + m]
                    ya = ra[p0:p0 + m]
                    yb = rb[p0:p0 + m]
                    nz = noise[p0:p0 + m]
                    wt = weight[p0:p0 + m]
                    okr = ok[p0:p0 + m]
                    s0 = s1 = s2 = s3 = 0.0
                    for j in range(m):
                        if okr[j]:
                            a = np.float64(xa[j])
                            b = np.float64(xb[j])
                            err = 0.5 * ((a - yb[j]) ** 2 + (b - ya[j]) ** 2)
                            d2 = 0.5 * (a - b) ** 2
                            s0 += err * wt[j]
                            s1 += err - nz[j]
                            s2 += d2
                            s3 += d2 * wt[j]
                    out[0, c, k] += s0
                    out[1, c, k] += s1
                    out[2, c, k] += s2
                    out[3, c, k] += s3

        _cv_kernel = kern
    # runs of equal bands (any order of bins works; sorted by band gives one run per band)
    starts, bands = band_runs(band_of) if runs is None else runs
    out = np.zeros((4, est_a.shape[0], n_bands))
    _cv_kernel(np.ascontiguousarray(est_a), np.ascontiguousarray(est_b),
               np.ascontiguousarray(raw_a, np.float64), np.ascontiguousarray(raw_b, np.float64),
               np.ascontiguousarray(noise, np.float64), np.ascontiguousarray(weight, np.float64),
               np.ascontiguousarray(ok, np.bool_), starts, bands, out)
    return out


_terms_kernels = None


def _terms():
    """numba kernels of :func:`pilot_terms` and :func:`split_terms` (compiled once).

    No fastmath: the per-band sums add in pixel order like ``np.bincount``, so the terms
    equal the numpy formulas they replace bitwise (~1.4 ms of ~15 numpy passes over the
    scored pixels per selection at 1024^2).
    """
    global _terms_kernels
    if _terms_kernels is None:
        import numba

        @numba.njit(nogil=True, cache=True)
        def pilot(pilot_at, floor, band_of, ok, weight, sig2, n_ok):  # pragma: no cover
            for k in range(pilot_at.size):
                p = pilot_at[k]
                # np.maximum(pilot_at, floor) in float32 (NaN kept), then float64
                pp = np.float64(p if (p >= floor or p != p) else floor)
                good = np.isfinite(pp)
                ok[k] = good
                b = band_of[k]
                if good:
                    weight[k] = 1.0 / pp
                    ps = np.float64(p if (p >= 0 or p != p) else np.float32(0.0)) / 2.0
                    sig2[b] += ps * ps
                    n_ok[b] += 1
                else:
                    weight[k] = 0.0
                    sig2[b] += 0.0

        @numba.njit(nogil=True, cache=True)
        def split(h_a, h_b, idx, ok, weight, band_of, prof_a, prof_b, raw_a, raw_b,
                  noise, chi2):  # pragma: no cover - runs compiled
            fa = h_a.reshape(-1)
            fb = h_b.reshape(-1)
            for k in range(idx.size):
                a = fa[idx[k]]
                b = fb[idx[k]]
                prof_a[k] = a
                prof_b[k] = b
                if ok[k]:
                    ra = np.float64(a)
                    rb = np.float64(b)
                    nz = 0.5 * (ra + rb)
                else:
                    ra = rb = nz = 0.0
                raw_a[k] = ra
                raw_b[k] = rb
                noise[k] = nz
                chi2[band_of[k]] += nz * weight[k]

        _terms_kernels = (pilot, split)
    return _terms_kernels


def pilot_terms(pilot_at: np.ndarray, floor: float, band_of: np.ndarray, n_bands: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Chi^2 weights and signal of the scored pixels from the pilot, one pass.

    Parameters
    ----------
    pilot_at
        float32 pilot estimate at the scored pixels.
    floor
        Floor of the pilot in the weights (applied in float32).
    band_of
        int64 radial band of each scored pixel.
    n_bands
        Number of bands.

    Returns
    -------
    ok, weight, sig2, n_ok
        ``ok``: the floored pilot is finite; ``weight = 1 / max(pilot, floor)`` (0 where
        not ok); per band, ``sig2`` the sum of ``(max(pilot, 0) / 2)^2`` over the ok
        pixels and ``n_ok`` their number.
    """
    n = pilot_at.size
    ok = np.empty(n, np.bool_)
    weight = np.empty(n)
    sig2 = np.zeros(n_bands)
    n_ok = np.zeros(n_bands, np.int64)
    _terms()[0](np.ascontiguousarray(pilot_at, np.float32), np.float32(floor),
                np.ascontiguousarray(band_of, np.int64), ok, weight, sig2, n_ok)
    return ok, weight, sig2, n_ok


def split_terms(h_a: np.ndarray, h_b: np.ndarray, idx: np.ndarray, ok: np.ndarray,
                weight: np.ndarray, band_of: np.ndarray, n_bands: int) -> tuple:
    """The two thinned halves at the scored pixels and their noise terms, one pass.

    Returns
    -------
    prof_a, prof_b, raw_a, raw_b, noise, chi2_noise
        float32 values of the halves at ``idx``; the same as float64, 0 where not
        ``ok``; ``noise = (raw_a + raw_b) / 2`` (the Poisson variance of one half);
        per band, the sum of ``noise * weight``.
    """
    n = idx.size
    prof_a, prof_b = np.empty(n, np.float32), np.empty(n, np.float32)
    raw_a, raw_b, noise = np.empty(n), np.empty(n), np.empty(n)
    chi2 = np.zeros(n_bands)
    _terms()[1](np.ascontiguousarray(h_a, np.float32), np.ascontiguousarray(h_b, np.float32),
                np.ascontiguousarray(idx, np.int64), np.ascontiguousarray(ok, np.bool_),
                np.ascontiguousarray(weight, np.float64),
                np.ascontiguousarray(band_of, np.int64), prof_a, prof_b, raw_a, raw_b,
                noise, chi2)
    return prof_a, prof_b, raw_a, raw_b, noise, chi2


class RingGrid:
    """A polar grid filtered along the ring, sampled at ``n_out`` azimuths per row.

    Attributes
    ----------
    values
        float32 ``(n_out, n_r)``, azimuth-major (the transpose of the polar grid's
        layout: a q window is contiguous); sample ``i`` sits at azimuth cell
        ``i * n_phi / n_out`` of the full polar grid.
    n_out
        Azimuthal samples per row (``n_phi`` when not reduced).
    sigma_ring
        Along-ring standard deviation applied, px of arc.
    """

    def __init__(self, values: np.ndarray, n_out: int, sigma_ring: float) -> None:
        self.values = values
        self.n_out = int(n_out)
        self.sigma_ring = float(sigma_ring)

    @property
    def nbytes(self) -> int:
        """Memory held."""
        return int(self.values.nbytes)


class RowScorer:
    """Evaluate isotropic and ring kernels at the valid pixels of a set of detector rows.

    Parameters
    ----------
    geometry
        :class:`~smartbeam.analysis.kde.Geometry` of the detector.
    rows
        Sorted detector row indices that hold the scored pixels.
    idx
        Flat indices of the scored (valid) pixels, all within ``rows`` (any order: the
        values come back in this order; ring kernels run fastest when neighbours in
        ``idx`` are neighbours in azimuth, e.g. sorted by polar azimuth then radius).
    polar
        Polar grid of the ring kernels (default: ``geometry.polar``): a uniform
        :class:`~smartbeam.analysis.kde_filters.PolarGrid`, or a multi-resolution
        :class:`~smartbeam.analysis.kde_mrgrid.MultiPolar` (cells as flat arrays, one
        spectrum per group of radii; see :mod:`.kde_mrgrid`).
    """

    def __init__(self, geometry: Geometry, rows: np.ndarray, idx: np.ndarray,
                 polar: PolarGrid | MultiPolar | None = None) -> None:
        self.geometry = geometry
        self.polar = geometry.polar if polar is None else polar
        self.rows = np.asarray(rows, np.int64)
        self.idx = np.asarray(idx, np.int64)
        ny, nx = geometry.shape
        y, x = np.divmod(self.idx, nx)
        # position of each scored pixel in the (K, nx) block of the scored rows
        self.loc = np.searchsorted(self.rows, y) * nx + x
        cells = self.polar.cell.ravel()[self.idx]
        self._multi = isinstance(self.polar, MultiPolar)
        if self._multi:
            # ring values per distinct cell (~18% fewer than pixels at 1024^2: a cell can
            # hold two scored pixels of a row), gathered back to the pixels
            ucells, self._uinv = np.unique(cells, return_inverse=True)
            rho, phi = self.polar.cell_azimuth(ucells)  # phi: fraction of a turn
            # azimuth-major within each group, as the ring grids are stored: successive
            # cells read successive runs of the grid (rho-major order read it with a
            # stride of a group's rows and measured ~3x slower on full-size grids)
            order = np.lexsort((rho, phi, self.polar.grp_of_row[rho]))
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            rho, phi, self._uinv = rho[order], phi[order], rank[self._uinv]
            self._occ: dict[float, MultiRingGrid] = {}
        else:
            rho, phi = np.divmod(cells, self.polar.n_phi)
        self._cells, self._rho, self._phi = cells, rho, phi
        self._inv_iso: dict[float, np.ndarray] = {}
        self._iso_taps: dict[float, np.ndarray] = {}
        self._inv_ring: dict[tuple[float, float], np.ndarray] = {}
        self._interp: dict[int, tuple] = {}
        self._tf: dict[tuple, np.ndarray] = {}
        self._inv_stack: dict[tuple, np.ndarray] = {}
        self._vert: np.ndarray | None = None
        self._runs: tuple | None = None

    @property
    def band_of(self) -> np.ndarray:
        """Radial band of each scored pixel (int64, ``idx`` order)."""
        return self.runs[0]

    @property
    def runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(band_of, starts, bands)``: :attr:`band_of` and its :func:`band_runs` (cached:
        every search sums its candidates over the same pixels)."""
        if self._runs is None:
            band_of = np.ascontiguousarray(self.geometry.band.ravel()[self.idx], np.int64)
            self._runs = (band_of, *band_runs(band_of))
        return self._runs

    def iso(self, frame: np.ndarray, sigmas: Sequence[float],
            frame2: np.ndarray | None = None,
            out: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """Masked, normalised isotropic smoothing of ``frame`` at the scored pixels.

        Parameters
        ----------
        frame
            float32 ``(ny, nx)`` counts, zero outside the mask.
        sigmas
            Standard deviations (> 0), px.
        frame2
            Optional float32 frame added to ``frame`` as it is read (e.g. the two thinned
            halves of integer counts: their float32 sum is exact below 2^24 counts per
            pixel, so this equals smoothing the counts without a converted copy).
        out
            Optional float32 arrays (one per sigma, of the scored pixels' size) to write
            the values into (e.g. rows of the caller's block of candidates).

        Returns
        -------
        list of numpy.ndarray
            float32 values at the scored pixels, one array per sigma.
        """
        if not len(sigmas):
            return []
        missing = [float(s) for s in dict.fromkeys(sigmas) if float(s) not in self._inv_iso]
        if missing:
            # mask normalisers at the scored pixels by the same row passes over the mask:
            # building the full-frame IsoFilter of each new sigma for them measured
            # 5-27 ms at 1024^2 (sigma 1.5-10, one core) against ~0.3 ms
            for s, den in zip(missing, self._rows_filtered(self.geometry.maskf, missing),
                              strict=True):
                inv = np.zeros(den.shape, np.float32)
                np.divide(1.0, den, out=inv, where=den > 1e-12)
                self._inv_iso[s] = inv
        vals = self._rows_filtered(frame, sigmas, frame2, out)
        return [np.multiply(v, self._inv_iso[float(s)], out=v)
                for s, v in zip(sigmas, vals, strict=True)]

    def _taps(self, sigma: float) -> np.ndarray:
        """float32 Gaussian taps of ``sigma`` (those of ``IsoFilter(mask, sigma).k``)."""
        k = self._iso_taps.get(sigma)
        if k is None:
            k = self._iso_taps[sigma] = gaussian_kernel_1d(sigma).astype(np.float32)
        return k

    def _rows_filtered(self, frame: np.ndarray, sigmas: Sequence[float],
                       frame2: np.ndarray | None = None,
                       out: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """Unnormalised separable Gaussians of ``frame`` (+ ``frame2``) at the scored pixels
        (written into ``out`` when given)."""
        taps = [self._taps(float(s)) for s in sigmas]
        rads = np.array([k.size // 2 for k in taps], np.int64)
        rad = int(rads.max())
        w = np.zeros((len(taps), 2 * rad + 1), np.float32)
        for i, k in enumerate(taps):
            w[i, rad - rads[i]:rad + rads[i] + 1] = k
        # the vertical pass on the scored rows only, each sigma with its own taps
        # one work buffer kept (its rows are read back before the next call)
        shape = (len(taps), self.rows.size, self.geometry.shape[1])
        if self._vert is None or self._vert.shape[0] < shape[0]:
            self._vert = np.empty(shape, np.float32)
        vert = self._vert[:shape[0]]
        f2 = (np.empty((0, 0), np.float32) if frame2 is None
              else np.ascontiguousarray(frame2, np.float32))
        _vertical()(np.ascontiguousarray(frame, np.float32), f2, self.rows, w, rads, vert)
        if out is None:
            out = [np.empty(self.loc.size, np.float32) for _ in taps]
        # mode="clip": np.take buffers ``out`` in its default "raise" mode (the positions
        # are in range by construction)
        return [np.take(_row_filter(vert[i], k).ravel(), self.loc, out=o, mode="clip")
                for (i, k), o in zip(enumerate(taps), out, strict=True)]

    def ring_grid(self, spectrum: np.ndarray | None, cells: np.ndarray, sigma_ring: float
                  ) -> RingGrid:
        """Filter a polar grid along the ring, at the azimuthal sampling the kernel needs.

        A Gaussian of ``sigma_ring`` px of arc leaves no harmonic above ~5.3 r / sigma_ring
        on a ring of radius r, so only those coefficients of the spectrum are kept and
        inverted at ``n_out`` azimuths (about ``sigma_ring / 5`` px of arc at the outermost
        radius) instead of the full ``n_phi``: for sigma_ring = 60 px at 1024^2, 320 instead
        of 4608. Narrow kernels whose sampling would not be coarser keep the full grid
        (exact).

        Parameters
        ----------
        spectrum
            :meth:`ring_spectrum` of ``cells`` (may be ``None`` when ``sigma_ring == 0``).
        cells
            The polar cell sums ``(n_r, n_phi)``.
        sigma_ring
            Along-ring standard deviation, px of arc (0: the cells themselves).

        Returns
        -------
        RingGrid
        """
        polar = self.polar
        if self._multi:
            return polar.ring_grid(spectrum, cells, sigma_ring)
        n_phi = polar.n_phi
        if sigma_ring <= 0:
            return RingGrid(cv2.transpose(np.ascontiguousarray(cells, np.float32)), n_phi, 0.0)
        r_max = float(polar.n_r)
        m = int(np.ceil(_TAIL * r_max / sigma_ring)) + 2
        n_out = sfft.next_fast_len(max(2 * (m - 1),
                                       int(np.ceil(2 * np.pi * r_max / (_ARC_STEP * sigma_ring)))),
                                   real=True)
        if n_out >= n_phi or m >= n_phi // 2 + 1:
            # the full grid (exact)
            prod = np.multiply(spectrum, self._transfer(sigma_ring, n_phi))
            n_out = n_phi
        else:
            # the first m harmonics (2 m - 1 packed values) in a shorter inverse
            m = min(m, (n_out + 1) // 2)  # packed layout: (n_out + 1) // 2 harmonics
            n_pack = 2 * m - 1
            prod = np.zeros((spectrum.shape[0], n_out), np.float32)
            np.multiply(spectrum[:, :n_pack], self._transfer(sigma_ring, n_pack),
                        out=prod[:, :n_pack])
        vals = cv2.dft(prod, flags=cv2.DFT_ROWS | cv2.DFT_INVERSE)
        # azimuth-major for the q windows: OpenCV's blocked transpose (~0.7 ms for the
        # 725 x 2304 grid at 1024^2, against ~3 ms for numpy's copy or ~2 ms more for an
        # inverse FFT along axis 0)
        return RingGrid(cv2.transpose(np.ascontiguousarray(vals, np.float32)), n_out,
                        sigma_ring)

    def ring_spectrum(self, cells: np.ndarray) -> np.ndarray:
        """Transform of polar cell sums along the ring, as :meth:`ring_grid` takes it.

        OpenCV's real DFT of each row, packed (CCS: ``Re0, Re1, Im1, Re2, Im2, ...``),
        float32 ``(n_r, n_phi)``: ~25 % faster than ``scipy.fft.rfft`` and its inverse on
        these grids (one core), and a real transfer function multiplies it in one float32
        pass.
        """
        if self._multi:
            return self.polar.spectrum(cells)  # one packed spectrum per group of radii
        return cv2.dft(np.ascontiguousarray(cells, np.float32), flags=cv2.DFT_ROWS)

    def bin_halves(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cell sums of the two (masked float32) halves on :attr:`polar`, one pass."""
        from .kde_thin import bin_cells

        return bin_cells(a, b, self.polar)

    def _transfer(self, sigma_ring: float, n_pack: int) -> np.ndarray:
        """The ring transfer function in the packed layout of :meth:`ring_spectrum`
        (each harmonic's value at its real and imaginary slot), first ``n_pack`` values,
        divided by ``n_phi`` (the unscaled inverse of a forward transform over ``n_phi``
        samples; cheaper than a scaled inverse, one pass less). Cached."""
        key = (float(sigma_ring), int(n_pack))
        if key not in self._tf:
            n_phi = self.polar.n_phi
            tf = self.polar.phi_transfer(sigma_ring) * np.float32(1.0 / n_phi)
            ccs = np.empty((tf.shape[0], n_phi), np.float32)
            k = (n_phi - 1) // 2  # harmonics with a real and an imaginary slot
            ccs[:, 0] = tf[:, 0]
            ccs[:, 1:2 * k + 1:2] = tf[:, 1:k + 1]
            ccs[:, 2:2 * k + 2:2] = tf[:, 1:k + 1]
            if n_phi % 2 == 0:
                ccs[:, -1] = tf[:, n_phi // 2]  # Nyquist: real only
            self._tf[key] = np.ascontiguousarray(ccs[:, :n_pack])
        return self._tf[key]

    def ring_at_pair(self, grid_a: MultiRingGrid, grid_b: MultiRingGrid,
                     sigma_qs: Sequence[float],
                     out: tuple[np.ndarray, np.ndarray] | None = None,
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """:meth:`ring_at` of two grids of the same ``sigma_ring`` (the two thinned
        halves) in one pass; multi-resolution grids only (:attr:`polar` a
        :class:`~smartbeam.analysis.kde_mrgrid.MultiPolar`). ``out``: optional float32
        ``(len(sigma_qs), n_pixels)`` arrays to write the values of each half into."""
        if not self._multi:
            va, vb = self.ring_at(grid_a, sigma_qs), self.ring_at(grid_b, sigma_qs)
            if out is not None:
                for dst, vals in zip(out, (va, vb), strict=True):
                    dst[...] = vals
            return va, vb
        if not len(sigma_qs):
            return [], []
        key = (grid_a.sigma_ring, tuple(float(q) for q in sigma_qs))
        inv = self._inv_stack.get(key)
        if inv is None:
            inv = self._inv_stack[key] = np.stack([self._multi_inv(q, grid_a.sigma_ring)
                                                   for q in key[1]])
        va, vb = ring_q_multi(self.polar, grid_a, self._rho, self._phi, sigma_qs, inv,
                              self._segments(grid_a), grid2=grid_b)
        if out is None:
            out = (None, None)
        # mode="clip": np.take buffers ``out`` in its default "raise" mode (~30 % slower
        # here); the indices are in range by construction
        return (list(np.take(va, self._uinv, axis=1, out=out[0], mode="clip")),
                list(np.take(vb, self._uinv, axis=1, out=out[1], mode="clip")))

    def ring_at(self, grid: RingGrid, sigma_qs: Sequence[float]) -> list[np.ndarray]:
        """Ring kernels at the scored pixels from a :meth:`ring_grid` result.

        The q kernel (along the rows) is applied at each scored cell to the grid rows
        around it, read at the cell's azimuth by linear interpolation along the ring, and
        normalised by the (exact, full-grid) filtered occupancy; one pass over the
        scored cells for every ``sigma_q``.

        Parameters
        ----------
        grid
            :meth:`ring_grid` of one half for one ``sigma_ring``.
        sigma_qs
            Standard deviations along q (>= 0), px.

        Returns
        -------
        list of numpy.ndarray
            float32 values at the scored pixels (``idx`` order), one per ``sigma_q``.
        """
        if not len(sigma_qs):
            return []
        if self._multi:
            inv = np.stack([self._multi_inv(float(q), grid.sigma_ring) for q in sigma_qs])
            vals = ring_q_multi(self.polar, grid, self._rho, self._phi, sigma_qs, inv,
                                self._segments(grid))
            return list(np.take(vals, self._uinv, axis=1))
        rad = max(gaussian_kernel_1d(s).size // 2 if s > 0 else 0 for s in sigma_qs)
        w, lo, hi = q_window(sigma_qs, rad)
        inv = np.empty((len(sigma_qs), self.idx.size), np.float32)
        for i, s in enumerate(sigma_qs):
            key = (float(s), grid.sigma_ring)
            if key not in self._inv_ring:
                den = self.polar.inv_den(float(s), grid.sigma_ring)
                self._inv_ring[key] = den.ravel()[self._cells]
            inv[i] = self._inv_ring[key]
        i0, i1, f = self._interp_at(grid.n_out)
        out = np.empty((len(sigma_qs), self.idx.size), np.float32)
        _ring_q()(np.ascontiguousarray(grid.values, np.float32), self._rho, i0, i1, f, w,
                  lo, hi, inv, out)
        return list(out)

    def _multi_inv(self, sigma_q: float, sigma_ring: float) -> np.ndarray:
        """Reciprocal normaliser at the scored cells on a multi-resolution grid: the cell
        occupancy through the same ring grid and q windows as the counts (cached)."""
        key = (sigma_q, sigma_ring)
        if key not in self._inv_ring:
            if sigma_ring not in self._occ:
                occ = self.polar.n_cell
                spec = self.polar.spectrum(occ) if sigma_ring > 0 else None
                self._occ[sigma_ring] = self.polar.ring_grid(spec, occ, sigma_ring)
            occ = self._occ[sigma_ring]
            den = ring_q_multi(self.polar, occ, self._rho, self._phi, [sigma_q],
                               seg=self._segments(occ))[0]
            inv = np.zeros(den.shape, np.float32)
            np.divide(1.0, den, out=inv, where=den > 1e-6)
            self._inv_ring[key] = inv
        return self._inv_ring[key]

    def _segments(self, grid: MultiRingGrid) -> tuple:
        """:func:`~smartbeam.analysis.kde_mrgrid.segments` of the scored cells for the
        layout (samples per group) of ``grid``; cached."""
        key = ("seg", tuple(grid.n_out.tolist()))
        if key not in self._interp:
            self._interp[key] = segments(self.polar, grid, self._rho, self._phi)
        return self._interp[key]

    def _interp_at(self, n_out: int) -> tuple:
        """Columns and weight of the two samples around each scored cell's azimuth."""
        if n_out not in self._interp:
            n_phi = self.polar.n_phi
            phi = self._phi
            if n_out == n_phi:
                i0 = phi.astype(np.int64)
                self._interp[n_out] = (i0, i0, np.zeros(i0.size, np.float32))
            else:
                pos = phi * (n_out / n_phi)
                i0 = np.floor(pos).astype(np.int64)
                f = (pos - i0).astype(np.float32)
                i0 %= n_out
                self._interp[n_out] = (i0, (i0 + 1) % n_out, f)
        return self._interp[n_out]
