"""Scanning transmission X-ray microscope (STXM)."""

from __future__ import annotations

from ophyd import Component as Cpt
from ophyd import Device, EpicsSignal, EpicsSignalRO, Kind

from .common import EnergyAxis, EPUPolarisation, LimitedPositioner
from .images import ImageSignal

__all__ = ["STXM", "STXMDetector"]


class STXMDetector(Device):
    """Counting detector (PMT/APD) behind the sample, with a point and an image mode.

    Point mode: ``trigger()`` counts ``dwell`` seconds at the current stage position
    into ``counts``. Image mode (:meth:`STXM.trigger_image`): the stage rasters the
    grid ``img_x0..img_x1`` × ``img_y0..img_y1`` (µm) with ``img_nx`` × ``img_ny``
    pixels, ``dwell`` seconds per pixel, into ``image`` (shape ``(ny, nx)``).
    """

    dwell = Cpt(EpicsSignal, "Dwell:RBV", write_pv="Dwell:SP", put_complete=True,
                kind=Kind.config)
    acquire = Cpt(EpicsSignal, "Acquire", put_complete=True, kind=Kind.omitted)
    counts = Cpt(EpicsSignalRO, "Counts", kind=Kind.hinted)
    img_x0 = Cpt(EpicsSignal, "Img:X0", kind=Kind.config)
    img_x1 = Cpt(EpicsSignal, "Img:X1", kind=Kind.config)
    img_nx = Cpt(EpicsSignal, "Img:NX", kind=Kind.config)
    img_y0 = Cpt(EpicsSignal, "Img:Y0", kind=Kind.config)
    img_y1 = Cpt(EpicsSignal, "Img:Y1", kind=Kind.config)
    img_ny = Cpt(EpicsSignal, "Img:NY", kind=Kind.config)
    img_acquire = Cpt(EpicsSignal, "Img:Acquire", put_complete=True, kind=Kind.omitted)
    image = Cpt(ImageSignal, "Img:Array", shape_x="img_nx", shape_y="img_ny",
                kind=Kind.omitted)

    def trigger(self):
        """Count one dwell time at the current position."""
        return self.acquire.set(1)


class STXM(Device):
    """STXM: energy, EPU polarisation, fine sample stage, zone plate, OSA, detector.

    Parameters
    ----------
    prefix
        PV prefix of the microscope IOC, e.g. ``"BL:STXM:"``.
    name
        Device name.

    Notes
    -----
    The zone-plate z position follows the energy (the focal length of a zone plate is
    proportional to the photon energy); the IOC keeps it in focus and ``zp_z`` reads it.
    """

    energy = Cpt(EnergyAxis, "Energy:", kind=Kind.hinted)
    pol = Cpt(EPUPolarisation, "", kind=Kind.normal)
    x = Cpt(LimitedPositioner, "SampleX:", kind=Kind.hinted)
    y = Cpt(LimitedPositioner, "SampleY:", kind=Kind.hinted)
    zp_z = Cpt(EpicsSignalRO, "ZPZ:RBV", kind=Kind.normal)
    osa = Cpt(EpicsSignal, "OSA:RBV", write_pv="OSA:SP", put_complete=True, kind=Kind.config)
    det = Cpt(STXMDetector, "Det:", kind=Kind.hinted)

    def trigger(self):
        """Count one dwell time at the current position (point mode)."""
        return self.det.trigger()

    def trigger_image(self):
        """Acquire one image of the configured raster; returns a status."""
        return self.det.img_acquire.set(1)
