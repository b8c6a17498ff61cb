"""PV groups shared by the simulated instruments: positioners, EPU, time scaling.

Every twin IOC serves exactly the PVs the device classes in ``smartbeam.devices``
expect. Motion and counting take simulated time (``time_scale`` × the physical time),
so tests can run the same code faster than real time.
"""

from __future__ import annotations

import asyncio
import os

from caproto import ChannelType
from caproto.server import PVGroup, pvproperty

__all__ = ["AxisGroup", "PolarisationGroup", "axis_group", "set_ca_port", "set_positive"]

POLARISATION_MODES = ("circ+", "circ-", "linear")
HELICITY = {"circ+": 1, "circ-": -1, "linear": 0}


def set_ca_port(port: int) -> None:
    """Serve CA on ``port`` (UDP search and TCP), on loopback unless told otherwise."""
    os.environ["EPICS_CA_SERVER_PORT"] = str(int(port))
    os.environ.setdefault("EPICS_CAS_INTF_ADDR_LIST", "127.0.0.1")


async def set_positive(readback, value: float, what: str) -> float:
    """Put handler body of a positive setting (dwell, exposure): refuse <= 0, mirror it
    to the readback PV."""
    if not value > 0:
        raise ValueError(f"{what} must be > 0 s, got {value}")
    await readback.write(value)
    return value


class AxisGroup(PVGroup):
    """A positioner: ``SP`` (with control limits), ``RBV``, ``DMOV``, ``Stop``.

    Subclasses (made by :func:`axis_group`) set ``low``, ``high``, ``speed`` (units/s),
    ``settle`` (s) and ``initial``. ``on_move`` of the parent, if present, is awaited
    with the new position (the STXM zone plate follows the energy that way).
    """

    low = 0.0
    high = 1.0
    speed = 1.0
    settle = 0.01
    initial = 0.0

    sp = pvproperty(name="SP", value=0.0, precision=4, doc="setpoint")
    rbv = pvproperty(name="RBV", value=0.0, precision=4, read_only=True, doc="readback")
    dmov = pvproperty(name="DMOV", value=1, read_only=True, doc="1 when done moving")
    stop = pvproperty(name="Stop", value=0, doc="write 1 to stop")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._motion: asyncio.Task | None = None

    @sp.startup
    async def sp(self, instance, async_lib):
        await instance.write_metadata(lower_ctrl_limit=self.low, upper_ctrl_limit=self.high)
        await instance.write(self.initial, verify_value=False)
        await self.rbv.write(self.initial)

    @sp.putter
    async def sp(self, instance, value):
        if not self.low <= value <= self.high:
            # Real motor records refuse out-of-range puts too (belt and braces: ophyd
            # already checks the limits before any motion).
            raise ValueError(f"{self.prefix}SP={value} outside [{self.low}, {self.high}]")
        if self._motion is not None and not self._motion.done():
            self._motion.cancel()
        await self.dmov.write(0)
        self._motion = asyncio.get_running_loop().create_task(self._move(value))
        return value

    async def _move(self, target: float) -> None:
        start = self.rbv.value
        distance = abs(target - start)
        duration = (distance / self.speed + self.settle) * time_scale()
        steps = max(1, min(10, int(duration / 0.02)))
        for k in range(1, steps + 1):
            await asyncio.sleep(duration / steps)
            await self.rbv.write(start + (target - start) * k / steps)
        on_move = getattr(self.parent, "on_move", None)
        if on_move is not None:
            await on_move(self, target)
        await self.dmov.write(1)

    @stop.putter
    async def stop(self, instance, value):
        if value and self._motion is not None and not self._motion.done():
            self._motion.cancel()
            await self.sp.write(self.rbv.value, verify_value=False)
            await self.dmov.write(1)
        return 0


def axis_group(low: float, high: float, speed: float, initial: float,
               settle: float = 0.01) -> type[AxisGroup]:
    """An :class:`AxisGroup` subclass with the given limits, speed and start position."""
    return type("Axis", (AxisGroup,), dict(low=low, high=high, speed=speed,
                                            initial=initial, settle=settle))


class PolarisationGroup(PVGroup):
    """EPU polarisation: ``Pol:SP`` / ``Pol:RBV`` enums circ+ / circ- / linear."""

    switch_time = 0.05

    pol_sp = pvproperty(name="Pol:SP", value="circ+", dtype=ChannelType.ENUM,
                        enum_strings=POLARISATION_MODES, doc="EPU mode setpoint")
    pol_rbv = pvproperty(name="Pol:RBV", value="circ+", dtype=ChannelType.ENUM,
                         enum_strings=POLARISATION_MODES, read_only=True, doc="EPU mode")

    @pol_sp.putter
    async def pol_sp(self, instance, value):
        if value != self.pol_rbv.value:
            await asyncio.sleep(self.switch_time * time_scale())
        await self.pol_rbv.write(value)
        return value

    @property
    def helicity(self) -> int:
        return HELICITY[self.pol_rbv.value]


_TIME_SCALE = [1.0]


def time_scale() -> float:
    """Factor applied to every simulated duration (1 = real time)."""
    return _TIME_SCALE[0]


def set_time_scale(value: float) -> None:
    if value <= 0:
        raise ValueError(f"time scale must be > 0, got {value}")
    _TIME_SCALE[0] = float(value)
