"""Synthetic datasets written in the exact schemas of the real ones (latent truth as columns).

Each kind is a function `write(out_dir, n, seed, **options) -> Path` in its own module, listed in
the registry (fmb.models.SURVEY_KINDS, plus kinds a family brings). Generators make and write
`CHUNK` objects at a time, so memory stays flat as `n` grows (the same seed gives the same data).

Incomplete data: a generator taking `missing={modality: rate}` (`fmb data synth --missing
spectra=0.7,metadata=0.3`) checks the names with `check_missing` and, per chunk, nulls whole
modalities with `drop_modalities` (or `missing_masks` then `null_modalities`, to know the holes
first) and blanks single catalogue values with `blank_values`, drawing
from `missing_rng(seed)`: a stream of its own, so the objects are the same with and without it.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
            del table  # not alive while the next one is made
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- missing data


def parse_missing(text: str) -> dict[str, float]:
    """"spectra=0.7,metadata=0.3" -> {"spectra": 0.7, "metadata": 0.3} (ConfigError when malformed)."""
    rates = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            rates[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--missing {item!r}: expected modality=rate, e.g. spectra=0.7") from None
    return rates


def check_missing(missing: Mapping[str, float] | None, valid: Iterable[str], kind: str) -> dict[str, float]:
    """The missing-data rates `missing` checked against the modality names a generator knows: an
    unknown name or a rate outside [0, 1] is a ConfigError naming the valid ones."""
    valid = list(valid)
    rates = dict(missing or {})
    unknown = [name for name in rates if name not in valid]
    if unknown:
        raise ConfigError(f"--missing: unknown modality {', '.join(map(repr, unknown))} for '{kind}'; "
                          f"valid: {', '.join(valid)}")
    for name, rate in rates.items():
        if not 0.0 <= float(rate) <= 1.0:
            raise ConfigError(f"--missing {name}={rate}: a rate is a share of objects, between 0 and 1")
    return {name: float(rate) for name, rate in rates.items()}


def missing_rng(seed: int) -> np.random.Generator:
    """The random stream of the missing-data masks, independent of the objects' stream."""
    return np.random.default_rng([seed, zlib.crc32(b"missing")])


def missing_rows(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) bool: which of n objects lack a modality missing at `rate` (for formats without nulls,
    such as HDF5, where an absent array is written as NaN)."""
    return rng.random(n) < rate if rate > 0.0 else np.zeros(n, bool)


def missing_masks(n: int, rates: Mapping[str, float], modalities: Iterable[str],
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """{modality: (n,) bool} of the n objects that lack it, for each of `modalities` with a rate above 0
    (drawn one modality after the other, in their order); before the table exists, so a generator can
    plant things only where they will be seen."""
    return {name: missing_rows(n, rates[name], rng) for name in modalities if rates.get(name, 0.0) > 0.0}


def null_modalities(table: pa.Table, masks: Mapping[str, np.ndarray],
                    columns_by_modality: Mapping[str, Sequence[str]]) -> pa.Table:
    """`table` with every column of a modality null in the rows of its mask (`missing_masks`); rows
    already null stay null, columns the table lacks are left alone."""
    for modality, rows in masks.items():
        table = null_rows(table, [c for c in columns_by_modality[modality] if c in table.column_names], rows)
    return table


def drop_modalities(table: pa.Table, rates: Mapping[str, float], columns_by_modality: Mapping[str, Sequence[str]],
                    rng: np.random.Generator) -> pa.Table:
    """`table` with every column of a modality null for a random `rates[modality]` share of its rows
    (each modality drawn independently; rows already null stay null). Modalities without a rate,
    or columns the table lacks, are left alone."""
    masks = missing_masks(table.num_rows, rates, columns_by_modality, rng)
    return null_modalities(table, masks, columns_by_modality)


def null_rows(table: pa.Table, columns: Sequence[str], rows: np.ndarray) -> pa.Table:
    """`table` with `columns` null in the rows where `rows` (bool) is True."""
    drop = pa.array(np.asarray(rows, bool))
    for name in columns:
        index = table.schema.get_field_index(name)
        column = table.column(index).combine_chunks()
        table = table.set_column(index, table.schema.field(index), pc.if_else(drop, pa.nulls(len(column), column.type), column))
    return table


def blank_values(table: pa.Table, column: str, rate: float, rng: np.random.Generator,
                 positions: slice = slice(None)) -> pa.Table:
    """`table` with a random `rate` share of the values of a float column set to NaN (a list<float>
    column: of the elements at `positions` of each list, all lists of one length), as catalogues
    miss single values (coverage, depth, crowding)."""
    if rate <= 0.0:
        return table
    index = table.schema.get_field_index(column)
    array = table.column(index).combine_chunks()
    if pa.types.is_list(array.type):
        present = array.filter(array.is_valid())
        if not len(present):
            return table
        width = int(present.value_lengths()[0].as_py())
        values = array.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, width)
        chosen = np.zeros(width, bool)
        chosen[positions] = True
        values[(rng.random(values.shape) < rate) & chosen] = np.nan
        flat = pa.array(values.reshape(-1), array.type.value_type)
        offsets = np.concatenate([[0], np.cumsum(array.value_lengths().fill_null(0).to_numpy())]).astype(np.int32)
        blanked = pa.ListArray.from_arrays(pa.array(offsets), flat, mask=array.is_null())
    else:
        values = array.to_numpy(zero_copy_only=False).astype(np.float64)
        values[rng.random(len(values)) < rate] = np.nan
        blanked = pa.array(values, array.type, mask=array.is_null().to_numpy(zero_copy_only=False))
    return table.set_column(index, table.schema.field(index), blanked)
