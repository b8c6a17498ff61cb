"""GP model of XMCD spectra: posterior, shrinking uncertainty, acquisition, stopping."""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from sim_devices.physics.xmcd import XMCDSample, preset
from smartbeam.analysis.acquisition import AdaptiveXMCD, CostModel, StoppingRule
from smartbeam.analysis.gp import XMCDGP, WarpedGP
from smartbeam.errors import SmartbeamInputError

FE = preset("Fe")
SAMPLE = XMCDSample(FE)


def measure(e, rng, dwell=1.0):
    out = []
    for h in (1, -1):
        c = SAMPLE.measure(np.atleast_1d(e), h, dwell, rng)
        mu = c["tey"] / c["i0"]
        out += [mu, mu**2 * (1 / c["tey"] + 1 / c["i0"])]
    mp, vp, mm, vm = out
    return mp, mm, vp, vm


def test_warped_gp_interpolates_and_has_honest_sd():
    rng = np.random.default_rng(0)
    x = np.linspace(0, 10, 30)
    f = np.sin(x) + 0.5 * np.exp(-((x - 5) ** 2) / 0.1)
    y = f + rng.normal(0, 0.01, x.size)
    gp = WarpedGP(centres=(5.0,), warp_width=0.5).refit(x, y, np.full(x.size, 1e-4))
    xg = np.linspace(0, 10, 301)
    fg = np.sin(xg) + 0.5 * np.exp(-((xg - 5) ** 2) / 0.1)
    mean, sd = gp.predict(xg)
    z = (mean - fg) / sd
    assert np.median(np.abs(mean - fg)) < 0.02
    assert np.mean(np.abs(z) < 2) > 0.8
    assert gp.warp > 0  # a sharp feature at the centre: warping is preferred


def test_posterior_sd_of_m_orb_shrinks_with_points():
    rng = np.random.default_rng(1)
    sds = []
    with threadpool_limits(1):
        for n in (20, 40, 80):
            e = np.linspace(*FE.window, n)
            model = XMCDGP(*FE.window, FE.n_h, edges=(FE.e_l3, FE.e_l2))
            model.fit(e, *measure(e, rng))
            sds.append(model.moments()["m_orb_sd"])
    assert sds[0] > sds[1] > sds[2] > 0


def test_dense_noisy_fit_recovers_moments():
    rng = np.random.default_rng(2)
    e = np.linspace(*FE.window, 121)
    model = XMCDGP(*FE.window, FE.n_h, edges=(FE.e_l3, FE.e_l2)).fit(e, *measure(e, rng))
    m = model.moments()
    true = SAMPLE.true_moments()
    assert abs(m["m_orb"] - true["m_orb"]) < 4 * m["m_orb_sd"]
    assert m["m_spin"] == pytest.approx(true["m_spin"], rel=0.02)
    assert m["e_l3"] == pytest.approx(true["e_l3"], abs=0.2)
    pred = model.predict()
    assert np.max(np.abs(pred["mu_plus"] - SAMPLE.mu(pred["energy"], 1))) < 0.1


def test_acquisition_targets_the_edges():
    """The m_orb variance reduction is largest near the white lines, not in the pre-edge."""
    rng = np.random.default_rng(3)
    e = np.linspace(*FE.window, 16)
    model = XMCDGP(*FE.window, FE.n_h, edges=(FE.e_l3, FE.e_l2)).fit(e, *measure(e, rng))
    red = model.variance_reduction("m_orb")
    g = model.grid
    near = (np.abs(g - FE.e_l3) < 4) | (np.abs(g - FE.e_l2) < 4)
    assert red[near].max() > red[g < FE.e_l3 - 8].max()
    for target in ("m_spin", "moments", "spectrum"):
        assert np.all(np.isfinite(model.variance_reduction(target)))
    with pytest.raises(SmartbeamInputError, match="target"):
        model.variance_reduction("m_total")


def test_cost_model_penalises_travel():
    c = CostModel(dwell=1.0, mono_speed=2.0)
    assert c(np.array([700.0, 710.0]), 700.0)[1] - c(np.array([700.0]), 700.0)[0] == pytest.approx(5.0)


def run_loop(scanner, rng, max_iter=200):
    for e in scanner.initial_design():
        mp, mm, vp, vm = measure(e, rng)
        scanner.tell(e, mp[0], mm[0], vp[0], vm[0])
    cur = None
    for _ in range(max_iter):
        d = scanner.ask(cur)
        if d.stop:
            return d
        mp, mm, vp, vm = measure(d.energy, rng)
        scanner.tell(d.energy, mp[0], mm[0], vp[0], vm[0])
        cur = d.energy
    raise AssertionError("never stopped")


def test_stop_rule_triggers_on_tolerance_and_budget():
    rng = np.random.default_rng(4)
    with threadpool_limits(1):
        loose = AdaptiveXMCD(*FE.window, FE.n_h, edges=(FE.e_l3, FE.e_l2),
                             stopping=StoppingRule(rtol=0.2, max_points=60, min_points=16))
        d = run_loop(loose, rng)
        assert "rtol" in d.reason and d.n_points < 60
        assert d.moments["m_orb_sd"] <= 0.2 * abs(d.moments["m_orb"])
        budget = AdaptiveXMCD(*FE.window, FE.n_h, stopping=StoppingRule(rtol=1e-9,
                                                                        max_points=18))
        d = run_loop(budget, rng)
        assert "budget" in d.reason and d.n_points == 18


def test_adaptive_beats_its_initial_uncertainty_and_picks_new_energies():
    rng = np.random.default_rng(5)
    with threadpool_limits(1):
        sc = AdaptiveXMCD(*FE.window, FE.n_h, edges=(FE.e_l3, FE.e_l2),
                          stopping=StoppingRule(rtol=1e-9, max_points=36))
        run_loop(sc, rng)
    first, last = sc.history[0], sc.history[-1]
    assert last["m_orb_sd"] < 0.2 * first["m_orb_sd"]
    chosen = sc.data["energy"][sc.n_init:]
    assert np.mean(np.abs(chosen - FE.e_l3) < 6) > 0.25


@pytest.mark.parametrize("kwargs, match", [
    (dict(e_min=740.0), "e_min"),
    (dict(strategy="random"), "strategy"),
    (dict(stopping=StoppingRule(max_points=5)), "max_points"),
])
def test_scanner_bad_input(kwargs, match):
    args = dict(e_min=695.0, e_max=735.0, n_h=3.39)
    args.update(kwargs)
    with pytest.raises(SmartbeamInputError, match=match):
        AdaptiveXMCD(**args)


def test_stopping_rule_rejects_bad_tolerance():
    with pytest.raises(SmartbeamInputError, match="rtol"):
        StoppingRule(rtol=0.0)
    with pytest.raises(SmartbeamInputError, match="atol"):
        StoppingRule(atol=-1.0)


def test_tell_rejects_nan():
    sc = AdaptiveXMCD(695.0, 735.0, 3.39)
    with pytest.raises(SmartbeamInputError, match="NaN"):
        sc.tell(700.0, float("nan"), 1.0, 1e-6, 1e-6)


def test_no_confident_wrong_answer_without_edge_hint_at_demo_noise():
    """Regression (demo on the twin: m_orb = -0.023 +- 0.004, m_spin = -0.01): with no edge
    hint, dwell 0.1 s, tol 3 %, budget 30, the L2 line was taken for L3 whenever the
    initial design missed the L3 peak. Over many seeds the reported interval must be sane."""
    true = SAMPLE.true_moments()
    zs = []
    with threadpool_limits(1):
        for seed in range(200, 216):
            rng = np.random.default_rng(seed)
            sc = AdaptiveXMCD(*FE.window, FE.n_h, edges=None, n_init=12,
                              cost=CostModel(dwell=0.1),
                              stopping=StoppingRule(rtol=0.03, max_points=30, min_points=16))
            for e in sc.initial_design():
                mp, mm, vp, vm = measure(e, rng, dwell=0.1)
                sc.tell(e, mp[0], mm[0], vp[0], vm[0])
            cur = None
            while True:
                d = sc.ask(cur)
                if d.stop:
                    break
                mp, mm, vp, vm = measure(d.energy, rng, dwell=0.1)
                sc.tell(d.energy, mp[0], mm[0], vp[0], vm[0])
                cur = d.energy
            m = d.moments
            zs.append((m["m_orb"] - true["m_orb"]) / m["m_orb_sd"])
            assert m["m_spin"] * true["m_spin"] > 0, f"seed {seed}: m_spin sign flip {m}"
            assert abs(m["e_l3"] - true["e_l3"]) < 1.0, f"seed {seed}: L3 at {m['e_l3']}"
    zs = np.abs(zs)
    assert zs.max() < 5, f"|error| / sd up to {zs.max():.1f}"
    # Not just sane but roughly calibrated (68 % nominal; 16 seeds -> wide band).
    assert 0.4 <= np.mean(zs < 1) <= 0.95


def test_incremental_append_equals_full_conditioning():
    rng = np.random.default_rng(7)
    x = np.sort(rng.uniform(0, 10, 40))
    y = np.sin(x) + rng.normal(0, 0.05, x.size)
    nv = np.full(x.size, 0.05**2)
    grid = np.linspace(0, 10, 51)
    inc = WarpedGP(centres=(5.0,), grid=grid).refit(x[:20], y[:20], nv[:20])
    full = inc.copy_hyperparameters().condition(x, y, nv)
    inc.append(x[20:], y[20:], nv[20:])
    assert inc.n_points == full.n_points == 40
    m_i, c_i = inc.grid_posterior()
    m_f, c_f = full.grid_posterior()
    np.testing.assert_allclose(m_i, m_f, atol=1e-8)
    np.testing.assert_allclose(c_i, c_f, atol=1e-8)
    # The generic posterior agrees with the grid cache.
    mean, kgg, v = inc.posterior(grid)
    np.testing.assert_allclose(mean, m_i, atol=1e-8)
    np.testing.assert_allclose(kgg - v.T @ v, c_i, atol=1e-8)
    # A duplicate point with no noise is handled (refactorised, not a NaN).
    inc.append([x[0]], [y[0]], [0.0])
    assert np.all(np.isfinite(inc.grid_posterior()[0]))


def test_xmcd_model_fast_path_appends():
    rng = np.random.default_rng(8)
    e = np.linspace(*FE.window, 30)
    data = measure(e, rng)
    a = XMCDGP(*FE.window, FE.n_h, edges=(FE.e_l3, FE.e_l2))
    a.fit(e[:20], *(v[:20] for v in data))
    a.fit(e, *data, refit=False)
    b = a.spawn()
    b.fit(e, *data, refit=False)  # same hyperparameters, conditioned from scratch
    assert a.n_points == b.n_points == 30
    for k in ("m_orb", "m_orb_sd", "m_spin", "m_spin_sd"):
        assert a.moments()[k] == pytest.approx(b.moments()[k], rel=1e-6)


def test_background_refits_are_adopted_and_never_waited_for():
    rng = np.random.default_rng(9)
    true = SAMPLE.true_moments()
    with threadpool_limits(1):
        sc = AdaptiveXMCD(*FE.window, FE.n_h, edges=(FE.e_l3, FE.e_l2), sync_refits=False,
                          stopping=StoppingRule(rtol=1e-9, max_points=40))
        for e in sc.initial_design():
            mp, mm, vp, vm = measure(e, rng)
            sc.tell(e, mp[0], mm[0], vp[0], vm[0])
        assert sc._refits.last == 10  # the first refit started during the design (n_init - 2)
        decisions, cur = [], None
        while True:
            d = sc.ask(cur)
            decisions.append(d)
            if d.stop:
                break
            if d.refit_pending:
                sc.close()  # let it land: the next decision must adopt it
                mp, mm, vp, vm = measure(d.energy, rng)
                sc.tell(d.energy, mp[0], mm[0], vp[0], vm[0])
                nxt = sc.ask(d.energy)
                decisions.append(nxt)
                assert nxt.refit
                if nxt.stop:
                    break
                cur = nxt.energy
                mp, mm, vp, vm = measure(cur, rng)
                sc.tell(cur, mp[0], mm[0], vp[0], vm[0])
                continue
            mp, mm, vp, vm = measure(d.energy, rng)
            sc.tell(d.energy, mp[0], mm[0], vp[0], vm[0])
            cur = d.energy
        sc.close()
    # Only the very first decision may wait (for the first fit); refits were adopted.
    assert all(x.waited_ms == 0.0 for x in decisions[1:])
    assert sum(x.refit for x in decisions) >= 3
    m = decisions[-1].moments
    assert abs(m["m_orb"] - true["m_orb"]) < 5 * m["m_orb_sd"]
    assert m["m_spin"] == pytest.approx(true["m_spin"], rel=0.05)


def test_failed_background_refit_keeps_previous_hyperparameters(caplog, monkeypatch):
    rng = np.random.default_rng(10)
    with threadpool_limits(1):
        sc = AdaptiveXMCD(*FE.window, FE.n_h, edges=(FE.e_l3, FE.e_l2), sync_refits=False,
                          stopping=StoppingRule(rtol=1e-9, max_points=30))
        for e in sc.initial_design():
            mp, mm, vp, vm = measure(e, rng)
            sc.tell(e, mp[0], mm[0], vp[0], vm[0])
        d = sc.ask()  # first fit (waited for); it starts the next refit at once
        sc.close()
        d = sc.ask(d.energy)  # ... which lands here
        assert d.refit
        before = sc.model.hyperparameters()

        class Broken:
            def fit(self, *args, **kwargs):
                raise FloatingPointError("refit blew up")

        monkeypatch.setattr(XMCDGP, "spawn", lambda self: Broken())  # refits now fail
        for _ in range(4):
            mp, mm, vp, vm = measure(d.energy, rng)
            sc.tell(d.energy, mp[0], mm[0], vp[0], vm[0])
            sc.close()
            d = sc.ask(d.energy)
    assert "refit failed" in caplog.text
    assert sc.model.hyperparameters() == before
    assert np.isfinite(d.moments["m_orb_sd"]) and sc.n_points == 16


def test_xmcd_gp_warp_grid_is_honoured_and_validated():
    rng = np.random.default_rng(3)
    e = np.linspace(695.0, 735.0, 40)
    mp, mm, vp, vm = measure(e, rng)
    with threadpool_limits(1):
        narrow = XMCDGP(695.0, 735.0, 3.39, edges=(707.8, 720.8), warp_grid=(0.0, 2.0))
        narrow.fit(e, mp, mm, vp, vm)
        wide = XMCDGP(695.0, 735.0, 3.39, edges=(707.8, 720.8)).fit(e, mp, mm, vp, vm)
    assert {narrow.gp_s.warp, narrow.gp_d.warp} <= {0.0, 2.0}
    assert {wide.gp_s.warp, wide.gp_d.warp} <= set(XMCDGP.WARP_GRID)
    for bad in ((), (-1.0, 3.0), (np.nan,)):
        with pytest.raises(SmartbeamInputError, match="warp_grid"):
            XMCDGP(695.0, 735.0, 3.39, warp_grid=bad)
