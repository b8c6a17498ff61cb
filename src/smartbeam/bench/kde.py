"""``smartbeam bench kde``: speed-up at equal MSE of KDE-smoothed SANS frames, and throughput.

Error metric (REFERENCE.md, "SANS KDE"): per-bin chi^2-MSE = mean_b (est_b - mu_b)^2 / v_b,
with est and mu per short scan and v_b the raw Poisson variance of one scan in bin b (the
pixel for the 2-D map; the mean of a 1-px radial bin for sector/radial products), so that raw
data score 1/n. Speed-up S(n) = MSE_raw(n) / MSE_est(n) = raw scans needed / scans used.
The unweighted MSE speed-up is reported beside it.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import cv2
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from sim_devices.physics.sans import SANSSample
from smartbeam.analysis.kde import (
    DEFAULT_CANDIDATES,
    Geometry,
    Kernel,
    apply_kernels,
    kde_estimate,
    product_profile,
    select_bandwidths,
    smooth,
    thin,
)
from smartbeam.analysis.kde_stream import FrameAccumulator

__all__ = ["add_arguments", "run"]

COUNTS_PER_SCAN = 3000.0
# 20: where the anisotropic sector-average target (>= 2x up to 20 scans) ends
N_SCANS = (1, 3, 10, 20, 30, 100, 300)
PRODUCTS = ("map", "sector", "radial")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser``."""
    parser.add_argument("--quick", action="store_true", help="fewer repeats and scan counts")
    parser.add_argument("--real", nargs="+", metavar="FRAME", default=[],
                        help="raw NIST SANS .ASC frames to score by binomial thinning")
    parser.add_argument("--reps", type=int, default=None, help="repeats per case (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--json", action="store_true", help="(output is always JSON)")


def _variance_per_bin(mu: np.ndarray, g: Geometry, product: str) -> np.ndarray:
    """Raw Poisson variance of one bin of the product for mean counts ``mu``."""
    if product == "map":
        return mu[g.mask]
    bins = g.bins[product]
    n = np.bincount(bins[bins >= 0], minlength=g.n_rbins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return product_profile(mu, g, product) / n


def _score(est, ref, v, ok, noise=0.0):
    d2 = (est - ref) ** 2
    return float(np.mean(d2[ok] / v[ok]) - noise), float(np.mean(d2[ok]))


def _case(pattern: str, g: Geometry, product: str, n: int, x: np.ndarray, mu_scan: np.ndarray,
          v: np.ndarray, ok: np.ndarray, rng: np.random.Generator, ref_noise=(0.0, None)):
    """chi^2 and unweighted MSE (per scan) of raw, sigma=1 and smartbeam for one draw."""
    xf = x.astype(np.float64)
    ref = product_profile(mu_scan, g, product)
    res = kde_estimate(x, g, product=product, rng=rng)
    s1, v1 = smooth(xf, g, Kernel.iso(1.0), density=mu_scan * n)
    out = {}
    for key, est in (("raw", xf), ("sigma1", s1), ("smartbeam", res.smoothed)):
        chi2, plain = _score(product_profile(est / n, g, product), ref, v, ok, ref_noise[0])
        if ref_noise[1] is not None:
            plain -= ref_noise[1]
        out[key] = (chi2, plain)
    var = {"sigma1": v1 / n**2, "smartbeam": apply_kernels(xf, g, res.kernels)[1] / n**2}
    return out, var, res


def _variance_ratio(var: dict, mu_scan: np.ndarray, g: Geometry, n: int) -> dict:
    """Median per-pixel ratio raw variance / smoothed variance (the seed's figure)."""
    m = g.mask & (mu_scan > 0)
    raw = mu_scan[m] / n
    # float64: the floor 1e-300 is 0 in a float32 variance map (raw / 0 warned)
    return {k: float(np.median(raw / np.maximum(v[m].astype(np.float64), 1e-300)))
            for k, v in var.items()}


def _summarise(pattern, product, n, scores, vratios, kernels) -> dict:
    mean = {k: np.mean([s[k] for s in scores], axis=0) for k in scores[0]}
    raw_chi2, raw_plain = mean["raw"]
    return {
        "pattern": pattern, "product": product, "n_scans": int(n),
        "speedup_mse": {k: float(raw_chi2 / max(mean[k][0], 1e-300))
                        for k in ("sigma1", "smartbeam")},
        "speedup_mse_unweighted": {k: float(raw_plain / max(mean[k][1], 1e-300))
                                   for k in ("sigma1", "smartbeam")},
        "raw_chi2_mse": float(raw_chi2), "raw_chi2_mse_expected": 1.0 / n,
        "variance_ratio": {k: float(np.median([v[k] for v in vratios]))
                           for k in ("sigma1", "smartbeam")},
        "kernels_last_rep": kernels,
        "reps": len(scores),
    }


def _simulated(args, n_scans, reps, rng) -> list[dict]:
    cases = []
    todo = [(p, prod, n) for p in ("realistic", "sharp", "anisotropic") for prod in PRODUCTS
            for n in n_scans]
    samples = {p: SANSSample(p, count_rate=COUNTS_PER_SCAN) for p in ("realistic", "sharp",
                                                                        "anisotropic")}
    for pattern, product, n in tqdm(todo, desc="kde bench (simulated)", leave=False):
        s = samples[pattern]
        g = Geometry(s.mask, s.beam_centre, sector=(s.lobe_angle_deg, 10.0))
        mu_scan = s.expected_counts(1.0)
        v = _variance_per_bin(mu_scan, g, product)
        ok = np.isfinite(v) & (v > 0)
        scores, vr = [], []
        for _ in range(reps):
            # the sum of n Poisson scans is one Poisson draw of n * mu
            x = rng.poisson(mu_scan * n)
            sc, var, res = _case(pattern, g, product, n, x, mu_scan, v, ok, rng)
            scores.append(sc)
            vr.append(_variance_ratio(var, mu_scan, g, n))
        cases.append(_summarise(pattern, product, n, scores, vr,
                                [k.describe() for k in res.kernels]))
    return cases


def _real(paths, n_scans, reps, rng) -> list[dict]:
    from smartbeam.readers.nist_sans import read_nist_sans

    cases = []
    for path in paths:
        fr = read_nist_sans(path)
        x = np.rint(fr.counts).astype(np.int64)
        ny, nx = x.shape
        yy, xx = np.mgrid[0:ny, 0:nx]
        r = np.hypot(xx - fr.beam_centre[0], yy - fr.beam_centre[1])
        bstop_px = float(fr.header.get("BSTOP(mm)", 50.8)) / 2 / fr.pixel_size_mm
        # beam stop plus a 1.5 px margin for its penumbra, and the outermost detector frame
        mask = r > bstop_px + 1.5
        mask[[0, -1], :] = False
        mask[:, [0, -1]] = False
        g = Geometry(mask, fr.beam_centre)
        name = Path(path).name
        for product in PRODUCTS:
            for n in n_scans:
                scores, vr = [], []
                for _ in range(reps):
                    a, b = thin(x, rng)
                    p = n * COUNTS_PER_SCAN / a[mask].sum()
                    if p > 1:
                        break
                    xs = rng.binomial(a, p)
                    # reference: B scaled to one scan; its own Poisson noise is subtracted
                    c = COUNTS_PER_SCAN / b[mask].sum()
                    ref_frame = b * c
                    pilot, _ = smooth(b.astype(float), g, Kernel.ring(1.0, 4.0))
                    mu_scan = np.maximum(pilot * c, 1e-6)
                    v = _variance_per_bin(mu_scan, g, product)
                    ok = np.isfinite(v) & (v > 0)
                    # Var(ref_b) = c * v_b in every product, so the chi^2 noise is c
                    ref_noise = (c, float(c * np.mean(v[ok])))
                    sc, var, res = _case(name, g, product, n, xs, ref_frame, v, ok, rng,
                                         ref_noise)
                    scores.append(sc)
                    vr.append(_variance_ratio(var, mu_scan, g, n))
                if scores:
                    case = _summarise(name, product, n, scores, vr,
                                      [k.describe() for k in res.kernels])
                    case["reference"] = "binomial half of the real counts (noise subtracted)"
                    cases.append(case)
    return cases


def _median_ms(fn, repeat: int, cpu: dict | None = None, key: str | None = None) -> float:
    """Median wall-clock ms of ``fn``; with ``cpu``, also its median thread CPU ms there.

    The machine is shared: wall time includes waiting for a core, thread CPU time does
    not (it still includes memory stalls from other processes), so both are reported.
    """
    t, c = [], []
    for _ in range(repeat):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        fn()
        t.append((time.perf_counter() - t0) * 1e3)
        c.append((time.thread_time() - c0) * 1e3)
    if cpu is not None:
        cpu[key] = float(np.median(c))
    return float(np.median(t))


def _cpu_median_ms(fn, repeat: int) -> float:
    """Median thread-CPU ms of ``fn`` over ``repeat`` calls (the pieces of a breakdown)."""
    c = []
    for _ in range(repeat):
        c0 = time.thread_time()
        fn()
        c.append((time.thread_time() - c0) * 1e3)
    return float(np.median(c))


def _select_breakdown(x: np.ndarray, g: Geometry, rng: np.random.Generator,
                      repeat: int = 9) -> dict:
    """Thread-CPU medians (ms) of the pieces of a map selection at the scored rows.

    One half unless named otherwise; a search runs every piece for both halves, ring
    pieces once per sigma_ring it visits (``ring_at``: every sigma_q of that sigma_ring;
    a search asks only for those it scores).
    """
    from smartbeam.analysis.kde_score import cv_band_sums
    from smartbeam.analysis.kde_thin import bin_cells, thin_masked

    def med(fn) -> float:
        return _cpu_median_ms(fn, repeat)

    sc = g.row_scorer(65536)
    a, b = thin_masked(x, g, rng)
    ca, cb = bin_cells(a, b, sc.polar)
    spec = sc.ring_spectrum(ca)
    spec_b = sc.ring_spectrum(cb)
    out = {"scored_pixels": int(sc.idx.size),
           "scored_ring_cells": int(sc._rho.size),
           "scoring_grid_cells": int(ca.size),
           "thin_both_halves": med(lambda: thin_masked(x, g, rng, out=(a, b))),
           # integer counts: the pilot smooths the first split's halves as read
           "pilot_iso2_at_scored_pixels": med(lambda: sc.iso(a, [2.0], frame2=b)),
           "bin_polar_both_halves": med(lambda: bin_cells(a, b, sc.polar)),
           "ring_spectrum": med(lambda: sc.ring_spectrum(ca))}
    rings = [k for k in DEFAULT_CANDIDATES if k.kind == "ring"]
    for sr in sorted({k.sigma_ring for k in rings}):
        qs = sorted({k.sigma_q for k in rings if k.sigma_ring == sr})
        grid = sc.ring_grid(spec, ca, sr)
        grid_b = sc.ring_grid(spec_b, cb, sr)
        n_out = int(np.max(grid.n_out))  # per group of radii on a multi-resolution grid
        out[f"ring_grid_sr{sr:g}_n_out{n_out}"] = med(lambda s=sr: sc.ring_grid(spec, ca, s))
        out[f"ring_at_sr{sr:g}_{len(qs)}_sigma_q"] = med(lambda gr=grid, q=qs: sc.ring_at(gr, q))
        out[f"ring_at_pair_sr{sr:g}_{len(qs)}_sigma_q_both_halves"] = med(
            lambda gr=grid, gb=grid_b, q=qs: sc.ring_at_pair(gr, gb, q))
    sig = [k.sigma_q for k in DEFAULT_CANDIDATES if k.kind == "iso" and k.sigma_q > 0]
    out[f"iso_{len(sig)}_sigmas"] = med(lambda: sc.iso(a, sig))
    n = sc.idx.size
    est = np.ones((8, n), np.float32)
    r = np.ones(n)
    band = g.band.ravel()[sc.idx]
    out["cv_band_sums_8_candidates"] = med(lambda: cv_band_sums(
        est, est, r, r, r, r, np.ones(n, bool), band, g.n_bands))
    return out


def _emit_breakdown(x: np.ndarray, g: Geometry, kernels: list, repeat: int = 5) -> dict:
    """Thread-CPU medians (ms) of the passes of an emit (no variance) with ``kernels``,
    summed over the groups of radii of its coarse ring plans (after one emit built them).

    ``bin_pixels`` and ``interpolate_pixels`` are the two passes over the ring bands'
    pixels (detector order, each pixel to or from its polar cells); ``ring_and_q_filter``
    the filtering of the polar cells; ``iso_and_rest`` what else the emit takes (the
    isotropic bands, the masked float32 frame, the output maps).
    """
    def med(fn) -> float:
        return _cpu_median_ms(fn, repeat)

    apply_kernels(x, g, kernels, variance=False)
    plans = [reg.coarse[1] for _, reg in g.kernel_regions(kernels)
             if reg.coarse is not None]
    groups = [grp for plan in plans for grp in plan.groups]
    out = {"n_groups": len(groups),
           "n_cells": int(sum((grp.rows[1] - grp.rows[0]) * grp.width for grp in groups)),
           "bin_pixels": 0.0, "ring_and_q_filter": 0.0, "interpolate_pixels": 0.0}
    scratch = np.zeros(g.shape, np.float32)
    for grp in groups:
        t_bin = med(lambda gr=grp: gr.bin(x))
        cells = grp.bin(x).copy()
        dst = np.empty_like(cells)
        t_filter = med(lambda gr=grp, c=cells, d=dst: gr.filter(c, d))
        t_emit = med(lambda gr=grp: gr.emit(x, scratch, None))
        out["bin_pixels"] += t_bin
        out["ring_and_q_filter"] += t_filter
        out["interpolate_pixels"] += max(t_emit - t_bin - t_filter, 0.0)
    out["emit_total"] = med(lambda: apply_kernels(x, g, kernels, variance=False))
    out["iso_and_rest"] = max(out["emit_total"] - out["bin_pixels"]
                              - out["ring_and_q_filter"] - out["interpolate_pixels"], 0.0)
    return out


def _throughput(quick: bool, rng: np.random.Generator) -> dict:
    from smartbeam.analysis import kde_stream

    out = {"load_avg_1min_at_start": float(os.getloadavg()[0])}
    cpu: dict[str, float] = {}
    out["accumulate_path"] = ("numba fused check-and-add" if kde_stream._fused_add()
                              else "numpy min/max + add")
    f2048 = rng.poisson(0.5, (2048, 2048)).astype(np.int32)
    n_acc = 20 if quick else 60
    for check in (True, False):
        acc = FrameAccumulator(check=check)
        acc.add(f2048)  # allocates the sum (and compiles the kernel once)
        key = "accumulate_fps_2048" + ("" if check else "_unchecked")
        out[key] = 1e3 / _median_ms(lambda acc=acc: acc.add(f2048), n_acc, cpu, key)
    # accumulate_fps_2048 is the detector's frame dtype: the SANS twin and SANSDetector
    # emit int32 frames; other integer dtypes beside it
    out["accumulate_frame_dtype"] = str(f2048.dtype)
    for dt in (np.uint16, np.uint32):
        acc = FrameAccumulator()
        fdt = f2048.astype(dt)
        acc.add(fdt)
        key = f"accumulate_fps_2048_{np.dtype(dt).name}"
        out[key] = 1e3 / _median_ms(lambda acc=acc, f=fdt: acc.add(f), n_acc, cpu, key)
    acc = FrameAccumulator()
    acc.add(f2048)
    out["accumulate_sum_dtype"] = str(acc._sum.dtype)
    # with the repeated-frame digest computed in the same pass (a fresh frame each time
    # would cost a copy: the same frame is re-added with skip_repeat off after the check)
    fresh = [f2048, f2048.copy()]
    fresh[1][0, 0] += 1
    acc = FrameAccumulator()
    acc.add(fresh[0], skip_repeat=True)
    state = {"i": 1}

    def add_checked_repeat():
        acc.add(fresh[state["i"] % 2], skip_repeat=True)
        state["i"] += 1

    out["accumulate_fps_2048_skip_repeat"] = 1e3 / _median_ms(
        add_checked_repeat, n_acc, cpu, "accumulate_fps_2048_skip_repeat")
    # for comparison: the separate repeated/bad-value check LiveKDE applies today
    from smartbeam.faults import FrameSequence

    seq = FrameSequence()

    def check_alternate():
        seq.check(fresh[state["i"] % 2])
        state["i"] += 1

    out["faults_check_frame_ms_2048"] = _median_ms(check_alternate, 5, cpu,
                                                   "faults_check_frame_ms_2048")
    f128 = rng.poisson(0.5, (128, 128)).astype(np.int32)
    acc = FrameAccumulator()
    acc.add(f128)
    out["fps_128"] = 1e3 / _median_ms(lambda: acc.add(f128), 200 if quick else 2000, cpu,
                                      "fps_128")

    def geom(n, **kw):
        yy, xx = np.mgrid[0:n, 0:n]
        c = (n / 2 - 0.3, n / 2 + 0.2)
        return Geometry(np.hypot(xx - c[0], yy - c[1]) > n / 32, c, band_width_px=n / 16,
                        **kw)

    g2048 = geom(2048)
    # what an emit smooths: the accumulator's running sum as StreamingKDE reads it
    # (FrameAccumulator.counts: the uint16 fast sum itself on the numba path)
    acc = FrameAccumulator()
    for _ in range(4):
        acc.add(rng.poisson(0.5, (2048, 2048)).astype(np.int32))
    x2048 = acc.counts
    out["smooth_input_dtype"] = str(x2048.dtype)
    rep = 7 if quick else 21
    for sigma in (1.0, 4.0):
        smooth(x2048, g2048, Kernel.iso(sigma))  # first call builds the cached normaliser
        key = f"smooth_ms_2048_iso{sigma:g}"
        out[key] = _median_ms(lambda s=sigma: smooth(x2048, g2048, Kernel.iso(s)), rep, cpu,
                              key)
        out[f"smooth_ms_2048_iso{sigma:g}_scipy_f64"] = _median_ms(
            lambda s=sigma: smooth(x2048, g2048, Kernel.iso(s), backend="scipy"), 3)
    # the same counts as an int32 frame (what an emit smoothed before it read the uint16
    # sum as it is; acc.total still widens it)
    x2048_i32 = acc.total.astype(np.int32)
    out["smooth_ms_2048_iso1_int32_frame"] = _median_ms(
        lambda: smooth(x2048_i32, g2048, Kernel.iso(1.0)), rep, cpu,
        "smooth_ms_2048_iso1_int32_frame")
    smooth(x2048, g2048, Kernel.ring(1.0, 8.0))
    out["smooth_ms_2048_ring"] = _median_ms(
        lambda: smooth(x2048, g2048, Kernel.ring(1.0, 8.0)), 3, cpu, "smooth_ms_2048_ring")
    out["smooth_ms_2048"] = out["smooth_ms_2048_iso1"]
    iso1 = [Kernel.iso(1.0)] * g2048.n_bands
    apply_kernels(x2048, g2048, iso1)
    for var in (False, True):
        key = "emit_ms_2048_iso1" + ("_with_variance" if var else "")
        out[key] = _median_ms(lambda v=var: apply_kernels(x2048, g2048, iso1, variance=v),
                              rep, cpu, key)
    # ring kernels on the outer 8 bands: sigma_ring 20 px (emit_ms_2048_mixed*) and 8 px
    # (the narrowest on coarse grids: most cells; *_sr8)
    for sr, tag in ((20.0, ""), (8.0, "_sr8")):
        mixed = [Kernel.iso(1.0)] * 4 + [Kernel.ring(1.0, sr)] * (g2048.n_bands - 4)
        # the first emit of a kernel list builds what later emits reuse (band regions,
        # the coarse grids per group of radii, their normalisers and the pixel tables of
        # kde_emit.RingEmitPlan)
        key = "emit_ms_2048_mixed" + tag + "_first_call"
        out[key] = _median_ms(lambda m=mixed: apply_kernels(x2048, g2048, m), 1, cpu, key)
        for var in (False, True):
            key = "emit_ms_2048_mixed" + tag + ("_with_variance" if var else "")
            out[key] = _median_ms(
                lambda v=var, m=mixed: apply_kernels(x2048, g2048, m, variance=v), 5, cpu,
                key)
        out["emit_breakdown_cpu_ms_2048" + tag] = _emit_breakdown(x2048, g2048, mixed)
    g1024 = geom(1024)
    x1024 = rng.poisson(2.0, (1024, 1024))
    out["select_ms_1024_first_call"] = _median_ms(
        lambda: select_bandwidths(x1024, g1024, rng=rng, n_splits=1), 1)
    for search in ("auto", "full"):
        key = "select_ms_1024" + ("" if search == "auto" else "_full_search")
        for _ in range(3):
            select_bandwidths(x1024, g1024, rng=rng, search=search)
        # the coarse-to-fine search's time depends on the path it takes (which ring
        # bandwidths it visits: ~32-54 ms on one quiet core), so the default search gets
        # enough repeats for a median and a 90th percentile even in quick mode
        n_sel = 3 if search == "full" else (15 if quick else 30)
        sel_cpu: list[float] = []

        def timed_select(s=search, acc=sel_cpu):
            c0 = time.thread_time()
            select_bandwidths(x1024, g1024, rng=rng, search=s)
            acc.append((time.thread_time() - c0) * 1e3)

        out[key] = _median_ms(timed_select, n_sel, cpu, key)
        if search == "auto":
            out["select_ms_1024_repeats"] = n_sel
            out["select_cpu_ms_1024_p10_p90"] = [float(v) for v in
                                                 np.percentile(sel_cpu, [10, 90])]
    # the same on the emitted ~1 px-of-arc polar grid (the scoring grid's share of the
    # time), and with half the scored pixels (what the CV sample size costs)
    # (three warm-up calls each: the cached normalisers of the kernels a search visits)
    g1px = geom(1024, score_arc_px=1.0)
    for _ in range(3):
        select_bandwidths(x1024, g1px, rng=rng)
        select_bandwidths(x1024, g1024, rng=rng, max_score_pixels=32768)
    n_rep = 3 if quick else 9
    out["select_ms_1024_score_grid_1px"] = _median_ms(
        lambda: select_bandwidths(x1024, g1px, rng=rng), n_rep, cpu,
        "select_ms_1024_score_grid_1px")
    out["select_ms_1024_32k_scored_pixels"] = _median_ms(
        lambda: select_bandwidths(x1024, g1024, rng=rng, max_score_pixels=32768), n_rep, cpu,
        "select_ms_1024_32k_scored_pixels")
    out["select_score_pixels"] = int(g1024.score_rows(65536)[1].size)
    out["select_n_candidates"] = len(DEFAULT_CANDIDATES)
    sel = select_bandwidths(x1024, g1024, rng=rng)
    out["select_n_scored_coarse_to_fine"] = int((sel.cv_score[:, 0] < 1e29).sum())
    iso_only = [Kernel.iso(s) for s in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)]
    out["select_ms_1024_iso_only_6"] = _median_ms(
        lambda: select_bandwidths(x1024, g1024, rng=rng, n_splits=1, candidates=iso_only), 3,
        cpu, "select_ms_1024_iso_only_6")
    out["select_breakdown_cpu_ms_1024"] = _select_breakdown(x1024, g1024, rng)
    out["thread_cpu_ms_medians"] = {k: (1e3 / v if k.startswith(("accumulate", "fps")) else v)
                                    for k, v in cpu.items()}
    out["thread_cpu_note"] = ("same figures from thread CPU time (frames/s for accumulate_* "
                              "and fps_*, ms otherwise): time this thread ran, without "
                              "waiting for a core on the shared machine")
    out["load_avg_1min_at_end"] = float(os.getloadavg()[0])
    return out


def run(args: argparse.Namespace) -> dict:
    """Run the KDE benchmark; returns the JSON-serialisable figures."""
    quick = bool(getattr(args, "quick", False))
    reps = args.reps if getattr(args, "reps", None) else (2 if quick else 6)
    n_scans = (1, 10, 100) if quick else N_SCANS
    rng = np.random.default_rng(getattr(args, "seed", 0))
    cv2.setNumThreads(1)
    with threadpool_limits(limits=1):
        t0 = time.perf_counter()
        cases = _simulated(args, n_scans, reps, rng)
        cases += _real(getattr(args, "real", []) or [], n_scans, reps, rng)
        result = {"cases": cases,
                  "counts_per_scan": COUNTS_PER_SCAN,
                  "metric": "chi2-MSE per bin vs the true pattern; speedup = MSE_raw/MSE_est"}
        if not getattr(args, "no_throughput", False):
            result["throughput"] = _throughput(quick, rng)
        result["wall_s"] = time.perf_counter() - t0
    return result
