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
# dtypes cv2.minMaxLoc reads in one pass (min and max together)
_CV_RANGE = {np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32,
                                   np.float32)}


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

    Integer frames are added in place into a preallocated int32 sum (half the memory
    traffic of int64); a running bound on the pixel maximum spills that sum into an int64
    total before it could overflow. Float frames are summed in float64.

    Parameters
    ----------
    shape
        Frame shape; fixed by the first frame when ``None``.
    check
        Validate each frame: one min/max reduction (NaN/inf show up in it for float
        frames), a full diagnosis only when it fails.
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

        Read-only view of the live buffer when nothing was spilled: copy it to keep it.
        """
        if self._sum is None:
            return None
        if self._spill is None:
            return self._sum
        return self._spill + self._sum

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
        hi = None
        if self.check:
            lo, hi = _value_range(a)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0):
                validate_frame(a, self.shape, name)  # raises with the bad pixel named
        if self._sum is None:
            self.shape = a.shape
            self._sum = np.zeros(a.shape, np.float64 if a.dtype.kind == "f" else np.int32)
        if self._sum.dtype == np.int32:
            if a.dtype.kind == "f":
                raise SmartbeamInputError(f"{name} has dtype {a.dtype}: expected integer "
                                          "counts like the frames accumulated so far")
            if hi is None:
                hi = float(a.max()) if a.size else 0.0
            if self._bound + hi > _INT32_MAX:
                self._spill = (self._sum.astype(np.int64) if self._spill is None
                               else self._spill + self._sum)
                self._sum[...] = 0
                self._bound = 0
            self._bound += int(hi)
        np.add(self._sum, a, out=self._sum, casting="unsafe")
        self.n_frames += 1
        self.exposure += float(exposure)

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
