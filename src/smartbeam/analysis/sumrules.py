"""XMCD sum rules (Thole, Carra; Chen et al. 1995 p, q, r form) with step removal.

With mu+ and mu- the absorption for the two helicities, s = mu+ + mu- and
d = mu+ - mu-::

    p = int_L3 d,   q = int_{L3+L2} d,   r = int_{L3+L2} (s - step background)
    m_orb  = -4 q n_h / (3 r)
    m_spin = -(6 p - 4 q) n_h / r          (T_z neglected)

The step background is ``a + c * (2/3 S(E - E_L3) + 1/3 S(E - E_L2))`` with arctan steps
S, and (a, c) fitted by least squares to s over the first and last few eV. Given the
edge positions, p, q and r are therefore *linear* functionals of the sampled spectra:
:class:`SumRuleFunctionals` holds their weight vectors, so a Gaussian posterior over
the spectra gives a Gaussian posterior over (p, q, r).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SmartbeamInputError

__all__ = [
    "SumRuleFunctionals",
    "SumRuleResult",
    "locate_edges",
    "moments_from_pqr",
    "moments_with_uncertainty",
    "step_shape",
    "sum_rules",
    "trapezoid_weights",
]

#: Default width (eV, arctan half width) of the step background used by the analysis.
STEP_WIDTH = 0.6
#: Width (eV) of the pre-edge and post-edge windows averaged for the step levels.
LEVEL_WINDOW = 3.0


def _check_grid(energy: np.ndarray) -> np.ndarray:
    e = np.asarray(energy, dtype=float)
    if e.ndim != 1 or e.size < 3:
        raise SmartbeamInputError(f"energy grid of shape {e.shape}: expected a 1-D grid "
                                  "of at least 3 points")
    if not np.all(np.diff(e) > 0):
        raise SmartbeamInputError("energy grid is not strictly increasing: expected sorted, "
                                  "distinct energies")
    return e


def trapezoid_weights(energy: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Weights ``w`` with ``w @ y`` = integral over [lo, hi] of the linear interpolant of y.

    Parameters
    ----------
    energy
        Sorted grid.
    lo, hi
        Integration limits (clipped to the grid).
    """
    e = _check_grid(energy)
    w = np.zeros_like(e)
    a = np.clip(np.maximum(e[:-1], lo), e[:-1], e[1:])
    b = np.clip(np.minimum(e[1:], hi), e[:-1], e[1:])
    length = np.where(b > a, b - a, 0.0)
    h = e[1:] - e[:-1]
    # Linear interpolant on a segment: weight of the left/right node at the mid-point.
    mid = 0.5 * (a + b)
    frac_right = (mid - e[:-1]) / h
    np.add.at(w, np.arange(e.size - 1), length * (1 - frac_right))
    np.add.at(w, np.arange(1, e.size), length * frac_right)
    return w


def step_shape(energy: np.ndarray, e_l3: float, e_l2: float,
               width: float = STEP_WIDTH) -> np.ndarray:
    """The 2:1 double arctan step (0 before the edges, 1 after), statistical branching."""
    e = np.asarray(energy, dtype=float)
    s3 = 0.5 + np.arctan((e - e_l3) / width) / np.pi
    s2 = 0.5 + np.arctan((e - e_l2) / width) / np.pi
    return (2.0 / 3.0) * s3 + (1.0 / 3.0) * s2


@dataclass(frozen=True)
class SumRuleFunctionals:
    """Weight vectors of p, q (acting on d = mu+ - mu-) and r (acting on s = mu+ + mu-).

    ``p = w_p @ d``, ``q = w_q @ d``, ``r = w_r @ s`` on the grid ``energy``.
    """

    energy: np.ndarray
    w_p: np.ndarray
    w_q: np.ndarray
    w_r: np.ndarray
    e_l3: float
    e_l2: float

    @classmethod
    def from_grid(cls, energy: np.ndarray, e_l3: float, e_l2: float, *,
                  step_width: float = STEP_WIDTH, split: float | None = None,
                  level_window: float = LEVEL_WINDOW) -> SumRuleFunctionals:
        """Build the functionals on a grid for given edge (step) positions.

        Parameters
        ----------
        energy
            Sorted energy grid spanning pre-edge to post-edge.
        e_l3, e_l2
            Step positions (the white-line maxima).
        step_width
            Arctan half width of the steps (eV).
        split
            Energy separating the L3 and L2 integrals (default: mid-point of the edges).
        level_window
            Width (eV) of the pre- and post-edge regions that set the step levels.
        """
        e = _check_grid(energy)
        if not (e[0] < e_l3 < e_l2 < e[-1]):
            raise SmartbeamInputError(
                f"edges (L3={e_l3!r}, L2={e_l2!r}): expected e_min < L3 < L2 < e_max on "
                f"the grid [{e[0]}, {e[-1]}]")
        split = 0.5 * (e_l3 + e_l2) if split is None else float(split)
        t_all = trapezoid_weights(e, e[0], e[-1])
        w_p = trapezoid_weights(e, e[0], split)
        w_q = t_all
        pre = trapezoid_weights(e, e[0], e[0] + level_window)
        post = trapezoid_weights(e, e[-1] - level_window, e[-1])
        h = step_shape(e, e_l3, e_l2, step_width)
        # Background b = a + c h with (a, c) least squares on the pre/post windows: the
        # arctan tails reach into the windows, so a plain mean of each would be biased.
        wts = pre / pre.sum() + post / post.sum()
        design = np.stack([np.ones_like(h), h])  # (2, G)
        normal = (design * wts) @ design.T
        coef_ops = np.linalg.solve(normal, design * wts)  # rows: a = row0 @ s, c = row1 @ s
        # r = t.(s - b) = t.s - a sum(t) - c t.h  -> linear in s.
        w_r = t_all - coef_ops[0] * t_all.sum() - coef_ops[1] * (t_all @ h)
        return cls(e, w_p, w_q, w_r, float(e_l3), float(e_l2))

    def pqr(self, d: np.ndarray, s: np.ndarray) -> np.ndarray:
        """(p, q, r) for difference ``d`` and sum ``s`` sampled on the grid."""
        return np.array([self.w_p @ d, self.w_q @ d, self.w_r @ s])


def moments_from_pqr(p: float, q: float, r: float, n_h: float) -> dict[str, float]:
    """m_orb, m_spin (in mu_B, T_z neglected) and m_orb/m_spin from p, q, r."""
    if not np.isfinite(r) or r == 0:
        raise SmartbeamInputError(f"r={r!r}: expected a finite, non-zero white-line area")
    m_orb = -4.0 * q * n_h / (3.0 * r)
    m_spin = -(6.0 * p - 4.0 * q) * n_h / r
    ratio = m_orb / m_spin if m_spin != 0 else float("nan")
    return {"m_orb": float(m_orb), "m_spin": float(m_spin), "ratio": float(ratio)}


def moments_with_uncertainty(mean_pq: np.ndarray, cov_pq: np.ndarray, r: float, var_r: float,
                             n_h: float) -> dict[str, float]:
    """Delta-method mean and sd of m_orb and m_spin.

    Parameters
    ----------
    mean_pq, cov_pq
        Posterior mean (2,) and covariance (2, 2) of (p, q) (from the difference model).
    r, var_r
        Posterior mean and variance of r (from the sum model, independent of p, q).
    n_h
        Number of 3d holes.
    """
    p, q = float(mean_pq[0]), float(mean_pq[1])
    out = moments_from_pqr(p, q, r, n_h)
    var_q = cov_pq[1, 1]
    var_u = 36 * cov_pq[0, 0] - 48 * cov_pq[0, 1] + 16 * cov_pq[1, 1]  # u = 6p - 4q
    u = 6 * p - 4 * q
    a = 4.0 * n_h / 3.0
    out["m_orb_sd"] = float(a * np.sqrt(max(var_q / r**2 + q**2 * var_r / r**4, 0.0)))
    out["m_spin_sd"] = float(n_h * np.sqrt(max(var_u / r**2 + u**2 * var_r / r**4, 0.0)))
    return out


def _parabolic_peak(e: np.ndarray, y: np.ndarray, i: int) -> float:
    if 0 < i < e.size - 1:
        x0, x1, x2 = e[i - 1:i + 2]
        y0, y1, y2 = y[i - 1:i + 2]
        denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
        a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
        b = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / denom
        if a < 0:
            return float(np.clip(-b / (2 * a), x0, x2))
    return float(e[i])


def _l3_after_onset(e: np.ndarray, y: np.ndarray, search: float) -> float:
    """L3 maximum = the largest value within ``search`` eV above the absorption onset.

    The onset is the first point where the spectrum crosses half-way from the pre-edge to
    the post-edge level. Taking the global maximum instead (as before) picks L2 whenever
    a sparse design misses the narrower L3 peak, and the whole sum-rule analysis then
    sits on the wrong edges with a tiny, wrong posterior sd.
    """
    pre = float(np.median(y[e <= e[0] + LEVEL_WINDOW]))
    post = float(np.median(y[e >= e[-1] - LEVEL_WINDOW]))
    above = np.flatnonzero(y >= pre + 0.5 * (post - pre)) if post > pre else np.array([], int)
    if above.size == 0:
        return _parabolic_peak(e, y, int(np.argmax(y)))
    onset = e[above[0]]
    idx = np.flatnonzero((e >= onset - 1.0) & (e <= onset + search))
    return _parabolic_peak(e, y, int(idx[np.argmax(y[idx])]))


def locate_edges(energy: np.ndarray, mu_sum: np.ndarray, hint: tuple[float, float] | None = None,
                 search: float = 5.0, min_gap: float = 6.0) -> tuple[float, float]:
    """White-line maxima (L3, L2) of the isotropic spectrum, parabola-refined.

    Parameters
    ----------
    energy, mu_sum
        Grid and mu+ + mu- (or any isotropic spectrum) on it.
    hint
        Tabulated (L3, L2): each maximum is searched within ``search`` eV of it.
        Without a hint L3 is the maximum within ``search`` eV above the absorption onset
        (half-way crossing from pre- to post-edge level) and L2 the maximum beyond
        L3 + min_gap.
    """
    e = _check_grid(energy)
    y = np.asarray(mu_sum, dtype=float)
    if y.shape != e.shape:
        raise SmartbeamInputError(f"spectrum of shape {y.shape}: expected {e.shape}")
    if hint is not None:
        out = []
        for h in hint:
            m = np.abs(e - h) <= search
            if not m.any():
                raise SmartbeamInputError(f"edge hint {h!r} eV: expected it within the grid "
                                          f"[{e[0]}, {e[-1]}]")
            idx = np.flatnonzero(m)
            out.append(_parabolic_peak(e, y, int(idx[np.argmax(y[idx])])))
        if out[1] - out[0] >= min_gap / 2:
            return out[0], out[1]
    e3 = _l3_after_onset(e, y, search)
    idx = np.flatnonzero(e > e3 + min_gap)
    if idx.size == 0:
        raise SmartbeamInputError(f"no L2 edge found beyond L3={e3:.2f} eV + {min_gap} eV: "
                                  "expected a window that covers both edges")
    e2 = _parabolic_peak(e, y, int(idx[np.argmax(y[idx])]))
    return e3, e2


@dataclass(frozen=True)
class SumRuleResult:
    """Outcome of :func:`sum_rules`."""

    p: float
    q: float
    r: float
    m_orb: float
    m_spin: float
    ratio: float
    e_l3: float
    e_l2: float


def sum_rules(energy: np.ndarray, mu_plus: np.ndarray, mu_minus: np.ndarray, n_h: float, *,
              edges: tuple[float, float] | None = None,
              edge_hint: tuple[float, float] | None = None,
              step_width: float = STEP_WIDTH) -> SumRuleResult:
    """Apply the sum rules to spectra sampled on a grid.

    Parameters
    ----------
    energy
        Sorted grid (eV) covering pre-edge, both edges and post-edge.
    mu_plus, mu_minus
        Absorption for the two helicities on the grid.
    n_h
        Number of 3d holes (> 0).
    edges
        Step positions (L3, L2); located from the data when omitted.
    edge_hint
        Tabulated edges guiding the search when ``edges`` is omitted.
    step_width
        Arctan half width of the steps.

    Returns
    -------
    SumRuleResult
    """
    e = _check_grid(energy)
    mp = np.asarray(mu_plus, dtype=float)
    mm = np.asarray(mu_minus, dtype=float)
    if mp.shape != e.shape or mm.shape != e.shape:
        raise SmartbeamInputError(f"spectra of shapes {mp.shape}, {mm.shape}: expected "
                                  f"{e.shape} like the energy grid")
    if not (np.all(np.isfinite(mp)) and np.all(np.isfinite(mm))):
        raise SmartbeamInputError("spectra contain NaN/inf: expected finite absorption values")
    if not n_h > 0:
        raise SmartbeamInputError(f"n_h={n_h!r}: expected a positive number of 3d holes")
    s, d = mp + mm, mp - mm
    if edges is None:
        edges = locate_edges(e, s, hint=edge_hint)
    f = SumRuleFunctionals.from_grid(e, *edges, step_width=step_width)
    p, q, r = f.pqr(d, s)
    m = moments_from_pqr(p, q, r, n_h)
    return SumRuleResult(float(p), float(q), float(r), m["m_orb"], m["m_spin"], m["ratio"],
                         f.e_l3, f.e_l2)
