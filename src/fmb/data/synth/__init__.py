"""Synthetic datasets written in the exact schemas of the real ones (latent truth as columns).

Each kind is a function `write(out_dir, n, seed, **options) -> Path` in its own module, listed in
the registry (fmb.models.SURVEY_KINDS, plus kinds a family brings). Generators make and write
`CHUNK` objects at a time, so memory stays flat as `n` grows (the same seed gives the same data).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

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
