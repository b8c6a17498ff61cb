"""ophyd EPICS device classes; every PV prefix is an argument, nothing is hard-coded.

The same classes drive the beamline's IOCs and the simulated twins in ``sim_devices``.
Import :func:`smartbeam.epics_env.configure_epics` first when the CA address list must
be set (pyepics reads it when ophyd is imported).
"""

from .common import (
    POLARISATION_MODES,
    DeviceConnectionError,
    EnergyAxis,
    EPUPolarisation,
    LimitedPositioner,
    connect_devices,
)
from .images import ImageSignal
from .sans import SANSDetector
from .stxm import STXM, STXMDetector
from .xmcd import XMCDEndstation

__all__ = [
    "POLARISATION_MODES",
    "DeviceConnectionError",
    "EPUPolarisation",
    "EnergyAxis",
    "ImageSignal",
    "LimitedPositioner",
    "SANSDetector",
    "STXM",
    "STXMDetector",
    "XMCDEndstation",
    "connect_devices",
]
