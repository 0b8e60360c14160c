"""Synthetic Euclid + DESI matched sample in the schema of the published dataset.

Parquet shards `data/train-00000-of-00001.parquet` and `data/test-...` with the real columns
(object_id, targetid, redshift, RGB_image {bytes, path}, VIS/NISP_Y/NISP_J/NISP_H_image 2-D
arrays, spectrum {flux, wavelength, error}, sed_data {flux_*}) plus the latent truth as
`truth_*` columns. About 8% of rows have no spectrum (null), as in the real sample.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from fmb.data.images import encode_png
from fmb.data.synth import (
    check_missing,
    chunk_bounds,
    drop_modalities,
    missing_rng,
    write_parquet,
)
from fmb.data.synth import galaxies as gal

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


def schema() -> pa.Schema:
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
    ])


def make_table(n: int, seed: int, image_size: int = 64, first_id: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    g = gal.sample_galaxies(n, rng)
    radius = gal.angular_half_light_pixels(g, PIXEL_SCALE_ARCSEC)
    fluxes = gal.band_fluxes(g, list(EUCLID_BANDS) + list(SED_BANDS))
    bands = {}
    for band in EUCLID_BANDS:
        profile = gal.sersic_images(g, image_size, radius, PSF_SIGMA_PX[band])
        # total counts ~ band f_lambda x a band width factor, plus sky noise
        total = fluxes[band] * 400.0
        sky = 0.02 * np.median(total) / image_size
        bands[band] = (profile * total[:, None, None] + sky * rng.standard_normal(profile.shape)).astype(np.float32)
    rgb = gal.asinh_rgb(bands["NISP_H"], bands["NISP_Y"], bands["VIS"])
    flux, error = gal.desi_spectra(g, rng)
    has_spectrum = rng.random(n) >= MISSING_SPECTRUM_FRACTION
    wavelength = gal.DESI_WAVELENGTH.astype(np.float32)

    spectra = [
        {"flux": flux[i], "wavelength": wavelength, "error": error[i]} if has_spectrum[i] else None
        for i in range(n)
    ]
    object_ids = np.int64(2_600_000_000_000_000_000) + first_id + np.arange(n, dtype=np.int64) * 7919
    columns = {
        "object_id": object_ids,
        "targetid": np.int64(39_627_000_000_000_000) + first_id + np.arange(n, dtype=np.int64),
        "redshift": g.redshift,
        "RGB_image": [{"bytes": encode_png(rgb[i]), "path": None} for i in range(n)],
        **{f"{band}_image": [bands[band][i] for i in range(n)] for band in EUCLID_BANDS},
        "spectrum": spectra,
        "sed_data": [{f"flux_{b}": float(fluxes[b][i]) for b in SED_BANDS} for i in range(n)],
        "truth_type": g.kind,
        "truth_half_light_px": radius.astype(np.float32),
        "truth_axis_ratio": g.axis_ratio.astype(np.float32),
    }
    arrays = []
    for field in schema():
        values = columns[field.name]
        if field.name.endswith("_image") and field.name != "RGB_image":
            values = [v.tolist() for v in values]
        elif field.name == "spectrum":
            values = [None if v is None else {k: a.tolist() for k, a in v.items()} for v in values]
        arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema())


def write(out_dir: Path, n: int, seed: int, image_size: int = 64, chunk: int = OBJECTS_PER_CHUNK,
          missing: dict[str, float] | None = None) -> Path:
    """Write `n` objects split into train and test shards under `out_dir/data/`, `chunk` objects at a
    time (memory stays flat as `n` grows). `missing` = {modality: rate} nulls that share of the
    objects' image or spectrum (modalities: image, spectrum)."""
    rates = check_missing(missing, MISSING_COLUMNS, "euclid-desi")
    data_dir = Path(out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    n_test = max(1, int(round(n * TEST_FRACTION))) if n > 1 else 0
    for split, count, offset, split_seed in (("train", n - n_test, 0, seed), ("test", n_test, n, seed + 1)):
        if count == 0:
            continue
        holes = missing_rng(split_seed)

        def chunks(count=count, offset=offset, split_seed=split_seed, holes=holes):
            for first, end in chunk_bounds(0, count, chunk):
                # chunk 0 keeps the seed of the unchunked generator, so small samples are unchanged
                table = make_table(end - first, split_seed * 1000 + 17 + 7 * first, image_size, first_id=offset + first)
                yield drop_modalities(table, rates, MISSING_COLUMNS, holes)

        write_parquet(data_dir / f"{split}-00000-of-00001.parquet", chunks(), schema(), row_group_size=256)
    return Path(out_dir)
