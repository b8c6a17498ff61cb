"""Emitted ring smoothing of wide ring kernels on a coarser azimuthal grid.

The emitted ring smoothing (:func:`smartbeam.analysis.kde.apply_kernels`) works on a polar
grid of ~1 px of arc at the detector corner: 1449 x 9216 cells (13.4 M, 53 MB in float32)
for a 2048^2 detector, 3x its pixels, so binning, both DFTs and the q filter are bound by
that grid. A ring kernel of ``sigma_ring`` px of arc keeps no harmonic above
~5.3 r / sigma_ring, so for wide kernels the counts are binned on a grid of
``sigma_ring / 5`` px of arc at the corner (:func:`coarse_n_phi`) and the smoothed cells
are linearly interpolated along the ring to each pixel's azimuth (:class:`RingEmitPlan`).
The coarser cells add their box width in quadrature to the kernel: (1/5)^2 / 12 = 0.3 % of
sigma_ring^2 at the corner (less inside); the interpolation attenuates the kept harmonics
by at most ~0.4 % (both measured by the tests against the 1 px-of-arc path).

Binning and interpolation are the passes over the ~3.4 M pixels of a 2048^2 emit, so
they run as numba loops over runs of consecutive pixels with int32 / float32 tables
that depend only on the geometry and the kernel (cached between emits): the earlier
flat-index tables (int64 pixel, two int64 cells and a weight: 28 B per pixel) made the
interpolation ~3x slower than the 8 B per pixel read here.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

__all__ = ["ARC_STEP", "MIN_N_PHI", "CellEmitPlan", "RingEmitPlan", "coarse_n_phi", "index_runs"]

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
    n = 2 * sfft.next_fast_len(int(np.ceil(np.pi * n_r / (ARC_STEP * sigma_ring))),
                               real=True)  # even: OpenCV's odd-length DFTs are ~3x slower
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
        def lerp_runs(v, starts, lens, c0, f, o):  # pragma: no cover - runs compiled
            # v has a wrap column (n_phi + 1 per ring): the right neighbour is c0 + 1
            k = 0
            for r in range(starts.size):
                n = lens[r]
                oo = o[starts[r]:starts[r] + n]
                cc = c0[k:k + n]
                ff = f[k:k + n]
                for j in range(n):
                    c = np.uint32(cc[j])
                    a = v[c]
                    oo[j] = a + ff[j] * (v[c + one] - a)
                k += n

        @numba.njit(nogil=True, cache=True)
        def lerp2_runs(v, w, starts, lens, c0, f, o, p):  # pragma: no cover - compiled
            k = 0
            for r in range(starts.size):
                n = lens[r]
                oo = o[starts[r]:starts[r] + n]
                pp = p[starts[r]:starts[r] + n]
                cc = c0[k:k + n]
                ff = f[k:k + n]
                for j in range(n):
                    c = np.uint32(cc[j])
                    t = ff[j]
                    a = v[c]
                    oo[j] = a + t * (v[c + one] - a)
                    b = w[c]
                    pp[j] = b + t * (w[c + one] - b)
                k += n

        @numba.njit(nogil=True, cache=True)
        def est_dens(val, inv, n_cell, est, dens):  # pragma: no cover - runs compiled
            # the normalised estimate and the Poisson density of each cell in one pass
            for i in range(val.shape[0]):
                for j in range(val.shape[1]):
                    e = val[i, j] * inv[i, j]
                    est[i, j] = e
                    dens[i, j] = max(e, np.float32(0.0)) * n_cell[i, j]

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

        _kernels = (bin_runs, lerp_runs, lerp2_runs, est_dens, gather_runs, density)
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
        _compiled()[0](np.ascontiguousarray(frame).reshape(-1), s, n, self.bin_cell, cells)
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
        _compiled()[5](val, inv, n_cell, val)
        return val

    def to_pixels(self, cells: np.ndarray, out: np.ndarray, squared: bool = False) -> None:
        """``out.flat[pixel] = cells.flat[cell] * inv_px`` (``inv_px ** 2`` if
        ``squared``) over the plan's pixels."""
        s, n = self.runs
        _compiled()[4](np.ascontiguousarray(cells).reshape(-1), s, n, self.cell, self.inv_px,
                       out.reshape(-1), squared)


class RingEmitPlan(_Binned):
    """Everything of a ring kernel's emit on a coarse grid that depends only on the
    geometry, the kernel and its pixels (built once per kernel list, reused by emits).

    Parameters
    ----------
    polar
        Coarse :class:`~smartbeam.analysis.kde_filters.PolarGrid` of the emit.
    rows
        ``(a, b)``: the grid rows filtered (the region's radii plus the q-kernel reach).
    sel
        Boolean ``(ny, nx)``: the pixels the kernel's values are written to.
    work
        Dict in which plans share their work buffers (per grid shape); ``None``: own.
    """

    def __init__(self, polar, rows: tuple[int, int], sel: np.ndarray,
                 work: dict | None = None) -> None:
        a, b = int(rows[0]), int(rows[1])
        n_phi = polar.n_phi
        self.polar, self.rows, self.n_phi = polar, (a, b), n_phi
        rb = self._init_bin(polar, a, b, work)
        # interpolated: the pixels of the bands, onto rows of n_phi + 1 cells (wrap)
        idx = np.flatnonzero(sel)
        self.lerp_runs = index_runs(idx)
        rho = rb.reshape(-1)[idx]
        pos = (polar.phi.reshape(-1)[idx] + np.pi) / (2 * np.pi) * n_phi - 0.5
        fl = np.floor(pos)
        i0 = fl.astype(np.int64) % n_phi  # cell i of a ring is taken at its centre
        self.c0 = ((rho - a) * (n_phi + 1) + i0).astype(np.int32)
        self.f = (pos - fl).astype(np.float32)
        self._pads: list[np.ndarray] = []
        self.inv2: np.ndarray | None = None

    def padded(self, slot: int) -> np.ndarray:
        """Work buffer ``(b - a, n_phi + 1)`` float32: write the cell values into
        ``[:, :n_phi]``, then :meth:`to_pixels` (which fills the wrap column)."""
        while len(self._pads) <= slot:
            self._pads.append(np.empty((self.rows[1] - self.rows[0], self.n_phi + 1),
                                       np.float32))
        return self._pads[slot]

    def estimate_and_density(self, val: np.ndarray, inv: np.ndarray, n_cell: np.ndarray,
                             est: np.ndarray) -> np.ndarray:
        """``est[:] = val * inv`` and, returned in ``val``'s place, the density
        ``max(est, 0) * n_cell`` of each cell (one pass instead of three; float32)."""
        _compiled()[3](val, inv, n_cell, est, val)
        return val

    def to_pixels(self, pad: np.ndarray, out: np.ndarray, pad2: np.ndarray | None = None,
                  out2: np.ndarray | None = None) -> None:
        """Interpolate the cells of :meth:`padded` buffers along the ring to the pixels:
        ``out.flat[pixel] = v[c0] + f * (v[c0 + 1] - v[c0])``; a second map in the same
        pass when ``pad2`` and ``out2`` are given."""
        s, n = self.lerp_runs
        kern = _compiled()
        pad[:, -1] = pad[:, 0]
        if pad2 is None:
            kern[1](pad.reshape(-1), s, n, self.c0, self.f, out.reshape(-1))
            return
        pad2[:, -1] = pad2[:, 0]
        kern[2](pad.reshape(-1), pad2.reshape(-1), s, n, self.c0, self.f, out.reshape(-1),
                out2.reshape(-1))
