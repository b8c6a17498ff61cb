"""Tests of the simulated SANS sample (ground truth of the KDE benchmark)."""

import numpy as np
import pytest

from sim_devices.physics.sans import SANSSample
from smartbeam.errors import SmartbeamInputError


@pytest.fixture(scope="module")
def realistic():
    return SANSSample("realistic")


def test_expected_counts_normalised_and_masked(realistic):
    e = realistic.expected_counts(2.0, attenuation=0.5)
    assert e.shape == (128, 128)
    assert e[realistic.mask].sum() == pytest.approx(realistic.count_rate * 2.0 * 0.5, rel=1e-9)
    assert np.all(e[realistic.mask] > 0)
    assert e[~realistic.mask].max() < 1e-3 * e[realistic.mask].max()


def test_exposure_is_poisson(realistic):
    rng = np.random.default_rng(0)
    frames = np.array([realistic.expose(1.0, rng) for _ in range(400)])
    assert frames.dtype == np.int32
    mu = realistic.expected_counts(1.0)
    mean = frames.mean(axis=0)
    var = frames.var(axis=0, ddof=1)
    bright = mu > 1.0
    np.testing.assert_allclose(mean[bright], mu[bright], rtol=0.2)
    assert np.median(var[bright] / mu[bright]) == pytest.approx(1.0, abs=0.1)


def test_sharp_has_deeper_minima_than_realistic(realistic):
    sharp = SANSSample("sharp")
    def contrast(s):
        e = s.expected_counts(1.0)
        r = np.hypot(*(np.indices(e.shape)[::-1] - np.array(s.beam_centre)[:, None, None]))
        prof = np.array([e[(r >= k) & (r < k + 1) & s.mask].mean() for k in range(12, 60)])
        return np.min(prof[1:-1] / np.maximum(prof[:-2], prof[2:]))
    assert contrast(sharp) < contrast(realistic)


def test_anisotropic_has_two_lobes():
    s = SANSSample("anisotropic", lobe_angle_deg=30.0)
    e = s.expected_counts(1.0)
    cx, cy = s.beam_centre
    def at(angle_deg, r=30):
        a = np.deg2rad(angle_deg)
        return e[int(round(cy + r * np.sin(a))), int(round(cx + r * np.cos(a)))]
    assert at(30) > 3 * at(120)
    assert at(210) == pytest.approx(at(30), rel=0.3)


def test_round_trip_and_bad_input(realistic):
    s2 = SANSSample.from_dict(realistic.to_dict())
    np.testing.assert_array_equal(s2.expected_counts(1.0), realistic.expected_counts(1.0))
    assert s2.beam_centre == realistic.beam_centre
    with pytest.raises(SmartbeamInputError, match="pattern"):
        SANSSample("blobby")
    with pytest.raises(SmartbeamInputError, match="time_s"):
        realistic.expected_counts(-1.0)
    with pytest.raises(SmartbeamInputError, match="attenuation"):
        realistic.expected_counts(1.0, attenuation=2.0)
