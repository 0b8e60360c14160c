"""Synthetic HSC g, r, i, z, y cutouts in the flux units the AION image codec reads (zero point 27).

The same galaxy model as the Euclid sample (fmb.data.synth.galaxies) seen through HSC: 0.168"
pixels, the typical Wide-layer seeing per band, and sky noise of a Wide coadd. Fluxes are the SED
averaged over each band (f_lambda-like, as for the synthetic Euclid bands) scaled so that the
median galaxy has i ~ 19.5 mag (total flux 1000). Used to pretrain a stand-in codec
(fmb.models.aion.standin) where the published AION weights are not available.
"""

from __future__ import annotations

import numpy as np

from fmb.data.synth import galaxies as gal

BANDS = ("g", "r", "i", "z", "y")
PIXEL_SCALE_ARCSEC = 0.168
SEEING_FWHM_ARCSEC = {"g": 0.8, "r": 0.75, "i": 0.6, "z": 0.65, "y": 0.7}
SKY_SIGMA = {"g": 0.03, "r": 0.04, "i": 0.05, "z": 0.08, "y": 0.12}  # per pixel, zero point 27
FLUX_SCALE = 7000.0  # galaxies.band_fluxes -> total flux at zero point 27 (median i-band total ~ 1000)
FWHM_PER_SIGMA = 2.3548


def hsc_cutouts(n: int, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """(n, 5, size, size) float32 HSC flux cutouts of freshly drawn galaxies, bands g..y."""
    g = gal.sample_galaxies(n, rng)
    radius = gal.angular_half_light_pixels(g, PIXEL_SCALE_ARCSEC)
    fluxes = gal.band_fluxes(g, list(BANDS))
    out = np.empty((n, len(BANDS), size, size), dtype=np.float32)
    for k, band in enumerate(BANDS):
        psf_sigma_px = SEEING_FWHM_ARCSEC[band] / FWHM_PER_SIGMA / PIXEL_SCALE_ARCSEC
        profile = gal.sersic_images(g, size, radius, psf_sigma_px)
        out[:, k] = profile * (fluxes[band] * FLUX_SCALE)[:, None, None]
        out[:, k] += SKY_SIGMA[band] * rng.standard_normal((n, size, size))
    return out
