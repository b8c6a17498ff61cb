"""``smartbeam demo``: the main job on the simulated beamline and the embedded store.

Starts the three twin IOCs (real EPICS CA on loopback) and the embedded Tiled server,
runs each method on its instrument, prints a summary table and where the data and the
PNG plots went, and stops every process it started.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """What the demo did: one row per run, plus where things went."""

    rows: list[dict] = field(default_factory=list)
    pngs: list[Path] = field(default_factory=list)
    data_dir: Path | None = None
    uids: list[str] = field(default_factory=list)

    def add(self, step: str, run, summary: str, points: int | str = "") -> None:
        start = run.metadata["start"]
        self.uids.append(start["uid"])
        self.rows.append({"step": step, "scan_id": start.get("scan_id"),
                          "uid": start["uid"][:8], "plan": start.get("plan_name"),
                          "points": points, "streams": ",".join(sorted(run)),
                          "result": summary})

    def table(self) -> str:
        cols = ("step", "scan_id", "uid", "plan", "points", "streams", "result")
        widths = {c: max(len(c), *(len(str(r[c])) for r in self.rows)) for c in cols}
        lines = ["  ".join(c.ljust(widths[c]) for c in cols),
                 "  ".join("-" * widths[c] for c in cols)]
        lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in self.rows]
        return "\n".join(lines)


def run_demo(data_dir: str | Path | None = None, output_dir: str | Path = "demo-output",
             time_scale: float = 0.2, quick: bool = False) -> DemoResult:
    """Run the demo; see the module docstring.

    Parameters
    ----------
    data_dir
        Embedded store directory (default: ``$SMARTBEAM_DATA_DIR`` or the user data dir).
    output_dir
        Where PNG plots and IOC logs go.
    time_scale
        Simulated time factor of the twins (1 = real dwell and motion times).
    quick
        Fewer points everywhere (used by the tests).
    """
    from .beamline import Beamline

    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    beamline = Beamline(time_scale=time_scale, log_dir=output / "logs")  # xmcd, stxm, sans, xas
    # Twins and CA address list first: pyepics reads it when ophyd is imported.
    beamline.start_iocs()
    try:
        return _run(beamline, data_dir, output, quick)
    finally:
        _close_channel_access()
        beamline.stop()


def _close_channel_access() -> None:
    """Close CA circuits before the IOCs go, so libca does not warn of lost circuits."""
    import sys

    epics = sys.modules.get("epics")
    if epics is not None:
        epics.ca.finalize_libca(maxtime=2.0)


def _run(beamline, data_dir, output: Path, quick: bool) -> DemoResult:
    from bluesky import RunEngine

    from .beamline import make_devices
    from .session import analysis_chain
    from .storage import Storage

    devices = make_devices(beamline.prefixes, calibration=beamline.calibration)
    result = DemoResult()
    with Storage(data_dir) as store:
        result.data_dir = store.data_dir
        RE = RunEngine({})
        RE.subscribe(analysis_chain(store.writer(), png_dir=output))
        for step in (_xmcd_step, _xas_step, _stxm_step, _sans_step):
            t0 = time.monotonic()
            step(RE, devices, store, result, output, quick)
            print(f"  {step.__name__[1:-5]}: done in {time.monotonic() - t0:.1f} s", flush=True)
    return result


def _xmcd_step(RE, devices, store, result: DemoResult, output: Path, quick: bool) -> None:
    from .callbacks.xmcd_plot import XMCDLivePlot
    from .plans import xmcd_adaptive_scan, xmcd_dense_scan
    from .storage import read_stream

    xmcd = devices["xmcd"]
    window = dict(e_min=695.0, e_max=735.0, n_h=3.39, dwell=0.1)
    plot = XMCDLivePlot.for_endstation(xmcd, png_path=output / "xmcd_adaptive.png")
    (uid,) = RE(xmcd_adaptive_scan(xmcd, tol=0.03, max_points=30 if quick else 60, **window),
                plot, sample="Fe film (twin)")
    run = store.runs[uid]
    m = read_stream(run, "moments")
    result.add("XMCD adaptive", run, f"m_orb={m['moments_m_orb'][-1]:.3f}±"
               f"{m['moments_m_orb_sd'][-1]:.3f}, m_spin={m['moments_m_spin'][-1]:.2f}; "
               f"{m['moments_stop_reason'][-1]}", int(m["moments_n_points"][-1]))
    result.pngs.append(output / "xmcd_adaptive.png")
    (uid,) = RE(xmcd_dense_scan(xmcd, num=41 if quick else 201, **window),
                sample="Fe film (twin)")
    run = store.runs[uid]
    m = read_stream(run, "moments")
    result.add("XMCD dense reference", run, f"m_orb={m['moments_m_orb'][-1]:.3f}, "
               f"m_spin={m['moments_m_spin'][-1]:.2f}", int(m["moments_n_points"][-1]))


def _xas_step(RE, devices, store, result: DemoResult, output: Path, quick: bool) -> None:
    from .plans import xas_tendq_scan
    from .storage import read_stream

    xas = devices["xas"]
    (uid,) = RE(xas_tendq_scan(xas, 630.0, 663.0, num=111 if quick else 331, dwell=0.2),
                sample="MnO-like (twin, 10Dq = 0.9 eV, mono offset 0.4 eV)")
    run = store.runs[uid]
    n = run.metadata["stop"]["num_events"]["primary"]
    if "analysis" not in run:
        result.add("XAS 10Dq", run, "no analysis stream (see the log)", n)
        return
    a = read_stream(run, "analysis")
    if a["error"][-1]:
        summary = f"analysis error: {a['error'][-1]}"
    elif not bool(a["described"][-1]):
        summary = f"rejected: not described by the library (score {a['score'][-1]:.3f})"
    else:
        summary = (f"10Dq = {a['ten_dq'][-1]:.3f} ± {a['ten_dq_sd'][-1]:.3f} eV, "
                   f"offset {a['offset'][-1]:+.2f} eV (truth 0.9 eV, +0.4 eV)")
    result.add("XAS 10Dq", run, summary, n)


def _stxm_step(RE, devices, store, result: DemoResult, output: Path, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plans import stxm_image, stxm_xmcd_stack
    from .storage import read_stream

    stxm = devices["stxm"]
    pixel = 0.06 if quick else 0.03
    (uid,) = RE(stxm_image(stxm, x_range=[0.0, 2.97], y_range=[0.0, 2.97], pixel=pixel,
                           energies=[707.8], dwell=0.001), sample="Fe domains (twin)")
    run = store.runs[uid]
    images = run["primary"]["stxm_det_image"].read().astype(float)
    contrast = np.log(images[1] + 1) - np.log(images[0] + 1)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(contrast, cmap="RdBu_r", origin="lower", extent=[0, 2.97, 0, 2.97])
    fig.colorbar(im, ax=ax, label="ln(I−/I+)  (XMCD contrast)")
    ax.set(xlabel="x (µm)", ylabel="y (µm)", title="STXM at Fe L3, 707.8 eV")
    png = output / "stxm_xmcd_contrast.png"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    result.pngs.append(png)
    result.add("STXM image", run, f"{images.shape[1]}x{images.shape[2]} px, XMCD contrast "
               f"sd {contrast.std():.3f}", images.shape[0])

    (uid,) = RE(stxm_xmcd_stack(stxm, x_range=[0.0, 1.47], y_range=[0.0, 1.47], pixel=0.06,
                                e_min=695.0, e_max=735.0, tol=0.1,
                                max_energies=24 if quick else 40, dwell=0.004),
                sample="Fe domains (twin)")
    run = store.runs[uid]
    maps = read_stream(run, "maps")
    m_orb = maps["stack_m_orb"][-1]
    result.add("STXM adaptive XMCD stack", run,
               f"{m_orb.shape[1]}x{m_orb.shape[0]} px maps, m_orb {np.nanmin(m_orb):+.3f}.."
               f"{np.nanmax(m_orb):+.3f}, map rms sd {float(maps['stack_rms_sd'][-1]):.3f}; "
               f"{maps['stack_stop_reason'][-1]}", int(maps["stack_n_energies"][-1]))


def _sans_step(RE, devices, store, result: DemoResult, output: Path, quick: bool) -> None:
    from .plans import sans_kde_count
    from .storage import read_stream

    sans = devices["sans"]
    target = 0.02
    (uid,) = RE(sans_kde_count(sans, exposure=1.0, max_exposures=30 if quick else 100,
                               target_rel_error=target, cadence=5, beamstop_radius_px=4.0),
                sample="silica 60 nm (twin)")
    run = store.runs[uid]
    n = run.metadata["stop"]["num_events"]["primary"]
    summary = f"{n} exposures"
    if "kde" in run:
        kde = read_stream(run, "kde", keys=["cv_rel_error", "predicted_time_s", "error",
                                            "smoothed", "n_exposures", "n_repeated"])
        summary += (f"; CV rel. error {kde['cv_rel_error'][-1]:.3f} (target {target}), "
                    f"predicted time to target {kde['predicted_time_s'][-1]:.0f} s")
        raw_equivalent = _raw_equivalent_exposures(run, kde, sans)
        if raw_equivalent is not None:
            summary += (f"; raw counting would need {raw_equivalent:.0f} exposures for the "
                        "same error (against the twin's true pattern)")
        if kde["error"][-1]:
            summary += f"; analysis flag: {kde['error'][-1]}"
    result.add("SANS live KDE", run, summary, n)
    result.pngs.extend(sorted(output.glob(f"kde_{uid[:8]}*.png")))


def _raw_equivalent_exposures(run, kde: dict, detector) -> float | None:
    """Exposures raw counting needs for the chi^2-MSE the last smoothed frame has.

    Measured, not modelled: both the smoothed frame and the raw sum of the same exposures
    are compared with the true mean of the SANS twin, and raw MSE falls exactly as
    1/exposures (Poisson). The truth is the twin's default sample, rebuilt from the twin's
    own option defaults: the demo starts it with those. ``None`` when it cannot be measured
    (no smoothed frame, or frames skipped as repeats, so that the raw frames summed are not
    the first ones of the run).
    """
    import argparse

    from sim_devices.physics.sans import SANSSample
    from sim_devices.runner import add_ioc_arguments

    from .storage import read_stream

    try:
        smoothed = np.asarray(kde["smoothed"][-1], dtype=float)
        n_used = int(kde["n_exposures"][-1])
        if int(kde["n_repeated"][-1]) > 0:
            return None
        parser = argparse.ArgumentParser()
        add_ioc_arguments(parser)
        args = parser.parse_args(["sans"])
        exposure = float(run.metadata["start"]["plan_args"]["exposure"])
        sample = SANSSample(pattern=args.pattern, shape=smoothed.shape,
                            count_rate=args.count_rate)
        truth = sample.expected_counts(exposure) * n_used
        frames = read_stream(run, "primary", keys=[f"{detector.name}_image"])
        raw = np.asarray(frames[f"{detector.name}_image"][:n_used], dtype=float).sum(axis=0)
    except Exception:  # a demo figure: never worth failing the demo for
        return None
    ok = np.isfinite(smoothed) & (smoothed > 0) & (truth > 0)
    if n_used == 0 or ok.sum() < 100:
        return None

    def chi2_mse(estimate: np.ndarray) -> float:
        return float(np.mean((estimate[ok] - truth[ok]) ** 2 / truth[ok]))

    return n_used * chi2_mse(raw) / chi2_mse(smoothed)
