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


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_vectorised_jsd_equals_scipy(backend):
    from scipy.spatial.distance import cdist

    from smartbeam.analysis.similarity import jensenshannon_matrix

    rng = np.random.default_rng(7)
    a, b = rng.random((40, 300)), rng.random((9, 300))
    a[3, :120] = 0.0  # zero weights: 0 ln 0 = 0
    b[2, 200:] = 0.0
    a[6, 150:] = 0.0  # zeros in both rows of a pair
    a[5] = 0.0  # no weight at all: maximal distance
    ref = cdist(a, b, "jensenshannon") / np.sqrt(np.log(2.0))
    ref[5] = 1.0
    # numba works in single precision (non-negative terms: nothing cancels), numpy in double.
    rtol = 2e-5 if backend == "numba" else 1e-9
    # small chunks: the chunked loop must give the same matrix
    for chunk in (1_000, 1_000_000):
        d = jensenshannon_matrix(a, b, chunk_bytes=chunk, backend=backend)
        np.testing.assert_allclose(d, ref, rtol=rtol, atol=0)
    # the same up to single-precision rounding of differently scaled (equivalent) inputs
    np.testing.assert_allclose(dissimilarity(a, b, "jsd"),
                               jensenshannon_matrix(prepare(a, "jsd"), prepare(b, "jsd")),
                               rtol=1e-6)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_jsd_on_spectrum_like_rows_equals_scipy(backend):
    """Peaked rows with tails over 6 decades, near-identical pairs included.

    1e-9 relative in double precision (numpy), 2e-5 in single precision (numba).
    """
    from scipy.spatial.distance import cdist

    from smartbeam.analysis.similarity import jensenshannon_matrix

    rng = np.random.default_rng(3)
    e = np.linspace(630.0, 662.0, 642)

    def peaks(centres, width):
        return sum(1.0 / (1.0 + ((e - c) / width) ** 2) for c in centres)

    lib = np.stack([peaks((640.0 + 0.1 * k, 651.0), 0.3 + 0.01 * k) for k in range(31)])
    meas = lib[[0, 9, 30]] * (1.0 + 0.03 * rng.standard_normal((3, 642)))
    meas = np.vstack([meas, lib[9] + 0.05 * rng.standard_normal(642), lib[9] * 1.0001])
    meas = prepare(meas, "jsd")
    libp = prepare(lib, "jsd")
    ref = cdist(meas, libp, "jensenshannon") / np.sqrt(np.log(2.0))
    # scipy's sqrt of a rounding-negative divergence (identical rows) is NaN; ours clips to 0.
    assert np.isnan(ref).sum() <= 1
    ref = np.nan_to_num(ref, nan=0.0)
    d = jensenshannon_matrix(meas, libp, backend=backend)
    far = ref > 1e-3  # identical rows: a relative error of a zero distance means nothing
    rtol, atol = (2e-5, 1e-5) if backend == "numba" else (1e-9, 1e-6)
    np.testing.assert_allclose(d[far], ref[far], rtol=rtol, atol=0)
    np.testing.assert_allclose(d[~far], ref[~far], rtol=0, atol=atol)
    # the ranking of library entries, which the estimator uses, is the same as scipy's
    assert np.array_equal(np.argsort(d[:3], axis=1), np.argsort(ref[:3], axis=1))
    # the same row against itself: distance 0 up to rounding
    assert jensenshannon_matrix(libp[:1], libp[:1], backend=backend)[0, 0] < 1e-6


def test_jsd_log1p_polynomial_is_exact_to_single_precision():
    from smartbeam.analysis.similarity import _LOG1P_COEFFS

    w = np.concatenate([np.linspace(0.0, 1.0, 20001), np.geomspace(1e-30, 1.0, 2000)])
    t = w / (2.0 + w)
    g = np.polynomial.polynomial.polyval(t * t, np.float32(_LOG1P_COEFFS).astype(float))
    rel = np.abs(t * g - np.log1p(w)) / np.maximum(np.log1p(w), np.finfo(float).tiny)
    assert rel.max() <= 2.0 * np.finfo(np.float32).eps


def test_jsd_backend_choice(monkeypatch):
    from smartbeam.analysis import similarity
    from smartbeam.analysis.similarity import jensenshannon_matrix

    a, b = np.array([[1.0, 2.0, 0.0]]), np.array([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    with pytest.raises(SmartbeamInputError, match="backend 'fortran' unknown"):
        jensenshannon_matrix(a, b, backend="fortran")
    fast = jensenshannon_matrix(a, b, backend="numba")
    monkeypatch.setattr(similarity, "_numba_divergence_kernel", lambda: None)  # numba missing
    np.testing.assert_allclose(jensenshannon_matrix(a, b), fast, rtol=1e-6)
    with pytest.raises(SmartbeamInputError, match="numba is not installed"):
        jensenshannon_matrix(a, b, backend="numba")


def test_background_fit_is_joint_not_twice_subtracted():
    # The arctan tails reach the pre-edge region: a line fitted there alone would absorb
    # them. With the joint fit, line and step come out exact on a peak-free spectrum.
    e = np.linspace(620, 680, 601)
    step = 2 / 3 * (0.5 + np.arctan((e - 640) / 0.5) / np.pi) + \
        1 / 3 * (0.5 + np.arctan((e - 651) / 0.5) / np.pi)
    y = 0.3 + 0.004 * (e - 620) + 1.7 * step
    out = remove_background(e, y, pre_edge_max=634, post_edge_min=660, l3=640, l2=651)
    assert np.abs(out).max() < 1e-9


@pytest.mark.parametrize("measure", ["euclidean", "cityblock", "cosine", "pearson", "jsd", "emd"])
def test_blocked_dissimilarity_equals_one_block(monkeypatch, measure):
    from smartbeam.analysis import similarity

    rng = np.random.default_rng(11)
    a, b = rng.random((37, 50)), rng.random((5, 50))
    whole = dissimilarity(a, b, measure, step=0.1)
    monkeypatch.setattr(similarity, "_BLOCK_ELEMENTS", 50 * 4)  # blocks of 4 rows, the last of 1
    np.testing.assert_allclose(dissimilarity(a, b, measure, step=0.1), whole, rtol=1e-12, atol=0)
    pa, pb = prepare(a, measure), prepare(b, measure)
    # JSD normalises in single precision: prepared inputs differ by rounding only
    rtol = 1e-6 if measure == "jsd" else 1e-12
    np.testing.assert_allclose(dissimilarity(pa, pb, measure, step=0.1, prepared=True), whole,
                               rtol=rtol, atol=0)


def test_cityblock_matrix_equals_scipy(monkeypatch):
    from scipy.spatial.distance import cdist

    from smartbeam.analysis import similarity
    from smartbeam.analysis.similarity import cityblock_matrix

    rng = np.random.default_rng(5)
    a, b = rng.random((23, 642)), rng.random((7, 642))
    ref = cdist(a, b, "cityblock")
    np.testing.assert_allclose(cityblock_matrix(a, b), ref, rtol=1e-5)
    monkeypatch.setattr(similarity, "_numba_l1_kernel", lambda: None)  # numba missing: scipy
    np.testing.assert_array_equal(cityblock_matrix(a, b), ref)


def test_prepared_argument():
    rng = np.random.default_rng(2)
    a, b = rng.random((6, 40)), rng.random((3, 40))
    whole = dissimilarity(a, b, "jsd")
    np.testing.assert_allclose(dissimilarity(a, prepare(b, "jsd"), "jsd", prepared="library"),
                               whole, rtol=1e-12)
    with pytest.raises(SmartbeamInputError, match="prepared='yes'"):
        dissimilarity(a, b, "jsd", prepared="yes")


@pytest.mark.parametrize("per_point", [0.03, 0.01, 0.003, 0.001])
def test_jsd_single_precision_near_identical_spectra(per_point):
    """Spectra that differ by little per point: the kernel's series branch keeps the
    single-precision distance within 2e-5 of the double-precision one."""
    from smartbeam.analysis.similarity import jensenshannon_matrix

    rng = np.random.default_rng(9)
    e = np.linspace(630.0, 662.0, 642)
    lib = np.stack([1.0 / (1.0 + ((e - 640.0 - 0.1 * k) / 0.4) ** 2) + 0.05 for k in range(9)])
    meas = lib[[2, 5]] * (1.0 + per_point * rng.standard_normal((2, e.size)))
    exact = jensenshannon_matrix(meas, lib, backend="numpy")
    fast = jensenshannon_matrix(meas, lib, backend="numba")
    np.testing.assert_allclose(fast, exact, rtol=2e-5, atol=0)


def test_jsd_series_coefficients_match_the_divergence():
    from smartbeam.analysis.similarity import _SERIES_COEFFS, _SERIES_T_MAX

    t = np.linspace(1e-6, _SERIES_T_MAX, 5001)
    w = 2.0 * t / (1.0 - t)
    k = np.arange(1, 16)[:, None]
    phi = (w[None] ** (2 * k) / (2 * k * (2 * k - 1))).sum(axis=0)
    # the same value from logarithms, where double precision is still exact enough
    big = t > 1e-2
    direct = 0.5 * ((1 + w) * np.log1p(w) + (1 - w) * np.log1p(-w))
    np.testing.assert_allclose(phi[big], direct[big], rtol=1e-9)
    q = np.polynomial.polynomial.polyval(t, np.float32(_SERIES_COEFFS).astype(float))
    assert np.abs(q * t * t / phi - 1.0).max() <= 2.0 * np.finfo(np.float32).eps


@pytest.mark.parametrize("measure", ["euclidean", "cityblock", "jsd", "emd"])
def test_rows_with_nan_or_no_weight_are_empty_not_nan(measure):
    a = np.array([[np.nan, 1.0, 2.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    b = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    d = dissimilarity(a, b, measure)
    assert np.isfinite(d).all()
    np.testing.assert_allclose(d[0], d[1])  # a NaN spectrum is treated as an empty one
    if measure == "jsd":
        assert np.all(d[:2] == 1.0)
