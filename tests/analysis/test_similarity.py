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


def test_vectorised_jsd_equals_scipy():
    from scipy.spatial.distance import cdist

    from smartbeam.analysis.similarity import jensenshannon_matrix

    rng = np.random.default_rng(7)
    a, b = rng.random((40, 300)), rng.random((9, 300))
    a[3, :120] = 0.0  # zero weights: 0 ln 0 = 0
    b[2, 200:] = 0.0
    a[5] = 0.0  # no weight at all: maximal distance
    ref = cdist(a, b, "jensenshannon") / np.sqrt(np.log(2.0))
    ref[5] = 1.0
    # small chunks: the chunked loop must give the same matrix
    for chunk in (1_000, 1_000_000):
        d = jensenshannon_matrix(a, b, chunk_bytes=chunk)
        np.testing.assert_allclose(d, ref, rtol=0, atol=1e-10)
    assert np.array_equal(dissimilarity(a, b, "jsd"), jensenshannon_matrix(prepare(a, "jsd"),
                                                                           prepare(b, "jsd")))


def test_background_fit_is_joint_not_twice_subtracted():
    # The arctan tails reach the pre-edge region: a line fitted there alone would absorb
    # them. With the joint fit, line and step come out exact on a peak-free spectrum.
    e = np.linspace(620, 680, 601)
    step = 2 / 3 * (0.5 + np.arctan((e - 640) / 0.5) / np.pi) + \
        1 / 3 * (0.5 + np.arctan((e - 651) / 0.5) / np.pi)
    y = 0.3 + 0.004 * (e - 620) + 1.7 * step
    out = remove_background(e, y, pre_edge_max=634, post_edge_min=660, l3=640, l2=651)
    assert np.abs(out).max() < 1e-9
