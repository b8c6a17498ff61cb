"""Persistent RunEngine metadata (scan_id, user, proposal) that survives restarts.

With ``$SMARTBEAM_REDIS_URL`` set (the queueserver deployment) the metadata lives in Redis
through :class:`redis_json_dict.RedisJSONDict`, as at NSLS-II: every queueserver worker
environment (and an IPython session on another host) sees the same scan_id. Without it,
bluesky's file-backed :class:`~bluesky.utils.PersistentDict` in a local directory is used.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

from .errors import SmartbeamError, SmartbeamInputError

__all__ = ["DEFAULT_REDIS_PREFIX", "metadata_backend", "persistent_metadata"]

DEFAULT_REDIS_PREFIX = "smartbeam-md-"


def metadata_backend() -> str:
    """``"redis"`` when ``$SMARTBEAM_REDIS_URL`` is set, else ``"directory"``."""
    return "redis" if os.environ.get("SMARTBEAM_REDIS_URL") else "directory"


def _redis_dict(url: str, prefix: str) -> MutableMapping:
    try:
        import redis
        from redis_json_dict import RedisJSONDict
    except ImportError as exc:  # only needed for the Redis deployment
        raise SmartbeamError(
            "SMARTBEAM_REDIS_URL is set but redis-json-dict is not installed: "
            "pip install redis-json-dict") from exc
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise SmartbeamInputError(
            f"SMARTBEAM_REDIS_URL={url!r}: expected redis://host:port[/db]")
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        # The URL may hold a password: name only host and port.
        where = client.connection_pool.connection_kwargs
        raise SmartbeamError(f"cannot reach Redis at {where.get('host')}:{where.get('port')} "
                             f"for RunEngine metadata: {exc}") from exc
    return RedisJSONDict(client, prefix=prefix)


def persistent_metadata(md_dir: str | os.PathLike | None = None, *,
                        redis_url: str | None = None,
                        redis_prefix: str | None = None) -> MutableMapping:
    """The mapping to use as ``RE.md``: Redis-backed if configured, else a directory.

    Parameters
    ----------
    md_dir
        Directory of the file-backed store (default ``$SMARTBEAM_MD_DIR`` or the user config
        dir); used only without Redis.
    redis_url
        ``redis://host:port/db`` (default ``$SMARTBEAM_REDIS_URL``).
    redis_prefix
        Key prefix in Redis (default ``$SMARTBEAM_REDIS_MD_PREFIX`` or
        :data:`DEFAULT_REDIS_PREFIX`); one prefix per beamline.

    Returns
    -------
    MutableMapping
        A dict-like object whose writes persist immediately.

    Raises
    ------
    SmartbeamInputError
        When the Redis URL is not a ``redis://`` URL.
    SmartbeamError
        When Redis cannot be reached or ``redis-json-dict`` is missing.
    """
    url = redis_url or os.environ.get("SMARTBEAM_REDIS_URL")
    if url:
        prefix = redis_prefix or os.environ.get("SMARTBEAM_REDIS_MD_PREFIX", DEFAULT_REDIS_PREFIX)
        return _redis_dict(url, prefix)
    from bluesky.utils import PersistentDict

    from .session import metadata_dir

    path = Path(md_dir) if md_dir else metadata_dir()
    path.mkdir(parents=True, exist_ok=True)
    return PersistentDict(str(path))
