"""Streaming KDE: accumulate raw frames as they arrive, smooth only when asked.

Smoothing is linear, so the sum of the raw frames carries everything; adding a frame is a
single in-place integer addition, and the (costlier) bandwidth selection and smoothing run
only when a result is emitted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from smartbeam.errors import SmartbeamInputError

from .kde import (
    DEFAULT_CANDIDATES,
    Geometry,
    KDEResult,
    Kernel,
    kde_estimate,
    predict_time_to_target,
    validate_frame,
)

__all__ = ["FrameAccumulator", "StreamingKDE"]


class FrameAccumulator:
    """Running sum of raw count frames of a fixed shape.

    Parameters
    ----------
    shape
        Frame shape; fixed by the first frame when ``None``.
    check
        Validate each frame (finite, non-negative). Costs one pass over the frame.
    """

    def __init__(self, shape: tuple[int, int] | None = None, check: bool = True) -> None:
        self.shape = None if shape is None else tuple(shape)
        self.check = check
        self.total: np.ndarray | None = None
        self.n_frames = 0
        self.exposure = 0.0

    def add(self, frame: np.ndarray, exposure: float = 1.0) -> None:
        """Add one frame (integer or integer-valued float counts) of ``exposure`` seconds.

        Raises
        ------
        SmartbeamInputError
            Wrong shape, NaN/inf or negative counts; the running sum is left unchanged.
        """
        a = np.asarray(frame)
        if self.check:
            validate_frame(a, self.shape, f"frame #{self.n_frames + 1}")
        elif self.shape is not None and a.shape != self.shape:
            raise SmartbeamInputError(f"frame #{self.n_frames + 1} has shape {a.shape}: "
                                      f"expected {self.shape}")
        if not (np.isfinite(exposure) and exposure >= 0):
            raise SmartbeamInputError(f"exposure={exposure!r}: expected a time >= 0")
        if self.total is None:
            self.shape = a.shape
            # int64 never overflows for counting data; float frames are kept as float
            self.total = np.zeros(a.shape, np.float64 if a.dtype.kind == "f" else np.int64)
        np.add(self.total, a, out=self.total, casting="unsafe")
        self.n_frames += 1
        self.exposure += float(exposure)

    def reset(self) -> None:
        """Forget all frames (keeps the shape)."""
        self.total = None
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
                 candidates: Sequence[Kernel] = DEFAULT_CANDIDATES, n_splits: int = 2,
                 seed: int | None = 0, check: bool = True) -> None:
        self.geometry = geometry
        self.product = product
        self.candidates = list(candidates)
        self.n_splits = n_splits
        self.rng = np.random.default_rng(seed)
        self.acc = FrameAccumulator(geometry.shape, check=check)
        self.history_exposure: list[float] = []
        self.history_rel_error: list[float] = []

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

    def result(self) -> KDEResult:
        """Select bandwidths, smooth the running sum and record the CV error history."""
        if self.acc.total is None:
            raise SmartbeamInputError("no frame accumulated yet: expected at least one frame "
                                      "before asking for a result")
        res = kde_estimate(self.acc.total, self.geometry, product=self.product,
                           candidates=self.candidates, n_splits=self.n_splits, rng=self.rng)
        self.history_exposure.append(self.acc.exposure)
        self.history_rel_error.append(res.rel_error)
        return res

    def predicted_time(self, target_rel_error: float) -> float:
        """Total exposure (s) predicted to reach ``target_rel_error``; ``inf`` if unknown."""
        return predict_time_to_target(self.history_exposure, self.history_rel_error,
                                      target_rel_error)
