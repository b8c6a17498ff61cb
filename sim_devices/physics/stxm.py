"""STXM field of view: a thin ferromagnetic film with magnetic domains and thickness variation.

Each pixel absorbs like the XMCD sample scaled by its thickness, with the dichroism
scaled by the projection of its magnetisation on the beam (``m_proj`` in [-1, 1]):

    mu_p(E, h) = t_p · OD · (mu_iso(E) + h · m_proj,p · xmcd(E) / 2)

so the sum-rule moments of pixel p are ``m_proj,p`` times those of the bulk sample.
Transmitted counts are Poisson with mean ``flux · dwell · exp(-mu_p)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = ["STXMSample", "raster_pixel_index"]


def raster_pixel_index(x_um: np.ndarray, y_um: np.ndarray, pixel_um: float,
                       shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (row, column) of stage positions in µm on a field of ``shape`` pixels.

    Pixel k spans [k, k+1) pixel sizes; the small epsilon keeps rasters at exact
    multiples of the pixel size (0.09 / 0.03 = 2.9999...) on the intended pixel.
    """
    col = np.clip(np.floor(np.asarray(x_um) / pixel_um + 1e-6).astype(int), 0, shape[1] - 1)
    row = np.clip(np.floor(np.asarray(y_um) / pixel_um + 1e-6).astype(int), 0, shape[0] - 1)
    return row, col


@dataclass
class STXMSample:
    """A 2-D magnetic sample for the STXM twin.

    Parameters
    ----------
    xmcd
        The bulk spectra, a ``sim_devices.physics.xmcd.XMCDSample``.
    shape
        Pixels (ny, nx) of the field of view.
    pixel_um
        Pixel size in µm (0.03 = 30 nm).
    n_domains
        Number of magnetic domains (Voronoi cells with random in-plane/out-of-plane
        magnetisation angle).
    optical_density
        Optical density of the thickest region per unit edge jump.
    flux
        Photons per second per pixel incident on the sample.
    seed
        Seed of the domain pattern and thickness map (not of the counting noise).
    """

    xmcd: object
    shape: tuple[int, int] = (100, 100)
    pixel_um: float = 0.03
    n_domains: int = 12
    optical_density: float = 0.6
    flux: float = 2.0e6
    seed: int = 7
    m_proj: np.ndarray = field(init=False, repr=False)
    thickness: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        ny, nx = self.shape
        yy, xx = np.mgrid[0:ny, 0:nx]
        centres = rng.uniform([0, 0], [ny, nx], size=(self.n_domains, 2))
        d2 = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
        cell = np.argmin(d2, axis=-1)
        # Domain angles: mostly up/down with some canted domains.
        angles = rng.choice([0.0, np.pi, np.pi / 3, 2 * np.pi / 3], size=self.n_domains)
        self.m_proj = np.cos(angles)[cell]
        bumps = ndimage.gaussian_filter(rng.normal(size=self.shape), sigma=min(ny, nx) / 8)
        bumps /= np.abs(bumps).max() or 1.0
        gradient = 0.15 * (xx / max(nx - 1, 1) - 0.5)
        self.thickness = 1.0 + gradient + 0.1 * bumps

    @property
    def extent_um(self) -> tuple[float, float]:
        """Field of view (x, y) in µm."""
        return self.shape[1] * self.pixel_um, self.shape[0] * self.pixel_um

    def mu_components(self, energy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Isotropic absorption and XMCD (mu+ − mu−) of the bulk at ``energy``."""
        energy = np.atleast_1d(np.asarray(energy, dtype=float))
        mu_plus = self.xmcd.mu(energy, 1)
        mu_minus = self.xmcd.mu(energy, -1)
        return 0.5 * (mu_plus + mu_minus), mu_plus - mu_minus

    def optical_density_map(self, energy: float, helicity: int) -> np.ndarray:
        """Absorption (optical density) of every pixel at one energy and helicity."""
        mu_iso, xmcd = self.mu_components(np.array([energy]))
        return self.thickness * self.optical_density * (
            mu_iso[0] + helicity * self.m_proj * xmcd[0] / 2.0)

    def expected_counts(self, energy: float, helicity: int, dwell: float) -> np.ndarray:
        """Mean transmitted counts per pixel for one dwell time."""
        return self.flux * dwell * np.exp(-self.optical_density_map(energy, helicity))

    def pixel_index(self, x_um: np.ndarray, y_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel (row, column) of stage positions in µm (clipped to the field)."""
        return raster_pixel_index(x_um, y_um, self.pixel_um, self.shape)

    def image(self, energy: float, helicity: int, dwell: float, x_um: np.ndarray,
              y_um: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Counts on the raster ``y_um`` × ``x_um`` (1-D stage positions), shape (ny, nx)."""
        rows, cols = self.pixel_index(*np.meshgrid(x_um, y_um))
        mean = self.expected_counts(energy, helicity, dwell)[rows, cols]
        return rng.poisson(mean).astype(np.int32)

    def true_moment_maps(self) -> dict[str, np.ndarray]:
        """Per-pixel m_orb and m_spin (bulk moments × magnetisation projection)."""
        bulk = self.xmcd.true_moments()
        return {"m_orb": bulk["m_orb"] * self.m_proj, "m_spin": bulk["m_spin"] * self.m_proj}
