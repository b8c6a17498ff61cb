"""STXM plans: raster images, adaptive XMCD energy stacks with moment maps, 10Dq maps.

The analysis runs inside the plan between images (pure functions of
:mod:`smartbeam.analysis.stack` and :mod:`smartbeam.analysis.tendq`); derived maps and
every adaptive decision are written as their own streams of the same run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.protocols import Readable
from ophyd import Signal

from ..analysis.stack import AdaptiveStack, StackCost
from ..errors import SmartbeamInputError

logger = logging.getLogger(__name__)

__all__ = ["image_grid", "stxm_image", "stxm_xas_map", "stxm_xmcd_stack", "validate_raster"]

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


class _ArraySignal(Signal):
    """Soft signal whose ``describe()`` declares dtype and distinct dims of an array value."""

    def __init__(self, *args, dims: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._dims = tuple(dims)

    def describe(self) -> dict:
        desc = super().describe()
        value = np.asarray(self.get())
        if value.ndim:
            desc[self.name].update(dtype="array", shape=list(value.shape),
                                   dtype_numpy=value.dtype.str,
                                   dims=list(self._dims) or [f"{self.name}_dim{i}"
                                                             for i in range(value.ndim)])
        return desc


class _StreamWriter:
    """Soft signals read with ``trigger_and_read`` to write a derived stream of the run."""

    def __init__(self, prefix: str, example: dict[str, Any], dims: dict | None = None) -> None:
        dims = dims or {}
        self.signals = {k: _ArraySignal(name=f"{prefix}{k}", value=v, dims=dims.get(k, ()))
                        for k, v in example.items()}

    def write(self, values: dict[str, Any], stream: str):
        for k, v in values.items():
            self.signals[k].put(v)
        yield from bps.trigger_and_read(list(self.signals.values()), name=stream)


def _setup_raster(stxm, x_range, y_range, pixel, nx, ny, dwell):
    det = stxm.det
    yield from bps.mv(det.dwell, dwell, det.img_nx, nx, det.img_ny, ny,
                      det.img_x0, x_range[0], det.img_x1, x_range[0] + (nx - 1) * pixel,
                      det.img_y0, y_range[0], det.img_y1, y_range[0] + (ny - 1) * pixel)


def _image_at(stxm, energy: float, pol: str):
    """Move, image, and emit one ``primary`` event; returns the image (ny, nx)."""
    det = stxm.det
    yield from bps.mv(stxm.energy, energy)
    yield from bps.mv(stxm.pol.mode, pol)
    yield from bps.mv(det.img_acquire, 1)
    yield from bps.create("primary")
    reading = yield from bps.read(det.image)
    for obj in (stxm.energy, stxm.pol.mode, stxm.zp_z):
        yield from bps.read(obj)
    yield from bps.save()
    if reading is None:  # simulated RunEngine messages (plan inspection) return nothing
        return None
    return np.asarray(reading[det.image.name]["value"])


def _validate_stack(stxm, x_range, y_range, pixel, e_min, e_max, dwell):
    for name, v in (("e_min", e_min), ("e_max", e_max), ("dwell", dwell), ("pixel", pixel)):
        if not isinstance(v, int | float) or not np.isfinite(v):
            raise SmartbeamInputError(f"{name}={v!r}: expected a finite number")
    if not dwell > 0:
        raise SmartbeamInputError(f"dwell={dwell!r} s: expected a positive dwell time per pixel")
    if not e_min < e_max:
        raise SmartbeamInputError(f"e_min={e_min!r} >= e_max={e_max!r}: expected e_min < e_max")
    for e in (e_min, e_max):
        stxm.energy.check_value(e)
    return validate_raster(stxm, x_range, y_range, pixel)


def _maps_row(m, n_energies: int, beamtime: float, reason: str) -> dict[str, Any]:
    return {"m_orb": np.asarray(m.m_orb, dtype=float), "m_orb_sd": np.asarray(m.m_orb_sd, float),
            "m_spin": np.asarray(m.m_spin, dtype=float),
            "m_spin_sd": np.asarray(m.m_spin_sd, dtype=float),
            "rms_sd": float(m.rms_sd), "rms_m_orb": float(m.rms_m_orb), "e_l3": float(m.e_l3),
            "e_l2": float(m.e_l2), "n_energies": int(n_energies), "beamtime_s": float(beamtime),
            "stop_reason": str(reason)}


def stxm_xmcd_stack(stxm: Readable, *, x_range: list[float], y_range: list[float],
                    pixel: float, e_min: float, e_max: float, tol: float = 0.1,
                    max_energies: int = 40, dwell: float = 0.001, adaptive: bool = True,
                    n_h: float = 3.39, edges: list[float] | None = None, n_init: int = 10,
                    energies: list[float] | None = None, png_dir: str | None = None,
                    dwell_factors: list[float] | None = None, md: dict | None = None):
    """XMCD energy stack of a field of view with per-pixel m_orb / m_spin maps.

    Both helicities are imaged at each energy. With ``adaptive=True`` the next energy is
    the one that most reduces the summed posterior variance of the per-pixel m_orb per
    second of beam time (pixels share spectral shapes and GP hyperparameters, see
    :mod:`smartbeam.analysis.stack`); the stack stops when the map's RMS posterior sd
    of m_orb is <= ``tol`` x its RMS m_orb, or after ``max_energies`` energies. With
    ``adaptive=False`` the conventional stack is imaged at ``energies`` (default:
    ``max_energies`` evenly spaced). Every decision goes to a ``decisions`` stream and
    the final maps to a ``maps`` stream of the same run.

    Parameters
    ----------
    stxm : Readable
        The microscope (``energy``, ``pol``, ``x``, ``y``, ``det``).
    x_range, y_range : list of float
        [start, stop] of the raster in µm, inside the stage limits.
    pixel : float
        Pixel size in µm.
    e_min, e_max : float
        Energy window in eV (pre-edge to post-edge).
    tol : float
        Relative map-uncertainty target (adaptive stop).
    max_energies : int
        Budget of energies (each imaged at both helicities).
    dwell : float
        Dwell time per pixel in s.
    adaptive : bool
        Adaptive (True) or conventional fixed-energy stack (False).
    n_h : float
        Number of 3d holes for the sum rules.
    edges : list of float, optional
        Tabulated [L3, L2] energies in eV (search hint).
    n_init : int
        Energies of the initial uniform design (adaptive).
    energies : list of float, optional
        Energy list of the conventional stack.
    dwell_factors : list of float, optional
        Relative dwells the adaptive stack may choose per energy (e.g. [1, 2, 4]: longer
        dwell where the pixels' m_orb gains most per second); default [1] (fixed dwell).
        The dwell of every image pair is in the ``decisions`` stream.
    png_dir : str, optional
        Directory for PNG pictures written after the run closes:
        ``<uid8>_moments.png`` (m_orb, m_spin and sds) and ``<uid8>_clusters.png``
        (cluster map and MDS map of the pixel spectra).
    md : dict, optional
        Extra run metadata.
    """
    nx, ny = _validate_stack(stxm, x_range, y_range, pixel, e_min, e_max, dwell)
    if not isinstance(tol, int | float) or not (np.isfinite(tol) and tol > 0):
        raise SmartbeamInputError(f"tol={tol!r}: expected a positive relative tolerance")
    if not isinstance(max_energies, int) or not isinstance(n_init, int):
        raise SmartbeamInputError(f"max_energies={max_energies!r}, n_init={n_init!r}: "
                                  "expected integers")
    if edges is not None and len(edges) != 2:
        raise SmartbeamInputError(f"edges={edges!r}: expected [L3, L2] in eV")
    factors = [1.0] if dwell_factors is None else list(dwell_factors)
    if not factors or not all(isinstance(f, int | float) and np.isfinite(f) and f > 0
                              for f in factors):
        raise SmartbeamInputError(f"dwell_factors={dwell_factors!r}: expected positive "
                                  "relative dwells")
    if adaptive:
        fixed = None
    else:
        fixed = list(energies) if energies is not None else list(
            np.linspace(e_min, e_max, max_energies))
        if len(fixed) < 4 or any(not e_min <= e <= e_max for e in fixed):
            raise SmartbeamInputError(f"energies={energies!r}: expected at least 4 energies "
                                      f"inside [{e_min}, {e_max}] eV")
    cost = StackCost(n_pixels=nx * ny, n_lines=ny, dwell=float(dwell))
    # Raises SmartbeamInputError (tol, n_init, max_energies) before the run opens.
    driver = AdaptiveStack(float(e_min), float(e_max), float(n_h), cost, tol=float(tol),
                           max_energies=max_energies if adaptive else max(len(fixed), 4),
                           n_init=n_init if adaptive else 4,
                           edges=tuple(edges) if edges is not None else None,
                           dwell_factors=tuple(float(f) for f in factors))
    dec_example = {"energy": 0.0, "acquisition": 0.0, "n_energies": 0, "rms_sd": 0.0,
                   "rms_m_orb": 0.0, "e_l3": 0.0, "e_l2": 0.0, "latency_ms": 0.0,
                   "beamtime_s": 0.0, "dwell_s": 0.0, "stop_reason": ""}
    decisions = _StreamWriter("stack_decision_", dec_example)
    zeros = np.zeros((ny, nx))
    map_dims = ("map_y", "map_x")
    maps = _StreamWriter("stack_", {"m_orb": zeros, "m_orb_sd": zeros, "m_spin": zeros,
                                    "m_spin_sd": zeros, "rms_sd": 0.0, "rms_m_orb": 0.0,
                                    "e_l3": 0.0, "e_l2": 0.0, "n_energies": 0,
                                    "beamtime_s": 0.0, "stop_reason": ""},
                         dims={k: map_dims for k in ("m_orb", "m_orb_sd", "m_spin",
                                                     "m_spin_sd")})
    _md = {"plan_name": "stxm_xmcd_stack", "detectors": [stxm.name], "motors": [stxm.energy.name],
           "plan_args": {"x_range": list(x_range), "y_range": list(y_range), "pixel": pixel,
                         "e_min": e_min, "e_max": e_max, "tol": tol,
                         "max_energies": max_energies, "dwell": dwell, "adaptive": adaptive,
                         "n_h": n_h, "edges": edges, "n_init": n_init,
                         "dwell_factors": factors},
           "shape": [ny, nx], "pixel_um": pixel, "n_h": n_h, "analysis": "moments",
           "kde": False}
    _md.update(md or {})
    state = {"beamtime": 0.0, "energy": None, "order": ["circ+", "circ-"], "factor": 1.0}

    def measure(e, factor=1.0):
        if factor != state["factor"]:
            yield from bps.mv(stxm.det.dwell, float(dwell) * factor)
            state["factor"] = factor
        images = {}
        for pol in state["order"]:
            images[pol] = yield from _image_at(stxm, float(e), pol)
        # Alternate the helicity order: one EPU switch per energy instead of two.
        state["order"].reverse()
        state["beamtime"] += float(cost(np.array([e]), state["energy"], factor)[0])
        state["energy"] = float(e)
        if images["circ+"] is not None:
            driver.tell(float(e), images["circ+"], images["circ-"], dwell_factor=factor)

    def write_decision(dec, energy):
        yield from decisions.write({
            "energy": energy, "acquisition": dec.acquisition, "n_energies": dec.n_energies,
            "rms_sd": dec.rms_sd, "rms_m_orb": dec.rms_m_orb, "e_l3": dec.e_l3,
            "e_l2": dec.e_l2, "latency_ms": dec.latency_ms, "beamtime_s": state["beamtime"],
            "dwell_s": float("nan") if dec.stop else float(dwell) * dec.dwell_factor,
            "stop_reason": dec.reason}, "decisions")

    def inner():
        yield from _setup_raster(stxm, x_range, y_range, pixel, nx, ny, dwell)
        reason = "conventional stack complete"
        for e in (driver.initial_design() if adaptive else fixed):
            yield from measure(e)
        if driver.n_energies == 0:  # plan inspection without a RunEngine
            return
        if adaptive:
            while True:
                dec = driver.ask(state["energy"])
                yield from write_decision(dec, float("nan") if dec.stop else dec.energy)
                if dec.stop:
                    reason = dec.reason
                    break
                yield from measure(dec.energy, dec.dwell_factor)
        else:
            driver.update(force_refit=True)
        m = driver.model.moments()
        state["maps"] = _maps_row(m, driver.n_energies, state["beamtime"], reason)
        yield from maps.write(state["maps"], "maps")

    uid = yield from bpp.run_wrapper(inner(), md=_md)
    if png_dir and uid and "maps" in state:
        e, odp, odm, _, _ = driver.stack()
        order = np.argsort(e, kind="stable")
        spectra = (odp + odm)[order].reshape(len(e), -1).T
        _save_pngs(png_dir, uid, "moments", state["maps"], float(pixel), spectra, (ny, nx))
    return uid


def stxm_xas_map(stxm: Readable, *, x_range: list[float], y_range: list[float], pixel: float,
                 energies: list[float], dwell: float = 0.001, polarisation: str = "linear",
                 ion: str = "Mn2+", measures: str = "linear", png_dir: str | None = None,
                 md: dict | None = None):
    """Energy stack at one polarisation and a per-pixel 10Dq map (non-magnetic samples).

    Every pixel's optical-density spectrum goes through the library 10Dq estimator
    (:class:`~smartbeam.analysis.tendq.TenDqFitter` with its calibrated rejection
    threshold); the ``maps`` stream holds 10Dq, its sd, the "described by the library"
    mask and the rejection score per pixel.

    Parameters
    ----------
    stxm : Readable
        The microscope (``energy``, ``pol``, ``x``, ``y``, ``det``).
    x_range, y_range : list of float
        [start, stop] of the raster in µm, inside the stage limits.
    pixel : float
        Pixel size in µm.
    energies : list of float
        Increasing energies in eV covering the L2,3 edges of the library.
    dwell : float
        Dwell time per pixel in s.
    polarisation : str
        EPU mode ('linear' for isotropic spectra).
    ion : str
        Ion of the library, e.g. 'Mn2+'.
    measures : str
        Similarity measures of the map: 'linear' (Pearson, cosine, Euclidean; a 100x100
        map in ~2 s) or 'all' (adds JSD, cityblock and EMD; ~15x slower).
    png_dir : str, optional
        Directory for PNG pictures written after the run closes: ``<uid8>_tendq.png``
        (10Dq with rejected pixels, its sd, the library mask) and ``<uid8>_clusters.png``
        (cluster map and MDS map of the pixel spectra).
    md : dict, optional
        Extra run metadata.
    """
    from ..analysis.stack import optical_density, tendq_maps
    from ..library_store import make_fitter

    if polarisation not in POLARISATION_MODES:
        raise SmartbeamInputError(f"polarisation {polarisation!r}: expected one of "
                                  f"{POLARISATION_MODES}")
    if measures not in ("linear", "all"):
        raise SmartbeamInputError(f"measures={measures!r}: expected 'linear' or 'all'")
    e = np.asarray(energies, dtype=float)
    if e.ndim != 1 or e.size < 10 or not np.all(np.diff(e) > 0):
        raise SmartbeamInputError(f"energies={energies!r}: expected at least 10 strictly "
                                  "increasing energies (eV)")
    nx, ny = _validate_stack(stxm, x_range, y_range, pixel, float(e[0]), float(e[-1]), dwell)
    fitter = make_fitter(ion)
    if e[0] > fitter.need[0] or e[-1] < fitter.need[1]:
        raise SmartbeamInputError(f"energies {e[0]}..{e[-1]} eV: expected them to cover "
                                  f"{fitter.need[0]:.1f}..{fitter.need[1]:.1f} eV (the {ion} edges)")
    zeros = np.zeros((ny, nx))
    dims = ("map_y", "map_x")
    maps = _StreamWriter("xas_", {"ten_dq": zeros, "ten_dq_sd": zeros,
                                  "described": zeros.astype(np.int8), "score": zeros,
                                  "n_described": 0, "library_id": "", "error": ""},
                         dims={k: dims for k in ("ten_dq", "ten_dq_sd", "described", "score")})
    _md = {"plan_name": "stxm_xas_map", "detectors": [stxm.name], "motors": [stxm.energy.name],
           "plan_args": {"x_range": list(x_range), "y_range": list(y_range), "pixel": pixel,
                         "energies": [float(v) for v in e], "dwell": dwell,
                         "polarisation": polarisation, "ion": ion, "measures": measures},
           "shape": [ny, nx], "pixel_um": pixel, "ion": ion, "analysis": "tendq", "kde": False}
    _md.update(md or {})

    state: dict[str, Any] = {}

    def inner():
        yield from _setup_raster(stxm, x_range, y_range, pixel, nx, ny, dwell)
        images = []
        for energy in e:
            img = yield from _image_at(stxm, float(energy), polarisation)
            images.append(img)
        if images[0] is None:
            return
        od, var = optical_density(np.stack(images))
        state["spectra"] = od.reshape(e.size, -1).T
        row = {"n_described": 0, "library_id": fitter.library.library_id, "error": ""}
        try:
            # Pixels pooled through the stack's leading spectral components (each pixel
            # keeps its own amplitudes: no spatial blur), then estimated all at once.
            res = tendq_maps(fitter, e, od, var, measures=measures)
            row.update(ten_dq=res["ten_dq"], ten_dq_sd=res["ten_dq_sd"],
                       described=res["described"].astype(np.int8), score=res["score"],
                       n_described=int(res["described"].sum()))
        except SmartbeamInputError as exc:
            # The raw images are written already; the map records why it is empty.
            nan = np.full((ny, nx), np.nan)
            row.update(ten_dq=nan, ten_dq_sd=nan, described=np.zeros((ny, nx), np.int8),
                       score=nan, error=str(exc))
        state["maps"] = row
        yield from maps.write(row, "maps")

    uid = yield from bpp.run_wrapper(inner(), md=_md)
    if png_dir and uid and "maps" in state and not state["maps"]["error"]:
        _save_pngs(png_dir, uid, "tendq", state["maps"], float(pixel), state["spectra"],
                   (ny, nx))
    return uid


def _save_pngs(png_dir: str, uid: str, kind: str, maps: dict, pixel: float,
               spectra: np.ndarray, shape: tuple[int, int]) -> list[str]:
    """Write the run's map pictures; a failure is logged, never raised (the run is closed)."""
    from ..plots.maps import save_cluster_mds_png, save_moment_maps_png, save_tendq_map_png

    out = Path(png_dir)
    paths = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        if kind == "moments":
            paths.append(save_moment_maps_png(maps, out / f"{uid[:8]}_moments.png", pixel,
                                              title=f"run {uid[:8]}: moment maps"))
        else:
            paths.append(save_tendq_map_png(maps, out / f"{uid[:8]}_tendq.png", pixel,
                                            title=f"run {uid[:8]}: 10Dq map"))
        n_clusters = int(min(4, max(2, spectra.shape[0] // 10)))
        paths.append(save_cluster_mds_png(spectra, shape, out / f"{uid[:8]}_clusters.png",
                                          pixel, n_clusters=n_clusters,
                                          title=f"run {uid[:8]}: pixel spectra")["path"])
    except Exception:  # noqa: BLE001 - pictures are optional; the data are stored
        logger.exception("writing map PNGs of run %s to %s failed", uid[:8], out)
    for p in paths:
        logger.info("wrote %s", p)
    return paths
