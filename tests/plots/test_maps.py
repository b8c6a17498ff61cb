"""STXM map pictures: PNG files of the expected size, cluster labels that follow regions."""

from __future__ import annotations

import numpy as np
import pytest

from smartbeam.errors import SmartbeamInputError
from smartbeam.plots.maps import (
    nice_scale_length,
    save_cluster_mds_png,
    save_moment_maps_png,
    save_tendq_map_png,
)


def _png_size(path) -> tuple[int, int]:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    return img.shape[1], img.shape[0]


def test_moment_maps_png(tmp_path):
    rng = np.random.default_rng(0)
    maps = {k: rng.normal(size=(12, 16)) for k in ("m_orb", "m_orb_sd", "m_spin", "m_spin_sd")}
    path = save_moment_maps_png(maps, tmp_path / "m.png", pixel_um=0.03, title="test")
    # 2 x 2 panels of 3.6 in + 0.8 in at 100 dpi.
    assert _png_size(path) == (800, 720)


def test_tendq_png_with_rejections(tmp_path):
    dq = np.full((10, 10), 0.9)
    described = np.ones((10, 10), bool)
    described[:3] = False
    dq[~described] = np.nan
    maps = {"ten_dq": dq, "ten_dq_sd": np.full((10, 10), 0.02), "described": described}
    path = save_tendq_map_png(maps, tmp_path / "t.png", pixel_um=0.05)
    assert _png_size(path) == (1160, 360)


def test_cluster_mds_png_finds_two_regions(tmp_path):
    rng = np.random.default_rng(1)
    e = np.linspace(0, 1, 30)
    a, b = np.exp(-((e - 0.3) / 0.05) ** 2), np.exp(-((e - 0.6) / 0.05) ** 2)
    truth = np.zeros((8, 10), int)
    truth[:, 6:] = 1
    spectra = np.where(truth.ravel()[:, None] == 0, a, b) * rng.uniform(0.8, 1.2, (80, 1))
    spectra += rng.normal(0, 0.02, spectra.shape)
    out = save_cluster_mds_png(spectra, (8, 10), tmp_path / "c.png", pixel_um=0.03,
                               n_clusters=2)
    assert _png_size(out["path"]) == (800, 360)
    lab = out["labels"].reshape(8, 10)
    assert len(set(lab[truth == 0])) == 1 and len(set(lab[truth == 1])) == 1
    assert lab[0, 0] != lab[0, -1]
    assert len(out["mds_pixels"]) == 80


def test_scale_length_and_bad_input(tmp_path):
    assert nice_scale_length(3.0) == 0.5
    assert nice_scale_length(1.0) == 0.2
    assert nice_scale_length(30.0) == 5.0
    with pytest.raises(SmartbeamInputError, match="pixel_um"):
        save_moment_maps_png({}, tmp_path / "x.png", pixel_um=0.0)
    with pytest.raises(SmartbeamInputError, match="m_orb"):
        save_moment_maps_png({"m_orb": np.zeros((2, 2))}, tmp_path / "x.png", pixel_um=0.1)
    with pytest.raises(SmartbeamInputError, match="spectra"):
        save_cluster_mds_png(np.zeros((5, 3)), (2, 2), tmp_path / "x.png", pixel_um=0.1)
