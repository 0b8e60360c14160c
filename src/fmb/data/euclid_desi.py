"""Reading the Euclid + DESI matched sample (parquet shards or a `save_to_disk` directory).

Format-level helpers shared by the families that train on it: split selection (with a
deterministic hold-out when the dataset has no validation split), RGB decoding and resizing,
DESI spectrum cleaning, Euclid band conversion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fmb.data.images import decode_image
from fmb.data.splits import holdout_mask
from fmb.data.tables import TableSource, available_splits, column_names
from fmb.errors import ConfigError, DataError

log = logging.getLogger("fmb")

DESI_PIXELS = 7781
DESI_WAVELENGTH = 3600.0 + 0.8 * np.arange(DESI_PIXELS)  # the coadd grid: 3600 to 9824 Angstrom in 0.8 Angstrom steps
EUCLID_BAND_COLUMNS = ("VIS_image", "NISP_Y_image", "NISP_J_image", "NISP_H_image")
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
               seed: int, train_split: str = "train") -> SplitRows:
    """Rows of `split` ("train" or "validation", or a named split such as "test").

    Without a named validation split, validation is a hold-out of `val_fraction` of the training
    split chosen by hashing object_id, and "train" excludes it. The test split is never used
    unless named.
    """
    if split == "validation" and val_split:
        source = TableSource(path, columns, split=val_split)
        indices = np.arange(len(source))
    elif split in ("train", "validation"):
        source = TableSource(path, columns, split=_split_name(path, train_split))
        held = holdout_mask(source.column("object_id"), val_fraction, seed) if val_fraction > 0 else np.zeros(len(source), bool)
        indices = np.flatnonzero(held if split == "validation" else ~held)
    else:
        source = TableSource(path, columns, split=_split_name(path, split))
        indices = np.arange(len(source))
    if split != "validation" and len(indices) == 0:
        raise DataError(f"split '{split}' of {path} has no rows")
    return SplitRows(source, indices)


def embedding_rows(data: str | None, split: str | None, columns: list[str], cfg: Any, seed: int) -> tuple[SplitRows, list[str]]:
    """Rows for `fmb embed` and the scalar target columns to carry along (redshift, truth_*).

    With `--data`, that dataset (naming `--split` when it has several); without, the run's
    dataset (`cfg.path`) and its validation split unless `--split` says otherwise.
    """
    path = data or cfg.path
    if path is None:
        raise ConfigError("the checkpoint's config has no data.path: pass --data")
    targets = [c for c in column_names(path) if (c == "redshift" or c.startswith("truth_")) and c not in columns]
    if data is None:
        rows = open_split(path, split or "validation", columns + targets, cfg.val_split, cfg.val_fraction, seed,
                          cfg.train_split)
    else:
        splits = available_splits(Path(data))
        if split is None and len(splits) > 1:
            raise ConfigError(f"{data} has splits {', '.join(splits)}: choose one with --split")
        rows = open_split(data, split or (splits[0] if splits else "all"), columns + targets, None, 0.0, 0)
    if len(rows) == 0:
        raise DataError("nothing to embed: the selected split is empty")
    return rows, targets


def scalar_values(row: dict, names: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Scalar columns of a row as tensors (NaN for nulls), for carrying targets through a loader."""
    return {name: torch.tensor(float("nan") if row[name] is None else row[name]) for name in names}


def _split_name(path: str, split: str) -> str | None:
    """A single-file or single-split dataset has no split names: read it whole."""
    root = Path(path)
    if root.is_file() or (root / "state.json").is_file() or not available_splits(root):
        return None
    return split


def rgb_tensor(image_struct: dict | None, size: int) -> torch.Tensor:
    """`RGB_image` {bytes, path} -> (3, size, size) float32 in [0, 1] (antialiased resize)."""
    if image_struct is None or not image_struct.get("bytes"):
        raise DataError("no image bytes")
    array = decode_image(image_struct["bytes"])
    image = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
    if image.shape[1:] != (size, size):
        shrink = size < max(image.shape[1:])  # antialiasing only matters when shrinking, and is slow
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=shrink, align_corners=False)[0]
    return image


def clean_spectrum(spectrum: dict | None, length: int = DESI_PIXELS) -> tuple[np.ndarray, np.ndarray] | None:
    """DESI flux padded/trimmed to `length`, divided by its standard deviation, with a validity mask.

    Non-finite pixels become 0 and invalid. Returns None when there is no usable spectrum
    (null, empty, all non-finite, or zero spread).
    """
    if spectrum is None or spectrum.get("flux") is None:
        return None
    flux = np.asarray(spectrum["flux"], dtype=np.float32)[:length]
    valid = np.isfinite(flux)
    if len(flux) < length:
        flux = np.pad(flux, (0, length - len(flux)))
        valid = np.pad(valid, (0, length - len(valid)))
    if valid.sum() < 2:
        return None
    std = float(flux[valid].std())
    if not np.isfinite(std) or std <= 0.0:
        return None
    return np.where(valid, flux / std, 0.0).astype(np.float32), valid


def inverse_variance(error: np.ndarray) -> np.ndarray:
    """1 / error^2 with zero (not inf) where the error is zero, negative or non-finite."""
    error = np.asarray(error, dtype=np.float64)
    good = np.isfinite(error) & (error > 0)
    out = np.zeros_like(error)
    np.divide(1.0, error**2, out=out, where=good)
    return out
