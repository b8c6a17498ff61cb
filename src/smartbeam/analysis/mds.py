"""Multidimensional scaling (MDS) map of a library with measured spectra placed on it.

The dissimilarities are those of :mod:`smartbeam.analysis.similarity` (any measure); the
embedding is scikit-learn's metric MDS on the precomputed matrix of library + measured
spectra together, so measured spectra sit among the library entries they resemble.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.manifold import MDS

from ..errors import SmartbeamInputError
from .similarity import MEASURES, dissimilarity

__all__ = ["MDSMap", "mds_map"]


@dataclass
class MDSMap:
    """2-D coordinates of library entries and measured spectra.

    Attributes
    ----------
    library_xy
        (n_entries, 2) coordinates of the library entries.
    measured_xy
        (n_measured, 2) coordinates of the measured spectra.
    ten_dq
        (n_entries,) 10Dq of the entries (for colouring).
    measure
        The dissimilarity used.
    stress
        Final stress of the embedding.
    """

    library_xy: np.ndarray
    measured_xy: np.ndarray
    ten_dq: np.ndarray
    measure: str
    stress: float


def mds_map(library_spectra: np.ndarray, ten_dq: np.ndarray, measured: np.ndarray | None = None,
            *, measure: str = "pearson", step: float = 1.0, random_state: int = 0) -> MDSMap:
    """Embed library (and measured) spectra, all on one energy grid, in 2-D.

    Parameters
    ----------
    library_spectra
        (n_entries, n_energy).
    ten_dq
        (n_entries,) 10Dq values.
    measured
        (n_measured, n_energy) spectra already aligned on the library grid, or ``None``.
    measure
        Any of :data:`~smartbeam.analysis.similarity.MEASURES`.
    step
        Energy step (for EMD).
    random_state
        Seed of the MDS initialisation (reproducible maps).
    """
    if measure not in MEASURES:
        raise SmartbeamInputError(f"measure {measure!r} unknown: expected one of {MEASURES}")
    lib = np.atleast_2d(np.asarray(library_spectra, dtype=float))
    meas = np.zeros((0, lib.shape[1])) if measured is None else np.atleast_2d(
        np.asarray(measured, dtype=float))
    both = np.vstack([lib, meas])
    d = dissimilarity(both, both, measure, step=step)
    d = 0.5 * (d + d.T)  # exact symmetry for sklearn
    np.fill_diagonal(d, 0.0)
    d = np.clip(d, 0.0, None)
    # Classical-MDS start: deterministic and avoids poor random local minima.
    mds = MDS(n_components=2, metric="precomputed", init="classical_mds", n_init=1,
              random_state=random_state, normalized_stress="auto")
    xy = mds.fit_transform(d)
    n = len(lib)
    return MDSMap(library_xy=xy[:n], measured_xy=xy[n:], ten_dq=np.asarray(ten_dq, float),
                  measure=measure, stress=float(mds.stress_))
