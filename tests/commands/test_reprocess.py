"""``smartbeam reprocess`` on a 2-worker Dask LocalCluster against real Tiled."""

from __future__ import annotations

import numpy as np
import pytest
from event_model import compose_run

from sim_devices.physics.stxm import STXMSample
from sim_devices.physics.xmcd import XMCDSample, preset
from smartbeam.commands.reprocess import reprocess
from smartbeam.storage import read_stream

N = 12


def _write_raw(store, plan_name, energies, pols, images, **md):
    writer = store.writer()
    bundle = compose_run(metadata={"plan_name": plan_name, "motors": ["stxm_energy"],
                                   "shape": list(images.shape[1:]), "kde": False, **md})
    writer("start", bundle.start_doc)
    keys = {"stxm_energy": {"dtype": "number", "shape": [], "source": "sim"},
            "stxm_pol_mode": {"dtype": "string", "shape": [], "source": "sim"},
            "stxm_det_image": {"dtype": "array", "shape": list(images.shape[1:]),
                               "dtype_numpy": "<i4", "source": "sim",
                               "dims": ["stxm_det_image_y", "stxm_det_image_x"]}}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys)
    writer("descriptor", desc.descriptor_doc)
    for e, p, img in zip(energies, pols, images, strict=True):
        data = {"stxm_energy": float(e), "stxm_pol_mode": p,
                "stxm_det_image": img.astype(np.int32)}
        writer("event", desc.compose_event(data=data, timestamps={k: 0.0 for k in data}))
    writer("stop", bundle.compose_stop(exit_status="success"))
    return bundle.start_doc["uid"]


@pytest.fixture(scope="module")
def client():
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                           processes=True)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def test_moments_reprocess_is_linked_idempotent_and_leaves_raw_alone(storage, client):
    sample = STXMSample(XMCDSample(preset("Fe")), shape=(N, N), n_domains=4)
    rng = np.random.default_rng(0)
    x = (np.arange(N) + 0.5) * sample.pixel_um
    energies = np.repeat(np.linspace(695, 735, 41), 2)
    pols = ["circ+", "circ-"] * 41
    images = np.array([sample.image(e, 1 if p == "circ+" else -1, 0.002, x, x, rng)
                       for e, p in zip(energies, pols, strict=True)])
    uid = _write_raw(storage, "stxm_xmcd_stack", energies, pols, images,
                     plan_args={"e_min": 695.0, "e_max": 735.0, "edges": [707.8, 720.8]},
                     n_h=3.39)
    raw = storage.runs[uid]
    before = (sorted(raw), dict(raw.metadata["stop"]), raw["primary"]["stxm_det_image"].read())

    (first,) = reprocess(storage, [uid[:10]], client)
    assert first["status"] == "written" and first["analysis"] == "moments"
    out = storage.runs[first["analysis_uid"]]
    assert out.metadata["start"]["analysis_of"] == uid
    maps = read_stream(out, "maps")
    assert maps["m_orb"].shape == (1, N, N)
    z = (maps["m_orb"][0] - sample.true_moment_maps()["m_orb"]) / maps["m_orb_sd"][0]
    assert np.mean(np.abs(z) < 3) > 0.9

    (second,) = reprocess(storage, [uid], client)
    assert second["status"] == "exists" and second["analysis_uid"] == first["analysis_uid"]
    linked = [r for r in storage.find(plan_name="reprocess")
              if r.metadata["start"]["analysis_of"] == uid]
    assert len(linked) == 1

    raw = storage.runs[uid]
    assert sorted(raw) == before[0]
    assert dict(raw.metadata["stop"]) == before[1]
    np.testing.assert_array_equal(raw["primary"]["stxm_det_image"].read(), before[2])


@pytest.mark.slow
def test_tendq_reprocess_splits_pixels_over_workers(storage, client):
    from smartbeam.library_store import load_packaged_library

    lib = load_packaged_library()
    e = np.arange(632.0, 660.0, 0.25)
    ny, nx = 3, 4
    # Two regions: 10Dq 0.6 eV (left) and 1.2 eV (right), as transmission counts.
    dq = np.where(np.arange(nx) < 2, 0.6, 1.2)[None, :].repeat(ny, axis=0)
    k = np.rint(dq / 0.1).astype(int)
    mu = np.array([[np.interp(e, lib.energy, lib.spectra[kk]) for kk in row] for row in k])
    mu = 0.8 * mu / lib.spectra.max() + 0.2
    rng = np.random.default_rng(1)
    images = rng.poisson(200000 * np.exp(-np.moveaxis(mu, -1, 0)))
    uid = _write_raw(storage, "stxm_xas_map", e, ["linear"] * e.size, images, ion="Mn2+")
    (row,) = reprocess(storage, [uid], client, chunk=5)
    assert row["analysis"] == "tendq" and row["status"] == "written"
    maps = read_stream(storage.runs[row["analysis_uid"]], "maps")
    assert maps["ten_dq"].shape == (1, ny, nx)
    assert maps["described"].all()
    np.testing.assert_allclose(maps["ten_dq"][0], dq, atol=0.1)


def test_tendq_task_is_the_map_of_its_chunk():
    """A task's arrays are tendq_maps' on the same (pooled) pixels, map default measures;
    ``measures="all"`` gives the all-measures map."""
    from sim_devices.physics.stxm_xas import STXMXASSample
    from smartbeam.analysis.stack import lowrank_denoise, optical_density, tendq_maps
    from smartbeam.commands.reprocess import MIN_CHUNK, tendq_chunk, tendq_task
    from smartbeam.library_store import make_fitter

    assert MIN_CHUNK >= 96  # chunks of the pooled stack take the batched search
    assert tendq_chunk(10_000, 2) == 5000 and tendq_chunk(1000, 8) == MIN_CHUNK
    assert tendq_chunk(1025, 4) == MIN_CHUNK + 1
    n = 6
    sample = STXMXASSample(shape=(n, n))
    e = np.arange(632.0, 660.0, 0.25)
    x = (np.arange(n) + 0.5) * sample.pixel_um
    rng = np.random.default_rng(3)
    od, var = optical_density(np.array([sample.image(v, 0, 0.005, x, x, rng) for v in e]))
    den, _ = lowrank_denoise(od, var)
    spectra = den.reshape(e.size, -1).T
    fitter = make_fitter()
    for measures in (None, "all"):
        task = tendq_task(e, spectra, "Mn2+", measures)
        maps = tendq_maps(fitter, e, den, denoise=False,
                          **({} if measures is None else {"measures": measures}))
        for key, ref in (("ten_dq", "ten_dq"), ("ten_dq_sd", "ten_dq_sd"),
                         ("score", "score")):
            np.testing.assert_allclose(task[key], maps[ref].ravel(), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(task["described"], maps["described"].ravel())
