"""Ask/tell driver of a GP-adaptive XMCD scan: acquisition, cost, stopping.

``AdaptiveXMCD`` proposes the next energy (both helicities are measured there) as the
one that most reduces the posterior variance of the target (m_orb by default) per
unit cost (monochromator travel + dwell + overheads). The ``"max_variance"`` strategy
is the plain baseline of Ueno et al. 2018 (largest predictive variance, stationary GP).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import SmartbeamInputError
from .gp import XMCDGP

__all__ = ["AdaptiveXMCD", "CostModel", "Decision", "StoppingRule", "STRATEGIES"]

STRATEGIES = ("smartbeam", "max_variance")
TARGETS = ("m_orb", "m_spin", "moments", "spectrum")


@dataclass(frozen=True)
class CostModel:
    """Seconds spent to measure one energy point (both helicities).

    Parameters
    ----------
    dwell
        Counting time per helicity (s).
    mono_speed
        Monochromator speed (eV/s).
    move_overhead
        Settling time of any move (s).
    pol_switch
        Time of one helicity switch (s); one per point when helicities alternate.
    """

    dwell: float = 1.0
    mono_speed: float = 5.0
    move_overhead: float = 0.3
    pol_switch: float = 1.0

    def __call__(self, energy: np.ndarray, current: float | None) -> np.ndarray:
        """Cost of measuring at each of ``energy`` starting from ``current``."""
        e = np.asarray(energy, dtype=float)
        travel = np.zeros_like(e) if current is None else np.abs(e - current) / self.mono_speed
        return 2 * self.dwell + self.pol_switch + self.move_overhead + travel


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
        self._last_refit = 0  # points in the data of the last (started) refit
        self._refit_thread: threading.Thread | None = None
        self._refit_result: tuple[int, XMCDGP | BaseException] | None = None
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
        n = self.n_points
        if self._last_refit == 0:
            return n >= max(4, self.n_init - 2)
        return n - self._last_refit >= max(2, int(np.ceil(self.refit_every * self._last_refit)))

    @property
    def refit_running(self) -> bool:
        """True while a background refit is in flight."""
        return self._refit_thread is not None and self._refit_thread.is_alive()

    def _start_refit(self) -> None:
        if self._refit_thread is not None:
            return  # one in flight at a time; the next one starts after it lands
        n = self.n_points
        d = self.data
        model = self.model.spawn()

        def work() -> None:
            try:
                model.fit(d["energy"], d["mu_plus"], d["mu_minus"], d["var_plus"],
                          d["var_minus"], refit=True)
                self._refit_result = (n, model)
            except BaseException as exc:  # handed to the decision thread, never lost
                self._refit_result = (n, exc)

        self._last_refit = n
        self._refit_thread = threading.Thread(target=work, name="smartbeam-gp-refit",
                                              daemon=True)
        self._refit_thread.start()

    def _adopt_refit(self, wait: bool) -> bool:
        """Install a finished background refit (waiting for it if ``wait``)."""
        t = self._refit_thread
        if t is None or (t.is_alive() and not wait):
            return False
        t.join()
        self._refit_thread = None
        _n, result = self._refit_result
        self._refit_result = None
        if isinstance(result, BaseException):
            raise result
        self.model = result
        return True

    def close(self, timeout: float | None = None) -> None:
        """Wait for a background refit in flight (it is a daemon thread either way)."""
        if self._refit_thread is not None:
            self._refit_thread.join(timeout)

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
            self.close()
            self._adopt_refit(wait=True)
            refit = force_refit or self._last_refit == 0 or self._refit_due()
            self.model.fit(*args, refit=refit)
            if refit:
                self._last_refit = n
            return refit
        first = self.model.functionals is None
        if first and self._refit_thread is None:
            self._start_refit()
        refit = self._adopt_refit(wait=first)
        self.model.fit(*args, refit=False)  # appends the points since the refit's snapshot
        if self._refit_due():
            self._start_refit()
        return refit

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
