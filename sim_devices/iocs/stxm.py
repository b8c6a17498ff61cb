"""Caproto IOC of the STXM twin (PVs as :class:`smartbeam.devices.STXM`)."""

from __future__ import annotations

import asyncio

import numpy as np
from caproto import ChannelType
from caproto.server import PVGroup, SubGroup, pvproperty

from .common import PolarisationGroup, axis_group, set_positive, time_scale

__all__ = ["STXMIOC", "stxm_ioc_class", "zone_plate_focus_um"]

MAX_IMAGE = 256 * 256
ZONE_PLATE_DIAMETER_UM = 240.0
OUTER_ZONE_NM = 25.0


def zone_plate_focus_um(energy_ev: float) -> float:
    """Focal length f = D·Δr/λ of the zone plate (µm) at a photon energy (eV)."""
    wavelength_nm = 1239.84193 / energy_ev
    return ZONE_PLATE_DIAMETER_UM * OUTER_ZONE_NM / wavelength_nm


class DetectorGroup(PVGroup):
    """Point counts and raster images of the STXM counting detector."""

    dwell_sp = pvproperty(name="Dwell:SP", value=0.001, precision=5, units="s")
    dwell_rbv = pvproperty(name="Dwell:RBV", value=0.001, precision=5, units="s",
                           read_only=True)
    acquire = pvproperty(name="Acquire", value=0)
    counts = pvproperty(name="Counts", value=0.0, read_only=True, units="counts")
    img_x0 = pvproperty(name="Img:X0", value=0.0, precision=4, units="um")
    img_x1 = pvproperty(name="Img:X1", value=1.0, precision=4, units="um")
    img_nx = pvproperty(name="Img:NX", value=10)
    img_y0 = pvproperty(name="Img:Y0", value=0.0, precision=4, units="um")
    img_y1 = pvproperty(name="Img:Y1", value=1.0, precision=4, units="um")
    img_ny = pvproperty(name="Img:NY", value=10)
    img_acquire = pvproperty(name="Img:Acquire", value=0)
    image = pvproperty(name="Img:Array", value=np.zeros(MAX_IMAGE, dtype=np.int32),
                       dtype=ChannelType.LONG, max_length=MAX_IMAGE, read_only=True)

    @dwell_sp.putter
    async def dwell_sp(self, instance, value):
        return await set_positive(self.dwell_rbv, value, "dwell")

    @acquire.putter
    async def acquire(self, instance, value):
        if not value:
            return 0
        ioc = self.parent
        dwell = self.dwell_rbv.value
        await asyncio.sleep(dwell * time_scale())
        counts = ioc.sample.image(ioc.energy.rbv.value, ioc.pol.helicity, dwell,
                                  np.array([ioc.x.rbv.value]), np.array([ioc.y.rbv.value]),
                                  ioc.rng)
        await self.counts.write(float(counts[0, 0]))
        return 0

    @img_acquire.putter
    async def img_acquire(self, instance, value):
        if not value:
            return 0
        nx, ny = int(self.img_nx.value), int(self.img_ny.value)
        if not (1 <= nx and 1 <= ny and nx * ny <= MAX_IMAGE):
            raise ValueError(f"image {nx}x{ny} outside 1..{MAX_IMAGE} pixels")
        ioc = self.parent
        dwell = self.dwell_rbv.value
        # A raster takes nx*ny dwell times plus line flybacks.
        await asyncio.sleep((nx * ny * dwell + 0.002 * ny) * time_scale())
        x = np.linspace(self.img_x0.value, self.img_x1.value, nx)
        y = np.linspace(self.img_y0.value, self.img_y1.value, ny)
        img = ioc.sample.image(ioc.energy.rbv.value, ioc.pol.helicity, dwell, x, y, ioc.rng)
        flat = np.zeros(MAX_IMAGE, dtype=np.int32)
        flat[: nx * ny] = img.ravel()
        await self.image.write(flat)
        return 0


class STXMIOC(PVGroup):
    """STXM twin; build the class for a sample with :func:`stxm_ioc_class`."""

    energy = SubGroup(axis_group(600.0, 900.0, speed=100.0, initial=700.0), prefix="Energy:")
    pol = SubGroup(PolarisationGroup, prefix="")
    zp_z = pvproperty(name="ZPZ:RBV", value=-zone_plate_focus_um(700.0), precision=2,
                      units="um", read_only=True)
    osa_sp = pvproperty(name="OSA:SP", value=0.0, precision=3, units="um")
    osa_rbv = pvproperty(name="OSA:RBV", value=0.0, precision=3, units="um", read_only=True)
    det = SubGroup(DetectorGroup, prefix="Det:")

    def __init__(self, *args, sample, seed: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sample = sample
        self.rng = np.random.default_rng(seed)

    async def on_move(self, axis, target: float) -> None:
        """Keep the zone plate focused when the energy changes."""
        if axis is self.energy:
            await self.zp_z.write(-zone_plate_focus_um(target))

    @osa_sp.putter
    async def osa_sp(self, instance, value):
        await asyncio.sleep(0.01 * time_scale())
        await self.osa_rbv.write(value)
        return value


def stxm_ioc_class(extent_um: tuple[float, float]) -> type[STXMIOC]:
    """The STXM IOC class whose stage covers a field of view ``extent_um`` (x, y)."""
    namespace = {
        "x": SubGroup(axis_group(0.0, float(extent_um[0]), speed=50.0, initial=0.0,
                                 settle=0.002), prefix="SampleX:"),
        "y": SubGroup(axis_group(0.0, float(extent_um[1]), speed=50.0, initial=0.0,
                                 settle=0.002), prefix="SampleY:"),
    }
    return type("STXMIOC", (STXMIOC,), namespace)
