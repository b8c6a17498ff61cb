"""Seven (dis)similarity measures between many spectra and many library entries.

All measures return a *dissimilarity* matrix ``D`` of shape (n_spectra, n_entries), lower
is more similar, computed on spectra that share one uniform energy grid:

==============  =========================================================  ===============
measure         definition (after :func:`prepare`)                        preprocessing
==============  =========================================================  ===============
euclidean       ||a - b||_2                                               area = 1
cityblock       ||a - b||_1                                               area = 1
cosine          1 - a.b / (|a||b|)                                         none
pearson         1 - r(a, b)                                                none
jsd             Jensen-Shannon distance (base 2, scipy: sqrt of JS div.)   clip >= 0, area = 1
emd             step * sum |cumsum(a) - cumsum(b)| (1-D Wasserstein-1)     clip >= 0, area = 1
dtw             dynamic time warping, Sakoe-Chiba window (dtaidistance)    area = 1
==============  =========================================================  ===============

"Area" is the sum over grid points (the step cancels in every measure except EMD, where
it is applied explicitly). DTW is slow and kept off the live path by default.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.spatial.distance import cdist

from ..errors import SmartbeamInputError

__all__ = [
    "MEASURES",
    "POINTWISE_MEASURES",
    "LIVE_MEASURES",
    "prepare",
    "dissimilarity",
    "similarity_from_dissimilarity",
    "resample",
    "remove_background",
    "jensenshannon_matrix",
    "cityblock_matrix",
]

#: Every measure, in the order used in reports.
MEASURES = ("euclidean", "cityblock", "cosine", "pearson", "jsd", "emd", "dtw")
#: Measures computed point by point on a common grid (fast, vectorised).
POINTWISE_MEASURES = ("euclidean", "cityblock", "cosine", "pearson", "jsd", "emd")
#: Measures evaluated during a live run (DTW excluded: too slow).
LIVE_MEASURES = POINTWISE_MEASURES


def _check_measure(measure: str) -> str:
    if measure not in MEASURES:
        raise SmartbeamInputError(f"measure {measure!r} unknown: expected one of {MEASURES}")
    return measure


def _area_normalise(x: np.ndarray) -> np.ndarray:
    area = x.sum(axis=-1, keepdims=True)
    # One reciprocal per row and a product: a masked divide over the whole array costs
    # several times more.
    ok = np.isfinite(area) & (np.abs(area) > 1e-300)
    out = x * np.divide(1.0, area, out=np.zeros_like(area), where=ok)
    if not ok.all():  # a zero-area or non-finite spectrum becomes zeros, not NaN
        out[~ok[..., 0]] = 0.0
    return out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-300)


def prepare(spectra: np.ndarray, measure: str) -> np.ndarray:
    """Apply the normalisation ``measure`` needs (rows are spectra on a common grid).

    Parameters
    ----------
    spectra
        (n, n_energy) or (n_energy,) array.
    measure
        One of :data:`MEASURES`.
    """
    _check_measure(measure)
    x = np.atleast_2d(np.asarray(spectra, dtype=float))
    if measure in ("cosine", "pearson"):
        return x  # scale-invariant measures
    if measure in ("jsd", "emd"):
        # Probability-like measures need non-negative weights (maximum: clip is slower).
        x = np.maximum(x, 0.0)
    return _area_normalise(x)


def dissimilarity(spectra: np.ndarray, library: np.ndarray, measure: str, *, step: float = 1.0,
                  dtw_window: int | None = None, prepared: bool | str = False) -> np.ndarray:
    """Dissimilarity matrix between spectra and library entries.

    Parameters
    ----------
    spectra
        (n, n_energy) measured spectra on the library energy grid.
    library
        (k, n_energy) library spectra.
    measure
        One of :data:`MEASURES`.
    step
        Energy step of the grid (eV), used by EMD.
    dtw_window
        Sakoe-Chiba window in grid points for DTW (default: 10 % of the length).
    prepared
        ``True`` if both inputs already went through :func:`prepare`, ``"library"`` if only
        ``library`` did (the spectra are then prepared block by block, in cache).

    Returns
    -------
    (n, k) array, lower = more similar.
    """
    _check_measure(measure)
    a = np.atleast_2d(np.asarray(spectra, dtype=float))
    b = np.atleast_2d(np.asarray(library, dtype=float))
    if a.shape[1] != b.shape[1]:
        raise SmartbeamInputError(f"spectra have {a.shape[1]} energy points, library entries "
                                  f"{b.shape[1]}: expected a common grid")
    if prepared not in (True, False, "library"):
        raise SmartbeamInputError(f"prepared={prepared!r}: expected True, False or 'library'")
    spectra_prepared = prepared is True
    if not prepared:
        b = prepare(b, measure)
    if measure == "dtw":
        return _dtw_matrix(a if spectra_prepared else prepare(a, measure), b, dtw_window)
    # Blocks of rows that stay in cache (and reuse memory) instead of (n, n_energy) temporaries:
    # several times faster for many spectra, the same numbers.
    rows = max(1, _BLOCK_ELEMENTS // max(1, a.shape[1]))
    if len(a) <= rows:
        return _pointwise(a if spectra_prepared else _prepare_block(a, measure), b, measure,
                          step)
    out = np.empty((len(a), len(b)))
    scratch = np.empty((rows, a.shape[1]))
    for i in range(0, len(a), rows):
        block = a[i:i + rows]
        if not spectra_prepared:
            block = _prepare_block(block, measure, scratch[:len(block)])
        out[i:i + rows] = _pointwise(block, b, measure, step)
    return out


def _prepare_block(x: np.ndarray, measure: str, scratch: np.ndarray | None = None
                   ) -> np.ndarray:
    # JSD normalises the rows itself (it is scale-invariant): only the clip is needed here,
    # into a reused buffer.
    return np.maximum(x, 0.0, out=scratch) if measure == "jsd" else prepare(x, measure)


#: Elements (spectra x grid points) per block of :func:`dissimilarity`: ~1 MB of doubles.
_BLOCK_ELEMENTS = 1 << 17


def _pointwise(a: np.ndarray, b: np.ndarray, measure: str, step: float) -> np.ndarray:
    # One block of prepared spectra against the prepared library.
    if measure == "pearson":
        # Matrix-product form (BLAS) of cdist's "correlation": same value, much faster.
        return 1.0 - _unit_rows(a - a.mean(axis=1, keepdims=True)) @ _unit_rows(
            b - b.mean(axis=1, keepdims=True)).T
    if measure == "cosine":
        return 1.0 - _unit_rows(a) @ _unit_rows(b).T
    if measure == "euclidean":
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
        return np.sqrt(np.clip(sq, 0.0, None))
    if measure == "jsd":
        return jensenshannon_matrix(a, b)
    if measure == "emd":
        # For 1-D distributions on one grid W1 = step * L1(CDF_a - CDF_b).
        return cityblock_matrix(np.cumsum(a, axis=1), np.cumsum(b, axis=1)) * step
    return cityblock_matrix(a, b)


def _l1_loop(a, b, out):  # pragma: no cover - run compiled by numba
    for i in range(a.shape[0]):
        ai = a[i]
        for e in range(b.shape[0]):
            be = b[e]
            acc = np.float32(0.0)
            for j in range(a.shape[1]):
                acc += abs(ai[j] - be[j])
            out[i, e] = acc


@functools.cache
def _numba_l1_kernel():
    """:func:`_l1_loop` compiled (disk-cached) on first use; ``None`` without numba.

    Why not ``cdist(..., "cityblock")``: scipy's loop is scalar double precision; a sum
    of non-negative terms keeps its relative precision in single precision, which LLVM
    vectorises 8 lanes wide: several times faster. What single precision loses is in the
    inputs: each value is rounded to ~6e-8 of its size (see :func:`cityblock_matrix`).
    """
    try:
        from numba import njit
    except ImportError:
        return None
    # reassoc: lets LLVM vectorise the sum (the order of summation changes, nothing else).
    return njit(fastmath={"reassoc"}, cache=True)(_l1_loop)


def cityblock_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """L1 distances between all rows of ``a`` and ``b``.

    ``scipy.spatial.distance.cdist(a, b, "cityblock")`` computed by a single-precision
    compiled loop with numba (scipy without it). The error is that of rounding the inputs
    to float32, ~6e-8 of the values themselves: negligible for area-normalised spectra
    (relative error of the distance ~1e-6 when they differ by a few % per point), larger
    for rows that differ by little on a large common level (EMD's cumulative sums: ~1e-5
    of the distance at 0.1 % per-point differences, ~2e-4 at 0.01 %).

    Parameters
    ----------
    a, b
        (n_a, n) and (n_b, n) arrays.

    Returns
    -------
    (n_a, n_b) array.
    """
    kernel = _numba_l1_kernel()
    if kernel is None:
        return cdist(a, b, "cityblock")
    out = np.empty((len(a), len(b)), dtype=np.float32)
    kernel(np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32),
           out)
    return out.astype(float)


def _dtw_matrix(a: np.ndarray, b: np.ndarray, dtw_window: int | None) -> np.ndarray:
    from dtaidistance import dtw

    window = dtw_window or max(1, a.shape[1] // 10)
    both = np.ascontiguousarray(np.vstack([a, b]))
    n = len(a)
    full = dtw.distance_matrix_fast(both, block=((0, n), (n, n + len(b))), window=window,
                                    compact=False)
    return np.asarray(full)[:n, n:]


def _log1p_coefficients(degree: int = 4) -> tuple[float, ...]:
    """Power-basis coefficients of 2 g(u) = 2 atanh(sqrt u) / sqrt u on 0 <= u <= 1/9.

    The Chebyshev interpolant of degree 4: relative error 8e-9, under the single-precision
    epsilon the kernel works in (a Taylor series needs degree 6 for that). The test checks
    2 t g(t^2) against ``log1p``.
    """
    def two_g(u: np.ndarray) -> np.ndarray:
        root = np.sqrt(u)  # Chebyshev nodes are interior: u > 0
        return 2.0 * np.arctanh(root) / root

    fit = np.polynomial.Chebyshev.interpolate(two_g, degree, domain=[0.0, 1.0 / 9.0])
    return tuple(float(c) for c in fit.convert(kind=np.polynomial.Polynomial).coef)


#: Lowest degree first.
_LOG1P_COEFFS = _log1p_coefficients()

#: Below this t = |p - q| / (3 max + min) (|p - q| / (p + q) < 0.105) the kernel sums the
#: divergence from its series instead of log1p(w) + ln(min/max) (which cancel to ~w/2 of
#: their size: in single precision that leaves a relative error ~eps / w^2).
_SERIES_T_MAX = 0.05


def _series_coefficients(degree: int = 4) -> tuple[float, ...]:
    """Power-basis coefficients of Q(t) = phi(w) / t^2 on 0 <= t <= ``_SERIES_T_MAX``.

    ``phi(w) = ((1+w) ln(1+w) + (1-w) ln(1-w)) / 2 = sum_k w^2k / (2k (2k-1))`` is the
    divergence per unit of p + q, ``w = 2t / (1 - t)``. The Chebyshev interpolant of degree
    4: relative error 4e-8, under the single-precision epsilon (the test checks it).
    """
    def q_of_t(t: np.ndarray) -> np.ndarray:
        w = 2.0 * t / (1.0 - t)
        k = np.arange(1, 16)[:, None]  # w <= 0.105: 15 terms are exact in double
        return (w[None] ** (2 * k) / (2 * k * (2 * k - 1))).sum(axis=0) / (t * t)

    fit = np.polynomial.Chebyshev.interpolate(q_of_t, degree, domain=[0.0, _SERIES_T_MAX])
    return tuple(float(c) for c in fit.convert(kind=np.polynomial.Polynomial).coef)


_SERIES_COEFFS = _series_coefficients()
_JSD_BACKENDS = ("auto", "numba", "numpy")


def _make_divergence_loop():
    """The compiled-kernel body (see ``_numba_divergence_kernel``), made with numba's types.

    Built in a function so that the float32 constants exist only when numba is imported.
    """
    f32 = np.float32
    c0, c1, c2, c3, c4 = (f32(c) for c in _LOG1P_COEFFS)
    q0, q1, q2, q3, q4 = (f32(c) for c in _SERIES_COEFFS)
    t_max = f32(_SERIES_T_MAX)
    three = f32(3.0)
    tiny = f32(np.finfo(np.float32).tiny)
    zero = f32(0.0)

    def loop(p, lp, q, lq, out):  # pragma: no cover - run compiled by numba
        k, m = q.shape
        for i in range(p.shape[0]):
            pi = p[i]
            lpi = lp[i]
            for e in range(k):
                qe = q[e]
                lqe = lq[e]
                acc = zero
                for j in range(m):
                    a = pi[j]
                    b = qe[j]
                    la = lpi[j]
                    lb = lqe[j]
                    # Selects, not branches: the loop vectorises (8 lanes in float32).
                    big = a > b
                    mx = a if big else b
                    mn = b if big else a
                    lr = (lb - la) if big else (la - lb)  # ln(mn / mx) <= 0
                    # log1p(w), w = (mx - mn) / (mx + mn), as 2 t g(t^2), t = w / (2 + w).
                    t = (mx - mn) / (three * mx + mn + tiny)
                    u = t * t
                    u2 = u * u
                    # Estrin's scheme: short dependency chains (Horner's is latency-bound).
                    g = (c1 * u + c0) + (c3 * u + c2) * u2 + c4 * (u2 * u2)
                    far = (a + b) * (t * g) + mn * lr
                    near = (a + b) * u * ((q1 * t + q0) + (q3 * t + q2) * u + q4 * u2)
                    acc += near if t < t_max else far
                out[i, e] = acc

    return loop


@functools.cache
def _numba_divergence_kernel():
    """``out[i, e] = 2 JS(p_i, q_e)`` in nats, compiled (disk-cached); ``None`` without numba.

    Why a kernel of our own: scipy's ``cdist(..., "jensenshannon")`` loops over pairs in
    Python and calls ``log`` per element, and a logarithm per (spectrum, entry, grid point)
    is the whole cost (a billion a second for 50,000 spectra/s against 31 entries of 642
    points); libm's is neither vectorised nor fast enough. Per grid point the divergence is

        p ln(2p / (p+q)) + q ln(2q / (p+q)) = (p + q) log1p(w) + min(p, q) ln(min / max),
        w = |p - q| / (p + q),

    so with the logarithms of the rows known (``lp``, ``lq``) it needs one division and a
    polynomial, which LLVM vectorises. It sums non-negative terms, so unlike the entropy form
    (sum p ln p + sum q ln q - sum (p+q) ln(p+q)) nothing cancels between large sums, and
    single precision (twice the SIMD lanes, a cheaper division) is enough. Within a term the
    two parts still cancel to ~w/2 of their size, so for w < 0.105 the term is taken from
    its series instead (``_series_coefficients``): the relative error of the distance stays
    below ~4e-6 down to spectra that differ by 0.1 % per point (the tests compare with
    scipy and with the double-precision path).
    """
    try:
        from numba import njit
    except ImportError:
        return None
    # reassoc: lets LLVM vectorise the sum over the grid; contract: fused multiply-add.
    # No nnan/ninf/arcp/afn: every operation stays IEEE, only the summation order changes.
    # error_model="numpy": no ZeroDivisionError branch, which would block vectorisation.
    return njit(fastmath={"reassoc", "contract"}, error_model="numpy", cache=True)(
        _make_divergence_loop())


def _mixture_entropy_numpy(p: np.ndarray, q: np.ndarray, chunk_bytes: int) -> np.ndarray:
    # Fallback without numba: sum (p+q) ln(p+q) in chunks of rows of p.
    out = np.empty((len(p), len(q)))
    step = max(1, int(chunk_bytes // (8 * max(1, q.size))))
    tiny = np.finfo(float).tiny
    for i in range(0, len(p), step):
        s = p[i:i + step, None, :] + q[None, :, :]
        # + tiny: 0 ln 0 -> 0 without a mask, and ln(s + tiny) == ln(s) for any normal s.
        s += tiny
        logs = np.log(s)
        logs *= s
        out[i:i + step] = logs.sum(axis=2)
    return out


def _single_precision_logs(p: np.ndarray) -> np.ndarray:
    # A zero weight gets ln(tiny): finite, and it only ever multiplies a zero.
    out = np.maximum(p, np.finfo(np.float32).tiny)
    return np.log(out, out=out)


def jensenshannon_matrix(a: np.ndarray, b: np.ndarray, *, chunk_bytes: int = 1_000_000,
                         backend: str = "auto") -> np.ndarray:
    """Jensen-Shannon distances (base 2) between all rows of ``a`` and ``b``.

    Equals ``scipy.spatial.distance.cdist(a, b, "jensenshannon") / sqrt(ln 2)`` (rows are
    normalised to unit sum, as scipy does), but vectorised: scipy loops over pairs in
    Python. With numba it is a compiled single-precision loop that needs no logarithm per
    pair (see ``_numba_divergence_kernel``; relative error of a few 1e-6 at most). Without
    it, or with ``backend="numpy"``, numpy in
    double precision, the divergence split as

        JS = ln 2 + (sum p ln p + sum q ln q - sum (p+q) ln(p+q)) / 2,

    so the entropies of the rows are computed once and only the mixture term needs the
    pair, in chunks of rows of ``a`` that keep the (chunk, n_b, n_energy) block under
    ``chunk_bytes``.

    Parameters
    ----------
    a, b
        (n_a, n) and (n_b, n) non-negative arrays.
    chunk_bytes
        Memory bound of one block of the numpy path.
    backend
        ``"auto"`` (numba when installed, else numpy), ``"numba"`` or ``"numpy"``.

    Returns
    -------
    (n_a, n_b) array in [0, 1]; a row without weight gets the maximal distance 1.
    """
    if backend not in _JSD_BACKENDS:
        raise SmartbeamInputError(f"backend {backend!r} unknown: expected one of {_JSD_BACKENDS}")
    kernel = _numba_divergence_kernel() if backend != "numpy" else None
    if backend == "numba" and kernel is None:
        raise SmartbeamInputError("backend 'numba' requested but numba is not installed: "
                                  "expected backend 'auto' or 'numpy'")
    a = np.atleast_2d(np.asarray(a, dtype=float))
    b = np.atleast_2d(np.asarray(b, dtype=float))
    sa = a.sum(axis=1, keepdims=True)
    sb = b.sum(axis=1, keepdims=True)
    # Rows without weight (or with NaN/inf) get the maximal distance, set at the end.
    ok_a = np.isfinite(sa) & (sa > 1e-300)
    ok_b = np.isfinite(sb) & (sb > 1e-300)
    if kernel is not None:
        # Rows scaled to sum n (not 1) in one pass to single precision: the divergence is
        # then n times larger (the ratios it depends on are unchanged), and ln(p n) of
        # values near 1 keeps more digits in float32 than ln p.
        n = a.shape[1]
        p = np.multiply(a, np.divide(float(n), sa, out=np.zeros_like(sa), where=ok_a),
                        dtype=np.float32)
        q = np.multiply(b, np.divide(float(n), sb, out=np.zeros_like(sb), where=ok_b),
                        dtype=np.float32)
        twice = np.empty((len(p), len(q)), dtype=np.float32)
        kernel(p, _single_precision_logs(p), q, _single_precision_logs(q), twice)
        js = twice.astype(float) * (0.5 / n)
    else:
        p = a * np.divide(1.0, sa, out=np.zeros_like(sa), where=ok_a)
        q = b * np.divide(1.0, sb, out=np.zeros_like(sb), where=ok_b)
        # ln 0 is set to 0: it only ever multiplies a zero weight (0 ln 0 = 0).
        lp = np.log(p, out=np.zeros_like(p), where=p > 0)
        lq = np.log(q, out=np.zeros_like(q), where=q > 0)
        hp = (p * lp).sum(axis=1)
        hq = (q * lq).sum(axis=1)
        hs = _mixture_entropy_numpy(p, q, chunk_bytes)
        js = np.log(2.0) + 0.5 * (hp[:, None] + hq[None, :] - hs)
    # Rounding can leave tiny negatives for identical rows.
    d = np.sqrt(np.clip(js, 0.0, None) / np.log(2.0))
    d[~ok_a[:, 0][:, None] | ~ok_b[:, 0][None, :]] = 1.0
    return d


def similarity_from_dissimilarity(d: np.ndarray, measure: str) -> np.ndarray:
    """Express a dissimilarity as the usual similarity of the measure.

    Pearson and cosine give r and the cosine similarity (``1 - d``); the distances are
    returned unchanged (lower is better).
    """
    _check_measure(measure)
    d = np.asarray(d, dtype=float)
    return 1.0 - d if measure in ("pearson", "cosine") else d


def resample(energy: np.ndarray, intensity: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of a spectrum onto ``grid``; outside the data, edge values.

    Parameters
    ----------
    energy
        Increasing energies of the measurement.
    intensity
        Intensities, same length.
    grid
        Target energies.
    """
    energy = np.asarray(energy, dtype=float)
    intensity = np.asarray(intensity, dtype=float)
    return np.interp(grid, energy, intensity)


def remove_background(energy: np.ndarray, intensity: np.ndarray, *, pre_edge_max: float,
                      post_edge_min: float, l3: float, l2: float,
                      step_width: float = 1.0, window: float = 15.0) -> np.ndarray:
    """Remove a linear background and the L3/L2 edge-jump steps.

    The line ``a + b E`` and the step height ``h`` are fitted jointly (linear least
    squares) to the points in ``window`` eV below ``pre_edge_max`` and above
    ``post_edge_min`` (local: a line is no model of a background over hundreds of eV, such
    as the power-law tail under an EELS edge); the step is
    ``h (2/3 S(l3) + 1/3 S(l2))`` with arctan steps S of width ``step_width`` eV (the 2:1
    statistical branching of 2p3/2 and 2p1/2). Fitting them together matters: the arctan
    tails reach several eV below the edge, and a line fitted to the pre-edge alone absorbs
    them and is then subtracted a second time with the step. With fewer than 3 pre-edge or
    post-edge points the fit falls back to a constant and/or no step.

    Parameters
    ----------
    energy, intensity
        The measured spectrum.
    pre_edge_max, post_edge_min
        Energy limits of the background regions.
    l3, l2
        Energies of the L3 and L2 edge steps.
    step_width
        Width of the arctan steps (eV).
    window
        Width (eV) of the pre-edge and post-edge regions used for the fit.
    """
    e = np.asarray(energy, dtype=float)
    y = np.asarray(intensity, dtype=float).copy()
    pre = (e < pre_edge_max) & (e >= pre_edge_max - window)
    post = (e > post_edge_min) & (e <= post_edge_min + window)

    def step(e0: float) -> np.ndarray:
        return 0.5 + np.arctan((e - e0) / (0.5 * step_width)) / np.pi

    steps = 2.0 / 3.0 * step(l3) + 1.0 / 3.0 * step(l2)
    x = (e - e.mean()) / max(float(np.ptp(e)), 1e-12)  # scaled: well-conditioned fit
    cols = [np.ones_like(e)]
    if pre.sum() >= 3 and post.sum() + pre.sum() >= 6:
        cols.append(x)
    if post.sum() >= 3:
        cols.append(steps)
    fit = pre | post
    if not fit.any():
        return y - y.min()
    basis = np.column_stack(cols)
    coef, *_ = np.linalg.lstsq(basis[fit], y[fit], rcond=None)
    return y - basis @ coef
