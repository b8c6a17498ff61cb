"""Sum rules on analytic spectra whose p, q, r are known in closed form."""

import numpy as np
import pytest

from smartbeam.analysis.sumrules import (
    SumRuleFunctionals,
    locate_edges,
    moments_from_pqr,
    moments_with_uncertainty,
    step_shape,
    sum_rules,
    trapezoid_weights,
)
from smartbeam.errors import SmartbeamInputError

E3, E2 = 707.8, 720.8


def gauss(e, c, area, sigma=0.7):
    return area * np.exp(-0.5 * ((e - c) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))


def analytic(e, a3=6.0, a2=3.0, d3=-2.0, d2=1.66, pre=0.3, jump=1.0):
    """mu+/- = pre + jump*step + Gaussian white lines (areas a +- d/2): p=d3, q=d3+d2,
    r=2(a3+a2) exactly (up to the trapezoid rule)."""
    base = pre + jump * step_shape(e, E3, E2)
    mp = base + gauss(e, E3, a3 + d3 / 2) + gauss(e, E2, a2 + d2 / 2)
    mm = base + gauss(e, E3, a3 - d3 / 2) + gauss(e, E2, a2 - d2 / 2)
    return mp, mm


def test_trapezoid_weights_integrate_linear_exactly():
    e = np.sort(np.random.default_rng(0).uniform(0, 10, 40))
    e = np.concatenate([[0.0], e, [10.0]])
    w = trapezoid_weights(e, 2.5, 7.25)
    assert w @ (3 * e + 1) == pytest.approx((1.5 * 7.25**2 + 7.25) - (1.5 * 2.5**2 + 2.5))
    assert trapezoid_weights(e, e[0], e[-1]).sum() == pytest.approx(10.0)


@pytest.mark.parametrize("n", [201, 401])
def test_pqr_and_moments_match_closed_form(n):
    e = np.linspace(690, 740, n)
    mp, mm = analytic(e)
    res = sum_rules(e, mp, mm, n_h=3.39, edges=(E3, E2))
    assert res.p == pytest.approx(-2.0, rel=2e-3)
    assert res.q == pytest.approx(-0.34, rel=1e-2)
    assert res.r == pytest.approx(18.0, rel=2e-3)
    exact = moments_from_pqr(-2.0, -0.34, 18.0, 3.39)
    assert res.m_orb == pytest.approx(exact["m_orb"], rel=1e-2)
    assert res.m_spin == pytest.approx(exact["m_spin"], rel=3e-3)
    assert res.ratio == pytest.approx(res.m_orb / res.m_spin)


def test_closed_form_values_and_signs():
    m = moments_from_pqr(p=-2.0, q=-0.34, r=18.0, n_h=3.39)
    assert m["m_orb"] == pytest.approx(4 * 0.34 * 3.39 / (3 * 18.0))
    assert m["m_spin"] == pytest.approx((12.0 - 1.36) * 3.39 / 18.0)
    assert m["m_orb"] > 0 and m["m_spin"] > 0


def test_step_background_is_removed():
    """Changing the pre-edge level and the jump must not change r."""
    e = np.linspace(690, 740, 301)
    r1 = sum_rules(e, *analytic(e), n_h=3.0, edges=(E3, E2)).r
    r2 = sum_rules(e, *analytic(e, pre=2.0, jump=3.0), n_h=3.0, edges=(E3, E2)).r
    assert r2 == pytest.approx(r1, rel=1e-3)


def test_functionals_are_linear_and_match_sum_rules():
    e = np.linspace(690, 740, 151)
    mp, mm = analytic(e)
    f = SumRuleFunctionals.from_grid(e, E3, E2)
    p, q, r = f.pqr(mp - mm, mp + mm)
    res = sum_rules(e, mp, mm, n_h=2.0, edges=(E3, E2))
    assert (p, q, r) == pytest.approx((res.p, res.q, res.r))
    mp2, mm2 = analytic(e, d3=-1.0, d2=0.5)
    combo = f.pqr(0.3 * (mp - mm) + 0.7 * (mp2 - mm2), 0.3 * (mp + mm) + 0.7 * (mp2 + mm2))
    assert combo == pytest.approx(0.3 * f.pqr(mp - mm, mp + mm) + 0.7 * f.pqr(mp2 - mm2, mp2 + mm2))


def test_locate_edges_finds_shifted_white_lines():
    e = np.linspace(690, 740, 251)
    shift = 1.7
    base = step_shape(e, E3 + shift, E2 + shift)
    s = base + gauss(e, E3 + shift, 12) + gauss(e, E2 + shift, 6)
    e3, e2 = locate_edges(e, s, hint=(E3, E2))
    assert e3 == pytest.approx(E3 + shift, abs=0.1)
    assert e2 == pytest.approx(E2 + shift, abs=0.1)
    assert locate_edges(e, s) == pytest.approx((e3, e2))


def test_delta_method_matches_monte_carlo():
    rng = np.random.default_rng(3)
    mean_pq = np.array([-2.0, -0.34])
    cov = np.array([[4e-4, 1e-4], [1e-4, 2e-4]])
    r, var_r = 18.0, 0.01
    out = moments_with_uncertainty(mean_pq, cov, r, var_r, n_h=3.39)
    pq = rng.multivariate_normal(mean_pq, cov, 200_000)
    rs = rng.normal(r, np.sqrt(var_r), 200_000)
    m_orb = -4 * pq[:, 1] * 3.39 / (3 * rs)
    m_spin = -(6 * pq[:, 0] - 4 * pq[:, 1]) * 3.39 / rs
    assert out["m_orb_sd"] == pytest.approx(m_orb.std(), rel=0.02)
    assert out["m_spin_sd"] == pytest.approx(m_spin.std(), rel=0.02)


@pytest.mark.parametrize("bad, match", [
    (dict(n_h=0.0), "n_h"),
    (dict(edges=(730.0, 710.0)), "edges"),
    (dict(nan=True), "NaN"),
])
def test_bad_input(bad, match):
    e = np.linspace(690, 740, 101)
    mp, mm = analytic(e)
    if bad.pop("nan", False):
        mp[5] = np.nan
    kwargs = dict(n_h=3.0)
    kwargs.update(bad)
    with pytest.raises(SmartbeamInputError, match=match):
        sum_rules(e, mp, mm, **kwargs)


def test_unsorted_grid_rejected():
    with pytest.raises(SmartbeamInputError, match="increasing"):
        trapezoid_weights(np.array([1.0, 3.0, 2.0]), 0, 3)


def test_locate_edges_without_hint_ignores_a_taller_l2_when_l3_was_missed():
    """A sparse design that straddles the narrow L3 peak sees L2 as the global maximum;
    L3 must still be the first white line above the absorption onset."""
    e = np.linspace(690, 740, 251)
    s = step_shape(e, E3, E2) + gauss(e, E3, 4) + gauss(e, E2, 6)  # L2 taller here
    e3, e2 = locate_edges(e, s)
    assert e3 == pytest.approx(E3, abs=0.1)
    assert e2 == pytest.approx(E2, abs=0.1)
