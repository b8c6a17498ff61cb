"""Building blocks shared by the soft-X-ray instruments: energy axis and EPU polarisation."""

from __future__ import annotations

import logging

from ophyd import Component as Cpt
from ophyd import Device, EpicsSignal, EpicsSignalRO, Kind, PVPositioner
from ophyd.positioner import PositionerBase
from ophyd.utils import LimitError

from ..epics_env import address_list
from ..errors import SmartbeamError, SmartbeamInputError

logger = logging.getLogger(__name__)

__all__ = [
    "POLARISATION_MODES",
    "DeviceConnectionError",
    "EPUPolarisation",
    "EnergyAxis",
    "LimitedPositioner",
    "connect_devices",
]

POLARISATION_MODES = ("circ+", "circ-", "linear")


class DeviceConnectionError(SmartbeamError, TimeoutError):
    """A device did not connect: names the missing PVs and the CA address list."""


class LimitedPositioner(PVPositioner):
    """A setpoint/readback/done-moving positioner that refuses targets outside the IOC's
    control limits before any motion.

    PVs (relative to the prefix): ``SP`` (setpoint, with DRVL/DRVH control limits),
    ``RBV`` (readback), ``DMOV`` (1 when done), ``Stop``.
    """

    setpoint = Cpt(EpicsSignal, "SP", kind=Kind.normal)
    readback = Cpt(EpicsSignalRO, "RBV", kind=Kind.hinted)
    done = Cpt(EpicsSignalRO, "DMOV", kind=Kind.omitted)
    stop_signal = Cpt(EpicsSignal, "Stop", kind=Kind.omitted)
    done_value = 1

    def __init__(self, prefix: str = "", *, name: str, **kwargs) -> None:
        super().__init__(prefix, name=name, **kwargs)
        # The readback carries the positioner's own name, as EpicsMotor does.
        self.readback.name = self.name

    @property
    def limits(self) -> tuple[float, float]:
        """Control limits served by the IOC (low, high)."""
        return tuple(self.setpoint.limits)

    def check_value(self, pos: float) -> None:
        """Refuse a target outside the control limits, naming PV and limits."""
        low, high = self.limits
        # low == high means the IOC serves no limits (EPICS convention).
        if pos is None or (low < high and not low <= float(pos) <= high):
            raise LimitError(
                f"{self.name}: target {pos!r} is outside the axis limits [{low}, {high}] "
                f"of {self.setpoint.pvname}; nothing was moved"
            )

    def stop(self, *, success: bool = False) -> None:
        """Write Stop and end the pending move, even when the IOC is gone.

        ophyd's PVPositioner.stop raises when the Stop write fails, leaving the move's
        status pending; a suspension after an IOC death would then fail the replayed move.
        """
        try:
            self.stop_signal.put(self.stop_value, wait=False)
        except Exception as exc:  # noqa: BLE001 - any CA failure: the IOC is gone
            logger.warning("%s: Stop write to %s failed (%s); move marked done",
                           self.name, self.stop_signal.pvname, exc)
        # As EpicsMotor.stop does: the move ends now (PVPositioner's Device.stop never
        # reaches PositionerBase.stop, so a dead IOC's DMOV would leave it pending).
        PositionerBase.stop(self, success=success)


class EnergyAxis(LimitedPositioner):
    """Monochromator photon energy in eV."""

    def __init__(self, prefix: str = "", *, name: str, **kwargs) -> None:
        super().__init__(prefix, name=name, egu="eV", **kwargs)


class PolarisationSignal(EpicsSignal):
    """EPU mode as a string; refuses unknown modes before writing."""

    def check_value(self, value) -> None:
        if value not in POLARISATION_MODES:
            raise SmartbeamInputError(
                f"{self.name}: unknown polarisation mode {value!r}; expected one of "
                f"{', '.join(POLARISATION_MODES)}"
            )


class EPUPolarisation(Device):
    """Elliptically polarising undulator: circular +, circular − or linear."""

    mode = Cpt(PolarisationSignal, "Pol:RBV", write_pv="Pol:SP", string=True,
               put_complete=True, kind=Kind.normal)


def connect_devices(*devices: Device, timeout: float = 5.0) -> None:
    """Wait for devices to connect, or fail naming the PVs and the address list.

    Parameters
    ----------
    devices
        ophyd devices to connect.
    timeout
        Seconds to wait in total for each device.

    Raises
    ------
    DeviceConnectionError
        When any PV did not connect in time.
    """
    for device in devices:
        try:
            device.wait_for_connection(timeout=timeout)
        except TimeoutError:
            missing = [
                walk.item.pvname
                for walk in device.walk_signals()
                if hasattr(walk.item, "pvname") and not walk.item.connected
            ]
            shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
            raise DeviceConnectionError(
                f"{device.name}: {len(missing)} PV(s) did not connect within {timeout} s: "
                f"{shown}; {address_list()}. Is the IOC running and is the prefix right?"
            ) from None
