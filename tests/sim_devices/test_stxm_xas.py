"""STXM 10Dq twin: region physics, the edrixs foreign phase, and stxm_xas_map end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sim_devices.physics.stxm_xas import FOREIGN, STXMXASSample


@pytest.fixture(scope="module")
def sample():
    # The Mn3+ foreign phase is computed once by edrixs and cached on disk (~15 s cold).
    return STXMXASSample(shape=(40, 50), seed=3)


def _white(sample, label, e):
    """Region spectrum minus its edge steps and constant: the white lines alone."""
    l3, l2 = sample._foreign_edges if label == FOREIGN else sample._edges
    step = (2 / 3) * (0.5 + np.arctan((e - l3) / 0.5) / np.pi) + (1 / 3) * (
        0.5 + np.arctan((e - l2) / 0.5) / np.pi)
    return sample.region_spectrum(label, e) - 0.1 - step


def test_regions_and_truth_map(sample):
    assert sample.regions.shape == (40, 50)
    assert set(np.unique(sample.regions)) == {0, 1, 2, FOREIGN}
    truth = sample.true_ten_dq_map()
    assert np.all(np.isnan(truth[sample.regions == FOREIGN]))
    for k, dq in enumerate(sample.ten_dq):
        assert np.all(truth[sample.regions == k] == dq)
    assert sample.extent_um == pytest.approx((1.5, 1.2))


def test_mn2_regions_follow_the_library(sample):
    lib = sample.library
    e = lib.energy
    for k, dq in enumerate(sample.ten_dq):
        ref = lib.spectra[int(np.argmin(np.abs(lib.ten_dq - dq)))]
        np.testing.assert_allclose(_white(sample, k, e), 3.0 * ref / lib.spectra.max(),
                                   atol=1e-9)
    # Different 10Dq, different spectra (else a map could not tell the regions apart).
    assert np.max(np.abs(_white(sample, 0, e) - _white(sample, 2, e))) > 0.1


def test_foreign_region_is_edrixs_mn3_with_valence_shift(sample):
    e = np.arange(632.0, 662.0, 0.05)
    mn2, mn3 = _white(sample, 1, e), _white(sample, FOREIGN, e)
    assert e[np.argmax(mn2)] == pytest.approx(640.0, abs=0.06)
    assert e[np.argmax(mn3)] == pytest.approx(641.5, abs=0.06)
    # White-line area scales with the d holes: 6 (Mn3+, 3d4) against 5 (Mn2+, 3d5).
    assert np.trapezoid(mn3, e) / np.trapezoid(mn2, e) == pytest.approx(1.2, rel=0.02)
    # Computed once: the library is now on disk and loads without edrixs.
    from smartbeam.analysis.library import LibraryParams
    from smartbeam.library_store import get_library

    params = LibraryParams(ion="Mn3+", ten_dq_min=1.8, ten_dq_max=1.8, align_energy=641.5,
                           align_ten_dq=1.8)
    assert get_library(params, compute=False).spectra.shape[0] == 1


def test_made_up_foreign_phase_needs_no_edrixs():
    s = STXMXASSample(shape=(20, 20), foreign_ion=None)
    e = np.linspace(632, 660, 200)
    assert np.all(np.isfinite(s.region_spectrum(FOREIGN, e)))
    assert not np.allclose(s.region_spectrum(FOREIGN, e), s.region_spectrum(1, e))


def test_images_are_poisson_around_beer_lambert(sample):
    rng = np.random.default_rng(0)
    x = sample.pixel_um * np.arange(50)  # exact pixel multiples hit every pixel once
    y = sample.pixel_um * np.arange(40)
    rows, cols = sample.pixel_index(*np.meshgrid(x, y))
    assert len(set(zip(rows.ravel(), cols.ravel(), strict=True))) == 2000
    mean = sample.flux * 0.01 * np.exp(-sample.optical_density_map(640.0))
    imgs = np.array([sample.image(640.0, 0, 0.01, x, y, rng) for _ in range(20)])
    assert imgs.dtype == np.int32 and imgs.shape == (20, 40, 50)
    z = (imgs.mean(axis=0) - mean) / np.sqrt(mean / 20)
    assert abs(z.mean()) < 0.1 and 0.9 < z.std() < 1.1


# -- end to end: caproto twin with --sample tendq, RunEngine, Tiled -----------------------
FIELD = {"x_range": [0.15, 2.55], "y_range": [0.15, 2.55], "pixel": 0.6}

SCRIPT = r"""
import json, sys
import numpy as np
from smartbeam.beamline import Beamline

out = sys.argv[1]
fld = json.loads(sys.argv[2])
bl = Beamline(["stxm"], sim=True, time_scale=0.02, log_dir=out,
              ioc_args={"stxm": ["--sample", "tendq", "--seed", "3"]})
devices = bl.start()
from bluesky import RunEngine
from smartbeam.plans import stxm_xas_map
from smartbeam.storage import Storage, read_stream

store = Storage(out + "/tiled")
store.open()
try:
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(store.writer())
    energies = [float(v) for v in np.arange(632.0, 660.0, 0.3)]
    (uid,) = RE(stxm_xas_map(devices["stxm"], **fld, energies=energies, dwell=0.02,
                             png_dir=out + "/png"))
    run = store.runs[uid]
    maps = read_stream(run, "maps")
    print(json.dumps({"uid": uid, "shape": run.metadata["start"]["shape"],
                      "analysis": run.metadata["start"]["analysis"],
                      "streams": sorted(run),
                      "n_images": int(run["primary"]["stxm_det_image"].read().shape[0]),
                      "maps": {k: np.asarray(v).tolist() for k, v in maps.items()
                               if k in ("xas_ten_dq", "xas_described", "xas_score",
                                        "xas_error")}}))
finally:
    store.close()
    bl.stop()
"""


@pytest.mark.slow
def test_stxm_xas_map_on_the_tendq_twin(tmp_path, sample):
    env = dict(os.environ, MPLBACKEND="Agg", SMARTBEAM_SIM="1")
    env.pop("EPICS_CA_ADDR_LIST", None)  # the subprocess configures EPICS itself
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(FIELD)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["shape"] == [5, 5] and res["analysis"] == "tendq"
    assert {"primary", "maps"} <= set(res["streams"])
    assert res["n_images"] == len(np.arange(632.0, 660.0, 0.3))
    maps = {k: np.array(v, dtype=float) for k, v in res["maps"].items() if k != "xas_error"}
    assert res["maps"]["xas_error"] == [""]
    dq, described, score = maps["xas_ten_dq"][0], maps["xas_described"][0], maps["xas_score"][0]
    assert dq.shape == (5, 5)

    # The twin's ground truth at the raster's stage positions.
    twin = STXMXASSample(shape=(100, 100))
    x = FIELD["x_range"][0] + FIELD["pixel"] * np.arange(5)
    rows, cols = twin.pixel_index(*np.meshgrid(x, x))
    truth = twin.true_ten_dq_map()[rows, cols]
    mn2 = np.isfinite(truth)
    assert mn2.sum() >= 10 and (~mn2).sum() >= 1
    assert described[mn2].mean() >= 0.9
    ok = mn2 & (described > 0)
    assert np.mean(np.abs(dq[ok] - truth[ok]) <= 0.15) >= 0.8
    # Mn3+ pixels fit the Mn2+ library measurably worse than any Mn2+ pixel does.
    assert score[~mn2].min() > score[mn2].max()

    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == [f"{res['uid'][:8]}_clusters.png", f"{res['uid'][:8]}_tendq.png"]
    import matplotlib.image as mpimg

    assert mpimg.imread(tmp_path / "png" / pngs[1]).shape[:2] == (360, 1160)
