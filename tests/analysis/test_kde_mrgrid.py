"""Tests of smartbeam.analysis.kde_mrgrid (multi-resolution polar grid of the CV scoring)."""

import numpy as np

from smartbeam.analysis.kde import Geometry, Kernel, smooth
from smartbeam.analysis.kde_mrgrid import MultiPolar
from smartbeam.analysis.kde_thin import bin_cells


def _geometry(n=300, centre=(140.2, 160.7)):
    yy, xx = np.mgrid[0:n, 0:n]
    mask = np.hypot(xx - centre[0], yy - centre[1]) > 6
    mask[:, :2] = False
    return Geometry(mask, centre, band_width_px=25)


def _rel_rms(v, ref):
    return float(np.sqrt(np.mean((v - ref) ** 2) / np.mean(ref ** 2)))


def test_groups_have_their_own_resolution_and_bin_every_valid_pixel():
    g = _geometry()
    p = MultiPolar(g.mask, g.r, g.polar.phi, arc_px=2.0, group_rows=64)
    assert np.all(np.diff(p.n_phi_g) > 0) and np.all(p.n_phi_g % 2 == 0)
    # ~2 px of arc at each group's outer radius, never coarser
    outer = p.r0 + p.n_rows
    assert np.all(2 * np.pi * outer / p.n_phi_g <= 2.0 + 1e-9)
    assert p.size < g.score_polar.n_r * g.score_polar.n_phi
    x = np.random.default_rng(0).poisson(3.0, g.shape)
    h = g.masked32(x)
    ca, cb = bin_cells(h, 2 * h, p)
    np.testing.assert_allclose(ca, p.to_cells(h), rtol=1e-5)
    assert np.isclose(ca.sum(), h.sum(), rtol=1e-5) and np.isclose(cb.sum(), 2 * h.sum(),
                                                                      rtol=1e-5)


def test_windows_across_groups_match_the_emitted_smoothing():
    # a q kernel wider than the distance to a group edge reads two groups of different
    # resolution; without weighing each group's cells by its angle the error at the group
    # edges was ~6% (measured); now no radius is worse than the rest
    g = _geometry()
    yy, xx = np.mgrid[0:300, 0:300]
    r = np.hypot(xx - 140.2, yy - 160.7)
    mu = 40 * np.exp(-r / 60) * (1 + 0.5 * np.cos(r / 3)) + 0.5
    x = np.random.default_rng(2).poisson(mu)
    sc = g.row_scorer(20000)
    h = g.masked32(x)
    cells = sc.polar.to_cells(h)
    spec = sc.ring_spectrum(cells)
    rr = g.r.ravel()[sc.idx]
    edge = np.zeros(rr.size, bool)
    for e in sc.polar.r0[1:]:
        edge |= np.abs(rr - e) < 8
    assert edge.any()
    grid = sc.ring_grid(spec, cells, 8.0)
    v = sc.ring_at(grid, [4.0])[0]
    ref = smooth(x, g, Kernel.ring(4.0, 8.0))[0].ravel()[sc.idx]
    assert _rel_rms(v[edge], ref[edge]) < 0.005
    assert _rel_rms(v, ref) < 0.005


def test_pair_pass_equals_two_single_passes():
    g = _geometry()
    sc = g.row_scorer(20000)
    rng = np.random.default_rng(7)
    ha = g.masked32(rng.poisson(5.0, g.shape))
    hb = g.masked32(rng.poisson(5.0, g.shape))
    ca, cb = sc.bin_halves(ha, hb)
    for sr in (3.0, 60.0):
        ga = sc.ring_grid(sc.ring_spectrum(ca), ca, sr)
        gb = sc.ring_grid(sc.ring_spectrum(cb), cb, sr)
        pa, pb = sc.ring_at_pair(ga, gb, [0.0, 2.0, 4.0])
        for got, want in zip(pa + pb, sc.ring_at(ga, [0.0, 2.0, 4.0])
                             + sc.ring_at(gb, [0.0, 2.0, 4.0]), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
