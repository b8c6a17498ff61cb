"""Tests of smartbeam.analysis.kde_thin (fused binomial thinning, polar binning)."""

import numpy as np
from scipy import stats

from smartbeam.analysis.kde import Geometry
from smartbeam.analysis.kde_thin import bin_cells, thin_masked


def _geometry(n=96):
    yy, xx = np.mgrid[0:n, 0:n]
    mask = np.hypot(xx - 40.3, yy - 50.6) > 5
    mask[:, -1] = False
    return Geometry(mask, (40.3, 50.6), band_width_px=10)


def test_halves_sum_to_the_counts_inside_the_mask_and_are_zero_outside():
    g = _geometry()
    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, g.shape)
    x[10, 10] = 5000  # numba's binomial
    x[11, 10] = 700  # several 64-bit words
    x[~g.mask] = 9
    for counts in (x, x.astype(np.int32), x.astype(np.float64)):
        a, b = thin_masked(counts, g, np.random.default_rng(1))
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal((a + b)[g.mask], x[g.mask])
        assert not a[~g.mask].any() and not b[~g.mask].any()
        assert a.min() >= 0 and b.min() >= 0
    a1, _ = thin_masked(x, g, np.random.default_rng(7))
    a2, _ = thin_masked(x, g, np.random.default_rng(7))
    np.testing.assert_array_equal(a1, a2)  # reproducible from the generator


def test_thinned_half_is_binomial_half():
    g = _geometry(200)
    rng = np.random.default_rng(2)
    for n in (1, 5, 40, 63, 64, 200, 4500):
        x = np.where(g.mask, n, 0)
        a, _ = thin_masked(x, g, rng)
        v = a[g.mask].astype(int)
        # mean n/2, variance n/4; chi^2 goodness of fit against Binomial(n, 1/2)
        assert abs(v.mean() - n / 2) < 4 * np.sqrt(n / 4 / v.size)
        assert abs(v.var() / (n / 4) - 1) < 0.05
        if n <= 64:
            obs = np.bincount(v, minlength=n + 1)
            exp = stats.binom.pmf(np.arange(n + 1), n, 0.5) * v.size
            keep = exp > 5
            chi2 = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
            assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-4
    # independent halves: A and B of Poisson counts are uncorrelated
    x = rng.poisson(6.0, g.shape)
    a, b = thin_masked(x, g, rng)
    assert abs(np.corrcoef(a[g.mask], b[g.mask])[0, 1]) < 0.02


def test_bin_cells_equals_to_cells():
    g = _geometry()
    rng = np.random.default_rng(3)
    a, b = thin_masked(rng.poisson(4.0, g.shape), g, rng)
    ca, cb = bin_cells(a, b, g.polar)
    np.testing.assert_allclose(ca, g.polar.to_cells(a), atol=1e-3)
    np.testing.assert_allclose(cb, g.polar.to_cells(b), atol=1e-3)
    assert ca.shape == (g.polar.n_r, g.polar.n_phi)


def test_non_contiguous_mask_and_counts():
    g0 = _geometry()
    g = Geometry(np.asfortranarray(g0.mask), g0.centre, band_width_px=10)
    x = np.asfortranarray(np.random.default_rng(6).poisson(2.0, g.shape))
    a, b = thin_masked(x, g, np.random.default_rng(0))
    np.testing.assert_array_equal((a + b)[g.mask], x[g.mask])
    assert not a[~g.mask].any()


def test_bin_frame_equals_float64_bincount():
    from smartbeam.analysis.kde import Geometry
    from smartbeam.analysis.kde_thin import bin_frame

    yy, xx = np.mgrid[0:90, 0:110]
    mask = np.hypot(xx - 50.3, yy - 40.1) > 5
    g = Geometry(mask, (50.3, 40.1))
    h = g.masked32(np.random.default_rng(3).poisson(7.0, mask.shape))
    np.testing.assert_allclose(bin_frame(h, g.polar), g.polar.to_cells(h), rtol=1e-6)

