"""Isotropic L2,3 XAS of an ion in an octahedral crystal field, computed with edrixs.

The twin of a non-magnetic sample for 10Dq estimation: the multiplet spectrum of the
chosen ion and 10Dq (from the shipped library when 10Dq is on its grid, else computed
with the same edrixs fast path) on top of an arctan edge step (2:1), with an optional
unknown energy offset. No dichroism: both helicities and linear give the same mu.
Counting noise is Poisson in I0 and TEY, as for the XMCD sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LibraryXASSample"]


@dataclass
class LibraryXASSample:
    """XAS twin sample of an ion at a given 10Dq.

    Parameters
    ----------
    ion
        Ion of the library, e.g. ``"Mn2+"``.
    ten_dq
        Crystal-field splitting in eV (the ground truth the estimators must find).
    edge_offset
        Energy offset of the whole spectrum (monochromator calibration error), eV.
    white_line_scale
        Height of the strongest white line above the edge step (edge jump = 1).
    pre_edge
        Absorption below the edge.
    flux
        Photons per second in I0.
    """

    ion: str = "Mn2+"
    ten_dq: float = 0.9
    edge_offset: float = 0.0
    white_line_scale: float = 4.0
    pre_edge: float = 0.3
    flux: float = 3.0e6

    def __post_init__(self) -> None:
        from smartbeam.analysis.library import LibraryParams
        from smartbeam.library_store import get_library, load_packaged_library

        packaged = load_packaged_library()
        on_grid = np.isclose(packaged.ten_dq, self.ten_dq, atol=1e-9)
        if self.ion == packaged.params.ion and on_grid.any():
            energy, spectrum = packaged.energy, packaged.spectra[np.argmax(on_grid)]
        else:
            params = LibraryParams(ion=self.ion, ten_dq_min=self.ten_dq, ten_dq_max=self.ten_dq)
            lib = get_library(params, progress=False)
            energy, spectrum = lib.energy, lib.spectra[0]
        self._energy = np.asarray(energy, dtype=float)
        self._white = np.asarray(spectrum, dtype=float) / np.max(spectrum)
        # Edge steps under the two white lines: 2/3 at L3, 1/3 at L2 (statistical ratio).
        centre = 0.5 * (self._energy[0] + self._energy[-1])
        l3_region = self._energy < centre
        self.e_l3 = float(self._energy[l3_region][np.argmax(self._white[l3_region])])
        self.e_l2 = float(self._energy[~l3_region][np.argmax(self._white[~l3_region])])

    @property
    def window(self) -> tuple[float, float]:
        """Energy range (eV) of the computed spectrum, shifted by the offset."""
        return (self._energy[0] + self.edge_offset, self._energy[-1] + self.edge_offset)

    def mu(self, energy: np.ndarray | float, helicity: int | np.ndarray = 0) -> np.ndarray:
        """Noiseless absorption; the helicity does not matter (no magnetic order)."""
        e = np.asarray(energy, dtype=float) - self.edge_offset
        step = (2.0 / 3.0) * (0.5 + np.arctan((e - self.e_l3) / 0.5) / np.pi) + \
               (1.0 / 3.0) * (0.5 + np.arctan((e - self.e_l2) / 0.5) / np.pi)
        white = np.interp(e, self._energy, self._white, left=0.0, right=0.0)
        return self.pre_edge + step + self.white_line_scale * white

    def measure(self, energy: np.ndarray | float, helicity: int, dwell: float,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Poisson counts of I0, TEY and TFY for ``dwell`` seconds (``tey / i0`` ≈ mu)."""
        if not dwell > 0:
            raise ValueError(f"dwell={dwell!r}: expected a positive time in seconds")
        mu = self.mu(energy, helicity)
        n0 = self.flux * dwell
        return {"i0": rng.poisson(np.full_like(mu, n0)), "tey": rng.poisson(n0 * mu),
                "tfy": rng.poisson(n0 * 0.05 * mu / (1.0 + 0.3 * mu))}
