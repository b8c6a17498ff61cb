"""End to end through bluesky-queueserver: real Redis, ``start-re-manager`` with the
profile (twins started by the worker), a real Tiled server (``smartbeam serve``), and a
fresh Tiled client that finds the runs afterwards by a metadata query.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from smartbeam.localservices import RedisServer, ReManager, TiledServe
from smartbeam.queue import compare_plan_lists

pytestmark = pytest.mark.slow

STARTUP = Path(__file__).resolve().parents[2] / "profile_collection" / "startup"
PLAN_LIST = STARTUP / "existing_plans_and_devices.yaml"
PERMISSIONS = STARTUP / "user_group_permissions.yaml"
TAG = f"e2e-{uuid.uuid4().hex[:8]}"


def _profile_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    env.update(SMARTBEAM_SIM="1", SMARTBEAM_TIME_SCALE="0.02", MPLBACKEND="Agg",
               SMARTBEAM_MD_DIR=str(tmp / "md"), SMARTBEAM_DATA_DIR=str(tmp / "unused"),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    if not RedisServer.available():
        pytest.skip("redis-server is not installed (scripts/install-system-deps.sh installs it)")
    from bluesky_queueserver_api.zmq import REManagerAPI

    tmp = tmp_path_factory.mktemp("qserver")
    # A copy of the committed plan list: the manager must not write into the repo.
    shutil.copy(PLAN_LIST, tmp / PLAN_LIST.name)
    key = secrets.token_hex(16)
    with RedisServer() as redis, TiledServe(tmp / "tiled", key) as tiled:
        env = _profile_env(tmp)
        env.update(SMARTBEAM_TILED_URI=tiled.uri, TILED_API_KEY=key,
                   SMARTBEAM_PNG_DIR=str(tmp))
        manager = ReManager(redis.url, STARTUP, env=env, log_path=tmp / "manager.log",
                            extra_args=["--existing-plans-devices", str(tmp / PLAN_LIST.name),
                                        "--user-group-permissions", str(PERMISSIONS)])
        with manager:
            RM = REManagerAPI(zmq_control_addr=manager.zmq_control,
                              zmq_info_addr=manager.zmq_info)
            RM.user, RM.user_group = "e2e", "primary"
            try:
                yield {"RM": RM, "tiled": tiled, "key": key, "redis": redis, "tmp": tmp,
                       "manager_log": tmp / "manager.log"}
            finally:
                _close_env(RM)
                RM.close()


def _close_env(RM) -> None:
    """Close the worker (so its atexit stops the twin IOCs), even mid-plan after a failure."""
    status = RM.status()
    if not status["worker_environment_exists"]:
        return
    try:
        if status["manager_state"] != "idle":
            RM.queue_stop()
            if status["re_state"] == "running":
                RM.re_pause(option="immediate")
                RM.wait_for_idle_or_paused(timeout=30)
                RM.re_abort()
            RM.wait_for_idle(timeout=60)
        RM.environment_close()
        RM.wait_for_idle(timeout=60)
    except Exception:
        RM.environment_destroy()
        RM.wait_for_idle(timeout=30)


def _open_env(RM, log: Path) -> None:
    RM.environment_open()
    RM.wait_for_idle(timeout=180)
    # environment_open() does not fail when a startup file raises: check it exists.
    assert RM.status()["worker_environment_exists"], log.read_text()[-4000:]


def _run_queue(RM, log: Path, timeout: float = 400) -> list[dict]:
    RM.queue_start()
    RM.wait_for_idle(timeout=timeout)
    history = RM.history_get()["items"]
    assert RM.queue_get()["items"] == [], log.read_text()[-4000:]
    return history


def _fresh_runs(services):
    from tiled.client import from_uri

    return from_uri(services["tiled"].uri, api_key=services["key"])["runs"]


@pytest.fixture(scope="module")
def queued_runs(services):
    """Open the environment, queue the science plans, run the queue."""
    from bluesky_queueserver_api import BPlan

    RM, log = services["RM"], services["manager_log"]
    _open_env(RM, log)
    existing = RM.plans_allowed()["plans_allowed"]
    RM.item_add(BPlan("xmcd_adaptive_scan", "xmcd", 695.0, 735.0, tol=0.05, max_points=24,
                      n_init=10, dwell=0.1, md={"sample": f"{TAG}-Fe"}))
    RM.item_add(BPlan("sans_kde_count", "sans_det", exposure=0.5, max_exposures=10, cadence=5,
                      target_rel_error=1e-6, md={"sample": f"{TAG}-silica"}))
    # The "xas" endstation twin holds Mn2+ at 10Dq = 0.9 eV (monochromator 0.4 eV off).
    RM.item_add(BPlan("xas_tendq_scan", "xas", 630.0, 663.0, num=111, dwell=0.2,
                      md={"sample": f"{TAG}-Mn"}))
    queued = {"xmcd_adaptive_scan", "sans_kde_count", "xas_tendq_scan"}
    history = _run_queue(RM, log)
    done = {h["name"]: h["result"] for h in history}
    for name in queued:
        assert done[name]["exit_status"] == "completed", (name, done[name], log.read_text()[-3000:])
    return {"history": history, "queued": queued, "allowed": existing}


def test_environment_and_plan_list(services, queued_runs):
    # Every science plan is queueable by the primary group.
    for name in ("xmcd_adaptive_scan", "xmcd_dense_scan", "stxm_image", "sans_kde_count"):
        assert name in queued_runs["allowed"]
    params = {p["name"]: p for p in queued_runs["allowed"]["xmcd_adaptive_scan"]["parameters"]}
    # The device parameter accepts the session's end stations only (names become objects).
    annotation = params["endstation"]["annotation"]
    assert annotation["type"] == "XMCDEndstation"
    assert set(annotation["devices"]["XMCDEndstation"]) == {"xmcd", "xas"}


def test_runs_found_by_metadata_query_with_derived_streams(services, queued_runs):
    from smartbeam.storage import find_runs, read_stream

    runs = _fresh_runs(services)
    (xmcd,) = find_runs(runs, plan_name="xmcd_adaptive_scan", sample=f"{TAG}-Fe")
    assert {"primary", "decisions", "moments"} <= set(xmcd)
    moments = read_stream(xmcd, "moments")
    assert moments["moments_n_points"][-1] >= 10
    decisions = read_stream(xmcd, "decisions", keys=["decision_n_points"])
    assert len(decisions["decision_n_points"]) >= 1
    (sans,) = find_runs(runs, plan_name="sans_kde_count", sample=f"{TAG}-silica")
    assert sans.metadata["stop"]["num_events"]["primary"] == 10
    kde = read_stream(sans, "kde", keys=["n_exposures", "error"])
    assert kde["n_exposures"][-1] == 10 and kde["error"][-1] == ""
    # Both were started by the queue's user.
    assert xmcd.metadata["start"]["scan_id"] != sans.metadata["start"]["scan_id"]


def test_xas_tendq_run(services, queued_runs):
    from smartbeam.storage import find_runs, read_stream

    (run,) = find_runs(_fresh_runs(services), plan_name="xas_tendq_scan", sample=f"{TAG}-Mn")
    analysis = read_stream(run, "analysis", keys=["ten_dq", "offset", "described", "error"])
    assert analysis["error"][-1] == ""
    assert bool(analysis["described"][-1])
    assert abs(analysis["ten_dq"][-1] - 0.9) < 0.05
    assert abs(analysis["offset"][-1] - 0.4) < 0.1


def test_bad_argument_is_rejected_when_added(services, queued_runs):
    from bluesky_queueserver_api import BPlan

    RM = services["RM"]
    with pytest.raises(RM.RequestFailedError) as err:
        RM.item_add(BPlan("xmcd_adaptive_scan", "xmcd", "not-a-number", 735.0))
    assert "e_min" in str(err.value)
    with pytest.raises(RM.RequestFailedError) as err:
        RM.item_add(BPlan("sans_kde_count", "sans_det", max_exposures=2.5))
    assert "max_exposures" in str(err.value)
    # A wrong device name (unknown, or a device of another kind) is refused when added,
    # for every science plan family, naming the parameter.
    window = {"x_range": [0.0, 1.0], "y_range": [0.0, 1.0], "pixel": 0.5}
    for item, param, bad in (
            (BPlan("xmcd_adaptive_scan", "no_such_device", 700.0, 735.0), "endstation",
             "no_such_device"),
            (BPlan("xmcd_dense_scan", "sans_det", 700.0, 735.0), "endstation", "sans_det"),
            (BPlan("xas_tendq_scan", "stxm", 630.0, 663.0), "endstation", "stxm"),
            (BPlan("stxm_image", "xmcd", energies=[708.0], **window), "stxm", "xmcd"),
            (BPlan("stxm_xmcd_stack", "no_such_device", e_min=700.0, e_max=735.0, **window),
             "stxm", "no_such_device"),
            (BPlan("sans_kde_count", "xas", exposure=0.5), "detector", "xas")):
        with pytest.raises(RM.RequestFailedError) as err:
            RM.item_add(item)
        # The one error is the device parameter's (the message also echoes the whole item).
        msg = str(err.value)
        assert "1 validation error" in msg and f"\n{param}\n" in msg, (item, msg)
        assert f"input_value='{bad}'" in msg, (item, msg)
    assert RM.queue_get()["items"] == []


def test_admin_plan_refused_to_primary_group(services, queued_runs):
    from bluesky_queueserver_api import BPlan

    RM = services["RM"]
    with pytest.raises(RM.RequestFailedError) as err:
        RM.item_add(BPlan("admin_set_scan_id", 0))
    assert "admin_set_scan_id" in str(err.value) and "allowed" in str(err.value)
    # The same item is accepted for the admin group: it exists, it is only kept apart.
    added = RM.item_add(BPlan("admin_set_scan_id", 0), user_group="admin")
    RM.item_remove(uid=added["item"]["item_uid"])
    assert RM.queue_get()["items"] == []


def test_scan_id_persists_across_environment_restart(services, queued_runs):
    from bluesky_queueserver_api import BPlan

    RM, log = services["RM"], services["manager_log"]
    before = max(r.metadata["start"]["scan_id"] for r in _fresh_runs(services).values())
    RM.environment_close()
    RM.wait_for_idle(timeout=60)
    assert not RM.status()["worker_environment_exists"]
    _open_env(RM, log)
    RM.item_add(BPlan("count", ["xmcd"], num=1, md={"sample": f"{TAG}-restart"}))
    _run_queue(RM, log)
    from smartbeam.storage import find_runs

    (run,) = find_runs(_fresh_runs(services), sample=f"{TAG}-restart")
    # RE.md lives in Redis: the new worker continues the scan counter.
    assert run.metadata["start"]["scan_id"] == before + 1


def test_committed_plan_list_is_current(tmp_path):
    """Fails when existing_plans_and_devices.yaml no longer matches the profile."""
    env = _profile_env(tmp_path)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "qserver-list-plans-devices"), "--startup-dir",
         str(STARTUP), "--file-name", "plans.yaml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diffs = compare_plan_lists(PLAN_LIST, tmp_path / "plans.yaml")
    assert diffs == [], ("existing_plans_and_devices.yaml is stale; regenerate it with "
                         "`qserver-list-plans-devices --startup-dir profile_collection/startup` "
                         "in that directory:\n" + "\n".join(diffs))
