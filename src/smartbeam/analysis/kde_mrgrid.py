"""Multi-resolution polar grid for scoring ring kernels in the cross-validation.

A polar grid with one azimuthal resolution for every radius over-samples the inner rings:
at 1024^2 (2304 cells per ring, ~2 px of arc at the corner) a ring of radius 100 px gets
0.27 px of arc per cell. :class:`MultiPolar` splits the radii into groups of
``group_rows`` 1-px rows, each with its own ``n_phi`` (~``arc_px`` px of arc at the
group's outer radius, rounded up to a fast DFT length): about half the cells at 1024^2,
so half the binning writes, forward DFTs and inverse DFTs of the ring filter.

A ring kernel is filtered along the ring per group (packed real DFT, only the harmonics it
keeps), then along q at the scored cells only (:func:`ring_q_multi`): the q window of a
cell reads each group it overlaps at the cell's azimuth, linearly interpolated between the
two samples around it (exact in the cell's own group when the group's grid is kept whole).
The mask normaliser goes through the same two steps applied to the cell occupancy, so
numerator and denominator see the same approximation.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import scipy.fft as sfft

from .kde_filters import pack_ccs

__all__ = ["MultiPolar", "MultiRingGrid", "q_window", "ring_q_multi", "segments"]

# as in kde_score: spectra cut where the transfer function is < exp(-TAIL^2 / 2), filtered
# rows sampled every ARC_STEP * sigma_ring px of arc (or finer) at the group's outer radius
_TAIL = 5.3
_ARC_STEP = 0.2

_kernel = None


def _even_fast_len(n: int) -> int:
    """Smallest even 5-smooth length >= ``n``: OpenCV's real DFT of odd lengths (405, 625,
    1215, ...) measured ~3x slower per value than of even ones (one core)."""
    return 2 * sfft.next_fast_len((int(n) + 1) // 2, real=True)


def _compiled():
    """numba kernel of :func:`ring_q_multi` (compiled once, cached on disk)."""
    global _kernel
    if _kernel is None:
        import numba

        # fastmath: lets LLVM vectorise the short dot products (reassociated sums)
        @numba.njit(nogil=True, cache=True, fastmath=True)
        def ring_q(buf, buf2, cnt, soa, sob, sf, sdlo, sdhi, w, lo, hi, inv,
                   out, out2):  # pragma: no cover - runs compiled
            # cell t, segment k (a group its window overlaps, :func:`segments`): window
            # taps sdlo..sdhi lie in that group; tap d reads buf[soa + d] and
            # buf[sob + d] (the samples before and after the cell's azimuth),
            # interpolated with weight sf. buf2 (same layout, e.g. the other thinned
            # half) is filtered in the same pass into out2 when it is not empty. The
            # per-cell tables are precomputed per grid layout: the group arithmetic
            # and bounds logic they replace cost more than the dot products of narrow
            # q kernels (one-tap kernels take their own, equal, path)
            two = buf2.size > 0
            n_k = w.shape[0]
            for t in range(cnt.size):
                for i in range(n_k):
                    acc = np.float32(0.0)
                    acc2 = np.float32(0.0)
                    for k in range(cnt[t]):
                        d0 = max(lo[i], np.int64(sdlo[t, k]))
                        d1 = min(hi[i], np.int64(sdhi[t, k]))
                        if d1 <= d0:
                            continue
                        oa = np.int64(soa[t, k])
                        ff = sf[t, k]
                        sa = np.float32(0.0)
                        sa2 = np.float32(0.0)
                        if d1 - d0 == 1:
                            wt = w[i, d0]
                            sa = wt * buf[oa + d0]
                            if two:
                                sa2 = wt * buf2[oa + d0]
                            if ff != 0.0:
                                ob = np.int64(sob[t, k])
                                sb = wt * buf[ob + d0]
                                sa += ff * (sb - sa)
                                if two:
                                    sb2 = wt * buf2[ob + d0]
                                    sa2 += ff * (sb2 - sa2)
                            acc += sa
                            acc2 += sa2
                            continue
                        wa = w[i, d0:d1]
                        xa = buf[oa + d0:oa + d1]
                        if ff == 0.0:
                            for j in range(d1 - d0):
                                sa += wa[j] * xa[j]
                            if two:
                                ya = buf2[oa + d0:oa + d1]
                                for j in range(d1 - d0):
                                    sa2 += wa[j] * ya[j]
                        else:
                            ob = np.int64(sob[t, k])
                            xb = buf[ob + d0:ob + d1]
                            sb = np.float32(0.0)
                            for j in range(d1 - d0):
                                sa += wa[j] * xa[j]
                                sb += wa[j] * xb[j]
                            sa += ff * (sb - sa)
                            if two:
                                ya = buf2[oa + d0:oa + d1]
                                yb = buf2[ob + d0:ob + d1]
                                sb2 = np.float32(0.0)
                                for j in range(d1 - d0):
                                    sa2 += wa[j] * ya[j]
                                    sb2 += wa[j] * yb[j]
                                sa2 += ff * (sb2 - sa2)
                        acc += sa
                        acc2 += sa2
                    out[i, t] = acc * inv[i, t]
                    if two:
                        out2[i, t] = acc2 * inv[i, t]

        _kernel = ring_q
    return _kernel


class MultiRingGrid:
    """Ring-filtered cells of a :class:`MultiPolar`, per group azimuth-major, in one buffer.

    Attributes
    ----------
    values
        float32 flat buffer; group ``g`` holds ``n_out[g] * n_rows[g]`` values from
        ``offset[g]``, sample ``i`` of its row ``r`` at ``offset[g] + i * n_rows[g] + r``.
    n_out, offset
        int64 ``(n_groups,)`` samples per ring and buffer offsets.
    sigma_ring
        Along-ring standard deviation applied, px of arc.
    """

    def __init__(self, values: np.ndarray, n_out: np.ndarray, offset: np.ndarray,
                 sigma_ring: float) -> None:
        self.values = values
        self.n_out = n_out
        self.offset = offset
        self.sigma_ring = float(sigma_ring)

    @property
    def nbytes(self) -> int:
        """Memory held."""
        return int(self.values.nbytes)


class MultiPolar:
    """Polar cells of 1 px in radius with an azimuthal resolution per group of radii.

    Parameters
    ----------
    mask
        Boolean valid-pixel mask ``(ny, nx)``.
    r, phi
        Radius (px) and azimuth (rad, in [-pi, pi]) of every pixel around the beam centre.
    arc_px
        Azimuthal cell size, px of arc at the outer radius of each group.
    group_rows
        Radial rows (1 px each) per group.
    """

    def __init__(self, mask: np.ndarray, r: np.ndarray, phi: np.ndarray, *,
                 arc_px: float = 2.0, group_rows: int = 128) -> None:
        self.mask = mask
        self.arc_px = float(arc_px)
        rho = r.astype(np.int64)
        self.n_r = int(rho.max()) + 1
        edges = list(range(0, self.n_r, int(group_rows))) + [self.n_r]
        if len(edges) > 2 and edges[-1] - edges[-2] < group_rows // 2:
            del edges[-2]  # a short last group joins the one before
        self.r0 = np.array(edges[:-1], np.int64)
        self.n_rows = np.diff(np.array(edges, np.int64))
        self.n_phi_g = np.array([_even_fast_len(max(16, int(np.ceil(2 * np.pi * e
                                                                    / self.arc_px))))
                                 for e in edges[1:]], np.int64)
        sizes = self.n_rows * self.n_phi_g
        self.offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.size = int(sizes.sum())
        self.n_phi = int(self.n_phi_g.max())
        self.grp_of_row = np.repeat(np.arange(self.r0.size), self.n_rows).astype(np.int64)
        g = self.grp_of_row[rho]
        n = self.n_phi_g[g]
        u = (phi + np.pi) / (2 * np.pi)
        p = (u * n).astype(np.int64) % n
        self.cell = self.offset[g] + (rho - self.r0[g]) * n + p
        self.rho = rho
        it = np.int32 if self.size < 2**31 - 1 else np.int64
        self._cell32 = np.ascontiguousarray(np.where(mask, self.cell, self.size).astype(it))
        self.n_cell = np.bincount(self.cell[mask], minlength=self.size).astype(np.float32)
        self._tf: dict[tuple, np.ndarray] = {}

    def cell_index32(self) -> np.ndarray:
        """Flat cell of each pixel (masked pixels: ``size``, a spare cell past the grid)."""
        return self._cell32

    @property
    def n_cells(self) -> int:
        """Number of cells (the binning kernels' ``n_r * n_phi``)."""
        return self.size

    def to_cells(self, frame: np.ndarray) -> np.ndarray:
        """Sums of ``frame`` over the valid pixels of each cell, float32 flat ``(size,)``."""
        return np.bincount(self.cell[self.mask], weights=frame[self.mask],
                           minlength=self.size).astype(np.float32)

    def group(self, flat: np.ndarray, g: int) -> np.ndarray:
        """View of group ``g`` of a flat cell array as ``(n_rows, n_phi)``."""
        o = self.offset[g]
        return flat[o:o + self.n_rows[g] * self.n_phi_g[g]].reshape(self.n_rows[g],
                                                                   self.n_phi_g[g])

    def cell_azimuth(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Radial row and azimuth (fraction of a turn, at the cell centre) of flat cells."""
        g = np.searchsorted(self.offset, cells, side="right") - 1
        local = cells - self.offset[g]
        row, p = np.divmod(local, self.n_phi_g[g])
        return row + self.r0[g], (p + 0.5) / self.n_phi_g[g]

    def spectrum(self, cells: np.ndarray) -> list[np.ndarray]:
        """Packed real DFT (OpenCV CCS layout) of each group's rows."""
        return [cv2.dft(np.ascontiguousarray(self.group(cells, g)), flags=cv2.DFT_ROWS)
                for g in range(self.r0.size)]

    def _transfer(self, g: int, sigma_ring: float, n_pack: int) -> np.ndarray:
        """Ring transfer function of group ``g`` (packed, first ``n_pack`` values, divided
        by the largest ``n_phi``: see :meth:`ring_grid`). The sampled periodic Gaussian's
        DFT, as :meth:`smartbeam.analysis.kde_filters.PolarGrid.phi_transfer`. Cached."""
        key = (g, float(sigma_ring), int(n_pack))
        if key not in self._tf:
            n_phi = int(self.n_phi_g[g])
            r_centre = self.r0[g] + np.arange(self.n_rows[g]) + 0.5
            d = np.arange(n_phi)
            d = np.minimum(d, n_phi - d).astype(float)
            s = np.maximum(sigma_ring / (r_centre * 2 * np.pi / n_phi), 1e-3)[:, None]
            k = np.exp(-0.5 * (d[None, :] / s) ** 2)
            k /= k.sum(axis=1, keepdims=True)
            # 1 / n_phi for the unscaled inverse, times n_phi / n_ref (:meth:`ring_grid`)
            tf = sfft.rfft(k, axis=1).real.astype(np.float32) * np.float32(1.0 / self.n_phi)
            self._tf[key] = np.ascontiguousarray(pack_ccs(tf, n_phi)[:, :n_pack])
        return self._tf[key]

    def _layout(self, sigma_ring: float) -> tuple:
        """``(n_out, sizes, offset, n_pack)`` of :meth:`ring_grid` per group for
        ``sigma_ring`` (cached: the same few bandwidths on every selection)."""
        key = ("layout", sigma_ring)
        if key not in self._tf:
            n_g = self.r0.size
            n_out = self.n_phi_g.copy()
            n_pack = [0] * n_g
            if sigma_ring > 0:
                for g in range(n_g):
                    r_max = float(self.r0[g] + self.n_rows[g])
                    m = int(np.ceil(_TAIL * r_max / sigma_ring)) + 2
                    n = _even_fast_len(max(2 * (m - 1), int(np.ceil(
                        2 * np.pi * r_max / (_ARC_STEP * sigma_ring)))))
                    if n < self.n_phi_g[g] and m < self.n_phi_g[g] // 2 + 1:
                        n_out[g] = n
                        n_pack[g] = 2 * min(m, n // 2) - 1
            sizes = n_out * self.n_rows
            offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
            for a in (n_out, sizes, offset):
                a.flags.writeable = False  # shared by every grid of this layout
            self._tf[key] = (n_out, sizes, offset, n_pack)
        return self._tf[key]

    def ring_grid(self, spectra: Sequence[np.ndarray] | None, cells: np.ndarray,
                  sigma_ring: float) -> MultiRingGrid:
        """Filter every group along the ring, at the azimuthal sampling the kernel needs.

        Per group, only the harmonics below ~5.3 r_outer / sigma_ring are kept and inverted
        at ``n_out`` azimuths (~``sigma_ring / 5`` px of arc at the group's outer radius);
        narrow kernels keep the group's cells (exact).

        Parameters
        ----------
        spectra
            :meth:`spectrum` of ``cells`` (may be ``None`` when ``sigma_ring == 0``).
        cells
            Flat cell sums ``(size,)``.
        sigma_ring
            Along-ring standard deviation, px of arc (0: the cells themselves).

        Returns
        -------
        MultiRingGrid
            Values scaled by ``n_phi / n_ref`` of their group (``n_ref``: the largest
            ``n_phi``): cell sums per the same angle in every group, so that a q window
            across groups weighs the radii as a uniform grid does (a cell of a coarser
            group holds more pixels); numerator and normaliser get the same scale.
        """
        n_out, sizes, offset, n_packs = self._layout(float(sigma_ring))
        buf = np.empty(int(sizes.sum()), np.float32)
        for g in range(self.r0.size):
            n_phi, n = int(self.n_phi_g[g]), int(n_out[g])
            if sigma_ring <= 0:
                vals = self.group(cells, g) * np.float32(n_phi / self.n_phi)
            else:
                spec = spectra[g]
                if n == n_phi:
                    prod = np.multiply(spec, self._transfer(g, sigma_ring, n_phi))
                else:
                    n_pack = n_packs[g]
                    prod = np.zeros((spec.shape[0], n), np.float32)
                    np.multiply(spec[:, :n_pack], self._transfer(g, sigma_ring, n_pack),
                                out=prod[:, :n_pack])
                vals = cv2.dft(prod, flags=cv2.DFT_ROWS | cv2.DFT_INVERSE)
            # azimuth-major: the q window of a cell is a contiguous run
            dst = buf[offset[g]:offset[g] + sizes[g]].reshape(n, self.n_rows[g])
            cv2.transpose(np.ascontiguousarray(vals, np.float32), dst=dst)
        return MultiRingGrid(buf, n_out, offset, sigma_ring)


def segments(polar: MultiPolar, grid: MultiRingGrid, rho: np.ndarray, u: np.ndarray,
             rad: int = 16) -> tuple:
    """Where the q windows of cells read a ring-filtered grid (cache it per grid layout).

    For each cell, the groups its window of ``2 rad + 1`` rows overlaps (at most two when
    groups hold ``2 rad + 1`` rows or more): the taps of the window in that group, where
    tap 0 would be read at the samples before and after the cell's azimuth, and the
    linear interpolation weight.

    Returns
    -------
    tuple
        ``(rad, cnt, oa, ob, f, dlo, dhi)``: ``cnt`` the number of segments per cell
        ``(n_cells,)``; per segment ``(n_cells, n_segments)``, used up to ``cnt``: the
        buffer positions ``oa``/``ob`` of tap 0 at the two samples, the weight ``f`` of
        the second, and the taps ``dlo:dhi`` (of ``0:2 rad + 1``) in the segment's group.
    """
    n_seg = 1 + -(-2 * rad // int(polar.n_rows.min()))  # groups a window can overlap
    t = rho.size
    rho = np.asarray(rho, np.int64)
    base = rho - rad
    g0 = polar.grp_of_row[np.maximum(base, 0)]
    n_g = polar.r0.size
    # int32 positions while the buffer allows (smaller tables, read once per pass)
    it = np.int32 if grid.values.size < 2**31 - 2 * rad - 2 else np.int64
    cnt = np.zeros(t, np.int32)
    oa, ob = np.zeros((t, n_seg), it), np.zeros((t, n_seg), it)
    dlo, dhi = np.zeros((t, n_seg), np.int32), np.zeros((t, n_seg), np.int32)
    f = np.zeros((t, n_seg), np.float32)
    for k in range(n_seg):
        gg = np.minimum(g0 + k, n_g - 1)
        r0, nr, n = polar.r0[gg], polar.n_rows[gg], grid.n_out[gg]
        lo = np.maximum(r0 - base, 0)
        hi = np.minimum(r0 + nr - base, 2 * rad + 1)
        # sample i of a group sits at the centre of its cell i * n_phi / n_out
        pos = u * n - 0.5 * n / polar.n_phi_g[gg]
        near = np.rint(pos)
        pos = np.where(np.abs(pos - near) < 1e-6, near, pos)  # exact sample positions
        fl = np.floor(pos)
        ia = fl.astype(np.int64) % n
        ib = (ia + 1) % n
        use = np.flatnonzero((g0 + k < n_g) & (hi > lo))
        slot = cnt[use]
        off = grid.offset[gg] + base - r0
        oa[use, slot] = (off + ia * nr)[use]
        ob[use, slot] = (off + ib * nr)[use]
        f[use, slot] = (pos - fl).astype(np.float32)[use]
        dlo[use, slot] = lo[use]
        dhi[use, slot] = hi[use]
        cnt[use] += 1
    return rad, cnt, oa, ob, f, dlo, dhi


_taps_cache: dict[tuple, list] = {}
_window_cache: dict[tuple, tuple] = {}


def _q_taps(sigma_qs: Sequence[float]) -> list[np.ndarray]:
    """float32 Gaussian taps of each sigma_q (one tap for 0); cached per set."""
    key = tuple(float(q) for q in sigma_qs)
    if key not in _taps_cache:
        from .kde_filters import gaussian_kernel_1d

        _taps_cache[key] = [gaussian_kernel_1d(s).astype(np.float32) if s > 0
                            else np.ones(1, np.float32) for s in key]
    return _taps_cache[key]


def q_window(sigma_qs: Sequence[float], big: int) -> tuple:
    """``(w, lo, hi)`` of :func:`ring_q_multi`'s kernel: the taps of each sigma_q centred
    in a window of ``2 big + 1`` and their first and end tap; cached (a search asks for
    the same few sets on every call)."""
    key = (tuple(float(q) for q in sigma_qs), int(big))
    if key not in _window_cache:
        ks = _q_taps(sigma_qs)
        w = np.zeros((len(ks), 2 * big + 1), np.float32)
        lo = np.empty(len(ks), np.int64)
        for i, k in enumerate(ks):
            lo[i] = big - k.size // 2
            w[i, lo[i]:lo[i] + k.size] = k
        hi = lo + np.array([k.size for k in ks], np.int64)
        _window_cache[key] = (w, lo, hi)
    return _window_cache[key]


def ring_q_multi(polar: MultiPolar, grid: MultiRingGrid, rho: np.ndarray, u: np.ndarray,
                 sigma_qs: Sequence[float], inv: np.ndarray | None = None,
                 seg: tuple | None = None, grid2: MultiRingGrid | None = None,
                 ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Apply q kernels at cells (radial row ``rho``, azimuth ``u``) of a ring-filtered grid.

    Parameters
    ----------
    polar
        The :class:`MultiPolar` of ``grid``.
    grid
        :meth:`MultiPolar.ring_grid` result.
    rho, u
        int64 radial rows and float64 azimuths (fraction of a turn) of the cells.
    sigma_qs
        Standard deviations along q (>= 0), px.
    inv
        float32 ``(len(sigma_qs), n)`` normalisers multiplied in (1 when ``None``).
    seg
        :func:`segments` of these cells for ``grid``'s layout (computed when ``None`` or
        when its window is narrower than the widest q kernel).

    grid2
        A second grid of the same layout (same ``sigma_ring``), filtered in the same pass
        (the tables and loop overhead are shared: both thinned halves at once).

    Returns
    -------
    numpy.ndarray or tuple
        float32 ``(len(sigma_qs), n)``; a pair of them with ``grid2``.
    """
    ks = _q_taps(sigma_qs)
    rad = max(k.size // 2 for k in ks)
    if seg is None or seg[0] < rad:
        seg = segments(polar, grid, rho, u, max(rad, 16))
    w, lo, hi = q_window(sigma_qs, seg[0])
    if inv is None:
        inv = np.ones((len(ks), rho.size), np.float32)
    out = np.empty((len(ks), rho.size), np.float32)
    if grid2 is not None and not np.array_equal(grid2.n_out, grid.n_out):
        raise ValueError("grid2 has another layout than grid")  # internal misuse
    out2 = np.empty_like(out) if grid2 is not None else np.empty((0, 0), np.float32)
    buf2 = grid2.values if grid2 is not None else np.empty(0, np.float32)
    _compiled()(grid.values, buf2, *seg[1:], w, lo, hi,
                np.ascontiguousarray(inv, np.float32), out, out2)
    return out if grid2 is None else (out, out2)
