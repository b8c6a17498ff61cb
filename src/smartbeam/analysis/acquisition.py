"""Ask/tell drivers of GP-adaptive scans: XMCD (sum rules) and any 1-D spectrum.

``AdaptiveXMCD`` proposes the next energy (both helicities are measured there) as the
one that most reduces the posterior variance of the target (m_orb by default) per
unit cost (monochromator travel + dwell + overheads). The ``"max_variance"`` strategy
is the plain baseline of Ueno et al. 2018 (largest predictive variance, stationary GP).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import SmartbeamInputError
from .gp import XMCDGP, WarpedGP
from .sumrules import trapezoid_weights

__all__ = ["AdaptiveSpectrum", "AdaptiveXMCD", "CostModel", "Decision", "SPECTRUM_TARGETS",
           "STRATEGIES", "StoppingRule"]

logger = logging.getLogger(__name__)

STRATEGIES = ("smartbeam", "max_variance")
#: Targets of :class:`AdaptiveSpectrum` (a callable returning grid weights also works).
SPECTRUM_TARGETS = ("spectrum", "area")
TARGETS = ("m_orb", "m_spin", "moments", "spectrum")


@dataclass(frozen=True)
class CostModel:
    """Seconds spent to measure one energy point (both helicities).

    Parameters
    ----------
    dwell
        Counting time per helicity (s).
    mono_speed
        Monochromator speed (eV/s). 20 eV/s: a soft X-ray PGM with its undulator gap
        tracking moves at tens of eV/s (the caproto twin's energy axis moves at 200 eV/s,
        faster still). The earlier 5 eV/s made a 20 eV jump cost more than the point
        itself, so the scan crawled along the window instead of going where m_orb is
        uncertain.
    move_overhead
        Settling time of any move (s); the same for every candidate, so it scales the
        cost but does not change which energy is cheapest.
    pol_switch
        Time of one helicity switch (s); one per point when helicities alternate.
    exposures
        Exposures of ``dwell`` per point (2 for XMCD: one per helicity).
    """

    dwell: float = 1.0
    mono_speed: float = 20.0
    move_overhead: float = 0.3
    pol_switch: float = 1.0
    exposures: int = 2

    def __call__(self, energy: np.ndarray, current: float | None) -> np.ndarray:
        """Cost of measuring at each of ``energy`` starting from ``current``."""
        e = np.asarray(energy, dtype=float)
        travel = np.zeros_like(e) if current is None else np.abs(e - current) / self.mono_speed
        return self.exposures * self.dwell + self.pol_switch + self.move_overhead + travel


@dataclass(frozen=True)
class StoppingRule:
    """Stop when the target's posterior sd is small enough or the budget is spent.

    Parameters
    ----------
    rtol
        Relative tolerance: stop when ``sd <= rtol * |mean|``.
    atol
        Absolute tolerance: stop when ``sd <= atol`` (either tolerance suffices).
    max_points
        Point budget.
    min_points
        Never stop on tolerance before this many points.
    """

    rtol: float | None = 0.02
    atol: float | None = None
    max_points: int = 60
    min_points: int = 16

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if v is not None and not (np.isfinite(v) and v > 0):
                raise SmartbeamInputError(f"{name}={v!r}: expected a positive tolerance")
        if self.rtol is None and self.atol is None and self.max_points is None:
            raise SmartbeamInputError("no stopping criterion: give rtol, atol or max_points")

    def check(self, n_points: int, mean: float, sd: float) -> tuple[bool, str]:
        """Return (stop?, reason) for ``n_points`` measured points."""
        if n_points >= self.min_points and np.isfinite(sd):
            if self.atol is not None and sd <= self.atol:
                return True, f"sd {sd:.3g} <= atol {self.atol:.3g}"
            if self.rtol is not None and sd <= self.rtol * abs(mean):
                return True, f"sd {sd:.3g} <= rtol {self.rtol:.3g} x |{mean:.4g}|"
        if n_points >= self.max_points:
            return True, f"budget of {self.max_points} points spent"
        return False, ""


@dataclass
class Decision:
    """One adaptive decision (what goes into the ``decisions`` stream)."""

    energy: float
    acquisition: float
    n_points: int
    moments: dict
    hyperparameters: dict
    refit: bool
    latency_ms: float
    stop: bool = False
    reason: str = ""
    refit_pending: bool = False
    waited_ms: float = 0.0


class _BackgroundRefit:
    """At most one hyperparameter refit at a time, in a daemon thread.

    ``start(n, fit)`` runs ``fit()`` (which must work on its own copy of the model) in
    the background; ``take(wait)`` hands the fitted model back to the calling thread (or
    re-raises the refit's exception there), so the live model is only ever touched by
    the thread that makes decisions.
    """

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.result: Any = None
        self.last = 0  # data size of the last refit started (0: none yet)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, n: int, fit: Callable[[], Any]) -> None:
        if self.thread is not None:
            return

        def work() -> None:
            try:
                self.result = fit()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the decision thread
                self.result = exc

        self.last = n
        self.thread = threading.Thread(target=work, name="smartbeam-gp-refit", daemon=True)
        self.thread.start()

    def take(self, wait: bool) -> Any:
        """The finished refit's model, or None (still running, none, or failed).

        A failed refit is logged and the previous hyperparameters stay in use; only
        when the caller waits (the first fit: there is nothing to fall back on) is
        its exception re-raised.
        """
        t = self.thread
        if t is None or (t.is_alive() and not wait):
            return None
        t.join()
        self.thread, result, self.result = None, self.result, None
        if isinstance(result, BaseException):
            if wait:
                raise result
            logger.warning("background GP refit failed, keeping the previous "
                           "hyperparameters: %r", result)
            return None
        return result

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)


def _refit_due(n: int, last: int, n_init: int, every: float) -> bool:
    """Refit schedule: first at ``n_init - 2`` points, then when N grew by ``every``."""
    if last == 0:
        return n >= max(4, n_init - 2)
    return n - last >= max(2, int(np.ceil(every * last)))


@dataclass
class AdaptiveXMCD:
    """Ask/tell adaptive XMCD scanner (pure computation, no I/O).

    Parameters
    ----------
    e_min, e_max
        Scan window (eV).
    n_h
        Number of 3d holes for the sum rules.
    edges
        Tabulated (L3, L2) energies (search hint; may be off by a few eV).
    strategy
        ``"smartbeam"`` (target variance reduction per cost, warped GP, refits) or
        ``"max_variance"`` (largest predictive variance, stationary GP, refits).
    target
        ``"m_orb"``, ``"m_spin"``, ``"moments"`` or ``"spectrum"``.
    n_init
        Points of the initial uniform design.
    stopping
        The stopping rule.
    cost
        The cost model.
    refit_every
        Refit hyperparameters when the number of points has grown by this fraction
        since the last refit (and at least 2 points).
    n_grid
        Grid size of the functionals and of the candidate energies.
    sync_refits
        True: refit inline when due (reproducible; a decision then costs a refit).
        False: refits run in a background thread on a snapshot of the data while
        decisions use the previous hyperparameters, updated incrementally with the new
        points; a finished refit is adopted at the next decision. Only the very first
        fit can make a decision wait (it is started as soon as ``n_init - 2`` points are
        in, so in a real scan it runs during the last initial measurements).
    """

    e_min: float
    e_max: float
    n_h: float
    edges: tuple[float, float] | None = None
    strategy: str = "smartbeam"
    target: str = "m_orb"
    n_init: int = 12
    stopping: StoppingRule = field(default_factory=StoppingRule)
    cost: CostModel = field(default_factory=CostModel)
    refit_every: float = 0.15
    n_grid: int = 201
    sync_refits: bool = True

    def __post_init__(self) -> None:
        if not (np.isfinite(self.e_min) and np.isfinite(self.e_max) and self.e_min < self.e_max):
            raise SmartbeamInputError(f"e_min={self.e_min!r}, e_max={self.e_max!r}: expected "
                                      "finite energies with e_min < e_max")
        if self.strategy not in STRATEGIES:
            raise SmartbeamInputError(f"strategy={self.strategy!r}: expected one of {STRATEGIES}")
        if self.target not in TARGETS:
            raise SmartbeamInputError(f"target={self.target!r}: expected one of {TARGETS}")
        if self.n_init < 4:
            raise SmartbeamInputError(f"n_init={self.n_init!r}: expected at least 4 points")
        if self.stopping.max_points is not None and self.stopping.max_points < self.n_init:
            raise SmartbeamInputError(
                f"max_points={self.stopping.max_points!r}: expected at least the initial "
                f"design of {self.n_init} points")
        self.model = XMCDGP(self.e_min, self.e_max, self.n_h, edges=self.edges,
                            n_grid=self.n_grid, warp=self.strategy == "smartbeam")
        self._e: list[float] = []
        self._mp: list[float] = []
        self._mm: list[float] = []
        self._vp: list[float] = []
        self._vm: list[float] = []
        self._refits = _BackgroundRefit()
        self.history: list[dict] = []

    # -- data ------------------------------------------------------------------------
    @property
    def n_points(self) -> int:
        """Number of energies measured so far."""
        return len(self._e)

    @property
    def data(self) -> dict[str, np.ndarray]:
        """Measured points as arrays."""
        return {"energy": np.array(self._e), "mu_plus": np.array(self._mp),
                "mu_minus": np.array(self._mm), "var_plus": np.array(self._vp),
                "var_minus": np.array(self._vm)}

    def initial_design(self) -> np.ndarray:
        """Uniform initial design over the window (edges not assumed known)."""
        return np.linspace(self.e_min, self.e_max, self.n_init)

    def tell(self, energy: float, mu_plus: float, mu_minus: float, var_plus: float,
             var_minus: float) -> None:
        """Add one measured point (both helicities)."""
        vals = (energy, mu_plus, mu_minus, var_plus, var_minus)
        if not all(np.isfinite(v) for v in vals):
            raise SmartbeamInputError(f"measured point {vals!r}: expected finite values "
                                      "(a detector returned NaN/inf)")
        self._e.append(float(energy))
        self._mp.append(float(mu_plus))
        self._mm.append(float(mu_minus))
        self._vp.append(float(var_plus))
        self._vm.append(float(var_minus))
        if not self.sync_refits and self._refit_due():
            self._start_refit()

    # -- refits ----------------------------------------------------------------------
    def _refit_due(self) -> bool:
        return _refit_due(self.n_points, self._refits.last, self.n_init, self.refit_every)

    @property
    def refit_running(self) -> bool:
        """True while a background refit is in flight."""
        return self._refits.running

    def _columns(self, n: int | None = None) -> tuple[np.ndarray, ...]:
        """(energy, mu+, mu-, var+, var-) of the first ``n`` points (all by default).

        Safe from the refit thread: the lists are append-only and ``tell`` appends to
        ``_vm`` last, so every list holds at least ``len(_vm)`` entries.
        """
        n = len(self._vm) if n is None else n
        return tuple(np.array(c[:n]) for c in (self._e, self._mp, self._mm, self._vp,
                                                  self._vm))

    def _start_refit(self) -> None:
        cols = self._columns()
        model = self.model.spawn()

        def fit() -> XMCDGP:
            model.fit(*cols, refit=True)
            # Catch up with the points measured meanwhile here, not in the decision
            # thread: at N ~ 1000 adopting 50 new points there took over a second.
            for _ in range(3):
                latest = self._columns()
                if latest[0].size == model.n_points:
                    break
                model.fit(*latest, refit=False)
            return model

        self._refits.start(cols[0].size, fit)

    def close(self, timeout: float | None = None) -> None:
        """Wait for a background refit in flight (it is a daemon thread either way)."""
        self._refits.join(timeout)

    # -- decisions -------------------------------------------------------------------
    def update(self, force_refit: bool = False) -> bool:
        """Condition the model on all data; refit on schedule. Returns True if refit
        (sync mode) or if a background refit was adopted (async mode)."""
        n = self.n_points
        if n < 4:
            raise SmartbeamInputError(f"{n} measured points: expected at least 4 before "
                                      "the model can be fitted")
        d = self.data
        args = (d["energy"], d["mu_plus"], d["mu_minus"], d["var_plus"], d["var_minus"])
        if self.sync_refits or force_refit:
            landed = self._refits.take(wait=True)
            if landed is not None:
                self.model = landed
            refit = force_refit or self._refits.last == 0 or self._refit_due()
            self.model.fit(*args, refit=refit)
            if refit:
                self._refits.last = n
            return refit
        first = self.model.functionals is None
        if first:
            self._start_refit()  # no-op if the design already started it
        landed = self._refits.take(wait=first)
        if landed is not None:
            self.model = landed
        self.model.fit(*args, refit=False)  # appends the points since the refit's snapshot
        if self._refit_due():
            self._start_refit()
        return landed is not None

    def _target_stats(self, m: dict) -> tuple[float, float]:
        if self.target in ("m_orb", "moments", "spectrum"):
            return m["m_orb"], m["m_orb_sd"]
        return m["m_spin"], m["m_spin_sd"]

    def ask(self, current_energy: float | None = None) -> Decision:
        """Update the model and choose the next energy (or decide to stop)."""
        t0 = time.perf_counter()
        waiting = not self.sync_refits and self.model.functionals is None
        refit = self.update()
        waited = 1e3 * (time.perf_counter() - t0) if waiting else 0.0
        m = self.model.moments()
        mean, sd = self._target_stats(m)
        stop, reason = self.stopping.check(self.n_points, mean, sd)
        grid = self.model.grid
        if self.strategy == "max_variance":
            score = self.model.predictive_variance()
        else:
            score = self.model.variance_reduction(self.target) / self.cost(grid, current_energy)
        i = int(np.argmax(score))
        latency = 1e3 * (time.perf_counter() - t0)
        dec = Decision(energy=float(grid[i]), acquisition=float(score[i]),
                       n_points=self.n_points, moments=m,
                       hyperparameters=self.model.hyperparameters(), refit=refit,
                       latency_ms=latency, stop=stop, reason=reason,
                       refit_pending=self.refit_running, waited_ms=waited)
        self.history.append({"n_points": self.n_points, **m, "latency_ms": latency,
                             "refit": refit, "waited_ms": waited})
        return dec


@dataclass
class AdaptiveSpectrum:
    """Ask/tell adaptive 1-D scan of one signal where no sum rule applies.

    A stationary GP (Matern 5/2, known per-point noise, scheduled refits) models the
    signal on a grid over [start, stop]; the next position is the one that most reduces
    the posterior variance of the target per unit cost.

    Parameters
    ----------
    start, stop
        Scan range (motor units), start < stop.
    target
        ``"spectrum"``: the integrated posterior variance of the whole signal; the
        stopping statistic is the rms posterior sd over the grid, relative to the range
        (max - min) of the posterior mean. ``"area"``: the integral of the signal.
        A callable ``f(grid) -> weights`` sets any linear functional ``weights @ signal``.
    n_init
        Points of the initial uniform design (>= 4).
    stopping
        The stopping rule (``rtol`` relative to the statistic above).
    cost
        Seconds per point (``exposures=1``, no polarisation switch, for a plain scan).
    warp
        Learn where the signal has features: at each refit a stationary fit finds up to
        ``max_features`` curvature maxima of the posterior mean, and the input space is
        stretched there (strength chosen by marginal likelihood, width = the stationary
        length scale). Without it, "most variance reduction" with one length scale
        just spreads the points evenly.
    max_features
        Most centres of stretching.
    refit_every, n_grid, sync_refits
        As in :class:`AdaptiveXMCD`.
    """

    start: float
    stop: float
    target: str | Callable[[np.ndarray], np.ndarray] = "spectrum"
    n_init: int = 8
    stopping: StoppingRule = field(default_factory=lambda: StoppingRule(
        rtol=0.02, max_points=60, min_points=10))
    cost: CostModel = field(default_factory=lambda: CostModel(
        dwell=1.0, mono_speed=np.inf, pol_switch=0.0, exposures=1))
    refit_every: float = 0.15
    n_grid: int = 201
    sync_refits: bool = True
    warp: bool = True
    max_features: int = 2

    def __post_init__(self) -> None:
        if not (np.isfinite(self.start) and np.isfinite(self.stop) and self.start < self.stop):
            raise SmartbeamInputError(f"start={self.start!r}, stop={self.stop!r}: expected "
                                      "finite positions with start < stop")
        if not callable(self.target) and self.target not in SPECTRUM_TARGETS:
            raise SmartbeamInputError(f"target={self.target!r}: expected one of "
                                      f"{SPECTRUM_TARGETS} or a callable grid -> weights")
        if not isinstance(self.n_init, int) or self.n_init < 4:
            raise SmartbeamInputError(f"n_init={self.n_init!r}: expected an integer >= 4")
        if self.stopping.max_points is not None and self.stopping.max_points < self.n_init:
            raise SmartbeamInputError(
                f"max_points={self.stopping.max_points!r}: expected at least the initial "
                f"design of {self.n_init} points")
        self.grid = np.linspace(self.start, self.stop, self.n_grid)
        if callable(self.target):
            w = np.asarray(self.target(self.grid), dtype=float)
            if w.shape != self.grid.shape or not np.all(np.isfinite(w)):
                raise SmartbeamInputError(f"target weights of shape {w.shape}: expected "
                                          f"finite weights of shape {self.grid.shape}")
            self._weights = w
        elif self.target == "area":
            self._weights = trapezoid_weights(self.grid, self.start, self.stop)
        else:
            self._weights = None
        self.model = WarpedGP(grid=self.grid)
        self._x: list[float] = []
        self._y: list[float] = []
        self._v: list[float] = []
        self._refits = _BackgroundRefit()
        self._fitted = False
        self.history: list[dict] = []

    @property
    def n_points(self) -> int:
        """Number of points measured so far."""
        return len(self._v)

    @property
    def refit_running(self) -> bool:
        """True while a background refit is in flight."""
        return self._refits.running

    def initial_design(self) -> np.ndarray:
        """Uniform initial design over the range."""
        return np.linspace(self.start, self.stop, self.n_init)

    def tell(self, position: float, value: float, variance: float) -> None:
        """Add one measured point (its counting-noise ``variance``)."""
        vals = (position, value, variance)
        if not (all(np.isfinite(v) for v in vals) and variance >= 0):
            raise SmartbeamInputError(f"measured point {vals!r}: expected finite values "
                                      "and a non-negative variance")
        self._x.append(float(position))
        self._y.append(float(value))
        self._v.append(float(variance))  # appended last: see _columns
        if not self.sync_refits and self._due():
            self._start_refit()

    def close(self, timeout: float | None = None) -> None:
        """Wait for a background refit in flight."""
        self._refits.join(timeout)

    def _columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(self._v)
        return np.array(self._x[:n]), np.array(self._y[:n]), np.array(self._v[:n])

    def _due(self) -> bool:
        return _refit_due(self.n_points, self._refits.last, self.n_init, self.refit_every)

    def _refit(self, model: WarpedGP, x: np.ndarray, y: np.ndarray,
               v: np.ndarray) -> WarpedGP:
        if not self.warp:
            return model.refit(x, y, v)
        model.centres = ()
        model.refit(x, y, v)
        mean, _ = model.grid_posterior()
        curv = np.abs(np.gradient(np.gradient(mean, self.grid), self.grid))
        peaks = np.flatnonzero((curv[1:-1] >= curv[:-2]) & (curv[1:-1] >= curv[2:])) + 1
        peaks = peaks[curv[peaks] >= 0.25 * curv.max()] if curv.max() > 0 else peaks[:0]
        peaks = peaks[np.argsort(curv[peaks])[::-1][: self.max_features]]
        model.centres = tuple(float(c) for c in np.sort(self.grid[peaks]))
        model.warp_width = float(model.length)
        return model.refit(x, y, v)

    def _start_refit(self) -> None:
        x, y, v = self._columns()
        model = self.model.copy_hyperparameters()

        def fit() -> WarpedGP:
            self._refit(model, x, y, v)
            latest = self._columns()
            if latest[0].size > model.n_points:
                model.append(*(c[model.n_points:] for c in latest))
            return model

        self._refits.start(x.size, fit)

    def _update(self) -> bool:
        if self.n_points < 4:
            raise SmartbeamInputError(f"{self.n_points} measured points: expected at least "
                                      "4 before the model can be fitted")
        x, y, v = self._columns()
        landed = None
        if self.sync_refits:
            if not self._fitted or self._due():
                self._refit(self.model, x, y, v)
                self._refits.last = x.size
                self._fitted = True
                return True
        else:
            if not self._fitted:
                self._start_refit()  # no-op if the design already started it
            landed = self._refits.take(wait=not self._fitted)
            if landed is not None:
                self.model, self._fitted = landed, True
        n_old = self.model.n_points
        if x.size > n_old:
            self.model.append(x[n_old:], y[n_old:], v[n_old:])
        if not self.sync_refits and self._due():
            self._start_refit()
        return landed is not None

    def stats(self) -> dict[str, float]:
        """Target value and sd, with the rms posterior sd and the signal range."""
        mean, cov = self.model.grid_posterior()
        var = np.maximum(np.diag(cov), 0.0)
        out = {"rms_sd": float(np.sqrt(var.mean())), "range": float(np.ptp(mean))}
        if self._weights is None:
            out.update(value=out["range"], sd=out["rms_sd"])
        else:
            w = self._weights
            out.update(value=float(w @ mean), sd=float(np.sqrt(max(w @ cov @ w, 0.0))))
        return out

    def predict(self) -> dict[str, np.ndarray]:
        """Posterior mean and sd of the signal on the grid."""
        mean, cov = self.model.grid_posterior()
        return {"position": self.grid, "mean": mean,
                "sd": np.sqrt(np.maximum(np.diag(cov), 0.0))}

    def ask(self, current: float | None = None) -> Decision:
        """Update the model and choose the next position (or decide to stop).

        The returned :class:`Decision` carries the position in ``energy`` and the target
        statistics (``value``, ``sd``, ``rms_sd``, ``range``) in ``moments``.
        """
        t0 = time.perf_counter()
        waiting = not self.sync_refits and not self._fitted
        refit = self._update()
        waited = 1e3 * (time.perf_counter() - t0) if waiting else 0.0
        st = self.stats()
        stop, reason = self.stopping.check(self.n_points, st["value"], st["sd"])
        mean, cov = self.model.grid_posterior()
        x, _, v = self._columns()
        order = np.argsort(x, kind="stable")
        noise = np.interp(self.grid, x[order], v[order])
        den = np.maximum(np.diag(cov), 0.0) + noise
        if self._weights is None:
            red = np.einsum("ij,ij->j", cov, cov) / den
        else:
            red = (cov @ self._weights) ** 2 / den
        score = red / self.cost(self.grid, current)
        i = int(np.argmax(score))
        latency = 1e3 * (time.perf_counter() - t0)
        hp = dict(self.model.hyperparameters)
        dec = Decision(energy=float(self.grid[i]), acquisition=float(score[i]),
                       n_points=self.n_points, moments=st, hyperparameters=hp, refit=refit,
                       latency_ms=latency, stop=stop, reason=reason,
                       refit_pending=self.refit_running, waited_ms=waited)
        self.history.append({"n_points": self.n_points, **st, "latency_ms": latency,
                             "refit": refit, "waited_ms": waited})
        return dec
