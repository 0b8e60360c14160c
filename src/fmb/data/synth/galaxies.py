"""Synthetic galaxies: one latent redshift and type per object drive every modality.

Rest-frame SED: a stellar continuum (temperature by type) with a 4000 A break, stellar
absorption lines, and nebular emission lines for star-forming types. Observed spectra are the
SED redshifted onto the DESI grid and dimmed with distance, plus noise; band fluxes are the
SED averaged over each band's wavelength range; images are Sersic profiles (de Vaucouleurs
for early types, exponential discs with two arms for late types) whose angular size shrinks
with redshift, blurred by a Gaussian PSF, with sky noise.

Everything is vectorised over objects; a NumPy Generator makes it reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmb.data.spectral_lines import rest_wavelengths
from fmb.data.surveys.euclid_desi import DESI_WAVELENGTH

# Rest-frame lines (vacuum Angstrom, fmb.data.spectral_lines) and their strengths (emission: relative to Halpha)
EMISSION_LINES = rest_wavelengths(("[OII]", "Hbeta", "[OIII]4960", "[OIII]5008", "[NII]6550", "Halpha", "[NII]6585",
                                   "[SII]6718", "[SII]6733"))
EMISSION_RATIOS = np.array([1.2, 0.35, 0.25, 0.75, 0.12, 1.0, 0.35, 0.2, 0.15])
ABSORPTION_LINES = rest_wavelengths(("CaK", "CaH", "Gband", "Mgb", "NaD"))
ABSORPTION_DEPTHS = np.array([0.35, 0.3, 0.15, 0.18, 0.12])

# Band wavelength ranges (Angstrom) used to average the SED.
BANDS = {
    "VIS": (5500.0, 9000.0),
    "NISP_Y": (9500.0, 12120.0),
    "NISP_J": (11680.0, 15670.0),
    "NISP_H": (15220.0, 20210.0),
    "g": (4000.0, 5500.0),
    "r": (5600.0, 7200.0),
    "i": (6900.0, 8500.0),
    "z": (8300.0, 10000.0),
    "y": (9400.0, 10700.0),
    "w1": (30000.0, 38000.0),
    "w2": (41000.0, 51000.0),
}

EARLY, LATE = 0, 1
QUASAR = 2  # never drawn: the truth_type of a planted quasar (fmb.data.synth.planted)
SED_BLOCK = 16  # objects per block when evaluating SEDs on the 7781-pixel DESI grid
# relative DESI noise along the grid: higher at the red end (sky lines)
DESI_SKY = 1.0 + 0.8 * (DESI_WAVELENGTH > 7600) + 0.5 * np.sin(DESI_WAVELENGTH / 37.0) ** 8
IMAGE_BLOCK = 128  # objects per block when drawing profiles


@dataclass
class Galaxies:
    """Latent truth of n galaxies."""

    redshift: np.ndarray
    kind: np.ndarray  # EARLY or LATE (QUASAR once planted)
    temperature: np.ndarray  # continuum colour temperature (K)
    break_depth: np.ndarray  # 4000 A break
    line_strength: np.ndarray  # emission-line equivalent strength (0 for early types)
    luminosity: np.ndarray  # arbitrary units
    half_light_kpc: np.ndarray
    sersic_n: np.ndarray
    axis_ratio: np.ndarray
    position_angle: np.ndarray  # radians
    arm_phase: np.ndarray

    def __len__(self) -> int:
        return len(self.redshift)

    def take(self, rows: np.ndarray | slice) -> Galaxies:
        """The galaxies at `rows` (indices, a mask or a slice)."""
        return Galaxies(**{name: value[rows] for name, value in vars(self).items()})


def sample_galaxies(n: int, rng: np.random.Generator) -> Galaxies:
    kind = (rng.random(n) < 0.55).astype(np.int64)
    late = kind == LATE
    redshift = 0.03 + 1.3 * rng.beta(2.0, 4.0, n)
    return Galaxies(
        redshift=redshift,
        kind=kind,
        temperature=np.where(late, rng.normal(8500, 1200, n), rng.normal(4600, 400, n)).clip(3500, 15000),
        break_depth=np.where(late, rng.uniform(0.05, 0.2, n), rng.uniform(0.35, 0.55, n)),
        line_strength=np.where(late, rng.lognormal(np.log(30.0), 0.5, n), 0.0),
        luminosity=rng.lognormal(0.0, 0.4, n),
        half_light_kpc=np.where(late, rng.lognormal(np.log(5.0), 0.3, n), rng.lognormal(np.log(3.0), 0.3, n)),
        sersic_n=np.where(late, rng.uniform(0.8, 1.5, n), rng.uniform(3.0, 5.0, n)),
        axis_ratio=np.where(late, rng.uniform(0.25, 1.0, n), rng.uniform(0.6, 1.0, n)),
        position_angle=rng.uniform(0, np.pi, n),
        arm_phase=rng.uniform(0, 2 * np.pi, n),
    )


def rest_sed(g: Galaxies, rest_wavelength: np.ndarray) -> np.ndarray:
    """f_lambda (arbitrary units) at rest wavelengths: (n, m) for (m,) or (n, m) wavelengths."""
    lam = np.broadcast_to(rest_wavelength, (len(g), rest_wavelength.shape[-1]))
    lam_um = lam * 1e-4
    temp = g.temperature[:, None]
    # Planck shape in lambda, normalised at 5500 A so temperature changes colour, not brightness.
    planck = lambda wl_um: wl_um**-5 / np.expm1(14388.0 / (wl_um * temp))  # noqa: E731
    continuum = planck(lam_um) / planck(np.full_like(temp, 0.55))
    continuum = continuum * (1.0 - g.break_depth[:, None] * 0.5 * (1.0 - np.tanh((lam - 4000.0) / 80.0)))
    sigma = 2.5  # Angstrom, ~150 km/s
    absorption = (ABSORPTION_DEPTHS * np.exp(-0.5 * ((lam[..., None] - ABSORPTION_LINES) / 4.0) ** 2)).sum(-1)
    absorption = absorption * np.where(g.kind == EARLY, 1.0, 0.3)[:, None]
    # Unit-area Gaussians times line_strength: the equivalent width (A) of Halpha on a unit continuum.
    emission = (EMISSION_RATIOS * np.exp(-0.5 * ((lam[..., None] - EMISSION_LINES) / sigma) ** 2)).sum(-1)
    emission = emission * g.line_strength[:, None] / (np.sqrt(2 * np.pi) * sigma)
    return continuum * (1.0 - absorption) + emission


def distance_dimming(redshift: np.ndarray) -> np.ndarray:
    """Flux scale ~ 1 / luminosity distance^2, with d_L ~ z (1 + z) (cosmology-free, monotonic)."""
    d_l = redshift * (1.0 + redshift)
    return 1.0 / (d_l / 0.1) ** 2


def observed_sed(g: Galaxies, observed_wavelength: np.ndarray) -> np.ndarray:
    """Observed-frame f_lambda (DESI-like units of 1e-17 erg/s/cm^2/A) at observed wavelengths."""
    z = g.redshift[:, None]
    flux = rest_sed(g, observed_wavelength[None, :] / (1.0 + z)) / (1.0 + z)
    return 8.0 * flux * (g.luminosity * distance_dimming(g.redshift))[:, None]


def band_fluxes(g: Galaxies, bands: list[str], samples: int = 64) -> dict[str, np.ndarray]:
    """Mean observed f_lambda over each band's range: {band: (n,)}."""
    out = {}
    for band in bands:
        lo, hi = BANDS[band]
        out[band] = observed_sed(g, np.linspace(lo, hi, samples)).mean(axis=1)
    return out


def desi_spectra(g: Galaxies, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(flux, error) on the DESI grid, (n, 7781) float32 each, with `desi_noise`'s noise."""
    depth = rng.uniform(0.7, 1.3, (len(g), 1))  # drawn for every object before the pixel noise
    flux = np.empty((len(g), len(DESI_WAVELENGTH)), np.float32)
    error = np.empty_like(flux)
    # a block of objects at a time: the line profiles are (objects, pixels, lines) float64 temporaries
    for first in range(0, len(g), SED_BLOCK):
        block = slice(first, first + SED_BLOCK)
        flux[block], error[block] = _noisy(observed_sed(g.take(block), DESI_WAVELENGTH), depth[block], rng)
    return flux, error


def desi_noise(flux: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(noisy flux, error) float32 from noise-free (n, 7781) `flux`: the DESI noise level, higher at
    the red end (sky), times a per-object depth factor."""
    return _noisy(flux, rng.uniform(0.7, 1.3, (len(flux), 1)), rng)


def _noisy(flux: np.ndarray, depth: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    error = 0.25 * DESI_SKY[None, :] * depth
    noisy = rng.standard_normal(flux.shape)
    noisy *= error  # in place: flux + error x noise without more (n, 7781) float64 temporaries
    noisy += flux
    return noisy.astype(np.float32), error.astype(np.float32)


def angular_half_light_pixels(g: Galaxies, pixel_scale_arcsec: float) -> np.ndarray:
    """Half-light radius in pixels: physical size over an angular-diameter distance that peaks
    near z ~ 1.5 (d_A ~ z / (1 + z)^2 scaled), so size falls with redshift over the sample."""
    d_a = g.redshift / (1.0 + g.redshift) ** 1.3
    arcsec = 0.3 * g.half_light_kpc / (d_a / 0.1)
    return np.clip(arcsec / pixel_scale_arcsec, 1.0, None)


def sersic_images(g: Galaxies, size: int, radius_px: np.ndarray, psf_sigma_px: float,
                  offset: np.ndarray | None = None) -> np.ndarray:
    """Unit-flux profiles (n, size, size): elliptical Sersic, two-armed for late types, PSF-blurred;
    centred, or `offset` (n, 2) pixels (dy, dx) away from the centre."""
    out = np.empty((len(g), size, size))
    for first in range(0, len(g), IMAGE_BLOCK):  # a block at a time: each profile takes ~10 temporaries
        block = slice(first, first + IMAGE_BLOCK)
        out[block] = _sersic(g.take(block), size, radius_px[block], psf_sigma_px,
                             None if offset is None else offset[block])
    return out


def _sersic(g: Galaxies, size: int, radius_px: np.ndarray, psf_sigma_px: float, offset: np.ndarray | None) -> np.ndarray:
    coords = np.arange(size) - (size - 1) / 2.0
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    if offset is not None:
        yy, xx = yy - offset[:, 0, None, None], xx - offset[:, 1, None, None]
    cos, sin = np.cos(g.position_angle)[:, None, None], np.sin(g.position_angle)[:, None, None]
    major = xx * cos + yy * sin
    minor = (-xx * sin + yy * cos) / g.axis_ratio[:, None, None]
    radius = np.sqrt(major**2 + minor**2) + 1e-3
    n = g.sersic_n[:, None, None]
    b_n = 2.0 * n - 1.0 / 3.0
    profile = np.exp(-b_n * ((radius / radius_px[:, None, None]) ** (1.0 / n) - 1.0))
    theta = np.arctan2(minor, major)
    arms = 1.0 + 0.6 * np.cos(2.0 * theta - 3.0 * np.log(radius / radius_px[:, None, None] + 0.3) + g.arm_phase[:, None, None])
    profile = profile * np.where((g.kind == LATE)[:, None, None], arms, 1.0)
    profile = gaussian_blur(profile, psf_sigma_px)
    return profile / profile.sum(axis=(1, 2), keepdims=True)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (n, h, w) images via FFT-free 1-D convolutions."""
    if sigma <= 0:
        return images
    half = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(images, ((0, 0), (half, half), (half, half)), mode="edge")
    rows = sum(k * padded[:, i : i + images.shape[1], :] for i, k in enumerate(kernel))
    return sum(k * rows[:, :, i : i + images.shape[2]] for i, k in enumerate(kernel))


def asinh_rgb(red: np.ndarray, green: np.ndarray, blue: np.ndarray, q: float = 8.0) -> np.ndarray:
    """Lupton-style asinh colour composite of (n, h, w) planes -> (n, h, w, 3) uint8."""
    out = np.empty((*red.shape, 3), np.uint8)
    for first in range(0, len(red), IMAGE_BLOCK):  # a block at a time: float temporaries of 3 planes
        block = slice(first, first + IMAGE_BLOCK)
        out[block] = _asinh_rgb(red[block], green[block], blue[block], q)
    return out


def _asinh_rgb(red: np.ndarray, green: np.ndarray, blue: np.ndarray, q: float) -> np.ndarray:
    stack = np.clip(np.stack([red, green, blue], axis=-1), 0.0, None)  # sky noise can be negative
    scale = np.percentile(stack.sum(-1), 99.5, axis=(1, 2))[:, None, None, None] + 1e-12
    total = stack.sum(-1, keepdims=True) / scale
    stretched = np.arcsinh(q * total) / q
    rgb = stack / scale * stretched / np.maximum(total, 1e-6)
    return (np.clip(rgb * 3.0, 0, 1) * 255).round().astype(np.uint8)
