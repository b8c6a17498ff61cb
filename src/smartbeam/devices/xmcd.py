"""XMCD endstation: energy, EPU polarisation, magnet, I0 and TEY/TFY counters."""

from __future__ import annotations

from ophyd import Component as Cpt
from ophyd import Device, EpicsSignal, EpicsSignalRO, Kind

from .common import EnergyAxis, EPUPolarisation

__all__ = ["XMCDEndstation"]


class XMCDEndstation(Device):
    """Soft-X-ray absorption endstation for XAS/XMCD in electron/fluorescence yield.

    Parameters
    ----------
    prefix
        PV prefix of the endstation IOC, e.g. ``"BL:XMCD:"``.
    name
        Device name; reading keys are ``{name}_energy``, ``{name}_i0``, ``{name}_tey``,
        ``{name}_tfy``.

    Notes
    -----
    ``trigger()`` counts for ``dwell`` seconds at the current energy and polarisation
    and completes when the IOC has updated I0, TEY and TFY (put completion on
    ``Acquire``). The absorption in TEY mode is ``tey / i0``.
    """

    energy = Cpt(EnergyAxis, "Energy:", kind=Kind.hinted)
    pol = Cpt(EPUPolarisation, "", kind=Kind.normal)
    field = Cpt(EpicsSignal, "Field:RBV", write_pv="Field:SP", put_complete=True,
                kind=Kind.config)
    dwell = Cpt(EpicsSignal, "Dwell:RBV", write_pv="Dwell:SP", put_complete=True,
                kind=Kind.config)
    acquire = Cpt(EpicsSignal, "Acquire", put_complete=True, kind=Kind.omitted)
    i0 = Cpt(EpicsSignalRO, "I0", kind=Kind.hinted)
    tey = Cpt(EpicsSignalRO, "TEY", kind=Kind.hinted)
    tfy = Cpt(EpicsSignalRO, "TFY", kind=Kind.normal)

    def trigger(self):
        """Count for one dwell time; the status completes when the counts are updated."""
        return self.acquire.set(1)
