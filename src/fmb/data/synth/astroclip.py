"""Synthetic AstroCLIP cross-match (DESI spectra x Legacy Survey g, r, z images) in its HDF5 schema.

One HDF5 file `astroclip_desi.h5` with up to 10 groups; per object: `image` (S, S, 3) float32
g, r, z flux in nanomaggies (S = 152 as in the real file; smaller for quick runs), `spectrum`
(7781, 1) float32 on the DESI grid, `redshift` float32, `targetid` int64, and the latent truth
`truth_type` (0 early, 1 late). The galaxies come from fmb.data.synth.galaxies, so one redshift
drives the colours and size of the image and the lines and continuum of the spectrum.
`missing={"image": r, "spectrum": r}` writes a share r of the images / spectra as NaN (HDF5 has
no nulls; fmb reads an all-NaN array as absent).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from fmb.data.surveys.astroclip import BANDS, FILE_NAME
from fmb.data.synth import check_missing, chunk_bounds, missing_rng, missing_rows
from fmb.data.synth import galaxies as gal

PIXEL_SCALE_ARCSEC = 0.262  # Legacy Survey DR9
PSF_SIGMA_PX = {"g": 2.3, "r": 2.1, "z": 2.0}
# f_lambda band means -> nanomaggies: a bright synthetic galaxy is tens of nanomaggies.
FLUX_TO_NANOMAGGIES = 60.0
SKY_SIGMA_NANOMAGGIES = 0.004  # per pixel
MAX_GROUPS = 10
IMAGE_CHUNK = 64  # objects at a time: a 152 x 152 x 3 cutout and its float64 intermediates are ~1 MB each


def make_group(n: int, rng: np.random.Generator, image_size: int) -> dict[str, np.ndarray]:
    g = gal.sample_galaxies(n, rng)
    radius = gal.angular_half_light_pixels(g, PIXEL_SCALE_ARCSEC)
    fluxes = gal.band_fluxes(g, list(BANDS))
    planes = []
    for band in BANDS:
        profile = gal.sersic_images(g, image_size, radius, PSF_SIGMA_PX[band])
        total = fluxes[band] * FLUX_TO_NANOMAGGIES
        planes.append(profile * total[:, None, None] + SKY_SIGMA_NANOMAGGIES * rng.standard_normal(profile.shape))
    flux, _ = gal.desi_spectra(g, rng)
    return {
        "image": np.stack(planes, axis=-1).astype(np.float32),
        "spectrum": flux[..., None],
        "redshift": g.redshift.astype(np.float32),
        "truth_type": g.kind.astype(np.int64),
    }


def write(out_dir: Path, n: int, seed: int, image_size: int = 152, chunk: int = IMAGE_CHUNK,
          missing: dict[str, float] | None = None) -> Path:
    """Write `n` objects to `out_dir/astroclip_desi.h5` in up to 10 groups, `chunk` at a time; returns
    the file path. `missing`: shares of objects without an image / a spectrum."""
    rates = check_missing(missing, ("image", "spectrum"), "astroclip")
    holes = missing_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILE_NAME
    rng = np.random.default_rng(seed)
    n_groups = max(1, min(MAX_GROUPS, n // 100))
    sizes = np.full(n_groups, n // n_groups)
    sizes[: n % n_groups] += 1
    tmp = path.with_suffix(".h5.tmp")
    first = 0
    with h5py.File(tmp, "w") as handle:
        for index, size in enumerate(sizes):
            group = handle.create_group(f"{index}")
            for start, end in chunk_bounds(0, int(size), chunk):
                values_of = make_group(end - start, rng, image_size)
                for name, rate in rates.items():
                    values_of[name][missing_rows(end - start, rate, holes)] = np.nan
                for name, values in values_of.items():
                    if name not in group:
                        group.create_dataset(name, shape=(int(size), *values.shape[1:]), dtype=values.dtype,
                                             chunks=(1, *values.shape[1:]) if values.ndim > 1 else None)
                    group[name][start:end] = values
            group.create_dataset("targetid", data=np.int64(39_627_000_000_000_000) + first + np.arange(size, dtype=np.int64))
            first += int(size)
    tmp.replace(path)
    return path
