"""``smartbeam serve``: a standalone Tiled server for the plugin's runs."""

from __future__ import annotations

import argparse
import ipaddress
import os

__all__ = ["register"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve the run store over HTTP (Tiled)",
        description="Serve the embedded store (SQLite catalog + files in --data-dir) as a "
                    "standalone Tiled server. An API key is required off loopback.")
    parser.add_argument("--data-dir", default=None,
                        help="store directory (default $SMARTBEAM_DATA_DIR or the user data dir)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api-key", default=None,
                        help="API key clients must send (default: the store's own key, or "
                             "$TILED_SINGLE_USER_API_KEY)")
    parser.set_defaults(func=_run)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import uvicorn
    from tiled.catalog import from_uri as catalog_from_uri
    from tiled.config import Authentication
    from tiled.server.app import build_app

    from ..errors import SmartbeamInputError
    from ..storage import _stable_api_key, default_data_dir

    data_dir = Path(args.data_dir or default_data_dir()).expanduser().resolve()
    api_key = args.api_key or os.environ.get("TILED_SINGLE_USER_API_KEY")
    if not _is_loopback(args.host) and not api_key:
        raise SmartbeamInputError(f"--host {args.host} is not loopback: give --api-key")
    api_key = api_key or _stable_api_key(data_dir)
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    catalog = catalog_from_uri(
        data_dir / "catalog.db",
        writable_storage=[data_dir / "data", f"duckdb:///{data_dir / 'storage.duckdb'}"],
        init_if_not_exists=True,
    )
    app = build_app(catalog, authentication=Authentication(single_user_api_key=api_key))
    print(f"serving {data_dir} at http://{args.host}:{args.port}/api/v1 "
          f"(API key in {data_dir / 'api_key'} unless given)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
