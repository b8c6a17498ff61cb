"""Generic GP-adaptive 1-D scan: measure where a spectrum is uncertain, stop when known.

The same machinery as the XMCD scan (:mod:`smartbeam.analysis.acquisition`) for any
point spectroscopy without sum rules: a GP of one reading key along one motor, the next
position chosen to reduce the integrated posterior variance (or the variance of the
area) the most, a stopping rule on the posterior sd, hyperparameter refits off the
critical path. Every decision is written to a ``decisions`` stream of the same run.

Each point is a checkpointed unit (move, count, checkpoint after the save) and the GP is
told the values of the event actually emitted, so a suspension (IOC lost) rewinds and
replays only the interrupted point and the GP's points are the stored points (see
:mod:`smartbeam.plans.xmcd`).
"""

from __future__ import annotations

from collections.abc import Sequence

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.protocols import Movable, Readable

from ..analysis.acquisition import SPECTRUM_TARGETS, AdaptiveSpectrum, CostModel, StoppingRule
from ..errors import SmartbeamInputError
from .xmcd import DetectorNaNError, StoredReadings, _StreamSignals, _tapped

__all__ = ["gp_adaptive_scan"]


def _number(name: str, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise SmartbeamInputError(f"{name}={value!r}: expected a finite number")
    if positive and value <= 0:
        raise SmartbeamInputError(f"{name}={value!r}: expected a positive number")
    return float(value)


def _default_key(detectors) -> str:
    for det in detectors:
        fields = (getattr(det, "hints", None) or {}).get("fields") or []
        if fields:
            return fields[0]
    raise SmartbeamInputError("key=None and no detector hints a field: expected the "
                              "reading key of the signal to model")


def _variance(value: float, noise) -> float:
    if noise == "poisson":
        return max(abs(value), 1.0)  # counts: var = mean, floored so zeros keep a weight
    return float(noise) ** 2


def gp_adaptive_scan(detectors: Sequence[Readable], motor: Movable, start: float,
                     stop: float, *, key: str | None = None, target: str = "spectrum",
                     tol: float = 0.02, atol: float | None = None, max_points: int = 60,
                     n_init: int = 8, noise: str | float = "poisson",
                     dwell: float = 1.0, motor_speed: float | None = None,
                     sync_refits: bool = False, md: dict | None = None):
    """GP-adaptive 1-D scan of one signal that stops when the spectrum is known.

    A Gaussian process (Matern 5/2, per-point counting noise, hyperparameter refits in
    a background thread) models ``key`` against ``motor``. After a uniform initial
    design of ``n_init`` points, each next position is the one that most reduces the
    posterior variance of the target per second (exposure + move). The scan stops when
    the target's posterior sd is below ``tol`` (relative) or ``atol`` (absolute), or
    after ``max_points`` points.

    Parameters
    ----------
    detectors : list of Readable
        Detectors read at every point (into ``primary``).
    motor : Movable
        The scanned axis.
    start, stop : float
        Scan range in motor units; start < stop.
    key : str, optional
        Reading key of the modelled signal (default: the first hinted field of the
        detectors).
    target : str
        'spectrum' (integrated posterior variance; the stopping statistic is the rms
        posterior sd relative to the range of the signal) or 'area' (the integral of
        the signal over [start, stop]).
    tol : float
        Relative tolerance of the stopping rule (> 0).
    atol : float, optional
        Absolute tolerance on the target's posterior sd.
    max_points : int
        Point budget (>= n_init).
    n_init : int
        Points of the initial uniform design (>= 4).
    noise : str or float
        'poisson' (variance = counts) or the constant noise sd of the signal.
    dwell : float
        Seconds per exposure, used only to weigh moves against counting.
    motor_speed : float, optional
        Motor speed (units/s) for the move cost; None: moves cost a fixed overhead.
    sync_refits : bool
        True: refit hyperparameters inline (reproducible). False (default): in a
        background thread, so no decision waits for a refit.
    md : dict, optional
        Extra run metadata.
    """
    start = _number("start", start)
    stop = _number("stop", stop)
    if not start < stop:
        raise SmartbeamInputError(f"start={start!r} >= stop={stop!r}: expected start < stop")
    tol = _number("tol", tol, positive=True)
    if atol is not None:
        atol = _number("atol", atol, positive=True)
    dwell = _number("dwell", dwell, positive=True)
    if motor_speed is not None:
        motor_speed = _number("motor_speed", motor_speed, positive=True)
    for name, v in (("max_points", max_points), ("n_init", n_init)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise SmartbeamInputError(f"{name}={v!r}: expected an integer")
    if target not in SPECTRUM_TARGETS:
        raise SmartbeamInputError(f"target={target!r}: expected one of {SPECTRUM_TARGETS}")
    if noise != "poisson":
        if isinstance(noise, str):
            raise SmartbeamInputError(f"noise={noise!r}: expected 'poisson' or a noise sd")
        _number("noise", noise, positive=True)
    detectors = list(detectors)
    if not detectors:
        raise SmartbeamInputError("detectors=[]: expected at least one detector")
    key = key or _default_key(detectors)
    described = {}
    for det in detectors:
        described.update(det.describe())
    if key not in described:
        raise SmartbeamInputError(f"key={key!r}: expected one of the detectors' reading keys "
                                  f"{sorted(described)}")
    limits = getattr(motor, "limits", None)
    if limits is not None and tuple(limits) != (0, 0) and limits[0] < limits[1]:
        if start < limits[0] or stop > limits[1]:
            raise SmartbeamInputError(f"scan range [{start}, {stop}]: expected it inside the "
                                      f"motor limits [{limits[0]}, {limits[1]}]")
    # Raises SmartbeamInputError for max_points < n_init, n_init < 4, before the run opens.
    scanner = AdaptiveSpectrum(start, stop, target=target, n_init=n_init,
                               stopping=StoppingRule(rtol=tol, atol=atol,
                                                     max_points=max_points,
                                                     min_points=n_init + 2),
                               cost=CostModel(dwell=dwell, mono_speed=motor_speed or np.inf,
                                              pol_switch=0.0, exposures=1),
                               sync_refits=bool(sync_refits))
    example = {"position": 0.0, "acquisition": 0.0, "n_points": 0, "value": 0.0, "sd": 0.0,
               "rms_sd": 0.0, "range": 0.0, "length": 0.0, "amplitude": 0.0, "refit": False,
               "refit_pending": False, "latency_ms": 0.0, "stop_reason": ""}
    decisions = _StreamSignals("decision_", example)
    tap = StoredReadings("primary")
    motor_name = getattr(motor, "name", str(motor))
    _md = {"plan_name": "gp_adaptive_scan", "motors": [motor_name],
           "detectors": [getattr(d, "name", str(d)) for d in detectors],
           "plan_args": {"start": start, "stop": stop, "key": key, "target": target,
                         "tol": tol, "atol": atol, "max_points": max_points, "n_init": n_init,
                         "noise": noise, "dwell": dwell, "motor_speed": motor_speed,
                         "sync_refits": sync_refits},
           "hints": {"dimensions": [([motor_name], "primary")]}}
    _md.update(md or {})

    def measure(x):
        for _attempt in range(2):
            # a suspension rewinds to here: the move is replayed with the count
            yield from bps.checkpoint()
            yield from bps.mv(motor, float(x))
            before = tap.n_events
            reading = yield from bps.trigger_and_read(detectors + [motor], name="primary")
            yield from bps.checkpoint()
            data = tap.take(before, {k: v["value"] for k, v in (reading or {}).items()})
            y = float(data.get(key, np.nan))
            if np.isfinite(y):
                scanner.tell(float(x), y, _variance(y, noise))
                return
        row = dict(example, position=float(x), acquisition=float("nan"),
                   n_points=scanner.n_points,
                   stop_reason=f"detector returned NaN twice at {float(x):.6g}")
        yield from decisions.write(row, "decisions")
        raise DetectorNaNError(f"{row['stop_reason']} (re-measured once); the scan stopped "
                               f"after {scanner.n_points} points, all of them written")

    @bpp.stage_decorator(detectors + [motor])
    @bpp.run_decorator(md=_md)
    def inner():
        for x in scanner.initial_design():
            yield from measure(x)
        current = None
        while True:
            d = scanner.ask(current)
            st, hp = d.moments, d.hyperparameters
            yield from decisions.write({
                "position": d.energy if not d.stop else float("nan"),
                "acquisition": d.acquisition, "n_points": d.n_points, "value": st["value"],
                "sd": st["sd"], "rms_sd": st["rms_sd"], "range": st["range"],
                "length": hp["length"], "amplitude": hp["amplitude"], "refit": bool(d.refit),
                "refit_pending": bool(d.refit_pending), "latency_ms": d.latency_ms,
                "stop_reason": d.reason}, "decisions")
            if d.stop:
                break
            current = d.energy
            yield from measure(current)

    return (yield from _tapped(inner(), tap))
