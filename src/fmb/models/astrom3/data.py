"""AstroM3 data: the reference preprocessing of the variable-star rows (schema:
fmb.data.surveys.astrom3) and the dataset.

A row that cannot be used (empty or single-point light curve, no finite fluxes, a spectrum
outside the wavelength grid, non-finite metadata, an unknown label) raises a DataError naming
the file, row, object and field, or with `data.bad_rows: mask` is returned with `valid=False`
and left out of losses and metrics (counted as `masked`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from fmb.data.splits import holdout_mask
from fmb.data.surveys.astrom3 import CLASSES, METADATA_NAMES, PERIOD_INDEX
from fmb.data.tables import TableSource
from fmb.errors import DataError
from fmb.models.astrom3.model import N_CATALOGUE, N_METADATA, N_SPECTRA_PIXELS

WAVELENGTH_GRID = np.arange(3850.0, 9000.0, 2.0)  # N_SPECTRA_PIXELS values


@dataclass
class AstroM3DataConfig:
    path: str | None = None  # AstroM3Processed directory (train/validation/test splits) or a parquet file
    train_split: str = "train"
    val_split: str = "validation"
    classes: list[str] = field(default_factory=lambda: list(CLASSES))  # the class order, saved with the run
    label_fraction: float = 1.0  # fine-tuning: keep this fraction of the training labels (hash of id and train.seed)
    bad_rows: Literal["error", "mask"] = "error"
    cache_row_groups: int = 64
    synthetic: int = 0  # > 0 (--demo): write this many synthetic objects under <out>/data and train on them


class BadRow(ValueError):
    """One field of one object cannot be used; the dataset turns it into a DataError or a mask."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field_name = field_name


# ----------------------------------------------------------------------------- preprocessing


def robust_scale(values: np.ndarray) -> float:
    """Median absolute deviation; the standard deviation where more than half the values are
    equal (MAD 0); 0 only for a constant series."""
    mad = float(np.median(np.abs(values - np.median(values))))
    return mad if mad > 0 else float(values.std())


def clean_light_curve(photometry: Any) -> np.ndarray:
    """(N, 3) time, flux, error -> finite points with positive errors, unique times, sorted;
    columns: scaled time in [0, 1], (flux - mean) / MAD, error / MAD; plus log10(MAD) and
    log10(time span / day) as columns 3 and 4 (constant per object)."""
    lc = np.asarray(photometry, dtype=np.float64)
    if lc.ndim != 2 or lc.shape[1] != 3:
        raise BadRow("photometry", f"expected shape (N, 3), got {lc.shape}")
    lc = lc[np.isfinite(lc).all(1) & (lc[:, 2] > 0)]
    times, first = np.unique(lc[:, 0], return_index=True)  # sorted; keeps the first duplicate
    lc = lc[first]
    if len(lc) < 2:
        raise BadRow("photometry", f"{len(lc)} usable point(s) (finite time, flux, error > 0); need 2")
    span = times[-1] - times[0]
    flux, err = lc[:, 1], lc[:, 2]
    scale = robust_scale(flux)
    if scale <= 0:
        raise BadRow("photometry", "flux is constant (zero MAD and zero spread)")
    out = np.empty((len(lc), 5), dtype=np.float32)
    out[:, 0] = (times - times[0]) / span
    out[:, 1] = (flux - flux.mean()) / scale
    out[:, 2] = err / scale
    out[:, 3] = np.log10(scale)
    out[:, 4] = np.log10(span)
    return out


def crop_light_curve(lc: np.ndarray, seq_len: int, start: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Crop to seq_len steps from `start` (None: the centre) and zero-pad; returns (steps, mask)."""
    n = len(lc)
    if n > seq_len:
        begin = (n - seq_len) // 2 if start is None else start
        lc = lc[begin: begin + seq_len]
    steps = np.zeros((seq_len, lc.shape[1]), dtype=np.float32)
    steps[: len(lc)] = lc
    mask = np.zeros(seq_len, dtype=bool)
    mask[: len(lc)] = True
    return steps, mask


def preprocess_spectrum(spectrum: Any) -> np.ndarray:
    """(M, 3) wavelength, flux, error -> (3, 2575) on 3850..9000 step 2: (flux - mean) / MAD,
    error / MAD, log10(MAD). Points with non-finite values are dropped first."""
    sp = np.asarray(spectrum, dtype=np.float64)
    if sp.ndim != 2 or sp.shape[1] != 3:
        raise BadRow("spectra", f"expected shape (M, 3), got {sp.shape}")
    sp = sp[np.isfinite(sp).all(1)]
    wave, first = np.unique(sp[:, 0], return_index=True)
    sp = sp[first]
    if len(sp) < 2:
        raise BadRow("spectra", f"{len(sp)} usable point(s); need 2")
    covered = (wave[-1] >= WAVELENGTH_GRID[0]) & (wave[0] <= WAVELENGTH_GRID[-1])
    if not covered or (min(wave[-1], WAVELENGTH_GRID[-1]) - max(wave[0], WAVELENGTH_GRID[0])) < 0.5 * (WAVELENGTH_GRID[-1] - WAVELENGTH_GRID[0]):
        raise BadRow("spectra", f"wavelengths {wave[0]:.0f}..{wave[-1]:.0f} A cover less than half of the grid 3850..9000 A")
    flux = np.interp(WAVELENGTH_GRID, wave, sp[:, 1])
    err = np.interp(WAVELENGTH_GRID, wave, sp[:, 2])
    scale = robust_scale(flux)
    if scale <= 0:
        raise BadRow("spectra", "flux is constant (zero MAD and zero spread)")
    out = np.empty((3, len(WAVELENGTH_GRID)), dtype=np.float32)
    out[0] = (flux - flux.mean()) / scale
    out[1] = err / scale
    out[2] = np.log10(scale)
    return out


def prepare_metadata(values: Any) -> np.ndarray:
    """The 38 raw values with log10(period), as the model standardises them."""
    meta = np.asarray(values, dtype=np.float64).reshape(-1)
    if meta.shape[0] != N_METADATA:
        raise BadRow("metadata", f"expected {N_METADATA} values ({N_CATALOGUE} catalogue + 4 photometric features), got {meta.shape[0]}")
    bad = [METADATA_NAMES[i] for i in np.flatnonzero(~np.isfinite(meta))]
    if bad:
        raise BadRow("metadata", f"non-finite value(s) in {', '.join(bad[:6])}")
    if meta[PERIOD_INDEX] <= 0:
        raise BadRow("metadata", f"period must be positive, got {meta[PERIOD_INDEX]}")
    meta[PERIOD_INDEX] = np.log10(meta[PERIOD_INDEX])
    return meta.astype(np.float32)


def metadata_statistics(metadata: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation over the finite rows (std floored so constant
    columns do not divide by zero)."""
    rows = metadata[np.isfinite(metadata).all(1)]
    if len(rows) == 0:
        raise DataError("no training object has finite metadata: cannot standardise it")
    return rows.mean(0).astype(np.float32), np.maximum(rows.std(0), 1e-6).astype(np.float32)


# ----------------------------------------------------------------------------- dataset

COLUMNS = ["photometry", "spectra", "metadata", "label"]


class AstroM3Dataset(Dataset):
    """One split, read row by row through TableSource (only the needed columns)."""

    def __init__(self, path: str | Path, split: str | None, classes: list[str], seq_len: int, train: bool,
                 bad_rows: str = "error", seed: int = 0, label_fraction: float = 1.0, cache_row_groups: int = 64,
                 strict_labels: bool = True) -> None:
        self.source = TableSource(path, COLUMNS, split, cache_row_groups=cache_row_groups)
        self.class_index = {name: i for i, name in enumerate(classes)}
        self.seq_len = seq_len
        self.train = train
        self.bad_rows = bad_rows
        self.strict_labels = strict_labels  # False (embedding): unknown labels become class -1
        self.seed = seed
        self.epoch = 0
        self.ids = self._object_ids(path, split)
        self.rows = np.arange(len(self.source))
        if label_fraction < 1.0:
            self.rows = np.flatnonzero(holdout_mask(self.ids, label_fraction, seed=seed))

    def _object_ids(self, path: str | Path, split: str | None) -> np.ndarray:
        try:
            return TableSource(path, ["object_id"], split).column("object_id").astype(np.int64)
        except DataError:  # no object_id column: the row number identifies the object
            return np.arange(len(self.source), dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def metadata_matrix(self) -> np.ndarray:
        """(n, 38) metadata of the kept rows as the model sees them (non-finite for bad rows)."""
        raw = self.source.column("metadata")
        out = np.full((len(self.rows), N_METADATA), np.nan, dtype=np.float32)
        for j, i in enumerate(self.rows):
            try:
                out[j] = prepare_metadata(raw[i])
            except BadRow:
                pass
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = int(self.rows[index])
        record = self.source.row(row)
        try:
            return self._sample(record, index)
        except BadRow as exc:
            if self.bad_rows == "error":
                file, line = self.source.locate(row)
                raise DataError(f"{file}, row {line}, object {self.ids[row]}: {exc}; "
                                "set data.bad_rows=mask to leave such objects out") from None
            return self._placeholder(row)

    def _sample(self, record: dict[str, Any], index: int) -> dict[str, Any]:
        label = record["label"]
        if label not in self.class_index and self.strict_labels:
            raise BadRow("label", f"unknown class {label!r}; the run's classes are {', '.join(self.class_index)}")
        for name in ("photometry", "spectra", "metadata"):
            if record[name] is None:
                raise BadRow(name, "missing (null)")
        lc = clean_light_curve(record["photometry"])
        start = None
        if self.train and len(lc) > self.seq_len:
            # Random crop seeded by (seed, epoch, index): reproducible and resumable.
            rng = np.random.default_rng([self.seed, self.epoch, index, zlib.crc32(b"astrom3")])
            start = int(rng.integers(0, len(lc) - self.seq_len + 1))
        steps, mask = crop_light_curve(lc, self.seq_len, start)
        return {
            "photometry": torch.from_numpy(steps),
            "photometry_mask": torch.from_numpy(mask),
            "spectra": torch.from_numpy(preprocess_spectrum(record["spectra"])),
            "metadata": torch.from_numpy(prepare_metadata(record["metadata"])),
            "label": torch.tensor(self.class_index.get(label, -1)),
            "valid": torch.tensor(True),
            "object_id": torch.tensor(self.ids[int(self.rows[index])]),
        }

    def _placeholder(self, row: int) -> dict[str, Any]:
        mask = np.zeros(self.seq_len, dtype=bool)
        mask[0] = True  # one "valid" zero step keeps attention finite; the row is dropped anyway
        return {
            "photometry": torch.zeros(self.seq_len, 5),
            "photometry_mask": torch.from_numpy(mask),
            "spectra": torch.zeros(3, N_SPECTRA_PIXELS),
            "metadata": torch.zeros(N_METADATA),
            "label": torch.tensor(-1),
            "valid": torch.tensor(False),
            "object_id": torch.tensor(self.ids[row]),
        }
