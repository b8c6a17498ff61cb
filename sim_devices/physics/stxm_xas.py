"""STXM field of view for 10Dq maps: Mn2+ regions of different 10Dq plus a foreign region.

Each Mn2+ region absorbs like the shipped edrixs Mn2+ multiplet library spectrum at its
10Dq (``smartbeam.library_store.load_packaged_library``); one region holds a spectrum that
is *not* Mn2+, which a 10Dq map must reject. By default that is a physical one: the edrixs
multiplet spectrum of Mn3+ (3d4, 10Dq 1.8 eV, L3 maximum 1.5 eV above Mn2+'s as the
valence shift), computed once and cached on disk through
:func:`smartbeam.library_store.get_library` (~15 s the first time, instant after); its
white-line area is 6/5 of Mn2+'s (6 instead of 5 d holes). ``foreign_ion=None`` gives
instead a made-up phase (two broad Lorentzian white lines, 1:1 branching ratio) that
needs no edrixs run. Thickness varies smoothly; transmitted counts are Poisson with mean
``flux * dwell * exp(-OD)``. Same interface as :class:`sim_devices.physics.stxm.STXMSample`
(``image``, ``pixel_index``, ``extent_um``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .stxm import raster_pixel_index

__all__ = ["STXMXASSample"]

FOREIGN = -1


@dataclass
class STXMXASSample:
    """A non-magnetic Mn2+ sample with regions of different 10Dq.

    Parameters
    ----------
    shape
        Pixels (ny, nx).
    pixel_um
        Pixel size in µm.
    ten_dq
        10Dq (eV) of the Mn2+ regions.
    foreign
        Add one region whose spectrum is not Mn2+.
    foreign_ion, foreign_ten_dq, foreign_l3_eV
        The foreign region's edrixs ion, its 10Dq and where its L3 maximum sits (eV);
        ``foreign_ion=None``: the made-up Lorentzian phase instead.
    optical_density
        OD of the L3 maximum of the thickest region.
    flux
        Photons per second per pixel.
    seed
        Seed of the region layout and thickness (not of the counting noise).
    """

    shape: tuple[int, int] = (100, 100)
    pixel_um: float = 0.03
    ten_dq: tuple[float, ...] = (0.6, 0.9, 1.2)
    foreign: bool = True
    foreign_ion: str | None = "Mn3+"
    foreign_ten_dq: float = 1.8
    foreign_l3_eV: float = 641.5
    optical_density: float = 1.0
    flux: float = 2.0e6
    seed: int = 11
    regions: np.ndarray = field(init=False, repr=False)
    thickness: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from smartbeam.library_store import load_packaged_library

        self.library = load_packaged_library()
        ny, nx = self.shape
        rng = np.random.default_rng(self.seed)
        labels = list(range(len(self.ten_dq))) + ([FOREIGN] if self.foreign else [])
        # Two cells per label so regions are compact but not all rectangles.
        centres = rng.uniform([0, 0], [ny, nx], size=(2 * len(labels), 2))
        yy, xx = np.mgrid[0:ny, 0:nx]
        d2 = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
        self.regions = np.array(labels * 2)[np.argmin(d2, axis=-1)]
        bumps = ndimage.gaussian_filter(rng.normal(size=self.shape), sigma=min(ny, nx) / 8)
        bumps /= np.abs(bumps).max() or 1.0
        self.thickness = 1.0 + 0.1 * bumps
        lib = self.library
        self._peak = float(lib.spectra.max())
        e = lib.energy
        ref = lib.spectra[int(np.argmin(np.abs(lib.ten_dq - 0.9)))]
        self._edges = _edges(e, ref, float(lib.meta["l3_l2_split_eV"]))
        if self.foreign and self.foreign_ion:
            fe, fs, split = _foreign_spectrum(self.foreign_ion, self.foreign_ten_dq,
                                              self.foreign_l3_eV)
            # Same white-line area per hole as Mn2+ (5 holes): intensity follows holes.
            from smartbeam.analysis.library import parse_ion

            holes = 10 - parse_ion(self.foreign_ion)[2]
            area = np.trapezoid(ref, e) * holes / 5.0
            fs = fs * area / np.trapezoid(fs, fe)
            self._foreign = (fe, fs)
            self._foreign_edges = _edges(fe, fs, split)
        else:
            l3, l2 = self._edges
            w = 1.5
            self._foreign = (e, 0.6 * self._peak * (1 / (1 + ((e - l3 - 1.0) / w) ** 2)
                                                    + 1 / (1 + ((e - l2 - 1.0) / w) ** 2)))
            self._foreign_edges = self._edges

    @property
    def extent_um(self) -> tuple[float, float]:
        """Field of view (x, y) in µm."""
        return self.shape[1] * self.pixel_um, self.shape[0] * self.pixel_um

    def region_spectrum(self, label: int, energy: np.ndarray) -> np.ndarray:
        """Absorption (edge jump 1 + white lines, peak ~4) of a region on ``energy``."""
        lib = self.library
        e = np.asarray(energy, dtype=float)
        l3, l2 = self._edges
        if label == FOREIGN:
            white = np.interp(e, *self._foreign, left=0.0, right=0.0)
            l3, l2 = self._foreign_edges
        else:
            k = int(np.argmin(np.abs(lib.ten_dq - self.ten_dq[label])))
            if not np.isclose(lib.ten_dq[k], self.ten_dq[label]):
                raise ValueError(f"10Dq {self.ten_dq[label]} eV is not on the library grid")
            white = np.interp(e, lib.energy, lib.spectra[k], left=0.0, right=0.0)
        step = (2 / 3) * (0.5 + np.arctan((e - l3) / 0.5) / np.pi) + (1 / 3) * (
            0.5 + np.arctan((e - l2) / 0.5) / np.pi)
        return 0.1 + step + 3.0 * white / self._peak

    def optical_density_map(self, energy: float) -> np.ndarray:
        """OD of every pixel at one energy."""
        out = np.zeros(self.shape)
        for label in np.unique(self.regions):
            mu = self.region_spectrum(int(label), np.array([energy]))[0]
            out[self.regions == label] = mu
        return self.optical_density / 4.0 * self.thickness * out

    def pixel_index(self, x_um: np.ndarray, y_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel (row, column) of stage positions in µm (clipped to the field)."""
        return raster_pixel_index(x_um, y_um, self.pixel_um, self.shape)

    def image(self, energy: float, helicity: int, dwell: float, x_um: np.ndarray,
              y_um: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Counts on the raster ``y_um`` x ``x_um`` (isotropic: helicity is ignored)."""
        rows, cols = self.pixel_index(*np.meshgrid(x_um, y_um))
        mean = self.flux * dwell * np.exp(-self.optical_density_map(energy))[rows, cols]
        return rng.poisson(mean).astype(np.int32)

    def true_ten_dq_map(self) -> np.ndarray:
        """10Dq per pixel (NaN in the foreign region)."""
        vals = np.array(list(self.ten_dq) + [np.nan])
        return vals[np.where(self.regions == FOREIGN, len(self.ten_dq), self.regions)]


def _edges(e: np.ndarray, spectrum: np.ndarray, split: float) -> tuple[float, float]:
    """(L3, L2) maxima of a spectrum, split at ``split`` eV."""
    hi = e > split
    return float(e[~hi][np.argmax(spectrum[~hi])]), float(e[hi][np.argmax(spectrum[hi])])


def _foreign_spectrum(ion: str, ten_dq: float, l3_ev: float
                      ) -> tuple[np.ndarray, np.ndarray, float]:
    """Energy, spectrum and L3/L2 split of an edrixs single-entry library (disk-cached)."""
    from smartbeam.analysis.library import LibraryParams
    from smartbeam.library_store import get_library

    params = LibraryParams(ion=ion, ten_dq_min=ten_dq, ten_dq_max=ten_dq,
                           align_energy=l3_ev, align_ten_dq=ten_dq)
    lib = get_library(params, compute=True, n_jobs=1, progress=False)
    return lib.energy, lib.spectra[0], float(lib.meta["l3_l2_split_eV"])
