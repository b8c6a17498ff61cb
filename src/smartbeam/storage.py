"""Run storage in Tiled: the embedded default server, a writer, and run queries.

The embedded default runs Tiled in this process (``SimpleTiledServer``: SQLite catalog,
array files and DuckDB tables in a data directory). A remote Tiled server (e.g. the
PostgreSQL-backed scale-out deployment) is used instead when a URI is given. Runs live
in a ``CatalogOfBlueskyRuns`` container, so ``runs[uid]``, ``runs[scan_id]``,
``runs[-1]``, ``.search(...)`` and databroker's views work on it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SmartbeamError, SmartbeamInputError

__all__ = [
    "RUNS_CONTAINER",
    "JournaledWriter",
    "ReplayReport",
    "Storage",
    "decode_document",
    "default_data_dir",
    "encode_document",
    "find_runs",
    "read_journal",
    "read_stream",
    "replay_backups",
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


_PROCESS_API_KEY = secrets.token_hex(16)


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
            # One key for every embedded server of this process: Tiled keeps the
            # single-user key in process-wide settings, so a second server with another
            # key locks the first one's clients out (401).
            self.server = SimpleTiledServer(self.data_dir, api_key=_PROCESS_API_KEY)
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
    def writer(self, batch_size: int = DEFAULT_BATCH_SIZE,
               backup_directory: str | os.PathLike | None = None):
        """A writer that puts runs live into :attr:`runs`.

        Parameters
        ----------
        batch_size
            Events per request; small enough that events appear during the run.
        backup_directory
            Journal directory (default ``$SMARTBEAM_BACKUP_DIR``, none if unset): with it, every document of a run is also appended to
            ``<backup_directory>/<uid>.jsonl.inprogress`` (numpy arrays kept exactly);
            the journal is deleted when Tiled took the whole run and kept as
            ``<uid>.jsonl`` when a write failed. ``smartbeam replay`` puts kept journals
            into Tiled. See :class:`JournaledWriter`.

        Returns
        -------
        callable
            ``(name, doc)`` callback: a ``TiledWriter``, or a :class:`JournaledWriter`
            around one when ``backup_directory`` is given.
        """
        tiled_writer = self._tiled_writer(batch_size)
        if backup_directory is None:
            backup_directory = os.environ.get("SMARTBEAM_BACKUP_DIR") or None
        if backup_directory is None:
            return tiled_writer
        return JournaledWriter(tiled_writer, backup_directory)

    def _tiled_writer(self, batch_size: int):
        from bluesky_tiled_plugins import TiledWriter

        # max_array_size=0: every array gets its own node; small 2-D arrays otherwise
        # go into the internal table, which pyarrow refuses for ndim > 1.
        return TiledWriter(self.runs, batch_size=batch_size, max_array_size=0)

    def replay(self, directory: str | os.PathLike, batch_size: int = DEFAULT_BATCH_SIZE
               ) -> ReplayReport:
        """Put the journals kept in ``directory`` into this store; see :func:`replay_backups`."""
        return replay_backups(self.runs, directory, lambda: self._tiled_writer(batch_size))

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


# -- journal (backup) of run documents ---------------------------------------------------
# bluesky-tiled-plugins' own backup (backup_directory=) keeps every document of the run in
# memory until a write fails (unbounded for a long SANS count) and its json.dump cannot
# encode numpy arrays (event frames), so the backup of an image run is lost. The journal
# below streams each document to disk as it passes and encodes arrays exactly.

JOURNAL_SUFFIX = ".jsonl"
INPROGRESS_SUFFIX = ".jsonl.inprogress"
REPLAYED_SUFFIX = ".jsonl.replayed"
_ARRAY_TAG = "__ndarray__"


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic):
        arr = np.asarray(obj)  # ascontiguousarray would make a scalar 1-D
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")
        if arr.dtype.kind in "OUS":  # strings/objects: exact as JSON lists
            return {_ARRAY_TAG: arr.tolist(), "dtype": arr.dtype.str, "shape": list(arr.shape),
                    "scalar": isinstance(obj, np.generic), "encoding": "list"}
        return {_ARRAY_TAG: base64.b64encode(arr.tobytes()).decode("ascii"),
                "dtype": arr.dtype.str, "shape": list(arr.shape),
                "scalar": isinstance(obj, np.generic), "encoding": "base64"}
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_encode(v) for v in obj]
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if _ARRAY_TAG in obj:
            if obj.get("encoding") == "list":
                arr = np.array(obj[_ARRAY_TAG], dtype=obj["dtype"]).reshape(obj["shape"])
            else:
                raw = base64.b64decode(obj[_ARRAY_TAG])
                arr = np.frombuffer(raw, dtype=obj["dtype"]).reshape(obj["shape"]).copy()
            return arr[()] if obj.get("scalar") else arr
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def encode_document(name: str, doc: dict) -> str:
    """One journal line: ``{"name": ..., "doc": ...}`` with numpy arrays tagged exactly.

    Parameters
    ----------
    name
        Document name (``start``, ``descriptor``, ``event``, ...).
    doc
        The document; numpy arrays and scalars keep dtype and shape.
    """
    return json.dumps({"name": name, "doc": _encode(doc)}, allow_nan=True)


def decode_document(line: str) -> tuple[str, dict]:
    """Inverse of :func:`encode_document`; also reads plain (untagged) JSON lines.

    Raises
    ------
    SmartbeamInputError
        When the line is not a ``{"name", "doc"}`` JSON object.
    """
    try:
        item = json.loads(line)
        name, doc = item["name"], item["doc"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SmartbeamInputError(f"journal line {line[:60]!r}...: expected a JSON object "
                                  f'{{"name": ..., "doc": ...}} ({exc})') from None
    if not isinstance(name, str) or not isinstance(doc, dict):
        raise SmartbeamInputError(f"journal line {line[:60]!r}...: expected a string name and "
                                  "an object doc")
    return name, _decode(doc)


def read_journal(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """The documents of one journal file, in order.

    A truncated last line (the process died while writing it) is skipped with a warning;
    any other bad line raises :class:`~smartbeam.errors.SmartbeamInputError` naming it.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield decode_document(line)
        except SmartbeamInputError as exc:
            if i == len(lines) - 1 and not line.endswith("\n"):
                logger.warning("%s: truncated last line skipped", path)
                return
            raise SmartbeamInputError(f"{path}:{i + 1}: {exc}") from None


class _RunJournal:
    """Journal of one run: every document appended and flushed as it passes."""

    def __init__(self, directory: Path, uid: str) -> None:
        self.uid = uid
        self.inprogress = directory / f"{uid}{INPROGRESS_SUFFIX}"
        self.final = directory / f"{uid}{JOURNAL_SUFFIX}"
        self._fh = open(self.inprogress, "a", encoding="utf-8")  # noqa: SIM115 (lives per run)
        self.primary_failed = False
        self.descriptors: set[str] = set()

    def append(self, name: str, doc: dict) -> None:
        self._fh.write(encode_document(name, doc) + "\n")
        # flushed per document: a crash of this process loses at most the line in flight
        self._fh.flush()

    def close(self, keep: bool) -> Path | None:
        self._fh.close()
        if keep:
            os.replace(self.inprogress, self.final)
            return self.final
        self.inprogress.unlink(missing_ok=True)
        return None


class JournaledWriter:
    """Write runs to Tiled and keep a journal of each run until Tiled has all of it.

    Every document is appended to ``<directory>/<uid>.jsonl.inprogress`` *before* it is
    handed to the primary writer. If the primary raises (server stopped, network down,
    disk full), the primary is abandoned for the rest of that run (a partial run never
    gets a stop document from it) and the journal is kept as ``<uid>.jsonl`` at the stop;
    :func:`replay_backups` (``smartbeam replay DIR``) puts it into Tiled later. When the
    whole run went through, the journal is deleted. A journal left as ``.inprogress``
    means this process died mid-run; it is replayed too.

    Memory stays bounded (nothing is buffered); the cost is one JSON line per document.

    Parameters
    ----------
    primary
        The ``(name, doc)`` writer, usually a ``TiledWriter``.
    directory
        Journal directory (created if missing).
    on_failure
        Called as ``on_failure(uid, exception)`` when the primary fails for a run.
    """

    def __init__(self, primary: Callable[[str, dict], Any], directory: str | os.PathLike,
                 on_failure: Callable[[str, BaseException], Any] | None = None) -> None:
        self.primary = primary
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.on_failure = on_failure
        self._runs: dict[str, _RunJournal] = {}
        self._desc_to_run: dict[str, str] = {}
        self.kept: list[Path] = []
        self.failures: dict[str, str] = {}

    def _run_of(self, name: str, doc: dict) -> str | None:
        if name == "start":
            return doc["uid"]
        if name in ("descriptor", "stop"):
            return doc.get("run_start")
        if name in ("event", "event_page"):
            return self._desc_to_run.get(doc.get("descriptor"))
        if name in ("resource", "stream_resource"):
            return doc.get("run_start")
        if name in ("datum", "datum_page", "stream_datum"):
            # datum docs carry no run uid; with one run at a time it is the open one
            return next(reversed(self._runs), None) if self._runs else None
        return None

    def __call__(self, name: str, doc: dict) -> None:
        uid = self._run_of(name, doc)
        if name == "start":
            self._runs[uid] = _RunJournal(self.directory, uid)
        journal = self._runs.get(uid)
        if journal is None:  # not a run we saw start: pass through
            self.primary(name, doc)
            return
        if name == "descriptor":
            self._desc_to_run[doc["uid"]] = uid
            journal.descriptors.add(doc["uid"])
        journal.append(name, doc)
        if not journal.primary_failed:
            try:
                self.primary(name, doc)
            except Exception as exc:  # storage down: the journal has everything
                journal.primary_failed = True
                self.failures[uid] = f"{type(exc).__name__}: {exc}"
                logger.error("Tiled write of run %s failed at a %r document (%s); the run "
                             "continues into the journal %s; put it in later with "
                             "`smartbeam replay %s`", uid[:8], name, exc, journal.final,
                             self.directory)
                if self.on_failure is not None:
                    self.on_failure(uid, exc)
        if name == "stop":
            kept = journal.close(keep=journal.primary_failed)
            if kept is not None:
                self.kept.append(kept)
            for d in journal.descriptors:
                self._desc_to_run.pop(d, None)
            del self._runs[uid]


@dataclass
class ReplayReport:
    """What :func:`replay_backups` did, per journal file."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        """JSON-serialisable summary."""
        return {"written": self.written, "skipped": self.skipped, "replaced": self.replaced,
                "incomplete": self.incomplete}


def _journal_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob(f"*{JOURNAL_SUFFIX}")) + sorted(
        directory.glob(f"*{INPROGRESS_SUFFIX}"))
    return files


def _counts(docs: list[tuple[str, dict]]) -> dict[str, int]:
    names = {d["uid"]: d.get("name", "primary") for n, d in docs if n == "descriptor"}
    counts: dict[str, int] = {}
    for n, d in docs:
        if n == "event":
            s = names.get(d["descriptor"], "?")
            counts[s] = counts.get(s, 0) + 1
        elif n == "event_page":
            s = names.get(d["descriptor"], "?")
            counts[s] = counts.get(s, 0) + len(d["seq_num"])
    return counts


def _stored_complete(run, stop: dict | None, counts: dict[str, int]) -> bool:
    """True when the stored run has the journal's stop document and every event."""
    if stop is None or (run.metadata.get("stop") or {}).get("uid") != stop["uid"]:
        return False
    for stream, n in counts.items():
        if stream not in run:
            return False
        node = run[stream]
        try:
            stored = len(node["seq_num"].read())
        except Exception:
            return False
        if stored != n:
            return False
    return True


def replay_backups(runs, directory: str | os.PathLike,
                   make_writer: Callable[[], Callable[[str, dict], Any]]) -> ReplayReport:
    """Put every journal in ``directory`` into the ``runs`` container; idempotent.

    For each journal: a run already stored complete (same stop document, same number of
    events per stream) is skipped; a partial one (the writes before the failure) is
    deleted and written again from the journal, so the result equals an undisturbed
    run; a missing one is written. Replayed journals are renamed ``*.jsonl.replayed``.

    Parameters
    ----------
    runs
        The ``CatalogOfBlueskyRuns`` Tiled node.
    directory
        The journal directory given to :class:`JournaledWriter`.
    make_writer
        Returns a fresh ``(name, doc)`` writer into ``runs`` (a ``TiledWriter``).

    Raises
    ------
    SmartbeamInputError
        When ``directory`` does not exist or a journal is unreadable.
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise SmartbeamInputError(f"backup directory {str(directory)!r} does not exist; "
                                  "expected the directory given as backup_directory")
    report = ReplayReport()
    for path in _journal_files(directory):
        docs = list(read_journal(path))
        if not docs or docs[0][0] != "start":
            raise SmartbeamInputError(f"{path}: expected a journal starting with a start "
                                      f"document, found {docs[0][0] if docs else 'nothing'!r}")
        uid = docs[0][1]["uid"]
        stop = next((d for n, d in docs if n == "stop"), None)
        if stop is None:
            report.incomplete.append(uid)
        counts = _counts(docs)
        if uid in runs:
            if _stored_complete(runs[uid], stop, counts):
                report.skipped.append(uid)
                path.rename(path.with_name(f"{uid}{REPLAYED_SUFFIX}"))
                continue
            runs.delete_contents(uid, recursive=True, external_only=False)
            report.replaced.append(uid)
        writer = make_writer()
        for name, doc in docs:
            writer(name, doc)
        report.written.append(uid)
        path.rename(path.with_name(f"{uid}{REPLAYED_SUFFIX}"))
    return report
