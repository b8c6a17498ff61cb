"""The scale-out deployment: ``smartbeam serve`` on a real PostgreSQL catalog with two
uvicorn workers and an API key; runs written with the plugin's writer, queried from a
fresh client."""

from __future__ import annotations

import secrets
import uuid

import httpx
import numpy as np
import pytest

from smartbeam.localservices import PostgresServer, TiledServe

pytestmark = pytest.mark.slow

TAG = f"pg-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def pg_tiled(tmp_path_factory):
    if not PostgresServer.available():
        pytest.skip("PostgreSQL server binaries are absent (/usr/lib/postgresql/*/bin): run "
                    "scripts/install-system-deps.sh as root")
    key = secrets.token_hex(16)
    password = secrets.token_hex(8)
    with PostgresServer(password=password) as pg:
        server = TiledServe(tmp_path_factory.mktemp("pg-arrays"), key, catalog=pg.uri,
                            workers=2)
        with server:
            yield {"server": server, "key": key, "password": password, "pg": pg}


@pytest.fixture(scope="module")
def written(pg_tiled):
    """Two runs written through Storage.writer(): an XMCD adaptive scan and a SANS count."""
    from bluesky import RunEngine

    from sim_devices.ophyd_twins import SimSANSDetector, SimXMCDEndstation
    from sim_devices.physics.sans import SANSSample
    from sim_devices.physics.xmcd import XMCDSample, preset
    from smartbeam.plans import sans_kde_count, xmcd_adaptive_scan
    from smartbeam.storage import Storage

    fe = preset("Fe")
    store = Storage(uri=pg_tiled["server"].uri, api_key=pg_tiled["key"]).open()
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(store.writer())
    xmcd = SimXMCDEndstation(XMCDSample(fe), name="xmcd", rng=np.random.default_rng(2))
    (u1,) = RE(xmcd_adaptive_scan(xmcd, *fe.window, n_h=fe.n_h, tol=0.1, max_points=20,
                                  n_init=10, dwell=1.0), sample=f"{TAG}-Fe")
    det = SimSANSDetector(SANSSample("realistic", shape=(64, 64)), rng=np.random.default_rng(3))
    (u2,) = RE(sans_kde_count(det, exposure=1.0, max_exposures=6, cadence=3,
                              target_rel_error=1e-6), sample=f"{TAG}-silica")
    return {"xmcd": u1, "sans": u2, "frame_shape": (64, 64)}


def test_runs_queried_from_a_fresh_client(pg_tiled, written):
    from tiled.client import from_uri

    from smartbeam.storage import find_runs, read_stream

    runs = from_uri(pg_tiled["server"].uri, api_key=pg_tiled["key"])["runs"]
    (xmcd,) = find_runs(runs, plan_name="xmcd_adaptive_scan", sample=f"{TAG}-Fe")
    assert xmcd.metadata["start"]["uid"] == written["xmcd"]
    assert {"primary", "decisions", "moments"} <= set(xmcd)
    m = read_stream(xmcd, "moments")
    assert m["moments_n_points"][-1] >= 10 and np.isfinite(m["moments_m_orb"][-1])
    (sans,) = find_runs(runs, plan_name="sans_kde_count", sample=f"{TAG}-silica")
    frames = sans["primary"]["sans_det_image"].read()
    assert frames.shape == (6, *written["frame_shape"]) and frames.sum() > 0
    assert find_runs(runs, plan_name="xmcd_adaptive_scan", sample="no-such-sample") == []


def test_run_exports_as_bluesky_documents(pg_tiled, written):
    from tiled.client import from_uri

    run = from_uri(pg_tiled["server"].uri, api_key=pg_tiled["key"])["runs"][written["xmcd"]]
    names = [name for name, _ in run.documents()]
    assert names[0] == "start" and names[-1] == "stop"
    assert names.count("descriptor") == 3  # primary, decisions, moments


def test_request_without_api_key_is_refused(pg_tiled, written):
    base = pg_tiled["server"].uri
    for path in ("/api/v1/metadata/runs", "/api/v1/search/runs"):
        response = httpx.get(base + path)
        assert response.status_code in (401, 403), (path, response.status_code)
    wrong = httpx.get(base + "/api/v1/metadata/runs", headers={"Authorization": "Apikey nope"})
    assert wrong.status_code in (401, 403)
    ok = httpx.get(base + "/api/v1/metadata/runs",
                   headers={"Authorization": f"Apikey {pg_tiled['key']}"})
    assert ok.status_code == 200


def test_two_workers_and_no_password_in_the_log(pg_tiled, written):
    import psutil

    server = pg_tiled["server"]
    children = psutil.Process(server.proc.pid).children(recursive=True)
    # uvicorn's supervisor spawns one process per worker.
    workers = [c for c in children if "multiprocessing" in " ".join(c.cmdline())]
    assert len(workers) >= 2, [c.cmdline() for c in children]
    log = server.log()
    assert "postgresql+asyncpg://" in log  # it does say where it serves from
    assert pg_tiled["password"] not in log
    for proc in [psutil.Process(server.proc.pid), *children]:
        assert pg_tiled["password"] not in " ".join(proc.cmdline())
