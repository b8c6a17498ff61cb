"""The seven measures against hand-computed values."""

import math

import numpy as np
import pytest

from smartbeam.analysis.similarity import (
    MEASURES,
    dissimilarity,
    prepare,
    remove_background,
    resample,
    similarity_from_dissimilarity,
)
from smartbeam.errors import SmartbeamInputError

A = np.array([[1.0, 2.0, 3.0, 2.0]])   # area 8
B = np.array([[2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]])  # areas 8, 8


def test_euclidean_and_cityblock_on_area_normalised():
    a, b = A / 8, B / 8
    d_e = dissimilarity(A, B, "euclidean")
    d_c = dissimilarity(A, B, "cityblock")
    assert d_e[0, 0] == pytest.approx(math.sqrt(1 + 0 + 1 + 0) / 8)
    assert d_c[0, 1] == pytest.approx((1 + 2 + 1 + 2) / 8)
    np.testing.assert_allclose(d_e, np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)))


def test_cosine_and_pearson():
    # cos(A, B1) = (2+4+6+4)/(sqrt(18) * 4)
    d = dissimilarity(A, B, "cosine")
    assert d[0, 0] == pytest.approx(1 - 16 / (math.sqrt(18) * 4))
    # Pearson of A with [0,0,4,4]: A-mean = [-1,0,1,0], B-mean = [-2,-2,2,2] -> r = 4/(sqrt2*4)
    p = dissimilarity(A, B, "pearson")
    assert p[0, 1] == pytest.approx(1 - 1 / math.sqrt(2))
    assert similarity_from_dissimilarity(p, "pearson")[0, 1] == pytest.approx(1 / math.sqrt(2))
    # scale and offset invariance
    assert dissimilarity(3 * A + 7, B, "pearson")[0, 1] == pytest.approx(p[0, 1])


def test_jsd_base2_and_emd_cumsum():
    p = np.array([[1.0, 0.0]])
    q = np.array([[0.0, 1.0], [1.0, 0.0]])
    d = dissimilarity(p, q, "jsd")
    assert d[0, 0] == pytest.approx(1.0)  # disjoint supports: JS divergence = 1 bit
    assert d[0, 1] == pytest.approx(0.0, abs=1e-7)
    # EMD moving unit mass by 3 grid points of 0.5 eV is 1.5 eV
    p = np.array([[1.0, 0, 0, 0]])
    q = np.array([[0, 0, 0, 1.0]])
    assert dissimilarity(p, q, "emd", step=0.5)[0, 0] == pytest.approx(1.5)
    # negatives are clipped before normalising
    assert np.all(prepare(np.array([-1.0, 1.0, 1.0]), "jsd") >= 0)


def test_dtw_window_and_shift():
    x = np.array([[0, 0, 1, 2, 1, 0, 0, 0.0]])
    y = np.array([[0, 0, 0, 1, 2, 1, 0, 0.0]])
    # a one-sample shift costs nothing under DTW but does under euclidean
    assert dissimilarity(x, y, "dtw", dtw_window=2)[0, 0] == pytest.approx(0.0, abs=1e-12)
    assert dissimilarity(x, y, "euclidean")[0, 0] > 0.1


def test_shapes_and_errors():
    rng = np.random.default_rng(0)
    s, lib = rng.random((5, 50)), rng.random((7, 50))
    for m in MEASURES:
        d = dissimilarity(s, lib, m)
        assert d.shape == (5, 7) and np.all(np.isfinite(d))
        # a spectrum is closest to itself
        assert np.argmin(dissimilarity(lib[3], lib, m)[0]) == 3
    with pytest.raises(SmartbeamInputError, match="measure"):
        dissimilarity(s, lib, "manhattan")
    with pytest.raises(SmartbeamInputError, match="common grid"):
        dissimilarity(s, lib[:, :40], "pearson")


def test_background_and_steps_removed():
    e = np.linspace(620, 680, 601)
    peak = np.exp(-0.5 * ((e - 640) / 0.5) ** 2)
    step = 0.5 + np.arctan((e - 639) / 0.5) / np.pi
    step2 = 0.5 + np.arctan((e - 650) / 0.5) / np.pi
    y = 0.3 + 0.01 * (e - 620) + peak + 0.6 * (2 / 3 * step + 1 / 3 * step2)
    out = remove_background(e, y, pre_edge_max=632, post_edge_min=665, l3=639, l2=650)
    assert np.abs(out - peak).max() < 0.05
    assert resample(e, y, np.array([620.05]))[0] == pytest.approx(0.5 * (y[0] + y[1]))
