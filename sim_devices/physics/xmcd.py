"""Ground-truth XMCD physics of a 3d ferromagnet at the L2,3 edges.

Two kinds of sample:

- ``phenomenological``: arctan edge steps 2:1 (2/3 at L3, 1/3 at L2) plus pseudo-Voigt
  white lines whose dichroic areas are set by chosen m_orb, m_spin and n_h through the
  inverted Chen (1995) sum rules, so the moments are known by construction.
- ``edrixs``: an ionic multiplet spectrum (``edrixs.models.model_1v1c`` with a small
  exchange field on the spin, left/right circular polarisation) on the same steps.

Counting noise is Poisson: I0 counts ``flux * dwell`` and TEY counts ``flux * dwell * mu``,
so mu = tey / i0 has the statistics of a real normalised TEY measurement.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PRESETS", "XMCDSample", "XMCDTruth", "ionic_spectra", "preset"]

KINDS = ("phenomenological", "edrixs")


@dataclass
class XMCDTruth:
    """Parameters of a simulated XMCD sample (everything the twin accepts).

    Energies in eV. ``area_l3``/``area_l2`` are the isotropic white-line areas per
    helicity, in units of edge jump x eV; the dichroic areas follow from ``m_orb``,
    ``m_spin`` and ``n_h`` through the inverted sum rules. ``edge_offset`` shifts the
    whole spectrum (the "unknown" calibration error of the monochromator).
    """

    name: str = "Fe"
    kind: str = "phenomenological"
    element: str = "Fe"
    e_l3: float = 707.8
    e_l2: float = 720.8
    gamma_l3: float = 0.8
    gamma_l2: float = 1.2
    eta: float = 0.6
    step_width: float = 0.6
    edge_jump: float = 1.0
    pre_edge: float = 0.3
    area_l3: float = 6.0
    area_l2: float = 3.0
    m_orb: float = 0.085
    m_spin: float = 1.98
    n_h: float = 3.39
    edge_offset: float = 0.0
    window: tuple[float, float] = (695.0, 735.0)
    flux: float = 3.0e6
    tfy_efficiency: float = 0.05
    # edrixs-only parameters
    v_noccu: int = 6
    exchange_field: float = 0.02
    temperature: float = 10.0
    slater_scale: float = 0.8
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: expected one of {KINDS}")
        self.window = (float(self.window[0]), float(self.window[1]))
        if not self.window[0] < self.window[1]:
            raise ValueError(f"window={self.window!r}: expected (low, high) with low < high")
        if self.n_h <= 0:
            raise ValueError(f"n_h={self.n_h!r}: expected a positive number of holes")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        d = dataclasses.asdict(self)
        d["window"] = list(self.window)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> XMCDTruth:
        """Build from a dict; a ``preset`` key starts from that preset's values."""
        data = dict(data)
        base = PRESETS[data.pop("preset")].to_dict() if "preset" in data else {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown XMCD truth parameters {sorted(unknown)}; "
                             f"expected a subset of {sorted(names)}")
        base.update(data)
        base["window"] = tuple(base.get("window", cls.window))
        return cls(**base)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> XMCDTruth:
        """Load a truth file (JSON object of the fields, optionally with ``preset``)."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def shifted(self, offset: float) -> XMCDTruth:
        """A copy with ``edge_offset`` set to ``offset`` and the name tagged."""
        return dataclasses.replace(self, edge_offset=float(offset),
                                   name=f"{self.name}{offset:+.1f}eV" if offset else self.name)


PRESETS: dict[str, XMCDTruth] = {
    # Chen 1995 moments and n_h (REFERENCE.md); Fe white lines 707.8 / 720.8 eV.
    "Fe": XMCDTruth(),
    "Co": XMCDTruth(name="Co", element="Co", e_l3=778.1, e_l2=793.2, gamma_l3=0.9,
                    gamma_l2=1.3, area_l3=5.0, area_l2=2.6, m_orb=0.153, m_spin=1.55,
                    n_h=2.49, window=(765.0, 810.0)),
    # Fe2+ ion (d6), edrixs multiplets; edge energies from edrixs' atomic table.
    "Fe2+_edrixs": XMCDTruth(name="Fe2+_edrixs", kind="edrixs", element="Fe", e_l3=706.8,
                             e_l2=719.9, n_h=4.0, v_noccu=6, window=(695.0, 735.0),
                             m_orb=float("nan"), m_spin=float("nan")),
}


def preset(name: str) -> XMCDTruth:
    """Return a copy of a preset truth ("Fe", "Co", "Fe2+_edrixs")."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r}: expected one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def _pseudo_voigt(x: np.ndarray, hwhm: float, eta: float) -> np.ndarray:
    """Unit-area pseudo-Voigt with half width ``hwhm``."""
    lor = hwhm / np.pi / (x**2 + hwhm**2)
    sig = hwhm / np.sqrt(2 * np.log(2))
    gau = np.exp(-0.5 * (x / sig) ** 2) / (sig * np.sqrt(2 * np.pi))
    return eta * lor + (1 - eta) * gau


def _arctan_step(x: np.ndarray, width: float) -> np.ndarray:
    return 0.5 + np.arctan(x / width) / np.pi


def _cache_dir() -> Path:
    try:
        import platformdirs

        root = Path(platformdirs.user_cache_dir("smartbeam"))
    except ImportError:  # pragma: no cover - platformdirs is a declared dependency
        root = Path.home() / ".cache" / "smartbeam"
    return root / "edrixs_xmcd"


@functools.lru_cache(maxsize=16)
def ionic_spectra(element: str, v_noccu: int, exchange_field: float, temperature: float,
                  slater_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Left/right circularly polarised L2,3 XAS of a 3d ion computed with edrixs.

    Cached in memory and as an ``.npz`` in the user cache directory, because one
    calculation takes ~10 s (numba compilation + diagonalisation).

    Returns
    -------
    rel_energy, mu_left, mu_right, l3_peak, l2_peak
        Spectra on a relative energy grid (eV), area-normalised so that the isotropic
        white-line area is 1; peak positions of L3 and L2 on that grid.
    """
    key = json.dumps([element, v_noccu, exchange_field, temperature, slater_scale])
    path = _cache_dir() / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"
    if path.exists():
        z = np.load(path)
        return (z["e"], z["left"], z["right"], float(z["l3"]), float(z["l2"]))
    import edrixs
    from edrixs import models, solvers

    info = edrixs.utils.get_atom_data(element, "3d", v_noccu, edge="L23")
    slater_i = [s[1] * slater_scale for s in info["slater_i"]]
    slater_n = [s[1] * slater_scale for s in info["slater_n"]]
    out = models.model_1v1c(("d", "p"), v_soc=(info["v_soc_i"][0], info["v_soc_n"][0]),
                            c_soc=info["c_soc"], v_noccu=v_noccu, slater=(slater_i, slater_n),
                            ext_B=(0.0, 0.0, exchange_field), on_which="spin")
    hmat_i, hmat_n, trans = solvers.get_ops(*out[:7], backend="dense")
    evals, evecs = solvers.ed(hmat_i, 20, shift=out[7], backend="dense")
    # Core-hole widths from edrixs' table: L2 (Coster-Kronig) is broader than L3.
    gamma_l2, gamma_l3 = info["gamma_c"]
    coarse = np.linspace(-30.0, 30.0, 601)
    spec = solvers.xas(evals, evecs, hmat_n, trans, coarse, gamma_c=gamma_l3,
                       pol_type=[("left", 0.0), ("right", 0.0)], thin=np.pi / 2,
                       temperature=temperature)
    iso = spec.sum(axis=1)
    l3_rel = coarse[np.argmax(iso)]
    rel = np.linspace(l3_rel - 15.0, l3_rel + 30.0, 901)
    edge_gap = info["edge_ene"][0] - info["edge_ene"][1]
    gamma = np.where(rel < l3_rel + 0.5 * edge_gap, gamma_l3, gamma_l2)
    spec = solvers.xas(evals, evecs, hmat_n, trans, rel, gamma_c=gamma,
                       pol_type=[("left", 0.0), ("right", 0.0)], thin=np.pi / 2,
                       temperature=temperature)
    rel = rel - l3_rel
    area = np.trapezoid(spec.sum(axis=1) / 2, rel)
    left, right = spec[:, 0] / area, spec[:, 1] / area
    iso = left + right
    l2_mask = rel > 0.5 * edge_gap
    l2 = float(rel[l2_mask][np.argmax(iso[l2_mask])])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.npz")
    np.savez(tmp, e=rel, left=left, right=right, l3=0.0, l2=l2)
    os.replace(tmp, path)
    return rel, left, right, 0.0, l2


class XMCDSample:
    """A magnetic sample whose L2,3 absorption depends on photon helicity.

    Parameters
    ----------
    truth
        The sample parameters.
    """

    def __init__(self, truth: XMCDTruth) -> None:
        self.truth = truth
        t = truth
        if t.kind == "phenomenological":
            # Inverted Chen sum rules: q = int(L3+L2) d, p = int(L3) d, r = int(s - steps).
            r = 2.0 * (t.area_l3 + t.area_l2)
            q = -3.0 * r * t.m_orb / (4.0 * t.n_h)
            p = (4.0 * q - t.m_spin * r / t.n_h) / 6.0
            self._dichroic = (p, q - p)
        else:
            rel, left, right, _, l2 = ionic_spectra(t.element, int(t.v_noccu),
                                                    float(t.exchange_field),
                                                    float(t.temperature),
                                                    float(t.slater_scale))
            self._ionic = (rel, left, right)
            scale = t.area_l3 + t.area_l2
            self._ionic_scale = scale
            # The step sits under the white lines, as in the phenomenological model.
            self._ionic_l2 = l2

    # -- noiseless spectra ---------------------------------------------------------
    def _edges(self) -> tuple[float, float]:
        t = self.truth
        if t.kind == "edrixs":
            return t.e_l3 + t.edge_offset, t.e_l3 + self._ionic_l2 + t.edge_offset
        return t.e_l3 + t.edge_offset, t.e_l2 + t.edge_offset

    def background(self, energy: np.ndarray) -> np.ndarray:
        """Pre-edge level plus the 2:1 arctan edge steps (same for both helicities)."""
        t = self.truth
        e = np.asarray(energy, dtype=float)
        e3, e2 = self._edges()
        steps = (2.0 / 3.0) * _arctan_step(e - e3, t.step_width) + (1.0 / 3.0) * _arctan_step(
            e - e2, t.step_width)
        return t.pre_edge + t.edge_jump * steps

    def mu(self, energy: np.ndarray | float, helicity: int | np.ndarray = 0) -> np.ndarray:
        """Noiseless absorption; vectorised over ``energy`` (and ``helicity``).

        Parameters
        ----------
        energy
            Photon energies (eV).
        helicity
            +1 (circ+), -1 (circ-) or 0 (linear: the isotropic average).
        """
        t = self.truth
        e = np.asarray(energy, dtype=float)
        h = np.asarray(helicity, dtype=float)
        if np.any(~np.isin(h, (-1.0, 0.0, 1.0))):
            raise ValueError(f"helicity={helicity!r}: expected +1, -1 or 0")
        e3, e2 = self._edges()
        base = self.background(e)
        if t.kind == "phenomenological":
            p3 = _pseudo_voigt(e - e3, t.gamma_l3, t.eta)
            p2 = _pseudo_voigt(e - e2, t.gamma_l2, t.eta)
            d3, d2 = self._dichroic
            white = (t.area_l3 + 0.5 * h * d3) * p3 + (t.area_l2 + 0.5 * h * d2) * p2
        else:
            rel, left, right = self._ionic
            x = e - e3
            # edrixs "left" is taken as circ+ (parallel photon spin and majority moment).
            lp = np.interp(x, rel, left, left=0.0, right=0.0)
            rp = np.interp(x, rel, right, left=0.0, right=0.0)
            white = self._ionic_scale * (0.5 * (lp + rp) + 0.5 * h * (lp - rp))
        return base + t.edge_jump * white

    # -- counting ---------------------------------------------------------------------
    def measure(self, energy: np.ndarray | float, helicity: int, dwell: float,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Poisson counts of I0, TEY and TFY for ``dwell`` seconds.

        TEY counts have mean ``flux * dwell * mu`` so that ``tey / i0`` estimates mu;
        TFY is self-absorption saturated and weaker.
        """
        if not dwell > 0:
            raise ValueError(f"dwell={dwell!r}: expected a positive time in seconds")
        t = self.truth
        mu = self.mu(energy, helicity)
        n0 = t.flux * dwell
        i0 = rng.poisson(np.full_like(mu, n0))
        tey = rng.poisson(n0 * mu)
        tfy = rng.poisson(n0 * t.tfy_efficiency * mu / (1.0 + 0.3 * mu))
        return {"i0": i0, "tey": tey, "tfy": tfy}

    def noise_sd(self, energy: np.ndarray | float, helicity: int, dwell: float) -> np.ndarray:
        """Standard deviation of ``tey / i0`` for one point (delta method)."""
        mu = self.mu(energy, helicity)
        n0 = self.truth.flux * dwell
        return mu * np.sqrt(1.0 / (n0 * mu) + 1.0 / n0)

    def dense_grid(self, n: int = 201) -> np.ndarray:
        """The reference grid: ``n`` points over the truth's scan window."""
        return np.linspace(*self.truth.window, n)

    def true_moments(self, n: int = 201) -> dict[str, float]:
        """Moments from the noiseless sum-rule analysis of a dense ``n``-point scan.

        Returns ``m_orb``, ``m_spin``, ``ratio`` (the reference every scan is judged
        against), plus ``m_orb_param``/``m_spin_param``: the values the spectra were
        built from (NaN for ionic spectra).
        """
        from smartbeam.analysis.sumrules import sum_rules

        e = self.dense_grid(n)
        res = sum_rules(e, self.mu(e, +1), self.mu(e, -1), n_h=self.truth.n_h)
        return {"m_orb": res.m_orb, "m_spin": res.m_spin, "ratio": res.ratio,
                "m_orb_param": float(self.truth.m_orb), "m_spin_param": float(self.truth.m_spin),
                "e_l3": res.e_l3, "e_l2": res.e_l2}
