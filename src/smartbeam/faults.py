"""Fault handling: suspend a plan while an IOC is gone or frozen; flag bad detector frames.

IOC faults
    :class:`IOCSuspender` is a bluesky suspender that watches every EPICS signal of a
    device. It trips when any PV disconnects (the IOC process died: immediate) or when a
    probe PV stops answering reads (the IOC is frozen or the network stalls: within
    ``period + timeout``), and releases when all PVs are connected and the probe answers
    again. The RunEngine then rewinds to the plan's last checkpoint and repeats the
    interrupted point; with ``restore=True`` the device's configuration (dwell, acquire
    time, shutter, field, ...) is first written back, since a restarted IOC comes up with
    its defaults. The suspension's justification names the PVs. Plans keep their Python
    state (a GP, a KDE) across a suspension: the generator is not restarted.

    An IOC that dies *during* a CA call makes that call raise at once (ophyd's
    ``DisconnectedError``), before the watchdog's request reaches the RunEngine. So the
    suspender also guards the RunEngine's device commands (``read``, ``trigger``, ``set``,
    ``wait``, ``locate``): a connection failure on a watched device trips the suspender
    right there, and the command waits for the suspension instead of throwing into the
    plan. When the plan cannot be rewound (no checkpoint yet) the command fails with
    :class:`IOCFaultError`, which names the PVs and the IOC (prefix, CA address list).

    A replay must never save an event twice (each point is in Tiled once): with the
    suspenders installed, every ``save`` also acts as a checkpoint. A suspension request
    travels through two event-loop hops and lands one or two messages later, often just
    after a ``save`` and before the plan's next checkpoint; bluesky would then replay the
    saved reading as a second event with the same ``seq_num``. Plans that need a state
    (a position) re-established for each reading re-issue it after their checkpoint (as
    the smartbeam plans do); bluesky's step plans save once per checkpoint anyway.

Bad detector frames
    :func:`check_frame` applies the rules below to one frame; :class:`FrameQualityMonitor`
    applies them to a run and writes a ``frame_quality`` stream (one row per frame) into
    it. Raw frames are always written unchanged. Rules, in order:

    ``wrong_shape``
        Not 2-D, or a shape different from the first frame of the run: rejected.
    ``bad_values``
        Any NaN, inf or negative count: rejected (counts are non-negative integers).
    ``repeated``
        The detector's frame counter did not advance, or the frame is bit-identical to the
        previous accepted one and holds at least ``min_repeat_counts`` counts (two
        independent Poisson frames of that many counts are practically never equal; a
        stuck readout can repeat a buffer while its counter still advances): rejected,
        since counting it twice would double its counts and understate noise. Consumers
        that sum frames (:class:`~smartbeam.callbacks.live_kde.LiveKDE`) skip it and count
        it (``n_repeated`` in the ``kde`` stream).
    ``dropped``
        The counter advanced by more than one: the frame itself is accepted, the
        ``n_dropped`` missing frames are reported (their counts are lost; rates stay
        right because exposure is summed over received frames only).
    ``ok``
        Accepted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash
from bluesky.suspenders import SuspenderBase
from event_model import unpack_event_page

from .callbacks.derived import DerivedStreamRouter, DocumentCallback
from .epics_env import address_list
from .errors import SmartbeamError, SmartbeamInputError

__all__ = [
    "FRAME_FLAGS",
    "FrameQualityMonitor",
    "FrameSequence",
    "FrameVerdict",
    "IOCFaultError",
    "IOCSuspender",
    "as_frame_counter",
    "check_frame",
    "guard_run_engine",
    "install_ioc_suspenders",
]

logger = logging.getLogger(__name__)


class IOCFaultError(SmartbeamError, ConnectionError):
    """An IOC stopped answering during a plan that could not be suspended and resumed."""


# RunEngine commands that talk to devices: a dead IOC makes them raise at once.
GUARDED_COMMANDS = ("read", "trigger", "set", "wait", "locate")
_CONNECTION_ERRORS = ("DisconnectedError", "ChannelAccessException", "FailedStatus")


def _is_connection_error(exc: BaseException) -> bool:
    """A timeout or a lost channel anywhere in the exception's chain."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, TimeoutError | ConnectionError) or \
                any(c.__name__ in _CONNECTION_ERRORS for c in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _root(obj):
    return getattr(obj, "root", obj)


def guard_run_engine(RE) -> None:
    """Make ``RE`` safe for IOC suspensions (idempotent; done by :class:`IOCSuspender`).

    Wraps the device commands (:data:`GUARDED_COMMANDS`) so that a connection failure on
    a device watched by an installed :class:`IOCSuspender` becomes a suspension (or an
    :class:`IOCFaultError`), and makes every ``save`` a checkpoint so that a rewind never
    replays an event already saved (see the module notes).

    Parameters
    ----------
    RE
        The RunEngine.
    """
    if getattr(RE, "_smartbeam_ioc_guard", False):
        return
    # bluesky 1.15 has no public getter for a registered command; chain to whatever is there
    registry = RE._command_registry
    for name in GUARDED_COMMANDS:
        RE.register_command(name, _guarded(RE, registry[name]))
    RE.register_command("save", _save_is_checkpoint(RE, registry["save"]))
    RE._smartbeam_ioc_guard = True


def _save_is_checkpoint(RE, command):
    async def save(msg):
        ret = await command(msg)
        # what the 'checkpoint' command does (bluesky 1.15 offers no public call): the
        # rewind cache restarts after the saved event, so no replay repeats it
        if RE.resumable:
            RE._reset_checkpoint_state()
        return ret
    return save


def _guarded(RE, command):
    async def guarded(msg):
        try:
            return await command(msg)
        except Exception as exc:
            suspenders = [s for s in RE.suspenders if isinstance(s, IOCSuspender)]
            if msg.obj is not None:
                suspenders = [s for s in suspenders if _root(s.device) is _root(msg.obj)]
            for susp in suspenders:
                if susp.fault_now(exc, msg.obj):
                    await susp.suspend_or_raise(msg, exc)
            raise
    return guarded


def _epics_signals(device) -> list:
    """Every signal of ``device`` (or the signal itself) that talks to a PV."""
    if hasattr(device, "walk_signals"):
        items = [w.item for w in device.walk_signals(include_lazy=True)]
    else:
        items = [device]
    return [s for s in items if hasattr(s, "pvname")]


class IOCSuspender(SuspenderBase):
    """Suspend the RunEngine while an IOC behind ``device`` is disconnected or frozen.

    Parameters
    ----------
    device
        An ophyd device (or signal) with EPICS signals.
    probe
        Signal read every ``period`` seconds to detect a frozen IOC; default: the first
        read-only PV of the device (a readback or counter).
    period
        Seconds between probe reads.
    timeout
        Seconds a probe read may take before the IOC counts as stalled.
    sleep
        Seconds to wait after the IOC is back before resuming.
    restore
        On resume, write back the configuration values last read while healthy.
    tripped_message
        Extra text for the suspension's justification.

    Notes
    -----
    Install with ``RE.install_suspender(suspender)`` or :func:`install_ioc_suspenders`.
    The plan needs checkpoints (``bps.checkpoint()`` before each point; ``count`` and
    ``scan`` have them) to repeat only the interrupted point.
    """

    def __init__(self, device, *, probe=None, period: float = 0.5, timeout: float = 1.0,
                 sleep: float = 0.5, restore: bool = True, tripped_message: str = "") -> None:
        signals = _epics_signals(device)
        if not signals:
            raise SmartbeamInputError(f"{getattr(device, 'name', device)!r} has no EPICS "
                                      "signals: expected an ophyd EPICS device")
        if not (period > 0 and timeout > 0 and sleep >= 0):
            raise SmartbeamInputError(f"period={period!r}, timeout={timeout!r}, sleep={sleep!r}:"
                                      " expected period > 0, timeout > 0, sleep >= 0")
        if probe is None:
            probe = next((s for s in signals if not hasattr(s, "put") or
                          type(s).__name__.endswith("RO")), signals[0])
        self.device = device
        self.signals = signals
        self.probe = probe
        self.period = float(period)
        self.timeout = float(timeout)
        self.restore = restore
        self._disconnected: set[str] = set()
        self._stalled = ""
        self._in_fault = False
        # between a fault and the restore, the IOC may serve its defaults: no snapshots
        self._restore_pending = False
        self._snapshot: dict = {}
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._thread: threading.Thread | None = None
        self.trips: list[str] = []
        super().__init__(probe, sleep=sleep, tripped_message=tripped_message,
                         post_plan=self._restore_plan if restore else None)

    def __repr__(self) -> str:
        # the base repr shows post_plan, a bound method whose repr is this repr: recursion
        return (f"IOCSuspender({getattr(self.device, 'name', '?')!r}, period={self.period}, "
                f"timeout={self.timeout}, sleep={self._sleep}, restore={self.restore})")

    # -- watching ----------------------------------------------------------------------
    def install(self, RE, *, event_type=None) -> None:
        """Watch connections and start the probe thread (called by ``RE.install_suspender``)."""
        with self._lock:
            self.RE = RE
        guard_run_engine(RE)
        for sig in self.signals:
            sig.subscribe(self._on_meta, event_type=sig.SUB_META, run=True)
        self._take_snapshot()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, daemon=True,
                                        name=f"IOCSuspender-{getattr(self.device, 'name', '')}")
        self._thread.start()

    def remove(self) -> None:
        """Stop watching (called by ``RE.remove_suspender``)."""
        self._stop.set()
        for sig in self.signals:
            sig.clear_sub(self._on_meta)
        if self._thread is not None:
            self._thread.join(self.period + self.timeout + 1.0)
        super().remove()

    def _live_disconnected(self) -> set[str]:
        return {s.pvname for s in self.signals if not getattr(s, "connected", True)}

    def fault_now(self, exc: BaseException | None = None, obj=None) -> bool:
        """Whether the IOC is faulty right now (used when a device command failed).

        Any watched PV disconnected, or ``exc`` is a timeout / lost-connection error of a
        watched device: the suspender's state is updated at once, without waiting for
        the next probe.

        Parameters
        ----------
        exc
            The exception the command raised.
        obj
            The object of the failed command (its PVs are named in the reason).
        """
        disconnected = self._live_disconnected()
        if disconnected:
            self._disconnected |= disconnected
            return True
        if exc is not None and _is_connection_error(exc):
            pvs = sorted(sig.pvname for sig in _epics_signals(obj)) if obj is not None else []
            shown = ", ".join(pvs[:4]) + (f" and {len(pvs) - 4} more" if len(pvs) > 4 else "")
            self._stalled = (f"{shown or self.probe.pvname} did not answer "
                             f"({type(exc).__name__}: {exc})")
            return True
        return False

    async def suspend_or_raise(self, msg, exc: BaseException) -> None:
        """Trip now (from the RunEngine's loop) and wait for the suspension to cancel the
        failed command; raise :class:`IOCFaultError` if the plan cannot be suspended."""
        RE = self.RE
        if RE is None or not RE.resumable:
            raise IOCFaultError(self._fault_message(msg, exc, "the plan has no checkpoint "
                                                    "to resume from, so it stopped")) from exc
        self._evaluate()
        # the suspension request cancels this task: CancelledError leaves through here
        await asyncio.sleep(self.period + self.timeout + 5.0)
        raise IOCFaultError(self._fault_message(msg, exc, "the suspension did not "
                                                "start")) from exc

    def _name(self) -> str:
        return getattr(self.device, "name", "?")

    def _fault_message(self, msg, exc, what: str) -> str:
        prefix = getattr(self.device, "prefix", "") or ""
        obj = getattr(msg.obj, "name", None)
        return (f"IOC of {self._name()!r} (PV prefix {prefix!r}; {address_list()}) is not "
                f"answering: {self._reason() or exc}; during {msg.command!r}"
                f"{f' of {obj!r}' if obj else ''}: {what}")

    def _on_meta(self, *args, obj=None, connected=None, **kwargs) -> None:
        if obj is None or connected is None:
            return
        if connected:
            self._disconnected.discard(obj.pvname)
        else:
            self._disconnected.add(obj.pvname)
        # evaluated in the watchdog thread: asking the RunEngine to suspend from libca's
        # callback thread can dead-lock with a CA call in progress on the RunEngine's loop
        self._poke.set()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._poke.wait(self.period)
            self._poke.clear()
            if self._stop.is_set():
                return
            # the live connection state wins over callbacks that may have raced
            self._disconnected = self._live_disconnected()
            if self._disconnected:
                self._evaluate()  # no probe: a disconnected read would only add a timeout
                continue
            try:
                self.probe.get(use_monitor=False, timeout=self.timeout,
                               connection_timeout=self.timeout)
                stalled = ""
            except Exception as exc:  # any failure to read means the IOC does not answer
                stalled = (f"{self.probe.pvname} did not answer within {self.timeout:g} s "
                           f"({type(exc).__name__})")
            self._stalled = stalled
            if not (stalled or self._disconnected or self.tripped or self._in_fault
                    or self._restore_pending):
                self._take_snapshot()
            self._evaluate()

    def _take_snapshot(self) -> None:
        if not self.restore or not hasattr(self.device, "read_configuration"):
            return
        snap = {}
        for attr in getattr(self.device, "configuration_attrs", []):
            sig = getattr(self.device, attr, None)
            if sig is None or not hasattr(sig, "pvname") or not hasattr(sig, "put") or \
                    getattr(sig, "write_access", True) is False:
                continue
            try:
                snap[sig] = sig.get(timeout=self.timeout, connection_timeout=self.timeout)
            except Exception:
                return  # keep the previous complete snapshot
        self._snapshot = snap

    def _evaluate(self) -> None:
        faulty = bool(self._disconnected) or bool(self._stalled)
        try:
            self(faulty)
        except RuntimeError as exc:  # RunEngine loop busy: asked again next period
            logger.debug("suspension request deferred: %s", exc)
            return
        if faulty and not self._in_fault:
            self._in_fault = True
            self._restore_pending = self.restore
            reason = self._reason()
            self.trips.append(reason)
            logger.warning("IOC fault, suspending: %s", reason)
        elif not faulty and self._in_fault:
            self._in_fault = False
            if self.RE is None or self.RE.state == "idle":
                self._restore_pending = False  # nothing to resume: no post-plan will run
            logger.warning("IOC %s is back; resuming", getattr(self.device, "name", "?"))

    def _should_suspend(self, value) -> bool:
        return bool(value)

    def _should_resume(self, value) -> bool:
        return not value

    def _reason(self) -> str:
        parts = []
        if self._disconnected:
            pvs = sorted(self._disconnected)
            shown = ", ".join(pvs[:4]) + (f" and {len(pvs) - 4} more" if len(pvs) > 4 else "")
            parts.append(f"PV(s) disconnected: {shown}")
        if self._stalled:
            parts.append(self._stalled)
        return "; ".join(parts)

    def _get_justification(self) -> str:
        if not self.tripped:
            return ""
        name = getattr(self.device, "name", "?")
        text = f"IOC of {name!r} faulty: {self._reason() or 'recovering'}"
        return ": ".join(s for s in (text, self._tripped_message) if s)

    def _restore_plan(self):
        """Write the healthy configuration back (a restarted IOC has its defaults)."""
        from bluesky import plan_stubs as bps

        args: list[Any] = []
        for sig, value in self._snapshot.items():
            args.extend([sig, value])
        if args:
            logger.warning("restoring configuration of %s: %s",
                           getattr(self.device, "name", "?"),
                           {s.name: v for s, v in self._snapshot.items()})
            yield from bps.mv(*args)
        else:
            yield from bps.null()
        self._restore_pending = False


def install_ioc_suspenders(RE, devices: Iterable, **kwargs) -> list[IOCSuspender]:
    """Install one :class:`IOCSuspender` per device on ``RE``.

    Parameters
    ----------
    RE
        The RunEngine.
    devices
        ophyd EPICS devices (devices without EPICS signals, e.g. in-process twins, are
        skipped).
    **kwargs
        Passed to :class:`IOCSuspender` (``period``, ``timeout``, ``sleep``, ``restore``).

    Returns
    -------
    list of IOCSuspender
        The installed suspenders (``RE.remove_suspender(s)`` to remove one).
    """
    installed = []
    for device in devices:
        if not _epics_signals(device):
            continue
        suspender = IOCSuspender(device, **kwargs)
        RE.install_suspender(suspender)
        installed.append(suspender)
    return installed


# -- bad detector frames -------------------------------------------------------------------

FRAME_FLAGS = ("ok", "wrong_shape", "bad_values", "repeated", "dropped")


@dataclass(frozen=True)
class FrameVerdict:
    """Outcome of :func:`check_frame` for one frame.

    Attributes
    ----------
    flag
        One of :data:`FRAME_FLAGS`.
    accepted
        Whether the frame may be used (``ok`` and ``dropped`` frames are).
    n_dropped
        Frames missing before this one (counter gap - 1).
    detail
        Human-readable reason, empty for ``ok``.
    """

    flag: str
    accepted: bool
    n_dropped: int = 0
    detail: str = ""


def _digest(a: np.ndarray) -> bytes:
    # xxHash's XXH3-128 (not cryptographic, not needed: a detector is no adversary) hashes
    # a 2048^2 frame in ~1.3 ms, BLAKE2b in ~24: the difference between a check that
    # keeps up with a fast detector and one that does not. Includes shape and dtype.
    head = f"{a.dtype.str}{a.shape}".encode()
    return xxhash.xxh3_128_digest(np.ascontiguousarray(a), seed=0) + xxhash.xxh3_64_digest(head)


def _count_bad(a: np.ndarray) -> int:
    # min/max first (one pass each, no temporary): the full count only when something is bad.
    if a.size == 0 or a.dtype.kind in "ub":
        return 0
    if a.dtype.kind == "i":
        return int(np.count_nonzero(a < 0)) if a.min() < 0 else 0
    lo, hi = a.min(), a.max()
    if np.isfinite(lo) and np.isfinite(hi) and lo >= 0:
        return 0
    return int(np.count_nonzero(~np.isfinite(a) | (a < 0)))


def check_frame(frame: Any, *, shape: tuple[int, ...] | None = None,
                counter: int | None = None, previous_counter: int | None = None,
                previous_digest: bytes | None = None,
                min_repeat_counts: float = 10.0) -> tuple[FrameVerdict, bytes | None]:
    """Apply the frame rules of this module to one frame.

    Parameters
    ----------
    frame
        The frame as read (anything array-like).
    shape
        Expected shape (the run's first frame); ``None`` accepts any 2-D shape.
    counter, previous_counter
        The detector's frame counter now and at the previous frame, if it has one.
    previous_digest
        Digest of the previous accepted frame (second return value of the previous call).
    min_repeat_counts
        Without a counter, an identical frame is a repeat only with at least this many
        counts (empty frames of a closed shutter are legitimately identical).

    Returns
    -------
    (FrameVerdict, bytes or None)
        The verdict and the digest to pass as ``previous_digest`` next time.
    """
    try:
        a = np.asarray(frame)
    except Exception as exc:  # ragged or otherwise not an array
        return FrameVerdict("wrong_shape", False, detail=f"not an array ({exc})"), previous_digest
    if a.ndim != 2 or (shape is not None and a.shape != tuple(shape)) or \
            a.dtype.kind not in "iufb":
        want = f"{tuple(shape)}" if shape is not None else "a 2-D frame"
        return (FrameVerdict("wrong_shape", False,
                             detail=f"shape {a.shape} dtype {a.dtype}: expected {want}"),
                previous_digest)
    n_bad = _count_bad(a)
    if n_bad:
        return (FrameVerdict("bad_values", False,
                             detail=f"{n_bad} pixel(s) NaN, inf or negative: expected counts >= 0"),
                previous_digest)
    digest = _digest(a)
    same = (previous_digest is not None and digest == previous_digest
            and float(a.sum(dtype=np.float64)) >= min_repeat_counts)
    if counter is not None and previous_counter is not None:
        step = int(counter) - int(previous_counter)
        if step <= 0:
            return (FrameVerdict("repeated", False,
                                 detail=f"frame counter {counter} did not advance from "
                                        f"{previous_counter}"), previous_digest)
        if same:
            return (FrameVerdict("repeated", False, n_dropped=step - 1,
                                 detail="frame identical to the previous one although the "
                                        f"counter advanced {previous_counter} -> {counter}"),
                    previous_digest)
        if step > 1:
            return (FrameVerdict("dropped", True, n_dropped=step - 1,
                                 detail=f"frame counter jumped {previous_counter} -> {counter}: "
                                        f"{step - 1} frame(s) missing"), digest)
        return FrameVerdict("ok", True), digest
    if same:
        return (FrameVerdict("repeated", False,
                             detail="frame identical to the previous one"), previous_digest)
    return FrameVerdict("ok", True), digest


def as_frame_counter(value: Any) -> int | None:
    """A detector frame counter as read (number, NaN, missing, garbage) as an int or None."""
    try:
        return int(value) if value is not None and np.isfinite(value) else None
    except (TypeError, ValueError):
        return None


class FrameSequence:
    """The frames of one run checked in order by :func:`check_frame`.

    Keeps what the rules compare a frame with: the highest frame counter seen (a rejected
    frame still arrived; only a gap means frames are missing) and the digest of the last
    accepted frame.

    Parameters
    ----------
    shape
        Expected frame shape (``None``: any 2-D shape).
    min_repeat_counts
        Passed to :func:`check_frame`.
    """

    def __init__(self, *, shape: tuple[int, ...] | None = None,
                 min_repeat_counts: float = 10.0) -> None:
        self.shape = shape
        self.min_repeat_counts = float(min_repeat_counts)
        self.counter: int | None = None
        self.digest: bytes | None = None

    def check(self, frame: Any, counter: int | None = None) -> FrameVerdict:
        """Verdict on the next frame (``counter``: see :func:`as_frame_counter`)."""
        verdict, digest = check_frame(frame, shape=self.shape, counter=counter,
                                      previous_counter=self.counter, previous_digest=self.digest,
                                      min_repeat_counts=self.min_repeat_counts)
        if verdict.accepted:
            self.digest = digest
        if counter is not None and (self.counter is None or counter > self.counter):
            self.counter = counter
        return verdict


class FrameQualityMonitor(DerivedStreamRouter):
    """Check every frame of a run and write a ``frame_quality`` stream into it.

    One row per frame of ``source_stream``: ``seq_num``, ``flag`` (see the module rules),
    ``accepted``, ``n_dropped``, ``counter`` (-1 without one), ``detail`` and the running
    totals ``n_rejected`` and ``n_missing``. Raw documents are forwarded unchanged.

    Parameters
    ----------
    downstream
        Next consumer (LiveKDE, the Tiled writer, ...).
    image_key
        Data key of the frames; default: the first 2-D array key of the stream.
    counter_key
        Data key of the frame counter; default: a key ending in ``array_counter``, if any.
    source_stream
        Stream holding the frames.
    stream_name
        Name of the derived stream.
    min_repeat_counts
        See :func:`check_frame`.
    """

    def __init__(self, downstream: DocumentCallback | None = None, *,
                 image_key: str | None = None, counter_key: str | None = None,
                 source_stream: str = "primary", stream_name: str = "frame_quality",
                 min_repeat_counts: float = 10.0) -> None:
        super().__init__(downstream)
        self.image_key = image_key
        self.counter_key = counter_key
        self.source_stream = source_stream
        self.stream_name = stream_name
        self.min_repeat_counts = float(min_repeat_counts)
        self.counts: dict[str, int] = {}

    def start(self, doc):
        self._desc: dict[str, tuple[str, str | None]] = {}
        self._frames = FrameSequence(min_repeat_counts=self.min_repeat_counts)
        self.counts = dict.fromkeys(FRAME_FLAGS, 0)
        self._missing = 0
        return doc

    def descriptor(self, doc):
        if doc.get("name") != self.source_stream:
            return doc
        keys = doc["data_keys"]
        ikey = self.image_key or next(
            (k for k, v in keys.items()
             if v.get("dtype") == "array" and len(v.get("shape") or []) == 2), None)
        if ikey is None or ikey not in keys:
            return doc
        ckey = self.counter_key or next((k for k in keys if k.endswith("array_counter")), None)
        self._desc[doc["uid"]] = (ikey, ckey if ckey in keys else None)
        if self._frames.shape is None and keys[ikey].get("shape"):
            self._frames.shape = tuple(int(n) for n in keys[ikey]["shape"])
        return doc

    def event(self, doc):
        if doc["descriptor"] not in self._desc:
            return doc
        ikey, ckey = self._desc[doc["descriptor"]]
        counter = as_frame_counter(doc["data"].get(ckey) if ckey else None)
        verdict = self._frames.check(doc["data"].get(ikey), counter)
        self.counts[verdict.flag] += 1
        self._missing += verdict.n_dropped
        if verdict.flag != "ok":
            logger.warning("frame %s of %s: %s (%s)", doc.get("seq_num"), ikey, verdict.flag,
                           verdict.detail)
        rejected = sum(v for k, v in self.counts.items() if k not in ("ok", "dropped"))
        self.emit(self.stream_name, {
            "seq_num": np.int64(doc.get("seq_num", -1)), "flag": verdict.flag,
            "accepted": bool(verdict.accepted), "n_dropped": np.int64(verdict.n_dropped),
            "counter": np.int64(-1 if counter is None else counter), "detail": verdict.detail,
            "n_rejected": np.int64(rejected), "n_missing": np.int64(self._missing)})
        return doc

    def event_page(self, doc):
        for ev in unpack_event_page(doc):
            self.event(ev)
        return doc

    def __repr__(self) -> str:
        return f"FrameQualityMonitor(stream={self.stream_name!r}, counts={self.counts})"
