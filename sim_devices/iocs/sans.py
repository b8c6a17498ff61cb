"""Caproto IOC of the SANS detector twin (PVs as :class:`smartbeam.devices.SANSDetector`)."""

from __future__ import annotations

import asyncio

import numpy as np
from caproto import ChannelType
from caproto.server import PVGroup, pvproperty

from .common import set_positive, time_scale

__all__ = ["SANSDetectorIOC", "sans_ioc_class"]


class SANSDetectorIOC(PVGroup):
    """Acquire → one Poisson frame of the sample's pattern for ``AcquireTime`` seconds.

    With the shutter closed a frame holds only the dark counts (zero here). Build the
    class for a detector shape with :func:`sans_ioc_class`.
    """

    shape = (128, 128)

    acquire_time_sp = pvproperty(name="AcquireTime:SP", value=1.0, precision=4, units="s")
    acquire_time_rbv = pvproperty(name="AcquireTime:RBV", value=1.0, precision=4, units="s",
                                  read_only=True)
    acquire = pvproperty(name="Acquire", value=0, doc="write 1: take one frame")
    array_counter = pvproperty(name="ArrayCounter", value=0, read_only=True)
    total_counts = pvproperty(name="TotalCounts", value=0, read_only=True, units="counts")
    shutter_sp = pvproperty(name="Shutter:SP", value="closed", dtype=ChannelType.ENUM,
                            enum_strings=("closed", "open"))
    shutter_rbv = pvproperty(name="Shutter:RBV", value="closed", dtype=ChannelType.ENUM,
                             enum_strings=("closed", "open"), read_only=True)
    atten_sp = pvproperty(name="Atten:SP", value=1.0, precision=4)
    atten_rbv = pvproperty(name="Atten:RBV", value=1.0, precision=4, read_only=True)

    def __init__(self, *args, sample, seed: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sample = sample
        self.rng = np.random.default_rng(seed)

    @acquire_time_sp.putter
    async def acquire_time_sp(self, instance, value):
        return await set_positive(self.acquire_time_rbv, value, "acquire time")

    @shutter_sp.putter
    async def shutter_sp(self, instance, value):
        await asyncio.sleep(0.02 * time_scale())
        await self.shutter_rbv.write(value)
        return value

    @atten_sp.putter
    async def atten_sp(self, instance, value):
        if not 0 < value <= 1:
            raise ValueError(f"attenuator transmission must be in (0, 1], got {value}")
        await self.atten_rbv.write(value)
        return value

    @acquire.putter
    async def acquire(self, instance, value):
        if not value:
            return 0
        exposure = self.acquire_time_rbv.value
        await asyncio.sleep(exposure * time_scale())
        if self.shutter_rbv.value == "open":
            frame = self.sample.expose(exposure, self.rng, attenuation=self.atten_rbv.value)
        else:
            frame = np.zeros(self.shape, dtype=np.int32)
        frame = np.asarray(frame, dtype=np.int32)
        await self.image.write(frame.ravel())
        await self.total_counts.write(int(frame.sum()))
        await self.array_counter.write(self.array_counter.value + 1)
        return 0


def sans_ioc_class(shape: tuple[int, int]) -> type[SANSDetectorIOC]:
    """The SANS IOC class for a detector of ``shape`` (ny, nx)."""
    ny, nx = int(shape[0]), int(shape[1])
    namespace = {
        "shape": (ny, nx),
        "image": pvproperty(name="Image", value=np.zeros(ny * nx, dtype=np.int32),
                            dtype=ChannelType.LONG, max_length=ny * nx, read_only=True),
        "array_size_x": pvproperty(name="ArraySizeX", value=nx, read_only=True),
        "array_size_y": pvproperty(name="ArraySizeY", value=ny, read_only=True),
    }
    return type("SANSDetectorIOC", (SANSDetectorIOC,), namespace)
