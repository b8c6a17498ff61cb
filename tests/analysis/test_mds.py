"""MDS map: library order preserved, measured spectrum lands next to its entry, PNG."""

import numpy as np
import pytest

from smartbeam.analysis.mds import mds_map
from smartbeam.errors import SmartbeamInputError
from smartbeam.library_store import load_packaged_library


def test_measured_lands_next_to_its_entry_and_png(tmp_path):
    lib = load_packaged_library()
    k = 12
    noisy = lib.spectra[k] + np.random.default_rng(0).normal(0, 0.002, lib.energy.size)
    m = mds_map(lib.spectra, lib.ten_dq, noisy[None, :], measure="pearson")
    assert m.library_xy.shape == (31, 2) and m.measured_xy.shape == (1, 2)
    dist = np.linalg.norm(m.library_xy - m.measured_xy[0], axis=1)
    assert abs(int(np.argmin(dist)) - k) <= 1
    # neighbouring 10Dq values are neighbours on the map (first two entries closer than
    # the first and the last)
    assert np.linalg.norm(m.library_xy[0] - m.library_xy[1]) < np.linalg.norm(
        m.library_xy[0] - m.library_xy[-1])
    from smartbeam.plots.mds import save_mds_png

    png = save_mds_png(m, tmp_path / "map.png", ["noisy"])
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_measure():
    with pytest.raises(SmartbeamInputError):
        mds_map(np.ones((3, 5)), np.arange(3), measure="nope")
