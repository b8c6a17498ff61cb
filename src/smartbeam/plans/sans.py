"""SANS counting plan whose counting time is set by the data: stop when the KDE is good enough."""

from __future__ import annotations

import logging
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.protocols import Readable

from smartbeam.analysis.kde import PRODUCTS, Geometry
from smartbeam.analysis.kde_stream import StreamingKDE
from smartbeam.errors import SmartbeamInputError

__all__ = ["sans_kde_count"]

logger = logging.getLogger(__name__)


def _geometry(shape: tuple[int, int], mask, centre, beamstop_radius_px) -> Geometry:
    """Detector geometry for frames of ``shape``, built from the first frame of the run."""
    if mask is None or np.shape(mask) != shape:
        mask = np.ones(shape, bool)
    else:
        mask = np.asarray(mask, bool).copy()
    if centre is None:
        centre = ((shape[1] - 1) / 2, (shape[0] - 1) / 2)
    if beamstop_radius_px:
        yy, xx = np.indices(shape)
        mask &= np.hypot(xx - centre[0], yy - centre[1]) > beamstop_radius_px
    return Geometry(mask, centre)


def _check_centre(centre) -> list[float] | None:
    if centre is None:
        return None
    try:
        cx, cy = (float(c) for c in centre)
    except (TypeError, ValueError):
        raise SmartbeamInputError(f"beam_centre={centre!r}: expected [x, y] in pixels"
                                  ) from None
    if not (np.isfinite(cx) and np.isfinite(cy)):
        raise SmartbeamInputError(f"beam_centre={centre!r}: expected finite [x, y] pixels")
    return [cx, cy]


def sans_kde_count(detector: Readable, *, exposure: float = 1.0, max_exposures: int = 100,
                   target_rel_error: float = 0.05, cadence: int = 5, product: str = "map",
                   beam_centre: list[float] | None = None,
                   beamstop_radius_px: float | None = None,
                   md: dict[str, Any] | None = None):
    """Take short SANS exposures until the smoothed pattern reaches a target relative error.

    Opens the shutter, takes exposures of ``exposure`` seconds, keeps a streaming KDE of the
    accumulated counts and, every ``cadence`` exposures, estimates the relative error of the
    smoothed product by cross-validation on binomially thinned halves. It stops as soon as
    that estimate is at or below ``target_rel_error`` (strong scatterer) or after
    ``max_exposures`` (blank, weak scatterer), then closes the shutter (also on abort).
    Works with or without a ``LiveKDE`` callback subscribed.

    Parameters
    ----------
    detector
        SANS area detector with ``image``, ``acquire_time`` and ``shutter`` components.
    exposure
        Seconds per short exposure (> 0).
    max_exposures
        Exposure budget (>= 1).
    target_rel_error
        Target relative RMS error of the smoothed product (> 0).
    cadence
        Re-estimate the error every this many exposures (>= 1).
    product
        ``"map"``, ``"sector"`` or ``"radial"``: the product whose error is targeted.
    beam_centre
        ``[x, y]`` in pixels; default: the detector's ``beam_centre`` attribute if it has
        one, else the frame centre. Written to the start document (``None`` if unknown),
        where a session-wide ``LiveKDE`` finds it.
    beamstop_radius_px
        Mask a round beam stop of this radius around the beam centre (start document:
        ``beamstop_radius_px``, 0 = none).
    md
        Extra run metadata.
    """
    if not (np.isfinite(exposure) and exposure > 0):
        raise SmartbeamInputError(f"exposure={exposure!r}: expected a time > 0 s")
    if int(max_exposures) < 1:
        raise SmartbeamInputError(f"max_exposures={max_exposures!r}: expected an integer >= 1")
    if not (np.isfinite(target_rel_error) and target_rel_error > 0):
        raise SmartbeamInputError(f"target_rel_error={target_rel_error!r}: expected > 0")
    if int(cadence) < 1:
        raise SmartbeamInputError(f"cadence={cadence!r}: expected an integer >= 1")
    if product not in PRODUCTS:
        raise SmartbeamInputError(f"product={product!r}: expected one of {PRODUCTS}")
    if beamstop_radius_px is not None and not (np.isfinite(beamstop_radius_px)
                                               and beamstop_radius_px >= 0):
        raise SmartbeamInputError(f"beamstop_radius_px={beamstop_radius_px!r}: expected a "
                                  "radius >= 0 px")
    # calibration known before the run (argument, or the twin's own attributes); no
    # device method is called here: the frame shape comes from the first reading
    centre = _check_centre(beam_centre if beam_centre is not None
                           else getattr(detector, "beam_centre", None))
    mask = getattr(detector, "mask", None)
    _md = {"plan_name": "sans_kde_count", "detectors": [detector.name],
           "plan_args": {"detector": repr(detector), "exposure": exposure,
                         "max_exposures": int(max_exposures),
                         "target_rel_error": target_rel_error, "cadence": int(cadence),
                         "product": product},
           "beam_centre": centre, "beamstop_radius_px": float(beamstop_radius_px or 0.0),
           "kde_product": product, "target_rel_error": float(target_rel_error),
           "num_points": int(max_exposures)}
    _md.update(md or {})
    outcome: dict[str, Any] = {}
    state: dict[str, Any] = {}

    @bpp.run_decorator(md=_md)
    def counting():
        # imported here: smartbeam.faults imports the callbacks package, which imports plans
        from smartbeam.faults import FrameSequence, as_frame_counter

        image_key = detector.image.name
        counter_sig = getattr(detector, "array_counter", None)
        counter_key = counter_sig.name if counter_sig is not None else None
        frames = FrameSequence()
        for i in range(int(max_exposures)):
            readings = yield from bps.trigger_and_read([detector])
            frame = np.asarray(readings[image_key]["value"])
            if "stream" not in state:
                # geometry built lazily from the first frame (raises on a bad centre)
                geometry = _geometry(frame.shape, mask, centre, beamstop_radius_px)
                state["stream"] = StreamingKDE(geometry, product=product)
            stream = state["stream"]
            counter = readings.get(counter_key, {}).get("value") if counter_key else None
            if frames.check(frame, as_frame_counter(counter)).flag == "repeated":
                # the detector sent the previous frame again: written raw, not summed
                logger.warning("sans_kde_count: frame %d is a repeat, not summed", i + 1)
                outcome["repeated_frames"] = outcome.get("repeated_frames", 0) + 1
                continue
            try:
                stream.add(frame, exposure)
            except SmartbeamInputError as exc:
                # a corrupt frame is skipped (it is already written raw); counting goes on
                logger.warning("sans_kde_count: frame %d skipped: %s", i + 1, exc)
                outcome["skipped_frames"] = outcome.get("skipped_frames", 0) + 1
                continue
            last = i + 1 == int(max_exposures)
            if stream.n_frames % int(cadence) == 0 or last:
                res = stream.result(variance=False)
                outcome.update(n_exposures=i + 1, rel_error=res.rel_error,
                               predicted_time_s=stream.predicted_time(target_rel_error))
                if np.isfinite(res.rel_error) and res.rel_error <= target_rel_error:
                    outcome["reached_target"] = True
                    break
        outcome.setdefault("reached_target", False)
        logger.info("sans_kde_count: %s", outcome)

    def close_shutter():
        yield from bps.mv(detector.shutter, "closed")

    yield from bps.mv(detector.acquire_time, exposure)
    yield from bps.mv(detector.shutter, "open")
    yield from bpp.finalize_wrapper(counting(), close_shutter())
    return outcome
