"""PNG pictures of STXM maps: moment maps, 10Dq maps with rejection mask, cluster + MDS maps.

Every map has a colour bar and a scale bar in µm (the pixel size comes from the run's
``pixel_um``). Figures are drawn with matplotlib's object API on the Agg canvas, so
nothing depends on (or changes) the session's pyplot backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from ..errors import SmartbeamInputError

__all__ = ["nice_scale_length", "save_cluster_mds_png", "save_moment_maps_png",
           "save_tendq_map_png"]

# Pixel spectra embedded in the MDS map at most: metric MDS is O(N^2) in memory and
# time, and a few hundred points show the cluster structure as well as 10,000 would.
MDS_MAX_POINTS = 400


def nice_scale_length(width_um: float) -> float:
    """A round scale-bar length (1, 2 or 5 x 10^k µm) near a fifth of ``width_um``."""
    if not (np.isfinite(width_um) and width_um > 0):
        raise SmartbeamInputError(f"width_um={width_um!r}: expected a positive field width")
    target = width_um / 5.0
    exp = np.floor(np.log10(target))
    for m in (5.0, 2.0, 1.0):
        if m * 10 ** exp <= target:
            return float(m * 10 ** exp)
    return float(10 ** exp)


def _figure(n_panels: int, ncols: int = 2, size: float = 3.6):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    nrows = int(np.ceil(n_panels / ncols))
    fig = Figure(figsize=(size * ncols + 0.8, size * nrows), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _check_pixel(pixel_um: float) -> float:
    if not (isinstance(pixel_um, int | float | np.floating) and np.isfinite(pixel_um)
            and pixel_um > 0):
        raise SmartbeamInputError(f"pixel_um={pixel_um!r}: expected a positive pixel size (µm)")
    return float(pixel_um)


def _map_panel(fig, ax, image: np.ndarray, pixel_um: float, title: str, label: str,
               cmap: str = "viridis", symmetric: bool = False, mask: np.ndarray | None = None):
    """One image with colour bar and scale bar; ``mask`` pixels are drawn grey."""
    import matplotlib

    ny, nx = image.shape
    extent = (0.0, nx * pixel_um, ny * pixel_um, 0.0)
    data = np.ma.masked_invalid(np.asarray(image, dtype=float))
    if mask is not None:
        data = np.ma.masked_where(mask, data)
    finite = data.compressed()
    vmin = vmax = None
    if finite.size:
        if symmetric:
            vmax = float(np.max(np.abs(finite))) or 1.0
            vmin = -vmax
        else:
            vmin, vmax = float(finite.min()), float(finite.max())
            if vmin == vmax:
                vmin, vmax = vmin - 0.5, vmax + 0.5
    cm = matplotlib.colormaps[cmap].with_extremes(bad="0.75")
    im = ax.imshow(data, extent=extent, cmap=cm, vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, label=label, fraction=0.046, pad=0.04)
    _scale_bar(ax, nx * pixel_um, ny * pixel_um)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _scale_bar(ax, width_um: float, height_um: float) -> None:
    length = nice_scale_length(width_um)
    x0, y0 = 0.05 * width_um, 0.93 * height_um
    ax.plot([x0, x0 + length], [y0, y0], color="white", lw=4, solid_capstyle="butt")
    ax.plot([x0, x0 + length], [y0, y0], color="black", lw=1.5, solid_capstyle="butt")
    text = f"{length:g} µm" if length >= 1 else f"{1e3 * length:g} nm"
    ax.text(x0 + length / 2, y0 - 0.03 * height_um, text, ha="center", va="bottom",
            fontsize=8, color="black",
            bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 1})


def _maps_of(maps: Mapping[str, np.ndarray], keys: tuple[str, ...]) -> list[np.ndarray]:
    missing = [k for k in keys if k not in maps]
    if missing:
        raise SmartbeamInputError(f"maps without {missing}: expected keys {list(keys)}")
    arrays = [np.asarray(maps[k], dtype=float) for k in keys]
    shape = arrays[0].shape
    if len(shape) != 2 or any(a.shape != shape for a in arrays):
        raise SmartbeamInputError(f"maps of shapes {[a.shape for a in arrays]}: expected "
                                  "2-D (ny, nx) maps of one shape")
    return arrays


def save_moment_maps_png(maps: Mapping[str, np.ndarray], path: str | os.PathLike,
                         pixel_um: float, title: str | None = None) -> str:
    """m_orb, m_spin and their posterior sds as a 2 x 2 PNG; returns the path.

    Parameters
    ----------
    maps
        ``m_orb``, ``m_orb_sd``, ``m_spin``, ``m_spin_sd`` maps (ny, nx), e.g. the ``maps``
        stream row of :func:`smartbeam.plans.stxm_xmcd_stack` or a
        :class:`~smartbeam.analysis.stack.StackMoments` turned into a dict.
    path
        Output PNG file.
    pixel_um
        Pixel size in µm (scale bar).
    title
        Figure title.
    """
    pixel_um = _check_pixel(pixel_um)
    m_orb, m_orb_sd, m_spin, m_spin_sd = _maps_of(
        maps, ("m_orb", "m_orb_sd", "m_spin", "m_spin_sd"))
    fig, axes = _figure(4)
    # Moments change sign between domains: a diverging map centred on zero.
    _map_panel(fig, axes[0], m_orb, pixel_um, "m_orb", "µB / atom", "RdBu_r", symmetric=True)
    _map_panel(fig, axes[1], m_orb_sd, pixel_um, "sd(m_orb)", "µB / atom", "magma")
    _map_panel(fig, axes[2], m_spin, pixel_um, "m_spin", "µB / atom", "RdBu_r", symmetric=True)
    _map_panel(fig, axes[3], m_spin_sd, pixel_um, "sd(m_spin)", "µB / atom", "magma")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    return str(path)


def save_tendq_map_png(maps: Mapping[str, np.ndarray], path: str | os.PathLike,
                       pixel_um: float, title: str | None = None) -> str:
    """10Dq map (rejected pixels grey), its sd and the rejection mask; returns the path.

    Parameters
    ----------
    maps
        ``ten_dq``, ``ten_dq_sd`` and ``described`` (bool/int: 1 = described by the
        library) maps (ny, nx), e.g. from :func:`smartbeam.analysis.stack.tendq_maps`.
    path
        Output PNG file.
    pixel_um
        Pixel size in µm (scale bar).
    title
        Figure title.
    """
    pixel_um = _check_pixel(pixel_um)
    ten_dq, sd, described = _maps_of(maps, ("ten_dq", "ten_dq_sd", "described"))
    rejected = described < 0.5
    fig, axes = _figure(3, ncols=3)
    _map_panel(fig, axes[0], ten_dq, pixel_um, "10Dq (grey: rejected)", "eV", mask=rejected)
    _map_panel(fig, axes[1], sd, pixel_um, "sd(10Dq)", "eV", "magma", mask=rejected)
    from matplotlib.colors import ListedColormap

    two = ListedColormap(["#d62728", "#2ca02c"])
    im = axes[2].imshow(described.astype(float), cmap=two, vmin=0, vmax=1,
                        extent=(0.0, ten_dq.shape[1] * pixel_um, ten_dq.shape[0] * pixel_um,
                                0.0), interpolation="nearest")
    cb = fig.colorbar(im, ax=axes[2], ticks=[0.25, 0.75], fraction=0.046, pad=0.04)
    cb.ax.set_yticklabels(["rejected", "described"])
    _scale_bar(axes[2], ten_dq.shape[1] * pixel_um, ten_dq.shape[0] * pixel_um)
    axes[2].set_title(f"library mask ({int(rejected.sum())} rejected)", fontsize=10)
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    return str(path)


def save_cluster_mds_png(spectra: np.ndarray, shape: tuple[int, int], path: str | os.PathLike,
                         pixel_um: float, *, n_clusters: int = 4,
                         labels: np.ndarray | None = None, measure: str = "pearson",
                         random_state: int = 0, title: str | None = None) -> dict:
    """Cluster all pixel spectra without labels and draw the cluster map beside their MDS map.

    Parameters
    ----------
    spectra
        (n_pixels, n_energy) spectra on one energy grid (e.g. optical density), pixels in
        row-major order of ``shape``.
    shape
        (ny, nx) of the field of view.
    path
        Output PNG file.
    pixel_um
        Pixel size in µm (scale bar).
    n_clusters
        Clusters of :func:`~smartbeam.analysis.stack.cluster_spectra` (ignored when
        ``labels`` are given).
    labels
        Precomputed cluster labels per pixel.
    measure
        Dissimilarity of the MDS map (:func:`smartbeam.analysis.mds.mds_map`).
    random_state
        Seed of the clustering, the pixel subsample and the MDS start.
    title
        Figure title.

    Returns
    -------
    dict
        ``path``, ``labels`` (n_pixels,) and ``mds_pixels`` (indices of the pixels shown
        in the MDS panel: a random subsample of at most ``MDS_MAX_POINTS``, stratified
        by cluster so small regions are shown).
    """
    from ..analysis.mds import mds_map
    from ..analysis.stack import cluster_spectra

    pixel_um = _check_pixel(pixel_um)
    x = np.asarray(spectra, dtype=float)
    ny, nx = (int(v) for v in shape)
    if x.ndim != 2 or x.shape[0] != ny * nx:
        raise SmartbeamInputError(f"spectra of shape {x.shape} for a {ny}x{nx} field: "
                                  f"expected ({ny * nx}, n_energy)")
    lab = (cluster_spectra(x, n_clusters, random_state=random_state) if labels is None
           else np.asarray(labels).ravel())
    if lab.shape != (ny * nx,):
        raise SmartbeamInputError(f"labels of shape {lab.shape}: expected ({ny * nx},)")
    rng = np.random.default_rng(random_state)
    uniq = np.unique(lab)
    per = max(2, MDS_MAX_POINTS // max(len(uniq), 1))
    pick = np.concatenate([rng.permutation(np.flatnonzero(lab == u))[:per] for u in uniq])
    # Shapes, not thickness: centre and normalise as the clustering does.
    sub = x[pick] - x[pick].mean(axis=1, keepdims=True)
    sub /= np.maximum(np.linalg.norm(sub, axis=1, keepdims=True), 1e-12)
    emb = mds_map(sub, lab[pick].astype(float), measure=measure, random_state=random_state)

    import matplotlib

    fig, axes = _figure(2)
    cmap = matplotlib.colormaps["tab10"]
    colours = {u: cmap(i % 10) for i, u in enumerate(uniq)}
    from matplotlib.colors import BoundaryNorm, ListedColormap

    index = np.searchsorted(uniq, lab).reshape(ny, nx)
    listed = ListedColormap([colours[u] for u in uniq])
    norm = BoundaryNorm(np.arange(len(uniq) + 1) - 0.5, len(uniq))
    im = axes[0].imshow(index, cmap=listed, norm=norm, interpolation="nearest",
                        extent=(0.0, nx * pixel_um, ny * pixel_um, 0.0))
    cb = fig.colorbar(im, ax=axes[0], ticks=np.arange(len(uniq)), fraction=0.046, pad=0.04)
    cb.ax.set_yticklabels([f"cluster {u}" for u in uniq])
    _scale_bar(axes[0], nx * pixel_um, ny * pixel_um)
    axes[0].set_title("clusters of pixel spectra", fontsize=10)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    for u in uniq:
        sel = lab[pick] == u
        axes[1].scatter(emb.library_xy[sel, 0], emb.library_xy[sel, 1], s=10,
                        color=colours[u], label=f"cluster {u} ({int(np.sum(lab == u))} px)")
    axes[1].set_xlabel("MDS 1")
    axes[1].set_ylabel("MDS 2")
    axes[1].set_title(f"MDS of {len(pick)} pixel spectra ({measure}, stress {emb.stress:.2g})",
                      fontsize=10)
    axes[1].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    return {"path": str(path), "labels": lab, "mds_pixels": pick}
