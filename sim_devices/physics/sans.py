"""Ground-truth SANS physics for the simulated area detector: silica spheres in D2O.

The seed case (SANS-I, SINQ): silica spheres r = 60 nm at 36 vol.% (sasmodels ``sphere`` x
``hardsphere``), lambda = 0.6 nm, 18 m sample-detector distance, a 128 x 128 detector with
7.5 mm pixels, a round beam stop. Three variants:

``"realistic"``
    10 % radius polydispersity and Gaussian q-resolution (wavelength spread + geometric).
``"sharp"``
    monodisperse, no resolution smearing: deep, pixel-sharp form-factor minima.
``"anisotropic"``
    the realistic pattern modulated by two azimuthal lobes (an aligned sample).

Each exposure is a Poisson draw of the true mean frame at a settable count rate
(counts per second summed over the valid pixels, before attenuation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from smartbeam.errors import SmartbeamInputError

__all__ = ["PATTERNS", "SANSSample"]

PATTERNS = ("realistic", "sharp", "anisotropic")


def _iq_sphere_hardsphere(q_inv_angstrom: np.ndarray, radius_nm: float, volfraction: float,
                          radius_pd: float, sld: float, sld_solvent: float) -> np.ndarray:
    """I(q) of hard-sphere-interacting spheres from sasmodels (absolute units, 1/cm)."""
    from sasmodels.core import load_model
    from sasmodels.direct_model import call_kernel

    model = load_model("sphere@hardsphere")
    kernel = model.make_kernel([np.asarray(q_inv_angstrom, dtype=float)])
    pars = {"radius": radius_nm * 10.0, "volfraction": volfraction, "sld": sld,
            "sld_solvent": sld_solvent, "scale": 1.0, "background": 0.0,
            # effective radius for S(q) = the sphere radius
            "radius_effective_mode": 1}
    if radius_pd > 0:
        pars.update({"radius_pd": radius_pd, "radius_pd_n": 41, "radius_pd_nsigma": 3.5})
    try:
        return np.asarray(call_kernel(kernel, pars), dtype=float)
    finally:
        kernel.release()


@dataclass
class SANSSample:
    """Simulated SANS sample + instrument: true mean frame and Poisson exposures.

    Parameters
    ----------
    pattern
        ``"realistic"``, ``"sharp"`` or ``"anisotropic"``.
    shape
        Detector shape ``(ny, nx)`` in pixels.
    count_rate
        Counts per second summed over the valid (unmasked) pixels at attenuation 1.
    pixel_size_mm
        Pixel pitch in mm (square pixels).
    distance_m
        Sample-detector distance in m.
    wavelength_nm
        Neutron wavelength in nm.
    radius_nm, volfraction
        Sphere radius and volume fraction.
    polydispersity
        Relative Gaussian radius spread (``realistic`` and ``anisotropic`` only).
    dlambda_over_lambda
        Wavelength spread, FWHM (``realistic`` and ``anisotropic`` only).
    beam_centre
        ``(x, y)`` in pixels (0-based, may be fractional); default slightly off the middle.
    beamstop_radius_px
        Radius of the round beam stop in pixels (masked).
    background_fraction
        Flat incoherent background as a fraction of the mean coherent intensity.
    lobe_angle_deg, lobe_width_deg, lobe_floor
        Anisotropic variant: direction and Gaussian width of the two lobes, and the
        relative intensity between the lobes.
    dead_pixels
        ``[(y, x), ...]`` pixels that never count (masked).
    """

    pattern: str = "realistic"
    shape: tuple[int, int] = (128, 128)
    count_rate: float = 3000.0
    pixel_size_mm: float = 7.5
    distance_m: float = 18.0
    wavelength_nm: float = 0.6
    radius_nm: float = 60.0
    volfraction: float = 0.36
    polydispersity: float = 0.10
    dlambda_over_lambda: float = 0.10
    beam_centre: tuple[float, float] | None = None
    beamstop_radius_px: float = 4.0
    background_fraction: float = 0.02
    lobe_angle_deg: float = 30.0
    lobe_width_deg: float = 15.0
    lobe_floor: float = 0.1
    dead_pixels: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise SmartbeamInputError(f"pattern={self.pattern!r}: expected one of {PATTERNS}")
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 2 or min(shape) < 8:
            raise SmartbeamInputError(f"shape={self.shape!r}: expected (ny, nx) with both >= 8")
        self.shape = shape
        if not np.isfinite(self.count_rate) or self.count_rate < 0:
            raise SmartbeamInputError(f"count_rate={self.count_rate!r}: expected a finite value >= 0")
        if self.beam_centre is None:
            ny, nx = shape
            self.beam_centre = (nx / 2 - 0.3, ny / 2 + 0.2)
        self.beam_centre = (float(self.beam_centre[0]), float(self.beam_centre[1]))
        self.dead_pixels = [(int(y), int(x)) for y, x in self.dead_pixels]

    # -- geometry --------------------------------------------------------------------
    @cached_property
    def _radius_phi(self) -> tuple[np.ndarray, np.ndarray]:
        ny, nx = self.shape
        yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
        dx = xx - self.beam_centre[0]
        dy = yy - self.beam_centre[1]
        return np.hypot(dx, dy), np.arctan2(dy, dx)

    @property
    def q_map(self) -> np.ndarray:
        """Momentum transfer of each pixel centre in 1/Angstrom."""
        r_px, _ = self._radius_phi
        two_theta = np.arctan(r_px * self.pixel_size_mm * 1e-3 / self.distance_m)
        return 4 * np.pi / (self.wavelength_nm * 10.0) * np.sin(two_theta / 2)

    @cached_property
    def mask(self) -> np.ndarray:
        """Valid pixels (True); beam stop and dead pixels are False."""
        r_px, _ = self._radius_phi
        valid = r_px > self.beamstop_radius_px
        for y, x in self.dead_pixels:
            valid[y, x] = False
        return valid

    # -- intensity -------------------------------------------------------------------
    def _iq_1d(self, q: np.ndarray) -> np.ndarray:
        sharp = self.pattern == "sharp"
        iq = _iq_sphere_hardsphere(q, self.radius_nm, self.volfraction,
                                   0.0 if sharp else self.polydispersity, 3.47, 6.36)
        if sharp:
            return iq
        # Gaussian q resolution: wavelength spread (sigma = q dl/l / 2.355) plus the
        # geometric term of one pixel (sigma ~ pixel angular size / sqrt(12)).
        k = 2 * np.pi / (self.wavelength_nm * 10.0)
        sig_geo = k * (self.pixel_size_mm * 1e-3 / self.distance_m) / np.sqrt(12)
        sig = np.hypot(q * self.dlambda_over_lambda / 2.355, sig_geo)
        fine = np.linspace(max(q.min() * 0.5, 1e-5), q.max() * 1.3, 6000)
        i_fine = _iq_sphere_hardsphere(fine, self.radius_nm, self.volfraction,
                                       self.polydispersity, 3.47, 6.36)
        w = np.exp(-0.5 * ((fine[None, :] - q[:, None]) / sig[:, None]) ** 2)
        return (w @ i_fine) / w.sum(axis=1)

    @cached_property
    def _relative_frame(self) -> np.ndarray:
        """True mean frame normalised to sum 1 over the valid pixels."""
        q = self.q_map
        q_grid = np.linspace(q.min(), q.max(), 1500)
        iq = np.interp(q, q_grid, self._iq_1d(q_grid))
        if self.pattern == "anisotropic":
            _, phi = self._radius_phi
            a = np.deg2rad(self.lobe_angle_deg)
            w = np.deg2rad(self.lobe_width_deg)
            # distance to the lobe axis, folded so both opposite lobes count
            d = np.angle(np.exp(2j * (phi - a))) / 2
            iq = iq * (self.lobe_floor + (1 - self.lobe_floor) * np.exp(-0.5 * (d / w) ** 2))
        mask = self.mask
        iq = iq + self.background_fraction * iq[mask].mean()
        frame = np.where(mask, iq, 0.0)
        r_px, _ = self._radius_phi
        # the beam stop lets a little through; dead pixels see nothing
        frame[r_px <= self.beamstop_radius_px] = 1e-3 * iq[mask].min()
        for y, x in self.dead_pixels:
            frame[y, x] = 0.0
        return frame / frame[mask].sum()

    def expected_counts(self, time_s: float, attenuation: float = 1.0) -> np.ndarray:
        """True mean counts per pixel for one exposure.

        Parameters
        ----------
        time_s
            Exposure time in seconds (>= 0).
        attenuation
            Beam transmission factor in [0, 1].

        Returns
        -------
        numpy.ndarray
            float64 frame of shape ``shape``.
        """
        if not np.isfinite(time_s) or time_s < 0:
            raise SmartbeamInputError(f"time_s={time_s!r}: expected a finite exposure time >= 0")
        if not (0 <= attenuation <= 1):
            raise SmartbeamInputError(f"attenuation={attenuation!r}: expected a factor in [0, 1]")
        return self._relative_frame * (self.count_rate * time_s * attenuation)

    def expose(self, time_s: float, rng: np.random.Generator | None = None,
               attenuation: float = 1.0) -> np.ndarray:
        """One Poisson exposure (int32 frame) of ``time_s`` seconds."""
        rng = np.random.default_rng() if rng is None else rng
        return rng.poisson(self.expected_counts(time_s, attenuation)).astype(np.int32)

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable parameters; ``SANSSample.from_dict`` rebuilds the sample."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["beam_centre"] = list(self.beam_centre)
        d["dead_pixels"] = [list(p) for p in self.dead_pixels]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SANSSample:
        """Rebuild a sample from :meth:`to_dict` output."""
        d = dict(d)
        d["shape"] = tuple(d.get("shape", (128, 128)))
        if d.get("beam_centre") is not None:
            d["beam_centre"] = tuple(d["beam_centre"])
        d["dead_pixels"] = [tuple(p) for p in d.get("dead_pixels", [])]
        return cls(**d)
