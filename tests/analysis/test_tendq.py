"""10Dq estimator: grid and between-grid recovery, offset search, rejection, flags."""

from pathlib import Path

import numpy as np
import pytest

from smartbeam.analysis.tendq import (
    TenDqFitter,
    branching_score,
    noise_sigma,
    rejection_score,
    validate_spectrum,
)
from smartbeam.bench.tendq import Simulator, degrade, shifted
from smartbeam.errors import SmartbeamInputError
from smartbeam.library_store import load_packaged_library
from smartbeam.readers.spectra import read_spectrum

# shared/data sits beside the clone (<repo>/../shared/data); only the development frames and spectra.
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
EELS = str(DATA / "eels_hyperspy" / "hyperspy_Mn_O_coreloss_spectrum.msa")
needs_eels = pytest.mark.skipif(not Path(EELS).is_file(),
                                reason=f"measured EELS spectrum not found at {EELS}")


@pytest.fixture(scope="module")
def lib():
    return load_packaged_library()


@pytest.fixture(scope="module")
def sim(lib):
    return Simulator(lib)


@pytest.fixture(scope="module")
def threshold(lib):
    # the shipped calibration (simulated in-library spectra; see bench.tendq.calibrate)
    from smartbeam.library_store import load_threshold

    t = load_threshold(lib)
    assert t is not None and 0 < t < 1
    return t


def test_grid_spectrum_recovered_exactly_enough(lib):
    f = TenDqFitter().fit(lib)
    for k in (5, 9, 17):
        r = f.predict(lib.energy, lib.spectra[k])
        assert r.ten_dq == pytest.approx(lib.ten_dq[k], abs=0.02)
        assert r.offset == pytest.approx(0.0, abs=0.03)
        assert r.similarity > 0.999


@pytest.mark.parametrize("dq", [0.95, 1.37])
def test_between_grid_spectrum(lib, sim, dq):
    r = TenDqFitter().fit(lib).predict(sim.energy, sim.clean(dq))
    assert r.ten_dq == pytest.approx(dq, abs=0.02)
    for v in r.per_measure.values():
        assert v is not None and np.isfinite(v)


def test_offset_recovered(lib, sim):
    y = shifted(sim, sim.clean(1.25), 0.73)
    r = TenDqFitter().fit(lib).predict(sim.energy, y)
    assert r.offset == pytest.approx(0.73, abs=0.05)
    assert r.ten_dq == pytest.approx(1.25, abs=0.06)
    # without the offset search the same spectrum gives a wrong 10Dq
    r0 = TenDqFitter(offset_range=0.0).fit(lib).predict(sim.energy, y)
    assert abs(r0.ten_dq - 1.25) > 3 * abs(r.ten_dq - 1.25)


def test_noise_gives_uncertainty(lib, sim):
    y = degrade(sim.clean(1.5), sim.step, np.random.default_rng(3), noise=0.05)
    r = TenDqFitter().fit(lib).predict(sim.energy, y)
    assert r.ten_dq == pytest.approx(1.5, abs=0.1)
    assert 0 < r.sd < 0.3


def test_other_ion_and_noise_rejected(lib, sim, threshold):
    f = TenDqFitter(threshold=threshold).fit(lib)
    other = Simulator(lib, ion="Ni2+")
    r = f.predict(other.energy, other.clean(1.0))
    assert not r.described and r.ten_dq is None and "not_described" in r.flags
    assert r.score > threshold
    noise = np.random.default_rng(0).normal(size=sim.energy.size)
    assert not f.predict(sim.energy, noise).described
    ok = f.predict(sim.energy, sim.clean(1.1))
    assert ok.described and ok.score <= threshold


@needs_eels
@pytest.mark.parametrize("offset_range", [2.0, 10.0])
def test_measured_eels_not_mn2_is_rejected(lib, threshold, offset_range):
    # +-10 eV lines up its ~+8 eV energy axis; the rejection stage then also searches its
    # ~3 eV resolution, so what decides is the L3/L2 structure, not the misalignment.
    e, y = read_spectrum(EELS)
    r = TenDqFitter(threshold=threshold, offset_range=offset_range).fit(lib).predict(e, y)
    assert not r.described, r
    if offset_range == 10.0:
        rej = r.extra["rejection"]
        assert rej["offset"] == pytest.approx(8.3, abs=0.6)
        assert rej["extra_fwhm"] >= 2.0  # its measured zero-loss FWHM is ~3.2 eV
        assert rej["branching"] > threshold


def test_branching_score():
    x = np.linspace(0, 1, 200)
    l3 = x < 0.5
    line = np.exp(-((x - 0.25) / 0.03) ** 2) + 0.5 * np.exp(-((x - 0.75) / 0.03) ** 2)
    assert branching_score(line, line, l3, 0.0) == pytest.approx(0.0, abs=1e-12)
    # measured L2 twice as strong as the model predicts: half of it is unexplained
    weak = np.where(l3, line, 0.5 * line)
    assert branching_score(line, weak, l3, 0.0) == pytest.approx(0.5)
    # the noise allowance only ever lowers the score
    assert branching_score(line, weak, l3, 0.01) < 0.5
    assert branching_score(np.where(l3, line, 0.0), line, l3, 0.0) == float("inf")


def test_rejection_does_not_trade_on_search_width(lib, sim, threshold):
    # an in-library spectrum stays accepted with a wide offset search
    y = shifted(sim, sim.clean(0.9), 0.6)
    for rr in (2.0, 10.0):
        r = TenDqFitter(threshold=threshold, offset_range=rr).fit(lib).predict(sim.energy, y)
        assert r.described and r.ten_dq == pytest.approx(0.9, abs=0.05)


@pytest.mark.parametrize("extra", [0.5, 0.4])
def test_extra_resolution_searched(lib, sim, extra):
    # 0.4 eV is off the searched broadening grid (0, 0.3, 0.5, 0.7)
    y = degrade(sim.clean(1.35), sim.step, np.random.default_rng(2), extra_fwhm=extra)
    r = TenDqFitter(measures=("pearson",)).fit(lib).predict(sim.energy, y)
    assert r.ten_dq == pytest.approx(1.35, abs=0.05)
    assert r.extra["extra_fwhm"] == pytest.approx(extra, abs=0.15)
    r0 = TenDqFitter(measures=("pearson",), extra_fwhm=(0.0,)).fit(lib).predict(sim.energy, y)
    assert abs(r0.ten_dq - 1.35) > abs(r.ten_dq - 1.35)


@pytest.mark.parametrize("step_at", [0.0, -1.0])
def test_edge_step_and_sloped_background(lib, sim, step_at):
    # a measured-like spectrum: sloped pre-edge and 2:1 arctan edge steps under the lines
    dq, off = 1.15, 0.4
    e = sim.energy
    y = shifted(sim, sim.clean(dq), off)
    y = 4 * y / y.max()
    k = int(np.argmin(np.abs(lib.ten_dq - dq)))
    lo = lib.energy < lib.meta["l3_l2_split_eV"]
    l3 = lib.energy[lo][np.argmax(lib.spectra[k][lo])] + off + step_at
    l2 = lib.energy[~lo][np.argmax(lib.spectra[k][~lo])] + off + step_at
    edge = 2 / 3 * (0.5 + np.arctan((e - l3) / 0.5) / np.pi) + \
        1 / 3 * (0.5 + np.arctan((e - l2) / 0.5) / np.pi)
    y = y + 0.3 + 0.01 * (e - e[0]) + edge
    r = TenDqFitter().fit(lib).predict(e, y)
    assert r.ten_dq == pytest.approx(dq, abs=0.04)
    assert r.offset == pytest.approx(off, abs=0.1)


def test_dtw_at_best_window(lib, sim):
    y = shifted(sim, sim.clean(1.45), -0.6)
    r = TenDqFitter(measures=("pearson", "dtw")).fit(lib).predict(sim.energy, y)
    assert r.extra["raw_per_measure"]["dtw"] == pytest.approx(1.45, abs=0.1)
    assert r.per_measure_offset["dtw"] == pytest.approx(r.per_measure_offset["pearson"],
                                                        abs=0.06)


def test_flags_edges_and_crossover(lib):
    f = TenDqFitter().fit(lib)
    assert "library_edge_low" in f.predict(lib.energy, lib.spectra[0]).flags
    k = int(np.flatnonzero(np.diff(lib.segment))[0])
    r = f.predict(lib.energy, lib.spectra[k])
    assert "near_spin_crossover" in r.flags
    assert "uncalibrated" in r.flags


def test_json_dict_shape(lib):
    r = TenDqFitter().fit(lib).predict(lib.energy, lib.spectra[9])
    d = r.to_dict(file="x.msa")
    assert set(d) >= {"file", "described", "ten_dq_eV", "sd_eV", "offset_eV", "measure",
                      "per_measure", "flags", "score"}
    assert d["measure"] == "consensus" and isinstance(d["per_measure"]["pearson"], float)


def test_validation_errors(lib):
    e = np.linspace(600, 700, 100)
    with pytest.raises(SmartbeamInputError, match="no data"):
        validate_spectrum([], [])
    with pytest.raises(SmartbeamInputError, match="non-finite"):
        validate_spectrum(e, np.where(e > 650, np.nan, 1.0))
    with pytest.raises(SmartbeamInputError, match="increasing"):
        validate_spectrum(e[::-1], e)
    f = TenDqFitter().fit(lib)
    with pytest.raises(SmartbeamInputError, match="misses the edge"):
        f.predict(np.linspace(500, 600, 200), np.ones(200))


def test_calibrate_threshold_quantile():
    from smartbeam.analysis.tendq import calibrate_threshold

    assert calibrate_threshold(np.arange(101.0), 0.9) == pytest.approx(90.0)
    with pytest.raises(SmartbeamInputError):
        calibrate_threshold(np.array([np.inf]))


def test_scores_and_noise_estimate():
    rng = np.random.default_rng(1)
    x = np.sin(np.linspace(0, 6, 2000))
    assert noise_sigma(x + rng.normal(0, 0.1, x.size)) == pytest.approx(0.1, rel=0.1)
    assert rejection_score(2 * x + 1, x, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert rejection_score(-x, x, 0.0) == float("inf")


def test_fft_pearson_maps_equal_matrix_product(lib):
    # the FFT/SVD offset search against the plain sliding-window matrix product
    from numpy.lib.stride_tricks import sliding_window_view

    from smartbeam.analysis.similarity import dissimilarity, prepare

    f = TenDqFitter(measures=("pearson",)).fit(lib)
    rng = np.random.default_rng(4)
    ext = np.stack([np.interp(f.grid_ext, lib.energy, lib.spectra[k]) for k in (3, 12, 20)])
    ext = 1e4 * ext + rng.normal(0, 50, ext.shape) + 3e4  # counts on a large background
    win = sliding_window_view(ext, f.n, axis=1)
    m, j, n = win.shape
    plain = dissimilarity(prepare(win.reshape(m * j, n), "pearson"), f._prepared["pearson"],
                          "pearson", prepared=True).reshape(m, j, len(f.extra_fwhm), -1)
    assert np.abs(f.dissimilarity_maps(ext)["pearson"] - plain).max() < 1e-5


def test_shared_offset_search_matches_free_search_on_one_calibration(lib, sim, threshold):
    """Spectra measured through one monochromator: the shared-offset search (a window around
    the median Pearson offset) gives the free search's answers, and refuses a bad width."""
    f = TenDqFitter(threshold=threshold).fit(lib)
    rng = np.random.default_rng(4)
    truths = (0.6, 0.9, 1.2)
    ys = np.stack([degrade(shifted(sim, sim.clean(t), 0.35), sim.step, rng, noise=0.01)
                   for t in truths])
    free = f.predict_many(sim.energy, ys)
    shared = f.predict_many(sim.energy, ys, shared_offset=0.5)
    for a, b, t in zip(free, shared, truths, strict=True):
        assert a.described and b.described
        assert b.ten_dq == pytest.approx(a.ten_dq, abs=0.01)
        assert b.ten_dq == pytest.approx(t, abs=0.05)
        assert b.offset == pytest.approx(0.35, abs=0.06)
    with pytest.raises(SmartbeamInputError, match="shared_offset=5.0"):
        f.predict_many(sim.energy, ys, shared_offset=5.0)


def test_shared_offset_window_neither_forces_nor_is_placed_by_empty_spectra(lib, sim, threshold):
    """A region with a chemical shift outside the window is searched again over the whole
    range; empty spectra (arbitrary Pearson offsets) do not place the window."""
    f = TenDqFitter(threshold=threshold).fit(lib)
    rng = np.random.default_rng(8)
    at = [degrade(shifted(sim, sim.clean(1.0), off), sim.step, rng, noise=0.01)
          for off in (0.0, 0.0, 0.0, 0.0, 0.0, 1.2)]
    shifted_pixel = f.predict_many(sim.energy, np.stack(at), shared_offset=0.5)[-1]
    assert shifted_pixel.described
    assert shifted_pixel.offset == pytest.approx(1.2, abs=0.06)
    assert shifted_pixel.ten_dq == pytest.approx(1.0, abs=0.05)

    real = [degrade(sim.clean(0.9), sim.step, rng, noise=0.01) for _ in range(3)]
    ys = np.stack([np.zeros_like(sim.energy)] * 7 + real)
    out = f.predict_many(sim.energy, ys, shared_offset=0.5)
    for r in out[7:]:
        assert r.described and r.ten_dq == pytest.approx(0.9, abs=0.05)
        assert r.offset == pytest.approx(0.0, abs=0.06)
