"""Synthetic datasets written in the exact schemas of the real ones (latent truth as columns).

Each kind is a function `write(out_dir, n, seed) -> Path` in its own module, listed here
without importing it. Generators make and write `CHUNK` objects at a time, so memory stays flat
as `n` grows (the same seed gives the same data).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fmb.errors import ConfigError

CHUNK = 256  # objects generated and written at a time


def chunk_bounds(start: int, stop: int, size: int = CHUNK) -> Iterator[tuple[int, int]]:
    """(first, end) of consecutive chunks of at most `size` covering start..stop."""
    for first in range(start, stop, size):
        yield first, min(first + size, stop)


def write_parquet(path: Path, tables: Iterable[pa.Table], schema: pa.Schema | None, row_group_size: int) -> Path:
    """Stream tables into one parquet file, under a temporary name renamed when complete. The schema is
    `schema`, else the first table's; with `schema`, an empty iterable gives an empty file."""
    tmp = path.with_name(path.name + ".tmp")
    writer = pq.ParquetWriter(tmp, schema) if schema is not None else None
    try:
        for table in tables:
            if writer is None:
                schema = table.schema
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(table.cast(schema), row_group_size=row_group_size)
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, path)
    return path

# kind -> ("module:function", summary)
SYNTH_KINDS: dict[str, tuple[str, str]] = {
    "euclid-desi": ("fmb.data.synth.euclid_desi:write", "Euclid VIS/NISP cutouts + RGB + DESI spectra (parquet)"),
    "astrom3": ("fmb.data.synth.astrom3:write", "AstroM3 variable stars: light curves, LAMOST-like spectra, metadata, 10 classes"),
    "splus": ("fmb.data.synth.splus:write", "S-PLUS hypercube fields (datacube_<FIELD>.parquet) for astromodal"),
    "astroclip": ("fmb.data.synth.astroclip:write", "Legacy Survey g,r,z images + DESI spectra (AstroCLIP HDF5)"),
}


def write_synthetic(kind: str, out: Path, n: int, seed: int) -> Path:
    if kind not in SYNTH_KINDS:
        valid = ", ".join(sorted(SYNTH_KINDS)) or "(none yet)"
        raise ConfigError(f"unknown synthetic data kind '{kind}'. Valid kinds: {valid}")
    if n <= 0:
        raise ConfigError(f"-n must be positive, got {n}")
    target, _ = SYNTH_KINDS[kind]
    module_name, function = target.split(":")
    writer = getattr(importlib.import_module(module_name), function)
    return writer(Path(out), n, seed)
