"""STXM energy stacks: optical density, per-pixel XMCD moment maps, map-level acquisition.

Model
-----
Each pixel p has the sum ``s_p = OD+ + OD-`` and difference ``d_p = OD+ - OD-`` spectra.
Pixels share spectral *shapes*: for each channel the stack (K energies x P pixels) is
approximated by a rank-R basis learned from all pixels (noise-weighted SVD),

    y_p(E) = sum_r alpha_rp phi_r(E) + noise,

so the shapes are known with the noise of the whole map (P times smaller than a
pixel's) and each pixel only needs its R amplitudes. R is the number of whitened
singular values above the Marchenko-Pastur edge of the counting noise (capped): a
component of pure noise would add its amplitude noise to every pixel. The shapes are interpolated onto
a fine grid by Gaussian processes (:class:`~smartbeam.analysis.gp.WarpedGP`, warped
around the located edges, hyperparameters shared by every pixel; the posterior is
averaged over the hyperparameter grid weighted by marginal likelihood, because a few
energies do not pin the length scale down). The sum-rule
integrals p, q, r are linear functionals, so per pixel

    q_p = sum_r alpha_rp (w_q . phi_r)

is a linear function of the pixel's data: all pixels are analysed by a few matrix
products. The posterior variance of q_p has a noise part (the pixel's own counting
noise through the amplitude fit) and a shape part (GP interpolation uncertainty of the
shapes between measured energies); m_orb and m_spin follow by the delta method.

Acquisition: the next energy is the one that most reduces the sum over pixels of the
posterior variance of m_orb per second of beam time, optionally jointly with the dwell
of that energy (a longer dwell helps the pixel amplitudes, not the pooled shapes). Both
parts of the variance have closed-form one-step reductions that factor into "per
energy" x "per pixel" terms, so the whole map is scored in O(G R + P R). The scoring
model gives the shapes a physical prior mean (:func:`line_basis`: arctan edge steps and
Lorentzian white lines whose offsets and widths are fitted to the pooled data, free
coefficients) with the GP modelling the remainder; the zero-mean GP overstates the
shape uncertainty several fold once the lines are sampled, and kept the acquisition
exploring new energies instead of repeating the dichroic peaks. The maps, their sd and
the stop use the zero-mean model: the prior's smaller sd under-covered the truth on
sparse fixed designs.

Everything here is pure numpy/scipy: no bluesky, no I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import SmartbeamInputError
from .gp import WarpedGP
from .sumrules import SumRuleFunctionals, locate_edges

__all__ = [
    "AdaptiveStack",
    "StackCost",
    "StackDecision",
    "StackModel",
    "StackMoments",
    "cluster_spectra",
    "grid_refit",
    "hyper_mixture",
    "line_basis",
    "line_mixture",
    "lowrank_denoise",
    "optical_density",
    "tendq_maps",
]

# Counts below this are treated as this (log of zero counts).
_MIN_COUNTS = 0.5

# Hyperparameter grid of the shape GPs (normalised data, so amplitudes near 1). Lengths
# reach 206 (warped units): with strong warps around the edges the likelihood optimum
# sat on the former 60 bound. A fixed grid (one eigendecomposition per warp and
# length) replaces scikit-learn's L-BFGS refits, whose
# likelihood gradients cost ~25 ms per evaluation and made refits 90 % of a map's
# analysis; the grid is refined once around its best point.
_LENGTHS = np.geomspace(0.3, 206.0, 17)
_AMPLITUDES = np.geomspace(0.05, 20.0, 7)

# Singular values must exceed the white-noise edge by this factor to count as signal
# (finite-size fluctuations of the largest noise singular value are a few per cent).
_MP_MARGIN = 1.05

# Distinct energies needed before the line prior is used (6 coefficients, and a few
# degrees of freedom for the remainder GP), and measured energies within
# _LINE_SAMPLED_EV of each located edge (a line's width and offset are not identified by
# fewer: the fit is then confidently wrong).
_LINE_MIN_ENERGIES = 10
_LINE_SAMPLED = 3
_LINE_SAMPLED_EV = 1.5


def grid_refit(gp: WarpedGP, x: np.ndarray, y: np.ndarray, noise_var: np.ndarray) -> WarpedGP:
    """Fit a :class:`WarpedGP`'s warp, length and amplitude on a grid, then condition it.

    Maximises the log marginal likelihood over ``gp.warp_grid`` x 17 length scales x 7
    amplitudes (one eigendecomposition per warp and length), then over a 5 x 5 finer
    grid around the best point. Same model and likelihood as :meth:`WarpedGP.refit`,
    ~50x cheaper.

    Parameters
    ----------
    gp
        The model (its ``centres``, ``warp_grid`` and ``length_bounds`` are used).
    x, y, noise_var
        Inputs, values and known noise variances.

    Returns
    -------
    WarpedGP
        ``gp``, fitted and conditioned on the data.
    """
    return _grid_refit(gp, x, y, noise_var)[0]


def _grid_refit(gp: WarpedGP, x: np.ndarray, y: np.ndarray, noise_var: np.ndarray
                ) -> tuple[WarpedGP, list | None, np.ndarray | None]:
    """:func:`grid_refit` that also returns the coarse grid and its likelihoods."""
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    nv = np.broadcast_to(np.asarray(noise_var, dtype=float), x.shape)
    if x.size < 2 or y.shape != x.shape or not (np.all(np.isfinite(x))
                                                 and np.all(np.isfinite(y)) and np.all(nv >= 0)):
        raise SmartbeamInputError(f"{x.size} inputs / {y.size} finite outputs: expected equal "
                                  "sizes >= 2, finite values and non-negative noise")
    y_mean, y_scale = float(np.mean(y)), float(np.std(y)) or 1.0
    yn = (y - y_mean) / y_scale
    alpha = nv / y_scale**2 + 1e-9
    lo, hi = gp.length_bounds
    warps = gp.warp_grid if gp.centres else (0.0,)

    def best_of(cands):
        lml = _grid_lml(gp, x, yn, alpha, cands)
        i = int(np.argmax(lml))
        return ((-np.inf, None) if not np.isfinite(lml[i]) else (float(lml[i]), cands[i])), lml

    lengths = _LENGTHS[(_LENGTHS >= lo) & (_LENGTHS <= hi)]
    coarse = [(a, ln, amp) for a in warps for ln in lengths for amp in _AMPLITUDES]
    (lml, best), coarse_lml = best_of(coarse)
    if best is None:  # every grid point singular: fall back to the optimiser
        return gp.refit(x, y, noise_var), None, None
    a, ln, amp = best
    step_l, step_a = np.sqrt(_LENGTHS[1] / _LENGTHS[0]), np.sqrt(_AMPLITUDES[1] / _AMPLITUDES[0])
    fine = [(a, float(np.clip(ln * step_l ** i, lo, hi)), amp * step_a ** j)
            for i in np.linspace(-1, 1, 5) for j in np.linspace(-1, 1, 5)]
    (lml2, best2), _ = best_of(fine)
    if best2 is not None and lml2 >= lml:
        lml, best = lml2, best2
    gp.warp, gp.length, gp.amplitude = float(best[0]), float(best[1]), float(best[2])
    gp.y_mean, gp.y_scale, gp.log_marginal_likelihood = y_mean, y_scale, lml
    return gp.condition(x, y, nv), coarse, coarse_lml


def _grid_lml(gp: WarpedGP, x: np.ndarray, yn: np.ndarray, alpha: np.ndarray,
              cands: list[tuple[float, float, float]], h: np.ndarray | None = None
              ) -> np.ndarray:
    """Log marginal likelihood of each (warp, length, amplitude); -inf where not finite.

    With D = diag(alpha) and M the unit-amplitude kernel, ``K = amp M + D =
    D^1/2 (amp S + I) D^1/2`` with ``S = D^-1/2 M D^-1/2``. One eigendecomposition of S
    per (warp, length) then gives the likelihood of every amplitude in O(n): the grid
    costs one eigh per length instead of one Cholesky and one solve per grid point, and
    the whitened S stays well conditioned however small the pooled noise.

    With explicit basis functions ``h`` (n, m) of vague prior (a mean function with free
    linear coefficients) the restricted likelihood (Rasmussen & Williams eq. 2.45 in the
    limit of an infinite coefficient prior) is returned instead: with ``A = H^T K^-1 H``
    it adds ``1/2 b^T A^-1 b - 1/2 log|A|`` (``b = H^T K^-1 y``), still O(n m^2) per
    amplitude after the one eigendecomposition.
    """
    out = np.full(len(cands), -np.inf)
    m = 0 if h is None else h.shape[1]
    dinv = 1.0 / np.sqrt(alpha)
    zw = yn * dinv
    const = -0.5 * np.sum(np.log(alpha)) - 0.5 * (x.size - m) * np.log(2 * np.pi)
    for a in sorted({c[0] for c in cands}):
        idx = [i for i, c in enumerate(cands) if c[0] == a]
        u = gp.warp_inputs(x, a)
        r = np.abs(u[:, None] - u[None, :])
        lengths = sorted({cands[i][1] for i in idx})
        s_ = np.stack([_matern52_r(r, ln) for ln in lengths]) * np.outer(dinv, dinv)
        lam, vecs = np.linalg.eigh(s_)
        lam = np.maximum(lam, 0.0)  # M is positive semi-definite; clip round-off
        zv = np.einsum("lij,i->lj", vecs, zw)                 # (L, n)
        z2 = zv ** 2
        hv = None if h is None else np.einsum("lij,ik->ljk", vecs, h * dinv[:, None])
        row = {ln: j for j, ln in enumerate(lengths)}
        for i in idx:
            j, amp = row[cands[i][1]], cands[i][2]
            d = amp * lam[j] + 1.0
            out[i] = const - 0.5 * np.sum(z2[j] / d) - 0.5 * np.sum(np.log(d))
            if hv is not None:
                out[i] += _restricted_term(hv[j], zv[j], d)
    out[~np.isfinite(out)] = -np.inf
    return out


def _restricted_term(hv: np.ndarray, zv: np.ndarray, d: np.ndarray) -> float:
    """``1/2 b^T A^-1 b - 1/2 log|A|`` of the restricted likelihood in the eigenbasis."""
    a = hv.T @ (hv / d[:, None])
    b = hv.T @ (zv / d)
    sign, logdet = np.linalg.slogdet(a)
    if sign <= 0:
        return -np.inf
    try:
        quad = float(b @ np.linalg.solve(a, b))
    except np.linalg.LinAlgError:
        return -np.inf
    return 0.5 * quad - 0.5 * logdet


def line_basis(energy: np.ndarray, edges: tuple[float, float], shifts: tuple[float, float],
               hwhm: tuple[float, float], step_width: float) -> np.ndarray:
    """Generic L2,3-edge basis functions: the physical prior mean of the shape GPs.

    Columns: constant, linear slope, arctan edge steps at L3 and L2 (width
    ``step_width``, the sum rules' step), and unit-height Lorentzian white lines at
    ``edges + shifts`` with half widths ``hwhm`` (core-hole lifetime broadening). Their
    coefficients are free (a vague prior), the same family for every pixel and channel:
    the sum channel needs steps and lines, the dichroism lines of either sign.

    Parameters
    ----------
    energy
        (n,) energies (eV).
    edges
        Located (L3, L2) white lines (eV).
    shifts, hwhm
        Offset of each Lorentzian from its edge and its half width (eV).
    step_width
        Width of the arctan steps (eV).

    Returns
    -------
    numpy.ndarray
        (n, 6) basis matrix, columns scaled to unit height.
    """
    e = np.asarray(energy, dtype=float)
    e3, e2 = edges
    mid, half = 0.5 * (e3 + e2), max(0.5 * (e2 - e3), 1e-6)
    cols = [np.ones_like(e), (e - mid) / half / 4.0]
    cols += [0.5 + np.arctan((e - c) / step_width) / np.pi for c in edges]
    # Lorentzians only: a free Gaussian (resolution) weight per line as well was tried and
    # overfitted 14-20 energies (map error 4x its stated sd).
    cols += [w * w / ((e - c - s_) ** 2 + w * w) for c, s_, w in zip(edges, shifts, hwhm,
                                                                       strict=True)]
    return np.stack(cols, axis=1)


# Line offsets and half widths searched for the prior mean (eV). The widths cover 3d
# L-edge white lines (lifetime + resolution, ~0.3-3 eV HWHM); the offsets let a channel's
# lines (e.g. the dichroism) sit off the maxima of the isotropic spectrum.
_LINE_SHIFTS = np.linspace(-0.6, 0.6, 7)
_LINE_HWHM = np.geomspace(0.3, 3.0, 9)
# Alternatives per line carried into the posterior mixture (3 were tried: 5x the cost,
# the stated sd of sparse stacks grew by ~3 % only).
_LINE_KEEP = 1


def line_mixture(gp: WarpedGP, x: np.ndarray, y: np.ndarray, noise_var: np.ndarray,
                 edges: tuple[float, float], step_width: float, *, max_terms: int = 12,
                 min_weight: float = 1e-3) -> list[tuple]:
    """Fit the line prior mean and the remainder GP's hyperparameter mixture.

    The shapes are modelled as :func:`line_basis` (free coefficients) plus a warped GP of
    the remainder. Line offsets and widths are chosen by the restricted marginal
    likelihood of the measured data (coordinate search, one line at a time, at the most
    likely GP hyperparameters); the few most likely offsets and widths of each line and
    the GP hyperparameter grid are then weighted jointly, as in :func:`hyper_mixture`.
    Without the prior the GP must explain the white lines themselves, and with few
    energies its stated uncertainty of their areas is several times the actual error.

    Parameters
    ----------
    gp
        The model (``centres``, ``warp_grid`` and ``length_bounds`` are used); it is left
        with the most likely hyperparameters (not conditioned).
    x, y, noise_var
        Inputs, values and known noise variances.
    edges, step_width
        Located (L3, L2) and the step width of :func:`line_basis`.

    Returns
    -------
    list of tuple
        ``(line, warp, length, amplitude, weight)`` with ``line = (shifts, hwhm)``,
        weights summing to 1, heaviest first (at most ``max_terms``).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    nv = np.broadcast_to(np.asarray(noise_var, dtype=float), x.shape)
    y_mean, y_scale = float(np.mean(y)), float(np.std(y)) or 1.0
    yn = (y - y_mean) / y_scale
    alpha = nv / y_scale**2 + 1e-9
    lo, hi = gp.length_bounds
    warps = gp.warp_grid if gp.centres else (0.0,)
    lengths = _LENGTHS[(_LENGTHS >= lo) & (_LENGTHS <= hi)]
    coarse = [(a, ln, amp) for a in warps for ln in lengths for amp in _AMPLITUDES]
    shifts, hwhm = [0.0, 0.0], [1.0, 1.0]

    def basis():
        return line_basis(x, edges, tuple(shifts), tuple(hwhm), step_width)

    lml = _grid_lml(gp, x, yn, alpha, coarse, basis())
    best = coarse[int(np.argmax(lml))]
    cands = [(s_, w) for s_ in _LINE_SHIFTS for w in _LINE_HWHM]
    alive: list[list[tuple[float, float]]] = [[], []]
    for i in (0, 1, 0, 1):  # two coordinate sweeps over the two lines
        scores = []
        for s_, w in cands:
            shifts[i], hwhm[i] = s_, w
            scores.append(_grid_lml(gp, x, yn, alpha, [best], basis())[0])
        scores = np.array(scores)
        shifts[i], hwhm[i] = cands[int(np.argmax(scores))]
        # Keep the plausible alternatives of this line: a point estimate of offset and
        # width hides their uncertainty, and with sparse energies the stated sd was then
        # half the error (coverage of the truth by +-1 sd a few per cent).
        keep = [j for j in np.argsort(scores)[::-1][:_LINE_KEEP]
                if scores[j] >= scores.max() + np.log(min_weight)]
        alive[i] = [cands[j] for j in keep]
    # Joint posterior weights over (line alternatives) x (GP hyperparameter grid).
    terms, lmls = [], []
    for c3 in alive[0]:
        for c2 in alive[1]:
            line = ((c3[0], c2[0]), (c3[1], c2[1]))
            h = line_basis(x, edges, *line, step_width)
            lml = _grid_lml(gp, x, yn, alpha, coarse, h)
            terms += [(line, *c) for c in coarse]
            lmls.append(lml)
    lml = np.concatenate(lmls)
    top = int(np.argmax(lml))
    gp.warp, gp.length, gp.amplitude = terms[top][1:]
    gp.y_mean, gp.y_scale, gp.log_marginal_likelihood = y_mean, y_scale, float(lml[top])
    w = np.exp(lml - np.max(lml)) if np.isfinite(lml[top]) else np.ones(len(terms))
    order = [i for i in np.argsort(w)[::-1][:max_terms] if w[i] >= min_weight * w.max()]
    total = float(np.sum(w[order]))
    return [(*terms[i], float(w[i] / total)) for i in order]


def _basis_posterior(gp: WarpedGP, x: np.ndarray, y: np.ndarray, nv: np.ndarray,
                     h: np.ndarray, hg: np.ndarray, grid: np.ndarray, warp: float,
                     length: float, amp: float, y_scale: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and covariance on ``grid`` of basis (vague prior) + warped GP.

    Rasmussen & Williams eqs. 2.41-2.42: ``mean = Hg beta + K*^T K^-1 (y - H beta)``,
    ``cov = K** - K*^T K^-1 K* + R^T (H^T K^-1 H)^-1 R`` with ``R = Hg^T - H^T K^-1 K*``
    (the last term is the uncertainty of the basis coefficients).
    """
    from scipy.linalg import cho_factor, cho_solve, cholesky, solve_triangular

    s2 = amp * y_scale**2
    u, ug = gp.warp_inputs(x, warp), gp.warp_inputs(grid, warp)
    kxx = s2 * _matern52_r(np.abs(u[:, None] - u[None, :]), length)
    kxx[np.diag_indices_from(kxx)] += nv + 1e-9 * y_scale**2
    chol = cholesky(kxx, lower=True, check_finite=False)
    v = solve_triangular(chol, s2 * _matern52_r(np.abs(u[:, None] - ug[None, :]), length),
                         lower=True, check_finite=False)
    hw = solve_triangular(chol, h, lower=True, check_finite=False)
    yw = solve_triangular(chol, y, lower=True, check_finite=False)
    a = hw.T @ hw
    a_f = cho_factor(a + 1e-12 * np.trace(a) * np.eye(a.shape[0]), check_finite=False)
    beta = cho_solve(a_f, hw.T @ yw, check_finite=False)
    mean = hg @ beta + v.T @ (yw - hw @ beta)
    r = hg.T - hw.T @ v                                                  # (m, G)
    kgg = s2 * _matern52_r(np.abs(ug[:, None] - ug[None, :]), length)
    cov = kgg - v.T @ v + r.T @ cho_solve(a_f, r, check_finite=False)
    # Leave-one-energy-out check of the model (closed form: with the restricted precision
    # P = K^-1 - K^-1 H A^-1 H^T K^-1 the held-out residual is (P y)_i / P_ii with variance
    # 1 / P_ii). Its mean squared standardised residual is ~1 for a calibrated model; a
    # line family that misfits the data shows up there, and the covariance is inflated by
    # it (never deflated).
    li = solve_triangular(chol, np.eye(x.size), lower=True, check_finite=False)
    kinv = li.T @ li
    kih = li.T @ hw
    prec = kinv - kih @ cho_solve(a_f, kih.T, check_finite=False)
    py = prec @ y
    dp = np.diag(prec)
    ok = dp > 0
    loo = float(np.mean(py[ok] ** 2 / dp[ok])) if ok.any() else 1.0
    return mean, cov * max(1.0, loo)


def hyper_mixture(gp: WarpedGP, x: np.ndarray, y: np.ndarray, noise_var: np.ndarray, *,
                  max_terms: int = 12, min_weight: float = 1e-3) -> list[tuple[float, ...]]:
    """Posterior weights of the hyperparameter grid: (warp, length, amplitude, weight) list.

    Few energies constrain the length scale and the warp poorly: a single most-likely
    choice (a long length that glides over an unsampled white line) gives a posterior
    sd far too small. Averaging the GP posterior over the grid, weighted by marginal
    likelihood (flat prior on the log-spaced grid), keeps that uncertainty. The
    ``max_terms`` heaviest points with weight >= ``min_weight`` x the largest are kept.

    Parameters
    ----------
    gp
        The model (``centres``, ``warp_grid`` and ``length_bounds`` are used); it is left
        with the most likely hyperparameters and conditioned on the data.
    x, y, noise_var
        Inputs, values and known noise variances.

    Returns
    -------
    list of tuple
        ``(warp, length, amplitude, weight)``, weights summing to 1, heaviest first.
    """
    _, cands, lml = _grid_refit(gp, x, y, noise_var)
    if cands is None:  # no finite grid likelihood: the optimiser's single point
        return [(gp.warp, gp.length, gp.amplitude, 1.0)]
    w = np.exp(lml - np.max(lml))
    order = [i for i in np.argsort(w)[::-1][:max_terms] if w[i] >= min_weight]
    total = float(np.sum(w[order]))
    return [(*cands[i], float(w[i] / total)) for i in order]


def _matern52_r(r: np.ndarray, length: float) -> np.ndarray:
    t = r * (np.sqrt(5.0) / length)
    return (1.0 + t + t * t / 3.0) * np.exp(-t)


def optical_density(counts: np.ndarray, i0: float | np.ndarray | None = None,
                    free_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Optical density ``-ln(I / I0)`` of transmission images and its Poisson variance.

    Parameters
    ----------
    counts
        Transmitted counts, shape (..., ny, nx).
    i0
        Incident counts per pixel and dwell: a scalar or one value per image.
    free_mask
        (ny, nx) boolean mask of a sample-free region; I0 of each image is the mean
        count there (overrides ``i0``).

    Returns
    -------
    od, var
        Arrays of the shape of ``counts``. Without ``i0`` and ``free_mask`` the OD is known
        up to a constant (I0 = 1); the sum rules are invariant to it, because the step
        background has a constant term and d = OD+ - OD- cancels it.
    """
    c = np.asarray(counts, dtype=float)
    if c.ndim < 2:
        raise SmartbeamInputError(f"counts of shape {c.shape}: expected (..., ny, nx) images")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise SmartbeamInputError("counts contain NaN/inf or negative values: expected "
                                  "non-negative detector counts")
    if free_mask is not None:
        mask = np.asarray(free_mask, dtype=bool)
        if mask.shape != c.shape[-2:] or not mask.any():
            raise SmartbeamInputError(f"free_mask of shape {mask.shape}: expected a non-empty "
                                      f"boolean mask of shape {c.shape[-2:]}")
        i0_arr = c[..., mask].mean(axis=-1)[..., None, None]
    elif i0 is None:
        i0_arr = np.ones(c.shape[:-2] + (1, 1))
    else:
        i0_arr = np.asarray(i0, dtype=float)
        if i0_arr.ndim > 0:
            i0_arr = i0_arr.reshape(i0_arr.shape + (1, 1))
        if not np.all(i0_arr > 0):
            raise SmartbeamInputError(f"i0={i0!r}: expected positive incident counts")
    c = np.maximum(c, _MIN_COUNTS)
    od = np.log(np.maximum(i0_arr, _MIN_COUNTS)) - np.log(c)
    return od, 1.0 / c


@dataclass
class StackMoments:
    """Per-pixel sum-rule moments of a stack (all maps shaped (ny, nx)).

    Attributes
    ----------
    m_orb, m_orb_sd, m_spin, m_spin_sd
        Posterior means and standard deviations (mu_B per hole count given).
    p, q, r
        The sum-rule integrals per pixel.
    e_l3, e_l2
        Located edges (eV).
    n_energies
        Number of distinct energies imaged.
    rank
        Spectral components used per channel (s, d).
    """

    m_orb: np.ndarray
    m_orb_sd: np.ndarray
    m_spin: np.ndarray
    m_spin_sd: np.ndarray
    p: np.ndarray
    q: np.ndarray
    r: np.ndarray
    e_l3: float
    e_l2: float
    n_energies: int
    rank: tuple[int, int]

    @property
    def rms_sd(self) -> float:
        """Root-mean-square posterior sd of m_orb over the map (the map uncertainty)."""
        return float(np.sqrt(np.nanmean(self.m_orb_sd ** 2)))

    @property
    def rms_m_orb(self) -> float:
        """Root-mean-square m_orb over the map (scale of the map)."""
        return float(np.sqrt(np.nanmean(self.m_orb ** 2)))


@dataclass
class _Channel:
    """Shared shapes of one channel (s or d) and the per-pixel amplitudes."""

    basis: np.ndarray        # (K, R) shapes at the measured energies
    amplitudes: np.ndarray   # (R, P)
    solve: np.ndarray        # (R, K) weighted least-squares operator B
    fisher_inv: np.ndarray   # (R, R) (Phi^T W Phi)^-1
    gps: list                # R WarpedGPs of the shapes
    mean: np.ndarray         # (R, G) shapes on the grid
    cov_w: list              # per component: dict functional -> (G,) Sigma_r @ w
    var_grid: np.ndarray     # (R, G) posterior variance of the shapes on the grid


class StackModel:
    """Per-pixel XMCD moments of an energy stack with shared spectral shapes.

    Parameters
    ----------
    e_min, e_max
        Energy window (eV) covering pre-edge, both edges and post-edge.
    n_h
        Number of 3d holes.
    edges
        Tabulated (L3, L2) white-line energies, a search hint.
    rank
        Largest number of spectral components per channel (reduced when fewer energies
        are measured).
    n_grid
        Points of the grid of the sum-rule functionals and of candidate energies.
    step_width
        Step-background width of the sum rules (eV).
    rank_from_noise
        Keep only components whose whitened singular value exceeds the Marchenko-Pastur
        edge of the counting noise (at most ``rank``). A component kept beyond the
        sample's true rank is noise, and its amplitude noise enters every pixel's
        integrals (e.g. a single ferromagnetic phase has a rank-1 dichroism).
    warp_grid
        Candidate input-warp strengths of the shape GPs, compared by marginal likelihood.
        White lines ~1 eV wide beside ~10 eV of smooth pre/post-edge need strong warps.
    line_prior
        Model each shape as generic edge physics (:func:`line_basis`: arctan steps and
        Lorentzian white lines at the located edges, offsets and widths fitted to the
        data, free coefficients) plus a GP of the remainder, instead of a zero-mean GP.
        The GP alone overstates the shapes' uncertainty between sparse energies several
        fold, which made the acquisition explore energies long after the shapes were
        known; the coefficients' own uncertainty stays in the posterior. Off by default:
        its stated sd was too small on sparse fixed designs (see :class:`AdaptiveStack`,
        which uses it to choose energies only).
    """

    def __init__(self, e_min: float, e_max: float, n_h: float, *,
                 edges: tuple[float, float] | None = None, rank: int = 2, n_grid: int = 161,
                 step_width: float = 0.6, rank_from_noise: bool = True,
                 warp_grid: tuple[float, ...] = (0.0, 3.0, 8.0, 16.0, 32.0, 64.0),
                 line_prior: bool = False) -> None:
        if not (np.isfinite(e_min) and np.isfinite(e_max) and e_min < e_max):
            raise SmartbeamInputError(f"e_min={e_min!r}, e_max={e_max!r}: expected finite "
                                      "energies with e_min < e_max")
        if not n_h > 0:
            raise SmartbeamInputError(f"n_h={n_h!r}: expected a positive number of 3d holes")
        if not (isinstance(rank, int | np.integer) and rank >= 1):
            raise SmartbeamInputError(f"rank={rank!r}: expected an integer >= 1")
        self.e_min, self.e_max, self.n_h = float(e_min), float(e_max), float(n_h)
        self.edge_hint = tuple(float(e) for e in edges) if edges is not None else None
        self.rank = int(rank)
        self.rank_from_noise = bool(rank_from_noise)
        self.warp_grid = tuple(float(a) for a in warp_grid)
        self.grid = np.linspace(self.e_min, self.e_max, int(n_grid))
        self.step_width = step_width
        self.edges: tuple[float, float] | None = None
        self.functionals: SumRuleFunctionals | None = None
        self.line_prior = bool(line_prior)
        self._hyper: dict[str, list[tuple]] = {}
        self._fitted = False

    # -- fitting ---------------------------------------------------------------------
    def fit(self, energy: np.ndarray, od_plus: np.ndarray, od_minus: np.ndarray,
            var_plus: np.ndarray, var_minus: np.ndarray, *, refit: bool = True) -> StackModel:
        """Learn the shapes and per-pixel amplitudes from a stack.

        Parameters
        ----------
        energy
            (K,) energies of the images (repeats allowed).
        od_plus, od_minus
            (K, ny, nx) optical densities at circ+ and circ-.
        var_plus, var_minus
            Their counting variances, same shape.
        refit
            Refit the GP hyperparameters (else reuse the previous ones: fast path).
        """
        e = np.asarray(energy, dtype=float).ravel()
        arrays = [np.asarray(a, dtype=float) for a in (od_plus, od_minus, var_plus, var_minus)]
        shape = arrays[0].shape
        if arrays[0].ndim != 3 or shape[0] != e.size or any(a.shape != shape for a in arrays):
            raise SmartbeamInputError(
                f"stack arrays of shapes {[a.shape for a in arrays]} for {e.size} energies: "
                "expected four (K, ny, nx) arrays with K = number of energies")
        if np.unique(e).size < 4:
            raise SmartbeamInputError(f"{np.unique(e).size} distinct energies: expected at "
                                      "least 4 to model the spectra")
        if not all(np.all(np.isfinite(a)) for a in arrays) or np.any(arrays[2] <= 0) or np.any(
                arrays[3] <= 0):
            raise SmartbeamInputError("stack contains NaN/inf or non-positive variances: "
                                      "expected finite OD and positive variances")
        if np.any(e < self.e_min) or np.any(e > self.e_max):
            raise SmartbeamInputError(f"energies {e.min()}..{e.max()} eV: expected them inside "
                                      f"the window [{self.e_min}, {self.e_max}]")
        k, ny, nx = shape
        self.shape = (ny, nx)
        p_, m_, vp, vm = (a.reshape(k, ny * nx) for a in arrays)
        s, d, noise = p_ + m_, p_ - m_, vp + vm
        self.energy = e
        self.noise_bar = noise.mean(axis=1)                      # (K,)
        self.noise_scale = (noise / self.noise_bar[:, None]).mean(axis=0)  # (P,) rho_p
        self.noise = noise
        self._uniq = np.unique(e)
        # Edges are relocated at every fit (one small GP of the map-mean spectrum): an
        # adaptive stack walks onto a white line one energy at a time and must follow it.
        self._locate_edges(e, s)
        self.functionals = SumRuleFunctionals.from_grid(self.grid, *self.edges,
                                                        step_width=self.step_width)
        self.chan = {"s": self._channel("s", s, refit), "d": self._channel("d", d, refit)}
        self._fitted = True
        return self

    def _pooled(self, e: np.ndarray, values: np.ndarray, noise_bar: np.ndarray):
        """Average repeated energies: (unique energies, mean values, noise of the mean)."""
        idx = np.searchsorted(self._uniq, e)
        counts = np.bincount(idx, minlength=self._uniq.size).astype(float)
        w = 1.0 / noise_bar
        wsum = np.bincount(idx, weights=w, minlength=self._uniq.size)
        if values.ndim == 1:
            mean = np.bincount(idx, weights=w * values, minlength=self._uniq.size) / wsum
        else:
            mean = np.stack([np.bincount(idx, weights=w * v, minlength=self._uniq.size) / wsum
                             for v in values.T], axis=1)
        return self._uniq, mean, 1.0 / wsum, counts

    def _locate_edges(self, e: np.ndarray, s: np.ndarray) -> None:
        pooled = s.mean(axis=1)
        ue, ys, nv, _ = self._pooled(e, pooled, self.noise_bar / s.shape[1])
        gp = grid_refit(WarpedGP(), ue, ys, nv)
        mean = gp.predict(self.grid, return_std=False)
        try:
            edges = locate_edges(self.grid, mean, hint=self.edge_hint)
        except SmartbeamInputError:
            span = self.e_max - self.e_min
            edges = self.edge_hint or (self.e_min + 0.35 * span, self.e_min + 0.65 * span)
        lo, hi = self.grid[1], self.grid[-2]
        e3 = float(np.clip(edges[0], lo, hi - 1.0))
        e2 = float(np.clip(edges[1], e3 + 0.5, hi))
        self.edges = (e3, e2)

    def _channel(self, name: str, y: np.ndarray, refit: bool) -> _Channel:
        k, n_pix = y.shape
        rank = max(1, min(self.rank, self._uniq.size // 2))
        sw = np.sqrt(self.noise_bar)
        yw = y / sw[:, None]
        # Left singular vectors from the K x K Gram matrix: O(K^2 P) instead of a full
        # SVD of the K x P stack (10x faster for 10^4 pixels).
        evals, evecs = np.linalg.eigh(yw @ yw.T)
        order = np.argsort(evals)[::-1]
        if self.rank_from_noise:
            # Components below the Marchenko-Pastur edge of the whitened noise are noise:
            # each one kept adds its amplitude noise to every pixel's integrals.
            edge = _MP_MARGIN * np.sqrt(n_pix) * (1.0 + np.sqrt(k / n_pix))
            above = int(np.sum(np.sqrt(np.maximum(evals, 0.0)) > edge))
            rank = max(1, min(rank, above))
        top = order[:rank]
        sv = np.sqrt(np.maximum(evals[top], 0.0))
        basis = sw[:, None] * evecs[:, top] * sv / np.sqrt(n_pix)  # (K, R)
        wb = basis / self.noise_bar[:, None]
        fisher = basis.T @ wb
        fisher_inv = np.linalg.inv(fisher)
        solve = fisher_inv @ wb.T                                      # (R, K)
        amplitudes = solve @ y                                         # (R, P)
        f = self.functionals
        weights = {"p": f.w_p, "q": f.w_q, "r": f.w_r}
        gps, means, cov_w, var_grid = [], [], [], []
        hyper = self._hyper.get(name, [])
        mixtures = []
        for r in range(rank):
            ue, yr, nv, _ = self._pooled(self.energy, basis[:, r], self.noise_bar / n_pix)
            gp = WarpedGP(centres=self.edges, warp_grid=self.warp_grid,
                          length_bounds=(_LENGTHS[0], _LENGTHS[-1]))
            # The line prior needs a few energies beyond its 6 coefficients.
            use_line = (self.line_prior and ue.size >= _LINE_MIN_ENERGIES
                        and all(np.sum(np.abs(ue - c) <= _LINE_SAMPLED_EV) >= _LINE_SAMPLED
                                for c in self.edges))
            if refit or r >= len(hyper) or hyper[r][0] != use_line:
                if use_line:
                    mix = line_mixture(gp, ue, yr, nv, self.edges, self.step_width,
                                       max_terms=24)
                else:
                    mix = [(None, *t) for t in hyper_mixture(gp, ue, yr, nv)]
            else:
                mix = hyper[r][1]
            # Posterior averaged over the mixture (mean and law of total covariance); the
            # GP is left at the heaviest term for reporting.
            mean = np.zeros(self.grid.size)
            second = np.zeros((self.grid.size, self.grid.size))
            y_mean, y_scale = float(np.mean(yr)), float(np.std(yr)) or 1.0
            bases: dict = {}
            for line, warp, length, amp, wt in reversed(mix):
                gp.warp, gp.length, gp.amplitude = warp, length, amp
                gp.y_mean, gp.y_scale = y_mean, y_scale
                if line is not None:
                    if line not in bases:
                        bases[line] = (line_basis(ue, self.edges, *line, self.step_width),
                                       line_basis(self.grid, self.edges, *line,
                                                  self.step_width))
                    m_i, cov_i = _basis_posterior(gp, ue, yr, nv, *bases[line], self.grid,
                                                  warp, length, amp, y_scale)
                else:
                    gp.condition(ue, yr, nv)
                    m_i, kgg, v = gp.posterior(self.grid)
                    cov_i = kgg - v.T @ v
                mean += wt * m_i
                second += wt * (cov_i + np.outer(m_i, m_i))
            cov = second - np.outer(mean, mean)
            gps.append(gp)
            means.append(mean)
            mixtures.append((use_line, mix))
            cov_w.append({key: cov @ w for key, w in weights.items()})
            var_grid.append(np.maximum(np.diag(cov), 0.0))
        self._hyper[name] = mixtures
        return _Channel(basis, amplitudes, solve, fisher_inv, gps, np.array(means), cov_w,
                        np.array(var_grid))

    # -- results -----------------------------------------------------------------------
    def _require(self) -> None:
        if not self._fitted:
            raise RuntimeError("StackModel used before fit()")

    def _integrals(self, ch: _Channel, keys: tuple[str, ...]) -> dict[str, tuple]:
        """Per-pixel values and (co)variances of linear functionals of one channel."""
        f = self.functionals
        w = {"p": f.w_p, "q": f.w_q, "r": f.w_r}
        c = {key: ch.mean @ w[key] for key in keys}                         # (R,)
        a = {key: ch.solve.T @ c[key] for key in keys}                      # (K,)
        vals = {key: c[key] @ ch.amplitudes for key in keys}               # (P,)
        amp2 = ch.amplitudes ** 2                                           # (R, P)
        out = {}
        for i, k1 in enumerate(keys):
            for k2 in keys[i:]:
                noise = (a[k1] * a[k2]) @ self.noise                       # (P,)
                shape_v = np.array([w[k1] @ cw[k2] for cw in ch.cov_w])     # (R,)
                out[(k1, k2)] = noise + shape_v @ amp2
        return {"values": vals, "cov": out, "c": c, "a": a}

    def moments(self) -> StackMoments:
        """Posterior mean and sd maps of m_orb and m_spin (delta method)."""
        self._require()
        di = self._integrals(self.chan["d"], ("p", "q"))
        si = self._integrals(self.chan["s"], ("r",))
        p, q = di["values"]["p"], di["values"]["q"]
        r = si["values"]["r"]
        var_p, var_q = di["cov"][("p", "p")], di["cov"][("q", "q")]
        cov_pq, var_r = di["cov"][("p", "q")], si["cov"][("r", "r")]
        with np.errstate(divide="ignore", invalid="ignore"):
            r_safe = np.where(np.abs(r) > 1e-12, r, np.nan)
            a = 4.0 * self.n_h / 3.0
            m_orb = -a * q / r_safe
            u = 6 * p - 4 * q
            m_spin = -self.n_h * u / r_safe
            var_u = 36 * var_p - 48 * cov_pq + 16 * var_q
            sd_orb = a * np.sqrt(np.maximum(var_q / r_safe**2 + q**2 * var_r / r_safe**4, 0))
            sd_spin = self.n_h * np.sqrt(np.maximum(var_u / r_safe**2
                                                    + u**2 * var_r / r_safe**4, 0))
        shp = self.shape
        return StackMoments(m_orb.reshape(shp), sd_orb.reshape(shp), m_spin.reshape(shp),
                            sd_spin.reshape(shp), p.reshape(shp), q.reshape(shp),
                            r.reshape(shp), float(self.edges[0]), float(self.edges[1]),
                            int(self._uniq.size),
                            (self.chan["s"].amplitudes.shape[0],
                             self.chan["d"].amplitudes.shape[0]))

    def noise_at(self, energy: np.ndarray) -> np.ndarray:
        """Map-mean counting variance of s (= of d) predicted at ``energy``."""
        ue, nb, _, _ = self._pooled(self.energy, self.noise_bar, np.ones_like(self.noise_bar))
        return np.exp(np.interp(energy, ue, np.log(nb)))

    def variance_reduction(self, dwell_factor: float = 1.0) -> np.ndarray:
        """Expected reduction of sum_p Var(m_orb_p) for one more image pair at each grid energy.

        Two parts, each a one-step Gaussian update: the pixel amplitudes gain Fisher
        information ``u u^T / n_p(E)`` (u: the shapes at E), and the shared shapes gain
        one pooled observation with the map-mean noise / P.

        Parameters
        ----------
        dwell_factor
            Dwell of the new pair relative to the stack's images (the counting variance
            of OD scales as 1 / dwell).
        """
        self._require()
        if not (np.isfinite(dwell_factor) and dwell_factor > 0):
            raise SmartbeamInputError(f"dwell_factor={dwell_factor!r}: expected a positive "
                                      "relative dwell")
        di = self._integrals(self.chan["d"], ("q",))
        si = self._integrals(self.chan["s"], ("r",))
        q, r = di["values"]["q"], si["values"]["r"]
        ok = np.isfinite(q) & np.isfinite(r) & (np.abs(r) > 1e-12)
        q, r = q[ok], r[ok]
        rho = self.noise_scale[ok]
        a2 = (4.0 * self.n_h / 3.0) ** 2
        nbar = self.noise_at(self.grid) / dwell_factor                      # (G,)
        n_pix = self.noise.shape[1]
        w_orb_q = a2 / r**2                                                 # (P,)
        w_orb_r = a2 * q**2 / r**4
        total = np.zeros(self.grid.size)
        for ch, key, wpix in ((self.chan["d"], "q", w_orb_q), (self.chan["s"], "r", w_orb_r)):
            c = (di if key == "q" else si)["c"][key]                          # (R,)
            # Amplitude part: rho_p (c^T F^-1 u)^2 / (nbar + u^T F^-1 u), u = shapes at E.
            u = ch.mean                                                        # (R, G)
            fu = ch.fisher_inv @ u
            num = (c @ fu) ** 2
            den = nbar + np.einsum("rg,rg->g", u, fu)
            total += num / den * float(wpix @ rho)
            # Shape part: each component's functional variance shrinks by cov^2/(var+n/P).
            amp2 = ch.amplitudes[:, ok] ** 2 @ wpix                            # (R,)
            for rr, cw in enumerate(ch.cov_w):
                total += amp2[rr] * cw[key] ** 2 / (ch.var_grid[rr] + nbar / n_pix)
        return total

    def hyperparameters(self) -> dict[str, float]:
        """Shape-GP hyperparameters of the leading component of each channel."""
        self._require()
        out = {}
        for name in ("s", "d"):
            h = self.chan[name].gps[0].hyperparameters
            out.update({f"{name}_length": h["length"], f"{name}_warp": h["warp"]})
        return out


@dataclass(frozen=True)
class StackCost:
    """Seconds to image the field of view at one energy with both helicities.

    Parameters
    ----------
    n_pixels, n_lines
        Pixels of the raster and its number of lines.
    dwell
        Dwell per pixel (s).
    flyback
        Line flyback time (s).
    mono_speed
        Monochromator speed (eV/s).
    pol_switch
        Time of one EPU helicity switch (s).
    overhead
        Any other per-energy overhead (s).
    """

    n_pixels: int
    n_lines: int
    dwell: float
    flyback: float = 0.002
    mono_speed: float = 5.0
    pol_switch: float = 1.0
    overhead: float = 0.3

    @property
    def image_time(self) -> float:
        """Seconds per image."""
        return self.n_pixels * self.dwell + self.n_lines * self.flyback

    def __call__(self, energy: np.ndarray, current: float | None,
                 dwell_factor: float = 1.0) -> np.ndarray:
        """Cost of an image pair at each of ``energy`` starting from ``current``.

        ``dwell_factor`` scales the dwell per pixel of the pair (not the flyback).
        """
        e = np.asarray(energy, dtype=float)
        travel = np.zeros_like(e) if current is None else np.abs(e - current) / self.mono_speed
        image = self.n_pixels * self.dwell * dwell_factor + self.n_lines * self.flyback
        return 2 * image + self.pol_switch + self.overhead + travel


@dataclass
class StackDecision:
    """One decision of :class:`AdaptiveStack` (a row of the ``decisions`` stream)."""

    energy: float
    acquisition: float
    n_energies: int
    rms_sd: float
    rms_m_orb: float
    e_l3: float
    e_l2: float
    latency_ms: float
    stop: bool = False
    reason: str = ""
    hyperparameters: dict = field(default_factory=dict)
    dwell_factor: float = 1.0


@dataclass
class AdaptiveStack:
    """Ask/tell driver of an adaptive XMCD energy stack (pure computation).

    Parameters
    ----------
    e_min, e_max
        Energy window (eV).
    n_h
        Number of 3d holes.
    cost
        Beam-time model of one image pair.
    tol
        Stop when the map's RMS posterior sd of m_orb is <= ``tol`` x its RMS m_orb.
    max_energies
        Budget of energies (each imaged at both helicities).
    n_init
        Energies of the initial uniform design.
    edges
        Tabulated (L3, L2), a search hint.
    rank
        Spectral components per channel.
    refit_every
        Refit GP hyperparameters when the energy count grew by this fraction.
    n_grid
        Points of the candidate-energy and functional grid.
    edge_bracket
        Sampling of the white lines required before the tolerance is trusted (eV): a
        measured energy within half of it from each located edge and one within it on
        each side (about the white-line FWHM of 3d L edges).
    edge_tolerance
        Largest move (eV) of the located edges between two decisions for a stop.
    min_adaptive
        Adaptive energies after the initial design before the tolerance is trusted.
    dwell_factors
        Relative dwells the acquisition may choose for the next image pair (1: the
        cost's dwell). Longer dwell pays where the pixels' m_orb amplitudes gain most
        per second (the dichroic white lines); the shared shapes, pooled over all pixels,
        gain nothing from it, so exploring energies stays at the short dwell.
    line_prior
        Score the next energy with shapes modelled as generic edge physics plus a GP
        remainder (see :class:`StackModel`; attribute ``acq_model``). Maps, their sd and
        the stop come from the zero-mean model (``model``), whose sd is the calibrated
        one.
    """

    e_min: float
    e_max: float
    n_h: float
    cost: StackCost
    tol: float = 0.1
    max_energies: int = 40
    n_init: int = 10
    edges: tuple[float, float] | None = None
    rank: int = 2
    refit_every: float = 0.2
    n_grid: int = 161
    edge_bracket: float = 1.0
    edge_tolerance: float = 0.3
    min_adaptive: int = 4
    dwell_factors: tuple[float, ...] = (1.0,)
    line_prior: bool = True

    def __post_init__(self) -> None:
        factors = tuple(float(f) for f in self.dwell_factors)
        if not factors or not all(np.isfinite(f) and f > 0 for f in factors):
            raise SmartbeamInputError(f"dwell_factors={self.dwell_factors!r}: expected "
                                      "positive relative dwells")
        self.dwell_factors = factors
        if not (np.isfinite(self.tol) and self.tol > 0):
            raise SmartbeamInputError(f"tol={self.tol!r}: expected a positive relative tolerance")
        if self.n_init < 4:
            raise SmartbeamInputError(f"n_init={self.n_init!r}: expected at least 4 energies")
        if self.max_energies < self.n_init:
            raise SmartbeamInputError(f"max_energies={self.max_energies!r}: expected at least "
                                      f"the initial design of {self.n_init} energies")
        self.model = StackModel(self.e_min, self.e_max, self.n_h, edges=self.edges,
                                rank=self.rank, n_grid=self.n_grid, line_prior=False)
        # The line-prior model only scores the next energy: its stated sd was measured to
        # be too small on sparse fixed designs (coverage of the truth by +-1 sd 1-64 %
        # at 18-22 energies), so maps and the stop use the zero-mean model.
        self.acq_model = (StackModel(self.e_min, self.e_max, self.n_h, edges=self.edges,
                                     rank=self.rank, n_grid=self.n_grid, line_prior=True)
                          if self.line_prior else self.model)
        self._e: list[float] = []
        self._dwell: list[float] = []
        self._od: list[tuple[np.ndarray, ...]] = []
        self._last_refit = 0
        self.history: list[StackDecision] = []

    @property
    def n_energies(self) -> int:
        """Image pairs taken so far (a repeated energy counts again)."""
        return len(self._e)

    @property
    def n_distinct(self) -> int:
        """Distinct energies imaged so far."""
        return int(np.unique(np.array(self._e)).size)

    @property
    def dwell_total(self) -> float:
        """Sum of the relative dwells of the pairs taken (pairs at dwell 1 count 1)."""
        return float(sum(self._dwell))

    def initial_design(self) -> np.ndarray:
        """Uniform initial design over the window; with an edge hint the uniform points
        nearest the tabulated white lines are moved onto them (a coarse grid otherwise
        straddles 1 eV wide lines and the first model cannot know they are there)."""
        design = np.linspace(self.e_min, self.e_max, self.n_init)
        if self.edges is not None:
            for edge in self.edges:
                if self.e_min < edge < self.e_max:
                    design[int(np.argmin(np.abs(design - edge)))] = edge
        return np.unique(design)

    def tell(self, energy: float, counts_plus: np.ndarray, counts_minus: np.ndarray,
             i0: float | None = None, dwell_factor: float = 1.0) -> None:
        """Add the two helicity images (transmitted counts) measured at ``energy``.

        ``i0`` is the incident count per pixel at the cost's dwell (None: 1, OD known up
        to a constant); the images were taken at ``dwell_factor`` times that dwell, so
        their incident count is ``i0 * dwell_factor`` (keeps the OD offset the same for
        every image).
        """
        if not (np.isfinite(dwell_factor) and dwell_factor > 0):
            raise SmartbeamInputError(f"dwell_factor={dwell_factor!r}: expected a positive "
                                      "relative dwell")
        cp, cm = np.asarray(counts_plus), np.asarray(counts_minus)
        if cp.shape != cm.shape or cp.ndim != 2:
            raise SmartbeamInputError(f"images of shapes {cp.shape}, {cm.shape}: expected two "
                                      "(ny, nx) images of the same shape")
        if self._od and cp.shape != self._od[0][0].shape:
            raise SmartbeamInputError(f"image of shape {cp.shape}: expected "
                                      f"{self._od[0][0].shape} like the first image")
        i0_eff = (1.0 if i0 is None else float(i0)) * float(dwell_factor)
        odp, vp = optical_density(cp, i0_eff)
        odm, vm = optical_density(cm, i0_eff)
        self._e.append(float(energy))
        self._dwell.append(float(dwell_factor))
        self._od.append((odp, odm, vp, vm))

    def stack(self) -> tuple[np.ndarray, ...]:
        """(energy, od_plus, od_minus, var_plus, var_minus) of everything told so far."""
        return (np.array(self._e),) + tuple(np.stack([o[i] for o in self._od]) for i in range(4))

    def update(self, force_refit: bool = False) -> bool:
        """Refit the model on all images; returns True when hyperparameters were refit."""
        n = self.n_energies
        due = n - self._last_refit >= max(2, int(np.ceil(self.refit_every * self._last_refit)))
        refit = force_refit or self._last_refit == 0 or due
        data = self.stack()
        self.model.fit(*data, refit=refit)
        if self.acq_model is not self.model:
            self.acq_model.fit(*data, refit=refit)
        if refit:
            self._last_refit = n
        return refit

    def edge_gaps(self) -> list[float]:
        """Energies still needed to sample the located white lines (empty: sampled).

        A white line narrower than the spacing of the measured energies is invisible to
        the GP (a long fitted length glides over it and the posterior sd is small but
        wrong; q, a small difference of the two white-line areas, then even changes
        sign). Each located edge needs a measured energy within ``edge_bracket / 2`` of
        it and one within ``edge_bracket`` on each side.
        """
        if self.model.edges is None:
            return []
        e = np.array(self._e)
        b = self.edge_bracket
        need = []
        for edge in self.model.edges:
            d = e - edge
            if np.min(np.abs(d)) > 0.5 * b:
                need.append(edge)
            elif not np.any((d < 0) & (d >= -b)):
                need.append(edge - 0.6 * b)
            elif not np.any((d > 0) & (d <= b)):
                need.append(edge + 0.6 * b)
        return [float(np.clip(v, self.e_min, self.e_max)) for v in need]

    def ask(self, current_energy: float | None = None) -> StackDecision:
        """Update the model, check the stopping rule and choose the next energy.

        The tolerance is trusted only once the GP can know the answer (compare the
        single-spectrum :class:`~smartbeam.analysis.acquisition.StoppingRule`'s
        ``min_points``): at least ``n_init + min_adaptive`` energies, both located white
        lines sampled (:meth:`edge_gaps`), the edges stable since the previous decision
        and hyperparameters refit on all the data. While the edges are not sampled the
        next energy closes the nearest gap, whatever the (then over-confident) GP says.
        """
        t0 = time.perf_counter()
        self.update()
        prev = self.history[-1] if self.history else None
        gaps = self.edge_gaps()
        m = self.model.moments()
        stable = prev is not None and max(abs(m.e_l3 - prev.e_l3),
                                          abs(m.e_l2 - prev.e_l2)) <= self.edge_tolerance
        trusted = (self.n_energies >= self.n_init + self.min_adaptive and not gaps and stable)
        if trusted and self._last_refit < self.n_energies and m.rms_sd <= self.tol * m.rms_m_orb:
            # About to stop: judge with hyperparameters fitted on every energy.
            self.update(force_refit=True)
            m = self.model.moments()
            gaps = self.edge_gaps()
            trusted = not gaps and max(abs(m.e_l3 - prev.e_l3),
                                       abs(m.e_l2 - prev.e_l2)) <= self.edge_tolerance
        rms_sd, rms = m.rms_sd, m.rms_m_orb
        stop, reason = False, ""
        if trusted and np.isfinite(rms_sd) and rms_sd <= self.tol * rms:
            stop, reason = True, f"map rms sd {rms_sd:.3g} <= tol {self.tol:g} x rms {rms:.3g}"
        elif self.n_energies >= self.max_energies:
            stop, reason = True, f"budget of {self.max_energies} energies spent"
        # Score every (energy, dwell) pair per second of beam time.
        best = (-np.inf, 0.0, 1.0)
        for f in self.dwell_factors:
            score = (self.acq_model.variance_reduction(f)
                     / self.cost(self.acq_model.grid, current_energy, f))
            i = int(np.argmax(score))
            if score[i] > best[0]:
                best = (float(score[i]), float(self.acq_model.grid[i]), f)
        acq, energy, factor = best
        # A measured energy within half a grid step is the same energy at the grid's
        # resolution: image it again rather than a new energy beside it.
        e_done = np.unique(np.array(self._e))
        near = np.abs(e_done - energy)
        if near.size and near.min() <= 0.5 * (self.model.grid[1] - self.model.grid[0]):
            energy = float(e_done[int(np.argmin(near))])
        if gaps:
            here = self.e_min if current_energy is None else current_energy
            energy = min(gaps, key=lambda v: abs(v - here))
            acq, factor = float("nan"), 1.0  # not a variance-reduction choice
        dec = StackDecision(energy=energy, acquisition=acq,
                            n_energies=self.n_energies, rms_sd=rms_sd, rms_m_orb=rms,
                            e_l3=m.e_l3, e_l2=m.e_l2,
                            latency_ms=1e3 * (time.perf_counter() - t0), stop=stop,
                            reason=reason, hyperparameters=self.model.hyperparameters(),
                            dwell_factor=factor)
        self.history.append(dec)
        return dec


def cluster_spectra(spectra: np.ndarray, n_clusters: int = 4, *, n_components: int = 5,
                    random_state: int = 0) -> np.ndarray:
    """Cluster pixel spectra without labels (PCA then k-means, scikit-learn).

    Parameters
    ----------
    spectra
        (n_pixels, n_energy) spectra, e.g. optical density per pixel.
    n_clusters
        Number of clusters.
    n_components
        PCA components kept before k-means (denoises the spectra).
    random_state
        Seed (reproducible labels).

    Returns
    -------
    numpy.ndarray
        (n_pixels,) integer labels.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    x = np.asarray(spectra, dtype=float)
    if x.ndim != 2 or x.shape[0] < n_clusters or not np.all(np.isfinite(x)):
        raise SmartbeamInputError(f"spectra of shape {x.shape}: expected finite (n_pixels, "
                                  f"n_energy) with at least n_clusters={n_clusters} pixels")
    # Normalise each spectrum: clusters by shape, not by thickness.
    x = x - x.mean(axis=1, keepdims=True)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    nc = max(1, min(n_components, x.shape[0] - 1, x.shape[1]))
    z = PCA(n_components=nc, random_state=random_state).fit_transform(x)
    return KMeans(n_clusters=n_clusters, n_init=4, random_state=random_state).fit_predict(z)


def lowrank_denoise(od: np.ndarray, var: np.ndarray, rank: int | None = None
                    ) -> tuple[np.ndarray, dict]:
    """Project every pixel spectrum of a stack onto the map's leading spectral components.

    A field of view holds a few phases (spectral shapes) at varying thickness, so the
    (K energies x P pixels) stack is low rank plus counting noise. The components are
    the left singular vectors of the noise-whitened stack (mean spectrum removed); with
    ``rank=None`` the kept components are those whose singular values exceed the
    Marchenko-Pastur edge of pure white noise, ``sqrt(P) (1 + sqrt(K/P))``, so the rank
    is set by the noise the counting statistics imply, not by a guess. Each pixel keeps
    its own amplitudes: no spatial averaging (the effective spatial resolution stays one
    pixel); the noise per pixel drops by about ``sqrt(rank / K)``.

    Parameters
    ----------
    od
        (K, ny, nx) optical density.
    var
        Its counting variance, same shape (or broadcastable).
    rank
        Components kept besides the mean spectrum (None: from the noise edge).

    Returns
    -------
    od_denoised, info
        The projected stack (same shape) and ``{"rank", "noise_edge", "singular_values"}``
        (the ten largest whitened singular values).
    """
    x = np.asarray(od, dtype=float)
    if x.ndim != 3 or x.shape[0] < 3:
        raise SmartbeamInputError(f"od of shape {x.shape}: expected a (K, ny, nx) stack "
                                  "with K >= 3 energies")
    v = np.broadcast_to(np.asarray(var, dtype=float), x.shape)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(v)) and np.all(v > 0)):
        raise SmartbeamInputError("od/var contain NaN/inf or non-positive variances: "
                                  "expected finite OD and positive variances")
    k = x.shape[0]
    y = x.reshape(k, -1)
    n_pix = y.shape[1]
    # Whiten by the map-mean noise of each energy (thickness changes the per-pixel noise
    # by a few per cent only; a per-pixel weight would break the shared basis).
    sw = np.sqrt(v.reshape(k, -1).mean(axis=1))
    mean = y.mean(axis=1, keepdims=True)
    z = (y - mean) / sw[:, None]
    evals, evecs = np.linalg.eigh(z @ z.T)
    order = np.argsort(evals)[::-1]
    sv = np.sqrt(np.maximum(evals[order], 0.0))
    edge = np.sqrt(n_pix) * (1.0 + np.sqrt(k / n_pix))
    if rank is None:
        rank = int(np.sum(sv > edge))
    elif not (isinstance(rank, int | np.integer) and 0 <= rank <= k):
        raise SmartbeamInputError(f"rank={rank!r}: expected an integer in [0, {k}]")
    u = evecs[:, order[:rank]]
    z_hat = u @ (u.T @ z)
    out = mean + sw[:, None] * z_hat
    return out.reshape(x.shape), {"rank": int(rank), "noise_edge": float(edge),
                                  "singular_values": [float(s_) for s_ in sv[:10]]}


def tendq_maps(fitter, energy: np.ndarray, od: np.ndarray, var: np.ndarray | None = None,
               *, denoise: bool = True, rank: int | None = None,
               shared_offset: float | None = 0.5, measures: str | tuple[str, ...] = "linear"
               ) -> dict[str, np.ndarray]:
    """Per-pixel 10Dq, its sd and the rejection mask of an OD stack.

    Parameters
    ----------
    fitter
        A fitted :class:`~smartbeam.analysis.tendq.TenDqFitter` (with its threshold).
    energy
        (K,) increasing energies (eV).
    od
        (K, ny, nx) optical density (any constant offset is removed with the background).
    var
        Counting variance of ``od`` (needed for ``denoise``).
    denoise
        Pool the map first: every pixel spectrum is projected on the stack's leading
        spectral components (:func:`lowrank_denoise`); each pixel keeps its own
        amplitudes, so regions stay one pixel sharp.
    rank
        Components of the projection (None: chosen from the noise).
    shared_offset
        The pixels of a stack share one monochromator calibration: each is searched
        within this half width (eV) of their median offset (see
        :meth:`~smartbeam.analysis.tendq.TenDqFitter.predict_many`); ``None`` searches each
        pixel over the fitter's whole offset range.
    measures
        Similarity measures of the estimate: ``"linear"`` (default,
        :data:`~smartbeam.analysis.tendq.MAP_MEASURES`: the fitter's measures among
        :data:`~smartbeam.analysis.tendq.LINEAR_MEASURES`, Pearson, cosine, Euclidean,
        which a denoised stack evaluates from its pixels' low-rank coefficients alone --
        many times faster than the nonlinear JSD, cityblock and EMD), ``"all"`` (the
        fitter's own) or a tuple of measure names (see
        :meth:`~smartbeam.analysis.tendq.TenDqFitter.with_measures`). Fewer measures
        change the consensus (median of the consensus measures among them) and its sd.

    Returns
    -------
    dict
        ``ten_dq``, ``ten_dq_sd`` (NaN where rejected), ``described`` (bool), ``score``,
        ``offset`` maps of shape (ny, nx), ``rank`` (components kept, -1 without
        denoising) and ``measures`` (the tuple used).
    """
    e = np.asarray(energy, dtype=float)
    stack = np.asarray(od, dtype=float)
    if stack.ndim != 3 or stack.shape[0] != e.size:
        raise SmartbeamInputError(f"od of shape {stack.shape}: expected (K, ny, nx) with "
                                  f"K = {e.size} energies")
    fitter = fitter.with_measures(measures)
    used_rank = -1
    if denoise:
        if var is None:
            raise SmartbeamInputError("denoise=True needs var (the counting variance of od)")
        stack, info = lowrank_denoise(stack, var, rank)
        used_rank = info["rank"]
    ny, nx = stack.shape[1:]
    if shared_offset is not None:  # a fitter may search less than the default half width
        shared_offset = min(shared_offset, fitter.offset_range)
    # Arrays straight from the batched search (no per-pixel result objects).
    res = fitter.predict_map(e, stack.reshape(e.size, -1).T, shared_offset=shared_offset)
    out = {"ten_dq": res["ten_dq"], "ten_dq_sd": res["sd"], "described": res["described"],
           "score": res["score"], "offset": res["offset"]}
    maps = {k: v.reshape(ny, nx) for k, v in out.items()}
    maps["rank"] = used_rank
    maps["measures"] = tuple(fitter.measures)
    return maps
