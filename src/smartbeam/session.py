"""Pieces of a beamline session shared by the IPython profile, the queueserver worker
and the demo: RunEngine with persisted metadata, the run store, the callback chain."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["analysis_chain", "make_run_engine", "metadata_dir", "open_storage"]


def metadata_dir() -> Path:
    """Where RunEngine metadata (scan_id, proposal, user) persists between sessions."""
    env = os.environ.get("SMARTBEAM_MD_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("smartbeam")) / "runengine-md"


def make_run_engine(md_dir: str | os.PathLike | None = None, **kwargs):
    """A RunEngine whose metadata survives restarts (scan_id keeps counting).

    The metadata lives in Redis when ``$SMARTBEAM_REDIS_URL`` is set (queueserver
    deployments), else in a local directory; see :func:`smartbeam.metadata.persistent_metadata`.

    Parameters
    ----------
    md_dir
        Directory of the file-backed metadata (default :func:`metadata_dir`); unused with Redis.
    **kwargs
        Passed to :class:`bluesky.RunEngine`.
    """
    from bluesky import RunEngine

    from .metadata import persistent_metadata

    RE = RunEngine({}, **kwargs)
    RE.md = persistent_metadata(md_dir)
    return RE


def open_storage(data_dir: str | os.PathLike | None = None):
    """Open the run store: ``$SMARTBEAM_TILED_URI`` (+ ``$TILED_API_KEY``) if set, else the
    embedded default in ``data_dir`` / ``$SMARTBEAM_DATA_DIR`` / the user data dir."""
    from .storage import Storage

    uri = os.environ.get("SMARTBEAM_TILED_URI")
    return Storage(data_dir, uri=uri).open()


def analysis_chain(writer, *, png_dir: str | os.PathLike | None = None):
    """The document path of a session: analysis routers in front of the Tiled writer.

    Each router forwards every document unchanged and writes its derived stream into
    the same run, before the stop document reaches the writer:
    ``TenDqEstimator -> FrameQualityMonitor -> LiveKDE -> writer``.
    :class:`~smartbeam.faults.FrameQualityMonitor` writes a ``frame_quality`` stream (one
    flag per frame, rules in :mod:`smartbeam.faults`) for every run with a 2-D image;
    LiveKDE applies the same rules before summing (repeated frames are not summed).

    Parameters
    ----------
    writer
        The downstream consumer, usually ``Storage.writer()``.
    png_dir
        Where end-of-run PNGs go (default: the current directory).
    """
    from .callbacks.live_kde import LiveKDE
    from .callbacks.tendq import TenDqEstimator
    from .faults import FrameQualityMonitor

    # LiveKDE is inert for runs without a 2-D image or with md {"kde": False};
    # FrameQualityMonitor for runs without a 2-D image;
    # TenDqEstimator for runs without a ``tendq`` entry in the start document.
    kde = LiveKDE(png_path=png_dir or ".", downstream=writer)
    return TenDqEstimator(downstream=FrameQualityMonitor(downstream=kde))
