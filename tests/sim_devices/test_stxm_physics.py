"""STXM twin physics: per-pixel spectra carry the domain's moment projection."""

from __future__ import annotations

import numpy as np
import pytest

from sim_devices.physics.stxm import STXMSample
from sim_devices.physics.xmcd import XMCDSample, preset
from smartbeam.analysis.sumrules import sum_rules


@pytest.fixture(scope="module")
def sample():
    return STXMSample(XMCDSample(preset("Fe")), shape=(40, 50), seed=3)


def test_domains_and_thickness_maps(sample):
    assert sample.m_proj.shape == (40, 50)
    assert sample.thickness.shape == (40, 50)
    assert np.all(np.abs(sample.m_proj) <= 1.0)
    # Up and down domains both present, thickness positive and varying.
    assert sample.m_proj.max() > 0.9 and sample.m_proj.min() < -0.9
    assert sample.thickness.min() > 0.5 and sample.thickness.std() > 0.01
    assert sample.extent_um == pytest.approx((1.5, 1.2))


def test_pixel_sum_rules_scale_with_magnetisation(sample):
    energy = sample.xmcd.dense_grid(201)
    bulk = sample.xmcd.true_moments()
    for row, col in [(0, 0), (20, 25), (39, 49)]:
        od_plus = np.array([sample.optical_density_map(e, +1)[row, col] for e in energy])
        od_minus = np.array([sample.optical_density_map(e, -1)[row, col] for e in energy])
        scale = sample.thickness[row, col] * sample.optical_density
        res = sum_rules(energy, od_plus / scale, od_minus / scale, n_h=sample.xmcd.truth.n_h)
        # m_proj·m: the sum rules are linear in the dichroism, the isotropic part fixed.
        assert res.m_spin == pytest.approx(sample.m_proj[row, col] * bulk["m_spin"], abs=0.02)
        assert res.m_orb == pytest.approx(sample.m_proj[row, col] * bulk["m_orb"], abs=0.005)


def test_images_are_poisson_with_the_expected_mean(sample):
    rng = np.random.default_rng(0)
    x = (np.arange(50) + 0.5) * sample.pixel_um
    y = (np.arange(40) + 0.5) * sample.pixel_um
    mean = sample.expected_counts(707.8, +1, 0.01)
    stack = np.stack([sample.image(707.8, +1, 0.01, x, y, rng) for _ in range(200)])
    assert stack.dtype == np.int32
    np.testing.assert_allclose(stack.mean(axis=0), mean, rtol=0.05)
    np.testing.assert_allclose(stack.var(axis=0).mean(), mean.mean(), rtol=0.1)


def test_raster_at_pixel_multiples_visits_every_pixel_once(sample):
    x = np.arange(50) * sample.pixel_um
    rows, cols = sample.pixel_index(x, np.zeros_like(x))
    assert list(cols) == list(range(50))


def test_stage_positions_map_to_pixels(sample):
    rows, cols = sample.pixel_index(np.array([0.0, 0.031, 99.0]), np.array([0.0, 0.0, -1.0]))
    assert list(cols) == [0, 1, 49]
    assert list(rows) == [0, 0, 0]
