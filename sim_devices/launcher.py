"""Start twin IOCs as subprocesses on free loopback ports and stop them again."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .runner import DEFAULT_PREFIXES

__all__ = ["IOCProcess", "free_port", "running_iocs"]


def free_port() -> int:
    """A TCP *and* UDP port free on loopback now (CA serves both on one port)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


@dataclass
class IOCProcess:
    """One twin IOC in a subprocess.

    Parameters
    ----------
    instrument
        ``"xmcd"``, ``"stxm"`` or ``"sans"``.
    port
        CA port; a free one is chosen when ``None``.
    prefix
        PV prefix (default ``SIM:<INSTRUMENT>:``).
    extra_args
        More ``python -m sim_devices ioc`` options (``--time-scale 0.05`` ...).
    """

    instrument: str
    port: int | None = None
    prefix: str | None = None
    extra_args: Sequence[str] = ()
    log_path: str | None = None
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.prefix = self.prefix or DEFAULT_PREFIXES[self.instrument]

    def start(self, timeout: float = 30.0) -> IOCProcess:
        """Start the IOC and wait until its CA port accepts connections."""
        cmd = [sys.executable, "-m", "sim_devices", "ioc", self.instrument,
               "--port", str(self.port), "--prefix", self.prefix, *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                   OPENBLAS_NUM_THREADS="1")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.instrument} IOC exited with {self.process.returncode}"
                                   f" (command: {' '.join(cmd)}; log: {self.log_path})")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2):
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.instrument} IOC did not listen on 127.0.0.1:{self.port} "
                           f"within {timeout} s")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the IOC (SIGINT, then SIGKILL)."""
        if not self.alive:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)


@contextlib.contextmanager
def running_iocs(*iocs: IOCProcess) -> Iterator[tuple[IOCProcess, ...]]:
    """Start IOCs for the duration of a ``with`` block; always stop them."""
    started = []
    try:
        for ioc in iocs:
            started.append(ioc.start())
        yield iocs
    finally:
        for ioc in reversed(started):
            ioc.stop()
