"""Private services on free loopback ports: Redis, PostgreSQL, ``smartbeam serve``, the
queueserver manager. Used by the integration tests and the storage benchmark.

Each is a context manager that starts the real program as a subprocess, waits until it
answers, and stops it (and removes what it created) on exit. Nothing listens beyond
127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import SmartbeamError

__all__ = [
    "PostgresServer",
    "RedisServer",
    "ReManager",
    "TiledServe",
    "free_port",
    "pg_bin_dir",
    "wait_for_port",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None,
                  what: str = "service") -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``.

    Raises
    ------
    SmartbeamError
        When ``proc`` exits first or ``timeout`` s pass.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SmartbeamError(f"{what} exited with code {proc.returncode} before listening "
                                 f"on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SmartbeamError(f"{what} did not listen on port {port} within {timeout} s")


def _stop(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    # Our children run in their own session: signal that process group only.
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


class RedisServer:
    """``redis-server`` on a free loopback port, nothing saved to disk.

    Attributes
    ----------
    port : int
    url : str
        ``redis://127.0.0.1:PORT``.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        """True when ``redis-server`` is on PATH."""
        return shutil.which("redis-server") is not None

    def start(self) -> RedisServer:
        """Start the server and wait until it listens."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise SmartbeamError("redis-server not found: run scripts/install-system-deps.sh")
        self.proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_for_port(self.port, 20, self.proc, "redis-server")
        return self

    def stop(self) -> None:
        """Stop the server."""
        _stop(self.proc)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def pg_bin_dir() -> Path | None:
    """Directory of the PostgreSQL server binaries (Debian layout), newest first."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A throw-away PostgreSQL cluster on a free loopback port, with one password user.

    As root the cluster runs as the ``postgres`` system user (``initdb`` refuses root); the
    socket lives in the data directory.

    Parameters
    ----------
    user, password, database
        The role and database created for the client.

    Attributes
    ----------
    uri : str
        ``postgresql+asyncpg://USER:PASSWORD@127.0.0.1:PORT/DB``.
    """

    def __init__(self, *, user: str = "smartbeam", password: str = "sbpw",
                 database: str = "smartbeam", port: int | None = None) -> None:
        self.user, self.password, self.database = user, password, database
        self.port = port or free_port()
        self.uri = f"postgresql+asyncpg://{user}:{password}@127.0.0.1:{self.port}/{database}"
        self.dir: Path | None = None
        self.bin = pg_bin_dir()

    @classmethod
    def available(cls) -> bool:
        """True when the PostgreSQL server binaries are installed."""
        return pg_bin_dir() is not None

    def _as_owner(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        if os.geteuid() == 0:
            cmd = " ".join(_quote(a) for a in argv)
            argv = ["su", "postgres", "-s", "/bin/sh", "-c", cmd]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)

    def start(self) -> PostgresServer:
        """initdb, start, create the role and database."""
        if self.bin is None:
            raise SmartbeamError("PostgreSQL binaries not found: run "
                                 "scripts/install-system-deps.sh")
        self.dir = Path(tempfile.mkdtemp(prefix="smartbeam-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"
        steps = [
            [str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "-E", "UTF8", "--no-sync"],
            [str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "log"), "-w",
             "-o", f"-p {self.port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off",
             "start"],
        ]
        for argv in steps:
            res = self._as_owner(argv)
            if res.returncode != 0:
                raise SmartbeamError(f"{Path(argv[0]).name} failed: {res.stderr.strip()[-800:]}")
        # Separate -c: CREATE DATABASE cannot run inside a transaction block.
        res = self._as_owner([str(self.bin / "psql"), "-h", str(data), "-p", str(self.port),
                              "-U", "postgres", "-v", "ON_ERROR_STOP=1",
                              "-c", f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'",
                              "-c", f"CREATE DATABASE {self.database} OWNER {self.user}"])
        if res.returncode != 0:
            self.stop()
            raise SmartbeamError(f"psql failed: {res.stderr.strip()[-800:]}")
        return self

    def stop(self) -> None:
        """Stop the cluster and delete its files."""
        if self.dir is None:
            return
        data = self.dir / "data"
        if (data / "postmaster.pid").exists():
            self._as_owner([str(self.bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                            "stop"])
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


class TiledServe:
    """``smartbeam serve`` as a subprocess on a free loopback port.

    Parameters
    ----------
    data_dir
        ``--data-dir``.
    api_key
        ``--api-key``.
    catalog
        ``--catalog`` (PostgreSQL URI) or ``None`` for SQLite.
    workers
        ``--workers``.
    extra
        More command-line arguments.

    Attributes
    ----------
    uri : str
        ``http://127.0.0.1:PORT``.
    log_path : Path
        The server's combined stdout/stderr.
    """

    def __init__(self, data_dir: str | os.PathLike, api_key: str, *, catalog: str | None = None,
                 workers: int = 1, extra: list[str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.api_key = api_key
        self.catalog = catalog
        self.workers = workers
        self.extra = list(extra or [])
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir / "serve.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> TiledServe:
        """Start the server and wait until it answers HTTP."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "smartbeam.cli", "serve", "--data-dir", str(self.data_dir),
                "--port", str(self.port), "--workers", str(self.workers), *self.extra]
        env = dict(os.environ)
        # The key and the catalog URI (with its password) go through the environment, not
        # argv, which every user can read in `ps`.
        env["TILED_SINGLE_USER_API_KEY"] = self.api_key
        if self.catalog:
            env["SMARTBEAM_CATALOG_URI"] = self.catalog
            argv.append("--init")
        log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        wait_for_port(self.port, timeout, self.proc, "smartbeam serve")
        self._wait_http(timeout)
        return self

    def _wait_http(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.uri}/api/v1/", timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SmartbeamError(f"smartbeam serve did not answer at {self.uri} within {timeout} s")

    def log(self) -> str:
        """What the server printed so far."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        """Stop the server (all its workers)."""
        _stop(self.proc)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> TiledServe:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ReManager:
    """``start-re-manager`` with the beamline profile, talking to a private Redis.

    Parameters
    ----------
    redis_url
        The Redis the manager (and the worker's RunEngine metadata) use.
    startup_dir
        The profile's startup directory.
    env
        Extra environment of the manager and its worker (store, time scale, ...).
    log_path
        Where the manager's output goes.
    extra_args
        More ``start-re-manager`` options (e.g. ``--existing-plans-devices PATH``).

    Attributes
    ----------
    zmq_control, zmq_info : str
        Addresses to give ``bluesky_queueserver_api.zmq.REManagerAPI``.
    """

    def __init__(self, redis_url: str, startup_dir: str | os.PathLike, *,
                 env: dict[str, str] | None = None,
                 log_path: str | os.PathLike | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.redis_url = redis_url
        self.extra_args = list(extra_args or [])
        self.startup_dir = Path(startup_dir)
        self.env = dict(env or {})
        self.control_port, self.info_port = free_port(), free_port()
        self.zmq_control = f"tcp://127.0.0.1:{self.control_port}"
        self.zmq_info = f"tcp://127.0.0.1:{self.info_port}"
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    def start(self) -> ReManager:
        """Start the manager (the worker environment is opened through the API)."""
        exe = Path(sys.executable).parent / "start-re-manager"
        redis_addr = self.redis_url.split("://", 1)[-1]
        argv = [str(exe), "--startup-dir", str(self.startup_dir),
                "--redis-addr", redis_addr,
                "--zmq-control-addr", f"tcp://127.0.0.1:{self.control_port}",
                "--zmq-info-addr", f"tcp://127.0.0.1:{self.info_port}",
                "--zmq-publish-console", "ON",
                # Validate against the committed plan list and never rewrite it.
                "--update-existing-plans-devices", "NEVER", *self.extra_args]
        env = dict(os.environ, **self.env)
        env["SMARTBEAM_REDIS_URL"] = self.redis_url
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._out = out
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        wait_for_port(self.control_port, 60, self.proc, "start-re-manager")
        return self

    def stop(self) -> None:
        """Stop the manager, its worker and whatever the worker started (twin IOCs run
        in sessions of their own, so the process-group signal does not reach them)."""
        import psutil

        try:
            descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except (psutil.Error, AttributeError):
            descendants = []
        _stop(self.proc, timeout=30)
        for child in descendants:
            try:
                child.terminate()
            except psutil.Error:
                pass
        psutil.wait_procs(descendants, timeout=10)
        if self._out not in (None, subprocess.DEVNULL):
            self._out.close()

    def __enter__(self) -> ReManager:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
