"""Tests of smartbeam.analysis.kde_emit (wide ring kernels emitted on a coarse grid)."""

import numpy as np
import pytest

from smartbeam.analysis import kde_emit
from smartbeam.analysis.kde import Geometry, Kernel, apply_kernels
from smartbeam.analysis.kde_emit import coarse_n_phi, index_runs
from smartbeam.analysis.kde_filters import PolarGrid


def test_index_runs():
    starts, lens = index_runs(np.array([3, 4, 5, 9, 11, 12]))
    assert starts.tolist() == [3, 9, 11] and lens.tolist() == [3, 1, 2]
    starts, lens = index_runs(np.array([], np.int64))
    assert starts.size == 0 and lens.size == 0


def _reference(x, g, kern, rows, sel, n_c, variance):
    """The coarse-grid emit of one group of rows written out in numpy/scipy (float64
    linear binning by np.add.at, scipy FFT over the whole ring, interpolation by fancy
    indexing): what the numba passes, and the rings cut to their used arcs, must
    reproduce."""
    polar = PolarGrid(g.mask, g.centre, n_phi=n_c)
    a, b = rows
    rb = polar.r.astype(np.int64)

    def split(pix):  # row, left cell and right weight of each pixel
        pos = (polar.phi[pix] + np.pi) / (2 * np.pi) * n_c - 0.5
        return rb[pix] - a, np.floor(pos).astype(np.int64) % n_c, pos - np.floor(pos)

    rho, i0, f = split(g.mask & (rb >= a) & (rb < b))
    w = x[g.mask & (rb >= a) & (rb < b)].astype(float)
    cells, occ = np.zeros((b - a, n_c)), np.zeros((b - a, n_c))
    for grid, v in ((cells, w), (occ, np.ones_like(w))):
        np.add.at(grid, (rho, i0), v * (1 - f))
        np.add.at(grid, (rho, (i0 + 1) % n_c), v * f)
    den = polar.filter_cells(occ, kern.sigma_q, kern.sigma_ring, first_row=a)
    inv = np.where(den > 1e-6, 1 / np.where(den > 1e-6, den, 1), 0)
    est = polar.filter_cells(cells, kern.sigma_q, kern.sigma_ring, first_row=a) * inv
    maps = [est]
    if variance:
        dens = np.maximum(est, 0.0) * occ
        maps.append(polar.filter_cells(dens, kern.sigma_q, kern.sigma_ring, squared=True,
                                       first_row=a) * inv * inv)
    rho, i0, f = split(sel)
    return [m[rho, i0] + f * (m[rho, (i0 + 1) % n_c] - m[rho, i0]) for m in maps]


@pytest.mark.parametrize("sigma_q, sigma_ring", [(1.0, 8.0), (0.0, 40.0)])
def test_coarse_ring_emit_equals_numpy_reference(sigma_q, sigma_ring, monkeypatch):
    # the numba linear binning (runs of pixels, masked pixels skipped, uint16 counts read
    # as they are) and interpolation (wrap column at phi = +-pi, both maps in one pass, the
    # normaliser in its weights), per group of rows with its own grid, rings cut to their
    # used arcs, against a plain numpy/scipy version of each group's grid on whole rings;
    # an isotropic inner band makes the ring region an annulus (two runs per row)
    monkeypatch.setattr(kde_emit, "MIN_N_PHI", 0)
    monkeypatch.setattr(kde_emit, "_GROUP_COST", 0.0)  # several groups on a small frame
    n, c = 300, (140.3, 157.6)
    yy, xx = np.mgrid[0:n, 0:n]
    mask = np.hypot(xx - c[0], yy - c[1]) > 6
    mask[200:210, 30:90] = False  # a dead patch inside the ring bands
    mask[157, :] = False  # and a dead row through the centre (phi = +-pi side)
    g = Geometry(mask, c, band_width_px=30)
    ring = Kernel.ring(sigma_q, sigma_ring)
    kernels = [Kernel.iso(1.0)] * 2 + [ring] * (g.n_bands - 2)
    assert coarse_n_phi(g.polar.n_r, g.polar.n_phi, ring.sigma_ring) is not None
    x = np.random.default_rng(3).poisson(4.0, mask.shape).astype(np.uint16)
    sel = mask & (g.band >= 2)
    rb = g.polar.r.astype(np.int64)
    for variance in (False, True):
        sm, var = apply_kernels(x, g, kernels, variance=variance)
        (_, reg), = [(k, r) for k, r in g.kernel_regions(kernels) if k == ring]
        groups = reg.coarse[1].groups
        assert len(groups) >= 2 and groups[-1].rows[1] == g.polar.n_r
        if sigma_ring == 8.0:  # the outer rings (corners only) are cut to their arcs
            assert groups[-1].width < 0.8 * groups[-1].n_phi
        assert [gp.out_rows[1] for gp in groups[:-1]] == [gp.out_rows[0] for gp in groups[1:]]
        for gp in groups:
            # each grid's cell is at most ARC_STEP sigma_ring of arc on its outer row
            assert 2 * np.pi * gp.rows[1] / gp.n_phi <= kde_emit.ARC_STEP * sigma_ring
            s, e = gp.out_rows
            part = sel & (rb >= s) & (rb < e)
            want = _reference(x, g, ring, gp.rows, part, gp.n_phi, variance)
            # float32 DFTs against float64 ones: ~1e-6 of the largest value (as in
            # test_kde.py), whereas a wrong cell or weight is off by ~1e-2
            scale = np.abs(want[0]).max()
            np.testing.assert_allclose(sm[part], want[0], rtol=0, atol=1e-5 * scale)
            if variance:
                np.testing.assert_allclose(var[part], want[1], rtol=0,
                                           atol=1e-5 * np.abs(want[1]).max())
        if variance:
            assert np.all(var[~mask] == 0)
        assert np.all(sm[~mask] == 0)
        # a second emit reuses the plan and its work buffers: same values
        again = apply_kernels(x, g, kernels, variance=variance)
        assert np.array_equal(again[0], sm)


def test_ring_groups_cover_the_rows_at_the_arc_step():
    rng = np.random.default_rng(0)
    row_px = rng.integers(0, 3000, 1449)
    for reach, sr in ((8, 8.0), (32, 20.0), (0, 60.0)):
        groups = kde_emit.ring_groups(row_px, (100, 1449), reach, sr)
        assert groups[0][0] == 100 and groups[-1][1] == 1449
        assert all(g[1] == h[0] for g, h in zip(groups[:-1], groups[1:], strict=True))
        for _s, e, n in groups:
            top = min(e + reach, 1449)
            assert n == kde_emit.group_n_phi(top, sr) and n % 2 == 0
            assert 2 * np.pi * top / n <= kde_emit.ARC_STEP * sr
        # a grid per group: fewer cells than one grid sized for the outermost row
        cells = sum((min(e + reach, 1449) - max(s - reach, 0)) * n for s, e, n in groups)
        assert cells < (1449 - 100) * kde_emit.group_n_phi(1449, sr)


def test_ring_plans_sharing_work_buffers_give_each_kernels_own_values(monkeypatch):
    # two ring kernels on the 1 px grid and two on the coarse grid in one kernel list:
    # their plans share work buffers per grid shape, yet each band gets the values of
    # its kernel emitted alone, with and without the variance, emit after emit
    monkeypatch.setattr(kde_emit, "MIN_N_PHI", 0)
    n, c = 240, (117.4, 121.8)
    yy, xx = np.mgrid[0:n, 0:n]
    mask = np.hypot(xx - c[0], yy - c[1]) > 5
    mask[30, 40:60] = False
    g = Geometry(mask, c, band_width_px=30)
    pool = [Kernel.iso(1.0), Kernel.ring(1.0, 0.5), Kernel.ring(0.0, 40.0),
            Kernel.ring(2.0, 0.7), Kernel.ring(1.0, 60.0)]
    assert coarse_n_phi(g.polar.n_r, g.polar.n_phi, 0.5) is None
    assert coarse_n_phi(g.polar.n_r, g.polar.n_phi, 40.0) is not None
    kernels = [pool[b % len(pool)] for b in range(g.n_bands)]
    x = np.random.default_rng(4).poisson(6.0, mask.shape)
    for variance in (True, False, True):
        sm, var = apply_kernels(x, g, kernels, variance=variance)
        for b, kern in enumerate(kernels):
            sel = g.band == b
            alone = apply_kernels(x, g, [kern] * g.n_bands, variance=variance)
            np.testing.assert_array_equal(sm[sel], alone[0][sel])
            if variance:
                np.testing.assert_array_equal(var[sel], alone[1][sel])


def test_ring_emit_memory_stays_bounded_while_the_ring_bands_drift():
    # A long count re-selects often and the bands given a ring kernel drift; the emit
    # plans' work buffers must not pile up (only the cached kernel lists' plans live).
    import gc
    import tracemalloc

    n = 384
    rng = np.random.default_rng(1)
    g = Geometry(np.ones((n, n), bool), (110.0, 170.0))
    x = rng.poisson(3.0, (n, n)).astype(np.uint16)
    nb = g.n_bands

    def emits(count):
        for _ in range(count):
            lo = int(rng.integers(0, nb - 3))
            hi = int(rng.integers(lo + 1, nb))
            kernels = [Kernel.iso(1.0)] * nb
            kernels[lo:hi] = [Kernel.ring(1.0, float(rng.choice([3.0, 20.0])))] * (hi - lo)
            apply_kernels(x, g, kernels, variance=True)

    tracemalloc.start()
    try:
        emits(16)  # warm: four cached kernel lists, buffers grown to the widest span
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        emits(24)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    one_list = 6 * 4 * n * n * 4  # a generous bound for the buffers of one kernel list
    assert grown < one_list, f"emit memory grew by {grown / 1e6:.1f} MB over 24 re-selections"
