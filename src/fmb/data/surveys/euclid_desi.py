"""The Euclid + DESI matched sample (parquet shards or a `save_to_disk` directory): schema and reader.

Columns (reference/data-formats.md section 1): object_id, targetid, redshift, RGB_image {bytes, path},
VIS/NISP_Y/NISP_J/NISP_H_image 2-D float arrays, spectrum {flux, wavelength, error} on the DESI grid,
sed_data {flux_*}. Helpers shared by the families that read it: split selection (with a deterministic
hold-out when the dataset has no validation split), RGB decoding and resizing, DESI spectrum checks
and cleaning, Euclid band conversion. torch is imported only by the functions that make tensors, so
the synthetic generator can use the schema without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmb.data.images import decode_image, image_bytes
from fmb.data.splits import holdout_mask
from fmb.data.tables import TableSource, available_splits, column_names
from fmb.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fmb")

DESI_PIXELS = 7781
DESI_WAVELENGTH = 3600.0 + 0.8 * np.arange(DESI_PIXELS)  # the coadd grid (Angstrom)
DESI_WAVELENGTH.flags.writeable = False  # shared by every reader
# truth columns holding text: the kind of a planted anomaly of synthetic data, null for normal objects
TEXT_TRUTH_COLUMNS = ("truth_anomaly",)
EUCLID_BAND_COLUMNS = ("VIS_image", "NISP_Y_image", "NISP_J_image", "NISP_H_image")
# What `rgb_array` and `desi_flux` read, as TableSource columns: the struct fields they use and no
# more (the RGB path, and the spectrum's error array, which only AION's inverse variance needs).
RGB_COLUMNS = ["RGB_image.bytes"]
FLUX_COLUMNS = ["spectrum.flux", "spectrum.wavelength"]
# Per-band zero points (Jy) for the flux conversion factor ZP_nu / 3631.
EUCLID_ZERO_POINTS = {"VIS_image": 2835.34, "NISP_Y_image": 1916.10, "NISP_J_image": 1370.25, "NISP_H_image": 918.35}


@dataclass
class SplitRows:
    """Rows of one split: a column-projected source and the row indices that belong to the split."""

    source: TableSource
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def row(self, i: int) -> dict:
        return self.source.row(int(self.indices[i]))

    def shuffle_blocks(self) -> list[np.ndarray] | None:
        """Positions grouped by parquet row group (see fmb.train.loader.ResumableSampler); None for
        memory-mapped Arrow, where any order is cheap."""
        if not self.source.compressed:
            return None
        chunks = self.source.chunk_of(self.indices)
        order = np.argsort(chunks, kind="stable")
        bounds = np.flatnonzero(np.diff(chunks[order])) + 1
        return np.split(order, bounds)

    def where(self, i: int) -> str:
        file, row = self.source.locate(int(self.indices[i]))
        return f"{file.name} row {row}"


def open_split(path: str, split: str, columns: list[str], val_split: str | None, val_fraction: float,
               seed: int, train_split: str = "train", cache_row_groups: int = 4) -> SplitRows:
    """Rows of `split` ("train" or "validation", or a named split such as "test").

    Without a named validation split, validation is a hold-out of `val_fraction` of the training
    split chosen by hashing object_id, and "train" excludes it. The test split is never used
    unless named. `cache_row_groups`: decoded parquet row groups kept (4 for the block-shuffled
    training order; 1 where rows are read in order).
    """
    if split == "validation" and val_split:
        source = TableSource(path, columns, split=val_split, cache_row_groups=cache_row_groups)
        indices = np.arange(len(source))
    elif split in ("train", "validation"):
        source = TableSource(path, columns, split=_split_name(path, train_split), cache_row_groups=cache_row_groups)
        held = holdout_mask(source.column("object_id"), val_fraction, seed) if val_fraction > 0 else np.zeros(len(source), bool)
        indices = np.flatnonzero(held if split == "validation" else ~held)
    else:
        source = TableSource(path, columns, split=_split_name(path, split), cache_row_groups=cache_row_groups)
        indices = np.arange(len(source))
    if split != "validation" and len(indices) == 0:
        raise DataError(f"split '{split}' of {path} has no rows")
    return SplitRows(source, indices)


def target_columns(path: str, columns: list[str]) -> list[str]:
    """The scalar columns `fmb embed` carries along: redshift and the latent truth (truth_*)."""
    return [c for c in column_names(path) if (c == "redshift" or c.startswith("truth_")) and c not in columns]


def embedding_splits(data: str | None, split: str | None, columns: list[str], cfg: Any, seed: int
                     ) -> list[tuple[str, SplitRows]]:
    """(split name, rows) for `fmb embed`: every object by default, `split` narrows.

    Without `data`, the run's dataset (`cfg.path`) with the run's own splits: "train" and "validation"
    (the hold-out of train, when the data has no validation split) and any other split it holds
    (e.g. "test"). With `data`, the splits that dataset holds, as named (or "all" for a single file).
    Embedding reads rows in order, so one decoded row group at a time is kept.
    """
    path = data or cfg.path
    if path is None:
        raise ConfigError("the checkpoint's config has no data.path: pass --data")
    named = available_splits(Path(path)) if _split_name(path, "any") is not None else []
    if data is None:
        others = [s for s in named if s not in (cfg.train_split, cfg.val_split)]
        wanted = [split] if split else ["train", "validation", *others]
        selected = [(name, open_split(path, name, columns, cfg.val_split, cfg.val_fraction, seed, cfg.train_split, 1))
                    for name in wanted]
    else:
        choices = named or ["all"]
        if split is not None and split not in choices:
            raise ConfigError(f"--split {split}: {data} has {', '.join(choices)}")
        selected = [(name, open_split(data, name, columns, None, 0.0, 0, cache_row_groups=1))
                    for name in ([split] if split else choices)]
    return [(name, rows) for name, rows in selected if len(rows)]


def scalar_values(row: dict, names: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor | str]:
    """Scalar columns of a row as tensors (NaN for nulls), for carrying targets through a loader; the
    text truth columns (TEXT_TRUTH_COLUMNS) as strings, "" for null (batches of them collate to lists)."""
    import torch

    return {name: (row[name] or "") if name in TEXT_TRUTH_COLUMNS else torch.tensor(float("nan") if row[name] is None else row[name])
            for name in names}


def _split_name(path: str, split: str) -> str | None:
    """A single-file or single-split dataset has no split names: read it whole."""
    root = Path(path)
    if root.is_file() or (root / "state.json").is_file() or not available_splits(root):
        return None
    return split


def rgb_array(image_struct: dict | None) -> np.ndarray:
    """`RGB_image` {bytes} -> H x W x 3 uint8, as decoded."""
    raw = image_bytes(image_struct)
    if raw is None:
        raise DataError("no image bytes")
    return decode_image(raw)


def rgb_tensor(image_struct: dict | None, size: int) -> torch.Tensor:
    """`RGB_image` {bytes} -> (3, size, size) float32 in [0, 1] (antialiased resize)."""
    return rgb_resized(rgb_array(image_struct), size)


def rgb_resized(array: np.ndarray, size: int) -> torch.Tensor:
    """H x W x 3 uint8 -> (3, size, size) float32 in [0, 1] (antialiased resize)."""
    import torch
    import torch.nn.functional as F

    image = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
    if image.shape[1:] != (size, size):
        shrink = size < max(image.shape[1:])  # antialiasing only matters when shrinking, and is slow
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=shrink, align_corners=False)[0]
    return image


def desi_flux(spectrum: dict | None, grid: int = DESI_PIXELS, resample: bool = False) -> np.ndarray | None:
    """The flux of a `spectrum` struct on the survey's grid (float64, NaN where not finite); None when
    the object has no spectrum (null), the normal case for part of the sample.

    The spectrum must be on the grid: `grid` pixels (the DESI coadd, 3600-9824 A in 0.8 A steps), and
    when wavelengths are given they must be that grid. With `resample`, a spectrum with its own
    wavelengths is interpolated onto the grid instead (pixels outside its range invalid). A present
    but unusable spectrum raises DataError saying exactly what is wrong.
    """
    if spectrum is None or spectrum.get("flux") is None:
        return None
    flux = np.array(spectrum["flux"], dtype=np.float64).reshape(-1)  # a copy: its non-finite values become NaN in place
    wavelength = spectrum.get("wavelength")
    if wavelength is not None:
        wavelength = np.asarray(wavelength, dtype=np.float64).reshape(-1)
        if len(wavelength) != len(flux):
            raise DataError(f"the spectrum has {len(flux)} flux values but {len(wavelength)} wavelengths")
    expected = DESI_WAVELENGTH if grid == DESI_PIXELS else None
    on_grid = len(flux) == grid and (wavelength is None or expected is None or not len(flux)
                                     or float(np.nanmax(np.abs(wavelength - expected))) < 0.05)
    if not on_grid:
        if resample and wavelength is not None and expected is not None:
            flux = _onto_grid(wavelength, flux, expected)
        else:
            what = f"{len(flux)} pixels" if len(flux) != grid else "the same number of pixels on another grid"
            if wavelength is not None and np.isfinite(wavelength).any():
                what += f" ({np.nanmin(wavelength):.1f}-{np.nanmax(wavelength):.1f} A)"
            fix = " (data.resample_spectra=true interpolates spectra that carry their wavelengths)" if wavelength is not None else ""
            raise DataError(f"the spectrum has {what} where the DESI grid has {grid} pixels, 3600-9824 A in 0.8 A steps{fix}")
    good = np.isfinite(flux)
    finite = int(np.count_nonzero(good))
    if finite < len(flux):
        flux[~good] = np.nan
    if finite < 2:
        raise DataError(f"the spectrum has {finite} finite flux values of {len(flux)}")
    return flux


def clean_spectrum(spectrum: dict | None, length: int = DESI_PIXELS, grid: int = DESI_PIXELS,
                   resample: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """AstroPT's spectrum input: `desi_flux`, divided by its standard deviation, cut or zero-padded to
    `length` (the model's input), with a validity mask (non-finite pixels 0 and invalid)."""
    flux = desi_flux(spectrum, grid, resample)
    if flux is None:
        return None
    valid = np.isfinite(flux)
    complete = bool(valid.all())
    std = float((flux if complete else flux[valid]).std())
    if not np.isfinite(std) or std <= 0.0:
        raise DataError("the spectrum is flat (zero spread of its finite flux)")
    kept = min(length, len(flux))
    values, mask = np.zeros(length, np.float32), np.zeros(length, bool)
    values[:kept] = flux[:kept] / std  # divided in float64, then rounded to float32
    mask[:kept] = valid[:kept]
    if not complete:
        values[:kept][~mask[:kept]] = 0.0
    return values, mask


def _onto_grid(wavelength: np.ndarray, flux: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of the finite pixels onto `grid`; NaN outside the spectrum's range."""
    good = np.isfinite(wavelength) & np.isfinite(flux)
    order = np.argsort(wavelength[good])
    x, y = wavelength[good][order], flux[good][order]
    if len(x) < 2:
        return np.full(len(grid), np.nan)
    return np.interp(grid, x, y, left=np.nan, right=np.nan)


def inverse_variance(error: np.ndarray) -> np.ndarray:
    """1 / error^2 with zero (not inf) where the error is zero, negative or non-finite."""
    error = np.asarray(error, dtype=np.float64)
    good = np.isfinite(error) & (error > 0)
    out = np.zeros_like(error)
    np.divide(1.0, error**2, out=out, where=good)
    return out
