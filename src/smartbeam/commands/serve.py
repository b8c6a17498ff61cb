"""``smartbeam serve``: a standalone Tiled server for the plugin's runs.

Two deployments, one code path (a Tiled configuration file + uvicorn with Tiled's app
factory, so ``--workers N`` works):

- default: the embedded store's SQLite catalog, array files and DuckDB tables in
  ``--data-dir`` (the same layout ``Storage`` uses), one worker;
- scale-out: ``--catalog postgresql+asyncpg://USER:PW@HOST/DB``: catalog *and* tables in
  PostgreSQL, arrays (zarr) in ``--data-dir`` (a shared filesystem when the workers run on
  several hosts), several uvicorn workers, optionally Tiled's streaming cache in Redis.

Clients must send the API key; off loopback ``--api-key`` (or ``$TILED_SINGLE_USER_API_KEY``)
is required. The database password never appears in a log line or on a command line: the
configuration holding it is written to a private (0600) file that is removed on exit.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import SmartbeamInputError

__all__ = ["build_config", "init_catalog", "redact_uri", "register", "tables_uri"]

# Lets clients export a whole run as bluesky documents (``run.documents()``).
EXPORTERS = {
    "BlueskyRun": {"application/json-seq": "bluesky_tiled_plugins.exporters:json_seq_exporter"},
}
_PG_PREFIX = "postgresql+asyncpg://"


def register(subparsers) -> None:
    """Add the ``serve`` sub-command to the CLI."""
    parser = subparsers.add_parser(
        "serve", help="serve the run store over HTTP (Tiled; SQLite or PostgreSQL)",
        description="Serve the plugin's runs with Tiled: by default the embedded store "
                    "(SQLite + files in --data-dir); with --catalog postgresql+asyncpg://... "
                    "catalog and tables in PostgreSQL, arrays in --data-dir, --workers N. "
                    "An API key is required off loopback.")
    parser.add_argument("--data-dir", default=None,
                        help="store directory; arrays go here (default $SMARTBEAM_DATA_DIR "
                             "or the user data dir)")
    parser.add_argument("--catalog", default=None, metavar="URI",
                        help="postgresql+asyncpg://USER:PW@HOST[:PORT]/DB (default: SQLite "
                             "catalog.db in --data-dir); also $SMARTBEAM_CATALOG_URI")
    parser.add_argument("--init", action="store_true",
                        help="create the catalog's tables if the database is new (once, "
                             "before the workers start)")
    parser.add_argument("--workers", type=int, default=1,
                        help="uvicorn worker processes (>1 needs a PostgreSQL catalog)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api-key", default=None,
                        help="API key clients must send (default $TILED_SINGLE_USER_API_KEY, "
                             "or on loopback the store's own key in DATA_DIR/api_key)")
    parser.add_argument("--cache-redis", default=None, metavar="URL",
                        help="redis://HOST:PORT for Tiled's streaming cache (live updates "
                             "shared by all workers)")
    parser.set_defaults(func=_run)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def redact_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***`` (for messages and logs).

    Parameters
    ----------
    uri
        A database or Redis URI, e.g. ``postgresql+asyncpg://user:pw@host/db``.
    """
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", uri)


def tables_uri(catalog_uri: str) -> str:
    """The table-storage URI of a PostgreSQL catalog (same database, sync driver name).

    Parameters
    ----------
    catalog_uri
        ``postgresql+asyncpg://...``.
    """
    if not catalog_uri.startswith(_PG_PREFIX):
        raise SmartbeamInputError(f"--catalog {redact_uri(catalog_uri)}: expected "
                                  f"{_PG_PREFIX}USER:PW@HOST[:PORT]/DB")
    return "postgresql://" + catalog_uri[len(_PG_PREFIX):]


def build_config(data_dir: str | os.PathLike, *, api_key: str, catalog: str | None = None,
                 host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
                 cache_redis: str | None = None) -> dict[str, Any]:
    """The Tiled server configuration (a dict in Tiled's config-file schema).

    Parameters
    ----------
    data_dir
        Store directory: arrays (zarr) always; SQLite catalog and DuckDB tables without
        ``catalog``.
    api_key
        The single-user API key clients must send.
    catalog
        ``postgresql+asyncpg://...`` for the scale-out deployment; ``None`` for SQLite.
    host, port, workers
        uvicorn settings.
    cache_redis
        ``redis://...`` of Tiled's streaming cache, or ``None``.

    Returns
    -------
    dict
        Ready to be dumped as YAML for ``TILED_CONFIG``; it holds secrets.
    """
    if workers < 1:
        raise SmartbeamInputError(f"--workers {workers}: expected an integer >= 1")
    if not re.fullmatch(r"[A-Za-z0-9]+", api_key or ""):
        raise SmartbeamInputError("--api-key: expected letters and digits only (Tiled's rule)")
    data_dir = Path(data_dir).expanduser().resolve()
    if catalog:
        uri = catalog
        storage = [str(data_dir / "data"), tables_uri(catalog)]
    else:
        if workers > 1:
            raise SmartbeamInputError(
                f"--workers {workers} with the SQLite catalog: expected --workers 1, or "
                f"--catalog {_PG_PREFIX}... for several workers")
        uri = f"sqlite:///{data_dir / 'catalog.db'}"
        storage = [str(data_dir / "data"), f"duckdb:///{data_dir / 'storage.duckdb'}"]
    config: dict[str, Any] = {
        "trees": [{"path": "/", "tree": "catalog",
                   "args": {"uri": uri, "writable_storage": storage,
                            "init_if_not_exists": False}}],
        "authentication": {"single_user_api_key": api_key, "allow_anonymous_access": False},
        "media_types": EXPORTERS,
        "uvicorn": {"host": host, "port": port, "workers": workers},
    }
    if cache_redis:
        config["streaming_cache"] = {"uri": cache_redis}
    return config


def init_catalog(uri: str) -> bool:
    """Create the catalog's tables if the database is new; True if it was created.

    Runs in this process (``tiled catalog init`` would put the password on a command line).

    Parameters
    ----------
    uri
        ``postgresql+asyncpg://...`` or ``sqlite:///path``.
    """
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine
    from tiled.alembic_utils import UninitializedDatabase, check_database, stamp_head
    from tiled.catalog.alembic_constants import ALEMBIC_DIR, ALEMBIC_INI_TEMPLATE_PATH
    from tiled.catalog.core import ALL_REVISIONS, REQUIRED_REVISION, initialize_database
    from tiled.utils import ensure_specified_sql_driver

    uri = ensure_specified_sql_driver(uri)

    async def setup() -> bool:
        engine = create_async_engine(uri)
        try:
            await check_database(engine, REQUIRED_REVISION, ALL_REVISIONS)
        except UninitializedDatabase:
            await initialize_database(engine)
            return True
        finally:
            await engine.dispose()
        return False

    created = asyncio.run(setup())
    if created:
        stamp_head(ALEMBIC_INI_TEMPLATE_PATH, ALEMBIC_DIR, uri)
    return created


def _run(args: argparse.Namespace) -> int:
    import uvicorn
    import yaml

    from ..storage import _stable_api_key, default_data_dir

    data_dir = Path(args.data_dir or default_data_dir()).expanduser().resolve()
    catalog = args.catalog or os.environ.get("SMARTBEAM_CATALOG_URI")
    if catalog:
        tables_uri(catalog)  # validates the scheme before anything starts
    api_key = args.api_key or os.environ.get("TILED_SINGLE_USER_API_KEY")
    if not _is_loopback(args.host) and not api_key:
        raise SmartbeamInputError(f"--host {args.host} is not loopback: give --api-key "
                                  "(or $TILED_SINGLE_USER_API_KEY)")
    api_key = api_key or _stable_api_key(data_dir)
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    config = build_config(data_dir, api_key=api_key, catalog=catalog, host=args.host,
                          port=args.port, workers=args.workers, cache_redis=args.cache_redis)
    uri = config["trees"][0]["args"]["uri"]
    if args.init or not catalog:
        # Once, here, before any worker starts: workers initialising concurrently race.
        created = init_catalog(uri)
        if created:
            print(f"initialised catalog {redact_uri(uri)}", flush=True)
    private = Path(tempfile.mkdtemp(prefix="smartbeam-serve-"))  # 0700
    try:
        cfg_path = private / "config.yml"
        cfg_path.touch(mode=0o600)
        cfg_path.write_text(yaml.safe_dump(config))
        os.environ["TILED_CONFIG"] = str(cfg_path)
        where = redact_uri(catalog) + f" + arrays in {data_dir / 'data'}" if catalog \
            else str(data_dir)
        print(f"serving {where} at http://{args.host}:{args.port}/api/v1 with "
              f"{args.workers} worker(s); API key "
              f"{'as given' if args.api_key or os.environ.get('TILED_SINGLE_USER_API_KEY') else 'in ' + str(data_dir / 'api_key')}",
              flush=True)
        uvicorn.run("tiled.server.app:app_factory", factory=True, host=args.host,
                    port=args.port, workers=args.workers, log_level="warning")
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return 0
