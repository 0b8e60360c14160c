"""Targets from a catalogue (FITS via astropy, parquet or CSV) joined to embeddings on the object id.

`--catalog FILE --id-column ID --map redshift=Z --map mass=LOGM` reads only those columns. A
missing value (null, NaN, inf, or a sentinel such as -99) is counted per target and left missing:
those objects are excluded from that target only. Duplicate ids, an absent id or mapped column,
and a target with no usable value among the embedded objects are errors naming the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path

import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from fmb.errors import ConfigError, DataError

log = logging.getLogger("fmb")

SENTINELS = (-99.0, -999.0, -9999.0)  # "no measurement" in many survey catalogues
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fz")


@dataclass
class Catalog:
    path: Path
    ids: np.ndarray
    targets: dict[str, np.ndarray]  # target name -> values: float64 with NaN, or object with None
    units: dict[str, str] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)  # per target: null, non-finite or sentinel rows


def parse_mapping(items: list[str]) -> dict[str, str]:
    """`target=COLUMN` options -> {target: column}; a bare name maps to itself."""
    mapping = {}
    for item in items:
        target, _, column = item.partition("=")
        target, column = target.strip(), (column or target).strip()
        if not target or not column:
            raise ConfigError(f"--map {item!r}: write target=COLUMN, e.g. --map redshift=Z")
        mapping[target] = column
    return mapping


def read_catalog(path: str | Path, id_column: str, mapping: dict[str, str],
                 sentinels: tuple[float, ...] = SENTINELS) -> Catalog:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"catalogue not found: {path}")
    if not mapping:
        raise ConfigError(f"{path}: say which columns are targets, e.g. --map redshift=Z")
    wanted = [id_column, *dict.fromkeys(mapping.values())]
    columns, units = read_columns(path, wanted)
    ids = id_values(columns[id_column], path, id_column)
    check_unique(ids, path, id_column)
    catalog = Catalog(path, ids, {})
    for target, column in mapping.items():
        values, missing = _target_values(columns[column], sentinels)
        catalog.targets[target] = values
        catalog.missing[target] = int(missing.sum())
        if units.get(column):
            catalog.units[target] = units[column]
    return catalog


def read_columns(path: Path, wanted: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(column -> values, column -> unit) of a FITS, CSV or parquet table, reading only `wanted`; an
    absent column is an error naming the file and the columns it has (or the closest names)."""
    name = path.name.lower()
    if name.endswith(FITS_SUFFIXES):
        return _read_fits(path, wanted)
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        _check_columns(path, wanted, pa_csv.open_csv(path).schema.names)
        table = pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(include_columns=wanted))
    elif name.endswith(".parquet") or name.endswith(".pq") or path.is_dir():
        _check_columns(path, wanted, pq.read_schema(path).names)
        table = pq.read_table(path, columns=wanted)  # column projection: a wide catalogue stays cheap
    else:
        raise DataError(f"{path}: unknown catalogue format; use FITS ({', '.join(FITS_SUFFIXES)}), .parquet or .csv")
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in wanted}, {}


def _read_fits(path: Path, wanted: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        from astropy.io import fits
    except ImportError:
        raise ConfigError("FITS catalogues need astropy: pip install 'fmb[eval]'") from None
    with fits.open(path, memmap=True) as hdus:
        table_hdu = next((h for h in hdus if isinstance(h, fits.BinTableHDU | fits.TableHDU)), None)
        if table_hdu is None:
            raise DataError(f"{path}: no table extension")
        _check_columns(path, wanted, list(table_hdu.columns.names))
        data, units = {}, {}
        for column in wanted:
            values = np.asarray(table_hdu.data[column])
            if values.ndim != 1:
                raise DataError(f"{path}: column {column} holds arrays of shape {values.shape[1:]} per row; "
                                "a target is one value per object")
            if values.dtype.byteorder not in ("=", "|"):
                values = values.astype(values.dtype.newbyteorder("="))  # FITS is big-endian
            if values.dtype.kind == "S":
                values = np.char.strip(values.astype(str))
            data[column] = values
            unit = table_hdu.columns[column].unit
            if unit:
                units[column] = str(unit)
    return data, units


def _check_columns(path: Path, wanted: list[str], available: list[str]) -> None:
    for column in wanted:
        if column not in available:
            close = get_close_matches(column, available, n=3)
            hint = f" (closest: {', '.join(close)})" if close else f"; it has {', '.join(available[:20])}"
            raise DataError(f"{path}: no column '{column}'{hint}")


def id_values(values: np.ndarray, path: Path, column: str) -> np.ndarray:
    """Object ids as int64 (integer-valued floats too) or stripped text; a missing id is an error naming the file."""
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or (values != np.round(values)).any():
            raise DataError(f"{path}: id column '{column}' has missing or non-integer values")
        return values.astype(np.int64)
    if any(v is None for v in values):
        raise DataError(f"{path}: id column '{column}' has {sum(v is None for v in values)} missing values")
    return np.array([str(v).strip() for v in values], dtype=object)


def check_unique(ids: np.ndarray, path: Path, column: str, origins: np.ndarray | None = None) -> None:
    """Refuse repeated object ids, naming a few; with `origins` (the file of each id), also the files
    that hold the first repeated one."""
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) < len(ids):
        repeated = unique[counts > 1]
        where = ""
        if origins is not None:
            where = f"; {repeated[0]} is in {', '.join(sorted({str(o) for o in origins[ids == repeated[0]]}))}"
        raise DataError(f"{path}: {int((counts - 1)[counts > 1].sum())} duplicate values in id column '{column}' "
                        f"({len(repeated)} ids repeated, e.g. {', '.join(map(str, repeated[:3]))}{where})")


def _target_values(values: np.ndarray, sentinels: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(values, missing mask): numbers as float64 with NaN where missing, anything else as objects with None."""
    if values.dtype.kind in "iufb":
        numbers = values.astype(np.float64)
        missing = ~np.isfinite(numbers) | np.isin(numbers, np.asarray(sentinels, np.float64))
        numbers[missing] = np.nan
        return numbers, missing
    if values.dtype == object and all(v is None or isinstance(v, int | float) for v in values):
        return _target_values(np.array([np.nan if v is None else v for v in values], np.float64), sentinels)
    labels = np.array([None if v is None or str(v).strip() in ("", "nan", "None") else str(v).strip()
                       for v in values], dtype=object)
    return labels, np.array([v is None for v in labels])


def join(catalog: Catalog, ids: np.ndarray, what: str) -> dict[str, np.ndarray]:
    """The catalogue's targets for `ids` (missing where unmatched); reports matched and unmatched counts."""
    ids = comparable_ids(ids, catalog.ids)
    order = np.argsort(catalog.ids, kind="stable")
    sorted_ids = catalog.ids[order]
    position = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
    matched = sorted_ids[position] == ids if len(sorted_ids) else np.zeros(len(ids), bool)
    rows = order[position]
    log.info(f"{catalog.path}: {int(matched.sum())} of {len(ids)} objects of {what} matched; "
             f"{len(ids) - int(matched.sum())} without a catalogue row, "
             f"{len(catalog.ids) - int(matched.sum())} catalogue rows unused")
    if not matched.any():
        raise DataError(f"{catalog.path}: none of the {len(ids)} object ids of {what} is in the catalogue "
                        f"(e.g. {ids[:2].tolist()} against {catalog.ids[:2].tolist()})")
    out = {}
    for target, values in catalog.targets.items():
        joined = values[rows].copy()
        joined[~matched] = np.nan if joined.dtype.kind == "f" else None
        usable = np.isfinite(joined) if joined.dtype.kind == "f" else np.array([v is not None for v in joined])
        if not usable.any():
            raise DataError(f"{catalog.path}: target '{target}' has no usable value for the {int(matched.sum())} matched "
                            f"objects of {what} ({catalog.missing[target]} catalogue rows are null or a sentinel)")
        if catalog.missing[target]:
            log.info(f"{catalog.path}: target '{target}': {catalog.missing[target]} catalogue rows null, "
                     f"non-finite or a sentinel; {int(usable.sum())} matched objects usable")
        out[target] = joined
    return out


def comparable_ids(ids: np.ndarray, catalog_ids: np.ndarray) -> np.ndarray:
    """Embedding ids in the catalogue's id type (integers stay integers; otherwise compared as text)."""
    if catalog_ids.dtype.kind == "i" and ids.dtype.kind in "iu":
        return ids.astype(np.int64)
    if catalog_ids.dtype.kind == "i":
        raise DataError(f"object ids are text (e.g. {ids[:1].tolist()}) but the catalogue's are integers")
    return np.array([str(v) for v in ids], dtype=object)
