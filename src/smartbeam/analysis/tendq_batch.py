"""Batched 10Dq estimation of many spectra on one energy axis (image stacks).

:meth:`TenDqFitter.predict_many <smartbeam.analysis.tendq.TenDqFitter.predict_many>` runs,
per spectrum, a preprocessing, a Pearson offset x broadening x edge-step search, the other
measures, the refinement and the rejection stage. For the thousands of pixel spectra of a
map the same steps are done here for all pixels at once, with the same results up to
rounding (the tests compare with the per-spectrum path):

- the preprocessing is linear in the spectrum once the L3/L2 maxima it places the edge
  steps at are known: pixels are grouped by those two maxima and each group gets one
  (n_ext x K) matrix (background projector, then the interpolation onto the
  offset-extended grid);
- a stack of pixel spectra is often of low rank (after
  :func:`~smartbeam.analysis.stack.lowrank_denoise` exactly ``rank + 1``): with
  ``Y = C V^T`` (a thin SVD truncated only below 1e-11 of the largest singular value)
  every preprocessed spectrum is ``C_p @ B`` with a few basis rows ``B`` per group, so
  every sliding-window dot product with the library (Pearson search, rejection search)
  is a product of the pixel's coefficients with the basis rows' dot products, and the
  window norms are quadratic forms of the coefficients. Only the nonlinear measures
  (JSD, cityblock, EMD) and the rejection's final scores need the explicit spectra;
- the metric measures (JSD distance, cityblock, EMD) are evaluated at every third offset
  first; an offset in between is evaluated only where the triangle inequality,
  ``d(w_j, x) >= d(w_j', x) - d(w_j, w_j')``, does not exclude it from holding the
  minimum (the minimum, its position and every value the refinement reads stay exact);
- the linear measures (Pearson, cosine, Euclidean) are reduced over the library in
  cache-sized pixel sub-blocks (the smallest value per offset; for Pearson and cosine,
  ``1 - inv * max(dot)``) and each measure's map is then evaluated only at the offsets
  within ``_HALF`` of its best one -- all that the refinement, the window-edge check and
  the noise sd read (the pixels re-searched over the whole offset range go the same way);
  the rejection search keeps only the best library row per offset, likewise;
- the refinement, the rejection scores and the uncertainty are computed on arrays.

With only the linear measures (``TenDqFitter.with_measures("linear")``, the map default
of :func:`~smartbeam.analysis.stack.tendq_maps`) nothing per pixel is evaluated on the
explicit spectra except the rejection's final scores and the noise estimate.

Spectra that are not of low rank (raw pixels), or fewer than the basis rows they would
need, use the per-spectrum path.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["lowrank_factors", "predict_batch", "background_matrix"]

#: Largest rank handled by the low-rank path (beyond it the per-spectrum path is cheaper).
MAX_RANK = 32
#: Singular values below this fraction of the largest are rounding (dropped).
RANK_TOL = 1e-11
#: Cost of one basis row relative to one spectrum of the per-spectrum path (its products
#: with the library at every offset, for the Pearson search, the rejection stage and the
#: linear measures). Measured on subsets of the bench's denoised field (rank 5, ~4 peak
#: groups, 3 variants: ~60 basis rows): the batched path is slower at 48 spectra, faster
#: from 96 on.
_BASIS_COST = 1.5
#: Pixels per block (bounds the (pixels, offsets, entries) temporaries to ~100 MB).
_CHUNK = 512
#: Offsets kept on either side of a map's best one (the refinement reads +-1; +-2 keeps
#: the neighbours of a minimum that rounding moves by one offset).
_HALF = 2
#: Pixels per sub-block of a reduction over the library (its products stay in cache:
#: ~5x faster than one block-wide product then a pass over it, measured).
_SUB = 64


def lowrank_factors(ys: np.ndarray, max_rank: int = MAX_RANK, tol: float = RANK_TOL
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """``(C, Vt)`` with ``C @ Vt == ys`` to ``tol`` of the largest singular value, or
    ``None`` when the numerical rank exceeds ``max_rank``.

    Parameters
    ----------
    ys
        (n_spectra, n_energy) spectra.
    max_rank
        Largest rank accepted.
    tol
        Relative singular-value cut (rounding level).
    """
    ys = np.asarray(ys, dtype=float)
    if min(ys.shape) == 0:
        return None
    u, s, vt = np.linalg.svd(ys, full_matrices=False)
    rank = max(1, int(np.sum(s > tol * s[0]))) if s[0] > 0 else 1
    if rank > max_rank:
        return None
    return u[:, :rank] * s[:rank], vt[:rank]


def background_matrix(energy: np.ndarray, *, pre_edge_max: float, post_edge_min: float,
                      l3: float, l2: float, step_width: float = 1.0, window: float = 15.0
                      ) -> np.ndarray | None:
    """(K, K) matrix ``Q`` with ``Q @ y == remove_background(energy, y, ...)`` for every y.

    Same model as :func:`smartbeam.analysis.similarity.remove_background` (a line and the
    2:1 arctan edge steps fitted by linear least squares to the pre- and post-edge points),
    written as the projector it is for fixed step positions. ``None`` when that function
    would fall back to its nonlinear ``y - min(y)`` (no background points).
    """
    e = np.asarray(energy, dtype=float)
    pre = (e < pre_edge_max) & (e >= pre_edge_max - window)
    post = (e > post_edge_min) & (e <= post_edge_min + window)
    fit = pre | post
    if not fit.any():
        return None

    def step(e0: float) -> np.ndarray:
        return 0.5 + np.arctan((e - e0) / (0.5 * step_width)) / np.pi

    steps = 2.0 / 3.0 * step(l3) + 1.0 / 3.0 * step(l2)
    x = (e - e.mean()) / max(float(np.ptp(e)), 1e-12)
    cols = [np.ones_like(e)]
    if pre.sum() >= 3 and post.sum() + pre.sum() >= 6:
        cols.append(x)
    if post.sum() >= 3:
        cols.append(steps)
    basis = np.column_stack(cols)
    q = np.eye(e.size)
    q[:, fit] -= basis @ np.linalg.pinv(basis[fit])
    return q


def _interp_matrix(x: np.ndarray, xp: np.ndarray) -> np.ndarray:
    """(len(x), len(xp)) matrix of ``np.interp(x, xp, .)`` (linear in the values)."""
    return np.stack([np.interp(x, xp, col) for col in np.eye(len(xp))], axis=1)


def _interp_rows(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """``np.interp(x, xp, row)`` for every row of ``fp`` (edge values outside)."""
    j = np.clip(np.searchsorted(xp, x, side="right") - 1, 0, len(xp) - 2)
    t = np.clip((x - xp[j]) / (xp[j + 1] - xp[j]), 0.0, 1.0)
    return fp[:, j] * (1.0 - t) + fp[:, j + 1] * t


def _noise_sigma_rows(y: np.ndarray) -> np.ndarray:
    """:func:`~smartbeam.analysis.tendq.noise_sigma` of every row."""
    if y.shape[1] < 5:
        return np.zeros(len(y))
    d = y[:, 1:-1] - 0.5 * (y[:, :-2] + y[:, 2:])
    med = np.median(d, axis=1, keepdims=True)
    return np.median(np.abs(d - med), axis=1) / 0.6745 / math.sqrt(1.5)


def _quad_refine_rows(y0: np.ndarray, y1: np.ndarray, y2: np.ndarray) -> np.ndarray:
    """:func:`~smartbeam.analysis.tendq._quad_refine` of many parabolas."""
    den = y0 - 2 * y1 + y2
    ok = np.isfinite(den) & (den > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.clip(0.5 * (y0 - y2) / np.where(ok, den, 1.0), -1.0, 1.0)
    return np.where(ok, v, 0.0)


class _Basis:
    """Preprocessed basis rows of one (peak group, edge-step variant) and their products
    with the library at every offset."""

    def __init__(self, fitter, rows: np.ndarray) -> None:
        n = fitter.n
        self.rows = rows  # (R, n_ext)
        win = sliding_window_view(rows, n, axis=1)  # (R, J, n)
        r_, j_, _ = win.shape
        # Pearson numerators through the library's SVD basis, as the FFT path does.
        num = (win.reshape(r_ * j_, n) @ fitter._lib_basis.T) @ fitter._mix
        self.num = num.reshape(r_, j_, -1)  # (R, J, BK)
        wc = win - win.mean(axis=2, keepdims=True)
        # Centred window Gram matrices: |window - mean|^2 = c^T G_j c.
        self.gram = np.einsum("rjt,sjt->jrs", wc, wc)  # (J, R, R)
        self._win = win
        self._rej: np.ndarray | None = None
        self._lin: dict[str, np.ndarray] = {}
        self._gram_raw: np.ndarray | None = None
        self._aug: np.ndarray | None = None
        self._sums = win.sum(axis=2)  # (R, J)

    def gram_raw(self) -> np.ndarray:
        """(J, R, R) Gram matrices of the (uncentred) windows."""
        if self._gram_raw is None:
            self._gram_raw = np.einsum("rjt,sjt->jrs", self._win, self._win)
        return self._gram_raw

    def linear_map(self, fitter, measure: str, c: np.ndarray, js: np.ndarray) -> np.ndarray:
        """(m, J', BK) map of a linear measure (``euclidean`` or ``cosine``) of coefficient
        rows ``c`` at offsets ``js``, from dot products of the basis windows with the
        prepared library (the same formulas as :func:`~smartbeam.analysis.similarity.
        dissimilarity`, evaluated through the low-rank form)."""
        from .similarity import _unit_rows

        lib_rows = fitter._prepared[measure]
        if measure not in self._lin:
            r_, j_, n = self._win.shape
            ref = _unit_rows(lib_rows) if measure == "cosine" else lib_rows
            self._lin[measure] = (self._win.reshape(r_ * j_, n) @ ref.T).reshape(r_, j_, -1)
        m_ = len(c)
        dots = (c @ self._lin[measure][:, js].reshape(c.shape[1], -1)).reshape(m_, len(js), -1)
        sq = np.einsum("pr,jrs,ps->pj", c, self.gram_raw()[js], c, optimize=True)
        if measure == "cosine":
            norm = np.sqrt(np.clip(sq, 0.0, None))
            inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 1e-300)
            return 1.0 - dots * inv[:, :, None]
        area = c @ self._sums[:, js]  # (m, J')
        ok = np.isfinite(area) & (np.abs(area) > 1e-300)
        inv = np.divide(1.0, area, out=np.zeros_like(area), where=ok)
        bb = (lib_rows * lib_rows).sum(axis=1)
        d2 = (sq * inv * inv)[:, :, None] + bb[None, None, :] - 2.0 * dots * inv[:, :, None]
        return np.sqrt(np.clip(d2, 0.0, None))

    def _tables(self, fitter, measure: str):
        """(dots (R, J, BK), Gram (J, R, R), library row norms^2 or None) of a linear
        measure: its value at offset j is a function of ``c @ dots[:, j]``,
        ``c^T G_j c`` (and, for Euclidean, the window area ``c @ sums[:, j]``)."""
        if measure == "pearson":
            return self.num, self.gram, None
        if measure not in self._lin:
            self.linear_map(fitter, measure, np.zeros((1, self.num.shape[0])),
                            np.arange(1))
        bb = None
        if measure == "euclidean":
            lib_rows = fitter._prepared[measure]
            bb = (lib_rows * lib_rows).sum(axis=1)
        return self._lin[measure], self.gram_raw(), bb

    @staticmethod
    def _values(measure: str, dots: np.ndarray, sq: np.ndarray, area: np.ndarray | None,
                bb: np.ndarray | None) -> np.ndarray:
        """The measure from its low-rank pieces (``dots`` (..., BK), ``sq``/``area`` (...));
        the formulas of :meth:`pearson` and :meth:`linear_map`."""
        if measure != "euclidean":  # pearson (centred Gram) or cosine (raw Gram)
            norm = np.sqrt(np.clip(sq, 0.0, None))
            inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 1e-300)
            return 1.0 - dots * inv[..., None]
        ok = np.isfinite(area) & (np.abs(area) > 1e-300)
        inv = np.divide(1.0, area, out=np.zeros_like(area), where=ok)
        d2 = (sq * inv * inv)[..., None] + bb - 2.0 * dots * inv[..., None]
        return np.sqrt(np.clip(d2, 0.0, None))

    def min_over_library(self, fitter, measure: str, c: np.ndarray, js: np.ndarray
                         ) -> np.ndarray:
        """(m, J') smallest value over the library of a linear measure (``pearson``,
        ``cosine``, ``euclidean``) at offsets ``js``, without keeping the map (pixel
        sub-blocks whose products stay in cache).

        Pearson and cosine, ``1 - dot * inv`` with ``inv >= 0``: ``1 - inv * max(dot)``.
        Euclidean, ``d^2 = q inv^2 + (|L_k|^2 - 2 inv dot_k)``: the bracket for every
        entry is one product of ``[-2 inv c, 1]`` with ``[dots_j; |L|^2]`` per offset.
        Equal to the minimum of the map up to rounding (the map itself is evaluated
        where it matters, :meth:`local_map`).
        """
        if measure == "pearson":
            return self.pearson_min(c, js)
        dots_t, gram, bb = self._tables(fitter, measure)
        g = gram[js]
        out = np.empty((len(c), len(js)))
        if measure == "cosine":
            d = dots_t[:, js].reshape(len(c[0]), -1)
            for i in range(0, len(c), _SUB):
                cs = c[i:i + _SUB]
                sq = np.einsum("pr,jrs,ps->pj", cs, g, cs, optimize=True)
                out[i:i + _SUB] = self._values(
                    measure, (cs @ d).reshape(len(cs), len(js), -1).max(axis=2,
                                                                         keepdims=True),
                    sq, None, None)[:, :, 0]
            return out
        if self._aug is None:  # (J, R + 1, BK): the dots tables and |L|^2 under them
            self._aug = np.concatenate([np.swapaxes(dots_t, 0, 1), np.broadcast_to(
                bb, (dots_t.shape[1], 1, len(bb)))], axis=1)
        w = self._aug[js]
        for i in range(0, len(c), _SUB):
            cs = c[i:i + _SUB]
            sq = np.einsum("pr,jrs,ps->pj", cs, g, cs, optimize=True)
            area = cs @ self._sums[:, js]
            ok = np.isfinite(area) & (np.abs(area) > 1e-300)
            inv = np.divide(1.0, area, out=np.zeros_like(area), where=ok)  # (s, J')
            x = np.concatenate([(-2.0 * inv.T)[:, :, None] * cs[None], np.ones(
                (len(js), len(cs), 1))], axis=2)  # (J', s, R + 1)
            brk = np.matmul(x, w).min(axis=2).T  # (s, J')
            out[i:i + _SUB] = np.sqrt(np.clip(sq * inv * inv + brk, 0.0, None))
        return out

    def values_at(self, fitter, measure: str, c: np.ndarray, jj: np.ndarray) -> np.ndarray:
        """(m, BK) values of a linear measure for each coefficient row ``c[p]`` at its
        own offset index ``jj[p]`` (into :attr:`TenDqFitter.offsets`)."""
        dots_t, gram, bb = self._tables(fitter, measure)
        dots = np.einsum("pr,rpk->pk", c, dots_t[:, jj])
        sq = np.einsum("pr,prs,ps->p", c, gram[jj], c)
        area = np.einsum("pr,rp->p", c, self._sums[:, jj]) if measure == "euclidean" else None
        return self._values(measure, dots, sq, area, bb)

    def local_map(self, fitter, measure: str, c: np.ndarray, js: np.ndarray,
                  best: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A linear measure's map at offsets ``js`` around each row's best offset only.

        Returns ``(values, jlo)``: ``values[p, d]`` (BK) is the map at ``js`` index
        ``jlo[p] + d`` for ``d < 2 * _HALF + 1`` (``inf`` outside ``js``), centred on the
        best offset. The minimum, its position and everything the refinement, the
        window-edge check and the noise sd read (the best offset and its neighbours) are
        those of the full map (:meth:`pearson`, :meth:`linear_map`) up to rounding, without
        the passes over a full map too large for the cache.
        """
        if best is None:  # else given: (m, J') minima over the library, computed already
            best = self.min_over_library(fitter, measure, c, js)
        jlo = np.argmin(best, axis=1) - _HALF
        out = np.full((len(c), 2 * _HALF + 1, self.num.shape[2]), np.inf)
        rows = np.arange(len(c))
        for d in range(2 * _HALF + 1):
            jn = jlo + d
            ok = (jn >= 0) & (jn < len(js))
            out[rows[ok], d] = self.values_at(fitter, measure, c[ok], js[jn[ok]])
        return out, jlo

    def rej(self, fitter) -> np.ndarray:
        """(R, J, n_rejection_rows) dot products with the rejection stage's unit rows."""
        if self._rej is None:
            r_, j_, n = self._win.shape
            self._rej = (self._win.reshape(r_ * j_, n) @ fitter._rej_unit.T).reshape(
                r_, j_, -1)
        return self._rej

    def norms_inv(self, c: np.ndarray, js: np.ndarray) -> np.ndarray:
        """1 / |centred window| of coefficient rows ``c`` at offsets ``js`` (0 if flat)."""
        q = np.einsum("pr,jrs,ps->pj", c, self.gram[js], c, optimize=True)
        norm = np.sqrt(np.clip(q, 0.0, None))
        return np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 1e-300)

    def pearson_min(self, c: np.ndarray, js: np.ndarray) -> np.ndarray:
        """(m, J') smallest ``1 - r`` over the library at each offset, without the map.

        ``1 - num * inv`` with ``inv >= 0`` falls as ``num`` grows (also after rounding),
        so its minimum is ``1 - inv * max(num)``: the values of
        ``pearson(c, js).min(axis=2)``. Pixels in sub-blocks whose products stay in cache.
        """
        num = self.num[:, js].reshape(len(c[0]), -1)
        n_bk = self.num.shape[2]
        best = np.empty((len(c), len(js)))
        for i in range(0, len(c), _SUB):
            best[i:i + _SUB] = (c[i:i + _SUB] @ num).reshape(-1, len(js), n_bk).max(axis=2)
        return 1.0 - best * self.norms_inv(c, js)

    def pearson(self, c: np.ndarray, js: np.ndarray) -> np.ndarray:
        """(m, J', BK) ``1 - r`` of coefficient rows ``c`` at offsets ``js``."""
        num = (c @ self.num[:, js].reshape(len(c[0]), -1)).reshape(len(c), len(js), -1)
        return 1.0 - num * self.norms_inv(c, js)[:, :, None]


def _chunks(idx: np.ndarray, size: int = _CHUNK):
    for i in range(0, len(idx), size):
        yield idx[i:i + size]


def predict_batch(fitter, e: np.ndarray, ys: np.ndarray, shared_offset: float | None,
                  factors: tuple[np.ndarray, np.ndarray]) -> dict[str, Any] | None:
    """Per-pixel estimates of validated spectra ``ys`` (see module docstring).

    Returns ``None`` when the batched path does not apply (then the caller uses the
    per-spectrum path), else a dict of per-spectrum arrays: ``ten_dq``, ``offset``,
    ``sd``, ``score``, ``similarity``, ``per`` / ``per_off`` / ``per_sim`` (measure ->
    array), ``k_best``, ``b_best``, ``spread``, ``sd_noise``, ``sigma``, ``step_shift``
    and ``rejection`` (dict of arrays).
    """
    lib = fitter.library
    r = fitter.offset_range
    coef, vt = factors
    n_p = len(ys)
    shifts = fitter.step_shifts
    n_s = len(shifts)
    # Edge-step positions: the L3/L2 maxima near the library's, as preprocess finds them.
    peaks = []
    for e0 in (fitter.l3, fitter.l2):
        m = (e > e0 - r - 1) & (e < e0 + r + 1)
        peaks.append(np.flatnonzero(m)[np.argmax(ys[:, m], axis=1)] if m.any()
                     else np.full(n_p, -1))
    keys, group = np.unique(np.stack(peaks, axis=1), axis=0, return_inverse=True)
    group = group.ravel()
    # Each (group, variant) costs about as much as searching its R basis rows directly:
    # only worth it when the basis rows are fewer than the spectra (raw spectra, or few
    # spectra with each its own edge maxima, go the per-spectrum way).
    if len(keys) * n_s * coef.shape[1] * _BASIS_COST > n_p:
        return None
    interp = _interp_matrix(fitter.grid_ext, e)  # (n_ext, K)
    bases: dict[tuple[int, int], _Basis] = {}
    for g, (i3, i2) in enumerate(keys):
        l3 = float(e[i3]) if i3 >= 0 else fitter.l3
        l2 = float(e[i2]) if i2 >= 0 else fitter.l2
        for s, shift in enumerate(shifts):
            q = background_matrix(e, pre_edge_max=fitter.onset - r - 0.5,
                                  post_edge_min=fitter.end + r + 0.5, l3=l3 + shift,
                                  l2=l2 + shift)
            if q is None:
                return None
            bases[g, s] = _Basis(fitter, (vt @ q.T) @ interp.T)

    n_j = len(fitter.offsets)
    all_js = np.arange(n_j)
    per_offset = np.empty((n_p, n_s, n_j))
    for g in range(len(keys)):
        pix = np.flatnonzero(group == g)
        for s in range(n_s):
            for ch in _chunks(pix):
                per_offset[ch, s] = bases[g, s].pearson_min(coef[ch], all_js)
    js = all_js
    if shared_offset is not None:
        js = fitter._window_from_per_offset(per_offset.min(axis=1), shared_offset)
    out = _estimate(fitter, e, ys, coef, group, bases, per_offset, js, np.arange(n_p),
                    check_edge=shared_offset is not None)
    redo = np.flatnonzero(out.pop("at_edge"))
    if redo.size:
        again = _estimate(fitter, e, ys, coef, group, bases, per_offset, all_js, redo,
                          check_edge=False)
        again.pop("at_edge")
        _assign(out, again, redo)
    out["library_id"] = lib.library_id
    return out


def _assign(dst: dict, src: dict, idx: np.ndarray) -> None:
    for k, v in src.items():
        if isinstance(v, dict):
            _assign(dst[k], v, idx)
        else:
            dst[k][idx] = v


def _estimate(fitter, e, ys, coef, group, bases, per_offset, js, pix, check_edge):
    """Estimates of the spectra ``pix`` searched over offsets ``js``."""
    n_s = len(fitter.step_shifts)
    # The edge-step variant that matches best inside the offsets searched.
    best = per_offset[pix][:, :, js].min(axis=2).argmin(axis=1)
    out: dict[str, Any] | None = None
    for g in np.unique(group[pix]):
        for s in range(n_s):
            sel = pix[(group[pix] == g) & (best == s)]
            for ch in _chunks(sel):
                res = _estimate_block(fitter, e, ys[ch], coef[ch], bases[g, s], js,
                                      fitter.step_shifts[s], check_edge,
                                      per_offset[ch, s][:, js])
                if out is None:
                    out = _empty_like(res, len(ys))
                _assign(out, res, ch)
    assert out is not None
    return {k: _take(v, pix) for k, v in out.items()}


def _empty_like(res: dict, n: int) -> dict:
    out = {}
    for k, v in res.items():
        if isinstance(v, dict):
            out[k] = _empty_like(v, n)
        else:
            out[k] = np.zeros((n,) + v.shape[1:], dtype=v.dtype)
    return out


def _take(v, idx):
    return {k: _take(w, idx) for k, w in v.items()} if isinstance(v, dict) else v[idx]


def _localize(dmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(values, jlo)`` (see :meth:`_Basis.local_map`) of a full (m, J, ...) map."""
    m_, n_j = dmap.shape[:2]
    jlo = np.unravel_index(np.argmin(dmap.reshape(m_, -1), axis=1), dmap.shape[1:])[0] - _HALF
    out = np.full((m_, 2 * _HALF + 1) + dmap.shape[2:], np.inf)
    rows = np.arange(m_)
    for d in range(2 * _HALF + 1):
        jn = jlo + d
        ok = (jn >= 0) & (jn < n_j)
        out[rows[ok], d] = dmap[rows[ok], jn[ok]]
    return out, jlo


def _refine_rows(fitter, local: np.ndarray, jlo: np.ndarray, measure: str, js: np.ndarray):
    """:meth:`TenDqFitter._refine` of every local map ``local`` (m, W, B, K) (offsets
    ``js[jlo + d]``); returns the offset index into ``js`` and the local one."""
    from .tendq import _SQUARE_FOR_FIT

    lib = fitter.library
    f = local ** 2 if measure in _SQUARE_FOR_FIT else local
    m_, n_w, n_b, n_k = f.shape
    flat = np.argmin(f.reshape(m_, -1), axis=1)
    jl, b, k = np.unravel_index(flat, (n_w, n_b, n_k))
    j = jlo + jl
    n_j = len(js)
    rows = np.arange(m_)
    seg = lib.segment
    km, kp = np.clip(k - 1, 0, n_k - 1), np.clip(k + 1, 0, n_k - 1)
    ok_k = (k > 0) & (k < n_k - 1) & (seg[km] == seg[k]) & (seg[k] == seg[kp])
    dk = np.where(ok_k, _quad_refine_rows(f[rows, jl, b, km], f[rows, jl, b, k],
                                          f[rows, jl, b, kp]), 0.0)
    jm, jp = np.clip(jl - 1, 0, n_w - 1), np.clip(jl + 1, 0, n_w - 1)
    ok_j = (j > 0) & (j < n_j - 1) & (jl > 0) & (jl < n_w - 1)
    dj = np.where(ok_j, _quad_refine_rows(f[rows, jm, b, k], f[rows, jl, b, k],
                                          f[rows, jp, b, k]), 0.0)
    step_dq = lib.ten_dq[1] - lib.ten_dq[0] if len(lib.ten_dq) > 1 else 0.0
    ten_dq = lib.ten_dq[k] + dk * step_dq
    offset = fitter.offsets[js[j]] + dj * fitter.step
    return ten_dq, offset, j, jl, b, k, local[rows, jl, b, k]


def _estimate_block(fitter, e, y, c, basis: _Basis, js, step_shift, check_edge,
                    pearson_min: np.ndarray | None = None):
    from .similarity import similarity_from_dissimilarity

    lib = fitter.library
    m_ = len(y)
    n_b, n_k = len(fitter.extra_fwhm), len(lib.ten_dq)
    pre = c @ basis.rows  # (m, n_ext)
    # Linear measures through the low-rank form, kept only around each pixel's minimum
    # (all that is read of them); the others on the explicit windows.
    # Every map as (values around its best offset, first offset index): all that is read
    # of it (see _Basis.local_map).
    shape = (m_, 2 * _HALF + 1, n_b, n_k)
    maps = {}
    linear = frozenset(m for m in ("euclidean", "cosine") if m in fitter.measures)
    for meas in linear | {"pearson"}:
        # Pearson's minima per offset are those of the variant search (per_offset).
        v, jlo = basis.local_map(fitter, meas, c, js,
                                 pearson_min if meas == "pearson" else None)
        maps[meas] = (v.reshape(shape), jlo)
    metric = frozenset(m for m in _METRIC if m in fitter.measures)
    for meas, dmap in fitter._other_maps(pre, js, skip=linear | metric).items():
        maps[meas] = _localize(dmap)
    for meas, dmap in _pruned_maps(fitter, pre, js, metric).items():
        maps[meas] = _localize(dmap)
    per, per_off, per_sim, per_k, per_b, per_j, per_jl = {}, {}, {}, {}, {}, {}, {}
    for meas in fitter.measures:
        dq, off, j, jl, b, k, dmin = _refine_rows(fitter, *maps[meas], meas, js)
        per[meas], per_off[meas], per_k[meas], per_b[meas] = dq, off, k, b
        per_j[meas], per_jl[meas] = j, jl
        per_sim[meas] = np.asarray(similarity_from_dissimilarity(dmin, meas), dtype=float)
    at_edge = np.zeros(m_, dtype=bool)
    if check_edge:
        edges = ([0] if js[0] > 0 else []) + ([len(js) - 1] if js[-1] < len(
            fitter.offsets) - 1 else [])
        for meas in fitter.measures:
            # argmin of the map itself (not squared), as _at_window_edge
            v, jlo = maps[meas]
            jm = jlo + np.unravel_index(np.argmin(v.reshape(m_, -1), axis=1), v.shape[1:])[0]
            for edge in edges:
                at_edge |= jm == edge
    cons = np.stack([per[m] for m in fitter.consensus], axis=1)
    if len(fitter.consensus) == 1:
        meas = fitter.consensus[0]
        ten_dq, offset = per[meas], per_off[meas]
        k_best, b_best, sim = per_k[meas], per_b[meas], per_sim[meas]
    else:
        ten_dq = np.median(cons, axis=1)
        offset = np.median(np.stack([per_off[m] for m in fitter.consensus], axis=1), axis=1)
        ks = np.stack([per_k[m] for m in fitter.consensus], axis=1)
        k_best = np.argmin(np.abs(lib.ten_dq[None, :] - ten_dq[:, None]), axis=1)
        seg = lib.segment[ks]
        mixed = (seg != seg[:, :1]).any(axis=1)
        k_best = np.where(mixed, np.median(ks, axis=1).astype(int), k_best)
        b_best = np.median(np.stack([per_b[m] for m in fitter.consensus], axis=1),
                           axis=1).astype(int)
        sim = per_sim.get("pearson", per_sim[fitter.consensus[0]])

    # Noise and background-free data inside the (shifted) library window.
    sigma = np.zeros(m_)
    sd_noise = np.zeros(m_)
    # The points inside [lo, hi] of an increasing axis: one slice per pixel.
    i0 = np.searchsorted(e, lib.energy[0] + offset, side="left")
    i1 = np.maximum(np.searchsorted(e, lib.energy[-1] + offset, side="right"), i0)
    p_map = maps["pearson"][0]
    pj, pb, pk = (per_jl["pearson"], per_b["pearson"], per_k["pearson"]) if (
        "pearson" in per_j) else _argmin3(p_map)
    span, inverse = np.unique(np.stack([i0, i1], axis=1), axis=0, return_inverse=True)
    for u, (a, b_) in enumerate(span):
        rows = np.flatnonzero(inverse.ravel() == u)
        key = np.zeros(e.size, dtype=bool)
        key[a:b_] = True
        if key.sum() >= 5:
            sigma[rows] = _noise_sigma_rows(y[rows][:, key])
        y_bg = _interp_rows(e[key], fitter.grid_ext, pre[rows])
        sd_noise[rows] = _noise_sd_rows(fitter, p_map[rows], pj[rows], pb[rows],
                                        pk[rows], y_bg, sigma[rows])
    score, rej = _rejection_rows(fitter, e, y, c, pre, basis, offset)
    med = np.median(cons, axis=1)
    spread = (1.4826 * np.median(np.abs(cons - med[:, None]), axis=1) if cons.shape[1] > 1
              else np.zeros(m_))
    sd = np.sqrt(spread ** 2 + sd_noise ** 2)
    return {"ten_dq": ten_dq, "offset": offset, "sd": sd, "score": score, "similarity": sim,
            "per": per, "per_off": per_off, "per_sim": per_sim, "k_best": k_best,
            "b_best": b_best, "spread": spread, "sd_noise": sd_noise, "sigma": sigma,
            "step_shift": np.full(m_, float(step_shift)), "rejection": rej,
            "at_edge": at_edge}


#: Measures that are metrics (triangle inequality) of the prepared spectra: their offsets
#: can be pruned exactly. JSD: the square root of the JS divergence (Endres & Schindelin
#: 2003); cityblock: L1; EMD: L1 of the cumulative sums.
_METRIC = ("jsd", "cityblock", "emd")
#: Offsets computed first (every ``_STRIDE``-th of the searched ones).
_STRIDE = 3
#: Relative margin of the pruning (the compiled kernels are single precision: ~1e-6).
_PRUNE_MARGIN = 1e-3


def _window_distance(measure: str, a: np.ndarray, b: np.ndarray, step: float,
                     log_a: np.ndarray | None = None, log_b: np.ndarray | None = None
                     ) -> np.ndarray:
    """Distance (double precision) between rows ``a`` and ``b`` (same shape), as the
    measure defines it after its preparation. For JSD, ``log_a``/``log_b`` may give
    ``ln max(a, 0)`` (computed once for overlapping windows); for cityblock they may give
    the rows' areas, for EMD the areas with ``a``/``b`` the cumulative sums of the clipped
    rows."""
    from .similarity import prepare

    if measure == "jsd":
        p, q = np.maximum(a, 0.0), np.maximum(b, 0.0)
        sp, sq = p.sum(axis=1, keepdims=True), q.sum(axis=1, keepdims=True)
        ok = (sp[:, 0] > 1e-300) & (sq[:, 0] > 1e-300)
        sp, sq = np.where(sp > 1e-300, sp, 1.0), np.where(sq > 1e-300, sq, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            lp = (np.log(p) if log_a is None else log_a) - np.log(sp)
            lq = (np.log(q) if log_b is None else log_b) - np.log(sq)
            p, q = p / sp, q / sq
            lm = np.log(0.5 * (p + q))
            tp = np.where(p > 0, p * (lp - lm), 0.0)
            tq = np.where(q > 0, q * (lq - lm), 0.0)
        js = 0.5 * (tp.sum(axis=1) + tq.sum(axis=1))
        return np.where(ok, np.sqrt(np.clip(js, 0.0, None) / np.log(2.0)), 1.0)
    if log_a is not None:  # cityblock/EMD: rows given as (values, area) pairs
        (va, sa), (vb, sb) = (a, log_a), (b, log_b)
        ia = np.divide(1.0, sa, out=np.zeros_like(sa), where=np.abs(sa) > 1e-300)
        ib = np.divide(1.0, sb, out=np.zeros_like(sb), where=np.abs(sb) > 1e-300)
        d = np.abs(va * ia[:, None] - vb * ib[:, None]).sum(axis=1)
        return step * d if measure == "emd" else d
    pa, pb = prepare(a, measure), prepare(b, measure)
    if measure == "emd":
        return step * np.abs(np.cumsum(pa, axis=1) - np.cumsum(pb, axis=1)).sum(axis=1)
    return np.abs(pa - pb).sum(axis=1)


def _pruned_maps(fitter, pre: np.ndarray, js: np.ndarray, measures) -> dict[str, np.ndarray]:
    """Maps of metric measures with offsets that cannot hold the minimum left at ``inf``.

    Every ``_STRIDE``-th offset is computed first. For an offset j between computed
    offsets j' the triangle inequality gives ``d(w_j, x) >= d(w_j', x) - d(w_j, w_j')``
    for every library entry x; where that bound (the larger of the two neighbours') exceeds
    the best distance found, j cannot hold the minimum and is not computed. The minimum,
    its position and the values the refinement reads (the neighbouring offsets of the
    minimum, all entries at its offset) are therefore those of the full map.
    """
    from .similarity import dissimilarity

    lib = fitter.library
    out: dict[str, np.ndarray] = {}
    if not measures:
        return out
    m_, n_j = len(pre), len(js)
    n_b, n_k = len(fitter.extra_fwhm), len(lib.ten_dq)
    win = sliding_window_view(pre, fitter.n, axis=1)[:, js]  # (m, J', n) view
    coarse = np.unique(np.r_[np.arange(0, n_j, _STRIDE), n_j - 1])
    logs = None
    # Cityblock/EMD windows and their areas from one cumulative sum per spectrum (the
    # window distances then need no normalisation or cumulative sum of their own).
    n = fitter.n
    c_raw = np.concatenate([np.zeros((m_, 1)), np.cumsum(pre, axis=1)], axis=1)
    c_pos = np.concatenate([np.zeros((m_, 1)), np.cumsum(np.maximum(pre, 0.0), axis=1)],
                           axis=1)
    area_raw = (c_raw[:, n:] - c_raw[:, :-n])[:, js]  # (m, J')
    area_pos = (c_pos[:, n:] - c_pos[:, :-n])[:, js]
    # Cumulative sum inside window j: c_pos[j + 1 + t] - c_pos[j].
    cum_win = sliding_window_view(c_pos[:, 1:], n, axis=1)[:, js]
    if "jsd" in measures:
        with np.errstate(divide="ignore"):
            logs = sliding_window_view(np.log(np.maximum(pre, 0.0)), fitter.n, axis=1)[:, js]
    rows = np.arange(m_)

    def compute(meas, d, done, pix, jj):
        if len(pix):
            d[pix, jj] = dissimilarity(win[pix, jj], fitter._prepared[meas], meas,
                                       step=fitter.step, dtw_window=fitter.dtw_window,
                                       prepared="library")
            done[pix, jj] = True

    for meas in sorted(measures):
        d = np.full((m_, n_j, n_b * n_k), np.inf)
        done = np.zeros((m_, n_j), dtype=bool)
        pix, jj = np.meshgrid(rows, coarse, indexing="ij")
        compute(meas, d, done, pix.ravel(), jj.ravel())
        best = d.min(axis=(1, 2))
        # Nearest computed offsets left and right of every offset (coarse: same for all).
        right = coarse[np.searchsorted(coarse, np.arange(n_j))]
        left = coarse[np.searchsorted(coarse, np.arange(n_j), side="right") - 1]
        need_p, need_j = [], []
        limit = best * (1.0 + _PRUNE_MARGIN) + 1e-12
        for j in np.setdiff1d(np.arange(n_j), coarse):
            # Needed whatever the window distances (>= 0): no need to compute them.
            sure = np.maximum(d[:, left[j]], d[:, right[j]]).min(axis=1) <= limit
            open_ = rows[~sure]
            lb = np.full((len(open_), n_b * n_k), -np.inf)
            for jn in (left[j], right[j]):
                if meas == "jsd":
                    args = (win[open_, j], win[open_, jn], logs[open_, j], logs[open_, jn])
                elif meas == "emd":
                    args = (cum_win[open_, j] - c_pos[open_, js[j], None],
                            cum_win[open_, jn] - c_pos[open_, js[jn], None],
                            area_pos[open_, j], area_pos[open_, jn])
                else:
                    args = (win[open_, j], win[open_, jn], area_raw[open_, j],
                            area_raw[open_, jn])
                a_, b_, la, lb_ = args
                # Widened: an upper bound of the distance despite rounding.
                delta = _window_distance(meas, a_, b_, fitter.step, la, lb_) * (
                    1.0 + _PRUNE_MARGIN) + 1e-12
                lb = np.maximum(lb, d[open_, jn] - delta[:, None])
            need = sure.copy()
            need[open_] = lb.min(axis=1) <= limit[open_]
            need_p.append(rows[need])
            need_j.append(np.full(int(need.sum()), j))
        if need_p:
            compute(meas, d, done, np.concatenate(need_p), np.concatenate(need_j))
        # The refinement reads the offsets next to the minimum: compute them if pruned.
        jmin = np.unravel_index(np.argmin(d.reshape(m_, -1), axis=1), (n_j, n_b * n_k))[0]
        for dj in (-1, 1):
            jn = np.clip(jmin + dj, 0, n_j - 1)
            miss = ~done[rows, jn]
            compute(meas, d, done, rows[miss], jn[miss])
        out[meas] = d.reshape(m_, n_j, n_b, n_k)
    return out


def _argmin3(dmap: np.ndarray):
    return np.unravel_index(np.argmin(dmap.reshape(len(dmap), -1), axis=1), dmap.shape[1:])


def _noise_sd_rows(fitter, dmap, j, b, k, y_bg, sigma):
    """:meth:`TenDqFitter._noise_sd` of many pixels sharing one mask."""
    lib = fitter.library
    m_, n_k = len(dmap), dmap.shape[3]
    rows = np.arange(m_)
    ok = (k > 0) & (k < n_k - 1) & (sigma > 0) & (y_bg.shape[1] >= 3)
    kk = np.clip(k, 1, n_k - 2)
    r = 1.0 - np.stack([dmap[rows, j, b, kk + d] for d in (-1, 0, 1)], axis=1)
    ssr = y_bg.shape[1] * np.var(y_bg, axis=1)[:, None] * (1.0 - r ** 2)
    h = lib.ten_dq[kk + 1] - lib.ten_dq[kk]
    curv = (ssr[:, 0] - 2 * ssr[:, 1] + ssr[:, 2]) / h ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        sd = np.where(curv <= 0, h, np.sqrt(2.0 * sigma ** 2 / np.where(curv > 0, curv, 1.0)))
    return np.where(ok, sd, 0.0)


def _rejection_rows(fitter, e, y, c, pre, basis: _Basis, offset):
    """:meth:`TenDqFitter._rejection` of many pixels (see there)."""
    from .tendq import _REJECTION_OFFSET_HALF, REJECTION_EXTRA_FWHM

    lib = fitter.library
    m_ = len(y)
    n_k = len(lib.ten_dq)
    j0 = np.round((offset + fitter.offset_range) / fitter.step).astype(int)
    half = int(round(_REJECTION_OFFSET_HALF / fitter.step))
    dots = basis.rej(fitter)
    jr = np.zeros(m_, dtype=int)
    idx = np.zeros(m_, dtype=int)
    for j in np.unique(j0):
        rows = np.flatnonzero(j0 == j)
        jsr = np.arange(max(j - half, 0), min(j + half, 2 * fitter.n_shift) + 1)
        cc = c[rows]
        d = dots[:, jsr].reshape(cc.shape[1], -1)
        inv = basis.norms_inv(cc, jsr)
        # Best r = max over offsets of inv * (max over rows of the numerator) (inv >= 0),
        # in cache-sized pixel sub-blocks.
        for i in range(0, len(rows), _SUB):
            num = (cc[i:i + _SUB] @ d).reshape(-1, len(jsr), dots.shape[2])
            best = num.argmax(axis=2)
            r = np.take_along_axis(num, best[:, :, None], axis=2)[:, :, 0] * inv[i:i + _SUB]
            best[inv[i:i + _SUB] <= 0] = 0  # a flat window: r = 0 for every row
            jj = np.argmax(r, axis=1)
            sub = rows[i:i + _SUB]
            jr[sub], idx[sub] = jsr[jj], best[np.arange(len(sub)), jj]
    off = fitter.offsets[jr]
    shape = np.full(m_, np.inf)
    branching = np.full(m_, np.inf)
    for j in np.unique(jr):
        rows = np.flatnonzero(jr == j)
        o = float(fitter.offsets[j])
        mask = (e >= lib.energy[0] + o) & (e <= lib.energy[-1] + o)
        if mask.sum() < 10:
            continue
        em = e[mask]
        sigma = _noise_sigma_rows(y[rows][:, mask])
        y_bg = _interp_rows(em, fitter.grid_ext, pre[rows])
        model = _interp_rows(em - o, lib.energy, fitter._rej[idx[rows]])
        # Least squares of a*model + b (two columns: closed form).
        mm, my = model.mean(axis=1), y_bg.mean(axis=1)
        dm, dy = model - mm[:, None], y_bg - my[:, None]
        vm = (dm * dm).sum(axis=1)
        a = np.divide((dm * dy).sum(axis=1), vm, out=np.zeros_like(vm), where=vm > 0)
        b = my - a * mm
        ssr = np.mean((y_bg - a[:, None] * model - b[:, None]) ** 2, axis=1)
        var = np.var(y_bg, axis=1)
        signal = var - sigma ** 2
        sh = np.maximum(ssr - sigma ** 2, 0.0) / np.maximum(signal, 1e-12 * np.maximum(
            var, 1e-300))
        sh = np.where((a <= 0) | (signal < 0.5 * sigma ** 2), np.inf, sh)
        # Branching: the model scaled to the L3 line against the measured L2 line.
        l3 = em - o < fitter.split
        yb = y_bg - b[:, None]
        a3, a2 = yb[:, l3].sum(axis=1), yb[:, ~l3].sum(axis=1)
        m3, m2 = model[:, l3].sum(axis=1), model[:, ~l3].sum(axis=1)
        bad = np.minimum(np.minimum(a3, a2), np.minimum(m3, m2)) <= 0
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = m2 / m3
            noise = 2.0 * sigma * np.sqrt((~l3).sum() + rho ** 2 * l3.sum())
            br = np.maximum(np.abs(a2 - rho * a3) - noise, 0.0) / a2
        shape[rows] = sh
        branching[rows] = np.where(bad, np.inf, br)
    info = {"offset": off, "ten_dq": lib.ten_dq[idx % n_k],
            "extra_fwhm": np.asarray(REJECTION_EXTRA_FWHM)[idx // n_k],
            "shape": shape, "branching": branching}
    return np.maximum(shape, branching), info
