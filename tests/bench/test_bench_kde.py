"""The KDE benchmark prints the issue's JSON and its emit breakdown reads the real plans."""

import argparse

import numpy as np

from smartbeam.analysis.kde import Geometry, Kernel
from smartbeam.bench import kde as bench_kde


def test_quick_run_prints_the_cases_of_the_issue_schema():
    parser = argparse.ArgumentParser()
    bench_kde.add_arguments(parser)
    out = bench_kde.run(parser.parse_args(["--quick", "--no-throughput", "--reps", "1"]))
    cases = out["cases"]
    assert {(c["pattern"], c["product"]) for c in cases} == {
        (p, prod) for p in ("realistic", "sharp", "anisotropic")
        for prod in ("map", "sector", "radial")}
    assert sorted({c["n_scans"] for c in cases}) == [1, 10, 100]
    for c in cases:
        assert set(c["speedup_mse"]) == set(c["variance_ratio"]) == {"sigma1", "smartbeam"}
        assert all(np.isfinite(v) and v > 0 for v in c["speedup_mse"].values())
    # the realistic map is where smoothing pays most (~50x at 10 scans); far from 1 even
    # with one repeat
    real10 = next(c for c in cases if c["pattern"] == "realistic" and c["product"] == "map"
                  and c["n_scans"] == 10)
    assert real10["speedup_mse"]["smartbeam"] > 5


def test_emit_breakdown_times_the_passes_of_the_coarse_ring_plans():
    n = 1024  # wide enough for the coarse ring grids (kde_emit.MIN_N_PHI)
    yy, xx = np.mgrid[0:n, 0:n]
    c = (n / 2 - 0.3, n / 2 + 0.2)
    g = Geometry(np.hypot(xx - c[0], yy - c[1]) > n / 32, c, band_width_px=n / 16)
    x = np.random.default_rng(0).poisson(2.0, (n, n)).astype(np.uint16)
    kernels = [Kernel.iso(1.0)] * 4 + [Kernel.ring(1.0, 20.0)] * (g.n_bands - 4)
    out = bench_kde._emit_breakdown(x, g, kernels, repeat=1)
    assert out["n_groups"] >= 1 and out["n_cells"] > 0
    for key in ("bin_pixels", "ring_and_q_filter", "interpolate_pixels", "emit_total",
                "iso_and_rest"):
        assert np.isfinite(out[key]) and out[key] >= 0
