"""SANS/SAXS area detector with beam shutter and attenuator."""

from __future__ import annotations

from ophyd import Component as Cpt
from ophyd import Device, EpicsSignal, EpicsSignalRO, Kind

from .images import ImageSignal

__all__ = ["SANSDetector"]


class SANSDetector(Device):
    """Area detector for small-angle scattering.

    Parameters
    ----------
    prefix
        PV prefix of the detector IOC, e.g. ``"BL:SANS:"``.
    name
        Device name; the frame is read as ``{name}_image`` (int32, ``(ny, nx)``, dims
        ``{name}_image_y``, ``{name}_image_x``).
    shape
        Detector shape ``(ny, nx)``; default 128 × 128.
    beam_centre
        Calibrated direct-beam position ``(x, y)`` in pixels, if known; plans and the
        live KDE use it for radial bands and sector averages.

    Notes
    -----
    ``trigger()`` takes one frame of ``acquire_time`` seconds (put completion on
    ``Acquire``). The shutter takes ``"open"``/``"closed"``; the attenuator is a
    transmission factor in (0, 1].
    """

    acquire_time = Cpt(EpicsSignal, "AcquireTime:RBV", write_pv="AcquireTime:SP",
                       put_complete=True, kind=Kind.config)
    acquire = Cpt(EpicsSignal, "Acquire", put_complete=True, kind=Kind.omitted)
    image = Cpt(ImageSignal, "Image", kind=Kind.normal)
    array_size_x = Cpt(EpicsSignalRO, "ArraySizeX", kind=Kind.config)
    array_size_y = Cpt(EpicsSignalRO, "ArraySizeY", kind=Kind.config)
    array_counter = Cpt(EpicsSignalRO, "ArrayCounter", kind=Kind.normal)
    total_counts = Cpt(EpicsSignalRO, "TotalCounts", kind=Kind.hinted)
    shutter = Cpt(EpicsSignal, "Shutter:RBV", write_pv="Shutter:SP", string=True,
                  put_complete=True, kind=Kind.config)
    attenuator = Cpt(EpicsSignal, "Atten:RBV", write_pv="Atten:SP", put_complete=True,
                     kind=Kind.config)

    def __init__(self, prefix: str = "", *, name: str,
                 shape: tuple[int, int] = (128, 128),
                 beam_centre: tuple[float, float] | None = None, **kwargs) -> None:
        super().__init__(prefix, name=name, **kwargs)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{name}: shape {shape!r} is not a (ny, nx) pair of positive ints")
        self.image.image_shape = (int(shape[0]), int(shape[1]))
        self.beam_centre = None if beam_centre is None else (float(beam_centre[0]),
                                                             float(beam_centre[1]))

    def trigger(self):
        """Take one frame; the status completes when the frame is in ``image``."""
        return self.acquire.set(1)
