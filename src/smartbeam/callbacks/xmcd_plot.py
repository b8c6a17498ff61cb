"""Live plot of an adaptive XMCD scan: GP mean +- 2 sd of mu+, mu- and the XMCD, the
measured points, and m_orb +- sd against the number of points. PNG saved at the end.

The callback refits its own :class:`smartbeam.analysis.gp.XMCDGP` from the ``primary``
readings (the plan's model is not shared across the document boundary) and reads the
plan's ``decisions`` stream for the m_orb history. Without a display it draws on an Agg
canvas; plotting errors are logged and never reach the RunEngine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from event_model import DocumentRouter

from ..analysis.gp import XMCDGP

__all__ = ["XMCDLivePlot"]

logger = logging.getLogger(__name__)


class XMCDLivePlot(DocumentRouter):
    """Document callback drawing the GP view of an XMCD scan.

    Parameters
    ----------
    energy_key, i0_key, tey_key, pol_key
        Reading keys of the energy readback, I0, TEY and the polarisation mode (take them
        from the device: ``endstation.tey.name``; see :meth:`for_endstation`).
    png_path
        Where to save the final figure (default: ``xmcd_<uid8>.png`` in the current dir).
    update_every
        Redraw after this many new energy points.
    n_h
        Number of 3d holes when the start document does not carry it in ``plan_args``.
    """

    def __init__(self, energy_key: str, i0_key: str, tey_key: str, pol_key: str, *,
                 png_path: str | os.PathLike | None = None, update_every: int = 4,
                 n_h: float = 3.39) -> None:
        super().__init__()
        self.keys = dict(energy=energy_key, i0=i0_key, tey=tey_key, pol=pol_key)
        self.png_path = png_path
        self.update_every = max(1, int(update_every))
        self.default_n_h = n_h
        self.saved_path: Path | None = None
        self.errors: list[str] = []
        self._reset()

    @classmethod
    def for_endstation(cls, endstation, **kwargs) -> XMCDLivePlot:
        """Build with the reading keys of an XMCD end station's components."""
        return cls(endstation.energy.readback.name, endstation.i0.name, endstation.tey.name,
                   endstation.pol.mode.name, **kwargs)

    def _reset(self) -> None:
        self._streams: dict[str, str] = {}
        self._pending: dict[float, dict] = {}
        self.points: list[tuple[float, float, float, float, float]] = []
        self.history: list[tuple[int, float, float]] = []
        self._drawn_at = 0
        self._start: dict = {}
        self.model: XMCDGP | None = None
        self.figure = None

    # -- documents -----------------------------------------------------------------
    def __call__(self, name: str, doc: dict, validate: bool = False):
        try:
            return super().__call__(name, doc, validate=validate)
        except Exception as exc:  # a plot never kills a scan
            logger.exception("XMCDLivePlot failed on %s", name)
            self.errors.append(f"{name}: {exc!r}")
            return name, doc

    def start(self, doc):
        self._reset()
        self._start = doc
        return doc

    def descriptor(self, doc):
        self._streams[doc["uid"]] = doc.get("name", "primary")
        return doc

    def event(self, doc):
        stream = self._streams.get(doc["descriptor"])
        data = doc["data"]
        if stream == "primary":
            self._add_reading(data)
        elif stream == "decisions":
            n = data.get("decision_n_points")
            if n is not None:
                self.history.append((int(n), float(data["decision_m_orb"]),
                                     float(data["decision_m_orb_sd"])))
        return doc

    def stop(self, doc):
        if len(self.points) >= 4:
            self.redraw()
        if self.figure is not None:
            uid = self._start.get("uid", "run")[:8]
            path = Path(self.png_path or f"xmcd_{uid}.png")
            path.parent.mkdir(parents=True, exist_ok=True)
            self.figure.savefig(path, dpi=100)
            self.saved_path = path
        return doc

    def _add_reading(self, data: dict) -> None:
        k = self.keys
        if not all(key in data for key in k.values()):
            return
        e, i0, tey = float(data[k["energy"]]), float(data[k["i0"]]), float(data[k["tey"]])
        mode = data[k["pol"]]
        if mode not in ("circ+", "circ-") or not (np.isfinite(i0) and np.isfinite(tey)) or i0 <= 0:
            return
        mu = tey / i0
        var = mu**2 * (1.0 / max(tey, 1.0) + 1.0 / i0)
        key = round(e, 6)
        slot = self._pending.setdefault(key, {})
        slot[mode] = (mu, var)
        if len(slot) == 2:
            (mp, vp), (mm, vm) = slot["circ+"], slot["circ-"]
            self.points.append((e, mp, mm, vp, vm))
            del self._pending[key]
            if len(self.points) - self._drawn_at >= self.update_every and len(self.points) >= 8:
                self.redraw()

    # -- drawing -------------------------------------------------------------------
    def _fit(self) -> None:
        args = self._start.get("plan_args", {})
        pts = np.array(self.points)
        e_min = float(args.get("e_min", pts[:, 0].min()))
        e_max = float(args.get("e_max", pts[:, 0].max()))
        edges = args.get("edges")
        self.model = XMCDGP(e_min, e_max, float(args.get("n_h", self.default_n_h)),
                            edges=tuple(edges) if edges else None)
        self.model.fit(pts[:, 0], pts[:, 1], pts[:, 2], pts[:, 3], pts[:, 4])

    def _new_figure(self):
        if os.environ.get("DISPLAY") or os.environ.get("MPLBACKEND"):
            import matplotlib.pyplot as plt

            return plt.figure(figsize=(9, 7))
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9, 7))
        FigureCanvasAgg(fig)
        return fig

    def redraw(self) -> None:
        """Refit the GP on all points and redraw the three panels."""
        self._drawn_at = len(self.points)
        self._fit()
        if self.figure is None:
            self.figure = self._new_figure()
        fig = self.figure
        fig.clf()
        ax1, ax2, ax3 = fig.subplots(3, 1)
        pred = self.model.predict()
        e = pred["energy"]
        pts = np.array(self.points)
        for mean, label, color, col in ((pred["mu_plus"], "mu+", "C0", 1),
                                        (pred["mu_minus"], "mu-", "C3", 2)):
            ax1.plot(e, mean, color=color, label=label)
            ax1.fill_between(e, mean - 2 * pred["mu_sd"], mean + 2 * pred["mu_sd"],
                             color=color, alpha=0.2)
            ax1.plot(pts[:, 0], pts[:, col], ".", color=color, ms=3)
        ax1.set_ylabel("mu (TEY/I0)")
        ax1.legend(loc="upper right")
        ax2.plot(e, pred["xmcd"], color="k", label="mu+ - mu-")
        ax2.fill_between(e, pred["xmcd"] - 2 * pred["xmcd_sd"],
                         pred["xmcd"] + 2 * pred["xmcd_sd"], color="k", alpha=0.2)
        ax2.plot(pts[:, 0], pts[:, 1] - pts[:, 2], ".", color="k", ms=3)
        ax2.set_xlabel("energy (eV)")
        ax2.set_ylabel("XMCD")
        if self.history:
            h = np.array(self.history)
            ok = np.isfinite(h[:, 1])
            ax3.errorbar(h[ok, 0], h[ok, 1], yerr=h[ok, 2], fmt="o-", ms=3)
            late = h[ok][len(h[ok]) // 3:]
            if len(late) >= 3:
                # The first decisions are far off; scale to the converging part.
                lo = np.min(late[:, 1] - 2 * late[:, 2])
                hi = np.max(late[:, 1] + 2 * late[:, 2])
                if np.isfinite(lo) and np.isfinite(hi) and hi > lo:
                    ax3.set_ylim(lo, hi)
        else:
            m = self.model.moments()
            ax3.errorbar([len(self.points)], [m["m_orb"]], yerr=[m["m_orb_sd"]], fmt="o")
        ax3.set_xlabel("number of energy points")
        ax3.set_ylabel("m_orb (mu_B)")
        fig.tight_layout()
        if fig.canvas is not None and hasattr(fig.canvas, "draw_idle"):
            fig.canvas.draw_idle()
