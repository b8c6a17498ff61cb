"""Quick checks of the queueserver helpers, persistent metadata and serve configuration."""

from __future__ import annotations

import pytest
import yaml

from smartbeam.commands.serve import build_config, redact_uri, tables_uri
from smartbeam.errors import SmartbeamInputError
from smartbeam.localservices import RedisServer
from smartbeam.metadata import persistent_metadata
from smartbeam.queue import compare_plan_lists, resolve_plan_annotations

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
    import inspect

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
