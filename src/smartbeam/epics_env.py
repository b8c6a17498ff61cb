"""EPICS Channel Access client environment.

pyepics creates its CA context when ophyd is imported, so the address list must be in
the environment *before* the first ``import ophyd``. Call :func:`configure_epics` first.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["configure_epics", "address_list"]

# Large enough for a 2048x2048 int32 frame; libca's default (16 kB) truncates images.
MAX_ARRAY_BYTES = str(2048 * 2048 * 4 + 4096)


def configure_epics(ports: Iterable[int] | None = None, host: str = "127.0.0.1",
                    control_layer: str = "pyepics") -> str:
    """Point the CA client at the given IOC ports (loopback by default).

    Parameters
    ----------
    ports
        CA server ports of the IOCs; each becomes a ``host:port`` entry of
        ``EPICS_CA_ADDR_LIST`` and automatic address lists are switched off. ``None``
        leaves the address list as it is (real beamline configuration).
    host
        Host of the IOCs.
    control_layer
        ``"pyepics"`` or ``"caproto"``; set explicitly because pyepics wins when both
        are installed.

    Returns
    -------
    str
        The resulting ``EPICS_CA_ADDR_LIST``.
    """
    if ports is not None:
        os.environ["EPICS_CA_ADDR_LIST"] = " ".join(f"{host}:{int(p)}" for p in ports)
        os.environ["EPICS_CA_AUTO_ADDR_LIST"] = "NO"
    os.environ.setdefault("EPICS_CA_MAX_ARRAY_BYTES", MAX_ARRAY_BYTES)
    os.environ["OPHYD_CONTROL_LAYER"] = control_layer
    return address_list()


def address_list() -> str:
    """The CA address list in force, for error messages."""
    auto = os.environ.get("EPICS_CA_AUTO_ADDR_LIST", "YES")
    return f"EPICS_CA_ADDR_LIST={os.environ.get('EPICS_CA_ADDR_LIST', '')!r} (auto={auto})"
