"""Gaussian-process models of spectra for adaptive energy scans.

:class:`WarpedGP` is a 1-D GP regression with

- a Matern-5/2 kernel on *warped* inputs ``u(x) = x + a w sum_k arctan((x - c_k) / w)``:
  space is stretched by ``1 + a`` around the centres ``c_k`` (absorption edges), so one
  stationary kernel in ``u`` has a short length scale at the edges and a long one in
  between; the warp strength ``a`` is chosen by marginal likelihood at each refit;
- known, per-point (heteroscedastic) counting noise;
- hyperparameter refits with scikit-learn (L-BFGS on the log marginal likelihood, on at
  most ``max_fit_points`` points), and cheap conditioning on new data with fixed
  hyperparameters: one new Cholesky row and a rank-1 update of the grid posterior per
  point, so a decision costs O(N^2 + N G + G^2) instead of O(N^3 + N^2 G).

:class:`XMCDGP` models s = mu+ + mu- and d = mu+ - mu- with two independent WarpedGPs
(their noises are independent when both helicities are counted alike) and turns the
posterior into Gaussian (p, q, r) and delta-method moments.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import cholesky, solve_triangular
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Matern

from ..errors import SmartbeamInputError
from .sumrules import SumRuleFunctionals, locate_edges, moments_with_uncertainty

__all__ = ["WarpedGP", "XMCDGP"]

_JITTER = 1e-9


def _matern52(u1: np.ndarray, u2: np.ndarray, length: float) -> np.ndarray:
    r = np.abs(u1[:, None] - u2[None, :]) * (np.sqrt(5.0) / length)
    return (1.0 + r + r * r / 3.0) * np.exp(-r)


@dataclass
class WarpedGP:
    """1-D GP regression with input warping around ``centres`` and known noise.

    Parameters
    ----------
    centres
        Where to stretch the input space (e.g. absorption edges, eV). Empty: stationary.
    warp_width
        Width (eV) of the stretched regions.
    warp_grid
        Candidate warp strengths ``a`` compared by marginal likelihood at each refit.
    length_bounds
        Bounds of the length scale in warped units.
    max_fit_points
        Hyperparameters are fitted on at most this many points (an energy-sorted, evenly
        strided subset): a refit then costs O(max_fit_points^3) per likelihood evaluation
        however long the scan; the posterior always uses every point.

    Notes
    -----
    With fixed hyperparameters new points are added by :meth:`append`, which grows the
    Cholesky factor by one row (O(N^2)) and, when a prediction ``grid`` is set, updates
    the posterior on that grid by a rank-1 downdate (O(N G + G^2)): a decision stays
    bounded in time as N grows, instead of the O(N^3 + N^2 G) of refactorising.
    """

    centres: tuple[float, ...] = ()
    warp_width: float = 1.5
    warp_grid: tuple[float, ...] = (0.0, 3.0, 8.0)
    length_bounds: tuple[float, float] = (0.3, 60.0)
    max_fit_points: int = 300
    # fitted state
    warp: float = 0.0
    length: float = 5.0
    amplitude: float = 1.0
    y_mean: float = 0.0
    y_scale: float = 1.0
    log_marginal_likelihood: float = float("nan")
    grid: np.ndarray | None = field(default=None, repr=False)
    _n: int = field(default=0, repr=False)
    _x: np.ndarray = field(default=None, repr=False)
    _y: np.ndarray = field(default=None, repr=False)
    _nv: np.ndarray = field(default=None, repr=False)
    _u: np.ndarray = field(default=None, repr=False)
    _L: np.ndarray = field(default=None, repr=False)  # capacity buffer, factor in [:n, :n]
    _beta: np.ndarray = field(default=None, repr=False)  # L^-1 y (normalised)
    _V: np.ndarray = field(default=None, repr=False)  # buffer, L^-1 K(X, grid) in [:n]
    _ug: np.ndarray = field(default=None, repr=False)
    _kgg: np.ndarray = field(default=None, repr=False)
    _cov: np.ndarray = field(default=None, repr=False)  # posterior cov on grid (normalised)

    def warp_inputs(self, x: np.ndarray, warp: float | None = None) -> np.ndarray:
        """Map energies to the warped coordinate ``u``."""
        a = self.warp if warp is None else warp
        x = np.asarray(x, dtype=float)
        u = x.copy()
        if a and self.centres:
            w = self.warp_width
            for c in self.centres:
                u += a * w * np.arctan((x - c) / w)
        return u

    @property
    def hyperparameters(self) -> dict[str, float]:
        """Current hyperparameters (JSON-friendly)."""
        return {"warp": float(self.warp), "length": float(self.length),
                "amplitude": float(self.amplitude * self.y_scale**2),
                "lml": float(self.log_marginal_likelihood)}

    @property
    def n_points(self) -> int:
        """Number of points the posterior is conditioned on."""
        return self._n

    @property
    def x(self) -> np.ndarray:
        """Inputs the posterior is conditioned on."""
        return self._x[: self._n] if self._x is not None else np.empty(0)

    def copy_hyperparameters(self) -> WarpedGP:
        """A fresh, unconditioned model with this one's settings and hyperparameters."""
        return WarpedGP(centres=tuple(self.centres), warp_width=self.warp_width,
                        warp_grid=tuple(self.warp_grid), length_bounds=self.length_bounds,
                        max_fit_points=self.max_fit_points, warp=self.warp,
                        length=self.length, amplitude=self.amplitude, y_mean=self.y_mean,
                        y_scale=self.y_scale,
                        log_marginal_likelihood=self.log_marginal_likelihood,
                        grid=self.grid)

    def refit(self, x: np.ndarray, y: np.ndarray, noise_var: np.ndarray) -> WarpedGP:
        """Fit hyperparameters (warp strength, length, amplitude) and condition on data."""
        x, y, nv = self._check(x, y, noise_var)
        self.y_mean = float(np.mean(y))
        self.y_scale = float(np.std(y)) or 1.0
        yn = (y - self.y_mean) / self.y_scale
        alpha = nv / self.y_scale**2 + _JITTER
        fx, fy, fa = x, yn, alpha
        if x.size > self.max_fit_points:
            order = np.argsort(x, kind="stable")
            sub = order[np.round(np.linspace(0, x.size - 1, self.max_fit_points)).astype(int)]
            fx, fy, fa = x[sub], yn[sub], alpha[sub]
        best = None
        grid = self.warp_grid if self.centres else (0.0,)
        for a in grid:
            kernel = ConstantKernel(self.amplitude, (1e-3, 1e3)) * Matern(
                length_scale=float(np.clip(self.length, *self.length_bounds)),
                length_scale_bounds=self.length_bounds, nu=2.5)
            gpr = GaussianProcessRegressor(kernel, alpha=fa, normalize_y=False,
                                           n_restarts_optimizer=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                gpr.fit(self.warp_inputs(fx, a)[:, None], fy)
            lml = gpr.log_marginal_likelihood_value_
            if best is None or lml > best[0]:
                best = (lml, a, gpr.kernel_)
        lml, a, k = best
        self.warp = float(a)
        self.amplitude = float(k.k1.constant_value)
        self.length = float(k.k2.length_scale)
        self.log_marginal_likelihood = float(lml)
        return self.condition(x, y, noise_var, _checked=True)

    def condition(self, x: np.ndarray, y: np.ndarray, noise_var: np.ndarray,
                  _checked: bool = False) -> WarpedGP:
        """Condition on data with the current hyperparameters (no refit)."""
        if not _checked:
            x, y, noise_var = self._check(x, y, noise_var)
        n = x.size
        self._n = n
        self._x, self._y, self._nv = x.copy(), y.copy(), noise_var.copy()
        self._u = self.warp_inputs(x)
        k = self.amplitude * _matern52(self._u, self._u, self.length)
        k[np.diag_indices_from(k)] += noise_var / self.y_scale**2 + _JITTER
        cap = n + max(32, n // 2)
        self._L = np.zeros((cap, cap))
        self._L[:n, :n] = cholesky(k, lower=True, check_finite=False)
        yn = (y - self.y_mean) / self.y_scale
        self._beta = solve_triangular(self._L[:n, :n], yn, lower=True, check_finite=False)
        self._grid_cache(cap)
        return self

    def _grid_cache(self, cap: int) -> None:
        if self.grid is None:
            self._V = self._cov = None
            return
        n = self._n
        self._ug = self.warp_inputs(self.grid)
        self._kgg = self.amplitude * _matern52(self._ug, self._ug, self.length)
        self._V = np.zeros((cap, self.grid.size))
        kxg = self.amplitude * _matern52(self._u, self._ug, self.length)
        self._V[:n] = solve_triangular(self._L[:n, :n], kxg, lower=True, check_finite=False)
        self._cov = self._kgg - self._V[:n].T @ self._V[:n]

    def append(self, x: np.ndarray, y: np.ndarray, noise_var: np.ndarray) -> WarpedGP:
        """Add points with the current hyperparameters: O(N^2 + N G + G^2) per point."""
        if self._L is None:
            raise RuntimeError("WarpedGP.append() before refit()/condition()")
        x, y, nv = self._check(x, y, noise_var, min_size=1)
        for xi, yi, vi in zip(x, y, nv, strict=True):
            self._append_one(float(xi), float(yi), float(vi))
        return self

    def _append_one(self, xi: float, yi: float, vi: float) -> None:
        n = self._n
        if n + 1 > self._L.shape[0]:
            self._grow(n + 1 + max(32, n // 2))
        ui = self.warp_inputs(np.array([xi]))
        kx = self.amplitude * _matern52(self._u[:n], ui, self.length)[:, 0]
        knn = self.amplitude + vi / self.y_scale**2 + _JITTER
        L = self._L
        l_row = solve_triangular(L[:n, :n], kx, lower=True, check_finite=False)
        d2 = knn - l_row @ l_row
        if not d2 > 1e-12 * knn:  # numerically a duplicate: refactorise from scratch
            self.condition(np.append(self._x[:n], xi), np.append(self._y[:n], yi),
                           np.append(self._nv[:n], vi), _checked=True)
            return
        lnn = np.sqrt(d2)
        L[n, :n] = l_row
        L[n, n] = lnn
        yn = (yi - self.y_mean) / self.y_scale
        self._beta = np.append(self._beta, (yn - l_row @ self._beta) / lnn)
        self._x = np.append(self._x[:n], xi)
        self._y = np.append(self._y[:n], yi)
        self._nv = np.append(self._nv[:n], vi)
        self._u = np.append(self._u[:n], ui)
        if self._V is not None:
            kg = self.amplitude * _matern52(ui, self._ug, self.length)[0]
            v_row = (kg - l_row @ self._V[:n]) / lnn
            self._V[n] = v_row
            self._cov -= np.outer(v_row, v_row)
        self._n = n + 1

    def _grow(self, cap: int) -> None:
        n = self._n
        L = np.zeros((cap, cap))
        L[:n, :n] = self._L[:n, :n]
        self._L = L
        if self._V is not None:
            V = np.zeros((cap, self._V.shape[1]))
            V[:n] = self._V[:n]
            self._V = V

    @staticmethod
    def _check(x, y, noise_var, min_size: int = 2):
        x = np.asarray(x, dtype=float).ravel()
        y = np.asarray(y, dtype=float).ravel()
        nv = np.broadcast_to(np.asarray(noise_var, dtype=float), x.shape).copy()
        if x.size < min_size or y.shape != x.shape:
            raise SmartbeamInputError(f"{x.size} inputs and {y.size} outputs: expected "
                                      f"equal sizes of at least {min_size}")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(nv >= 0)):
            raise SmartbeamInputError("GP data contain NaN/inf or negative noise: expected "
                                      "finite values and non-negative noise variances")
        return x, y, nv

    def posterior(self, xg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Posterior at ``xg``: mean, prior covariance factor pieces.

        Returns
        -------
        mean, k_gg, v
            Posterior mean; prior covariance on ``xg``; ``v = L^-1 K(X, xg)`` so that the
            posterior covariance is ``k_gg - v.T @ v`` (all in data units).
        """
        if self._L is None:
            raise RuntimeError("WarpedGP.posterior() before refit()/condition()")
        n = self._n
        ug = self.warp_inputs(xg)
        kxg = self.amplitude * _matern52(self._u[:n], ug, self.length)
        v = solve_triangular(self._L[:n, :n], kxg, lower=True, check_finite=False)
        mean = self.y_mean + self.y_scale * (v.T @ self._beta)
        kgg = (self.amplitude * self.y_scale**2) * _matern52(ug, ug, self.length)
        return mean, kgg, v * self.y_scale

    def grid_posterior(self) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and covariance on :attr:`grid` (data units), from the cache."""
        if self._cov is None:
            raise RuntimeError("WarpedGP.grid_posterior() needs a grid and a conditioned "
                               "model")
        n = self._n
        mean = self.y_mean + self.y_scale * (self._V[:n].T @ self._beta)
        return mean, self._cov * self.y_scale**2

    def predict(self, xg: np.ndarray, return_std: bool = True):
        """Posterior mean (and standard deviation) at ``xg``."""
        mean, kgg, v = self.posterior(np.asarray(xg, dtype=float))
        if not return_std:
            return mean
        var = np.diag(kgg) - np.einsum("ij,ij->j", v, v)
        return mean, np.sqrt(np.maximum(var, 0.0))


class XMCDGP:
    """GP model of an XMCD pair of spectra and the posterior of the sum-rule moments.

    A fit/predict-style estimator: no I/O, no bluesky.

    Parameters
    ----------
    e_min, e_max
        Scan window (eV).
    n_h
        Number of 3d holes.
    edges
        Tabulated (L3, L2) white-line energies used as a search hint; the edges used by
        the sum rules and the warping are located in the posterior mean at each refit.
    n_grid
        Points of the grid on which the functionals are evaluated.
    warp
        Use input warping around the located edges (False: stationary GP).
    step_width
        Step-background width used by the sum rules.
    warp_grid
        Candidate warp strengths of both GPs (see :class:`WarpedGP`). The default reaches
        a 49x stretch at the edges: with the 8x cap of the generic default the fits of
        Fe/Co spectra sat at the cap and under-resolved the white lines below ~30 points
        (bench ``adaptive``: posterior sd of m_orb at 32 points 4.2 -> 3.3 %).
    """

    #: Default warp strengths of :class:`XMCDGP` (wider than :class:`WarpedGP`'s).
    WARP_GRID: tuple[float, ...] = (0.0, 3.0, 8.0, 16.0, 32.0)

    def __init__(self, e_min: float, e_max: float, n_h: float, *,
                 edges: tuple[float, float] | None = None, n_grid: int = 201,
                 warp: bool = True, step_width: float = 0.6,
                 warp_grid: tuple[float, ...] | None = None) -> None:
        if not e_min < e_max:
            raise SmartbeamInputError(f"e_min={e_min!r}, e_max={e_max!r}: expected e_min < e_max")
        if not n_h > 0:
            raise SmartbeamInputError(f"n_h={n_h!r}: expected a positive number of 3d holes")
        self.e_min, self.e_max, self.n_h = float(e_min), float(e_max), float(n_h)
        self.edge_hint = tuple(float(e) for e in edges) if edges is not None else None
        self.grid = np.linspace(e_min, e_max, n_grid)
        self.use_warp = warp
        self.step_width = step_width
        wg = tuple(self.WARP_GRID if warp_grid is None else warp_grid)
        if not wg or not all(np.isfinite(a) and a >= 0 for a in wg):
            raise SmartbeamInputError(f"warp_grid={warp_grid!r}: expected non-negative "
                                      "finite warp strengths")
        self.gp_s = WarpedGP(grid=self.grid, warp_grid=wg)
        self.gp_d = WarpedGP(grid=self.grid, warp_grid=wg)
        self.edges: tuple[float, float] | None = None
        self.functionals: SumRuleFunctionals | None = None
        self._post: dict | None = None
        self.noise_per_signal = 1e-6

    def spawn(self) -> XMCDGP:
        """An unconditioned copy with the same settings, hyperparameters and edges.

        A background refit works on such a copy (warm-started from the current
        hyperparameters) so the live model is never touched by two threads.
        """
        new = XMCDGP.__new__(XMCDGP)
        new.__dict__.update({k: v for k, v in self.__dict__.items()
                             if k not in ("gp_s", "gp_d", "_post")})
        new.gp_s = self.gp_s.copy_hyperparameters()
        new.gp_d = self.gp_d.copy_hyperparameters()
        new._post = None
        return new

    @property
    def n_points(self) -> int:
        """Number of measured energies the posterior is conditioned on."""
        return self.gp_s.n_points

    # -- fitting -------------------------------------------------------------------
    def fit(self, energy, mu_plus, mu_minus, var_plus, var_minus, *, refit: bool = True) -> XMCDGP:
        """Condition on measured points (refitting hyperparameters if ``refit``).

        Parameters
        ----------
        energy
            Energies of the measured points (eV); repeats are allowed.
        mu_plus, mu_minus
            Normalised absorption for each helicity.
        var_plus, var_minus
            Their counting-noise variances.
        refit
            Refit hyperparameters and relocate the edges (else keep them: fast path). On
            the fast path, data that extend the points already conditioned on (same
            first N energies, in order) are appended incrementally.
        """
        e = np.asarray(energy, dtype=float)
        mp, mm = np.asarray(mu_plus, float), np.asarray(mu_minus, float)
        nv = np.asarray(var_plus, float) + np.asarray(var_minus, float)
        s, d = mp + mm, mp - mm
        pos = s > 0
        self.noise_per_signal = float(np.median(nv[pos] / s[pos])) if pos.any() else 1e-6
        if refit or self.functionals is None:
            if self.use_warp and self.edges is None:
                # First fit: locate the edges with a stationary model, then warp there.
                self.gp_s.refit(e, s, nv)
                self._locate_edges()
            if self.use_warp:
                self.gp_s.centres = self.gp_d.centres = self.edges
            self.gp_s.refit(e, s, nv)
            self.gp_d.refit(e, d, nv)
            self._locate_edges()
            if self.use_warp:
                # Re-centre the warp on the new edges; keep the fitted strengths.
                self.gp_s.centres = self.gp_d.centres = self.edges
                self.gp_s.condition(e, s, nv)
                self.gp_d.condition(e, d, nv)
        else:
            n_old = self.gp_s.n_points
            if 0 < n_old <= e.size and self.gp_s._L is not None and np.array_equal(
                    self.gp_s.x, e[:n_old]):
                if e.size > n_old:
                    self.gp_s.append(e[n_old:], s[n_old:], nv[n_old:])
                    self.gp_d.append(e[n_old:], d[n_old:], nv[n_old:])
            else:
                self.gp_s.condition(e, s, nv)
                self.gp_d.condition(e, d, nv)
        self._posterior()
        return self

    def _locate_edges(self) -> None:
        mean_s = self.gp_s.predict(self.grid, return_std=False)
        try:
            edges = locate_edges(self.grid, mean_s, hint=self.edge_hint)
        except SmartbeamInputError:
            edges = self.edges or self.edge_hint
            if edges is None:
                span = self.e_max - self.e_min
                edges = (self.e_min + 0.35 * span, self.e_min + 0.65 * span)
        lo, hi = self.grid[1], self.grid[-2]
        e3 = float(np.clip(edges[0], lo, hi - 1.0))
        e2 = float(np.clip(edges[1], e3 + 0.5, hi))
        self.edges = (e3, e2)
        self.functionals = SumRuleFunctionals.from_grid(self.grid, e3, e2,
                                                        step_width=self.step_width)

    def _posterior(self) -> None:
        f = self.functionals
        w_d = np.stack([f.w_p, f.w_q])  # (2, G)
        m_s, cov_s = self.gp_s.grid_posterior()
        m_d, cov_d = self.gp_d.grid_posterior()
        c_d = cov_d @ w_d.T  # (G, 2): Sigma_d w
        c_r = cov_s @ f.w_r  # (G,)
        var_s = np.maximum(np.diag(cov_s), 0.0)
        var_d = np.maximum(np.diag(cov_d), 0.0)
        self._post = dict(m_s=m_s, m_d=m_d, var_s=var_s, var_d=var_d, c_d=c_d, c_r=c_r,
                          cov_pq=w_d @ c_d, var_r=float(f.w_r @ c_r),
                          pq=w_d @ m_d, r=float(f.w_r @ m_s), cov_s=cov_s, cov_d=cov_d)

    # -- results -------------------------------------------------------------------
    def moments(self) -> dict[str, float]:
        """Posterior mean and sd of m_orb, m_spin (delta method), with p, q, r, edges."""
        post = self._require()
        out = moments_with_uncertainty(post["pq"], post["cov_pq"], post["r"], post["var_r"],
                                       self.n_h)
        out.update(p=float(post["pq"][0]), q=float(post["pq"][1]), r=post["r"],
                   e_l3=self.edges[0], e_l2=self.edges[1])
        return out

    def predict(self, energy: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Posterior mean and sd of mu+, mu- and the XMCD (mu+ - mu-) on ``energy``."""
        self._require()
        e = self.grid if energy is None else np.asarray(energy, dtype=float)
        ms, ss = self.gp_s.predict(e)
        md, sd = self.gp_d.predict(e)
        spm = 0.5 * np.sqrt(ss**2 + sd**2)
        return {"energy": e, "mu_plus": 0.5 * (ms + md), "mu_minus": 0.5 * (ms - md),
                "mu_sd": spm, "xmcd": md, "xmcd_sd": sd}

    def hyperparameters(self) -> dict[str, float]:
        """Hyperparameters of both GPs, flattened (``s_length``, ``d_warp`` ...)."""
        out = {f"s_{k}": v for k, v in self.gp_s.hyperparameters.items()}
        out.update({f"d_{k}": v for k, v in self.gp_d.hyperparameters.items()})
        return out

    def _require(self) -> dict:
        if self._post is None:
            raise RuntimeError("XMCDGP used before fit()")
        return self._post

    # -- acquisition ---------------------------------------------------------------
    def variance_reduction(self, target: str = "m_orb") -> np.ndarray:
        """Expected reduction of the target's posterior variance for one more point
        (both helicities) at each grid energy, with the predicted counting noise.

        ``target``: ``"m_orb"``, ``"m_spin"``, ``"moments"`` (sum of both, each relative to
        its current variance) or ``"spectrum"`` (integrated variance of s and d).
        """
        post = self._require()
        noise = self.noise_per_signal * np.maximum(post["m_s"], 1e-12)
        den_d = post["var_d"] + noise
        den_s = post["var_s"] + noise
        m = self.moments()
        r, q, p = post["r"], m["q"], m["p"]
        a = 4.0 * self.n_h / 3.0
        dr = post["c_r"] ** 2 / den_s
        if target in ("m_orb", "moments"):
            dq = post["c_d"][:, 1] ** 2 / den_d
            red_orb = a**2 * (dq / r**2 + q**2 * dr / r**4)
            if target == "m_orb":
                return red_orb
        if target in ("m_spin", "moments"):
            cu = 6 * post["c_d"][:, 0] - 4 * post["c_d"][:, 1]
            u = 6 * p - 4 * q
            red_spin = self.n_h**2 * (cu**2 / den_d / r**2 + u**2 * dr / r**4)
            if target == "m_spin":
                return red_spin
            return (red_orb / max(m["m_orb_sd"] ** 2, 1e-300)
                    + red_spin / max(m["m_spin_sd"] ** 2, 1e-300))
        if target == "spectrum":
            out = np.zeros(self.grid.size)
            for cov, den in ((post["cov_s"], den_s), (post["cov_d"], den_d)):
                out += np.einsum("ij,ij->j", cov, cov) / den
            return out
        raise SmartbeamInputError(f"target={target!r}: expected 'm_orb', 'm_spin', "
                                  "'moments' or 'spectrum'")

    def predictive_variance(self) -> np.ndarray:
        """Posterior variance of mu+ (= of mu-) on the grid: the max-variance baseline."""
        post = self._require()
        return 0.25 * (post["var_s"] + post["var_d"])
