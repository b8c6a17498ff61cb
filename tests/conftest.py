"""Shared fixtures: real twin IOCs on free loopback ports, a real embedded Tiled store.

The EPICS address list must be in the environment before ophyd is first imported
(pyepics creates its CA context then), so the ports are chosen at import time here,
before any test module is collected.
"""

from __future__ import annotations

import os

import pytest

from sim_devices.launcher import IOCProcess, free_port
from smartbeam.epics_env import configure_epics

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

IOC_PORTS = {inst: free_port() for inst in ("xmcd", "stxm", "sans")}
# Fast simulated time so scans take a fraction of their real duration.
IOC_TIME_SCALE = "0.02"
configure_epics(IOC_PORTS.values())


@pytest.fixture(scope="session")
def iocs(tmp_path_factory):
    """The three twin IOCs as subprocesses (stopped at the end of the session)."""
    log_dir = tmp_path_factory.mktemp("ioc-logs")
    procs = {
        inst: IOCProcess(inst, port=port, log_path=str(log_dir / f"{inst}.log"),
                         extra_args=["--time-scale", IOC_TIME_SCALE, "--seed", "1"])
        for inst, port in IOC_PORTS.items()
    }
    try:
        for proc in procs.values():
            proc.start()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="session")
def beamline_devices(iocs):
    """Connected EPICS devices of the three twins: {"xmcd", "stxm", "sans"}."""
    from smartbeam.beamline import SIM_CALIBRATION, make_devices

    return make_devices({inst: proc.prefix for inst, proc in iocs.items()},
                        calibration=SIM_CALIBRATION)


@pytest.fixture(scope="session")
def storage(tmp_path_factory):
    """A real embedded Tiled store (SimpleTiledServer) in a temporary directory."""
    from smartbeam.storage import Storage

    store = Storage(tmp_path_factory.mktemp("tiled"))
    store.open()
    yield store
    store.close()


@pytest.fixture
def RE():
    """A fresh RunEngine (no subscriptions)."""
    from bluesky import RunEngine

    engine = RunEngine({}, call_returns_result=False)
    yield engine
    if engine.state != "idle":
        engine.halt()
