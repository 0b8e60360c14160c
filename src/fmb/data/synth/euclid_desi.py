"""Synthetic Euclid + DESI matched sample in the schema of the published dataset.

Parquet shards `data/train-00000-of-00001.parquet` and `data/test-...` with the real columns
(object_id, targetid, redshift, RGB_image {bytes, path}, VIS/NISP_Y/NISP_J/NISP_H_image 2-D
arrays, spectrum {flux, wavelength, error}, sed_data {flux_*}) plus the latent truth as
`truth_*` columns. About 8% of rows have no spectrum (null), as in the real sample. Anomalies of
several kinds can be planted (`truth_anomaly`, fmb.data.synth.planted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from fmb.data.images import encode_png
from fmb.data.synth import (
    check_missing,
    chunk_bounds,
    missing_masks,
    missing_rng,
    null_modalities,
    write_parquet,
)
from fmb.data.synth import galaxies as gal
from fmb.data.synth.planted import anomaly_rng, plant
from fmb.errors import ConfigError

EUCLID_BANDS = ("VIS", "NISP_Y", "NISP_J", "NISP_H")
SED_BANDS = ("g", "r", "i", "z", "w1", "w2")
PIXEL_SCALE_ARCSEC = 0.1  # VIS pixels; NISP cutouts are resampled to the same grid here
PSF_SIGMA_PX = {"VIS": 0.8, "NISP_Y": 1.6, "NISP_J": 1.7, "NISP_H": 1.8}
MISSING_SPECTRUM_FRACTION = 0.08
TEST_FRACTION = 0.15
# 1024 64-px objects are ~0.3 GB in memory; samples up to this size are the same as when unchunked
OBJECTS_PER_CHUNK = 1024
# what `--missing` can remove, by modality
MISSING_COLUMNS = {"image": ("RGB_image", *[f"{b}_image" for b in EUCLID_BANDS]), "spectrum": ("spectrum",)}


def schema(anomalies: bool = False) -> pa.Schema:
    """The published columns plus the latent truth; `truth_anomaly` only for samples with planted anomalies."""
    image = pa.list_(pa.list_(pa.float32()))
    return pa.schema([
        ("object_id", pa.int64()),
        ("targetid", pa.int64()),
        ("redshift", pa.float64()),
        ("RGB_image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        *[(f"{band}_image", image) for band in EUCLID_BANDS],
        ("spectrum", pa.struct([("flux", pa.list_(pa.float32())), ("wavelength", pa.list_(pa.float32())),
                                ("error", pa.list_(pa.float32()))])),
        ("sed_data", pa.struct([(f"flux_{band}", pa.float32()) for band in SED_BANDS])),
        ("truth_type", pa.int64()),
        ("truth_half_light_px", pa.float32()),
        ("truth_axis_ratio", pa.float32()),
        *([("truth_anomaly", pa.string())] if anomalies else []),
    ])


@dataclass
class Chunk:
    """One chunk of objects as arrays, before they become a table (anomalies are planted here)."""

    galaxies: gal.Galaxies
    radius: np.ndarray  # (n,) half-light radius, pixels
    fluxes: dict[str, np.ndarray]  # band -> (n,) mean f_lambda
    bands: dict[str, np.ndarray]  # band -> (n, size, size) float32 counts
    sky: dict[str, float]  # band -> sky noise (counts per pixel)
    flux: np.ndarray  # (n, 7781) float32 spectra
    error: np.ndarray
    has_spectrum: np.ndarray  # (n,) bool
    psf_sigma: dict[str, float] = field(default_factory=lambda: dict(PSF_SIGMA_PX))
    pixel_scale: float = PIXEL_SCALE_ARCSEC

    @staticmethod
    def counts(fluxes: np.ndarray) -> np.ndarray:
        """Total image counts of a band from its mean f_lambda (a band-width factor)."""
        return fluxes * 400.0


def make_chunk(n: int, seed: int, image_size: int = 64) -> Chunk:
    """`n` normal objects drawn from `seed` (the draws in the order of the first, unchunked generator)."""
    rng = np.random.default_rng(seed)
    g = gal.sample_galaxies(n, rng)
    radius = gal.angular_half_light_pixels(g, PIXEL_SCALE_ARCSEC)
    fluxes = gal.band_fluxes(g, list(EUCLID_BANDS) + list(SED_BANDS))
    bands, sky = {}, {}
    for band in EUCLID_BANDS:
        profile = gal.sersic_images(g, image_size, radius, PSF_SIGMA_PX[band])
        total = Chunk.counts(fluxes[band])
        sky[band] = 0.02 * np.median(total) / image_size
        profile *= total[:, None, None]
        profile += sky[band] * rng.standard_normal(profile.shape)
        bands[band] = profile.astype(np.float32)
        del profile
    flux, error = gal.desi_spectra(g, rng)
    has_spectrum = rng.random(n) >= MISSING_SPECTRUM_FRACTION
    return Chunk(g, radius, fluxes, bands, sky, flux, error, has_spectrum)


def chunk_table(chunk: Chunk, first_id: int = 0, anomalies: np.ndarray | None = None) -> pa.Table:
    """The chunk's rows in the published schema, built from NumPy buffers (no per-pixel Python objects);
    with `anomalies` (the planted kinds, None for normal objects), a `truth_anomaly` column."""
    g, n = chunk.galaxies, len(chunk.galaxies)
    # a pixel masked (NaN) in any of the composite's bands is black in all three channels: the colour
    # of the bands left would be false (a VIS-only hole would show as a red patch), and black is how
    # a composite says "no data", so a masked patch looks the same whatever bands it covers
    planes = [chunk.bands[b] for b in ("NISP_H", "NISP_Y", "VIS")]
    masked = np.isnan(planes[0]) | np.isnan(planes[1]) | np.isnan(planes[2])
    rgb = gal.asinh_rgb(*(np.where(masked, np.float32(0.0), plane) for plane in planes))
    ids = np.arange(n, dtype=np.int64)
    columns = {
        "object_id": pa.array(np.int64(2_600_000_000_000_000_000) + first_id + ids * 7919),
        "targetid": pa.array(np.int64(39_627_000_000_000_000) + first_id + ids),
        "redshift": pa.array(g.redshift),
        "RGB_image": pa.StructArray.from_arrays(
            [pa.array([encode_png(image) for image in rgb], pa.binary()), pa.nulls(n, pa.string())], ["bytes", "path"]),
        **{f"{band}_image": image_array(chunk.bands[band]) for band in EUCLID_BANDS},
        "spectrum": pa.StructArray.from_arrays(
            [list_array(chunk.flux), list_array(np.broadcast_to(gal.DESI_WAVELENGTH.astype(np.float32), chunk.flux.shape)),
             list_array(chunk.error)], ["flux", "wavelength", "error"], mask=pa.array(~chunk.has_spectrum)),
        "sed_data": pa.StructArray.from_arrays([pa.array(chunk.fluxes[b].astype(np.float32)) for b in SED_BANDS],
                                               [f"flux_{b}" for b in SED_BANDS]),
        "truth_type": pa.array(g.kind),
        "truth_half_light_px": pa.array(chunk.radius.astype(np.float32)),
        "truth_axis_ratio": pa.array(g.axis_ratio.astype(np.float32)),
        "truth_anomaly": pa.array(anomalies, pa.string()) if anomalies is not None else None,
    }
    fields = schema(anomalies is not None)
    return pa.Table.from_arrays([columns[f.name] for f in fields], schema=fields)


def make_table(n: int, seed: int, image_size: int = 64, first_id: int = 0) -> pa.Table:
    """`n` objects drawn from `seed` as one table."""
    return chunk_table(make_chunk(n, seed, image_size), first_id)


def list_array(rows: np.ndarray) -> pa.ListArray:
    """(n, m) float32 -> list<float32> of n rows of m values."""
    n, m = rows.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * m),
                                    pa.array(np.ascontiguousarray(rows, np.float32).reshape(-1)))


def image_array(images: np.ndarray) -> pa.ListArray:
    """(n, h, w) float32 -> list<list<float32>>: n images of h rows of w pixels."""
    n, h, w = images.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * h), list_array(images.reshape(n * h, w)))


def write(out_dir: Path, n: int, seed: int, image_size: int = 64, chunk: int = OBJECTS_PER_CHUNK,
          missing: dict[str, float] | None = None, anomalies: float = 0.0) -> Path:
    """Write `n` objects split into train and test shards under `out_dir/data/`, `chunk` objects at a
    time (memory stays flat as `n` grows). `missing` = {modality: rate} nulls that share of the
    objects' image or spectrum (modalities: image, spectrum), the same objects with or without
    anomalies. `anomalies` > 0 plants anomalies in that share of the objects (fmb.data.synth.planted),
    each kind only on objects that keep a modality it is seen in, and adds `truth_anomaly`; the
    other objects are the same as without."""
    rates = check_missing(missing, MISSING_COLUMNS, "euclid-desi")
    if not 0.0 <= anomalies <= 1.0:
        raise ConfigError(f"--anomalies {anomalies}: a rate is a share of objects, between 0 and 1")
    data_dir = Path(out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    n_test = max(1, int(round(n * TEST_FRACTION))) if n > 1 else 0
    for split, count, offset, split_seed in (("train", n - n_test, 0, seed), ("test", n_test, n, seed + 1)):
        if count == 0:
            continue
        holes = missing_rng(split_seed)
        # chunk 0 keeps the seed of the unchunked generator, so small samples are unchanged
        tables = (_chunk(end - first, split_seed * 1000 + 17 + 7 * first, image_size, offset + first, anomalies,
                         rates, holes) for first, end in chunk_bounds(0, count, chunk))
        write_parquet(data_dir / f"{split}-00000-of-00001.parquet", tables, schema(anomalies > 0), row_group_size=256)
    return Path(out_dir)


def _chunk(n: int, seed: int, image_size: int, first_id: int, anomalies: float, rates: dict[str, float],
           holes: np.random.Generator) -> pa.Table:
    objects = make_chunk(n, seed, image_size)
    # the holes first, so anomalies are planted only where they stay visible
    lacks = missing_masks(n, rates, MISSING_COLUMNS, holes)
    kinds = None
    if anomalies > 0:
        kinds = plant(objects, anomalies, anomaly_rng(seed), {name: ~rows for name, rows in lacks.items()})
    return null_modalities(chunk_table(objects, first_id, kinds), lacks, MISSING_COLUMNS)
