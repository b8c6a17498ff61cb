"""Tests of smartbeam.analysis.kde_score (kernels evaluated at the scored rows only)."""

import numpy as np
import pytest

from smartbeam.analysis.kde import Geometry, Kernel, select_bandwidths, smooth
from smartbeam.analysis.kde_score import RowScorer
from smartbeam.errors import SmartbeamInputError


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
    cells = g.polar.to_cells(h)
    for sr in (0.0, 8.0, 60.0):
        grid = cells if sr == 0 else g.polar.filter_ring(np.fft.rfft(cells, axis=1), sr)
        qs = [0.0, 1.0, 4.0]
        prepared = sc.prepare_ring(grid.astype(np.float32), 20)
        for q, v in zip(qs, sc.ring(prepared, sr, qs), strict=True):
            ref, _ = smooth(x, g, Kernel.ring(q, sr))
            np.testing.assert_allclose(v, ref.ravel()[idx], rtol=2e-4, atol=2e-4)
    with pytest.raises(SmartbeamInputError, match="radius"):
        sc.ring(sc.prepare_ring(cells, 2), 0.0, [4.0])


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
