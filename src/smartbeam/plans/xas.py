"""XAS energy scan for a 10Dq estimate: one polarisation, a uniform energy grid.

The plan only measures; the estimate is made by
:class:`smartbeam.callbacks.tendq.TenDqEstimator` in the session's callback chain, which
reads the ``tendq`` entry of the start document (ion, energy/intensity/I0 keys) and writes
an ``analysis`` stream into the same run before it closes.
"""

from __future__ import annotations

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.protocols import Readable

from ..analysis.library import parse_ion
from ..errors import SmartbeamInputError

__all__ = ["xas_tendq_scan", "tendq_metadata"]

POLARISATION_MODES = ("circ+", "circ-", "linear")


def tendq_metadata(endstation, ion: str = "Mn2+", **options) -> dict:
    """The ``tendq`` start-document entry the estimator configures itself from.

    Parameters
    ----------
    endstation
        Device with ``energy``, ``tey`` and ``i0`` components (keys taken from their names).
    ion
        Ion of the multiplet library, e.g. ``"Mn2+"``.
    **options
        Extra estimator options written as given (``measure``, ``offset_range``).

    Returns
    -------
    dict
        ``{"ion", "energy_key", "intensity_key", "i0_key", ...}``.
    """
    parse_ion(ion)
    return {"ion": ion, "energy_key": endstation.energy.name,
            "intensity_key": endstation.tey.name, "i0_key": endstation.i0.name, **options}


def _check_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise SmartbeamInputError(f"{name}={value!r}: expected a finite number")
    return float(value)


def _check_window(ion: str, e_min: float, e_max: float) -> None:
    """Refuse a window that misses the L2,3 edge of a library already on this machine."""
    from ..analysis.library import LibraryParams
    from ..library_store import get_library

    try:
        lib = get_library(LibraryParams(ion=ion), compute=False, progress=False)
    except SmartbeamInputError:
        return  # library not built yet: the estimator will say so at the end of the run
    mean = lib.spectra.mean(axis=0)
    above = lib.energy[mean > 0.02 * mean.max()]
    lo, hi = float(above[0]), float(above[-1])
    if e_min > lo or e_max < hi:
        raise SmartbeamInputError(
            f"scan window [{e_min}, {e_max}] eV misses the {ion} L2,3 edge: expected it to "
            f"cover {lo:.1f}-{hi:.1f} eV (plus margin for background and offset)")


def xas_tendq_scan(endstation: Readable, e_min: float, e_max: float, *, num: int = 181,
                   dwell: float = 0.5, polarisation: str = "linear", ion: str = "Mn2+",
                   md: dict | None = None):
    """L2,3 XAS on a uniform energy grid, with the 10Dq estimate written into the run.

    The start document carries ``tendq: {"ion", "energy_key", "intensity_key",
    "i0_key"}``; the session's ``TenDqEstimator`` uses it to compare ``tey / i0`` with the
    ion's multiplet library and writes an ``analysis`` stream (10Dq, uncertainty, offset,
    per-measure estimates, flags, rejection score) into the same run.

    Parameters
    ----------
    endstation : Readable
        XAS end station with ``energy``, ``pol.mode``, ``dwell``, ``i0``, ``tey``.
    e_min, e_max : float
        Scan window in eV; e_min < e_max, inside the monochromator limits. It must cover
        the L2,3 edge with a few eV of pre- and post-edge for the background.
    num : int
        Number of energies (>= 10).
    dwell : float
        Counting time per point (s).
    polarisation : str
        EPU mode: 'linear', 'circ+' or 'circ-' (an isotropic spectrum needs no helicity).
    ion : str
        Ion of the multiplet library, e.g. 'Mn2+', 'Ni2+', 'Fe3+'.
    md : dict, optional
        Extra run metadata; a ``tendq`` dict in it adds or overrides estimator options.
    """
    e_min = _check_number("e_min", e_min)
    e_max = _check_number("e_max", e_max)
    dwell = _check_number("dwell", dwell)
    if not e_min < e_max:
        raise SmartbeamInputError(f"e_min={e_min!r} >= e_max={e_max!r}: expected e_min < e_max")
    if dwell <= 0:
        raise SmartbeamInputError(f"dwell={dwell!r}: expected a positive counting time (s)")
    if isinstance(num, bool) or not isinstance(num, int) or num < 10:
        raise SmartbeamInputError(f"num={num!r}: expected an integer >= 10")
    if polarisation not in POLARISATION_MODES:
        raise SmartbeamInputError(f"polarisation={polarisation!r}: expected one of "
                                  f"{POLARISATION_MODES}")
    parse_ion(ion)
    limits = getattr(endstation.energy, "limits", None)
    if limits is not None and tuple(limits) != (0, 0):
        lo, hi = limits
        if e_min < lo or e_max > hi:
            raise SmartbeamInputError(f"scan window [{e_min}, {e_max}] eV: expected it inside "
                                      f"the monochromator limits [{lo}, {hi}] eV")
    _check_window(ion, e_min, e_max)

    md = dict(md or {})
    tendq = tendq_metadata(endstation, ion)
    tendq.update(md.pop("tendq", None) or {})
    grid = np.linspace(e_min, e_max, num)
    _md = {"plan_name": "xas_tendq_scan", "motors": [endstation.energy.name],
           "detectors": [endstation.name], "num_points": num, "num_intervals": num - 1,
           "plan_args": {"e_min": e_min, "e_max": e_max, "num": num, "dwell": dwell,
                         "polarisation": polarisation, "ion": ion},
           "polarisation": polarisation, "tendq": tendq,
           "hints": {"dimensions": [([endstation.energy.name], "primary")]}}
    _md.update(md)

    @bpp.stage_decorator([endstation])
    @bpp.run_decorator(md=_md)
    def inner():
        yield from bps.mv(endstation.dwell, dwell, endstation.pol.mode, polarisation)
        for e in grid:
            yield from bps.mv(endstation.energy, float(e))
            yield from bps.trigger_and_read([endstation], name="primary")

    return (yield from inner())
