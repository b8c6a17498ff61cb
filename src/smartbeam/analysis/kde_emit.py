"""Emitted ring smoothing of wide ring kernels on coarser azimuthal grids.

The emitted ring smoothing (:func:`smartbeam.analysis.kde.apply_kernels`) works on a polar
grid of ~1 px of arc at the detector corner: 1449 x 9216 cells (13.4 M, 53 MB in float32)
for a 2048^2 detector, 3x its pixels, so binning, both DFTs and the q filter are bound by
that grid. A ring kernel of ``sigma_ring`` px of arc keeps no harmonic above
~5.3 r / sigma_ring, so for wide kernels (:func:`coarse_n_phi`) the counts are binned on
grids of ``ARC_STEP * sigma_ring`` px of arc and the smoothed cells interpolated along the
ring to each pixel's azimuth (:class:`RingEmitPlan`):

* one grid per group of radii (:func:`ring_groups`), sized for the group's outermost row:
  a single grid sized for the corner over-samples the inner rows (2.7x at r = 504 at
  2048^2); each group filters its rows plus the q kernel's reach (twice for the variance);
* rings beyond the largest circle inside the detector keep only the arcs that hold pixels
  (plus 6 ring sigmas), filtered as one shorter periodic row (:class:`RingGroupPlan`);
* linear (cloud-in-cell) binning: each count is split between the two cells around its
  azimuth, the same weights as the interpolation back, so a count keeps its azimuth to
  first order (put at its cell's centre it moves by up to half a cell);
* the normaliser is folded into the interpolation weights (no pass over the grid).

Against the 1 px-of-arc path at 2048^2 (tests/analysis/test_kde.py at 400^2) the emitted
map deviates by <= 0.9e-3 RMS of the map for sigma_ring >= 8 px with sigma_q = 1 px
(1.6e-3 with sigma_q = 0), less than the single corner-sized grid with binning to the
cell centre did (1.3e-3, 2.3e-3); the error against the true pattern is unchanged.

Binning and interpolation are the passes over the ~3.4 M pixels of a 2048^2 emit, so
they run as numba loops over runs of consecutive pixels with int32 / float32 tables
that depend only on the geometry and the kernel (cached between emits).
"""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import scipy.fft as sfft
from scipy import ndimage

from .kde_filters import gaussian_kernel_1d, pack_ccs, ring_transfer

__all__ = ["ARC_STEP", "MIN_N_PHI", "CellEmitPlan", "RingEmitPlan", "RingGroupPlan",
           "coarse_n_phi", "group_n_phi", "index_runs", "ring_groups"]

ARC_STEP = 0.2  # coarse cell, in units of sigma_ring, px of arc at the outermost radius
# the 1 px-of-arc grid is kept below this many cells per ring (detectors under ~650 px
# across): it is cheap there, and small detectors keep the exact emitted values
MIN_N_PHI = 4096

_kernels = None


def coarse_n_phi(n_r: int, n_phi: int, sigma_ring: float) -> int | None:
    """Azimuthal cells of the coarse grid for ``sigma_ring``, or ``None`` when it would not
    be at least 1.5x coarser than ``n_phi`` or ``n_phi < MIN_N_PHI`` (the 1 px-of-arc
    grid is kept)."""
    if not sigma_ring > 0 or n_phi < MIN_N_PHI:
        return None
    n = group_n_phi(n_r, sigma_ring)
    return n if 1.5 * n <= n_phi else None


def index_runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths (int64) of the runs of consecutive values in ``idx``."""
    idx = np.asarray(idx, np.int64)
    if idx.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    brk = np.flatnonzero(np.diff(idx) != 1) + 1
    first = np.concatenate(([0], brk))
    lens = np.diff(np.concatenate((first, [idx.size])))
    return idx[first], lens.astype(np.int64)


def _compiled():
    global _kernels
    if _kernels is None:
        import numba

        # (indices as uint32 views of the runs: numba then drops its negative-index
        # wrap-around, which made these loops ~4x slower)
        one = np.uint32(1)

        @numba.njit(nogil=True, cache=True)
        def bin_runs(src, starts, lens, cell, out):  # pragma: no cover - runs compiled
            # pixel (row-major) order: sequential reads, and the cells of one detector
            # row stay in cache for the next (a register sum of the pixels of a cell
            # mispredicts its branch, and tiles of pixels measured slower)
            out[:] = 0.0
            k = 0
            for r in range(starts.size):
                n = lens[r]
                x = src[starts[r]:starts[r] + n]
                cc = cell[k:k + n]
                for j in range(n):
                    out[np.uint32(cc[j])] += np.float32(x[j])
                k += n

        @numba.njit(nogil=True, cache=True)
        def gather_runs(v, starts, lens, cell, w, o, squared):  # pragma: no cover
            # each pixel takes its own cell's value times its normaliser (squared: the
            # variance's); runs of pixels as in lerp_runs
            k = 0
            for r in range(starts.size):
                n = lens[r]
                oo = o[starts[r]:starts[r] + n]
                cc = cell[k:k + n]
                ww = w[k:k + n]
                if squared:
                    for j in range(n):
                        oo[j] = v[np.uint32(cc[j])] * (ww[j] * ww[j])
                else:
                    for j in range(n):
                        oo[j] = v[np.uint32(cc[j])] * ww[j]
                k += n

        @numba.njit(nogil=True, cache=True)
        def density(val, inv, n_cell, dens):  # pragma: no cover - runs compiled
            for i in range(val.shape[0]):
                for j in range(val.shape[1]):
                    dens[i, j] = max(val[i, j] * inv[i, j], np.float32(0.0)) * n_cell[i, j]

        @numba.njit(nogil=True, cache=True)
        def lerpw_runs(v, starts, lens, c0, wa, wb, o):  # pragma: no cover - compiled
            # the interpolation weights carry each cell's normaliser: the filtered cells
            # are read as the q filter left them (no pass multiplying the grid)
            k = 0
            for r in range(starts.size):
                n = lens[r]
                oo = o[starts[r]:starts[r] + n]
                cc = c0[k:k + n]
                aa = wa[k:k + n]
                bb = wb[k:k + n]
                for j in range(n):
                    c = np.uint32(cc[j])
                    oo[j] = v[c] * aa[j] + v[c + one] * bb[j]
                k += n

        @numba.njit(nogil=True, cache=True)
        def lerpw2_runs(v, w, starts, lens, c0, wa, wb, f, o, p):  # pragma: no cover
            k = 0
            for r in range(starts.size):
                n = lens[r]
                oo = o[starts[r]:starts[r] + n]
                pp = p[starts[r]:starts[r] + n]
                cc = c0[k:k + n]
                aa = wa[k:k + n]
                bb = wb[k:k + n]
                ff = f[k:k + n]
                for j in range(n):
                    c = np.uint32(cc[j])
                    oo[j] = v[c] * aa[j] + v[c + one] * bb[j]
                    b = w[c]
                    pp[j] = b + ff[j] * (w[c + one] - b)
                k += n

        @numba.njit(nogil=True, cache=True)
        def bin2_runs(src, starts, lens, c0, f, out):  # pragma: no cover - compiled
            # linear (cloud-in-cell) binning: each count split between the two cells
            # around its azimuth, rows of n + 1 cells (the wrap column is folded after)
            out[:] = 0.0
            k = 0
            for r in range(starts.size):
                n = lens[r]
                x = src[starts[r]:starts[r] + n]
                cc = c0[k:k + n]
                ff = f[k:k + n]
                for j in range(n):
                    c = np.uint32(cc[j])
                    v = np.float32(x[j])
                    t = v * ff[j]
                    out[c] += v - t
                    out[c + one] += t
                k += n

        _kernels = SimpleNamespace(bin_runs=bin_runs, gather_runs=gather_runs,
                                   density=density, lerpw_runs=lerpw_runs,
                                   lerpw2_runs=lerpw2_runs, bin2_runs=bin2_runs)
    return _kernels


class _Binned:
    """Binning of the valid pixels of polar rows ``a:b`` over runs of pixels."""

    def _init_bin(self, polar, a: int, b: int, work: dict | None) -> np.ndarray:
        n_phi = polar.n_phi
        rb = polar.r.astype(np.int64)
        # binned: every valid pixel of rows a:b (the bands' pixels and the q reach)
        idx = np.flatnonzero(polar.mask & (rb >= a) & (rb < b))
        self.bin_runs = index_runs(idx)
        self.bin_cell = (polar.cell.reshape(-1)[idx] - a * n_phi).astype(np.int32)
        # work buffers (the binned cells, and those of PolarGrid.filter_cells_cv): reused,
        # not allocated per emit, and shared through ``work`` by every plan of the same
        # grid width (an emit runs its plans one after the other). Keyed by width only and
        # grown to the largest span: keyed by span, a long count whose ring bands drift
        # between re-selections would pile up buffers without bound.
        self._shared = {} if work is None else work.setdefault(n_phi, {})
        self._n_cells = (b - a) * n_phi
        self.work: dict[str, np.ndarray] = self._shared.setdefault("filter", {})
        return rb

    def bin(self, frame: np.ndarray) -> np.ndarray:
        """Sums of ``frame`` (any real dtype, the detector's shape; masked pixels are not
        read) over the cells of rows ``a:b``, float32 ``(b - a, n_phi)`` (a work buffer
        of the plan, overwritten by the next call)."""
        s, n = self.bin_runs
        cells = self._shared.get("cells")
        if cells is None or cells.size < self._n_cells:
            cells = self._shared["cells"] = np.empty(self._n_cells, np.float32)
        cells = cells[: self._n_cells]
        _compiled().bin_runs(np.ascontiguousarray(frame).reshape(-1), s, n, self.bin_cell,
                             cells)
        return cells.reshape(-1, self.polar.n_phi)


class CellEmitPlan(_Binned):
    """What a ring kernel's emit on the 1 px-of-arc grid (narrow kernels) reuses between
    emits: binning runs, and each pixel's cell and normaliser (int32 / float32 tables,
    read by one numba pass instead of numpy's int64 gather and scatter).

    Parameters
    ----------
    polar
        The geometry's :class:`~smartbeam.analysis.kde_filters.PolarGrid`.
    rows
        ``(a, b)``: the grid rows filtered.
    sel
        Boolean ``(ny, nx)``: the pixels the kernel's values are written to.
    inv
        The kernel's normaliser on rows ``a:b`` (``PolarGrid.inv_den``).
    work
        Dict in which plans share their work buffers (per grid shape); ``None``: own.
    """

    def __init__(self, polar, rows: tuple[int, int], sel: np.ndarray,
                 inv: np.ndarray, work: dict | None = None) -> None:
        a, b = int(rows[0]), int(rows[1])
        self.polar, self.rows = polar, (a, b)
        self._init_bin(polar, a, b, work)
        idx = np.flatnonzero(sel)
        self.runs = index_runs(idx)
        self.cell = (polar.cell.reshape(-1)[idx] - a * polar.n_phi).astype(np.int32)
        self.inv_px = inv.reshape(-1)[self.cell]

    def density(self, val: np.ndarray, inv: np.ndarray, n_cell: np.ndarray) -> np.ndarray:
        """``max(val * inv, 0) * n_cell`` written over ``val`` (one pass; float32)."""
        _compiled().density(val, inv, n_cell, val)
        return val

    def to_pixels(self, cells: np.ndarray, out: np.ndarray, squared: bool = False) -> None:
        """``out.flat[pixel] = cells.flat[cell] * inv_px`` (``inv_px ** 2`` if
        ``squared``) over the plan's pixels."""
        s, n = self.runs
        _compiled().gather_runs(np.ascontiguousarray(cells).reshape(-1), s, n, self.cell,
                                self.inv_px, out.reshape(-1), squared)


def group_n_phi(top: int, sigma_ring: float) -> int:
    """Azimuthal cells of a coarse grid whose outermost row is ``top - 1`` (radius < top):
    ``sigma_ring * ARC_STEP`` px of arc there, even and a fast DFT length."""
    return 2 * sfft.next_fast_len(int(np.ceil(np.pi * top / (ARC_STEP * sigma_ring))),
                                  real=True)  # even: OpenCV's odd-length DFTs are ~3x slower


# modelled cost of a group of rows, in units of one grid cell's filtering (DFT pair,
# transfer product, q filter): a pixel binned costs ~0.6 of it and a group's fixed
# calls ~20,000 (measured at 2048^2, sigma_ring 8 and 20, one core)
_PX_COST, _GROUP_COST, _GROUP_STEP = 0.6, 20_000.0, 8


def ring_groups(row_px: np.ndarray, rows: tuple[int, int], reach: int,
                sigma_ring: float, row_cover: np.ndarray | None = None,
                ) -> list[tuple[int, int, int]]:
    """Groups of output rows for a coarse ring emit: ``[(s, e, n_phi), ...]`` covering
    ``rows``, each filtered on its own grid of ``group_n_phi(e + reach, sigma_ring)``
    cells over rows ``s - reach:e + reach``.

    One grid sized for the outermost radius over-samples the inner rows (2.7x at 504 px
    of 1449 at 2048^2); a grid per group keeps every row near ``ARC_STEP * sigma_ring``
    px of arc, at the price of the ``reach`` rows each group bins and filters on both
    sides. The split minimises a cost model of cells and pixels (dynamic programming
    over boundaries every ``_GROUP_STEP`` rows).

    Parameters
    ----------
    row_px
        Valid pixels per polar row (1 px radial cells), the whole grid.
    rows
        ``(r0, r1)``: the output rows.
    reach
        Rows each group needs beyond its output rows (twice the q-kernel radius).
    sigma_ring
        Ring kernel, px of arc.
    row_cover
        Fraction of the azimuth holding valid pixels, per row (``None``: all): a
        group's grid keeps about the largest of its rows' (:class:`RingGroupPlan`).
    """
    r0, r1 = int(rows[0]), int(rows[1])
    cover = np.ones(row_px.size) if row_cover is None else np.asarray(row_cover, float)
    n_r = row_px.size
    cum = np.concatenate(([0], np.cumsum(row_px, dtype=np.int64)))
    cand = list(range(r0, r1, _GROUP_STEP)) + [r1]

    def cost(s: int, e: int) -> tuple[float, int]:
        a, b = max(s - reach, 0), min(e + reach, n_r)
        n = group_n_phi(b, sigma_ring)
        kept = min(1.0, 1.05 * float(cover[a:b].max())) if b > a else 1.0
        return (b - a) * n * kept + _PX_COST * float(cum[b] - cum[a]) + _GROUP_COST, n

    best = [0.0] + [np.inf] * (len(cand) - 1)
    back = [0] * len(cand)
    for j in range(1, len(cand)):
        for i in range(j):
            c = best[i] + cost(cand[i], cand[j])[0]
            if c < best[j]:
                best[j], back[j] = c, i
    out = []
    j = len(cand) - 1
    while j > 0:
        i = back[j]
        out.append((cand[i], cand[j], cost(cand[i], cand[j])[1]))
        j = i
    return out[::-1]


class RingGroupPlan:
    """One group of rows of a coarse ring emit (:func:`ring_groups`): its own grid of
    ``n_phi`` cells per ring over rows ``a:b``, the kernel's transfer functions and
    normaliser there, and the pixel tables of its binning (rows ``a:b``) and of its
    interpolation (the output pixels, rows ``s:e``).

    Parameters
    ----------
    polar
        The geometry's :class:`~smartbeam.analysis.kde_filters.PolarGrid` (pixel radii,
        azimuths and mask; any ``n_phi``).
    rows
        ``(a, b)``: the rows binned and filtered.
    n_phi
        Azimuthal cells of the group's grid.
    sel
        Flat indices (increasing) of the output pixels.
    sigma_q, sigma_ring
        The ring kernel.
    work
        Dict of work buffers shared by the plans whose emits run one after the other.
    """

    def __init__(self, polar, rows: tuple[int, int], n_phi: int, sel: np.ndarray,
                 sigma_q: float, sigma_ring: float, work: dict) -> None:
        a, b = int(rows[0]), int(rows[1])
        self.rows, self.n_phi, self.work = (a, b), int(n_phi), work
        self.sigma_q, self.sigma_ring = float(sigma_q), float(sigma_ring)
        self.out_rows = (a, b)
        n = self.n_phi
        r = polar.r.reshape(-1)
        phi = polar.phi.reshape(-1)
        rb = r.astype(np.int64)
        idx = np.flatnonzero(polar.mask.reshape(-1) & (rb >= a) & (rb < b))
        self.bin_runs = index_runs(idx)
        pb = ((phi[idx] + np.pi) / (2 * np.pi) * n).astype(np.int64) % n
        col, w = self._columns(pb, a)
        self.width = w  # cells per row of the filtered grid (the DFT length)
        # linear binning: a count goes to the two cells around its azimuth, weighted by
        # its distance to their centres, so the grid keeps its azimuth to first order (a
        # count put at its cell's centre moves by up to half a cell: ~1.4x the deviation
        # from the 1 px-of-arc emit at 2048^2 once the inner rows' cells grew)
        self.bin_c0, self.bin_f = self._lerp_table(rb[idx] - a, phi[idx], col)
        cic = np.bincount(self.bin_c0, 1 - self.bin_f.astype(np.float64),
                          minlength=(b - a) * (w + 1))
        cic[1:] += np.bincount(self.bin_c0, self.bin_f.astype(np.float64),
                               minlength=(b - a) * (w + 1))[:-1]
        cic = cic.reshape(b - a, w + 1)
        cic[:, 0] += cic[:, w]
        self.n_cell = np.ascontiguousarray(cic[:, :w], np.float32)
        r_centre = np.arange(a, b) + 0.5
        tf = ring_transfer(r_centre, n, sigma_ring, length=w)
        self._ccs = {False: pack_ccs(tf * np.float32(1.0 / w), w)}
        self._r_centre = r_centre
        # the normaliser: the filtered occupancy (float64 DFT, as PolarGrid.inv_den)
        den = sfft.irfft(sfft.rfft(self.n_cell.astype(np.float64), axis=1) * tf, n=w,
                         axis=1)
        den = self._q(den.astype(np.float32), False, None)
        self.inv = np.zeros(den.shape, np.float32)
        np.divide(1.0, den, out=self.inv, where=den > 1e-6)
        self.inv2: np.ndarray | None = None
        # interpolation along the ring (cell i of a ring is taken at its centre) onto rows
        # of w + 1 cells (a wrap column), the normaliser folded into the two weights
        self.lerp_runs = index_runs(sel)
        self.c0, self.f = self._lerp_table(rb[sel] - a, phi[sel], col)
        rho, j0 = np.divmod(self.c0.astype(np.int64), w + 1)
        f = self.f.astype(np.float64)
        self.wa = ((1 - f) * self.inv[rho, j0]).astype(np.float32)
        self.wb = (f * self.inv.reshape(-1)[rho * w + (j0 + 1) % w]).astype(np.float32)

    def _lerp_table(self, rho: np.ndarray, phi: np.ndarray, col: np.ndarray,
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Left cell (rows of ``width + 1`` cells: the right one is the next, the wrap
        column at the row's end) and the weight of the right one, for pixels on rows
        ``rho`` at azimuths ``phi`` (cell i of a ring is taken at its centre)."""
        n, w = self.n_phi, self.width
        pos = (phi + np.pi) / (2 * np.pi) * n - 0.5
        fl = np.floor(pos)
        i0 = fl.astype(np.int64) % n
        j0, j1 = col[i0], col[(i0 + 1) % n]
        # both neighbours kept, and adjacent in the filtered row (or across its wrap)
        assert np.all((j0 >= 0) & ((j1 == j0 + 1) | ((j1 == 0) & (j0 == w - 1))))
        return (rho * (w + 1) + j0).astype(np.int32), (pos - fl).astype(np.float32)

    def _columns(self, pb: np.ndarray, a: int) -> tuple[np.ndarray, int]:
        """Column of each of the ``n_phi`` azimuthal cells in the filtered rows (-1: cut
        out) and the row length.

        Rings beyond the largest circle inside the detector hold valid pixels on part of
        their circumference only (4 corner arcs at 2048^2 past r = 1024): the azimuths no
        row of the group uses, bar a margin of 6 ring sigmas (at the innermost row, where
        a cell spans most sigmas), are cut out and the arcs left filtered as one shorter
        periodic row. Arcs then lie >= 12 sigmas apart, where the Gaussian weight is
        e^-72: the same values as on the whole ring to float32 rounding.
        """
        n = self.n_phi
        used = np.zeros(n, bool)
        used[pb] = True
        s_cells = self.sigma_ring * n / (2 * np.pi * (a + 0.5))
        margin = int(np.ceil(6 * s_cells)) + 2
        kept = ndimage.maximum_filter1d(used, 2 * margin + 1, mode="wrap")
        n_kept = int(kept.sum())
        w = 2 * sfft.next_fast_len(-(-n_kept // 2), real=True)
        if kept.all() or w > 0.8 * n:
            return np.arange(n), n
        # start at the first column of an arc: no arc runs across the row's wrap
        k = int(np.flatnonzero(kept & ~np.roll(kept, 1))[0])
        order = np.roll(np.arange(n), -k)
        order = order[kept[order]]
        col = np.full(n, -1, np.int64)
        col[order] = np.arange(order.size)
        return col, w

    def _buf(self, name: str, shape: tuple[int, int], cols: int | None = None) -> np.ndarray:
        # a shared flat buffer grown to the largest group; ``cols``: a view of the first
        # ``cols`` columns of a wider buffer
        size = shape[0] * shape[1]
        b = self.work.get(name)
        if b is None or b.size < size:
            b = self.work[name] = np.empty(size, np.float32)
        v = b[:size].reshape(shape)
        return v if cols is None else v[:, :cols]

    def _q(self, cells: np.ndarray, squared: bool, dst: np.ndarray | None) -> np.ndarray:
        if self.sigma_q <= 0:
            if dst is None:
                return cells
            np.copyto(dst, cells)
            return dst
        k = gaussian_kernel_1d(self.sigma_q).astype(np.float32)
        k = k * k if squared else k
        return cv2.filter2D(cells, -1, k[:, None], dst=dst, borderType=cv2.BORDER_CONSTANT)

    def filter(self, cells: np.ndarray, dst: np.ndarray, squared: bool = False) -> np.ndarray:
        """Ring then q Gaussian of float32 ``cells`` (the group's rows) into ``dst`` (may
        be a view with a row stride), as ``PolarGrid.filter_cells_cv``."""
        if squared not in self._ccs:
            w = self.width
            tf = ring_transfer(self._r_centre, self.n_phi, self.sigma_ring, True, length=w)
            self._ccs[True] = pack_ccs(tf * np.float32(1.0 / w), w)
        shape = cells.shape
        spec = cv2.dft(cells, dst=self._buf("spec", shape), flags=cv2.DFT_ROWS)
        np.multiply(spec, self._ccs[squared], out=spec)
        ring = cv2.dft(spec, dst=self._buf("ring", shape),
                       flags=cv2.DFT_ROWS | cv2.DFT_INVERSE)
        return self._q(ring, squared, dst)

    def bin(self, frame: np.ndarray) -> np.ndarray:
        """Linearly binned sums of ``frame`` (detector shape, any real dtype; masked
        pixels not read) over the group's cells, float32 ``(b - a, width)`` (a view of a
        shared work buffer)."""
        s, n = self.bin_runs
        w = self.width
        cells = self._buf("cells", (self.rows[1] - self.rows[0], w + 1))
        _compiled().bin2_runs(np.ascontiguousarray(frame).reshape(-1), s, n, self.bin_c0,
                              self.bin_f, cells.reshape(-1))
        cells[:, 0] += cells[:, w]
        return cells[:, :w]

    def emit(self, frame: np.ndarray, out: np.ndarray, var: np.ndarray | None) -> None:
        """Write the smoothed ``frame`` (and its Poisson variance into ``var``, unless
        ``None``) at the group's output pixels of ``out`` (float32, detector shape)."""
        kern = _compiled()
        n = self.width
        shape = (self.rows[1] - self.rows[0], n + 1)
        s, ln = self.lerp_runs
        pad = self._buf("pad0", shape)
        val = self.filter(self.bin(frame), pad[:, :n])
        pad[:, n] = pad[:, 0]
        if var is None:
            kern.lerpw_runs(pad.reshape(-1), s, ln, self.c0, self.wa, self.wb, out.reshape(-1))
            return
        if self.inv2 is None:
            self.inv2 = self.inv * self.inv
        # the density of each cell: the estimate times the valid pixels in it
        dens = self._buf("dens", val.shape)
        kern.density(val, self.inv, self.n_cell, dens)
        pw = self._buf("pad1", shape)
        v = self.filter(dens, self._buf("q2", val.shape), squared=True)
        np.multiply(v, self.inv2, out=pw[:, :n])
        pw[:, n] = pw[:, 0]
        kern.lerpw2_runs(pad.reshape(-1), pw.reshape(-1), s, ln, self.c0, self.wa, self.wb, self.f,
                out.reshape(-1), var.reshape(-1))


class RingEmitPlan:
    """Everything of a wide ring kernel's emit on coarse grids that depends only on the
    geometry, the kernel and its pixels (built once per kernel list, reused by emits):
    the :class:`RingGroupPlan` of each group of rows (:func:`ring_groups`).

    Parameters
    ----------
    polar
        The geometry's :class:`~smartbeam.analysis.kde_filters.PolarGrid`.
    rows
        ``(r0, r1)``: the polar rows of the kernel's pixels.
    sel
        Boolean ``(ny, nx)``: the pixels the kernel's values are written to.
    sigma_q, sigma_ring
        The ring kernel.
    work
        Dict in which plans share their work buffers; ``None``: own.
    """

    def __init__(self, polar, rows: tuple[int, int], sel: np.ndarray, sigma_q: float,
                 sigma_ring: float, work: dict | None = None) -> None:
        rad = gaussian_kernel_1d(sigma_q).size // 2 if sigma_q > 0 else 0
        # two q radii: the variance filters the estimate's density once more; one plan
        # serves both kinds of emit (the rows are filtered alike either way)
        reach = 2 * rad
        rb = polar.r.astype(np.int64)
        row_px = np.bincount(rb[polar.mask], minlength=polar.n_r)
        # azimuth covered per row, on 1 degree bins (for the cost model only)
        deg = ((polar.phi[polar.mask] + np.pi) * (180 / np.pi)).astype(np.int64) % 360
        cover = np.zeros((polar.n_r, 360), bool)
        cover[rb[polar.mask], deg] = True
        work = {} if work is None else work
        shared = work.setdefault("coarse", {})
        flat = np.flatnonzero(sel)
        rsel = rb.reshape(-1)[flat]
        self.groups = []
        # the groups split the whole grid, the same for any kernel's rows: a pixel's
        # value does not depend on which other bands share its kernel
        for s, e, n in ring_groups(row_px, (0, polar.n_r), reach, sigma_ring,
                                   cover.mean(axis=1)):
            s, e = max(s, rows[0]), min(e, rows[1])
            part = flat[(rsel >= s) & (rsel < e)] if s < e else flat[:0]
            if part.size:
                a, b = max(s - reach, 0), min(e + reach, polar.n_r)
                self.groups.append(RingGroupPlan(polar, (a, b), n, part, sigma_q,
                                                 sigma_ring, shared))
                self.groups[-1].out_rows = (s, e)
        self.rows = (int(rows[0]), int(rows[1]))

    def emit(self, frame: np.ndarray, out: np.ndarray, var: np.ndarray | None) -> None:
        """Smoothed ``frame`` (and its variance unless ``var`` is ``None``) written at the
        kernel's pixels of ``out`` (float32 maps of the detector's shape)."""
        for g in self.groups:
            g.emit(frame, out, var)
