"""Streaming KDE: accumulate raw frames as they arrive, smooth only when asked.

Smoothing is linear, so the sum of the raw frames carries everything; adding a frame is a
single in-place integer addition, and the (costlier) bandwidth selection and smoothing run
only when a result is emitted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import cv2
import numpy as np

from smartbeam.errors import SmartbeamInputError

from .kde import (
    DEFAULT_CANDIDATES,
    ErrorModelPool,
    Geometry,
    KDEResult,
    Kernel,
    kde_estimate,
    predict_time_to_target,
    validate_frame,
)

__all__ = ["FrameAccumulator", "StreamingKDE"]


_INT32_MAX = np.iinfo(np.int32).max
# the fast running sum of the fused path: 2 bytes per pixel (see FrameAccumulator)
_NARROW = np.dtype(np.uint16)
_DTYPE_MAX: dict[np.dtype, int] = {}
# dtypes cv2.minMaxLoc reads in one pass (min and max together)
_CV_RANGE = {np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32,
                                   np.float32)}
# integer frame dtypes the fused kernel takes (values convert exactly to int64)
_FUSED_DTYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32,
                                       np.uint32, np.int64)}
_fused = None  # the compiled check-and-add kernel, False when numba is unavailable
_hashed = None  # the same with the frame's digest (check-add-and-hash), and hash only


def _fused_add():
    """The numba check-and-add kernel, compiled (and disk-cached) on first use; None without numba.

    numba (already in the stack through edrixs) is used because no numpy/OpenCV call adds and
    checks in one pass: a min/max pass plus ``np.add`` reads a 2048^2 int32 frame twice from
    memory (~2.4 ms), the fused loop once (~1.7 ms): the difference between 400 and 500+
    frames/s.
    """
    global _fused
    if _fused is None:
        try:
            import numba
        except ImportError:  # pragma: no cover - numba comes with the pinned stack
            _fused = False
            return None

        @numba.njit(nogil=True, cache=True, inline="always")
        def undo(a, f):  # pragma: no cover - runs compiled
            # integer adds and subtracts wrap modulo 2^32: the sum is restored bit for bit
            for i in range(f.size):
                a[i] -= f[i]

        @numba.njit(nogil=True, cache=True, inline="always")
        def mix(u, i):  # pragma: no cover - runs compiled
            # the two terms of the position-weighted sums of the digest: weights odd and
            # nonlinear in the pixel index
            k1 = np.uint32(i) * np.uint32(0x9E3779B9)
            k2 = np.uint32(i) * np.uint32(0x85EBCA6B)
            return (u * ((k1 ^ (k1 >> np.uint32(13))) | np.uint32(1)),
                    u * ((k2 ^ (k2 >> np.uint32(17))) | np.uint32(1)))

        @numba.njit(nogil=True, cache=True)
        def add_checked(acc, frame, limit):  # pragma: no cover - runs compiled
            # status 0: added; 1: negative pixel; 2: a sum exceeds ``limit``. On 1 or 2 the
            # frame is subtracted again. No early exit in the main loop, so that it
            # vectorises (an early-exit loop measured ~50% slower).
            a = acc.reshape(-1)
            f = frame.reshape(-1)
            lo = np.int64(0)
            hi = np.int64(0)
            for i in range(f.size):
                v = np.int64(f[i])
                t = np.int64(a[i]) + v
                a[i] = t
                lo = min(lo, v)
                hi = max(hi, t)
            if lo < 0 or hi > limit:
                undo(a, f)
                return (1 if lo < 0 else 2), 0
            return 0, hi

        @numba.njit(nogil=True, cache=True)
        def add_checked_hashed(acc, frame, limit):  # pragma: no cover - runs compiled
            # add_checked, plus the frame's total and two 32-bit position-weighted sums
            # (see mix) in the same pass: the digest that tells a re-sent frame without a
            # second read of it
            a = acc.reshape(-1)
            f = frame.reshape(-1)
            lo = np.int64(0)
            hi = np.int64(0)
            tot = np.int64(0)
            h1 = np.uint32(0)
            h2 = np.uint32(0)
            for i in range(f.size):
                v = np.int64(f[i])
                t = np.int64(a[i]) + v
                a[i] = t
                lo = min(lo, v)
                hi = max(hi, t)
                tot += v
                d1, d2 = mix(np.uint32(f[i]), i)
                h1 += d1
                h2 += d2
            if lo < 0 or hi > limit:
                undo(a, f)
                return (1 if lo < 0 else 2), 0, tot, h1, h2
            return 0, hi, tot, h1, h2

        @numba.njit(nogil=True, cache=True)
        def frame_hash(frame):  # pragma: no cover - runs compiled
            # the digest of add_checked_hashed alone (for the rare spill paths)
            f = frame.reshape(-1)
            tot = np.int64(0)
            h1 = np.uint32(0)
            h2 = np.uint32(0)
            for i in range(f.size):
                tot += np.int64(f[i])
                d1, d2 = mix(np.uint32(f[i]), i)
                h1 += d1
                h2 += d2
            return tot, h1, h2

        global _hashed
        try:  # compile (or load from the disk cache) now, and check it once
            acc = np.zeros((2, 2), np.int32)
            ok = add_checked(acc, np.full((2, 2), 3, np.int32), _INT32_MAX) == (0, 3)
            three = np.full((2, 2), 3, np.int32)
            st = add_checked_hashed(acc, three, _INT32_MAX)
            ok = ok and st[:3] == (0, 6, 12) and tuple(st[2:]) == tuple(frame_hash(three))
            _fused = add_checked if ok and acc.sum() == 24 else False
            _hashed = (add_checked_hashed, frame_hash) if _fused else False
        except Exception:  # pragma: no cover - e.g. no writable cache: use numpy
            _fused = False
            _hashed = False
    return _fused or None


def _digest_numpy(a: np.ndarray) -> tuple:
    """Digest of a frame off the fused path: its total and a BLAKE2b hash of its bytes."""
    return (float(a.sum(dtype=np.float64)), str(a.dtype),
            hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest())


def _value_range(a: np.ndarray) -> tuple[float, float]:
    if a.dtype in _CV_RANGE and a.ndim == 2 and a.size:
        lo, hi, _, _ = cv2.minMaxLoc(a)
        if a.dtype.kind != "f":
            return lo, hi
    if not a.size:
        return 0.0, 0.0
    # numpy's min/max propagate NaN, so a float frame needs no separate finiteness pass
    return float(a.min()), float(a.max())


class FrameAccumulator:
    """Running sum of raw count frames of a fixed shape.

    Integer frames are added in place into a preallocated narrow sum, spilled into an
    int64 total before any pixel would pass its range, so the total is exact for any
    counting time (int32 alone could overflow in a long count: 2^31 counts in 10 h is 60k
    counts/s on one pixel). At 2048^2 the add is memory-bound and the sum is read and
    written at every frame, so with numba the fast sum is uint16 (widened to int32 if one
    frame alone holds more than 65,535 counts in a pixel; a spill every 65,535 counts on
    the brightest pixel costs one pass) and checking (negative counts, overflow) and adding
    are one pass over the frame. Without numba the fast sum is int32, one min/max pass
    bounds the frame and a running bound on the sum triggers the spill. Float frames are summed in float64
    after a min/max pass (NaN and inf show up in it).

    Parameters
    ----------
    shape
        Frame shape; fixed by the first frame when ``None``.
    check
        Validate each frame (negative counts, NaN/inf), a full diagnosis only when it
        fails. Integer frames on the fused path are always checked: it costs nothing there.
    """

    def __init__(self, shape: tuple[int, int] | None = None, check: bool = True) -> None:
        self.shape = None if shape is None else tuple(shape)
        self.check = check
        self._sum: np.ndarray | None = None
        self._spill: np.ndarray | None = None
        self._bound = 0
        self._last_digest: tuple | None = None
        self.n_frames = 0
        self.exposure = 0.0

    @property
    def total(self) -> np.ndarray | None:
        """The running sum (int32/int64 for integer frames, float64 for float frames).

        Read-only view of the live buffer when it is int32 or float64 and nothing was
        spilled: copy it to keep it.
        """
        if self._sum is None:
            return None
        if self._spill is None:
            return self._sum.astype(np.int32) if self._sum.dtype == _NARROW else self._sum
        return self._spill + self._sum

    @property
    def counts(self) -> np.ndarray | None:
        """The running sum as the smoothing reads it: the live uint16 fast sum itself when
        nothing was spilled (a read-only view: no widening copy), else :attr:`total`.

        Smoothing and selection convert counts to float32 as they read them (exact for
        any integer dtype up to 2^24), so they give the same results from this as from
        :attr:`total`; at 2048^2 the int32 copy of :attr:`total` measured ~1.4 ms and
        converting the uint16 sum ~0.5 ms less than converting an int32 one (one core).
        """
        if self._sum is None:
            return None
        if self._spill is None and self._sum.dtype == _NARROW:
            view = self._sum.view()
            view.flags.writeable = False
            return view
        return self.total

    def _limit(self) -> int:
        # no pixel of the fast sum may pass this (int32 bound kept as a module constant);
        # np.iinfo costs ~6 us, a third of a 128^2 add: looked up once per dtype
        top = _DTYPE_MAX.get(self._sum.dtype)
        if top is None:
            top = _DTYPE_MAX[self._sum.dtype] = int(np.iinfo(self._sum.dtype).max)
        return min(top, _INT32_MAX)

    def _spill_sum(self) -> None:
        if self._spill is None:
            self._spill = self._sum.astype(np.int64)
        else:
            self._spill += self._sum
        self._sum[...] = 0
        self._bound = 0

    def add(self, frame: np.ndarray, exposure: float = 1.0, *, skip_repeat: bool = False,
            min_repeat_counts: float = 10.0) -> bool:
        """Add one frame (integer or integer-valued float counts) of ``exposure`` seconds.

        Parameters
        ----------
        frame
            2-D counts of the accumulator's shape.
        exposure
            Counting time of the frame (s).
        skip_repeat
            Leave the frame out when it repeats the previous added frame (a detector that
            sent the same frame again) and holds at least ``min_repeat_counts`` counts
            (empty frames of a closed shutter are legitimately identical). On the fused
            path the digest is computed in the same pass as the add: the frame's total and
            two 32-bit sums of the counts with odd pixel weights, so an identical frame is
            always recognised, a frame differing in one pixel never is, and other
            different frames collide with a chance of ~2^-64. Off the fused path the
            digest is a BLAKE2b hash of the bytes. A repeat is subtracted again (a second
            pass for repeats only).
        min_repeat_counts
            See ``skip_repeat``.

        Returns
        -------
        bool
            False when the frame was skipped as a repeat, True when it was added.

        Raises
        ------
        SmartbeamInputError
            Wrong shape, NaN/inf or negative counts; the running sum is left unchanged.
        """
        a = np.asarray(frame)
        name = f"frame #{self.n_frames + 1}"
        if a.ndim != 2 or (self.shape is not None and a.shape != self.shape):
            validate_frame(a, self.shape, name)
        if not (np.isfinite(exposure) and exposure >= 0):
            raise SmartbeamInputError(f"exposure={exposure!r}: expected a time >= 0")
        if a.dtype.kind not in "iubf":
            validate_frame(a, self.shape, name)
        fused = _fused_add() if a.dtype in _FUSED_DTYPES else None
        if self._sum is None:
            self.shape = a.shape
            # the fused path sums into uint16 and spills into int64 before a pixel would
            # pass 65,535: the sum is read and written at every frame, so 2 bytes per
            # pixel instead of 4 is a third less memory traffic for int32 frames
            dtype = (np.float64 if a.dtype.kind == "f" else _NARROW if fused is not None
                     else np.int32)
            self._sum = np.zeros(a.shape, dtype)
        if self._sum.dtype.kind != "f" and a.dtype.kind == "f":
            validate_frame(a, self.shape, name)  # NaN/inf/negative: the more useful message
            raise SmartbeamInputError(f"{name} has dtype {a.dtype}: expected integer "
                                      "counts like the frames accumulated so far")
        if fused is not None and self._sum.dtype.kind != "f":
            a = np.ascontiguousarray(a)
            target, digest = self._add_fused(fused, a, name, skip_repeat)
        else:
            target = self._add_numpy(a, name)
            digest = _digest_numpy(a) if skip_repeat else None
        if skip_repeat:
            if digest == self._last_digest and digest[0] >= min_repeat_counts:
                # the integer sums wrap modulo 2^n: subtracting restores them bit for bit
                np.subtract(target, a, out=target, casting="unsafe")
                return False
            self._last_digest = digest
        self.n_frames += 1
        self.exposure += float(exposure)
        return True

    def _add_fused(self, kernel, a: np.ndarray, name: str, digest: bool
                   ) -> tuple[np.ndarray, tuple | None]:
        """Fused check-and-add; returns the array the frame went into and, with
        ``digest``, the frame's digest (computed in the same pass)."""
        hashed = None
        if digest:
            hashed, frame_hash = _hashed

            def run():
                st, hi_, *dig = hashed(self._sum, a, self._limit())
                return st, hi_, tuple(int(d) for d in dig)
        else:
            def run():
                st, hi_ = kernel(self._sum, a, self._limit())
                return st, hi_, None
        status, hi, dig = run()
        if status == 2:  # a pixel would pass the fast sum's range: spill, then retry
            self._spill_sum()
            status, hi, dig = run()
            if status == 2 and self._sum.dtype == _NARROW:
                # frames of more than 65,535 counts in a pixel: widen the fast sum
                self._sum = np.zeros(self.shape, np.int32)
                status, hi, dig = run()
            if status == 2:  # one frame beyond int32 on its own: straight into int64
                validate_frame(a, self.shape, name)
                np.add(self._spill, a, out=self._spill, casting="unsafe")
                if digest:
                    dig = tuple(int(d) for d in frame_hash(a))
                return self._spill, dig
        if status == 1:
            validate_frame(a, self.shape, name)  # raises with the bad pixel named
        # the largest pixel of the fast sum: a bound for the numpy path, should a frame of
        # another dtype come next
        self._bound = int(hi)
        return self._sum, dig

    def _add_numpy(self, a: np.ndarray, name: str) -> np.ndarray:
        hi = None
        if self.check:
            lo, hi = _value_range(a)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0):
                validate_frame(a, self.shape, name)  # raises with the bad pixel named
        if self._sum.dtype.kind in "iu":
            if hi is None:
                hi = float(a.max()) if a.size else 0.0
            if self._bound + hi > self._limit():
                self._spill_sum()
            if hi > self._limit():  # one frame beyond int32 on its own: straight into int64
                np.add(self._spill, a, out=self._spill, casting="unsafe")
                return self._spill
            self._bound += int(hi)
        np.add(self._sum, a, out=self._sum, casting="unsafe")
        return self._sum

    def reset(self) -> None:
        """Forget all frames (keeps the shape)."""
        self._sum = None
        self._spill = None
        self._bound = 0
        self._last_digest = None
        self.n_frames = 0
        self.exposure = 0.0


class StreamingKDE:
    """Accumulate frames and emit smoothed results with a time-to-target prediction.

    Parameters
    ----------
    geometry
        :class:`~smartbeam.analysis.kde.Geometry` (mask, beam centre, bands, sector).
    product
        ``"map"``, ``"sector"`` or ``"radial"``: what the bandwidths are chosen for.
    candidates
        Candidate kernels for the cross-validation.
    n_splits
        Random halvings averaged in the cross-validation.
    seed
        Seed of the thinning generator (reproducible results).
    check
        Validate each frame on arrival.
    """

    def __init__(self, geometry: Geometry, *, product: str = "map",
                 candidates: Sequence[Kernel] = DEFAULT_CANDIDATES, n_splits: int = 1,
                 seed: int | None = 0, check: bool = True) -> None:
        self.geometry = geometry
        self.product = product
        self.candidates = list(candidates)
        self.n_splits = n_splits
        self.rng = np.random.default_rng(seed)
        self.acc = FrameAccumulator(geometry.shape, check=check)
        self.history_exposure: list[float] = []
        self.history_rel_error: list[float] = []
        self.last: KDEResult | None = None
        # pooled as the count goes on: constant memory however many emits it makes
        self.error_models = ErrorModelPool()

    @property
    def n_frames(self) -> int:
        """Frames accumulated so far."""
        return self.acc.n_frames

    @property
    def exposure(self) -> float:
        """Total exposure accumulated so far (seconds)."""
        return self.acc.exposure

    def add(self, frame: np.ndarray, exposure: float = 1.0, *, skip_repeat: bool = False,
            min_repeat_counts: float = 10.0) -> bool:
        """Add one raw frame (see :meth:`FrameAccumulator.add`); False if skipped as a repeat."""
        return self.acc.add(frame, exposure, skip_repeat=skip_repeat,
                            min_repeat_counts=min_repeat_counts)

    def result(self, variance: bool = True) -> KDEResult:
        """Select bandwidths, smooth the running sum and record the CV error history.

        Parameters
        ----------
        variance
            Also compute the variance map (one more convolution per distinct kernel).
        """
        counts = self.acc.counts  # the narrow sum itself when it is uint16 (no copy)
        if counts is None:
            raise SmartbeamInputError("no frame accumulated yet: expected at least one frame "
                                      "before asking for a result")
        res = kde_estimate(counts, self.geometry, product=self.product,
                           candidates=self.candidates, n_splits=self.n_splits, rng=self.rng,
                           variance=variance)
        self.history_exposure.append(self.acc.exposure)
        self.history_rel_error.append(res.rel_error)
        self.last = res
        if res.selection is not None:
            self.error_models.add(res.selection.error_model(self.acc.exposure))
        return res

    def predicted_time(self, target_rel_error: float) -> float:
        """Total exposure (s) predicted to reach ``target_rel_error``; ``inf`` if unknown.

        Uses the bias-variance :class:`~smartbeam.analysis.kde.ErrorModel` of the
        selections made so far, pooled (exposure-weighted): the squared bias and the
        variance of every candidate kernel, measured on the accumulated counts, are
        extrapolated to other counting times, with the kernel the cross-validation would
        pick there. Not later than raw (unsmoothed) data would reach the target, up to
        the noise of the estimate, since no smoothing is a candidate. Falls back to a
        power-law fit of the error history when no model is available.
        """
        if self.error_models:
            return self.error_models.pooled().time_to_target(target_rel_error)
        return predict_time_to_target(self.history_exposure, self.history_rel_error,
                                      target_rel_error)
