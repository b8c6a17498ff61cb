"""Run storage in Tiled: the embedded default server, a writer, and run queries.

The embedded default runs Tiled in this process (``SimpleTiledServer``: SQLite catalog,
array files and DuckDB tables in a data directory). A remote Tiled server (e.g. the
PostgreSQL-backed scale-out deployment) is used instead when a URI is given. Runs live
in a ``CatalogOfBlueskyRuns`` container, so ``runs[uid]``, ``runs[scan_id]``,
``runs[-1]``, ``.search(...)`` and databroker's views work on it.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SmartbeamError, SmartbeamInputError

__all__ = [
    "RUNS_CONTAINER",
    "Storage",
    "default_data_dir",
    "find_runs",
    "read_stream",
]

logger = logging.getLogger(__name__)

RUNS_CONTAINER = "runs"
# Events are sent in batches so they are visible during the run without paying
# ~80 ms per single-event request (REFERENCE: batch_size=1 costs that much).
DEFAULT_BATCH_SIZE = 100


def default_data_dir() -> Path:
    """Where the embedded store keeps its data: ``$SMARTBEAM_DATA_DIR`` or the user data dir."""
    env = os.environ.get("SMARTBEAM_DATA_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("smartbeam")) / "tiled"


def _stable_api_key(data_dir: Path) -> str:
    """The embedded server's API key, kept in the data dir so other processes can reuse it."""
    key_file = data_dir / "api_key"
    if key_file.exists():
        return key_file.read_text().strip()
    key = secrets.token_hex(16)
    data_dir.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600)
    key_file.write_text(key)
    return key


class Storage:
    """A connection to the run store, embedded or remote.

    Parameters
    ----------
    data_dir
        Directory of the embedded store (created if missing); default
        :func:`default_data_dir`. Ignored when ``uri`` is given.
    uri
        URI of a running Tiled server (``http://host:port``); its API key from
        ``api_key`` or ``$TILED_API_KEY``.
    api_key
        API key of the remote server.

    Examples
    --------
    >>> with Storage("/tmp/sb") as store:          # doctest: +SKIP
    ...     RE.subscribe(store.writer())
    ...     RE(count([det]))
    ...     run = store.runs[-1]
    """

    def __init__(self, data_dir: str | os.PathLike | None = None, *, uri: str | None = None,
                 api_key: str | None = None) -> None:
        self.uri = uri
        self.api_key = api_key or os.environ.get("TILED_API_KEY")
        self.data_dir = None if uri else Path(data_dir or default_data_dir()).expanduser()
        self.server = None
        self.client = None
        self._runs = None

    # -- lifecycle ------------------------------------------------------------------
    def open(self) -> Storage:
        """Start the embedded server (or connect to the remote one)."""
        from tiled.client import from_uri

        if self.client is not None:
            return self
        if self.uri:
            try:
                self.client = from_uri(self.uri, api_key=self.api_key)
            except Exception as exc:
                raise SmartbeamError(f"cannot reach Tiled at {self.uri}: {exc}") from exc
        else:
            from tiled.server import SimpleTiledServer

            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.server = SimpleTiledServer(self.data_dir, api_key=_stable_api_key(self.data_dir))
            # The server thread is not a daemon and the interpreter joins such threads
            # *before* atexit handlers run: register the close where it runs first.
            threading._register_atexit(self.close)
            self.client = from_uri(self.server.uri)
        self._runs = self._runs_container()
        return self

    def close(self) -> None:
        """Stop the embedded server (its thread is not a daemon: always close)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        self.client = None
        self._runs = None

    def __enter__(self) -> Storage:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _runs_container(self):
        from tiled.structures.core import Spec

        if RUNS_CONTAINER in self.client:
            return self.client[RUNS_CONTAINER]
        return self.client.create_container(
            RUNS_CONTAINER, specs=[Spec("CatalogOfBlueskyRuns", version="3.0")])

    @property
    def runs(self):
        """The ``CatalogOfBlueskyRuns`` container (a Tiled client node)."""
        if self._runs is None:
            raise SmartbeamError("storage is not open: use `with Storage(...) as store:`")
        return self._runs

    @property
    def location(self) -> str:
        """Human-readable location of the store."""
        return self.uri or str(self.data_dir)

    # -- writing --------------------------------------------------------------------
    def writer(self, batch_size: int = DEFAULT_BATCH_SIZE, backup_directory: str | None = None):
        """A ``TiledWriter`` that writes runs live into :attr:`runs`.

        Parameters
        ----------
        batch_size
            Events per request; small enough that events appear during the run.
        backup_directory
            Where documents go if the server becomes unreachable.
        """
        from bluesky_tiled_plugins import TiledWriter

        # max_array_size=0: every array gets its own node; small 2-D arrays otherwise
        # go into the internal table, which pyarrow refuses for ndim > 1.
        return TiledWriter(self.runs, batch_size=batch_size, backup_directory=backup_directory,
                           max_array_size=0)

    # -- reading --------------------------------------------------------------------
    def find(self, **criteria: Any) -> list:
        """Runs matching metadata; see :func:`find_runs`."""
        return find_runs(self.runs, **criteria)

    def run(self, key: str | int):
        """One run by uid, partial uid or scan_id (negative: most recent first)."""
        try:
            return self.runs[key]
        except KeyError:
            raise SmartbeamInputError(
                f"no run {key!r} in {self.location}; expected a uid, partial uid or scan_id"
            ) from None


def find_runs(runs, *, uid: str | None = None, scan_id: int | None = None,
              plan_name: str | None = None, sample: str | None = None,
              **metadata: Any) -> list:
    """Find runs by uid, scan_id, plan name, sample or any start-document key.

    Parameters
    ----------
    runs
        A ``CatalogOfBlueskyRuns`` Tiled node (e.g. ``Storage.runs``).
    uid, scan_id, plan_name, sample
        Criteria on the start document; ``None`` means "any".
    **metadata
        More exact-match criteria on start-document keys.

    Returns
    -------
    list
        Matching run clients, oldest first.
    """
    from tiled.queries import Key

    if uid is not None:
        return [runs[uid]] if uid in runs else []
    criteria = dict(metadata)
    if scan_id is not None:
        criteria["scan_id"] = scan_id
    if plan_name is not None:
        criteria["plan_name"] = plan_name
    if sample is not None:
        criteria["sample"] = sample
    results = runs
    for key, value in criteria.items():
        results = results.search(Key(f"start.{key}") == value)
    return list(results.values())


def read_stream(run, stream: str = "primary", keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Read a stream of a run as numpy arrays keyed by data key.

    Parameters
    ----------
    run
        A run client (from :func:`find_runs` or ``Storage.run``).
    stream
        Stream name: ``primary`` or a derived stream (``kde``, ``decisions``, ...).
    keys
        Data keys to read (default: all).
    """
    if stream not in run:
        raise SmartbeamInputError(
            f"run {run.metadata['start'].get('uid', '?')[:8]} has no stream {stream!r}; "
            f"streams: {sorted(run)}"
        )
    node = run[stream]
    # Fields sit directly under the stream node, beside seq_num/time and ts_* timestamps.
    names = list(keys) if keys is not None else [
        k for k in node if not k.startswith("ts_") and k != "seq_num"]
    return {name: np.asarray(node[name].read()) for name in names}
