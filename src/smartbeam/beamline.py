"""Assemble a beamline: start the simulated twins (or not), make and connect devices.

Used by the IPython profile, the queueserver worker and ``smartbeam demo``. With
``SMARTBEAM_SIM=1`` (the default) the twins are started as subprocesses on loopback;
with ``SMARTBEAM_SIM=0`` the devices connect to the PV prefixes given in
``SMARTBEAM_PREFIX_XMCD`` / ``_STXM`` / ``_SANS`` / ``_XAS`` through the site's EPICS
setup.
"""

from __future__ import annotations

import atexit
import multiprocessing.util
import os
from collections.abc import Iterable
from pathlib import Path

from .epics_env import configure_epics

__all__ = ["INSTRUMENTS", "Beamline", "sim_enabled"]

INSTRUMENTS = ("xmcd", "stxm", "sans", "xas")
DEVICE_NAMES = {"xmcd": "xmcd", "stxm": "stxm", "sans": "sans_det", "xas": "xas"}
# "xas" is a second soft-X-ray endstation (same device class and IOC as "xmcd") whose twin
# holds a non-magnetic Mn2+ oxide: 10Dq = 0.9 eV, monochromator 0.4 eV off calibration.
IOC_KIND = {"xmcd": "xmcd", "stxm": "stxm", "sans": "sans", "xas": "xmcd"}
SIM_IOC_ARGS = {"xas": ["--xas", "Mn2+:0.9:0.4"]}
SIM_PREFIXES = {"xas": "SIM:XAS:"}
# Calibration of the simulated instruments, as beamline staff would enter it for real
# ones (the SANS twin's direct beam is slightly off the detector centre).
SIM_CALIBRATION = {"sans": {"beam_centre": (63.7, 64.2)}}


def sim_enabled() -> bool:
    """True unless ``SMARTBEAM_SIM`` is set to 0/false/no."""
    return os.environ.get("SMARTBEAM_SIM", "1").strip().lower() not in ("0", "false", "no")


class Beamline:
    """The instruments of a session and, in simulation, the twin IOCs behind them.

    Parameters
    ----------
    instruments
        Which of ``xmcd``, ``stxm``, ``sans``, ``xas`` to set up.
    sim
        Start twin IOCs (default: :func:`sim_enabled`).
    time_scale
        Simulated time factor of the twins (1 = real time).
    ioc_args
        Extra ``sim_devices ioc`` options per instrument, e.g.
        ``{"xmcd": ["--truth", "Co"]}``.
    log_dir
        Where the twins write their logs.
    """

    def __init__(self, instruments: Iterable[str] = INSTRUMENTS, *, sim: bool | None = None,
                 time_scale: float = 1.0, ioc_args: dict[str, list[str]] | None = None,
                 log_dir: str | os.PathLike | None = None) -> None:
        self.instruments = tuple(instruments)
        unknown = set(self.instruments) - set(INSTRUMENTS)
        if unknown:
            raise ValueError(f"unknown instrument(s) {sorted(unknown)}; expected {INSTRUMENTS}")
        self.sim = sim_enabled() if sim is None else sim
        self.time_scale = time_scale
        self.ioc_args = ioc_args or {}
        self.log_dir = Path(log_dir) if log_dir else None
        self.iocs: dict = {}
        self.prefixes: dict[str, str] = {}
        self.devices: dict = {}

    def start(self, connect_timeout: float = 10.0) -> dict:
        """Start twins (in simulation), configure CA, create and connect the devices."""
        self.start_iocs()
        self.devices = make_devices(self.prefixes, connect_timeout=connect_timeout,
                                    calibration=self.calibration)
        return self.devices

    @property
    def calibration(self) -> dict:
        """Per-instrument device keyword arguments (the twins' calibration in simulation)."""
        return SIM_CALIBRATION if self.sim else {}

    def start_iocs(self) -> dict[str, str]:
        """Start the twins (in simulation) and configure CA; returns the PV prefixes.

        Call this before ophyd is imported: pyepics reads the address list then.
        """
        prefixes = {}
        if self.sim:
            from sim_devices.launcher import IOCProcess

            for inst in self.instruments:
                log = str(self.log_dir / f"ioc-{inst}.log") if self.log_dir else None
                if self.log_dir:
                    self.log_dir.mkdir(parents=True, exist_ok=True)
                args = ["--time-scale", str(self.time_scale),
                        *self.ioc_args.get(inst, SIM_IOC_ARGS.get(inst, []))]
                self.iocs[inst] = IOCProcess(IOC_KIND[inst], prefix=SIM_PREFIXES.get(inst),
                                             extra_args=args, log_path=log)
            atexit.register(self.stop)
            # The queueserver worker (and qserver-list-plans-devices) run the profile in
            # a multiprocessing child, which skips atexit: use multiprocessing's hook too.
            multiprocessing.util.Finalize(self, self.stop, exitpriority=100)
            for ioc in self.iocs.values():
                ioc.start()
            configure_epics([ioc.port for ioc in self.iocs.values()])
            prefixes = {inst: ioc.prefix for inst, ioc in self.iocs.items()}
        else:
            configure_epics(None)
            for inst in self.instruments:
                key = f"SMARTBEAM_PREFIX_{inst.upper()}"
                if key not in os.environ:
                    raise ValueError(f"SMARTBEAM_SIM=0 needs {key} (the PV prefix of the {inst} IOC)")
                prefixes[inst] = os.environ[key]
        self.prefixes = prefixes
        return prefixes

    def stop(self) -> None:
        """Stop every twin IOC this beamline started."""
        for ioc in self.iocs.values():
            ioc.stop()

    def __enter__(self) -> Beamline:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def make_devices(prefixes: dict[str, str], connect_timeout: float = 10.0,
                 calibration: dict | None = None) -> dict:
    """Create and connect the device of each instrument in ``prefixes``.

    ``calibration`` maps an instrument to extra keyword arguments of its device class
    (e.g. ``{"sans": {"beam_centre": (63.7, 64.2)}}``).
    """
    from .devices import STXM, SANSDetector, XMCDEndstation, connect_devices

    classes = {"xmcd": XMCDEndstation, "stxm": STXM, "sans": SANSDetector,
               "xas": XMCDEndstation}
    calibration = calibration or {}
    devices = {inst: classes[inst](prefix, name=DEVICE_NAMES[inst], **calibration.get(inst, {}))
               for inst, prefix in prefixes.items()}
    connect_devices(*devices.values(), timeout=connect_timeout)
    return devices
