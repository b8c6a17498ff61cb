"""XMCD energy-scan plans: GP-adaptive (stops when the moments are known) and dense.

Both plans measure mu+ and mu- (``circ+`` and ``circ-``) at each energy and write, in
the same run, the raw ``primary`` readings, a ``moments`` stream with the sum-rule
result and (adaptive scan) a ``decisions`` stream with every choice the GP made. The GP
loop runs inside the plan, between moves; a decision adds the new point to the GP
incrementally (milliseconds) and hyperparameter refits run in a background thread
(``sync_refits=False``), so the RunEngine is never blocked for long.
"""

from __future__ import annotations

from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.protocols import Readable
from ophyd import Signal

from ..analysis.acquisition import STRATEGIES, TARGETS, AdaptiveXMCD, CostModel, StoppingRule
from ..analysis.sumrules import sum_rules
from ..errors import SmartbeamError, SmartbeamInputError

__all__ = ["DetectorNaNError", "StoredReadings", "xmcd_adaptive_scan", "xmcd_dense_scan"]

POLARISATION_MODES = ("circ+", "circ-", "linear")


class DetectorNaNError(SmartbeamError, RuntimeError):
    """The detector returned NaN twice at the same point; the scan stopped."""


def _validate_common(endstation, e_min, e_max, dwell, n_h, polarisations):
    for name, v in (("e_min", e_min), ("e_max", e_max), ("dwell", dwell), ("n_h", n_h)):
        if not isinstance(v, int | float) or not np.isfinite(v):
            raise SmartbeamInputError(f"{name}={v!r}: expected a finite number")
    if not e_min < e_max:
        raise SmartbeamInputError(f"e_min={e_min!r} >= e_max={e_max!r}: expected e_min < e_max")
    if dwell <= 0:
        raise SmartbeamInputError(f"dwell={dwell!r}: expected a positive counting time (s)")
    if n_h <= 0:
        raise SmartbeamInputError(f"n_h={n_h!r}: expected a positive number of 3d holes")
    pols = list(polarisations)
    for p in pols:
        if p not in POLARISATION_MODES:
            raise SmartbeamInputError(f"polarisation mode {p!r}: expected one of "
                                      f"{POLARISATION_MODES}")
    if sorted(pols) != ["circ+", "circ-"]:
        raise SmartbeamInputError(f"polarisations={pols!r}: XMCD needs exactly 'circ+' and "
                                  "'circ-'")
    limits = getattr(endstation.energy, "limits", None)
    if limits is not None and tuple(limits) != (0, 0):
        lo, hi = limits
        if e_min < lo or e_max > hi:
            raise SmartbeamInputError(f"scan window [{e_min}, {e_max}] eV: expected it inside "
                                      f"the monochromator limits [{lo}, {hi}] eV")
    return pols


def _mu_from(data: dict, endstation) -> tuple[float, float]:
    """mu = tey / i0 and its Poisson variance from one event's data."""
    i0 = float(data.get(endstation.i0.name, np.nan))
    tey = float(data.get(endstation.tey.name, np.nan))
    if not (np.isfinite(i0) and np.isfinite(tey)) or i0 <= 0:
        return float("nan"), float("nan")
    mu = tey / i0
    return mu, mu**2 * (1.0 / max(tey, 1.0) + 1.0 / i0)


class StoredReadings:
    """Document callback keeping the data of the last event emitted in one stream.

    After a suspension the RunEngine replays the messages since the last checkpoint and
    the plan never sees the replayed ``read`` results (it gets ``None`` for the message
    that was interrupted); the emitted event is what is stored. Plans subscribe this
    (see :func:`_tapped`) and use :meth:`take` instead of ``trigger_and_read``'s return.

    Parameters
    ----------
    stream
        Name of the stream to follow.
    """

    def __init__(self, stream: str = "primary") -> None:
        self.stream = stream
        self._descriptors: set[str] = set()
        self.n_events = 0
        self.last: dict[str, Any] | None = None

    def __call__(self, name: str, doc: dict) -> None:
        if name == "descriptor" and doc.get("name") == self.stream:
            self._descriptors.add(doc["uid"])
        elif name == "event" and doc.get("descriptor") in self._descriptors:
            self.n_events += 1
            self.last = dict(doc["data"])
        elif name == "event_page" and doc.get("descriptor") in self._descriptors:
            n = len(doc.get("seq_num", []))
            if n:
                self.n_events += n
                self.last = {k: v[-1] for k, v in doc["data"].items()}

    def take(self, since: int, fallback: dict[str, Any]) -> dict[str, Any]:
        """Data of the last event if one was emitted after the count ``since``, else
        ``fallback`` (the plan's own reading: nothing subscribed, e.g. a dry run).

        Parameters
        ----------
        since
            :attr:`n_events` before the measurement.
        fallback
            ``{key: value}`` from the plan's reading.
        """
        if self.n_events > since and self.last is not None:
            return self.last
        return fallback


def _tapped(plan, tap: StoredReadings):
    """Run ``plan`` with ``tap`` subscribed to the RunEngine's documents.

    Parameters
    ----------
    plan
        The plan (generator) to wrap; subscribe before it opens its run.
    tap
        The callback that records emitted events.
    """
    token = yield from bps.subscribe("all", tap)
    return (yield from bpp.finalize_wrapper(plan, bps.unsubscribe(token)))


def _measure_one(endstation, energy, mode, tap: StoredReadings):
    """One helicity at one energy as a checkpointed unit; returns the stored event's data.

    A suspension rewinds to the first checkpoint and replays the move of energy and
    polarisation too (a restarted IOC comes up at its defaults); the checkpoint after
    the count means the saved event is never replayed.
    """
    yield from bps.checkpoint()
    yield from bps.mv(endstation.energy, energy)
    yield from bps.mv(endstation.pol.mode, mode)
    before = tap.n_events
    reading = yield from bps.trigger_and_read([endstation], name="primary")
    yield from bps.checkpoint()
    return tap.take(before, {k: v["value"] for k, v in (reading or {}).items()})


def _measure_pair(endstation, energy, order, tap: StoredReadings):
    """Count both helicities in ``order`` at ``energy``; one re-measure on NaN."""
    out = {}
    for mode in order:
        for _attempt in range(2):
            data = yield from _measure_one(endstation, energy, mode, tap)
            mu, var = _mu_from(data, endstation)
            if np.isfinite(mu):
                break
        out[mode] = (mu, var)
    return out


class _StreamSignals:
    """Soft signals read with ``trigger_and_read`` to write a derived stream."""

    def __init__(self, prefix: str, example: dict[str, Any]) -> None:
        self.signals = {k: Signal(name=f"{prefix}{k}", value=v) for k, v in example.items()}

    def write(self, values: dict[str, Any], stream: str):
        for k, v in values.items():
            self.signals[k].put(v)
        yield from bps.trigger_and_read(list(self.signals.values()), name=stream)
        # a later suspension must not replay (repeat) this row
        yield from bps.checkpoint()


def _moments_row(m: dict, n_points: int, dwell_total: float, reason: str) -> dict:
    return {"m_orb": float(m.get("m_orb", np.nan)), "m_orb_sd": float(m.get("m_orb_sd", np.nan)),
            "m_spin": float(m.get("m_spin", np.nan)),
            "m_spin_sd": float(m.get("m_spin_sd", np.nan)),
            "ratio": float(m.get("ratio", np.nan)), "p": float(m.get("p", np.nan)),
            "q": float(m.get("q", np.nan)), "r": float(m.get("r", np.nan)),
            "e_l3": float(m.get("e_l3", np.nan)), "e_l2": float(m.get("e_l2", np.nan)),
            "n_points": int(n_points), "total_dwell": float(dwell_total),
            "stop_reason": str(reason)}


def xmcd_adaptive_scan(endstation: Readable, e_min: float, e_max: float, *,
                       edges: list[float] | None = None, n_h: float = 3.39,
                       tol: float = 0.02, atol: float | None = None, max_points: int = 60,
                       n_init: int = 12, dwell: float = 1.0, target: str = "m_orb",
                       strategy: str = "smartbeam",
                       polarisations: list[str] | None = None,
                       sync_refits: bool = False, mono_speed: float = 20.0,
                       md: dict | None = None):
    """GP-adaptive XMCD scan that stops when the orbital/spin moment is known.

    At each step a Gaussian process of mu+ + mu- and mu+ - mu- (input-warped around the
    edges, heteroscedastic counting noise, scheduled hyperparameter refits) gives the
    posterior of the sum-rule moments; the next energy is the one that most reduces the
    posterior variance of the target per second of beam time (travel + dwell). The scan
    stops when the target's posterior sd is below ``tol`` (relative) or ``atol``
    (absolute), or after ``max_points`` energies.

    Parameters
    ----------
    endstation : Readable
        XMCD end station with ``energy``, ``pol.mode``, ``dwell``, ``i0``, ``tey``.
    e_min, e_max : float
        Scan window in eV (pre-edge to post-edge); e_min < e_max.
    edges : list of float, optional
        Tabulated [L3, L2] white-line energies (eV), used only as a search hint.
    n_h : float
        Number of 3d holes for the sum rules.
    tol : float
        Relative tolerance on the target's posterior sd (e.g. 0.02 = 2 %).
    atol : float, optional
        Absolute tolerance on the target's posterior sd (mu_B).
    max_points : int
        Budget of energies (each measured with both helicities); >= n_init.
    n_init : int
        Points of the initial uniform design.
    dwell : float
        Counting time per helicity and point (s).
    target : str
        'm_orb', 'm_spin', 'moments' or 'spectrum'.
    strategy : str
        'smartbeam' (target variance per cost) or 'max_variance' (baseline).
    polarisations : list of str, optional
        Order of helicities at a point, default ['circ+', 'circ-'] (alternated between
        points to save EPU switches).
    sync_refits : bool
        False (default): hyperparameter refits run in a background thread while the
        scan goes on, and decisions use the previous hyperparameters until a refit
        lands, so no decision waits for a refit. True: refits inline (reproducible for
        a given noise sequence, slower decisions).
    mono_speed : float
        Monochromator (and gap) speed in eV/s used by the cost of a move; default 20 eV/s
        (see :class:`~smartbeam.analysis.acquisition.CostModel`).
    md : dict, optional
        Extra run metadata.
    """
    pols = _validate_common(endstation, e_min, e_max, dwell, n_h,
                            polarisations or ["circ+", "circ-"])
    if not isinstance(tol, int | float) or not np.isfinite(tol) or tol <= 0:
        raise SmartbeamInputError(f"tol={tol!r}: expected a positive relative tolerance")
    if atol is not None and not (np.isfinite(atol) and atol > 0):
        raise SmartbeamInputError(f"atol={atol!r}: expected a positive tolerance or None")
    if not isinstance(max_points, int) or not isinstance(n_init, int):
        raise SmartbeamInputError(f"max_points={max_points!r}, n_init={n_init!r}: expected "
                                  "integers")
    if target not in TARGETS:
        raise SmartbeamInputError(f"target={target!r}: expected one of {TARGETS}")
    if isinstance(mono_speed, bool) or not isinstance(mono_speed, int | float) or not (
            mono_speed > 0):
        raise SmartbeamInputError(f"mono_speed={mono_speed!r}: expected a positive speed "
                                  "in eV/s")
    if strategy not in STRATEGIES:
        raise SmartbeamInputError(f"strategy={strategy!r}: expected one of {STRATEGIES}")
    if edges is not None and len(edges) != 2:
        raise SmartbeamInputError(f"edges={edges!r}: expected [L3, L2] in eV")
    # Raises SmartbeamInputError for max_points < n_init etc. before the run opens.
    scanner = AdaptiveXMCD(float(e_min), float(e_max), float(n_h),
                           edges=tuple(edges) if edges is not None else None,
                           strategy=strategy, target=target, n_init=n_init,
                           stopping=StoppingRule(rtol=float(tol), atol=atol,
                                                 max_points=max_points,
                                                 min_points=n_init + 4),
                           cost=CostModel(dwell=float(dwell), mono_speed=float(mono_speed)),
                           sync_refits=bool(sync_refits))
    dec_example = {"energy": 0.0, "acquisition": 0.0, "n_points": 0, "m_orb": 0.0,
                   "m_orb_sd": 0.0, "m_spin": 0.0, "m_spin_sd": 0.0, "refit": False,
                   "latency_ms": 0.0, "refit_pending": False, "s_length": 0.0, "s_warp": 0.0, "d_length": 0.0,
                   "d_warp": 0.0, "e_l3": 0.0, "e_l2": 0.0, "stop_reason": ""}
    decisions = _StreamSignals("decision_", dec_example)
    moments = _StreamSignals("moments_", _moments_row({}, 0, 0.0, ""))
    tap = StoredReadings("primary")
    _md = {"plan_name": "xmcd_adaptive_scan", "motors": [endstation.energy.name],
           "plan_args": {"e_min": e_min, "e_max": e_max, "edges": edges, "n_h": n_h, "tol": tol,
                         "atol": atol, "max_points": max_points, "n_init": n_init,
                         "dwell": dwell, "target": target, "strategy": strategy,
                         "sync_refits": sync_refits, "mono_speed": mono_speed},
           "hints": {"dimensions": [([endstation.energy.name], "primary")]}}
    _md.update(md or {})

    @bpp.stage_decorator([endstation])
    @bpp.run_decorator(md=_md)
    def inner():
        yield from bps.mv(endstation.dwell, dwell)
        order = list(pols)
        energy = None
        decision = None
        for e in scanner.initial_design():
            yield from _measure_into(e, order)
            order.reverse()
        while True:
            decision = scanner.ask(energy)
            m, h = decision.moments, decision.hyperparameters
            yield from decisions.write({
                "energy": decision.energy if not decision.stop else float("nan"),
                "acquisition": decision.acquisition, "n_points": decision.n_points,
                "m_orb": m["m_orb"], "m_orb_sd": m["m_orb_sd"], "m_spin": m["m_spin"],
                "m_spin_sd": m["m_spin_sd"], "refit": bool(decision.refit),
                "latency_ms": decision.latency_ms,
                "refit_pending": bool(decision.refit_pending), "s_length": h["s_length"],
                "s_warp": h["s_warp"], "d_length": h["d_length"], "d_warp": h["d_warp"],
                "e_l3": m["e_l3"], "e_l2": m["e_l2"], "stop_reason": decision.reason},
                "decisions")
            if decision.stop:
                break
            energy = decision.energy
            yield from _measure_into(energy, order)
            order.reverse()
        yield from moments.write(_moments_row(decision.moments, scanner.n_points,
                                              2 * dwell * scanner.n_points, decision.reason),
                                 "moments")

    def _measure_into(e, order):
        res = yield from _measure_pair(endstation, float(e), order, tap)
        (mp, vp), (mm, vm) = res["circ+"], res["circ-"]
        if not (np.isfinite(mp) and np.isfinite(mm)):
            reason = f"detector returned NaN twice at {float(e):.3f} eV"
            last = scanner.history[-1] if scanner.history else {}
            row = dict(dec_example, energy=float(e), acquisition=float("nan"),
                       n_points=scanner.n_points, stop_reason=reason,
                       m_orb=float(last.get("m_orb", np.nan)),
                       m_orb_sd=float(last.get("m_orb_sd", np.nan)),
                       m_spin=float(last.get("m_spin", np.nan)),
                       m_spin_sd=float(last.get("m_spin_sd", np.nan)))
            yield from decisions.write(row, "decisions")
            raise DetectorNaNError(f"{reason} (re-measured once); the scan stopped after "
                                   f"{scanner.n_points} points, all of them written")
        scanner.tell(float(e), mp, mm, vp, vm)

    # A refit still in flight when the scan ends is a daemon thread working on its own
    # copy of the model: it finishes (bounded by WarpedGP.max_fit_points) and is dropped.
    return (yield from _tapped(inner(), tap))


def xmcd_dense_scan(endstation: Readable, e_min: float, e_max: float, *, num: int = 201,
                    dwell: float = 1.0, n_h: float = 3.39, edges: list[float] | None = None,
                    polarisations: list[str] | None = None, md: dict | None = None):
    """Conventional XMCD scan: both helicities on a uniform grid, then the sum rules.

    Parameters
    ----------
    endstation : Readable
        XMCD end station with ``energy``, ``pol.mode``, ``dwell``, ``i0``, ``tey``.
    e_min, e_max : float
        Scan window in eV; e_min < e_max.
    num : int
        Number of energies (>= 5).
    dwell : float
        Counting time per helicity and point (s).
    n_h : float
        Number of 3d holes for the sum rules.
    edges : list of float, optional
        Tabulated [L3, L2] energies, a hint for locating the white lines.
    polarisations : list of str, optional
        Helicity order at a point, default ['circ+', 'circ-'] (alternated).
    md : dict, optional
        Extra run metadata.
    """
    pols = _validate_common(endstation, e_min, e_max, dwell, n_h,
                            polarisations or ["circ+", "circ-"])
    if not isinstance(num, int) or num < 5:
        raise SmartbeamInputError(f"num={num!r}: expected an integer >= 5")
    moments = _StreamSignals("moments_", _moments_row({}, 0, 0.0, ""))
    tap = StoredReadings("primary")
    grid = np.linspace(e_min, e_max, num)
    _md = {"plan_name": "xmcd_dense_scan", "motors": [endstation.energy.name],
           "plan_args": {"e_min": e_min, "e_max": e_max, "num": num, "dwell": dwell,
                         "n_h": n_h, "edges": edges},
           "hints": {"dimensions": [([endstation.energy.name], "primary")]}}
    _md.update(md or {})

    @bpp.stage_decorator([endstation])
    @bpp.run_decorator(md=_md)
    def inner():
        yield from bps.mv(endstation.dwell, dwell)
        order = list(pols)
        mp, mm = [], []
        for e in grid:
            res = yield from _measure_pair(endstation, float(e), order, tap)
            order.reverse()
            mp.append(res["circ+"][0])
            mm.append(res["circ-"][0])
        mp, mm = np.array(mp), np.array(mm)
        ok = np.isfinite(mp) & np.isfinite(mm)
        reason = "dense scan complete" if ok.all() else f"{(~ok).sum()} NaN points dropped"
        try:
            res = sum_rules(grid[ok], mp[ok], mm[ok], n_h,
                            edge_hint=tuple(edges) if edges is not None else None)
            m = {"m_orb": res.m_orb, "m_spin": res.m_spin, "ratio": res.ratio, "p": res.p,
                 "q": res.q, "r": res.r, "e_l3": res.e_l3, "e_l2": res.e_l2}
        except SmartbeamInputError as exc:
            m, reason = {}, f"sum rules failed: {exc}"
        yield from moments.write(_moments_row(m, int(ok.sum()), 2 * dwell * num, reason),
                                 "moments")

    return (yield from _tapped(inner(), tap))
