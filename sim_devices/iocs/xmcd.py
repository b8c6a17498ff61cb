"""Caproto IOC of the XMCD endstation twin (PVs as :class:`smartbeam.devices.XMCDEndstation`)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
from caproto.server import PVGroup, SubGroup, pvproperty

from .common import PolarisationGroup, axis_group, set_positive, time_scale

__all__ = ["XMCDEndstationIOC"]


class XMCDEndstationIOC(PVGroup):
    """Energy (600–900 eV), EPU, magnet, dwell, Acquire → I0/TEY/TFY from an XMCD sample.

    Parameters
    ----------
    sample
        A ``sim_devices.physics.xmcd.XMCDSample``; its ``measure`` gives the counts.
    seed
        Seed of the counting noise.
    """

    energy = SubGroup(axis_group(600.0, 900.0, speed=200.0, initial=700.0), prefix="Energy:")
    pol = SubGroup(PolarisationGroup, prefix="")
    field_sp = pvproperty(name="Field:SP", value=1.0, precision=3, units="T")
    field_rbv = pvproperty(name="Field:RBV", value=1.0, precision=3, units="T", read_only=True)
    dwell_sp = pvproperty(name="Dwell:SP", value=0.1, precision=4, units="s")
    dwell_rbv = pvproperty(name="Dwell:RBV", value=0.1, precision=4, units="s", read_only=True)
    acquire = pvproperty(name="Acquire", value=0, doc="write 1: count for one dwell time")
    i0 = pvproperty(name="I0", value=0.0, read_only=True, units="counts")
    tey = pvproperty(name="TEY", value=0.0, read_only=True, units="counts")
    tfy = pvproperty(name="TFY", value=0.0, read_only=True, units="counts")

    def __init__(self, *args, sample, seed: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sample = sample
        self.rng = np.random.default_rng(seed)

    @field_sp.putter
    async def field_sp(self, instance, value):
        await asyncio.sleep(0.05 * time_scale())
        await self.field_rbv.write(value)
        return value

    @dwell_sp.putter
    async def dwell_sp(self, instance, value):
        return await set_positive(self.dwell_rbv, value, "dwell")

    @acquire.putter
    async def acquire(self, instance, value):
        if not value:
            return 0
        dwell = self.dwell_rbv.value
        await asyncio.sleep(dwell * time_scale())
        field = self.field_rbv.value
        # Reversing the field reverses the dichroism; zero field = demagnetised sample.
        helicity = self.pol.helicity * (0 if field == 0 else int(math.copysign(1, field)))
        counts = self.sample.measure(self.energy.rbv.value, helicity, dwell, self.rng)
        await self.i0.write(float(counts["i0"]))
        await self.tey.write(float(counts["tey"]))
        await self.tfy.write(float(counts["tfy"]))
        return 0
