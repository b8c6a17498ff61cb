"""Tests of smartbeam.analysis.kde (masked KDE, CV bandwidths, variance, prediction)."""

import numpy as np
import pytest

from smartbeam.analysis.kde import (
    DEFAULT_CANDIDATES,
    Geometry,
    Kernel,
    apply_kernels,
    kde_estimate,
    predict_time_to_target,
    product_profile,
    select_bandwidths,
    smooth,
    thin,
)
from smartbeam.analysis.kde_stream import FrameAccumulator, StreamingKDE
from smartbeam.errors import SmartbeamInputError


def _geometry(shape=(64, 64), centre=(30.3, 33.6), hole=5.0):
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    mask = np.hypot(xx - centre[0], yy - centre[1]) > hole
    mask[10, 50] = False  # a dead pixel
    return Geometry(mask, centre, band_width_px=8)


@pytest.mark.parametrize("kernel", [Kernel.iso(0), Kernel.iso(1.5), Kernel.iso(8),
                                    Kernel.ring(1, 10), Kernel.ring(0, 60)])
@pytest.mark.parametrize("backend", ["cv2", "scipy"])
def test_constant_field_is_identity_inside_mask(kernel, backend):
    g = _geometry()
    const = np.full(g.shape, 3.7)
    const[~g.mask] = 1e6  # masked values must not bleed in
    sm, _ = smooth(const, g, kernel, backend=backend)
    # the fast paths run in float32 (eps 6e-8; sums of ~100 terms)
    np.testing.assert_allclose(sm[g.mask], 3.7, rtol=1e-9 if backend == "scipy" and kernel.kind == "iso"
                               else 2e-6)
    assert np.all(sm[~g.mask] == 0)


def test_backends_agree():
    g = _geometry()
    x = np.random.default_rng(0).poisson(5.0, g.shape).astype(float)
    a, _ = smooth(x, g, Kernel.iso(2), backend="cv2")
    b, _ = smooth(x, g, Kernel.iso(2), backend="scipy")
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("kernel", [Kernel.iso(1.0), Kernel.iso(3.0), Kernel.ring(1.0, 8.0)])
def test_variance_map_matches_monte_carlo(kernel):
    g = _geometry()
    ny, nx = g.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    mu = 2.0 + 3.0 * np.exp(-np.hypot(xx - 30, yy - 33) / 12)
    rng = np.random.default_rng(1)
    draws = np.array([smooth(rng.poisson(mu).astype(float), g, kernel)[0] for _ in range(600)])
    _, var = smooth(mu, g, kernel, density=mu)
    mc = draws.var(axis=0, ddof=1)
    ratio = mc[g.mask] / var[g.mask]
    # 600 draws: the sample variance has ~6 % relative scatter per pixel
    assert abs(np.median(ratio) - 1) < 0.03
    assert np.percentile(np.abs(ratio - 1), 90) < 0.2


def test_cv_chooses_no_smoothing_for_pixel_scale_features():
    g = _geometry()
    rng = np.random.default_rng(2)
    mu = np.where((np.indices(g.shape).sum(axis=0) % 2) == 0, 400.0, 20.0)  # checkerboard
    sel = select_bandwidths(rng.poisson(mu), g, product="map", rng=3)
    assert all(k == Kernel.iso(0) for k in sel.kernels)


def test_cv_chooses_large_sigma_for_flat_field():
    g = _geometry()
    rng = np.random.default_rng(4)
    sel = select_bandwidths(rng.poisson(np.full(g.shape, 2.0)), g, product="map", rng=5)
    effective = [max(k.sigma_q, 0.5) * max(k.sigma_ring, 0.5) for k in sel.kernels]
    assert min(effective) >= 16  # at least ~4 px in both directions in every band


def test_smartbeam_beats_raw_on_ring_pattern():
    g = _geometry()
    ny, nx = g.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    r = np.hypot(xx - g.centre[0], yy - g.centre[1])
    mu = 0.05 + 2.0 * np.exp(-r / 10) * (1 + 0.5 * np.cos(r / 2))
    rng = np.random.default_rng(6)
    x = rng.poisson(mu * 5)
    res = kde_estimate(x, g, rng=7)
    m = g.mask
    mse_raw = np.mean((x[m] - 5 * mu[m]) ** 2 / (5 * mu[m]))
    mse_kde = np.mean((res.smoothed[m] - 5 * mu[m]) ** 2 / (5 * mu[m]))
    assert mse_kde < mse_raw / 3
    assert res.variance.shape == g.shape and np.all(res.variance[m] > 0)
    assert "correlated" in res.kernel_description()
    assert len(res.kernels) == g.n_bands


def test_products_and_thinning():
    g = _geometry()
    frame = np.full(g.shape, 2.0)
    for product in ("map", "sector", "radial"):
        p = product_profile(frame, g, product)
        assert np.allclose(p[np.isfinite(p)], 2.0)
    x = np.random.default_rng(0).poisson(10, g.shape)
    a, b = thin(x, np.random.default_rng(1))
    assert np.array_equal(a + b, x) and a.min() >= 0 and b.min() >= 0


def test_predictor_poisson_rate():
    t = [1, 2, 4, 8]
    e = [0.4 / np.sqrt(v) for v in t]
    assert predict_time_to_target(t, e, 0.1) == pytest.approx(16.0, rel=1e-6)
    assert predict_time_to_target([3.0], [0.2], 0.1) == pytest.approx(12.0)
    assert predict_time_to_target([], [], 0.1) == float("inf")
    with pytest.raises(SmartbeamInputError, match="target"):
        predict_time_to_target(t, e, 0.0)


def test_streaming_predictor_and_accumulator():
    g = _geometry()
    mu = np.full(g.shape, 0.5)
    s = StreamingKDE(g, seed=0)
    rng = np.random.default_rng(0)
    for i in range(8):
        s.add(rng.poisson(mu), exposure=2.0)
        if i in (1, 3, 7):
            res = s.result()
    assert s.n_frames == 8 and s.exposure == 16.0
    assert np.isfinite(res.rel_error) and res.rel_error > 0
    t = s.predicted_time(res.rel_error / 2)
    # later than now, and not later than raw counts need for that error (1/sqrt(mu t))
    raw_time = 1 / (0.25 * (res.rel_error / 2) ** 2)
    assert 16.0 < t <= 1.01 * raw_time


@pytest.mark.parametrize("bad, match", [
    (np.zeros((10, 10)), "shape"),
    (np.full((64, 64), np.nan), "finite"),
    (np.full((64, 64), np.inf), "finite"),
    (-np.ones((64, 64)), ">= 0"),
])
def test_bad_frames_rejected_and_sum_kept(bad, match, add_path):
    acc = FrameAccumulator()
    acc.add(np.ones((64, 64), np.int32))
    with pytest.raises(SmartbeamInputError, match=match):
        acc.add(bad)
    assert acc.n_frames == 1 and acc.total.sum() == 64 * 64


def test_bad_geometry():
    mask = np.ones((32, 32), bool)
    with pytest.raises(SmartbeamInputError, match="off the detector"):
        Geometry(mask, (40.0, 3.0))
    with pytest.raises(SmartbeamInputError, match="no valid pixel"):
        Geometry(np.zeros((32, 32), bool), (16, 16))
    with pytest.raises(SmartbeamInputError, match="product"):
        select_bandwidths(np.ones((32, 32)), Geometry(mask, (16, 16)), product="ring")
    with pytest.raises(SmartbeamInputError, match="score_arc_px=0"):
        Geometry(mask, (16, 16), score_arc_px=0)


def test_fast_thinning_is_binomial_half():
    rng = np.random.default_rng(11)
    for count in (1, 7, 31, 40, 1000):  # 40 and 1000 take the rng.binomial fallback
        x = np.full((200, 200), count, np.int32)
        a, b = thin(x, rng)
        assert np.array_equal(a + b, x) and a.min() >= 0
        # mean n/2 and variance n/4 within ~5 standard errors of 40k draws
        assert abs(a.mean() - count / 2) < 5 * np.sqrt(count / 4 / a.size)
        assert abs(a.var() / (count / 4) - 1) < 0.05


@pytest.fixture(params=["fused", "numpy"])
def add_path(request, monkeypatch):
    """Run a test on the numba check-and-add path and on the numpy fallback."""
    from smartbeam.analysis import kde_stream

    if request.param == "numpy":
        monkeypatch.setattr(kde_stream, "_fused", False)
    elif kde_stream._fused_add() is None:
        pytest.skip("numba not installed")
    return request.param


def test_accumulator_spills_before_int32_overflow(monkeypatch, add_path):
    from smartbeam.analysis import kde_stream

    monkeypatch.setattr(kde_stream, "_INT32_MAX", 100)
    acc = FrameAccumulator()
    frame = np.full((8, 8), 30, np.int32)
    frame[3, 4] = 7
    for _ in range(10):
        acc.add(frame)
    assert acc.total.dtype == np.int64 and np.array_equal(acc.total, 10 * frame.astype(np.int64))
    assert acc._sum.max() <= 100  # the int32 part never went past the limit
    big = np.full((8, 8), 150, np.int64)  # beyond the limit on its own
    acc.add(big)
    assert np.array_equal(acc.total, 10 * frame + 150)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.uint32,
                                   np.int64, np.float64])
def test_accumulator_sums_every_dtype(dtype, add_path):
    rng = np.random.default_rng(3)
    frames = [rng.poisson(3.0, (16, 24)).astype(dtype) for _ in range(5)]
    acc = FrameAccumulator()
    for f in frames:
        acc.add(f)
    np.testing.assert_array_equal(acc.total, np.sum(frames, axis=0))
    assert acc.n_frames == 5


def test_negative_pixel_late_in_frame_leaves_sum_unchanged(add_path):
    acc = FrameAccumulator()
    acc.add(np.full((32, 32), 2, np.int32))
    bad = np.full((32, 32), 5, np.int32)
    bad[30, 17] = -1  # after most pixels were already added on the fused path
    with pytest.raises(SmartbeamInputError, match=r"\[30, 17\].*-1.*>= 0"):
        acc.add(bad)
    assert acc.n_frames == 1 and np.all(acc.total == 2)
    acc.add(np.ones((32, 32), np.uint16))
    assert np.all(acc.total == 3)


def test_region_smoothing_equals_full_frame_per_kernel():
    """apply_kernels smooths each band's box / polar rows only: same result as full frames
    (small detector: the emitted ring kernels stay on the 1 px-of-arc grid, kde_emit)."""
    from smartbeam.analysis.kde import apply_kernels

    ny, nx = 120, 100
    yy, xx = np.mgrid[0:ny, 0:nx]
    c = (40.3, 70.7)
    mask = np.hypot(xx - c[0], yy - c[1]) > 4
    mask[5, 90] = False
    g = Geometry(mask, c, band_width_px=10)
    pool = [Kernel.iso(0), Kernel.iso(1.5), Kernel.ring(1, 8), Kernel.iso(4),
            Kernel.ring(0, 60), Kernel.ring(2, 20)]
    kernels = [pool[b % len(pool)] for b in range(g.n_bands)]
    x = np.random.default_rng(2).poisson(5.0, (ny, nx))
    sm, var = apply_kernels(x, g, kernels)
    for b, kern in enumerate(kernels):
        sel = g.band == b
        ref, _ = smooth(x, g, kern)
        ref = np.array(ref, np.float64)
        _, ref_var = smooth(x, g, kern, density=np.maximum(ref, 0.0))
        np.testing.assert_allclose(sm[sel], ref[sel], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var[sel], ref_var[sel], rtol=1e-4, atol=1e-6)
    assert np.all(sm[~mask] == 0) and np.all(var[~mask] == 0)


def test_coarse_search_close_to_full_and_never_worse_than_raw():
    """Large detectors search the candidate grid coarse-to-fine (auto): fewer kernels
    scored, no smoothing always among them, and the chosen CV error close to the full
    search's."""
    n = 300  # 300^2 valid pixels > 65,536: "auto" searches coarse-to-fine
    yy, xx = np.mgrid[0:n, 0:n]
    c = (140.2, 160.7)
    r = np.hypot(xx - c[0], yy - c[1])
    g = Geometry(r > 6, c, band_width_px=25)
    mu = 40 * np.exp(-r / 60) * (1 + 0.5 * np.cos(r / 3)) + 0.5  # rings of ~19 px period
    x = np.random.default_rng(4).poisson(mu)
    full = select_bandwidths(x, g, rng=1, search="full")
    coarse = select_bandwidths(x, g, rng=1)
    scored = coarse.cv_score[:, 0] < 1e29
    assert 0 < scored.sum() < len(coarse.candidates)
    none = coarse.candidates.index(Kernel.iso(0))
    assert scored[none]
    cols = np.arange(g.n_bands)

    def chosen(sel):
        return sel.cv_score[[sel.candidates.index(k) for k in sel.kernels], cols]

    assert np.all(chosen(coarse) <= coarse.cv_score[none])
    assert chosen(coarse).sum() <= 1.01 * chosen(full).sum()
    assert np.isfinite(coarse.rel_error_at(1.0)) and np.isfinite(coarse.scale_to_target(0.01))
    with pytest.raises(SmartbeamInputError, match="search"):
        select_bandwidths(x, g, search="greedy")


def test_narrow_fast_sum_spills_and_widens_exactly():
    from smartbeam.analysis import kde_stream

    if kde_stream._fused_add() is None:
        pytest.skip("numba not installed")
    acc = FrameAccumulator()
    frame = np.full((8, 8), 30000, np.int32)
    frame[2, 3] = 1
    for _ in range(5):  # passes 65,535 on most pixels: spilled into int64 on the way
        acc.add(frame)
    assert acc._sum.dtype == np.uint16 and acc._sum.max() <= 65535
    np.testing.assert_array_equal(acc.total, 5 * frame.astype(np.int64))
    big = np.full((8, 8), 70000, np.int32)  # beyond uint16 on its own: widened, exact
    acc.add(big)
    assert acc._sum.dtype == np.int32
    np.testing.assert_array_equal(acc.total, 5 * frame.astype(np.int64) + 70000)
    # a frame of a dtype outside the fused path next: its bound covers the fast sum
    acc.add(np.full((8, 8), 2**31 - 100, np.uint64))
    np.testing.assert_array_equal(acc.total, 5 * frame.astype(np.int64) + 70000 + 2**31 - 100)


def test_total_without_spill_is_int32():
    acc = FrameAccumulator()
    acc.add(np.full((4, 4), 7, np.uint16))
    assert acc.total.dtype in (np.int32, np.int64) and np.all(acc.total == 7)


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.float64])
def test_repeated_frame_skipped_in_the_same_pass(dtype, add_path, monkeypatch):
    from smartbeam.analysis import kde_stream

    rng = np.random.default_rng(8)
    f1 = rng.poisson(3.0, (32, 40)).astype(dtype)
    f2 = f1.copy()
    f2[31, 39] += 1  # one count more in the last pixel: a different frame
    acc = FrameAccumulator()
    assert acc.add(f1, skip_repeat=True)
    assert not acc.add(f1.copy(), skip_repeat=True)  # re-sent: left out, sum restored
    assert acc.add(f2, skip_repeat=True)
    assert not acc.add(f2, skip_repeat=True)
    assert acc.add(f1, skip_repeat=True)  # an earlier frame again is not a repeat
    assert acc.add(f1)  # without skip_repeat every frame counts
    assert acc.n_frames == 4
    np.testing.assert_array_equal(acc.total, 3 * f1.astype(np.int64) + f2)
    empty = np.zeros((32, 40), dtype)  # closed shutter: identical but legitimately so
    assert acc.add(empty, skip_repeat=True) and acc.add(empty, skip_repeat=True)
    # a repeat right after a spill of the fast sum is still recognised and removed
    monkeypatch.setattr(kde_stream, "_INT32_MAX", int(acc.total.max()) + 5)
    big = np.full((32, 40), 4, dtype)
    assert acc.add(big, skip_repeat=True)
    assert not acc.add(big, skip_repeat=True)
    np.testing.assert_array_equal(acc.total, 3 * f1.astype(np.int64) + f2 + 4)


def test_emitted_ring_filter_with_opencv_equals_scipy_fft_path():
    # the emitted ring smoothing runs OpenCV's packed real DFT (filter_cells_cv); it must
    # equal the scipy.fft path (filter_cells) to float32 rounding (tolerance 1e-5 of the
    # largest value), squared kernels (variance) included, on a sub-range of rows too
    yy, xx = np.mgrid[0:120, 0:140]
    mask = np.hypot(xx - 60.2, yy - 70.7) > 4
    g = Geometry(mask, (60.2, 70.7))
    cells = g.polar.to_cells(np.random.default_rng(9).poisson(20.0, mask.shape) * mask)
    for q, sr, sq, a in ((1.0, 20.0, False, 0), (2.0, 3.0, True, 0), (0.0, 8.0, False, 17)):
        ref = g.polar.filter_cells(cells[a:], q, sr, squared=sq, first_row=a)
        got = g.polar.filter_cells_cv(cells[a:], q, sr, squared=sq, first_row=a)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("sigma_q, sigma_ring", [(1.0, 20.0), (4.0, 60.0), (0.0, 8.0)])
def test_wide_ring_kernels_emitted_on_a_coarser_grid_match_the_1px_grid(sigma_q, sigma_ring,
                                                                       monkeypatch):
    # wide ring kernels are emitted from cells of sigma_ring / 5 px of arc, interpolated
    # along the ring (kde_emit); against the 1 px-of-arc path (ring_gaussian), smoothed
    # map and variance
    from smartbeam.analysis import kde_emit
    from smartbeam.analysis.kde_emit import coarse_n_phi

    # the coarse path runs on large detectors only (n_phi >= MIN_N_PHI): lowered here to
    # keep the test small
    assert coarse_n_phi(1449, 9216, sigma_ring) is not None
    monkeypatch.setattr(kde_emit, "MIN_N_PHI", 0)
    # a grid per group of radii (as at 2048^2), not one for the whole small frame
    monkeypatch.setattr(kde_emit, "_GROUP_COST", 0.0)
    n, c = 400, (190.3, 210.6)
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(xx - c[0], yy - c[1])
    phi = np.arctan2(yy - c[1], xx - c[0])
    mask = r > 12
    mask[50:60, 300:340] = False  # a dead patch
    g = Geometry(mask, c, band_width_px=40)
    mu = 30 * np.exp(-r / 90) * (1 + 0.5 * np.cos(r / 4)) * (1 + 0.3 * np.cos(2 * phi)) + 1
    x = np.random.default_rng(5).poisson(mu)
    assert coarse_n_phi(g.polar.n_r, g.polar.n_phi, sigma_ring) is not None
    kern = Kernel.ring(sigma_q, sigma_ring)
    sm, var = apply_kernels(x, g, [kern] * g.n_bands)
    ref = smooth(x, g, kern)[0]
    ref_var = smooth(x, g, kern, density=ref)[1]
    m = g.mask
    # measured: map <= 1.4e-3 RMS, 1.9e-3 max; variance <= 3.2e-3 RMS, 4.5e-3 max
    for got, want, rms, top in ((sm, ref, 2e-3, 5e-3), (var, ref_var, 5e-3, 1e-2)):
        d = got[m] - want[m]
        assert np.sqrt(np.mean(d ** 2) / np.mean(want[m] ** 2)) < rms
        assert np.abs(d).max() < top * np.abs(want[m]).max()
    # and the error against the true pattern is unchanged (to 1%)
    err = [np.sqrt(np.mean((e[m] - mu[m]) ** 2)) for e in (sm, ref)]
    assert abs(err[0] / err[1] - 1) < 0.01
    assert np.all(sm[~m] == 0)


def test_selection_scores_a_repeated_candidate_once():
    # A ring kernel listed twice, in blocks scored one after the other (full search,
    # 1024^2 so that the candidates are split into blocks): scored once, no crash.
    n = 1024
    g = Geometry(np.ones((n, n), bool), (n / 2 - 12, n / 2 - 2))
    x = np.random.default_rng(1).poisson(3.0, (n, n)).astype(np.int32)
    cands = (list(DEFAULT_CANDIDATES) + [Kernel.iso(s) for s in (0.6, 1.25, 2.5, 5.0, 7.0)]
             + [Kernel.ring(1.0, 20.0)])
    assert cands.count(Kernel.ring(1.0, 20.0)) == 2
    sel = select_bandwidths(x, g, rng=3, max_score_pixels=800_000, candidates=cands,
                            search="full")
    assert sel.candidates == list(dict.fromkeys(cands))
    assert sel.cv_score.shape[0] == len(cands) - 1
    assert np.all(np.isfinite(sel.cv_score))


def test_adjacent_band_pooling_lends_half_of_each_neighbour_and_keeps_raw_as_a_floor():
    from smartbeam.analysis.kde import pool_adjacent_bands

    score = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 1.0, 1.0, 9.0]])
    present = np.array([True, True, False, True])
    pooled = pool_adjacent_bands(score, present)
    # band 1 takes half of band 0 and nothing from the absent band 2
    np.testing.assert_allclose(pooled[:, 1], [2.0 + 0.5, 1.0 + 2.0])
    np.testing.assert_allclose(pooled[:, 3], score[:, 3])
    np.testing.assert_allclose(pooled[:, 0], [1.0 + 1.0, 4.0 + 0.5])
    # a candidate chosen on pooled scores is never worse than no smoothing (row 0) there
    rng = np.random.default_rng(0)
    s = rng.normal(size=(6, 9))
    p = pool_adjacent_bands(s, np.ones(9, bool))
    best = p.argmin(axis=0)
    assert np.all(p[best, np.arange(9)] <= p[0])


@pytest.mark.parametrize("product", ["map", "sector"])
def test_one_d_products_choose_on_pooled_band_scores(product):
    from smartbeam.analysis.kde import pool_adjacent_bands

    yy, xx = np.mgrid[0:96, 0:96]
    r = np.hypot(yy - 47.5, xx - 47.5)
    mu = 50.0 * np.exp(-r / 20.0) + 2.0
    g = Geometry(r > 3, (47.5, 47.5), sector=(30.0, 10.0))
    x = np.random.default_rng(3).poisson(mu)
    sel = select_bandwidths(x, g, product=product, rng=np.random.default_rng(4))
    present = sel.present
    score = sel.cv_score if product == "map" else pool_adjacent_bands(sel.cv_score, present)
    want = [sel.candidates[i] for i in np.argmin(score, axis=0)]
    assert [k for k, p in zip(sel.kernels, present, strict=True) if p] == \
        [k for k, p in zip(want, present, strict=True) if p]
