"""PNG of an MDS map: library entries coloured by 10Dq, measured spectra labelled."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..analysis.mds import MDSMap

__all__ = ["save_mds_png"]


def save_mds_png(m: MDSMap, path: str | os.PathLike, labels: Sequence[str] = (),
                 title: str | None = None) -> str:
    """Draw ``m`` and save it as PNG; returns the path.

    Parameters
    ----------
    m
        The map from :func:`smartbeam.analysis.mds.mds_map`.
    path
        Output file.
    labels
        One label per measured spectrum.
    title
        Figure title (default names the measure and stress).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), dpi=120)
    ax = fig.add_subplot()
    sc = ax.scatter(m.library_xy[:, 0], m.library_xy[:, 1], c=m.ten_dq, cmap="viridis", s=30,
                    label="library")
    ax.plot(m.library_xy[:, 0], m.library_xy[:, 1], color="0.7", lw=0.8, zorder=0)
    fig.colorbar(sc, ax=ax, label="10Dq (eV)")
    if len(m.measured_xy):
        ax.scatter(m.measured_xy[:, 0], m.measured_xy[:, 1], marker="*", s=160, c="red",
                   edgecolors="k", label="measured")
        for (x, y), lab in zip(m.measured_xy, labels, strict=False):
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("MDS 1")
    ax.set_ylabel("MDS 2")
    ax.set_title(title or f"MDS map ({m.measure}, stress {m.stress:.3g})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return str(path)
