"""Tests of smartbeam.analysis.kde_score (kernels evaluated at the scored rows only)."""

import numpy as np
import pytest

from smartbeam.analysis.kde import Geometry, Kernel, select_bandwidths, smooth
from smartbeam.analysis.kde_filters import ring_gaussian
from smartbeam.analysis.kde_score import RowScorer, cv_band_sums, pilot_terms, split_terms


def _geometry(n=160, centre=(70.4, 90.7)):
    yy, xx = np.mgrid[0:n, 0:n]
    mask = np.hypot(xx - centre[0], yy - centre[1]) > 6
    mask[3, 150] = False
    mask[:, :2] = False  # a dead detector edge
    return Geometry(mask, centre, band_width_px=20)


def test_score_rows_are_whole_rows_with_about_the_asked_pixels():
    g = _geometry()
    rows, idx = g.score_rows(3000)
    assert rows is not None and np.all(np.diff(rows) > 0)
    y, x = np.divmod(idx, g.shape[1])
    assert set(np.unique(y)) <= set(rows.tolist())
    # every valid pixel of those rows, and only valid pixels
    assert idx.size == int(g.mask[rows].sum()) and g.mask.ravel()[idx].all()
    assert 0.7 * 3000 <= idx.size <= 1.5 * 3000
    assert np.array_equal(g.score_index(3000), idx)
    rows_all, idx_all = g.score_rows(None)
    assert rows_all is None and idx_all.size == int(g.mask.sum())


@pytest.mark.parametrize("first_row, last_row", [(0, 160), (5, 150)])
def test_row_values_equal_full_frame_smoothing(first_row, last_row):
    g = _geometry()
    rng = np.random.default_rng(5)
    rows = np.sort(rng.choice(np.arange(first_row, last_row), 12, replace=False))
    rows[0] = first_row  # a row at the detector edge: the zero border matters
    rows = np.unique(rows)
    idx = np.flatnonzero(g.mask & np.isin(np.arange(g.shape[0]), rows)[:, None])
    sc = RowScorer(g, rows, idx)
    x = rng.poisson(4.0, g.shape)
    h = g.masked32(x)
    sigmas = [0.5, 1.5, 4.0, 10.0]
    for s, v in zip(sigmas, sc.iso(h, sigmas), strict=True):
        ref, _ = smooth(x, g, Kernel.iso(s))
        np.testing.assert_allclose(v, ref.ravel()[idx], rtol=2e-5, atol=2e-5)
    # ring kernels on the scorer's own polar grid: exact where the grid is kept whole,
    # interpolated along the ring where it is sampled coarser (wide sigma_ring)
    cells = sc.polar.to_cells(h)
    spec = sc.ring_spectrum(cells)
    reduced = 0
    for sr in (0.0, 3.0, 8.0, 60.0):
        qs = [0.0, 1.0, 4.0]
        grid = sc.ring_grid(spec, cells, sr)
        reduced += grid.n_out < sc.polar.n_phi
        for q, v in zip(qs, sc.ring_at(grid, qs), strict=True):
            ref = ring_gaussian(x, sc.polar, q, sr)[0].ravel()[idx]
            if grid.n_out == sc.polar.n_phi:
                np.testing.assert_allclose(v, ref, rtol=2e-4, atol=2e-4)
            else:
                # linear interpolation at h = sigma_ring / 5 px of arc attenuates a
                # harmonic of the filtered ring by at most 0.09 (h / sigma)^2 < 4e-3 of it
                assert _rel_rms(v, ref) < 4e-3
                np.testing.assert_allclose(v, ref, rtol=1e-2, atol=1e-2)
    assert reduced >= 1  # wide sigma_ring: the reduced sampling ran (sigma_ring = 0: whole)
    # one sigma_q at a time gives the values of a call with several
    grid = sc.ring_grid(spec, cells, 8.0)
    both = sc.ring_at(grid, [4.0, 1.0])
    for q, v in zip((4.0, 1.0), both, strict=True):
        np.testing.assert_array_equal(sc.ring_at(grid, [q])[0], v)


def _rel_rms(v, ref):
    return float(np.sqrt(np.mean((v - ref) ** 2) / np.mean(ref ** 2)))


def test_scored_ring_values_close_to_the_emitted_smoothing():
    # the scoring grid (score_arc_px, 3 px of arc by default) against the emitted one (~1 px)
    g = _geometry(n=300, centre=(140.2, 160.7))
    yy, xx = np.mgrid[0:300, 0:300]
    r = np.hypot(xx - 140.2, yy - 160.7)
    mu = 40 * np.exp(-r / 60) * (1 + 0.5 * np.cos(r / 3)) + 0.5
    x = np.random.default_rng(2).poisson(mu)
    sc = g.row_scorer(20000)
    assert sc.polar.n_phi < g.polar.n_phi
    h = g.masked32(x)
    cells = sc.polar.to_cells(h)
    spec = sc.ring_spectrum(cells)
    for sr, tol in ((3.0, 0.02), (8.0, 0.005), (20.0, 0.003), (60.0, 0.003)):
        grid = sc.ring_grid(spec, cells, sr)
        for q, v in zip((1.0, 4.0), sc.ring_at(grid, [1.0, 4.0]), strict=True):
            emitted = smooth(x, g, Kernel.ring(q, sr))[0].ravel()[sc.idx]
            assert _rel_rms(v, emitted) < tol, (sr, q)


def test_row_scored_selection_never_worse_than_raw_and_finds_rings():
    n = 300
    yy, xx = np.mgrid[0:n, 0:n]
    c = (140.2, 160.7)
    r = np.hypot(xx - c[0], yy - c[1])
    g = Geometry(r > 6, c, band_width_px=25)
    mu = 40 * np.exp(-r / 60) * (1 + 0.5 * np.cos(r / 3)) + 0.5
    x = np.random.default_rng(4).poisson(mu)
    sel = select_bandwidths(x, g, rng=1, max_score_pixels=20000)
    assert g.score_rows(20000)[0] is not None  # the row path ran
    none = sel.candidates.index(Kernel.iso(0))
    cols = np.arange(g.n_bands)
    chosen = sel.cv_score[[sel.candidates.index(k) for k in sel.kernels], cols]
    assert np.all(chosen <= sel.cv_score[none])
    # sharp rings of ~19 px period: the bright inner bands are smoothed along the ring
    assert any(k.kind == "ring" for k in sel.kernels[:4])


def test_cv_band_sums_match_the_numpy_formula():
    rng = np.random.default_rng(3)
    n, m, nb = 3, 500, 4
    ea, eb = rng.random((n, m)).astype(np.float32), rng.random((n, m)).astype(np.float32)
    ra, rb, noise, weight = (rng.random(m) for _ in range(4))
    ok = rng.random(m) > 0.2
    band = rng.integers(0, nb, m)
    got = cv_band_sums(ea, eb, ra, rb, noise, weight, ok, band, nb)
    a, b = np.where(ok, ea, 0.0), np.where(ok, eb, 0.0)
    err = 0.5 * ((a - rb) ** 2 + (b - ra) ** 2)
    d2 = 0.5 * (a - b) ** 2
    for t, term in enumerate((err * weight, err - noise, d2, d2 * weight)):
        want = np.stack([np.bincount(band[ok], weights=row[ok], minlength=nb) for row in term])
        np.testing.assert_allclose(got[t], want, rtol=1e-5)


def test_iso_of_two_halves_equals_iso_of_their_sum():
    # the selection's pilot smooths the two thinned halves of integer counts as read
    g = _geometry()
    sc = g.row_scorer(3000)
    rng = np.random.default_rng(11)
    a = g.masked32(rng.poisson(3.0, g.shape))
    b = g.masked32(rng.poisson(5.0, g.shape))
    sigmas = [1.0, 2.0, 6.0]
    for v2, v1 in zip(sc.iso(a, sigmas, frame2=b), sc.iso(a + b, sigmas), strict=True):
        assert np.array_equal(v2, v1)


def test_selection_scores_equal_for_integer_and_float_counts():
    # integer counts take the pilot from the thinned halves, float counts from the
    # converted frame: the same pilot, the same thinning draws, the same scores
    g = _geometry()
    x = np.random.default_rng(12).poisson(2.0, g.shape)
    s_int = select_bandwidths(x, g, rng=7, max_score_pixels=3000, search="full")
    s_flt = select_bandwidths(x.astype(float), g, rng=7, max_score_pixels=3000,
                              search="full")
    assert np.array_equal(s_int.cv_score, s_flt.cv_score)
    assert s_int.kernels == s_flt.kernels


def test_values_written_into_given_arrays_equal_the_returned_ones():
    # the selection writes candidate values straight into its block of rows
    g = _geometry()
    sc = g.row_scorer(3000)
    rng = np.random.default_rng(13)
    ha = g.masked32(rng.poisson(4.0, g.shape))
    hb = g.masked32(rng.poisson(4.0, g.shape))
    sigmas = [1.0, 3.0]
    dst = np.full((2, sc.idx.size), np.nan, np.float32)
    sc.iso(ha, sigmas, out=list(dst))
    for got, want in zip(dst, sc.iso(ha, sigmas), strict=True):
        assert np.array_equal(got, want)
    ca, cb = sc.bin_halves(ha, hb)
    qs = [0.0, 2.0, 4.0]
    ga = sc.ring_grid(sc.ring_spectrum(ca), ca, 8.0)
    gb = sc.ring_grid(sc.ring_spectrum(cb), cb, 8.0)
    out = (np.full((3, sc.idx.size), np.nan, np.float32),
           np.full((3, sc.idx.size), np.nan, np.float32))
    sc.ring_at_pair(ga, gb, qs, out=out)
    want_a, want_b = sc.ring_at_pair(ga, gb, qs)
    assert np.array_equal(out[0], np.stack(want_a)) and np.array_equal(out[1], np.stack(want_b))


def test_cv_band_sums_with_kept_runs_equal_computed_runs():
    g = _geometry()
    sc = g.row_scorer(3000)
    band_of, starts, bands = sc.runs
    assert np.array_equal(band_of, g.band.ravel()[sc.idx])
    # one run per band present (the scored pixels come sorted by band)
    assert np.array_equal(bands, np.unique(band_of)) and starts[-1] == band_of.size
    rng = np.random.default_rng(2)
    n = band_of.size
    ea, eb = rng.random((2, n)).astype(np.float32), rng.random((2, n)).astype(np.float32)
    ra, rb, noise, weight = (rng.random(n) for _ in range(4))
    ok = rng.random(n) > 0.1
    want = cv_band_sums(ea, eb, ra, rb, noise, weight, ok, band_of, g.n_bands)
    got = cv_band_sums(ea, eb, ra, rb, noise, weight, ok, band_of, g.n_bands,
                       runs=(starts, bands))
    assert np.array_equal(got, want)


def test_row_scorer_selection_scores_do_not_depend_on_candidate_order():
    # the search evaluates a block with the ring kernels of each sigma_ring in adjacent
    # rows: each candidate must keep its own scores whatever its place in the list
    g = _geometry()
    x = np.random.default_rng(4).poisson(6.0, g.shape)
    cands = [Kernel.iso(0), Kernel.iso(1.0), Kernel.ring(2.0, 8.0), Kernel.iso(3.0),
             Kernel.ring(0.0, 8.0), Kernel.ring(1.0, 3.0), Kernel.ring(4.0, 8.0)]
    perm = [6, 2, 0, 5, 3, 4, 1]
    a = select_bandwidths(x, g, candidates=cands, rng=9, max_score_pixels=3000,
                          search="full")
    b = select_bandwidths(x, g, candidates=[cands[i] for i in perm], rng=9,
                          max_score_pixels=3000, search="full")
    assert np.array_equal(b.cv_score, a.cv_score[perm])
    assert np.array_equal(b.variance, a.variance[perm])


def test_pilot_and_split_terms_equal_the_numpy_formulas_bitwise():
    # the selection's per-pixel terms from one pass each: the same floats as the numpy
    # expressions they replace (the per-band sums add in pixel order, as bincount does)
    g = _geometry()
    sc = g.row_scorer(3000)
    rng = np.random.default_rng(21)
    ha = g.masked32(rng.poisson(3.0, g.shape))
    hb = g.masked32(rng.poisson(3.0, g.shape))
    pilot = rng.normal(2.0, 1.5, sc.idx.size).astype(np.float32)  # some below the floor
    pilot[5] = np.inf  # not ok
    floor = 0.37
    band = sc.band_of
    ok, weight, sig2, n_ok = pilot_terms(pilot, floor, band, g.n_bands)
    with np.errstate(invalid="ignore"):
        pp = np.maximum(pilot, floor).astype(np.float64)
        want_ok = np.isfinite(pp)
        want_w = np.where(want_ok, 1.0 / np.where(want_ok, pp, 1.0), 0.0)
        ps = np.maximum(pilot, 0.0).astype(np.float64)
        want_s2 = np.bincount(band, weights=np.where(want_ok, (ps / 2) ** 2, 0.0),
                              minlength=g.n_bands)
    assert not ok[5] and np.array_equal(ok, want_ok) and np.array_equal(weight, want_w)
    assert np.array_equal(sig2, want_s2)
    assert np.array_equal(n_ok, np.bincount(band[want_ok], minlength=g.n_bands))
    pa, pb, ra, rb, noise, chi2 = split_terms(ha, hb, sc.idx, ok, weight, band, g.n_bands)
    prof = [h.ravel()[sc.idx] for h in (ha, hb)]
    raw = [np.where(ok, p.astype(np.float64), 0.0) for p in prof]
    want_noise = np.where(ok, 0.5 * (raw[0] + raw[1]), 0.0)
    assert np.array_equal(pa, prof[0]) and np.array_equal(pb, prof[1])
    assert np.array_equal(ra, raw[0]) and np.array_equal(rb, raw[1])
    assert np.array_equal(noise, want_noise)
    assert np.array_equal(chi2, np.bincount(band, weights=want_noise * weight,
                                            minlength=g.n_bands))
