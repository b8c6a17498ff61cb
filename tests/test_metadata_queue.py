"""Quick checks of the queueserver helpers, persistent metadata and serve configuration."""

from __future__ import annotations

import inspect
import re

import pytest
import yaml

from smartbeam.commands.serve import build_config, redact_uri, tables_uri
from smartbeam.errors import SmartbeamInputError
from smartbeam.localservices import RedisServer
from smartbeam.metadata import persistent_metadata
from smartbeam.queue import (
    compare_plan_lists,
    resolve_plan_annotations,
    restrict_device_parameters,
)

# A module with postponed annotations, as the plan modules are written.
PLAN_SRC = '''
from __future__ import annotations
from bluesky.protocols import Readable

def plan(det: Readable, x: float, *, n: int = 3, tags: list[str] | None = None):
    """A plan."""
    yield None

def not_a_plan(det: Readable) -> None:
    return None
'''


def test_resolve_plan_annotations_turns_strings_into_types():
    from bluesky.protocols import Readable

    ns: dict = {}
    exec(compile(PLAN_SRC, "<plans>", "exec"), ns)
    assert inspect.signature(ns["plan"]).parameters["det"].annotation == "Readable"
    assert resolve_plan_annotations(ns) == ["plan"]
    params = inspect.signature(ns["plan"]).parameters
    assert params["det"].annotation is Readable
    assert params["x"].annotation is float
    assert params["tags"].annotation == (list[str] | None)
    # Only generator functions are plans.
    assert inspect.signature(ns["not_a_plan"]).parameters["det"].annotation == "Readable"


def test_unresolvable_annotation_names_the_plan():
    ns: dict = {}
    exec(compile("from __future__ import annotations\n"
                 "def broken(det: NoSuchType):\n    yield None\n", "<p>", "exec"), ns)
    with pytest.raises(SmartbeamInputError, match="broken"):
        resolve_plan_annotations(ns)


# Science plans of two families, written generically (postponed protocol annotations).
FAMILY_SRC = '''
from __future__ import annotations
from collections.abc import Sequence
from bluesky.protocols import Readable

def xmcd_scan(endstation: Readable, e_min: float, *, n: int = 3):
    """An XMCD scan.

    Parameters
    ----------
    endstation
        The end station.
    e_min
        Start energy.
    n
        Points.
    """
    yield ("xmcd", endstation.name, e_min, n)

def sans_count(detector: Readable, others: Sequence[Readable] = (), exposure: float = 1.0):
    """A SANS count.

    Parameters
    ----------
    detector
        The area detector.
    others
        Extra readables.
    exposure
        Seconds.
    """
    yield ("sans", detector.name, [o.name for o in others], exposure)

def other_plan(det: Readable):
    """Not in a family."""
    yield det
'''


@pytest.fixture()
def family_namespace():
    from ophyd.sim import SynAxis, SynGauss

    ns: dict = {}
    exec(compile(FAMILY_SRC, "<family plans>", "exec"), ns)
    motor = SynAxis(name="motor")
    ns.update(motor=motor, xmcd=SynGauss("xmcd", motor, "motor", 0, 1),
              xas=SynGauss("xas", motor, "motor", 0, 1),
              sans_det=SynAxis(name="sans_det"))
    resolve_plan_annotations(ns)
    return ns


def _validate(ns, name, args=(), kwargs=None):
    """Validate an item the way the queueserver does when it is added."""
    from bluesky_queueserver.manager import profile_ops as po

    plans, devices, _, _ = po.existing_plans_and_devices_from_nspace(nspace=ns)
    allowed = po._filter_allowed_plans(allowed_plans=plans, allowed_devices=devices)
    return po.validate_plan({"name": name, "args": list(args), "kwargs": kwargs or {}},
                            allowed_plans=allowed, allowed_devices=devices)


def _refused_for(result, param, bad):
    """The item was refused for this one parameter and value (messages echo the item)."""
    ok, msg = result
    return (not ok and "1 validation error" in msg
            and re.search(rf"^{param}(\.\d+)?$", msg, re.M) is not None
            and f"input_value='{bad}'" in msg)


def test_restrict_device_parameters_refuses_wrong_devices_when_added(family_namespace):
    from ophyd.sim import SynAxis, SynGauss

    ns = family_namespace
    original = ns["xmcd_scan"]
    assert _validate(ns, "xmcd_scan", ["no_such_device", 700.0])[0]  # the gap: any string
    done = restrict_device_parameters(ns, {"xmcd_": SynGauss, "sans_": SynAxis})
    assert done == {"xmcd_scan": {"endstation": ["xas", "xmcd"]},
                    "sans_count": {"detector": ["motor", "sans_det"],
                                   "others": ["motor", "sans_det"]}}
    assert ns["other_plan"].__name__ == "other_plan"
    assert not hasattr(ns["other_plan"], "_custom_parameter_annotation_")
    for args in (["xmcd", 700.0], ["xas", 700.0]):
        assert _validate(ns, "xmcd_scan", args) == (True, "")
    for bad in ("no_such_device", "motor", "sans_det"):
        assert _refused_for(_validate(ns, "xmcd_scan", [bad, 700.0]), "endstation", bad)
    assert _refused_for(_validate(ns, "sans_count", ["sans_det"], {"others": ["motor", "xmcd"]}),
                        "others", "xmcd")
    assert _validate(ns, "sans_count", ["sans_det"], {"others": ["motor"]}) == (True, "")
    # Other parameters are still type-checked.
    assert _refused_for(_validate(ns, "xmcd_scan", ["xmcd", "high"]), "e_min", "high")
    # Same plan for IPython: name, numpy docstring, resolved signature, device objects.
    plan = ns["xmcd_scan"]
    assert plan.__name__ == "xmcd_scan" and plan.__doc__ == original.__doc__
    assert str(inspect.signature(plan)) == str(inspect.signature(original))
    assert list(plan(ns["xmcd"], 700.0, n=5)) == [("xmcd", "xmcd", 700.0, 5)]
    assert list(ns["sans_count"](ns["sans_det"], [ns["motor"]])) == [
        ("sans", "sans_det", ["motor"], 1.0)]


def test_restrict_device_parameters_twice_does_not_stack_wrappers(family_namespace):
    from ophyd.sim import SynAxis, SynGauss

    ns = family_namespace
    original = ns["xmcd_scan"]
    restrict_device_parameters(ns, {"xmcd_": SynGauss})
    first = ns["xmcd_scan"]
    assert first.__wrapped__ is original
    # A parameter that already has a custom annotation keeps it: no second wrapper.
    assert restrict_device_parameters(ns, {"xmcd_": SynAxis}) == {}
    assert ns["xmcd_scan"] is first
    assert _validate(ns, "xmcd_scan", ["xmcd", 700.0]) == (True, "")


def test_restrict_device_parameters_without_devices_refuses_every_name(family_namespace):
    ns = family_namespace

    class Absent:
        pass

    assert restrict_device_parameters(ns, {"xmcd_": Absent}) == {"xmcd_scan": {"endstation": []}}
    ok, msg = _validate(ns, "xmcd_scan", ["xmcd", 700.0])
    assert not ok and re.search(r"^endstation$", msg, re.M), msg


@pytest.mark.parametrize("families", [{"": object}, {"xmcd_": "XMCDEndstation"}, {"xmcd_": ()}])
def test_restrict_device_parameters_bad_families(family_namespace, families):
    with pytest.raises(SmartbeamInputError, match="expected a non-empty plan-name prefix"):
        restrict_device_parameters(family_namespace, families)


def test_profile_plans_keep_working_with_device_objects():
    """The IPython path: a restricted science plan runs on an in-process twin."""
    import numpy as np
    from bluesky import RunEngine

    from sim_devices.ophyd_twins.sans import SimSANSDetector
    from sim_devices.physics.sans import SANSSample
    from smartbeam.plans import sans_kde_count

    det = SimSANSDetector(SANSSample("realistic", shape=(32, 32)), rng=np.random.default_rng(0))
    ns = {"sans_kde_count": sans_kde_count, "sans_det": det}
    resolve_plan_annotations(ns)
    assert restrict_device_parameters(ns, {"sans_": SimSANSDetector}) == {
        "sans_kde_count": {"detector": ["sans_det"]}}
    assert ns["sans_kde_count"] is not sans_kde_count
    assert not hasattr(sans_kde_count, "_custom_parameter_annotation_")
    RE = RunEngine({})
    stops = []
    RE(ns["sans_kde_count"](det, exposure=0.1, max_exposures=3, target_rel_error=1e-9),
       lambda n, d: stops.append(d) if n == "stop" else None)
    assert stops[0]["exit_status"] == "success" and stops[0]["num_events"]["primary"] == 3
    assert _refused_for(_validate(ns, "sans_kde_count", ["not_a_detector"]), "detector",
                        "not_a_detector")


def _plan_list(path, plans):
    path.write_text(yaml.safe_dump({"existing_plans": plans, "existing_devices": {}}))
    return path


def test_compare_plan_lists_reports_each_difference(tmp_path):
    p = {"name": "e_min", "annotation": {"type": "float"}}
    a = _plan_list(tmp_path / "a.yaml", {"scan1": {"parameters": [p]},
                                         "gone": {"parameters": []}})
    b = _plan_list(tmp_path / "b.yaml", {"scan1": {"parameters": [dict(p, default="1.0")]},
                                         "new": {"parameters": []}})
    diffs = compare_plan_lists(a, b)
    assert any("'new' is missing" in d for d in diffs)
    assert any("'gone' no longer exists" in d for d in diffs)
    assert any("'scan1'" in d for d in diffs)
    assert compare_plan_lists(a, a) == []
    # A change of the devices a parameter accepts makes the committed list stale too.
    d = {"name": "endstation", "annotation": {"type": "XMCDEndstation",
                                              "devices": {"XMCDEndstation": ["xas", "xmcd"]}}}
    c = _plan_list(tmp_path / "c.yaml", {"scan1": {"parameters": [d]}})
    e = _plan_list(tmp_path / "e.yaml", {"scan1": {"parameters": [
        {**d, "annotation": {**d["annotation"], "devices": {"XMCDEndstation": ["xmcd"]}}}]}})
    assert compare_plan_lists(c, e) != [] and compare_plan_lists(c, c) == []


def test_directory_metadata_persists(tmp_path, monkeypatch):
    monkeypatch.delenv("SMARTBEAM_REDIS_URL", raising=False)
    md = persistent_metadata(tmp_path)
    md["scan_id"] = 41
    md["proposal"] = {"id": 7}
    del md
    again = persistent_metadata(tmp_path)
    assert again["scan_id"] == 41 and again["proposal"] == {"id": 7}


def test_bad_redis_url_is_refused():
    with pytest.raises(SmartbeamInputError, match="http://x"):
        persistent_metadata(redis_url="http://x")


@pytest.mark.skipif(not RedisServer.available(), reason="redis-server is not installed")
def test_redis_metadata_survives_a_new_client_and_run_engine():
    pytest.importorskip("redis_json_dict")
    from smartbeam.session import make_run_engine

    with RedisServer() as redis:
        md = persistent_metadata(redis_url=redis.url, redis_prefix="t-")
        md["scan_id"] = 9
        md["user"] = "alice"
        import os

        os.environ["SMARTBEAM_REDIS_URL"] = redis.url
        os.environ["SMARTBEAM_REDIS_MD_PREFIX"] = "t-"
        try:
            from bluesky.plans import count
            from ophyd.sim import det

            RE = make_run_engine()
            starts = []
            RE(count([det]), lambda n, d: starts.append(d) if n == "start" else None)
        finally:
            del os.environ["SMARTBEAM_REDIS_URL"], os.environ["SMARTBEAM_REDIS_MD_PREFIX"]
        assert starts[0]["scan_id"] == 10 and starts[0]["user"] == "alice"
        assert persistent_metadata(redis_url=redis.url, redis_prefix="t-")["scan_id"] == 10


def test_serve_config_postgres_and_sqlite(tmp_path):
    uri = "postgresql+asyncpg://u:secret@127.0.0.1:5432/db"
    cfg = build_config(tmp_path, api_key="abc123", catalog=uri, workers=2)
    args = cfg["trees"][0]["args"]
    assert args["uri"] == uri and args["writable_storage"][1] == tables_uri(uri)
    assert args["writable_storage"][1].startswith("postgresql://")
    assert cfg["uvicorn"]["workers"] == 2
    assert cfg["authentication"]["single_user_api_key"] == "abc123"
    assert "application/json-seq" in cfg["media_types"]["BlueskyRun"]
    sqlite = build_config(tmp_path, api_key="abc123")
    assert sqlite["trees"][0]["args"]["uri"].startswith("sqlite:///")
    with pytest.raises(SmartbeamInputError, match="--workers 2"):
        build_config(tmp_path, api_key="abc123", workers=2)
    with pytest.raises(SmartbeamInputError, match="api-key"):
        build_config(tmp_path, api_key="not a key!")


def test_redact_and_scheme_check():
    assert redact_uri("postgresql+asyncpg://u:secret@h/db") == "postgresql+asyncpg://u:***@h/db"
    with pytest.raises(SmartbeamInputError) as err:
        tables_uri("mysql://u:secret@h/db")
    assert "secret" not in str(err.value) and "postgresql+asyncpg" in str(err.value)
