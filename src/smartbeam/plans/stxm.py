"""STXM plans: raster images at chosen energies and polarisations."""

from __future__ import annotations

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.protocols import Readable

from ..errors import SmartbeamInputError

__all__ = ["stxm_image", "validate_raster"]

POLARISATION_MODES = ("circ+", "circ-", "linear")


def validate_raster(stxm, x_range: list[float], y_range: list[float],
                    pixel: float) -> tuple[int, int]:
    """Check a raster against the stage limits; returns (nx, ny).

    Raises
    ------
    SmartbeamInputError
        When a range is not (start < stop), the pixel is not positive or is larger than
        a range, or a range goes beyond the stage limits. Nothing has moved yet.
    """
    if not pixel > 0:
        raise SmartbeamInputError(f"pixel={pixel!r} µm: expected a positive pixel size")
    sizes = []
    for axis_name, rng, axis in (("x_range", x_range, stxm.x), ("y_range", y_range, stxm.y)):
        if len(rng) != 2 or not rng[0] < rng[1]:
            raise SmartbeamInputError(f"{axis_name}={rng!r}: expected [start, stop] with start < stop (µm)")
        if pixel > rng[1] - rng[0]:
            raise SmartbeamInputError(f"pixel={pixel} µm is larger than {axis_name}={rng!r}")
        low, high = axis.limits
        if low < high and (rng[0] < low or rng[1] > high):
            raise SmartbeamInputError(f"{axis_name}={rng!r} µm goes beyond the stage limits "
                                      f"[{low}, {high}] µm of {axis.name}")
        sizes.append(int(round((rng[1] - rng[0]) / pixel)) + 1)
    return sizes[0], sizes[1]


def stxm_image(stxm: Readable, *, x_range: list[float], y_range: list[float], pixel: float,
               energies: list[float], polarisations: list[str] | None = None,
               dwell: float = 0.001, md: dict | None = None):
    """Raster images of a field of view at each energy and polarisation.

    Parameters
    ----------
    stxm : Readable
        The microscope (``energy``, ``pol``, ``x``, ``y``, ``det``).
    x_range, y_range : list of float
        [start, stop] of the raster in µm, inside the stage limits.
    pixel : float
        Pixel size in µm (0.03 = 30 nm).
    energies : list of float
        Photon energies in eV, imaged in this order.
    polarisations : list of str, optional
        EPU modes imaged at every energy (default ['circ+', 'circ-']).
    dwell : float
        Dwell time per pixel in s.
    md : dict, optional
        Extra run metadata.

    Yields
    ------
    msg
        Bluesky messages; one ``primary`` event per image with the image, energy and mode.
    """
    pols = list(polarisations or ["circ+", "circ-"])
    for p in pols:
        if p not in POLARISATION_MODES:
            raise SmartbeamInputError(f"polarisation {p!r}: expected one of {POLARISATION_MODES}")
    if not dwell > 0:
        raise SmartbeamInputError(f"dwell={dwell!r} s: expected a positive dwell time")
    if not energies:
        raise SmartbeamInputError("energies=[]: expected at least one energy (eV)")
    for e in energies:
        stxm.energy.check_value(e)
    nx, ny = validate_raster(stxm, x_range, y_range, pixel)
    det = stxm.det
    _md = {"plan_name": "stxm_image", "detectors": [stxm.name], "motors": [stxm.energy.name],
           "plan_args": {"x_range": list(x_range), "y_range": list(y_range), "pixel": pixel,
                         "energies": list(energies), "polarisations": pols, "dwell": dwell},
           "shape": [ny, nx], "pixel_um": pixel,
           # STXM images are not SANS frames: keep the live KDE out of these runs.
           "kde": False}
    _md.update(md or {})

    @bpp.run_decorator(md=_md)
    def inner():
        yield from bps.mv(det.dwell, dwell, det.img_nx, nx, det.img_ny, ny,
                          det.img_x0, x_range[0], det.img_x1, x_range[0] + (nx - 1) * pixel,
                          det.img_y0, y_range[0], det.img_y1, y_range[0] + (ny - 1) * pixel)
        for energy in energies:
            yield from bps.mv(stxm.energy, energy)
            for pol in pols:
                yield from bps.mv(stxm.pol.mode, pol)
                yield from bps.mv(det.img_acquire, 1)
                yield from bps.create("primary")
                for obj in (det.image, stxm.energy, stxm.pol.mode, stxm.zp_z):
                    yield from bps.read(obj)
                yield from bps.save()

    return (yield from inner())


def image_grid(x_range: list[float], y_range: list[float], pixel: float) -> tuple[np.ndarray, np.ndarray]:
    """Stage positions (x, y) in µm of the pixels of a raster."""
    nx = int(round((x_range[1] - x_range[0]) / pixel)) + 1
    ny = int(round((y_range[1] - y_range[0]) / pixel)) + 1
    return x_range[0] + pixel * np.arange(nx), y_range[0] + pixel * np.arange(ny)
