"""Planted anomalies for the synthetic Euclid + DESI sample (`fmb data synth euclid-desi --anomalies R`).

A share R of the objects of each chunk is changed into one of the kinds below, chosen uniformly, and
the kind is stored in `truth_anomaly` (null for the others). Each kind is something real surveys have:

- spectrum_mismatch: the spectrum of another (star-forming) object 0.15-0.6 away in redshift, as
  from a fibre placed on the wrong target; the catalogue redshift stays the imaged object's.
- satellite_streak: a straight trail across the VIS cutout (VIS only: NISP images the field at
  another time).
- bleed_trail: a saturated star near the galaxy in every band, flat at each band's saturation level,
  with the charge above it bled along the VIS CCD column (the brighter the star, the longer the trail).
- cosmic_rays: 5-25 sharp hits and short tracks, not PSF-blurred, in VIS.
- masked_patch: a rectangle of NaN (bad or unexposed pixels) in VIS and, half the time, in each NISP band;
  black in all three channels of the RGB composite.
- lens_arc: a tangential arc and a fainter counter-image at an Einstein radius of 0.6-1.5 arcsec, bluer
  than the deflector, which becomes a massive early type (at z 0.2-0.9 if it was nearer).
- extreme_emission: an extreme emission-line galaxy: compact, hot, emission lines 10-30 times stronger.
- quasar: a point source with a power-law continuum and broad (FWHM ~ 4700 km/s) lines.
- merger: a companion galaxy at the same redshift 0.8-2 half-light radii away, in the images,
  the photometry and (half of its light) the spectrum.

Only the chosen objects change, drawn from a random stream of their own: the other objects are the
same as without anomalies. The truth columns follow the change (an extreme emission-line galaxy is
late-type, a lens deflector early-type, a quasar has truth_type 2, galaxies.QUASAR, and a half-light
radius of 0), and the kinds seen in the spectrum always have one. With modalities missing (`--missing`), each kind is planted only on objects that keep a
modality it is seen in (`SEEN_IN`): a chosen object that lacks it gets another kind it can show, and
one with neither image nor spectrum stays normal, so a label is never an anomaly no one could see.
Everything is vectorised over the objects of one kind in a chunk.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from fmb.data.spectral_lines import rest_wavelengths
from fmb.data.synth import galaxies as gal

if TYPE_CHECKING:
    from fmb.data.synth.euclid_desi import Chunk

# Quasar lines (vacuum rest Angstrom, fmb.data.spectral_lines), [OIII] narrow; EW (A).
QUASAR_LINES = rest_wavelengths(("Lya", "CIV", "CIII]", "MgII", "Hgamma", "Hbeta", "[OIII]5008", "Halpha"))
QUASAR_EW = np.array([80.0, 35.0, 20.0, 30.0, 25.0, 60.0, 15.0, 250.0])
QUASAR_BROAD = np.array([True, True, True, True, True, True, False, True])
BROAD_SIGMA_KMS, NARROW_SIGMA_KMS = 2000.0, 150.0
# a lensed star-forming source at z ~ 2 is bluer than its deflector: its band fluxes are the
# deflector's colours times (band centre / VIS centre)^-ARC_BLUENESS
ARC_BLUENESS = 1.5


def anomaly_rng(seed: int) -> np.random.Generator:
    """The random stream of a chunk's anomalies, independent of its objects' stream."""
    return np.random.default_rng([seed, zlib.crc32(b"anomalies")])


def plant(chunk: Chunk, rate: float, rng: np.random.Generator,
          present: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Change a random `rate` share of the chunk's objects in place; (n,) object array of the kinds
    (None for the objects left alone). `present` = {modality: (n,) bool} says which objects will keep
    their image and spectrum (all, for a modality not named)."""
    n = len(chunk.galaxies)
    chosen = rng.random(n) < rate
    kind = rng.integers(len(KINDS), size=n)
    shows = _shows(present or {}, n)
    unseen = chosen & ~shows[np.arange(n), kind]
    if unseen.any():  # no draw otherwise: the anomalies without missing modalities stay the same
        options = shows[unseen]
        pick = np.floor(rng.random(len(options)) * options.sum(axis=1))  # uniform among the kinds it shows
        kind[unseen] = np.argmax(options.cumsum(axis=1) > pick[:, None], axis=1)
        chosen[unseen] = options.any(axis=1)
    labels = np.full(n, None, dtype=object)
    for index, (name, change) in enumerate(KINDS.items()):
        rows = np.flatnonzero(chosen & (kind == index))
        if len(rows):
            change(chunk, rows, rng)
            labels[rows] = name
    return labels


def _shows(present: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """(n, kinds) bool: whether each object keeps what each kind is seen in (`SEEN_IN`)."""
    has = {modality: np.asarray(present.get(modality, np.ones(n, bool)), bool) for modality in ("image", "spectrum")}
    return np.stack([np.any([np.all([has[m] for m in needed], axis=0) for needed in SEEN_IN[name]], axis=0)
                     for name in KINDS], axis=1)


# ----------------------------------------------------------------------------- geometry


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel offsets from the image centre, (1, size, size) each."""
    coords = np.arange(size) - (size - 1) / 2.0
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    return yy[None], xx[None]


def _column(values: np.ndarray) -> np.ndarray:
    """(k,) -> (k, 1, 1), to broadcast against (k, size, size) images."""
    return np.asarray(values, np.float64)[:, None, None]


def _off_centre(k: int, size: int, rng: np.random.Generator, least: float) -> np.ndarray:
    """(k, 2) positions (dy, dx) inside the central 70% of the cutout, at least `least` px from the centre."""
    radius = rng.uniform(min(least, 0.3 * size), 0.35 * size, k)
    angle = rng.uniform(0.0, 2.0 * np.pi, k)
    return np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1)


def _point_sources(offset: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """Unit-flux Gaussian PSFs (k, size, size) at `offset` (k, 2) from the centre."""
    yy, xx = _grid(size)
    r2 = (yy - _column(offset[:, 0])) ** 2 + (xx - _column(offset[:, 1])) ** 2
    image = np.exp(-0.5 * r2 / sigma**2)
    return image / image.sum(axis=(1, 2), keepdims=True)


def _add(chunk: Chunk, band: str, rows: np.ndarray, light: np.ndarray) -> None:
    chunk.bands[band][rows] += light.astype(np.float32)


# ----------------------------------------------------------------------------- kinds


def spectrum_mismatch(chunk: Chunk, rows: np.ndarray, rng: np.random.Generator) -> None:
    k = len(rows)
    pool = gal.sample_galaxies(4 * k + 16, rng)
    late = np.flatnonzero(pool.kind == gal.LATE)
    donors = pool.take(np.concatenate([late, np.flatnonzero(pool.kind != gal.LATE)])[:k])
    z = chunk.galaxies.redshift[rows]
    step = rng.uniform(0.15, 0.6, k) * rng.choice([-1.0, 1.0], k)
    away = z + step
    donors.redshift = np.where((away < 0.03) | (away > 1.5), z - step, away)
    chunk.flux[rows], chunk.error[rows] = gal.desi_spectra(donors, rng)
    chunk.has_spectrum[rows] = True


def satellite_streak(chunk: Chunk, rows: np.ndarray, rng: np.random.Generator) -> None:
    k, size = len(rows), chunk.bands["VIS"].shape[-1]
    yy, xx = _grid(size)
    angle = _column(rng.uniform(0.0, np.pi, k))
    distance = -xx * np.sin(angle) + yy * np.cos(angle) - _column(rng.uniform(-0.35, 0.35, k) * size)
    width = _column(chunk.psf_sigma["VIS"] * rng.uniform(1.0, 1.5, k))
    brightness = _column(chunk.sky["VIS"] * rng.uniform(20.0, 100.0, k))
    _add(chunk, "VIS", rows, brightness * np.exp(-0.5 * (distance / width) ** 2))


def bleed_trail(chunk: Chunk, rows: np.ndarray, rng: np.random.Generator) -> None:
    k, size = len(rows), chunk.bands["VIS"].shape[-1]
    position = _off_centre(k, size, rng, least=6.0)
    overflow = np.exp(rng.uniform(np.log(5.0), np.log(50.0), k))  # star peak over the saturation level; faint ones commoner
    colour = rng.uniform(0.5, 1.5, (k, len(chunk.bands)))
    y_index, x_index = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    centre = np.rint(position + (size - 1) / 2.0).astype(int)
    for b, (band, images) in enumerate(chunk.bands.items()):
        image = images[rows].astype(np.float64)
        saturation = np.maximum(1.5 * image.max(axis=(1, 2)), 300.0 * chunk.sky[band])
        star = _point_sources(position, size, chunk.psf_sigma[band])
        image += star / star.max(axis=(1, 2), keepdims=True) * _column(saturation * overflow * colour[:, b])
        if band == "VIS":  # a CCD: the charge above the full well runs along the column, both ways, as far
            # as it takes to hold it, so a brighter star bleeds longer
            excess = np.clip(image - _column(saturation), 0.0, None).sum(axis=(1, 2)) / saturation
            length = _column(np.rint(np.clip(excess / 2.0, 2.0, size)))
            trail = (x_index[None] == _column(centre[:, 1])) & (np.abs(y_index[None] - _column(centre[:, 0])) <= length)
            image = np.where(trail, _column(saturation), image)
        images[rows] = np.minimum(image, _column(saturation)).astype(np.float32)


def cosmic_rays(chunk: Chunk, rows: np.ndarray, rng: np.random.Generator) -> None:
    k, size = len(rows), chunk.bands["VIS"].shape[-1]
    hits = rng.integers(5, 26, k)
    owner = np.repeat(np.arange(k), hits)  # one entry per hit
    start = rng.uniform(0, size, (len(owner), 2))
    angle = rng.uniform(0.0, 2.0 * np.pi, len(owner))
    length = rng.integers(1, 6, len(owner))  # pixels: hits at normal incidence up to short tracks
    energy = rng.uniform(20.0, 200.0, len(owner)) * chunk.sky["VIS"]
    step = np.arange(5)[None, :]
    y = np.rint(start[:, :1] + step * np.sin(angle)[:, None]).astype(int)
    x = np.rint(start[:, 1:] + step * np.cos(angle)[:, None]).astype(int)
    keep = (step < length[:, None]) & (y >= 0) & (y < size) & (x >= 0) & (x < size)
    images = chunk.bands["VIS"][rows].astype(np.float64)
    np.add.at(images, (np.broadcast_to(owner[:, None], y.shape)[keep], y[keep], x[keep]),
              np.broadcast_to(energy[:, None], y.shape)[keep])
    chunk.bands["VIS"][rows] = images.astype(np.float32)


def masked_patch(chunk: Chunk, rows: np.ndarray, rng: np.random.Generator) -> None:
    k, size = len(rows), chunk.bands["VIS"].shape[-1]
    height, width = (np.maximum(1, np.rint(rng.uniform(0.15, 0.5, k) * size)).astype(int) for _ in range(2))
    top, left = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
    y_index, x_index = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    inside = ((y_index[None] >= _column(top)) & (y_index[None] < _column(top + height))
              & (x_index[None] >= _column(left)) & (x_index[None] < _column(left + width)))
    for band, images in chunk.bands.items():
        which = np.ones(k, bool) if band == "VIS" else rng.random(k) < 0.5
        images[rows] = np.where(inside & which[:, None, None], np.float32(np.nan), images[rows])


def lens_arc(chunk: Chunk, rows: np.ndarray, rng: np.random.Generator) -> None:
    k, size = len(rows), chunk.bands["VIS"].shape[-1]
    # the deflector becomes what galaxy-scale lenses mostly are: a massive early type at z 0.2-0.9,
    # not a nearby dwarf (whose core would hide an arc of an arcsecond)
    g = chunk.galaxies.take(rows)
    g.kind[:] = gal.EARLY
    g.redshift = np.where(g.redshift < 0.2, rng.uniform(0.2, 0.9, k), g.redshift)
    g.luminosity = np.maximum(g.luminosity, 1.0) * rng.uniform(2.0, 4.0, k)
    g.half_light_kpc = rng.lognormal(np.log(5.0), 0.3, k)
    g.temperature = rng.normal(4600.0, 400.0, k).clip(3500.0, 15000.0)
    g.break_depth = rng.uniform(0.35, 0.55, k)
    g.line_strength = np.zeros(k)
    g.sersic_n = rng.uniform(3.0, 5.0, k)
    g.axis_ratio = rng.uniform(0.6, 1.0, k)
    _become(chunk, rows, g, rng)
    yy, xx = _grid(size)
    einstein = _column(np.minimum(rng.uniform(0.6, 1.5, k) / chunk.pixel_scale, 0.4 * size))  # arcsec -> px
    radius, theta = np.sqrt(yy**2 + xx**2), np.arctan2(yy, xx)
    direction = _column(rng.uniform(0.0, 2.0 * np.pi, k))
    extent = _column(rng.uniform(0.4, 1.2, k))  # radians, half-width of the arc
    thickness = _column(rng.uniform(0.6, 1.2, k))

    def arc(centre: np.ndarray, at: np.ndarray, spread: np.ndarray) -> np.ndarray:
        apart = np.angle(np.exp(1j * (theta - centre)))  # wrapped to [-pi, pi]
        return np.exp(-0.5 * ((radius - at) / thickness) ** 2 - 0.5 * (apart / spread) ** 2)

    light = arc(direction, einstein, extent) + 0.3 * arc(direction + np.pi, 0.6 * einstein, extent / 3.0)
    light /= light.sum(axis=(1, 2), keepdims=True)
    share = rng.uniform(0.4, 1.0, k)  # of the deflector's VIS light
    centre = {band: np.mean(gal.BANDS[band]) for band in chunk.bands}
    for band in chunk.bands:
        total = chunk.counts(chunk.fluxes[band][rows]) * share * (centre[band] / centre["VIS"]) ** -ARC_BLUENESS
        _add(chunk, band, rows, gal.gaussian_blur(light, chunk.psf_sigma[band]) * _column(total))


def extreme_emission(chunk: Chunk, rows: np.ndarray, rng: np.random.Generator) -> None:
    k = len(rows)
    g = chunk.galaxies.take(rows)
    g.kind[:] = gal.LATE
    g.line_strength = rng.lognormal(np.log(30.0), 0.5, k) * rng.uniform(10.0, 30.0, k)
    g.temperature = rng.uniform(12000.0, 15000.0, k)
    g.break_depth = rng.uniform(0.0, 0.05, k)
    g.half_light_kpc = g.half_light_kpc * 0.4
    g.sersic_n = rng.uniform(0.8, 1.5, k)
    _become(chunk, rows, g, rng)
    chunk.has_spectrum[rows] = True


def quasar(chunk: Chunk, rows: np.ndarray, rng: np.random.Generator) -> None:
    k, size = len(rows), chunk.bands["VIS"].shape[-1]
    z = chunk.galaxies.redshift[rows]
    luminosity = chunk.galaxies.luminosity[rows] * rng.uniform(3.0, 10.0, k)
    slope = rng.normal(-1.5, 0.3, k)  # f_lambda ~ lambda^slope

    def sed(wavelength: np.ndarray) -> np.ndarray:
        rest = wavelength[None, :] / (1.0 + z[:, None])
        continuum = (rest / 5500.0) ** slope[:, None]
        sigma = QUASAR_LINES * np.where(QUASAR_BROAD, BROAD_SIGMA_KMS, NARROW_SIGMA_KMS) / 299_792.458
        lines = np.zeros_like(rest)
        for centre, ew, width in zip(QUASAR_LINES, QUASAR_EW, sigma, strict=True):
            lines += ew * np.exp(-0.5 * ((rest - centre) / width) ** 2) / (np.sqrt(2 * np.pi) * width)
        return 8.0 * continuum * (1.0 + lines) / (1.0 + z[:, None]) * (luminosity * gal.distance_dimming(z))[:, None]

    fluxes = {band: sed(np.linspace(*gal.BANDS[band], 64)).mean(axis=1) for band in chunk.fluxes}
    centre = np.zeros((k, 2))
    profiles = {band: _point_sources(centre, size, chunk.psf_sigma[band]) for band in chunk.bands}
    _redraw(chunk, rows, profiles, fluxes, rng)
    chunk.galaxies.kind[rows] = gal.QUASAR
    chunk.radius[rows] = 0.0
    chunk.flux[rows], chunk.error[rows] = gal.desi_noise(sed(gal.DESI_WAVELENGTH), rng)
    chunk.has_spectrum[rows] = True


def merger(chunk: Chunk, rows: np.ndarray, rng: np.random.Generator) -> None:
    k, size = len(rows), chunk.bands["VIS"].shape[-1]
    companion = gal.sample_galaxies(k, rng)
    companion.redshift = chunk.galaxies.redshift[rows] + rng.normal(0.0, 0.001, k)
    companion.luminosity = chunk.galaxies.luminosity[rows] * rng.uniform(0.3, 1.0, k)
    radius = gal.angular_half_light_pixels(companion, chunk.pixel_scale)
    separation = np.clip(chunk.radius[rows] * rng.uniform(0.8, 2.0, k), 3.0, 0.35 * size)
    angle = rng.uniform(0.0, 2.0 * np.pi, k)
    offset = np.stack([separation * np.sin(angle), separation * np.cos(angle)], axis=1)
    fluxes = gal.band_fluxes(companion, list(chunk.fluxes))
    for band in chunk.bands:
        profile = gal.sersic_images(companion, size, radius, chunk.psf_sigma[band], offset)
        _add(chunk, band, rows, profile * _column(chunk.counts(fluxes[band])))
    for band, values in fluxes.items():  # the photometry blends the pair
        chunk.fluxes[band][rows] += values
    # about half the companion's light falls in the fibre
    chunk.flux[rows] += (0.5 * gal.observed_sed(companion, gal.DESI_WAVELENGTH)).astype(np.float32)


def _become(chunk: Chunk, rows: np.ndarray, g: gal.Galaxies, rng: np.random.Generator) -> None:
    """Replace the objects at `rows` by the galaxies `g`: truth, images, photometry and spectrum (which
    stays null where it was)."""
    radius = gal.angular_half_light_pixels(g, chunk.pixel_scale)
    fluxes = gal.band_fluxes(g, list(chunk.fluxes))
    size = chunk.bands["VIS"].shape[-1]
    profiles = {band: gal.sersic_images(g, size, radius, chunk.psf_sigma[band]) for band in chunk.bands}
    _redraw(chunk, rows, profiles, fluxes, rng)
    for name, value in vars(g).items():
        getattr(chunk.galaxies, name)[rows] = value
    chunk.radius[rows] = radius
    chunk.flux[rows], chunk.error[rows] = gal.desi_spectra(g, rng)


def _redraw(chunk: Chunk, rows: np.ndarray, profiles: dict[str, np.ndarray], fluxes: dict[str, np.ndarray],
            rng: np.random.Generator) -> None:
    """Replace the objects' images by unit-flux `profiles` scaled to their new `fluxes`, with the
    chunk's sky noise, and their photometry by `fluxes`."""
    for band, profile in profiles.items():
        image = profile * _column(chunk.counts(fluxes[band])) + chunk.sky[band] * rng.standard_normal(profile.shape)
        chunk.bands[band][rows] = image.astype(np.float32)
    for band, values in fluxes.items():
        chunk.fluxes[band][rows] = values


KINDS: dict[str, Callable[[Chunk, np.ndarray, np.random.Generator], None]] = {
    "spectrum_mismatch": spectrum_mismatch,
    "satellite_streak": satellite_streak,
    "bleed_trail": bleed_trail,
    "cosmic_rays": cosmic_rays,
    "masked_patch": masked_patch,
    "lens_arc": lens_arc,
    "extreme_emission": extreme_emission,
    "quasar": quasar,
    "merger": merger,
}
# where each kind is seen: the object must keep all the modalities of one of these sets
SEEN_IN: dict[str, tuple[tuple[str, ...], ...]] = {
    "spectrum_mismatch": (("image", "spectrum"),),  # a spectrum that disagrees with the imaged object
    "satellite_streak": (("image",),),
    "bleed_trail": (("image",),),
    "cosmic_rays": (("image",),),
    "masked_patch": (("image",),),
    "lens_arc": (("image",),),
    "extreme_emission": (("image",), ("spectrum",)),  # compact and hot, or the lines
    "quasar": (("image",), ("spectrum",)),  # a point source, or the broad lines
    "merger": (("image",),),  # the companion's lines sit at the host's redshift
}
