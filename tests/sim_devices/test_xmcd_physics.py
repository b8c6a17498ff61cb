"""Ground-truth XMCD physics: model construction, counting noise, truth files, edrixs."""

import json

import numpy as np
import pytest

from sim_devices.physics.xmcd import PRESETS, XMCDSample, XMCDTruth, preset


def test_presets_and_helicity_average():
    for name in ("Fe", "Co"):
        s = XMCDSample(preset(name))
        e = s.dense_grid()
        mp, mm, m0 = s.mu(e, 1), s.mu(e, -1), s.mu(e, 0)
        np.testing.assert_allclose(m0, 0.5 * (mp + mm))
        assert np.all(mp > 0) and np.all(mm > 0)
        # Post-edge jump over the pre-edge: ~1, the white lines well above it.
        assert m0.max() > m0[-1] + 0.5
        # Vectorised over energy and helicity.
        np.testing.assert_allclose(s.mu(e, np.where(e > 710, 1, -1)),
                                   np.where(e > 710, mp, mm))


@pytest.mark.parametrize("name", ["Fe", "Co"])
def test_true_moments_close_to_construction(name):
    """The inverted sum rules put the chosen moments in; the dense analysis gets them back up
    to the truncated Lorentzian tails (a few %)."""
    t = preset(name)
    tm = XMCDSample(t).true_moments()
    assert tm["m_orb"] == pytest.approx(t.m_orb, rel=0.1)
    assert tm["m_spin"] == pytest.approx(t.m_spin, rel=0.05)
    assert tm["e_l3"] == pytest.approx(t.e_l3, abs=0.2)


def test_edge_offset_shifts_spectrum():
    t = preset("Fe")
    s0, s2 = XMCDSample(t), XMCDSample(t.shifted(2.0))
    e = np.linspace(700, 730, 61)
    np.testing.assert_allclose(s2.mu(e + 2.0, 1), s0.mu(e, 1))
    assert s2.true_moments()["e_l3"] == pytest.approx(s0.true_moments()["e_l3"] + 2, abs=0.05)


def test_counting_noise_is_poisson_with_flux_times_dwell():
    s = XMCDSample(preset("Fe"))
    rng = np.random.default_rng(0)
    e = np.full(4000, 707.8)
    c = s.measure(e, 1, 0.5, rng)
    mu = c["tey"] / c["i0"]
    assert c["i0"].mean() == pytest.approx(s.truth.flux * 0.5, rel=1e-3)
    assert mu.mean() == pytest.approx(s.mu(707.8, 1), rel=1e-3)
    assert mu.std() == pytest.approx(float(s.noise_sd(707.8, 1, 0.5)), rel=0.05)
    # Four times the dwell halves the noise.
    c4 = s.measure(e, 1, 2.0, rng)
    assert (c4["tey"] / c4["i0"]).std() == pytest.approx(mu.std() / 2, rel=0.1)


def test_truth_json_roundtrip(tmp_path):
    t = preset("Co").shifted(-1.5)
    path = tmp_path / "co.json"
    path.write_text(json.dumps(t.to_dict()))
    t2 = XMCDTruth.from_json(path)
    assert t2 == t
    path.write_text(json.dumps({"preset": "Fe", "m_orb": 0.2, "edge_offset": 1.0}))
    t3 = XMCDTruth.from_json(path)
    assert (t3.m_orb, t3.edge_offset, t3.e_l3) == (0.2, 1.0, PRESETS["Fe"].e_l3)


def test_bad_truth_rejected():
    with pytest.raises(ValueError, match="kind"):
        XMCDTruth(kind="dft")
    with pytest.raises(ValueError, match="unknown"):
        XMCDTruth.from_dict({"moment": 1.0})
    with pytest.raises(ValueError, match="helicity"):
        XMCDSample(preset("Fe")).mu(700.0, 2)


@pytest.mark.slow
def test_edrixs_ionic_spectrum():
    """Fe2+ (d6) in a small exchange field: a dichroic multiplet spectrum whose orbital sum
    rule gives a large ionic orbital moment of the same sign as the spin moment."""
    s = XMCDSample(preset("Fe2+_edrixs"))
    e = s.dense_grid()
    d = s.mu(e, 1) - s.mu(e, -1)
    assert np.abs(d).max() > 0.1
    tm = s.true_moments()
    assert tm["m_orb"] > 0.5 and tm["m_spin"] > 0.5
    assert tm["e_l3"] == pytest.approx(706.8, abs=1.0)
