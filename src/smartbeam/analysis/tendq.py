"""Estimate the crystal-field splitting 10Dq of a measured L2,3 spectrum from a library.

For each similarity measure the estimator searches jointly over the library entries and
an unknown energy offset (the measured spectrum is resampled once onto a grid extended by
the offset range; every candidate offset is then a sliding window, so the search is one
matrix product per measure), refines the minimum between grid points with a quadratic
fit that never crosses a spin crossover, and combines the measures into a consensus.

A high similarity alone does not prove the library describes the spectrum (a Mn3+/4+
EELS spectrum reaches Pearson r = 0.988 against Mn2+). The rejection asks whether *any*
library spectrum describes the data: a second, local search around the best offset
(+-0.5 eV) runs over every entry at extra resolutions up to 4 eV (so a coarse EELS
resolution is not mistaken for a wrong ion, and the answer does not depend on how wide
the offset search was), and the best match is scored on the raw data points by two
fractions of unexplained signal, both beyond the noise:

- shape: ``max(SSR/n - s^2, 0) / max(var(y) - s^2, tiny)`` for ``a*model + b``;
- L3/L2 structure (branching ratio): with the model scaled to the measured L3 line, the
  fraction of the measured L2 line intensity it misses, beyond two noise standard
  deviations of the areas (the branching ratio is the classic valence fingerprint of a
  3d ion, and the L3-dominated shape fraction is nearly blind to it).

The score is the larger of the two, with ``s`` the noise estimated from second
differences. Its threshold is calibrated on simulated in-library spectra
(:func:`calibrate_threshold`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.fft
from numpy.lib.stride_tricks import sliding_window_view
from scipy.ndimage import gaussian_filter1d

from ..errors import SmartbeamInputError
from .library import SpectrumLibrary
from .similarity import (
    LIVE_MEASURES,
    MEASURES,
    dissimilarity,
    prepare,
    remove_background,
    similarity_from_dissimilarity,
)

__all__ = [
    "CONSENSUS_MEASURES",
    "DEFAULT_EXTRA_FWHM",
    "DEFAULT_STEP_SHIFTS",
    "LINEAR_MEASURES",
    "MAP_MEASURES",
    "REJECTION_EXTRA_FWHM",
    "TenDqResult",
    "TenDqFitter",
    "calibrate_threshold",
    "rejection_score",
    "branching_score",
    "noise_sigma",
    "validate_spectrum",
]

#: Measures whose median is the consensus (EMD collapses under noise, DTW is slow).
CONSENSUS_MEASURES = ("euclidean", "cosine", "pearson", "jsd")
#: Measures a low-rank stack evaluates from its pixels' coefficients alone (linear in the
#: spectrum up to one norm or area per window): the fast map mode of
#: :func:`~smartbeam.analysis.stack.tendq_maps`.
LINEAR_MEASURES = ("euclidean", "cosine", "pearson")
#: Measures of a 10Dq map by default (:func:`~smartbeam.analysis.stack.tendq_maps`,
#: ``smartbeam reprocess``): the linear ones. On the bench's multi-region field their map
#: has the same described/rejected decisions as the all-measures map, 10Dq within a few
#: meV RMS of it, at several times its speed (README, "STXM").
MAP_MEASURES = "linear"
#: Extra Gaussian FWHM (eV) of the library searched by default (resolution robustness).
DEFAULT_EXTRA_FWHM = (0.0, 0.3, 0.5, 0.7)
#: Edge-step positions (eV from the white-line maxima) tried by default.
DEFAULT_STEP_SHIFTS = (-1.0, -0.5, 0.0)
#: Extra Gaussian FWHM (eV) searched by the rejection stage (up to a coarse EELS resolution).
REJECTION_EXTRA_FWHM = (0.0, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
# Largest error of a unit library row in the truncated SVD basis of the Pearson search.
_SVD_ROW_TOL = 1e-6
# Half width (eV) of the local offset search of the rejection stage.
_REJECTION_OFFSET_HALF = 0.5
# Spectra that count for the offset shared by a stack: best Pearson r at least this, and at
# least this many of them (else every spectrum is searched over the whole range).
_SHARED_OFFSET_MIN_R = 0.8
_SHARED_OFFSET_MIN_SPECTRA = 3
# Too slow for the full offset search: evaluated at Pearson's best window only.
_AT_BEST_WINDOW = ("dtw",)
# Distances that grow like |x| near the minimum are squared before the quadratic fit.
_SQUARE_FOR_FIT = {"euclidean", "jsd", "cityblock", "emd", "dtw"}


@dataclass
class TenDqResult:
    """Outcome of one estimate.

    Attributes
    ----------
    described
        ``False`` when the library does not describe the spectrum (then no 10Dq).
    ten_dq, sd, offset
        Estimate, its standard uncertainty and the energy offset (measured - library), eV.
    measure
        ``"consensus"`` or the single measure used.
    similarity
        Similarity of the best match (Pearson r, cosine similarity, or distance).
    per_measure, per_measure_offset
        Estimates of each measure (``None`` when not computed).
    flags
        Warnings: ``not_described``, ``library_edge_low``, ``library_edge_high``,
        ``near_spin_crossover``, ``offset_at_search_limit``, ``measures_disagree``.
    score, threshold
        Rejection score and the calibrated threshold it was compared with.
    library_id
        Identifier of the library used.
    """

    described: bool
    ten_dq: float | None
    sd: float | None
    offset: float | None
    measure: str
    similarity: float
    per_measure: dict[str, float | None]
    per_measure_offset: dict[str, float | None]
    flags: list[str]
    score: float
    threshold: float
    library_id: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, file: str | None = None) -> dict[str, Any]:
        """The JSON object of ``smartbeam estimate --json``."""
        out: dict[str, Any] = {} if file is None else {"file": file}
        out.update({
            "described": bool(self.described),
            "ten_dq_eV": _f(self.ten_dq), "sd_eV": _f(self.sd), "offset_eV": _f(self.offset),
            "measure": self.measure, "per_measure": {k: _f(v) for k, v in self.per_measure.items()},
            "flags": list(self.flags), "score": _f(self.score),
            "similarity": _f(self.similarity), "threshold": _f(self.threshold),
            "library_id": self.library_id,
        })
        return out


def _f(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def validate_spectrum(energy: np.ndarray, intensity: np.ndarray,
                      need: tuple[float, float] | None = None, name: str = "spectrum"
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Check a measured spectrum and return it as float arrays.

    Raises :class:`SmartbeamInputError` for empty input, mismatched lengths, NaN/inf,
    non-increasing energy, or an energy range that does not cover ``need`` (eV).
    """
    e = np.asarray(energy, dtype=float).ravel()
    y = np.asarray(intensity, dtype=float).ravel()
    if e.size == 0:
        raise SmartbeamInputError(f"{name}: no data points; expected an energy/intensity pair")
    if e.size != y.size:
        raise SmartbeamInputError(f"{name}: {e.size} energies but {y.size} intensities; "
                                  "expected equal lengths")
    if e.size < 10:
        raise SmartbeamInputError(f"{name}: {e.size} points; expected at least 10")
    bad = ~(np.isfinite(e) & np.isfinite(y))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SmartbeamInputError(f"{name}: non-finite value at point {i} "
                                  f"(energy={e[i]!r}, intensity={y[i]!r}); expected numbers")
    d = np.diff(e)
    if np.any(d <= 0):
        i = int(np.flatnonzero(d <= 0)[0])
        raise SmartbeamInputError(f"{name}: energy not strictly increasing at point {i + 1} "
                                  f"({e[i]!r} then {e[i + 1]!r}); expected increasing energies")
    if need is not None and (e[0] > need[0] or e[-1] < need[1]):
        raise SmartbeamInputError(
            f"{name}: energy range {e[0]:.2f}-{e[-1]:.2f} eV misses the edge: expected it to "
            f"cover {need[0]:.2f}-{need[1]:.2f} eV")
    return e, y


def noise_sigma(y: np.ndarray) -> float:
    """Robust white-noise estimate from second differences (MAD; d = y_i - (y_-1+y_+1)/2)."""
    y = np.asarray(y, dtype=float)
    if y.size < 5:
        return 0.0
    d = y[1:-1] - 0.5 * (y[:-2] + y[2:])
    # var(d) = 1.5 sigma^2 for white noise; MAD/0.6745 is a robust std.
    return float(np.median(np.abs(d - np.median(d))) / 0.6745 / math.sqrt(1.5))


def rejection_score(y: np.ndarray, model: np.ndarray, sigma: float) -> float:
    """Fraction of the signal variance that ``a*model + b`` leaves unexplained beyond noise."""
    y = np.asarray(y, dtype=float)
    m = np.asarray(model, dtype=float)
    a_mat = np.column_stack([m, np.ones_like(m)])
    coef, *_ = np.linalg.lstsq(a_mat, y, rcond=None)
    ssr = float(np.mean((y - a_mat @ coef) ** 2))
    var = float(np.var(y))
    signal = var - sigma ** 2
    if coef[0] <= 0:  # anti-correlated: certainly not this library
        return float("inf")
    if signal < 0.5 * sigma ** 2:  # no signal above the noise: nothing to describe
        return float("inf")
    return max(ssr - sigma ** 2, 0.0) / max(signal, 1e-12 * max(var, 1e-300))


def branching_score(y: np.ndarray, model: np.ndarray, l3: np.ndarray, sigma: float) -> float:
    """Fraction of the measured L2 line that the model, scaled to the L3 line, misses.

    Both ``y`` and ``model`` must be baseline-free (edge steps removed). With ``A3``,
    ``A2`` the measured line areas and ``rho`` the model's L2/L3 area ratio, the miss is
    ``|A2 - rho A3|`` less two noise standard deviations ``2 s sqrt(n2 + rho^2 n3)``,
    divided by ``A2``. A wrong L3/L2 branching ratio (another valence or spin state)
    shows here even when the L3-dominated shape misfit is small.

    Parameters
    ----------
    y, model
        Measured and model intensities on the same points.
    l3
        Boolean mask of the points belonging to the L3 line (the rest is L2).
    sigma
        White-noise standard deviation of ``y``.

    Returns
    -------
    float
        >= 0; ``inf`` when a line has no positive area.
    """
    y = np.asarray(y, dtype=float)
    m = np.asarray(model, dtype=float)
    l3 = np.asarray(l3, dtype=bool)
    a3, a2 = float(y[l3].sum()), float(y[~l3].sum())
    m3, m2 = float(m[l3].sum()), float(m[~l3].sum())
    if min(a3, a2, m3, m2) <= 0:
        return float("inf")
    rho = m2 / m3
    noise = 2.0 * sigma * math.sqrt((~l3).sum() + rho ** 2 * l3.sum())
    return max(abs(a2 - rho * a3) - noise, 0.0) / a2


def calibrate_threshold(in_library_scores: np.ndarray, quantile: float = 0.99) -> float:
    """Threshold accepting the ``quantile`` fraction of simulated in-library spectra."""
    s = np.asarray(in_library_scores, dtype=float)
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise SmartbeamInputError("no finite in-library scores: expected calibration spectra")
    return float(np.quantile(s, quantile))


def _quad_refine(vals: np.ndarray) -> float:
    """Vertex offset (in cells, clipped to +-1) of the parabola through 3 values."""
    y0, y1, y2 = vals
    den = y0 - 2 * y1 + y2
    if not np.isfinite(den) or den <= 0:
        return 0.0
    return float(np.clip(0.5 * (y0 - y2) / den, -1.0, 1.0))


class TenDqFitter:
    """Fit/predict estimator of 10Dq against a :class:`SpectrumLibrary`.

    The search runs over library entry x energy offset x extra Gaussian broadening (the
    measurement's resolution is rarely the library's) and, in preprocessing, over a few
    positions of the edge-step background relative to the white lines (where the arctan
    steps sit is a convention that differs between groups and matters at the 0.1 eV level).

    Parameters
    ----------
    measures
        Measures to evaluate (default: the live, pointwise ones; add ``"dtw"`` off-line).
    consensus
        Measures whose median is the consensus estimate.
    offset_range
        Largest |energy offset| searched (eV).
    threshold
        Rejection threshold on the score (the larger of :func:`rejection_score` and
        :func:`branching_score` of the rejection stage); ``None`` never rejects (only
        when no calibration is available; flagged ``uncalibrated``).
    dtw_window
        DTW window in grid points.
    extra_fwhm
        Extra Gaussian broadenings (FWHM, eV) of the library searched; ``(0.0,)`` switches
        the broadening search off.
    step_shifts
        Positions (eV, relative to the L3/L2 maxima) of the edge steps tried when
        removing the background; the one that gives the best Pearson match is used.
    """

    def __init__(self, measures: tuple[str, ...] = LIVE_MEASURES,
                 consensus: tuple[str, ...] = CONSENSUS_MEASURES, offset_range: float = 2.0,
                 threshold: float | None = None, dtw_window: int | None = None,
                 extra_fwhm: tuple[float, ...] = DEFAULT_EXTRA_FWHM,
                 step_shifts: tuple[float, ...] = DEFAULT_STEP_SHIFTS) -> None:
        for m in tuple(measures) + tuple(consensus):
            if m not in MEASURES:
                raise SmartbeamInputError(f"measure {m!r} unknown: expected one of {MEASURES}")
        if not 0 <= offset_range <= 20:
            raise SmartbeamInputError(f"offset_range={offset_range!r}: expected 0-20 eV")
        extra_fwhm = tuple(float(w) for w in extra_fwhm)
        if not extra_fwhm or any(not (0 <= w <= 5) for w in extra_fwhm):
            raise SmartbeamInputError(f"extra_fwhm={extra_fwhm!r}: expected one or more widths "
                                      "in 0-5 eV")
        step_shifts = tuple(float(s) for s in step_shifts)
        if not step_shifts or any(not (-5 <= s <= 5) for s in step_shifts):
            raise SmartbeamInputError(f"step_shifts={step_shifts!r}: expected one or more "
                                      "shifts in -5..5 eV")
        self.measures = tuple(measures)
        self.consensus = tuple(m for m in consensus if m in self.measures) or self.measures[:1]
        self.offset_range = float(offset_range)
        self.threshold = threshold
        self.dtw_window = dtw_window
        self.extra_fwhm = extra_fwhm
        self.step_shifts = step_shifts
        self.library: SpectrumLibrary | None = None

    # -- fit -------------------------------------------------------------------------------
    def fit(self, library: SpectrumLibrary) -> TenDqFitter:
        """Precompute the broadened, prepared library for every measure; returns ``self``."""
        lib = library
        self.library = lib
        self._library_id = lib.library_id  # a hash of every parameter: once, not per result
        self.step = float(lib.energy[1] - lib.energy[0])
        self.n_shift = int(round(self.offset_range / self.step))
        self.n = len(lib.energy)
        n_ext = self.n + 2 * self.n_shift
        self.grid_ext = lib.energy[0] - self.n_shift * self.step + self.step * np.arange(n_ext)
        self.offsets = self.step * (np.arange(2 * self.n_shift + 1) - self.n_shift)
        fwhm_to_sigma = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0))) / self.step
        # (n_broadening, n_entries, n_energy): the library seen at each extra resolution.
        self.spectra_b = np.stack([
            lib.spectra if w == 0 else gaussian_filter1d(lib.spectra, w * fwhm_to_sigma,
                                                         axis=1, mode="nearest")
            for w in self.extra_fwhm])
        flat = self.spectra_b.reshape(-1, self.n)
        self._prepared = {m: prepare(flat, m) for m in set(self.measures) | {"pearson"}}
        # Pearson over offsets by FFT cross-correlation with the centred unit library rows.
        lc = flat - flat.mean(axis=1, keepdims=True)
        lc /= np.maximum(np.linalg.norm(lc, axis=1, keepdims=True), 1e-300)
        # The broadened entries are strongly correlated: correlate with an SVD basis of R
        # rows (every unit row reproduced to <= 1e-6, so r changes by <= 1e-6) and mix the
        # R correlations into the entries with a small matrix product.
        u, sv, vt = np.linalg.svd(lc, full_matrices=False)
        tail = np.sqrt(np.cumsum(((u * sv) ** 2)[:, ::-1], axis=1)[:, ::-1])  # (BK, R)
        ok = np.flatnonzero(tail.max(axis=0) <= _SVD_ROW_TOL)
        rank = int(ok[0]) if ok.size else len(sv)
        self._mix = (u[:, :rank] * sv[:rank]).T  # (R, BK)
        self._lib_basis = vt[:rank]  # (R, n): the batched path's direct products
        self._nfft = scipy.fft.next_fast_len(n_ext, real=True)
        self._lib_f = np.conj(scipy.fft.rfft(vt[:rank], self._nfft, axis=1))
        # Rejection stage: every entry at every resolution up to REJECTION_EXTRA_FWHM,
        # centred unit rows for a Pearson search by one matrix product.
        self._rej = np.concatenate([
            lib.spectra if w == 0 else gaussian_filter1d(lib.spectra, w * fwhm_to_sigma,
                                                         axis=1, mode="nearest")
            for w in REJECTION_EXTRA_FWHM])
        rc = self._rej - self._rej.mean(axis=1, keepdims=True)
        self._rej_unit = rc / np.maximum(np.linalg.norm(rc, axis=1, keepdims=True), 1e-300)
        mean = lib.spectra.mean(axis=0)
        thr = 0.02 * mean.max()
        above = np.flatnonzero(mean > thr)
        self.onset, self.end = float(lib.energy[above[0]]), float(lib.energy[above[-1]])
        split = float(lib.meta.get("l3_l2_split_eV", 0.5 * (self.onset + self.end)))
        self.split = split
        ref = lib.spectra[int(np.argmin(np.abs(lib.ten_dq - lib.params.align_ten_dq)))]
        lo = lib.energy < split
        self.l3 = float(lib.energy[lo][np.argmax(ref[lo])])
        self.l2 = float(lib.energy[~lo][np.argmax(ref[~lo])])
        self.need = (self.l3 - 2.0, self.l2 + 2.0)
        return self

    def with_measures(self, measures: str | tuple[str, ...]) -> TenDqFitter:
        """A copy of this fitted estimator that evaluates only ``measures``.

        The library tables are shared, not recomputed (measures this fitter did not
        prepare are prepared). The consensus is the fitter's consensus measures among
        ``measures`` (else the first of them); the threshold and search settings are kept.

        Parameters
        ----------
        measures
            A non-empty tuple of :data:`~smartbeam.analysis.similarity.MEASURES`, or
            ``"all"`` (this fitter itself) or ``"linear"`` (its measures among
            :data:`LINEAR_MEASURES`, Pearson at least).
        """
        import copy

        self._check_fitted()
        if isinstance(measures, str):
            if measures == "all":
                return self
            if measures != "linear":
                raise SmartbeamInputError(f"measures={measures!r}: expected 'all', 'linear' "
                                          "or a tuple of measure names")
            measures = tuple(m for m in self.measures if m in LINEAR_MEASURES) or (
                "pearson",)
        measures = tuple(dict.fromkeys(measures))
        if not measures or any(m not in MEASURES for m in measures):
            raise SmartbeamInputError(f"measures={measures!r}: expected one or more of "
                                      f"{MEASURES}")
        new = copy.copy(self)
        new.measures = measures
        new.consensus = tuple(m for m in self.consensus if m in measures) or measures[:1]
        missing = set(measures) - set(self._prepared)
        if missing:
            flat = self.spectra_b.reshape(-1, self.n)
            new._prepared = dict(self._prepared) | {m: prepare(flat, m) for m in missing}
        return new

    def _check_fitted(self) -> SpectrumLibrary:
        if self.library is None:
            raise RuntimeError("TenDqFitter.fit(library) must be called first")
        return self.library

    # -- preprocessing ------------------------------------------------------------------
    def preprocess(self, energy: np.ndarray, intensity: np.ndarray,
                   step_shift: float | None = None) -> np.ndarray:
        """Background/step removal and resampling onto the offset-extended grid.

        Parameters
        ----------
        energy, intensity
            The measured spectrum (validated).
        step_shift
            Position of the edge steps relative to the measured L3/L2 maxima (eV);
            default: the first of :attr:`step_shifts`.
        """
        e, y = energy, intensity
        r = self.offset_range
        shift = self.step_shifts[0] if step_shift is None else float(step_shift)
        l3 = self._peak_near(e, y, self.l3, r)
        l2 = self._peak_near(e, y, self.l2, r)
        y = remove_background(e, y, pre_edge_max=self.onset - r - 0.5,
                              post_edge_min=self.end + r + 0.5, l3=l3 + shift, l2=l2 + shift)
        return np.interp(self.grid_ext, e, y)

    def preprocess_variants(self, energy: np.ndarray, intensity: np.ndarray) -> np.ndarray:
        """(n_step_shifts, n_ext): :meth:`preprocess` for every edge-step position."""
        return np.stack([self.preprocess(energy, intensity, s) for s in self.step_shifts])

    @staticmethod
    def _peak_near(e: np.ndarray, y: np.ndarray, e0: float, r: float) -> float:
        m = (e > e0 - r - 1) & (e < e0 + r + 1)
        return float(e[m][np.argmax(y[m])]) if m.any() else e0

    # -- prediction -----------------------------------------------------------------------
    def dissimilarity_maps(self, ext: np.ndarray, pearson: np.ndarray | None = None,
                           offsets: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Dissimilarity per measure for resampled spectra.

        Parameters
        ----------
        ext
            (n_spectra, n_ext) spectra on the offset-extended grid (:meth:`preprocess`).
        pearson
            Their Pearson maps, when already computed.
        offsets
            Indices into :attr:`offsets` to evaluate, increasing (default: all); the maps
            then cover only those offsets.

        Returns
        -------
        dict
            measure -> (n_spectra, n_offsets, n_broadenings, n_entries) array.
        """
        self._check_fitted()
        ext = np.atleast_2d(ext)
        pearson = self._pearson_maps(ext) if pearson is None else pearson
        js = np.arange(pearson.shape[1]) if offsets is None else np.asarray(offsets, dtype=int)
        out = {"pearson": pearson[:, js]}
        out.update(self._other_maps(ext, js))
        return out

    def _other_maps(self, ext: np.ndarray, js: np.ndarray, skip: frozenset[str] = frozenset()
                    ) -> dict[str, np.ndarray]:
        """Maps of the measures other than Pearson (and DTW, and ``skip``) at offsets ``js``."""
        lib = self.library
        assert lib is not None
        out = {}
        others = (set(self.measures) | {"pearson"}) - set(_AT_BEST_WINDOW) - {"pearson"} - skip
        if not others:
            return out
        win = sliding_window_view(ext, self.n, axis=1)[:, js]  # (M, J', n)
        m_, j_, n_ = win.shape
        flat = win.reshape(m_ * j_, n_)
        for meas in sorted(others):
            # Not prepared here: dissimilarity prepares the windows block by block (in cache).
            d = dissimilarity(flat, self._prepared[meas], meas, step=self.step,
                              dtw_window=self.dtw_window, prepared="library")
            out[meas] = d.reshape(m_, j_, len(self.extra_fwhm), len(lib.ten_dq))
        return out

    def _pearson_maps(self, ext: np.ndarray, chunk: int = 32) -> np.ndarray:
        """1 - Pearson r at every offset by FFT cross-correlation (to within 1e-6).

        The library rows are centred, so ``sum_t (x_{j+t} - mean_j) L_t = sum_t x_{j+t} L_t``:
        the numerator of every offset is one cross-correlation (FFT, a few times fewer
        operations than the sliding-window matrix product) and the window norms come from
        cumulative sums.

        Returns
        -------
        (n_spectra, n_offsets, n_broadenings, n_entries) array.
        """
        lib = self.library
        assert lib is not None
        # Row mean removed first: keeps the cumulative sums well conditioned (EELS counts).
        x = ext - ext.mean(axis=1, keepdims=True)
        m_, n_ext = x.shape
        j_ = n_ext - self.n + 1
        c1 = np.concatenate([np.zeros((m_, 1)), np.cumsum(x, axis=1)], axis=1)
        c2 = np.concatenate([np.zeros((m_, 1)), np.cumsum(x * x, axis=1)], axis=1)
        s1 = c1[:, self.n:] - c1[:, :j_]
        s2 = c2[:, self.n:] - c2[:, :j_]
        norm = np.sqrt(np.clip(s2 - s1 * s1 / self.n, 0.0, None))
        inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 1e-300)
        xf = scipy.fft.rfft(x, self._nfft, axis=1)
        out = np.empty((m_, j_, self._mix.shape[1]))
        for i in range(0, m_, chunk):
            corr = scipy.fft.irfft(xf[i:i + chunk, None, :] * self._lib_f[None], self._nfft,
                                   axis=2)[:, :, :j_]
            corr = np.swapaxes(corr, 1, 2) @ self._mix  # (chunk, J, BK)
            out[i:i + chunk] = 1.0 - corr * inv[i:i + chunk, :, None]
        return out.reshape(m_, j_, len(self.extra_fwhm), len(lib.ten_dq))

    def _refine(self, dmap: np.ndarray, measure: str, js: np.ndarray
                ) -> tuple[float, float, int, int, int, float]:
        """Best (10Dq, offset) of one (J, B, K) map over offsets ``self.offsets[js]``,
        refined between grid points."""
        lib = self.library
        assert lib is not None
        f = dmap ** 2 if measure in _SQUARE_FOR_FIT else dmap
        j, b, k = np.unravel_index(int(np.argmin(f)), f.shape)
        seg = lib.segment
        dk = dj = 0.0
        if 0 < k < f.shape[2] - 1 and seg[k - 1] == seg[k] == seg[k + 1]:
            dk = _quad_refine(f[j, b, k - 1:k + 2])
        if 0 < j < f.shape[0] - 1:
            dj = _quad_refine(f[j - 1:j + 2, b, k])
        step_dq = lib.ten_dq[1] - lib.ten_dq[0] if len(lib.ten_dq) > 1 else 0.0
        ten_dq = float(lib.ten_dq[k] + dk * step_dq)
        offset = float(self.offsets[js[j]] + dj * self.step)
        return ten_dq, offset, int(j), int(b), int(k), float(dmap[j, b, k])

    def _model(self, ten_dq: float, k: int, b: int = 0) -> np.ndarray:
        """Library spectrum (broadening ``b``) at ``ten_dq``, interpolated linearly inside
        entry k's spin segment."""
        lib = self.library
        assert lib is not None
        spectra = self.spectra_b[b]
        same = np.flatnonzero(lib.segment == lib.segment[k])
        xs = lib.ten_dq[same]
        t = np.clip(ten_dq, xs[0], xs[-1])
        i = int(np.clip(np.searchsorted(xs, t) - 1, 0, max(len(xs) - 2, 0)))
        if len(xs) == 1:
            return spectra[same[0]]
        w = (t - xs[i]) / (xs[i + 1] - xs[i])
        return (1 - w) * spectra[same[i]] + w * spectra[same[i + 1]]

    def _search(self, e: np.ndarray, ys: np.ndarray, shared_offset: float | None = None
                ) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray], list[float],
                           np.ndarray]:
        """Maps of the best edge-step variant of each spectrum (chosen by Pearson), and the
        indices of the offsets they cover."""
        n_s = len(self.step_shifts)
        ext = np.concatenate([self.preprocess_variants(e, y) for y in ys])  # (M*S, n_ext)
        pearson = self._pearson_maps(ext)
        n_j = pearson.shape[1]
        offsets = np.arange(n_j)
        if shared_offset is not None:
            offsets = self._shared_window(pearson.reshape(len(ys), n_s, n_j, -1), shared_offset)
        # The edge-step variant that matches best inside the offsets searched.
        best = pearson[:, offsets].reshape(len(ys), n_s, -1).min(axis=2).argmin(axis=1)
        rows = np.arange(len(ys)) * n_s + best
        # The other measures only for the variant Pearson chose: the rest would be discarded.
        maps = self.dissimilarity_maps(ext[rows], pearson[rows], offsets)
        out_maps, out_ext, out_shift = [], [], []
        for i, s in enumerate(best):
            row = int(rows[i])
            out_maps.append({m: v[i] for m, v in maps.items()})
            out_ext.append(ext[row])
            out_shift.append(self.step_shifts[int(s)])
            for meas in set(self.measures) & set(_AT_BEST_WINDOW):
                out_maps[-1][meas] = self._at_best_window(ext[row], out_maps[-1]["pearson"],
                                                          meas, offsets)
        return out_maps, out_ext, out_shift, offsets

    def _shared_window(self, pearson: np.ndarray, half_width: float) -> np.ndarray:
        """Offset indices within ``half_width`` of the offset the spectra share.

        ``pearson`` is (n_spectra, n_variants, n_offsets, ...). The centre is the median of
        the Pearson offsets of the spectra that match the library at all (r >=
        ``_SHARED_OFFSET_MIN_R``): empty or noise-only pixels have arbitrary offsets and
        must not place the window. Too few such spectra: every offset.
        """
        return self._window_from_per_offset(pearson.min(axis=(1, 3)), half_width)

    def _window_from_per_offset(self, per_offset: np.ndarray, half_width: float
                                ) -> np.ndarray:
        """:meth:`_shared_window` from the best ``1 - r`` of each (spectrum, offset)."""
        matched = 1.0 - per_offset.min(axis=1) >= _SHARED_OFFSET_MIN_R
        if matched.sum() < _SHARED_OFFSET_MIN_SPECTRA:
            return np.arange(per_offset.shape[1])
        j0 = int(round(float(np.median(per_offset[matched].argmin(axis=1)))))
        half = int(round(half_width / self.step))
        return np.arange(max(j0 - half, 0), min(j0 + half, per_offset.shape[1] - 1) + 1)

    def _at_window_edge(self, maps: dict[str, np.ndarray], js: np.ndarray) -> bool:
        """Whether any measure's best offset lies on an edge of a restricted window (not
        on an edge of the whole range): its true optimum may lie outside."""
        edges = ([0] if js[0] > 0 else []) + ([len(js) - 1] if js[-1] < len(self.offsets) - 1
                                                else [])
        if not edges:
            return False
        for meas in self.measures:
            if meas in _AT_BEST_WINDOW:
                continue
            dmap = maps[meas]
            if np.unravel_index(int(np.argmin(dmap)), dmap.shape)[0] in edges:
                return True
        return False

    def _at_best_window(self, ext: np.ndarray, pearson: np.ndarray, measure: str,
                        js: np.ndarray) -> np.ndarray:
        """A slow measure (DTW) over every entry at Pearson's best offset only.

        DTW tolerates small misalignments by itself; evaluating it at every offset would
        cost ~100x more. Other offsets are ``inf`` in the returned (J, B, K) map.
        """
        j = int(np.unravel_index(int(np.argmin(pearson)), pearson.shape)[0])
        window = ext[js[j]:js[j] + self.n][None, :]
        d = dissimilarity(prepare(window, measure), self._prepared[measure], measure,
                          step=self.step, dtw_window=self.dtw_window, prepared=True)
        out = np.full(pearson.shape, np.inf)
        out[j] = d.reshape(pearson.shape[1:])
        return out

    def predict(self, energy: np.ndarray, intensity: np.ndarray, name: str = "spectrum"
                ) -> TenDqResult:
        """Estimate 10Dq of one measured spectrum (see :class:`TenDqResult`)."""
        lib = self._check_fitted()
        e, y = validate_spectrum(energy, intensity, self.need, name)
        maps, ext, shifts, js = self._search(e, y[None, :])
        return self._result(e, y, maps[0], ext[0], shifts[0], lib, js)

    def predict_many(self, energy: np.ndarray, intensities: np.ndarray, *,
                     shared_offset: float | None = None) -> list[TenDqResult]:
        """Estimate 10Dq of many spectra sharing one energy axis (vectorised search).

        Parameters
        ----------
        energy
            (n_energy,) common energy axis (eV).
        intensities
            (n_spectra, n_energy) spectra.
        shared_offset
            For spectra that share one energy calibration (the pixels of an image stack,
            measured through one monochromator): search every spectrum only within this
            half width (eV) of the median Pearson offset of the spectra that match the
            library (r >= 0.8; empty and noise-only spectra do not count), instead of over
            +-``offset_range`` each -- several times faster. A spectrum whose best offset
            under any measure falls on an edge of that window (e.g. a region with a
            chemical shift) is searched again over the whole range, so the window never
            forces an answer. ``None`` (default): each spectrum on its own.

        Many spectra of low rank (the pixels of a denoised stack) are searched all at once
        (:mod:`~smartbeam.analysis.tendq_batch`), with the per-spectrum answers up to
        rounding.
        """
        self._check_fitted()
        e, ys = self._validated_many(energy, intensities, shared_offset)
        out = self._batch(e, ys, shared_offset)
        if out is not None:
            return [self._batch_result(out, i) for i in range(len(ys))]
        return self._predict_many_loop(e, ys, shared_offset)

    def _validated_many(self, energy: np.ndarray, intensities: np.ndarray,
                        shared_offset: float | None) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        if shared_offset is not None and not 0 <= shared_offset <= self.offset_range:
            raise SmartbeamInputError(f"shared_offset={shared_offset!r}: expected a half width "
                                      f"in 0-{self.offset_range} eV (the offset range)")
        ys = np.atleast_2d(np.asarray(intensities, dtype=float))
        e, _ = validate_spectrum(energy, ys[0], self.need)
        # Every row passes when the shapes match and all is finite (the axis is checked);
        # else the row by row check names the first bad one.
        if ys.ndim != 2 or ys.shape[1] != e.size or not np.isfinite(ys).all():
            for i, y in enumerate(ys):
                validate_spectrum(e, y, None, f"spectrum {i}")
        return e, ys

    def _batch(self, e: np.ndarray, ys: np.ndarray, shared_offset: float | None
               ) -> dict[str, Any] | None:
        """All spectra at once when they are of low rank (see
        :mod:`~smartbeam.analysis.tendq_batch`), else ``None``."""
        if "dtw" in self.measures or len(ys) < 2:
            return None
        from .tendq_batch import lowrank_factors, predict_batch

        factors = lowrank_factors(ys)
        return None if factors is None else predict_batch(self, e, ys, shared_offset, factors)

    def _predict_many_loop(self, e: np.ndarray, ys: np.ndarray, shared_offset: float | None
                           ) -> list[TenDqResult]:
        """The per-spectrum path of :meth:`predict_many` (validated input)."""
        lib = self._check_fitted()
        maps, ext, shifts, js = self._search(e, ys, shared_offset)
        redo = [i for i in range(len(ys)) if shared_offset is not None
                and self._at_window_edge(maps[i], js)]
        results = [None if i in redo else self._result(e, ys[i], maps[i], ext[i], shifts[i],
                                                          lib, js)
                   for i in range(len(ys))]
        if redo:
            maps, ext, shifts, js = self._search(e, ys[redo], None)
            for k, i in enumerate(redo):
                results[i] = self._result(e, ys[i], maps[k], ext[k], shifts[k], lib, js)
        return results

    def predict_map(self, energy: np.ndarray, intensities: np.ndarray, *,
                    shared_offset: float | None = None) -> dict[str, np.ndarray]:
        """:meth:`predict_many` as arrays, for the many pixels of a map.

        Returns
        -------
        dict
            (n_spectra,) arrays ``ten_dq`` and ``sd`` (NaN where rejected), ``described``,
            ``score``, ``offset`` (the Pearson offset, eV, also where rejected).
        """
        e, ys = self._validated_many(energy, intensities, shared_offset)
        out = self._batch(e, ys, shared_offset)
        if out is not None:
            described = (np.ones(len(ys), dtype=bool) if self.threshold is None
                         else out["score"] <= self.threshold)
            return {"ten_dq": np.where(described, out["ten_dq"], np.nan),
                    "sd": np.where(described, out["sd"], np.nan), "described": described,
                    "score": out["score"].astype(float),
                    "offset": out["per_off"].get("pearson", np.full(len(ys), np.nan))}
        results = self._predict_many_loop(e, ys, shared_offset)
        return {
            "ten_dq": np.array([r.ten_dq if r.described else np.nan for r in results],
                               dtype=float),
            "sd": np.array([r.sd if r.described else np.nan for r in results], dtype=float),
            "described": np.array([bool(r.described) for r in results]),
            "score": np.array([r.score for r in results], dtype=float),
            "offset": np.array([r.extra["per_measure_offset"].get("pearson", np.nan)
                                for r in results], dtype=float),
        }

    def _batch_result(self, out: dict[str, Any], i: int) -> TenDqResult:
        """Result ``i`` of :func:`~smartbeam.analysis.tendq_batch.predict_batch`."""
        lib = self.library
        assert lib is not None
        rej = {k: float(v[i]) for k, v in out["rejection"].items()}
        return self._finish(
            ten_dq=float(out["ten_dq"][i]), offset=float(out["offset"][i]),
            measure="consensus" if len(self.consensus) > 1 else self.consensus[0],
            sim=float(out["similarity"][i]),
            per={m: float(v[i]) for m, v in out["per"].items()},
            per_off={m: float(v[i]) for m, v in out["per_off"].items()},
            per_sim={m: float(v[i]) for m, v in out["per_sim"].items()},
            k_best=int(out["k_best"][i]), b_best=int(out["b_best"][i]),
            spread=float(out["spread"][i]), sd_noise=float(out["sd_noise"][i]),
            score=float(out["score"][i]), rej=rej, sigma=float(out["sigma"][i]),
            step_shift=float(out["step_shift"][i]))

    def _result(self, e: np.ndarray, y: np.ndarray, maps: dict[str, np.ndarray],
                pre: np.ndarray, step_shift: float, lib: SpectrumLibrary, js: np.ndarray
                ) -> TenDqResult:
        per, per_off, per_sim, per_k, per_b = {}, {}, {}, {}, {}
        for m in self.measures:
            dq, off, _, b, k, dmin = self._refine(maps[m], m, js)
            per[m], per_off[m], per_k[m], per_b[m] = dq, off, k, b
            per_sim[m] = float(similarity_from_dissimilarity(dmin, m))
        cons = [per[m] for m in self.consensus]
        if len(self.consensus) == 1:
            measure = self.consensus[0]
            ten_dq, offset = per[measure], per_off[measure]
            k_best, b_best = per_k[measure], per_b[measure]
            sim = per_sim[measure]
        else:
            measure = "consensus"
            ten_dq = float(np.median(cons))
            offset = float(np.median([per_off[m] for m in self.consensus]))
            k_best = int(np.argmin(np.abs(lib.ten_dq - ten_dq)))
            # Keep the branch of the majority when the median lands on a crossover.
            k_best = int(np.median([per_k[m] for m in self.consensus])) if len(
                set(lib.segment[[per_k[m] for m in self.consensus]])) > 1 else k_best
            b_best = int(np.median([per_b[m] for m in self.consensus]))
            sim = per_sim.get("pearson", per_sim[self.consensus[0]])

        # Rejection score on the raw points inside the (shifted) library window.
        mask = (e >= lib.energy[0] + offset) & (e <= lib.energy[-1] + offset)
        sigma = noise_sigma(y[mask]) if mask.sum() >= 5 else 0.0
        y_bg = np.interp(e[mask], self.grid_ext, pre)
        score, rej = self._rejection(e, y, pre, offset)

        # Uncertainty: spread across measures (robust) and noise propagated through the
        # curvature of the Pearson misfit around the minimum.
        spread = 1.4826 * float(np.median(np.abs(np.asarray(cons) - np.median(cons)))) if len(
            cons) > 1 else 0.0
        sd_noise = self._noise_sd(maps["pearson"], y_bg, sigma)
        return self._finish(ten_dq=ten_dq, offset=offset, measure=measure, sim=sim, per=per,
                            per_off=per_off, per_sim=per_sim, k_best=k_best, b_best=b_best,
                            spread=spread, sd_noise=sd_noise, score=score, rej=rej,
                            sigma=sigma, step_shift=step_shift)

    def _finish(self, *, ten_dq: float, offset: float, measure: str, sim: float,
                per: dict[str, float], per_off: dict[str, float], per_sim: dict[str, float],
                k_best: int, b_best: int, spread: float, sd_noise: float, score: float,
                rej: dict[str, Any], sigma: float, step_shift: float) -> TenDqResult:
        """Flags, decision and the result object of one estimate."""
        lib = self.library
        assert lib is not None
        sd = math.sqrt(spread ** 2 + sd_noise ** 2)
        flags = []
        step_dq = float(lib.ten_dq[1] - lib.ten_dq[0]) if len(lib.ten_dq) > 1 else 0.0
        if ten_dq <= lib.ten_dq[0] + 0.5 * step_dq:
            flags.append("library_edge_low")
        if ten_dq >= lib.ten_dq[-1] - 0.5 * step_dq:
            flags.append("library_edge_high")
        if any(abs(ten_dq - c) <= step_dq for c in lib.crossovers):
            flags.append("near_spin_crossover")
        if abs(offset) >= self.offset_range - self.step:
            flags.append("offset_at_search_limit")
        if len(self.extra_fwhm) > 1 and b_best == len(self.extra_fwhm) - 1:
            flags.append("broadening_at_search_limit")
        if spread > max(3 * sd_noise, step_dq):
            flags.append("measures_disagree")
        described = True
        if self.threshold is None:
            flags.append("uncalibrated")
        elif not (score <= self.threshold):
            described = False
            flags.append("not_described")
        extra = {"noise_sigma": sigma, "per_measure_offset": per_off, "raw_per_measure": per,
                 "per_measure_similarity": per_sim, "spin": float(lib.spin[k_best]),
                 "extra_fwhm": float(self.extra_fwhm[b_best]), "step_shift": float(step_shift),
                 "rejection": rej}
        return TenDqResult(
            described=described, ten_dq=ten_dq if described else None,
            sd=sd if described else None, offset=offset if described else None,
            measure=measure, similarity=sim,
            per_measure={m: (per.get(m) if described else None) for m in MEASURES
                         if m in self.measures},
            per_measure_offset=per_off, flags=flags, score=float(score),
            threshold=float("nan") if self.threshold is None else float(self.threshold),
            library_id=self._library_id, extra=extra)

    def _rejection(self, e: np.ndarray, y: np.ndarray, pre: np.ndarray, offset: float
                   ) -> tuple[float, dict[str, Any]]:
        """Score of the best library spectrum (any entry, extra FWHM up to 4 eV, offset
        within +-0.5 eV of ``offset``) on the raw points; see the module docstring."""
        lib = self.library
        assert lib is not None
        n_k = len(lib.ten_dq)
        j0 = int(round((offset + self.offset_range) / self.step))
        half = int(round(_REJECTION_OFFSET_HALF / self.step))
        js = np.arange(max(j0 - half, 0), min(j0 + half, 2 * self.n_shift) + 1)
        win = sliding_window_view(pre, self.n)[js]
        wc = win - win.mean(axis=1, keepdims=True)
        wc /= np.maximum(np.linalg.norm(wc, axis=1, keepdims=True), 1e-300)
        r = wc @ self._rej_unit.T
        jj, idx = np.unravel_index(int(np.argmax(r)), r.shape)
        off = float(self.offsets[js[jj]])
        info: dict[str, Any] = {"offset": off, "ten_dq": float(lib.ten_dq[idx % n_k]),
                                "extra_fwhm": float(REJECTION_EXTRA_FWHM[idx // n_k]),
                                "shape": float("inf"), "branching": float("inf")}
        mask = (e >= lib.energy[0] + off) & (e <= lib.energy[-1] + off)
        if mask.sum() < 10:
            return float("inf"), info
        sigma = noise_sigma(y[mask])
        y_bg = np.interp(e[mask], self.grid_ext, pre)
        model = np.interp(e[mask] - off, lib.energy, self._rej[idx])
        shape = rejection_score(y_bg, model, sigma)
        coef, *_ = np.linalg.lstsq(np.column_stack([model, np.ones_like(model)]), y_bg,
                                   rcond=None)
        branching = branching_score(y_bg - coef[1], model, e[mask] - off < self.split, sigma)
        info.update(shape=float(shape), branching=float(branching))
        return max(shape, branching), info

    def _noise_sd(self, dmap: np.ndarray, y: np.ndarray, sigma: float) -> float:
        lib = self.library
        assert lib is not None
        j, b, k = np.unravel_index(int(np.argmin(dmap)), dmap.shape)
        if not (0 < k < dmap.shape[2] - 1) or sigma <= 0 or y.size < 3:
            return 0.0
        # SSR(dq) = n var(y) (1 - r^2); Delta SSR = sigma^2 gives one standard deviation.
        r = 1.0 - dmap[j, b, k - 1:k + 2]
        ssr = y.size * np.var(y) * (1.0 - r ** 2)
        h = float(lib.ten_dq[k + 1] - lib.ten_dq[k])
        curv = (ssr[0] - 2 * ssr[1] + ssr[2]) / h ** 2
        if curv <= 0:
            return float(h)
        return float(math.sqrt(2.0 * sigma ** 2 / curv))
