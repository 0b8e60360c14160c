"""S-PLUS DR6 hypercube fields (`datacube_<FIELD>.parquet`, one row per source): schema and reader.

Columns (reference/data-formats.md section 4): `id` (string), `ra`, `dec`; `mag_pstotal_<b>` and
`err_mag_pstotal_<b>` for the 12 bands; morphology; `splus_cut_<BAND>` flattened 96 x 96 cutouts
(or null); Gaia DR3 (`gaia_*`) and Gaia XP coefficients; DESI arms `desi_{wave,flux,ivar}_{b,r,z}`;
spec-z; VISTA magnitudes. Most columns are null for most rows: missing is the normal case.

Reading: files are read in column-projected record batches. A column absent from a field is
treated as null for that field (logged once per file); the sample selection (upstream:
14 < mag_pstotal_r < 22, err < 2) is applied while reading.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fmb.data.tables import resolve_files
from fmb.errors import DataError

log = logging.getLogger("fmb")

# Catalogue band names (mag_pstotal_<b>) and their cutout names (splus_cut_<BAND>), in
# wavelength order, with central wavelengths in Angstrom.
BANDS = ("u", "j0378", "j0395", "j0410", "j0430", "g", "j0515", "r", "j0660", "i", "j0861", "z")
CUTOUT_BANDS = ("U", "F378", "F395", "F410", "F430", "G", "F515", "R", "F660", "I", "F861", "Z")
BAND_WAVELENGTHS = (3536, 3770, 3940, 4094, 4292, 4751, 5133, 6258, 6614, 7690, 8611, 8831)
MORPHOLOGY = ("ellipticity_det", "elongation_det", "a_pixel_det", "b_pixel_det", "theta_det", "fwhm_n_det")
GAIA_SCALARS = (
    "parallax", "parallax_error", "pmra", "pmra_error", "pmdec", "pmdec_error",
    "phot_g_mean_flux", "phot_g_mean_flux_error", "phot_bp_mean_flux", "phot_bp_mean_flux_error",
    "phot_rp_mean_flux", "phot_rp_mean_flux_error", "teff_gspphot", "logg_gspphot", "mh_gspphot",
)
XP_COEFFICIENTS = 55
VISTA_BANDS = ("y", "j", "h", "ks")
# DESI arms: (first wavelength, last wavelength) on the 0.8 Angstrom grid.
DESI_ARMS = {"b": (3600.0, 5930.0), "r": (5660.0, 7720.0), "z": (7420.0, 9824.0)}
CUTOUT_SIZE = 96
CLASSES = ("star", "galaxy", "qso")

# group -> (values column, uncertainty column, "ivar" or "error")
SPECTRUM_GROUPS: dict[str, tuple[str, str, str]] = {
    "desi_b": ("desi_flux_b", "desi_ivar_b", "ivar"),
    "desi_r": ("desi_flux_r", "desi_ivar_r", "ivar"),
    "desi_z": ("desi_flux_z", "desi_ivar_z", "ivar"),
    "gaiaxp_bp": ("gaiaxp_bp_coefficients", "gaiaxp_bp_coefficient_errors", "error"),
    "gaiaxp_rp": ("gaiaxp_rp_coefficients", "gaiaxp_rp_coefficient_errors", "error"),
}
CUTOUT_COLUMNS = [f"splus_cut_{b}" for b in CUTOUT_BANDS]
SHAPE_COLUMNS = ("a_pixel_det", "b_pixel_det", "theta_det")
TRUTH_COLUMNS = ("truth_class", "truth_redshift")


@dataclass
class Selection:
    """Rows kept: `low < mag < high` and `err < max_err` (upstream's scalar-fitting cut)."""

    mag_column: str = "mag_pstotal_r"
    err_column: str = "err_mag_pstotal_r"
    mag_range: tuple[float, float] = (14.0, 22.0)
    max_err: float = 2.0

    def mask(self, table: pa.Table, file: Path) -> np.ndarray:
        for name in (self.mag_column, self.err_column):
            if name not in table.column_names:
                raise DataError(f"{file}: selection column '{name}' is missing")
        mag = _floats(table.column(self.mag_column))
        err = _floats(table.column(self.err_column))
        low, high = self.mag_range
        with np.errstate(invalid="ignore"):
            return (mag > low) & (mag < high) & (err < self.max_err)


@dataclass
class FieldBatch:
    """Selected rows of one field file, with the columns asked for (absent ones are None)."""

    file: Path
    ids: list[str]
    columns: dict[str, pa.Array | None]

    def __len__(self) -> int:
        return len(self.ids)


def field_files(path: str | Path) -> list[Path]:
    files = resolve_files(path, None)
    if not files:
        raise DataError(f"no datacube_*.parquet files in {path}")
    return files


def read_fields(path: str | Path, columns: list[str], selection: Selection, batch_rows: int = 1024,
                max_rows: int | None = None, optional: tuple[str, ...] = ()) -> Iterator[FieldBatch]:
    """Selected rows of every field file, in column-projected record batches. Absent `columns`
    are logged; absent `optional` columns (truth columns of synthetic data) are not.
    `max_rows` is shared evenly between the fields, so a capped read still sees every field."""
    total = 0
    wanted = list(dict.fromkeys(["id", selection.mag_column, selection.err_column, *columns, *optional]))
    files = field_files(path)
    quota = None if max_rows is None else -(-max_rows // len(files))
    for file in files:
        parquet = pq.ParquetFile(file, memory_map=True)
        names = set(parquet.schema_arrow.names)
        if "id" not in names:
            raise DataError(f"{file}: column 'id' is missing; is this an S-PLUS hypercube file?")
        absent = [c for c in columns if c not in names]
        if absent:
            log.warning(f"{file.name}: {len(absent)} column(s) absent, read as missing: {', '.join(absent[:8])}"
                        + (" ..." if len(absent) > 8 else ""))
        kept_in_file = 0
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=[c for c in wanted if c in names]):
            table = pa.Table.from_batches([batch])
            keep = selection.mask(table, file)
            if not keep.any():
                continue
            table = table.filter(pa.array(keep))
            if quota is not None:
                table = table.slice(0, quota - kept_in_file)
            kept_in_file += table.num_rows
            total += table.num_rows
            yield FieldBatch(file, table.column("id").to_pylist(),
                             {c: (table.column(c).combine_chunks() if c in names else None)
                              for c in [*columns, *optional]})
            if quota is not None and kept_in_file >= quota:
                break
        if kept_in_file == 0:
            log.warning(f"{file.name}: no rows pass the selection ({selection.mag_range[0]} < "
                        f"{selection.mag_column} < {selection.mag_range[1]}, {selection.err_column} < "
                        f"{selection.max_err}); field skipped")
    if total == 0:
        raise DataError(f"{path}: no rows in any field pass the selection on {selection.mag_column} / "
                        f"{selection.err_column}")


def _floats(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """float64 values, NaN for nulls."""
    return np.asarray(pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def scalar_matrix(batch: FieldBatch, columns: list[str]) -> np.ndarray:
    """(n, C) float64, NaN where null, non-finite or absent from the field."""
    out = np.full((len(batch), len(columns)), np.nan)
    for j, name in enumerate(columns):
        column = batch.columns.get(name)
        if column is not None:
            out[:, j] = _floats(column)
    out[~np.isfinite(out)] = np.nan
    return out


def list_rows(batch: FieldBatch, name: str) -> list[np.ndarray | None]:
    """A list column as one float64 array per row (None where null or absent)."""
    column = batch.columns.get(name)
    if column is None:
        return [None] * len(batch)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float64)
    ends = np.cumsum(np.where(valid, lengths, 0))
    return [values[e - n:e] if ok else None for ok, n, e in zip(valid, lengths, ends, strict=True)]


def cutout_stack(batch: FieldBatch) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 12, 96, 96) float32 (zeros where a band is null) and band presence (n, 12)."""
    n, size = len(batch), CUTOUT_SIZE * CUTOUT_SIZE
    images = np.zeros((n, len(CUTOUT_COLUMNS), size), np.float32)
    present = np.zeros((n, len(CUTOUT_COLUMNS)), bool)
    for j, name in enumerate(CUTOUT_COLUMNS):
        column = batch.columns.get(name)
        if column is None:
            continue
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(valid & (lengths != size))
        if bad.size:
            i = bad[0]
            raise DataError(f"{batch.file}: column {name} of object {batch.ids[i]} has {lengths[i]} values, "
                            f"expected {size} (a flattened {CUTOUT_SIZE} x {CUTOUT_SIZE} cutout)")
        images[valid, j] = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, size)
        present[:, j] = valid
    return images.reshape(n, len(CUTOUT_COLUMNS), CUTOUT_SIZE, CUTOUT_SIZE), present


def object_key(ids: list[str]) -> np.ndarray:
    """Stable int64 keys of string ids (for hold-out hashing)."""
    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little", signed=True)
                     for i in ids], dtype=np.int64)
