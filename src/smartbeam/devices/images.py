"""Image waveforms read as 2-D arrays with a declared dtype and distinct dimension names."""

from __future__ import annotations

import numpy as np
from ophyd import EpicsSignalRO

__all__ = ["ImageSignal"]


class ImageSignal(EpicsSignalRO):
    """A flattened image waveform PV read back as a ``(ny, nx)`` array.

    Parameters
    ----------
    read_pv
        The waveform PV.
    shape
        Fixed ``(ny, nx)``; or give ``shape_x``/``shape_y``.
    shape_x, shape_y
        Names of sibling components (of the parent device) holding nx and ny, for
        images whose size is set at run time.
    dtype
        numpy dtype string of the pixels; declared in ``describe()`` so that Tiled
        keeps it (float32/int32 would otherwise become float64).
    """

    def __init__(self, read_pv: str, *, shape: tuple[int, int] | None = None,
                 shape_x: str | None = None, shape_y: str | None = None,
                 dtype: str = "<i4", **kwargs) -> None:
        super().__init__(read_pv, **kwargs)
        self.image_shape = tuple(shape) if shape is not None else None
        self._shape_pvs = (shape_y, shape_x)
        self.image_dtype = np.dtype(dtype)

    def _resolve_shape(self) -> tuple[int, int]:
        if self.image_shape is not None:
            return self.image_shape
        sib_y, sib_x = (getattr(self.parent, attr) for attr in self._shape_pvs)
        return int(sib_y.get()), int(sib_x.get())

    def get(self, **kwargs) -> np.ndarray:
        flat = np.asarray(super().get(**kwargs))
        ny, nx = self._resolve_shape()
        if flat.size < ny * nx:
            raise ValueError(
                f"{self.name}: waveform {self.pvname} holds {flat.size} elements, "
                f"expected {ny}x{nx}={ny * nx}; check the detector's array size"
            )
        return flat[: ny * nx].reshape(ny, nx).astype(self.image_dtype, copy=False)

    def describe(self) -> dict:
        desc = super().describe()
        ny, nx = self._resolve_shape()
        desc[self.name].update(
            dtype="array", shape=[ny, nx], dtype_numpy=self.image_dtype.str,
            dims=[f"{self.name}_y", f"{self.name}_x"],
        )
        return desc
