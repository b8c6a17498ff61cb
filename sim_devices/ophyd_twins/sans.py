"""In-process ophyd twin of the SANS area detector (no EPICS).

Same component names as ``smartbeam.devices`` ``SANSDetector``: ``acquire_time``,
``image`` (int32 frame, dims ``(f"{name}_y", f"{name}_x")``), ``total_counts``,
``array_counter``, ``shutter`` ("open"/"closed") and ``attenuator``. ``trigger()`` draws one
Poisson frame of ``acquire_time`` seconds from a :class:`SANSSample` (simulated time: it
returns a finished status at once). With the shutter closed the frame is empty.
"""

from __future__ import annotations

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Kind, Signal
from ophyd.status import DeviceStatus

from sim_devices.physics.sans import SANSSample

__all__ = ["SimSANSDetector"]

SHUTTER_STATES = ("open", "closed")


class _ImageSignal(Signal):
    """Array signal that describes itself with shape, numpy dtype and named dims."""

    def describe(self):
        desc = super().describe()
        value = np.asarray(self.get())
        desc[self.name].update({"dtype": "array", "shape": list(value.shape),
                                "dtype_numpy": value.dtype.str,
                                "dims": [f"{self.parent.name}_y", f"{self.parent.name}_x"]})
        return desc


class _ShutterSignal(Signal):
    def check_value(self, value):
        if value not in SHUTTER_STATES:
            raise ValueError(f"shutter state {value!r}: expected one of {SHUTTER_STATES}")


class _FractionSignal(Signal):
    def check_value(self, value):
        if not (0.0 <= float(value) <= 1.0):
            raise ValueError(f"attenuator transmission {value!r}: expected a factor in [0, 1]")


class _TimeSignal(Signal):
    def check_value(self, value):
        if not (np.isfinite(float(value)) and float(value) > 0):
            raise ValueError(f"acquire_time {value!r}: expected a time > 0 s")


class SimSANSDetector(Device):
    """Simulated SANS detector backed by a :class:`SANSSample`.

    Parameters
    ----------
    sample
        Ground-truth sample physics (shape, mask, beam centre, count rate).
    name
        Device name; reading keys are ``f"{name}_image"`` etc.
    rng
        Random generator for the Poisson draws (seeded for reproducible tests).
    """

    acquire_time = Cpt(_TimeSignal, value=1.0, kind=Kind.config)
    image = Cpt(_ImageSignal, value=np.zeros((1, 1), np.int32), kind=Kind.normal)
    total_counts = Cpt(Signal, value=0, kind=Kind.hinted)
    array_counter = Cpt(Signal, value=0, kind=Kind.normal)
    shutter = Cpt(_ShutterSignal, value="closed", kind=Kind.config)
    attenuator = Cpt(_FractionSignal, value=1.0, kind=Kind.config)

    def __init__(self, sample: SANSSample, name: str = "sans_det",
                 rng: np.random.Generator | None = None, **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.sample = sample
        self.rng = np.random.default_rng() if rng is None else rng
        self.image.put(np.zeros(sample.shape, np.int32))

    @property
    def beam_centre(self) -> tuple[float, float]:
        """Beam centre ``(x, y)`` in pixels (0-based)."""
        return self.sample.beam_centre

    @property
    def mask(self) -> np.ndarray:
        """Valid-pixel mask (True = valid)."""
        return self.sample.mask

    def trigger(self) -> DeviceStatus:
        """Take one frame of ``acquire_time`` seconds; returns a finished status."""
        status = DeviceStatus(self)
        if self.shutter.get() == "open":
            frame = self.sample.expose(float(self.acquire_time.get()), self.rng,
                                       attenuation=float(self.attenuator.get()))
        else:
            frame = np.zeros(self.sample.shape, np.int32)
        self.image.put(frame)
        self.total_counts.put(int(frame.sum()))
        self.array_counter.put(int(self.array_counter.get()) + 1)
        status.set_finished()
        return status
