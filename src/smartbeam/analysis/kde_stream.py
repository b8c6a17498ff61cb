"""Streaming KDE: accumulate raw frames as they arrive, smooth only when asked.

Smoothing is linear, so the sum of the raw frames carries everything; adding a frame is a
single in-place integer addition, and the (costlier) bandwidth selection and smoothing run
only when a result is emitted.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from smartbeam.errors import SmartbeamInputError

from .kde import (
    DEFAULT_CANDIDATES,
    ErrorModel,
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

        @numba.njit(nogil=True, cache=True)
        def add_checked(acc, frame, limit):  # pragma: no cover - runs compiled
            # status 0: added; 1: negative pixel; 2: a sum exceeds ``limit``. On 1 or 2 the
            # frame is subtracted again: integer adds and subtracts wrap modulo 2^32, so
            # the sum is restored bit for bit. No early exit in the main loop, so that it
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
                for i in range(f.size):
                    a[i] -= f[i]
                return (1 if lo < 0 else 2), 0
            return 0, hi

        try:  # compile (or load from the disk cache) now, and check it once
            acc = np.zeros((2, 2), np.int32)
            ok = add_checked(acc, np.full((2, 2), 3, np.int32), _INT32_MAX) == (0, 3)
            _fused = add_checked if ok and acc.sum() == 12 else False
        except Exception:  # pragma: no cover - e.g. no writable cache: use numpy
            _fused = False
    return _fused or None


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

    def add(self, frame: np.ndarray, exposure: float = 1.0) -> None:
        """Add one frame (integer or integer-valued float counts) of ``exposure`` seconds.

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
            self._add_fused(fused, np.ascontiguousarray(a), name)
        else:
            self._add_numpy(a, name)
        self.n_frames += 1
        self.exposure += float(exposure)

    def _add_fused(self, kernel, a: np.ndarray, name: str) -> None:
        status, hi = kernel(self._sum, a, self._limit())
        if status == 2:  # a pixel would pass the fast sum's range: spill, then retry
            self._spill_sum()
            status, hi = kernel(self._sum, a, self._limit())
            if status == 2 and self._sum.dtype == _NARROW:
                # frames of more than 65,535 counts in a pixel: widen the fast sum
                self._sum = np.zeros(self.shape, np.int32)
                status, hi = kernel(self._sum, a, self._limit())
            if status == 2:  # one frame beyond int32 on its own: straight into int64
                validate_frame(a, self.shape, name)
                np.add(self._spill, a, out=self._spill, casting="unsafe")
                return
        if status == 1:
            validate_frame(a, self.shape, name)  # raises with the bad pixel named
        # the largest pixel of the fast sum: a bound for the numpy path, should a frame of
        # another dtype come next
        self._bound = int(hi)

    def _add_numpy(self, a: np.ndarray, name: str) -> None:
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
                return
            self._bound += int(hi)
        np.add(self._sum, a, out=self._sum, casting="unsafe")

    def reset(self) -> None:
        """Forget all frames (keeps the shape)."""
        self._sum = None
        self._spill = None
        self._bound = 0
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
        self.models: list[ErrorModel] = []

    @property
    def n_frames(self) -> int:
        """Frames accumulated so far."""
        return self.acc.n_frames

    @property
    def exposure(self) -> float:
        """Total exposure accumulated so far (seconds)."""
        return self.acc.exposure

    def add(self, frame: np.ndarray, exposure: float = 1.0) -> None:
        """Add one raw frame (see :meth:`FrameAccumulator.add`)."""
        self.acc.add(frame, exposure)

    def result(self, variance: bool = True) -> KDEResult:
        """Select bandwidths, smooth the running sum and record the CV error history.

        Parameters
        ----------
        variance
            Also compute the variance map (one more convolution per distinct kernel).
        """
        if self.acc.total is None:
            raise SmartbeamInputError("no frame accumulated yet: expected at least one frame "
                                      "before asking for a result")
        res = kde_estimate(self.acc.total, self.geometry, product=self.product,
                           candidates=self.candidates, n_splits=self.n_splits, rng=self.rng,
                           variance=variance)
        self.history_exposure.append(self.acc.exposure)
        self.history_rel_error.append(res.rel_error)
        self.last = res
        model = None if res.selection is None else res.selection.error_model(self.acc.exposure)
        if model is not None:
            self.models.append(model)
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
        if self.models:
            return ErrorModel.pooled(self.models).time_to_target(target_rel_error)
        return predict_time_to_target(self.history_exposure, self.history_rel_error,
                                      target_rel_error)
