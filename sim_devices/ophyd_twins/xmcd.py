"""In-process ophyd twin of the XMCD end station (no EPICS).

Same component names as :class:`smartbeam.devices` ``XMCDEndstation``: ``energy``
(positioner with ``setpoint``/``readback``/``done``/``limits``), ``pol.mode``, ``field``,
``dwell``, ``i0``, ``tey``, ``tfy``. ``trigger()`` counts for ``dwell`` seconds of
simulated time at the current energy and polarisation (it returns at once).
"""

from __future__ import annotations

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Kind, Signal
from ophyd.status import DeviceStatus
from ophyd.utils import LimitError

from sim_devices.physics.xmcd import XMCDSample

__all__ = ["POLARISATION_MODES", "SimXMCDEndstation"]

POLARISATION_MODES = ("circ+", "circ-", "linear")
_HELICITY = {"circ+": 1, "circ-": -1, "linear": 0}


class _ModeSignal(Signal):
    """A string signal that refuses anything but the EPU modes."""

    def check_value(self, value):
        if value not in POLARISATION_MODES:
            raise ValueError(f"polarisation mode {value!r}: expected one of {POLARISATION_MODES}")


class _SoftEnergy(Device):
    """Setpoint/readback/done positioner with limits, moving instantly."""

    setpoint = Cpt(Signal, value=700.0, kind=Kind.normal)
    readback = Cpt(Signal, value=700.0, kind=Kind.hinted)
    done = Cpt(Signal, value=1, kind=Kind.omitted)

    def __init__(self, *args, limits=(600.0, 900.0), **kwargs):
        super().__init__(*args, **kwargs)
        self._limits = (float(limits[0]), float(limits[1]))
        # The readback carries the positioner's own name, as the EPICS class does.
        self.readback.name = self.name

    @property
    def limits(self) -> tuple[float, float]:
        """(low, high) in eV."""
        return self._limits

    @property
    def position(self) -> float:
        """Current energy (eV)."""
        return self.readback.get()

    @property
    def egu(self) -> str:
        return "eV"

    def check_value(self, value: float) -> None:
        """Refuse energies outside the limits."""
        lo, hi = self._limits
        if not (np.isfinite(value) and lo <= value <= hi):
            raise LimitError(f"energy {value!r} eV outside the limits [{lo}, {hi}]")

    def set(self, value: float, **kwargs) -> DeviceStatus:
        """Move (instantly) to ``value`` eV."""
        self.check_value(value)
        self.done.put(0)
        self.setpoint.put(float(value))
        self.readback.put(float(value))
        self.done.put(1)
        st = DeviceStatus(self)
        st.set_finished()
        return st

    def move(self, value: float, wait: bool = True, **kwargs) -> DeviceStatus:
        """Same as :meth:`set`."""
        return self.set(value)

    def stop(self, *, success: bool = False) -> None:
        """Nothing to stop: moves are instantaneous."""


class _EPU(Device):
    mode = Cpt(_ModeSignal, value="circ+", kind=Kind.normal)


class SimXMCDEndstation(Device):
    """In-process XMCD end station backed by an :class:`XMCDSample`.

    Parameters
    ----------
    sample
        The simulated sample.
    name
        Device name (reading keys are ``f"{name}_energy"``, ``f"{name}_tey"`` ...).
    rng
        Random generator for counting noise (a fresh default one if omitted).
    energy_limits
        Monochromator limits (eV).
    """

    energy = Cpt(_SoftEnergy, "", kind=Kind.hinted)
    pol = Cpt(_EPU, "", kind=Kind.normal)
    field = Cpt(Signal, value=1.0, kind=Kind.config)
    dwell = Cpt(Signal, value=1.0, kind=Kind.config)
    i0 = Cpt(Signal, value=0.0, kind=Kind.hinted)
    tey = Cpt(Signal, value=0.0, kind=Kind.hinted)
    tfy = Cpt(Signal, value=0.0, kind=Kind.normal)

    def __init__(self, sample: XMCDSample, name: str = "xmcd",
                 rng: np.random.Generator | None = None,
                 energy_limits: tuple[float, float] = (600.0, 900.0), **kwargs) -> None:
        super().__init__("", name=name, **kwargs)
        self.sample = sample
        self.rng = rng if rng is not None else np.random.default_rng()
        self.energy._limits = (float(energy_limits[0]), float(energy_limits[1]))
        self.nan_next = 0  # test hook: the next N triggers return NaN counts
        self.n_triggers = 0

    def trigger(self) -> DeviceStatus:
        """Count for ``dwell`` at the current energy and polarisation."""
        e = float(self.energy.readback.get())
        mode = self.pol.mode.get()
        # Reversing the field reverses the magnetisation, i.e. the dichroism.
        sign = -1 if self.field.get() < 0 else 1
        h = _HELICITY[mode] * sign
        counts = self.sample.measure(np.array([e]), h, float(self.dwell.get()), self.rng)
        self.n_triggers += 1
        if self.nan_next > 0:
            self.nan_next -= 1
            self.i0.put(float("nan"))
            self.tey.put(float("nan"))
            self.tfy.put(float("nan"))
        else:
            self.i0.put(float(counts["i0"][0]))
            self.tey.put(float(counts["tey"][0]))
            self.tfy.put(float(counts["tfy"][0]))
        st = DeviceStatus(self)
        st.set_finished()
        return st
