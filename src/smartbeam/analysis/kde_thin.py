"""Binomial thinning of a counts frame into two halves, and their polar binning.

The cross-validation of :func:`smartbeam.analysis.kde.select_bandwidths` needs, for each
random halving ``A + B = X`` (``A ~ Binomial(X, 1/2)``), both halves as float32 frames that
are zero outside the mask (for the isotropic kernels) and summed over the polar cells (for
the ring kernels). :func:`thin_masked` draws both halves in one pass over the frame;
:func:`bin_cells` sums both over the polar cells in one pass in pixel order.

numba is used (it is a dependency of the stack, see :mod:`.kde_stream`) because numpy needs
~10 passes over the frame for the thinning (~8 ms at 1024^2, one core) and a scattered
float64 ``bincount`` per half (~20 ms each); the loops here measured ~2 ms and ~6 ms (both
halves). The random bits come from a counter-based SplitMix64 stream keyed by a seed drawn
from the caller's generator, so results are reproducible from that generator. Without numba
the numpy path (:func:`smartbeam.analysis.kde.thin`, ``PolarGrid.to_cells``) is used.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bin_cells", "bin_frame", "thin_masked"]

_kernel = None  # the compiled kernel; False when numba is unavailable


def _compiled():
    global _kernel
    if _kernel is None:
        try:
            import numba
        except ImportError:  # pragma: no cover - numba comes with the pinned stack
            _kernel = False
            return None

        m1 = np.uint64(0x5555555555555555)
        m2 = np.uint64(0x3333333333333333)
        m4 = np.uint64(0x0F0F0F0F0F0F0F0F)
        h01 = np.uint64(0x0101010101010101)

        @numba.njit(nogil=True, cache=True, inline="always")
        def popcount(v):  # pragma: no cover - runs compiled
            v = v - ((v >> np.uint64(1)) & m1)
            v = (v & m2) + ((v >> np.uint64(2)) & m2)
            v = (v + (v >> np.uint64(4))) & m4
            return np.int64((v * h01) >> np.uint64(56))

        @numba.njit(nogil=True, cache=True, inline="always")
        def splitmix(z):  # pragma: no cover - runs compiled
            z = z + np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            return z ^ (z >> np.uint64(31))

        @numba.njit(nogil=True, cache=True)
        def thin_pass(x, keep, key, a_out, b_out):  # pragma: no cover - runs compiled
            # A ~ Binomial(x, 1/2) as the number of set bits among x random bits (exact
            # for x <= 63); branch-free so that the loop stays fast. Returns how many
            # pixels hold more than 63 counts (thinned afterwards by thin_big).
            xf = x.reshape(-1)
            kf = keep.reshape(-1)
            af = a_out.reshape(-1)
            bf = b_out.reshape(-1)
            big = 0
            for i in range(xf.size):
                n = np.int64(xf[i]) * np.int64(kf[i])
                big += n > 63
                nn = min(n, np.int64(63))
                bits = splitmix(key + np.uint64(i)) & ((np.uint64(1) << np.uint64(nn))
                                                       - np.uint64(1))
                a = popcount(bits)
                af[i] = a
                bf[i] = n - a
            return big

        @numba.njit(nogil=True, cache=True)
        def thin_big(x, keep, key, a_out, b_out):  # pragma: no cover - runs compiled
            # pixels above 63 counts: 64 bits per word of the same counter stream up to
            # 4096 counts, numba's binomial (seeded from the key) beyond
            np.random.seed(np.int64(key & np.uint64(0x7FFFFFFF)))
            xf = x.reshape(-1)
            kf = keep.reshape(-1)
            af = a_out.reshape(-1)
            bf = b_out.reshape(-1)
            for i in range(xf.size):
                n = np.int64(xf[i]) * np.int64(kf[i])
                if n <= 63:
                    continue
                if n <= 4096:
                    a = np.int64(0)
                    ctr = splitmix(key ^ np.uint64(i))
                    left = n
                    while left > 0:
                        ctr += np.uint64(0x632BE59BD9B4E019)
                        bits = splitmix(ctr)
                        if left < 64:
                            bits &= (np.uint64(1) << np.uint64(left)) - np.uint64(1)
                        a += popcount(bits)
                        left -= 64
                else:
                    a = np.int64(np.random.binomial(n, 0.5))
                af[i] = a
                bf[i] = n - a

        @numba.njit(nogil=True, cache=True)
        def bin_scatter(a, b, cell, out_a, out_b):  # pragma: no cover - compiled
            # pixel order: sequential reads, and the cells a detector row falls in stay
            # in cache from one row to the next (the pixels of masked cells go to a
            # spare cell at the end of the outputs)
            fa = a.reshape(-1)
            fb = b.reshape(-1)
            fc = cell.reshape(-1)
            out_a[:] = 0.0
            out_b[:] = 0.0
            for i in range(fc.size):
                c = fc[i]
                out_a[c] += fa[i]
                out_b[c] += fb[i]

        @numba.njit(nogil=True, cache=True)
        def bin_one(a, cell, out_a):  # pragma: no cover - compiled
            fa = a.reshape(-1)
            fc = cell.reshape(-1)
            out_a[:] = 0.0
            for i in range(fc.size):
                out_a[fc[i]] += fa[i]

        def thin_bin(x, keep, key, a_out, b_out):
            if thin_pass(x, keep, key, a_out, b_out):
                thin_big(x, keep, key, a_out, b_out)

        _kernel = (thin_bin, bin_scatter, bin_one)
    return _kernel or None


def thin_masked(counts: np.ndarray, geometry, rng: np.random.Generator,
                out: tuple[np.ndarray, np.ndarray] | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """Split counts into two independent Poisson halves, as masked float32 frames.

    ``A ~ Binomial(X, 1/2)`` and ``B = X - A`` per valid pixel (exact: the number of set
    bits among ``X`` random bits; numba's binomial above 4096 counts).

    Parameters
    ----------
    counts
        Integer (or integral float) counts, non-negative, of the detector's shape.
    geometry
        :class:`smartbeam.analysis.kde.Geometry` of the detector.
    rng
        Generator the thinning draws from (one 64-bit key per call).
    out
        Two float32 frames of the detector's shape to write the halves into.

    Returns
    -------
    a, b
        float32 halves, 0 outside the mask.
    """
    kern = _compiled()
    if out is None:
        out = (np.empty(geometry.shape, np.float32), np.empty(geometry.shape, np.float32))
    a32, b32 = out
    if kern is None:  # pragma: no cover - numba comes with the pinned stack
        from .kde import thin

        a, b = thin(counts, rng)
        np.multiply(a, geometry.mask, out=a32, casting="unsafe")
        np.multiply(b, geometry.mask, out=b32, casting="unsafe")
        return a32, b32
    x = np.asarray(counts)
    if x.dtype.kind == "f":
        x = np.rint(x).astype(np.int64)
    key = np.uint64(rng.integers(0, 2**63, dtype=np.int64))
    kern[0](np.ascontiguousarray(x), geometry.mask_u8, key, a32, b32)
    return a32, b32


def bin_cells(a: np.ndarray, b: np.ndarray, polar) -> tuple[np.ndarray, np.ndarray]:
    """Sums of two float32 frames (zero outside the mask) over each polar cell.

    Same result as :meth:`smartbeam.analysis.kde_filters.PolarGrid.to_cells` of each frame
    (float32 sums instead of float64 ones); one pass in pixel order over both frames
    instead of a float64 ``bincount`` per frame: ~6 ms for both at 1024^2 (one core),
    against ~9 ms for a pass in cell order over pixels pre-sorted by cell (gathered
    reads) and ~40 ms for two ``bincount``.

    Parameters
    ----------
    a, b
        float32 frames of the detector's shape (the two halves of a thinning).
    polar
        :class:`smartbeam.analysis.kde_filters.PolarGrid` (or
        :class:`smartbeam.analysis.kde_mrgrid.MultiPolar`) to bin into.

    Returns
    -------
    cells_a, cells_b
        float32 ``(n_r, n_phi)`` each (flat ``(n_cells,)`` for a ``MultiPolar``).
    """
    kern = _compiled()
    if kern is None:  # pragma: no cover - numba comes with the pinned stack
        return polar.to_cells(a), polar.to_cells(b)
    cell = polar.cell_index32()
    # a multi-resolution grid (kde_mrgrid.MultiPolar) has flat cells
    flat = hasattr(polar, "n_cells")
    n = polar.n_cells if flat else polar.n_r * polar.n_phi
    out = [np.empty(n + 1, np.float32) for _ in range(2)]
    kern[1](np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32), cell,
            out[0], out[1])
    if flat:
        return out[0][:n], out[1][:n]
    return out[0][:n].reshape(polar.n_r, polar.n_phi), out[1][:n].reshape(polar.n_r,
                                                                         polar.n_phi)


def bin_frame(a: np.ndarray, polar) -> np.ndarray:
    """Sums of one float32 frame (zero outside the mask) over the cells of a
    :class:`smartbeam.analysis.kde_filters.PolarGrid`, float32 ``(n_r, n_phi)``.

    Same result as ``polar.to_cells(a)`` (float32 sums instead of float64 ones): one pass
    in pixel order, ~10x faster than the float64 ``bincount`` at 2048^2 (one core).
    """
    kern = _compiled()
    if kern is None:  # pragma: no cover - numba comes with the pinned stack
        return polar.to_cells(a)
    n = polar.n_r * polar.n_phi
    out = np.empty(n + 1, np.float32)
    kern[2](np.ascontiguousarray(a, np.float32), polar.cell_index32(), out)
    return out[:n].reshape(polar.n_r, polar.n_phi)
