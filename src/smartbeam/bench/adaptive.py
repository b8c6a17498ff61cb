"""Benchmark: points needed to know m_orb within 3 %, for several XMCD scan strategies.

Every strategy measures both helicities at the energies it picks, on the same simulated
sample (``sim_devices.physics.xmcd``), with the same noise seed. Designs are judged at
checkpoint sizes N with one estimator (the warped GP of ``smartbeam.analysis.gp``, fresh
hyperparameter fit) so that the strategies differ only in *where* they measure; the
``smartbeam`` strategy is judged by its own running estimate (the one its stopping rule
and the plan report). ``points`` = the smallest checkpoint N from which |m_orb error| stays
<= 3 % up to the budget (null if never), against the noiseless 201-point dense analysis.

Strategies: ``uniform`` grid; ``expert_grid`` (dense near the *tabulated* edges);
``max_variance`` (Ueno et al. 2018: largest predictive variance of a stationary GP with
refits); ``bluesky_adaptive_scan`` (``bluesky.plans.adaptive_scan`` itself, run by a RunEngine
with an ophyd soft motor and a detector that counts both helicities on the simulator; target
field mu_iso; family over ``target_delta``); ``gpcam`` (gpCAM ``GPOptimizer`` variance acquisition, if installed);
``smartbeam`` (m_orb variance reduction per unit cost, warped GP, scheduled refits);
``smartbeam_moments`` (the same, targeting m_orb and m_spin together: ``target="moments"``).

``design_bound`` (per case): the posterior sd of m_orb of the best N-point design the GP
estimator allows, searched offline with the truth's hyperparameters, edges and noise (see
:func:`_design_bound`). It says how much any choice of energies can still buy at this noise,
and how far each strategy's own stated sd (``m_orb_sd_rel_median``) is from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np

__all__ = ["add_arguments", "run"]

STRATEGY_NAMES = ("uniform", "expert_grid", "max_variance", "bluesky_adaptive_scan", "gpcam",
                  "smartbeam", "smartbeam_moments")
REL_TOL = 0.03
#: The issue's worst-decile criterion: m_orb within 5 %.
REL_TOL_WORST = 0.05
#: N bins of the decision-latency curve.
LATENCY_BINS = ((0, 50), (50, 100), (100, 200), (200, 500), (500, 1000), (1000, 2000))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's command-line options to ``parser``."""
    parser.add_argument("--seeds", type=int, default=50, help="noise seeds per case (50)")
    parser.add_argument("--truth", nargs="*", default=None, metavar="FILE.json",
                        help="truth files (XMCDTruth JSON); default: Fe, Co presets with "
                             "edges as tabulated and shifted +-2 eV, and the edrixs Fe2+ ion")
    parser.add_argument("--quick", action="store_true",
                        help="reduced run: 4 seeds, Fe and Fe+2 eV, budget 48")
    parser.add_argument("--max-points", type=int, default=64, help="point budget (64)")
    parser.add_argument("--dwell", type=float, default=1.0, help="dwell per helicity (s)")
    parser.add_argument("--tol", type=float, default=0.015,
                        help="relative tolerance of the smartbeam stopping rule (0.015)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGY_NAMES),
                        choices=STRATEGY_NAMES)
    parser.add_argument("--equal-dwell", type=int, default=0, metavar="N",
                        help="also compare smartbeam (N points) with a 201-point dense scan "
                             "of the same total dwell, on the first truth (0: skip)")
    parser.add_argument("--latency-points", type=int, default=2000, metavar="N",
                        help="budget of the decision-latency curve, sync and background "
                             "refits (2000; --quick: 300; 0: skip)")
    parser.add_argument("--point-time", type=float, default=0.05, metavar="S",
                        help="simulated measurement time per point in the latency curve "
                             "(s; a real XMCD point takes >= 2 x dwell + moves)")
    parser.add_argument("--target", default="m_orb", choices=("m_orb", "m_spin", "moments"),
                        help="what smartbeam's acquisition targets (m_orb)")
    parser.add_argument("--checkpoint-step", type=int, default=0, metavar="K",
                        help="judge every strategy every K points up to 64 (0: at 12, 16, "
                             "..., 32, 40, ..., 64)")
    parser.add_argument("--design-bound", type=int, default=48, metavar="N",
                        help="also compute, per case, the posterior sd of m_orb of the best "
                             "design of up to N points the estimator allows (greedy + "
                             "exchange with the truth's hyperparameters and noise; 48; "
                             "--quick: 32; 0: skip)")
    parser.add_argument("--json", action="store_true", help="print JSON only (CLI)")


# -- simulation helpers ------------------------------------------------------------
def _cases(args) -> list[dict]:
    from sim_devices.physics.xmcd import XMCDTruth, preset

    if args.truth:
        truths = [XMCDTruth.from_json(p) for p in args.truth]
        # The tabulated edges of a user truth are its own (unshifted) parameters.
        return [dict(truth=t.to_dict(), hint=_hint(t)) for t in truths]
    if args.quick:
        specs = [("Fe", 0.0), ("Fe", 2.0)]
    else:
        specs = [("Fe", 0.0), ("Fe", 2.0), ("Fe", -2.0), ("Co", 0.0), ("Co", -2.0),
                 ("Fe2+_edrixs", 0.0)]
    out = []
    for name, shift in specs:
        base = preset(name)
        out.append(dict(truth=base.shifted(shift).to_dict(), hint=_hint(base)))
    return out


def _hint(truth) -> tuple[float, float]:
    """Tabulated edges: what the user would type (without the unknown offset)."""
    return (truth.e_l3, truth.e_l2)


def _measure(sample, e, rng, dwell):
    out = []
    for h in (1, -1):
        c = sample.measure(np.atleast_1d(float(e)), h, dwell, rng)
        mu = float(c["tey"][0] / c["i0"][0])
        out += [mu, mu**2 * (1.0 / max(c["tey"][0], 1) + 1.0 / c["i0"][0])]
    mp, vp, mm, vm = out
    return mp, mm, vp, vm


def _expected_point(sample, e: np.ndarray, dwell: float) -> tuple[np.ndarray, ...]:
    """Noiseless mu+, mu- at ``e`` with the counting-noise variances of one point."""
    n0 = sample.truth.flux * dwell
    out = []
    for h in (1, -1):
        mu = sample.mu(e, h)
        out += [mu, mu**2 * (1.0 / (n0 * mu) + 1.0 / n0)]
    mp, vp, mm, vm = out
    return mp, mm, vp, vm


def _design_bound(task: dict) -> dict:
    """Posterior sd of m_orb of the best N-point design the GP estimator allows.

    With fixed hyperparameters a GP's posterior variance does not depend on the measured
    values, so the best design can be searched offline: hyperparameters and edges are those
    the estimator fits to a noiseless dense (201-point) scan of the truth, the noise is the
    truth's expected counting noise, and the design is greedy (the point that most reduces
    var(m_orb), from 4 uniform points) followed by one exchange sweep (each point in turn
    moved to the best of ``candidates`` energies). No sequential strategy, which must also
    learn the edges and hyperparameters from its own noisy points, can be expected to beat
    it: it bounds what any design buys with this estimator at this noise.
    """
    from threadpoolctl import threadpool_limits

    from sim_devices.physics.xmcd import XMCDSample, XMCDTruth
    from smartbeam.analysis.gp import XMCDGP

    truth = XMCDTruth.from_dict(task["truth"])
    sample = XMCDSample(truth)
    true_m_orb = abs(sample.true_moments()["m_orb"])
    dwell, sizes = task["dwell"], sorted(task["sizes"])
    with threadpool_limits(1):
        dense = sample.dense_grid(201)
        model = XMCDGP(*truth.window, truth.n_h, edges=tuple(task["hint"]))
        model.fit(dense, *_expected_point(sample, dense, dwell))
        grid = model.grid

        def posterior(design: list[float]) -> XMCDGP:
            e = np.sort(np.asarray(design, dtype=float))
            m = model.spawn()
            m.fit(e, *_expected_point(sample, e, dwell), refit=False)
            return m

        def sd(design: list[float]) -> float:
            return float(posterior(design).moments()["m_orb_sd"]) / true_m_orb

        design = list(np.linspace(*truth.window, 4))
        candidates = grid[:: max(1, grid.size // task.get("candidates", 50))]
        greedy, best = {}, {}
        while len(design) < sizes[-1]:
            red = posterior(design).variance_reduction("m_orb")
            design.append(float(grid[int(np.argmax(red))]))
            n = len(design)
            if n not in sizes:
                continue
            greedy[n] = cur = sd(design)
            trial_design = list(design)
            for i in range(n):
                for c in candidates:
                    trial = list(trial_design)
                    trial[i] = float(c)
                    v = sd(trial)
                    if v < cur:
                        cur, trial_design = v, trial
            best[n] = cur
    return {"case": task["case"], "greedy": greedy, "exchange": best,
            "hyperparameters": model.hyperparameters()}


def _checkpoints(n_init: int, budget: int, step: int = 0) -> list[int]:
    """Sizes at which every strategy is judged (``step`` > 0: every ``step`` points up to 64).

    A point count is only as exact as this grid, but a finer grid also makes "stays within
    3 %" stricter, and more so for the grids, whose design (and noise) is new at every
    size, than for sequential strategies, whose successive estimates share their data.
    """
    head = (sorted(set(range(12, 65, step)) | {64}) if step > 0
            else [12, 16, 20, 24, 28, 32, 40, 48, 56, 64])
    return [n for n in head + [80, 100, 128, 160, 200] if n_init <= n <= budget]


def _fit_estimate(truth, hint, data) -> dict:
    from smartbeam.analysis.gp import XMCDGP

    m = XMCDGP(*truth.window, truth.n_h, edges=hint)
    m.fit(data[:, 0], data[:, 1], data[:, 2], data[:, 3], data[:, 4])
    return m.moments()


def _expert_design(n: int, window, hint) -> np.ndarray:
    """Quantiles of a density 1 + 6 x (Gaussian bumps of 2.5 eV at the tabulated edges)."""
    e = np.linspace(*window, 2001)
    dens = 1.0 + 6.0 * sum(np.exp(-0.5 * ((e - c) / 2.5) ** 2) for c in hint)
    cdf = np.cumsum(dens)
    cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    return np.interp(np.linspace(0, 1, n), cdf, e)


class _BlueskyAdaptiveRig:
    """``bluesky.plans.adaptive_scan`` itself, run by a RunEngine on the simulator.

    An ophyd soft motor stands for the monochromator; the detector counts both helicities
    at the motor's position when triggered and reports mu_iso (the plan's target field)
    with mu+/mu- and their variances. One RunEngine per worker process, reused.
    """

    def __init__(self) -> None:
        from bluesky import RunEngine
        from ophyd import Component, Device, Signal
        from ophyd.sim import SynAxis
        from ophyd.status import StatusBase

        rig = self

        class XMCDPoint(Device):
            mu_iso = Component(Signal, value=0.0, kind="hinted")
            mu_plus = Component(Signal, value=0.0)
            mu_minus = Component(Signal, value=0.0)
            var_plus = Component(Signal, value=0.0)
            var_minus = Component(Signal, value=0.0)

            def trigger(self):
                mp, mm, vp, vm = _measure(rig.sample, rig.motor.readback.get(), rig.rng,
                                          rig.dwell)
                for sig, v in ((self.mu_plus, mp), (self.mu_minus, mm), (self.var_plus, vp),
                               (self.var_minus, vm), (self.mu_iso, 0.5 * (mp + mm))):
                    sig.put(v)
                st = StatusBase()
                st.set_finished()
                return st

        self.motor = SynAxis(name="mono")
        self.det = XMCDPoint(name="xmcd")
        # No signal handlers: the rig runs in worker processes.
        self.RE = RunEngine({}, context_managers=[])
        self.rows: list[tuple] = []
        self.RE.subscribe(self._event, "event")
        self.sample = self.rng = None
        self.dwell = 1.0

    def _event(self, name, doc) -> None:
        d = doc["data"]
        self.rows.append((d["mono"], d["xmcd_mu_plus"], d["xmcd_mu_minus"],
                          d["xmcd_var_plus"], d["xmcd_var_minus"]))

    def run(self, sample, window, target_delta, rng, dwell) -> np.ndarray:
        """Rows (energy, mu+, mu-, var+, var-) of one adaptive_scan, in visiting order."""
        from bluesky.plans import adaptive_scan

        self.sample, self.rng, self.dwell, self.rows = sample, rng, dwell, []
        # Step limits of the previous re-implementation: 0.2-4 eV, bluesky's backstep rule.
        self.RE(adaptive_scan([self.det], "xmcd_mu_iso", self.motor, window[0], window[1],
                              0.2, 4.0, float(target_delta), True, 0.8))
        return np.array(self.rows)


_RIG: _BlueskyAdaptiveRig | None = None


def _adaptive_scan_design(sample, window, target_delta, rng, dwell) -> np.ndarray:
    """Points visited by ``bluesky.plans.adaptive_scan`` on mu_iso; both helicities are
    counted at each visited energy (backsteps included)."""
    global _RIG
    if _RIG is None:
        _RIG = _BlueskyAdaptiveRig()
    return _RIG.run(sample, window, target_delta, rng, dwell)


def _gpcam_sequence(sample, window, rng, dwell, budget, n_init):
    import warnings

    from gpcam import GPOptimizer

    warnings.filterwarnings("ignore", module="fvgp")
    warnings.filterwarnings("ignore", category=UserWarning)
    e0 = np.linspace(*window, n_init)
    rows = [(e, *_measure(sample, e, rng, dwell)) for e in e0]
    arr = np.array(rows)
    y = 0.5 * (arr[:, 1] + arr[:, 2])
    nv = 0.25 * (arr[:, 3] + arr[:, 4])
    opt = GPOptimizer(arr[:, :1], y, noise_variances=nv)
    bounds = np.array([[1e-3, 1e3], [0.1, 50.0]])
    opt.train(hyperparameter_bounds=bounds, method="local")
    while len(rows) < budget:
        nxt = opt.ask(np.array([list(window)]), acquisition_function="variance",
                      method="global", max_iter=20)
        e = float(np.clip(np.ravel(nxt["x"])[0], *window))
        mp, mm, vp, vm = _measure(sample, e, rng, dwell)
        rows.append((e, mp, mm, vp, vm))
        opt.tell(np.array([[e]]), np.array([0.5 * (mp + mm)]),
                 noise_variances=np.array([0.25 * (vp + vm)]))
        if len(rows) % 4 == 0:
            opt.train(hyperparameter_bounds=bounds, method="local")
    return np.array(rows)


def _one(task: dict) -> dict:
    """Run every strategy for one (case, seed); returns per-strategy records."""
    from threadpoolctl import threadpool_limits

    from sim_devices.physics.xmcd import XMCDSample, XMCDTruth
    from smartbeam.analysis.acquisition import AdaptiveXMCD, CostModel, StoppingRule

    truth = XMCDTruth.from_dict(task["truth"])
    hint = tuple(task["hint"])
    sample = XMCDSample(truth)
    true = sample.true_moments()
    budget, dwell, seed = task["budget"], task["dwell"], task["seed"]
    n_init = 12
    cps = _checkpoints(n_init, budget, task.get("checkpoint_step", 0))
    cost = CostModel(dwell=dwell)
    out: dict[str, dict] = {}

    def judge(est_at: dict[int, dict], energies=None) -> dict:
        ns = sorted(est_at)
        err = {n: est_at[n]["m_orb"] / true["m_orb"] - 1 for n in ns}
        ok = [abs(err[n]) <= REL_TOL for n in ns]
        need = None
        for i, n in enumerate(ns):
            if all(ok[i:]):
                need = n
                break
        ok5 = [abs(err[n]) <= REL_TOL_WORST for n in ns]
        need5 = next((n for i, n in enumerate(ns) if all(ok5[i:])), None)
        ref = need if need is not None else ns[-1]
        rec = {"points": need, "points_5pct": need5,
               "m_orb_rel_err": {str(n): float(err[n]) for n in ns},
               "m_orb_sd_rel": {str(n): float(est_at[n]["m_orb_sd"] / abs(true["m_orb"]))
                                for n in ns},
               "m_spin_rel_err_at_points": float(abs(est_at[ref]["m_spin"] / true["m_spin"] - 1)),
               "covered": [bool(abs(est_at[n]["m_orb"] - true["m_orb"]) <= est_at[n]["m_orb_sd"])
                           for n in ns if n >= 20]}
        if energies is not None and need is not None:
            e = np.asarray(energies[:need])
            rec["beam_time_s"] = float(sum(cost(np.array([e[i]]), e[i - 1] if i else None)[0]
                                           for i in range(e.size)))
        return rec

    rng_of = lambda k: np.random.default_rng([seed, k])  # noqa: E731 - same noise per strategy

    with threadpool_limits(1):
        strategies = task["strategies"]
        if "uniform" in strategies:
            rng = rng_of(0)
            est = {}
            for n in cps:
                e = np.linspace(*truth.window, n)
                data = np.array([(x, *_measure(sample, x, rng, dwell)) for x in e])
                est[n] = _fit_estimate(truth, hint, data)
            out["uniform"] = judge(est)
        if "expert_grid" in strategies:
            rng = rng_of(1)
            est = {}
            for n in cps:
                e = _expert_design(n, truth.window, hint)
                data = np.array([(x, *_measure(sample, x, rng, dwell)) for x in e])
                est[n] = _fit_estimate(truth, hint, data)
            out["expert_grid"] = judge(est)
        for name, strat, target in (("max_variance", "max_variance", "m_orb"),
                                    ("smartbeam", "smartbeam", task.get("target", "m_orb")),
                                    ("smartbeam_moments", "smartbeam", "moments")):
            if name not in strategies:
                continue
            if name == "smartbeam_moments" and target == task.get("target") and (
                    "smartbeam" in out):  # --target moments: the same run
                out[name] = out["smartbeam"]
                continue
            # Both smartbeam variants see the same noise stream: a paired comparison.
            rng = rng_of(2 if strat == "max_variance" else 5)
            sc = AdaptiveXMCD(*truth.window, truth.n_h, edges=hint, strategy=strat,
                              n_init=n_init, cost=cost, target=target,
                              stopping=StoppingRule(rtol=task["tol"], max_points=budget,
                                                    min_points=n_init + 4))
            for e in sc.initial_design():
                sc.tell(e, *_measure(sample, e, rng, dwell))
            own, lat, cur, stop_at = {}, [], None, None
            while True:
                d = sc.ask(cur)
                lat.append((d.latency_ms, bool(d.refit)))
                if d.n_points in cps:
                    own[d.n_points] = d.moments
                if d.stop and stop_at is None and "budget" not in d.reason:
                    stop_at = (d.n_points, d.moments)
                if sc.n_points >= budget:
                    break
                cur = d.energy
                sc.tell(d.energy, *_measure(sample, d.energy, rng, dwell))
            if strat == "max_variance":
                data = np.column_stack([sc.data[k] for k in ("energy", "mu_plus", "mu_minus",
                                                             "var_plus", "var_minus")])
                est = {n: _fit_estimate(truth, hint, data[:n]) for n in cps}
                out[name] = judge(est, sc.data["energy"])
            else:
                out[name] = judge(own, sc.data["energy"])
                out[name]["latency_ms"] = lat
                if stop_at is not None:
                    n, m = stop_at
                    out[name]["stop"] = {"points": n,
                                         "m_orb_rel_err": float(m["m_orb"] / true["m_orb"] - 1),
                                         "m_spin_rel_err": float(m["m_spin"] / true["m_spin"] - 1)}
                else:
                    out[name]["stop"] = {"points": None}
        if "bluesky_adaptive_scan" in strategies:
            rng = rng_of(3)
            est = {}
            # Judged at its own sizes, one per target_delta (the plan sets its point count,
            # not the checkpoint grid), so --checkpoint-step does not apply to it.
            for td in np.geomspace(0.8, 0.02, 14):
                data = _adaptive_scan_design(sample, truth.window, td, rng, dwell)
                n = len(data)
                if n < 8 or n > budget:
                    continue
                order = np.argsort(data[:, 0], kind="stable")
                est[n] = _fit_estimate(truth, hint, data[order])
            out["bluesky_adaptive_scan"] = judge(est) if est else {"points": None,
                                                                    "covered": [],
                                                                    "m_spin_rel_err_at_points": float("nan")}
        if "gpcam" in strategies and task["gpcam_ok"]:
            rng = rng_of(4)
            try:
                data = _gpcam_sequence(sample, truth.window, rng, dwell, budget, n_init)
                est = {n: _fit_estimate(truth, hint, data[:n]) for n in cps}
                out["gpcam"] = judge(est, data[:, 0])
            except Exception as exc:  # report, don't kill the benchmark
                out["gpcam"] = {"error": repr(exc)}
    return {"case": task["case"], "seed": seed, "true": true, "strategies": out}


def _equal_dwell_one(task: dict) -> dict:
    """Same total dwell: smartbeam with ``n`` points vs a 201-point dense uniform scan
    (conventional trapezoid sum rules, and the GP estimator on the same dense data)."""
    from threadpoolctl import threadpool_limits

    from sim_devices.physics.xmcd import XMCDSample, XMCDTruth
    from smartbeam.analysis.acquisition import AdaptiveXMCD, CostModel, StoppingRule
    from smartbeam.analysis.sumrules import sum_rules

    truth = XMCDTruth.from_dict(task["truth"])
    hint = tuple(task["hint"])
    sample = XMCDSample(truth)
    true = sample.true_moments()
    n, dwell, seed = task["n"], task["dwell"], task["seed"]
    dense_dwell = dwell * n / 201
    out = {}
    with threadpool_limits(1):
        rng = np.random.default_rng([seed, 10])
        e = sample.dense_grid(201)
        data = np.array([(x, *_measure(sample, x, rng, dense_dwell)) for x in e])
        conv = sum_rules(e, data[:, 1], data[:, 2], truth.n_h, edge_hint=hint)
        out["dense_trapezoid"] = (conv.m_orb, conv.m_spin)
        gp = _fit_estimate(truth, hint, data)
        out["dense_gp"] = (gp["m_orb"], gp["m_spin"])
        rng = np.random.default_rng([seed, 11])
        sc = AdaptiveXMCD(*truth.window, truth.n_h, edges=hint, n_init=12,
                          cost=CostModel(dwell=dwell),
                          stopping=StoppingRule(rtol=1e-9, max_points=n))
        for x in sc.initial_design():
            sc.tell(x, *_measure(sample, x, rng, dwell))
        cur = None
        while True:
            d = sc.ask(cur)
            if d.stop:
                break
            cur = d.energy
            sc.tell(d.energy, *_measure(sample, d.energy, rng, dwell))
        out["smartbeam"] = (d.moments["m_orb"], d.moments["m_spin"])
    return {k: (v[0] / true["m_orb"] - 1, v[1] / true["m_spin"] - 1) for k, v in out.items()}


def _latency_curve(task: dict) -> dict:
    """Decision latency against N for one long Fe scan (one BLAS thread).

    ``sync``: refits inline (the decision that refits pays for it). ``background``:
    refits in a thread while the scan goes on; ``point_time`` seconds of simulated
    measurement separate the decisions, as counting and moves do in a real scan.
    """
    from threadpoolctl import threadpool_limits

    from sim_devices.physics.xmcd import XMCDSample, preset
    from smartbeam.analysis.acquisition import AdaptiveXMCD, StoppingRule

    truth = preset("Fe")
    sample = XMCDSample(truth)
    rng = np.random.default_rng([task["seed"], 20])
    sync, pause = task["mode"] == "sync", task["point_time"]
    rows = []
    with threadpool_limits(1):
        sc = AdaptiveXMCD(*truth.window, truth.n_h, edges=_hint(truth), sync_refits=sync,
                          stopping=StoppingRule(rtol=1e-12, max_points=task["max_points"]))
        for e in sc.initial_design():
            sc.tell(e, *_measure(sample, e, rng, 1.0))
            if not sync:
                time.sleep(pause)
        cur = None
        while True:
            d = sc.ask(cur)
            rows.append((d.n_points, d.latency_ms, bool(d.refit)))
            if d.stop:
                break
            cur = d.energy
            if not sync:
                time.sleep(pause)
            sc.tell(cur, *_measure(sample, cur, rng, 1.0))
        sc.close()
    arr = np.array(rows, float)
    out = {}
    for lo, hi in LATENCY_BINS:
        m = (arr[:, 0] > lo) & (arr[:, 0] <= hi)
        if m.any():
            lat = arr[m, 1]
            out[f"N<={hi}"] = {"median": float(np.median(lat)),
                               "p95": float(np.percentile(lat, 95)),
                               "max": float(lat.max()), "decisions": int(m.sum()),
                               "refits": int(arr[m, 2].sum())}
    return {"mode": task["mode"], "bins": out}


def _gpcam_available() -> tuple[bool, str]:
    try:
        import gpcam  # noqa: F401
    except Exception as exc:
        return False, f"gpcam not importable: {exc!r}"
    return True, f"gpcam {gpcam.__version__}"


def _summarise(records: list[dict], strategy: str, dwell: float) -> dict:
    recs = [r["strategies"][strategy] for r in records if strategy in r["strategies"]]
    recs = [r for r in recs if "error" not in r]
    if not recs:
        return {"points_median": None, "points_p90": None, "m_spin_rel_err_median": None,
                "coverage_68": None, "dwell_s_median": None, "n_runs": 0}
    pts = np.array([np.inf if r["points"] is None else r["points"] for r in recs], float)

    def q(x, p):
        v = float(np.percentile(x, p, method="higher"))
        return None if not np.isfinite(v) else int(v)

    cov = [c for r in recs for c in r["covered"]]
    pts5 = np.array([np.inf if r.get("points_5pct") is None else r["points_5pct"]
                     for r in recs], float)
    # Worst decile at the median budget: |m_orb error| of the 90th-percentile seed at
    # N = points_median (the issue asks for it within 5 %).
    n_med = q(pts, 50)
    worst = None
    if n_med is not None and all(str(n_med) in r["m_orb_rel_err"] for r in recs):
        worst = float(np.percentile([abs(r["m_orb_rel_err"][str(n_med)]) for r in recs], 90))
    out = {"points_median": q(pts, 50), "points_p90": q(pts, 90),
           "points_p90_within_5pct": q(pts5, 90),
           "m_orb_abs_rel_err_p90_at_points_median": worst,
           "m_spin_rel_err_median": float(np.median([r["m_spin_rel_err_at_points"]
                                                      for r in recs])),
           "coverage_68": float(np.mean(cov)) if cov else None,
           "dwell_s_median": (None if q(pts, 50) is None else 2 * dwell * q(pts, 50)),
           "budget_ran_out_fraction": float(np.mean(~np.isfinite(pts))), "n_runs": len(recs)}
    sizes = sorted({int(n) for r in recs for n in r.get("m_orb_sd_rel", {})})
    out["m_orb_sd_rel_median"] = {
        str(n): float(np.median([r["m_orb_sd_rel"][str(n)] for r in recs
                                 if str(n) in r.get("m_orb_sd_rel", {})])) for n in sizes}
    bt = [r["beam_time_s"] for r in recs if "beam_time_s" in r]
    if bt:
        out["beam_time_s_median_when_reached"] = float(np.median(bt))
    if strategy.startswith("smartbeam"):
        stops = [r["stop"] for r in recs]
        sp = [s["points"] for s in stops if s["points"] is not None]
        errs = [abs(s["m_orb_rel_err"]) for s in stops if s["points"] is not None]
        out["stop_rule"] = {
            "fired_fraction": len(sp) / len(stops),
            "points_median": int(np.median(sp)) if sp else None,
            "m_orb_abs_rel_err_median": float(np.median(errs)) if errs else None,
            "m_orb_abs_rel_err_p90": float(np.percentile(errs, 90)) if errs else None,
            "within_3pct_fraction": float(np.mean(np.array(errs) <= REL_TOL)) if errs else None,
            "m_spin_abs_rel_err_median": float(np.median([abs(s["m_spin_rel_err"]) for s in stops
                                                          if s["points"] is not None]))
            if sp else None}
    return out


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark and return the JSON-serialisable figures."""
    from tqdm import tqdm

    if args.quick:
        args.seeds = min(args.seeds, 4)
        args.max_points = min(args.max_points, 48)
    gp_ok, gp_msg = _gpcam_available()
    cases = _cases(args)
    tasks = []
    for ci, case in enumerate(cases):
        for seed in range(args.seeds):
            tasks.append(dict(case=ci, seed=seed, truth=case["truth"], hint=case["hint"],
                              budget=args.max_points, dwell=args.dwell, tol=args.tol,
                              strategies=list(args.strategies), gpcam_ok=gp_ok,
                              checkpoint_step=args.checkpoint_step, target=args.target))
    n_bound = min(args.design_bound, 32) if args.quick else args.design_bound
    bound_sizes = _checkpoints(12, n_bound, args.checkpoint_step)
    bound_tasks = [dict(case=ci, truth=case["truth"], hint=case["hint"], dwell=args.dwell,
                        sizes=bound_sizes) for ci, case in enumerate(cases)] if bound_sizes else []
    t0 = time.perf_counter()
    records, bounds = [], {}
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futs = [pool.submit(_one, t) for t in tasks]
        futs += [pool.submit(_design_bound, t) for t in bound_tasks]
        for f in tqdm(as_completed(futs), total=len(futs), desc="bench adaptive",
                      file=sys.stderr):
            rec = f.result()
            if "exchange" in rec:
                bounds[rec["case"]] = rec
            else:
                records.append(rec)
    result_cases = []
    for ci, case in enumerate(cases):
        recs = [r for r in records if r["case"] == ci]
        truth = case["truth"]
        strategies = {s: _summarise(recs, s, args.dwell) for s in args.strategies}
        if "gpcam" in strategies and not gp_ok:
            strategies["gpcam"] = {"unavailable": gp_msg, "points_median": None,
                                   "points_p90": None, "m_spin_rel_err_median": None,
                                   "coverage_68": None, "dwell_s_median": None}
        result_cases.append({"truth": truth["name"], "kind": truth["kind"],
                             "edge_shift_eV": float(truth["edge_offset"]),
                             "true_m_orb": recs[0]["true"]["m_orb"] if recs else None,
                             "true_m_spin": recs[0]["true"]["m_spin"] if recs else None,
                             "strategies": strategies})
        if ci in bounds:
            b = bounds[ci]
            result_cases[-1]["design_bound"] = {
                "m_orb_sd_rel": {str(n): min(b["greedy"][n], b["exchange"][n])
                                 for n in sorted(b["exchange"])},
                "m_orb_sd_rel_greedy": {str(n): v for n, v in sorted(b["greedy"].items())},
                "hyperparameters": b["hyperparameters"]}
    equal = None
    if args.equal_dwell:
        eq_tasks = [dict(truth=cases[0]["truth"], hint=cases[0]["hint"], n=args.equal_dwell,
                         dwell=args.dwell, seed=seed) for seed in range(args.seeds)]
        with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
            eq = list(tqdm(pool.map(_equal_dwell_one, eq_tasks), total=len(eq_tasks),
                           desc="equal dwell", file=sys.stderr))
        equal = {"truth": cases[0]["truth"]["name"], "smartbeam_points": args.equal_dwell,
                 "dense_points": 201, "total_dwell_s": 2 * args.dwell * args.equal_dwell}
        for k in eq[0]:
            errs = np.abs(np.array([r[k] for r in eq]))
            equal[k] = {"m_orb_abs_rel_err_median": float(np.median(errs[:, 0])),
                        "m_orb_abs_rel_err_p90": float(np.percentile(errs[:, 0], 90)),
                        "m_orb_rms_rel_err": float(np.sqrt(np.mean(errs[:, 0] ** 2))),
                        "m_spin_abs_rel_err_median": float(np.median(errs[:, 1]))}
    curves = {}
    n_curve = min(args.latency_points, 300) if args.quick else args.latency_points
    if n_curve:
        # One at a time: the background mode needs the second core for its refit thread.
        with ProcessPoolExecutor(max_workers=1) as pool:
            for mode in tqdm(("sync", "background"), desc="latency curve", file=sys.stderr):
                curves[mode] = pool.submit(_latency_curve, dict(
                    mode=mode, seed=0, max_points=n_curve,
                    point_time=args.point_time)).result()["bins"]
    pairs = [x for r in records for x in r["strategies"].get("smartbeam", {})
             .get("latency_ms", [])]
    lat = np.array([x[0] for x in pairs])
    refit = np.array([x[1] for x in pairs], bool)

    def pct(x, p):
        return float(np.percentile(x, p)) if x.size else None
    bg = curves.get("background", {})
    bg200 = [bg[k] for k in ("N<=50", "N<=100", "N<=200") if k in bg]
    return {
        "cases": result_cases,
        "latency_ms": {
            # Headline: the plan's default (background refits), N <= 200; p95/max are
            # the worst over the three bins (not pooled), median the N<=200 bin's.
            "median": bg200[-1]["median"] if bg200 else None,
            "p95": max(b["p95"] for b in bg200) if bg200 else None,
            "max": max(b["max"] for b in bg200) if bg200 else None,
            "max_points": 200 if bg200 else None, "mode": "background refits",
            "blas_threads": 1, "point_time_s": args.point_time,
            "curve": curves,
            "sync_accuracy_runs": {
                "median": pct(lat, 50), "p95": pct(lat, 95),
                "max": float(lat.max()) if lat.size else None, "max_points": args.max_points,
                "without_refit": {"median": pct(lat[~refit], 50),
                                  "p95": pct(lat[~refit], 95), "n": int((~refit).sum())},
                "with_refit": {"median": pct(lat[refit], 50),
                               "p95": pct(lat[refit], 95), "n": int(refit.sum())}},
            "note": "wall clock inside AdaptiveXMCD.ask (update + moments + acquisition). "
                    "The accuracy runs use sync_refits=True (reproducible; refits inline). "
                    "The curve runs one Fe scan per mode to the latency budget; background "
                    "mode sleeps point_time_s between decisions as a measurement would."},
        "equal_dwell": equal,
        "settings": {"seeds": args.seeds, "max_points": args.max_points, "dwell_s": args.dwell,
                     "rel_tol_judged": REL_TOL, "checkpoint_step": args.checkpoint_step,
                     "rel_tol_worst_decile": REL_TOL_WORST,
                     "smartbeam_stop_rtol": args.tol,
                     "smartbeam_target": args.target, "smartbeam_refits": "sync (inline)",
                     "noise": "Poisson, flux 3e6/s x dwell: ~0.1 % of the edge jump per point",
                     "gpcam": gp_msg,
                     "bluesky_adaptive_scan": "bluesky.plans.adaptive_scan run by a RunEngine "
                                              "(ophyd soft motor, detector counting both "
                                              "helicities on the simulator), target field "
                                              "mu_iso, steps 0.2-4 eV, family over "
                                              "target_delta",
                     "wall_s": round(time.perf_counter() - t0, 1)},
    }


def _truth_fields() -> list[str]:  # pragma: no cover - documentation helper
    from sim_devices.physics.xmcd import XMCDTruth

    return [f.name for f in dataclasses.fields(XMCDTruth)]
