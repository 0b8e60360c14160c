"""AstroM3 data: the reference preprocessing of the variable-star rows (schema:
fmb.data.surveys.astrom3) and the dataset.

Each object uses what it has. A null modality is absent (`present` False), never an error, and
a mode reads only the columns it uses (`photo`: the light curve, plus the photometric features
of the metadata when that column exists). A missing catalogue value (NaN, or a value of
`data.missing_sentinels`) stays NaN here: the model imputes it after standardisation and sees a
missingness flag. A modality that is present but unusable (an empty or single-point light
curve, no finite fluxes, a spectrum outside the wavelength grid, a wrong number of metadata
values) raises a DataError naming the file, row, object and field, or with `data.bad_rows: mask`
is left out for that object (counted as `masked`). A label outside `data.classes` is counted
and reported; such objects take no part in classification.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from fmb.data.missing import replace_sentinels
from fmb.data.splits import holdout_mask
from fmb.data.surveys.astrom3 import CLASSES, PERIOD_INDEX
from fmb.data.tables import TableSource, column_names
from fmb.errors import DataError
from fmb.models.astrom3.model import ENCODERS, N_CATALOGUE, N_METADATA, N_SPECTRA_PIXELS

log = logging.getLogger("fmb")

WAVELENGTH_GRID = np.arange(3850.0, 9000.0, 2.0)  # N_SPECTRA_PIXELS values


@dataclass
class AstroM3DataConfig:
    path: str | None = None  # AstroM3Processed directory (train/validation/test splits) or a parquet file
    train_split: str = "train"
    val_split: str = "validation"
    classes: list[str] = field(default_factory=lambda: list(CLASSES))  # the class order, saved with the run
    label_fraction: float = 1.0  # fine-tuning: keep this fraction of the training labels (hash of id and train.seed)
    bad_rows: Literal["error", "mask"] = "error"
    missing_sentinels: list[float] = field(default_factory=list)  # metadata values read as missing (e.g. -99.99)
    phased: bool = False  # fold light curves by the metadata period: time -> phase in [0, 1)
    cache_row_groups: int = 64
    synthetic: int = 0  # > 0 (--demo): write this many synthetic objects under <out>/data and train on them
    # --demo: share of objects without each modality (photometry, spectra) and of missing
    # catalogue values (metadata), e.g. {spectra: 1.0, metadata: 0.3}
    synthetic_missing: dict[str, float] = field(default_factory=dict)


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


def clean_light_curve(photometry: Any, period: float | None = None) -> np.ndarray:
    """(N, 3) time, flux, error -> finite points with positive errors, unique times, sorted;
    columns: scaled time in [0, 1], (flux - mean) / MAD, error / MAD; plus log10(MAD) and
    log10(time span / day) as columns 3 and 4 (constant per object). With a finite positive
    `period` (days) the curve is folded: column 0 is the phase in [0, 1), sorted by phase."""
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
    if period is not None and np.isfinite(period) and period > 0:
        phase = ((times - times[0]) / period) % 1.0
        order = np.argsort(phase, kind="stable")
        out = out[order]
        out[:, 0] = phase[order]
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


def prepare_metadata(values: Any, sentinels: list[float] | tuple[float, ...] = ()) -> np.ndarray:
    """The 38 raw values as the model standardises them: log10(period); missing values (non-finite,
    a sentinel, or a non-positive period) as NaN."""
    meta = np.asarray(values, dtype=np.float64).reshape(-1)
    if meta.shape[0] != N_METADATA:
        raise BadRow("metadata", f"expected {N_METADATA} values ({N_CATALOGUE} catalogue + 4 photometric features), got {meta.shape[0]}")
    meta = replace_sentinels(meta, sentinels)
    period = meta[PERIOD_INDEX]
    meta[PERIOD_INDEX] = np.log10(period) if period > 0 else np.nan
    return meta.astype(np.float32)


# ----------------------------------------------------------------------------- dataset

class AstroM3Dataset(Dataset):
    """One split, read row by row through TableSource (only the columns the model uses).

    `modalities` are the model's encoders (fmb.models.astrom3.model.MODALITIES[mode]); items carry
    `present` (3,) bool in ENCODERS order (False for an absent or unused modality) and only
    the inputs the model reads. `labels_needed` (classification training) reports labels outside
    `classes`; `required` lists modalities without which the split is useless (an error when no
    object of the split has them)."""

    def __init__(self, path: str | Path, split: str | None, classes: list[str], seq_len: int, train: bool,
                 bad_rows: str = "error", seed: int = 0, label_fraction: float = 1.0, cache_row_groups: int = 64,
                 modalities: tuple[str, ...] = ENCODERS, sentinels: list[float] | tuple[float, ...] = (),
                 phased: bool = False, labels_needed: bool = False, required: tuple[str, ...] = ()) -> None:
        available = column_names(path, split)
        self.modalities = tuple(modalities)
        # The photometry encoder takes the photometric features (and a phased fold takes the period) from the metadata.
        self.read_metadata = "metadata" in self.modalities or ("photometry" in self.modalities and "metadata" in available)
        columns = [*(m for m in self.modalities if m != "metadata"), *(["metadata"] if self.read_metadata else []), "label"]
        self.source = TableSource(path, columns, split, cache_row_groups=cache_row_groups)
        self.where = f"{path}" + (f" (split {split})" if split else "")
        self.class_index = {name: i for i, name in enumerate(classes)}
        self.seq_len = seq_len
        self.train = train
        self.bad_rows = bad_rows
        self.sentinels = tuple(sentinels)
        self.phased = phased
        self.seed = seed
        self.epoch = 0
        self.ids = self._object_ids(path, split) if "object_id" in available else np.arange(len(self.source), dtype=np.int64)
        self.rows = np.arange(len(self.source))
        if label_fraction < 1.0:
            self.rows = np.flatnonzero(holdout_mask(self.ids, label_fraction, seed=seed))
        if labels_needed:
            self._report_labels(split)
        for name in required:
            self.require(name, split)

    def _object_ids(self, path: str | Path, split: str | None) -> np.ndarray:
        return TableSource(path, ["object_id"], split).column("object_id").astype(np.int64)

    def _report_labels(self, split: str | None) -> None:
        labels = self.source.column("label")[self.rows]
        unknown = Counter("null" if label is None else str(label) for label in labels if label not in self.class_index)
        if not unknown:
            return
        total = sum(unknown.values())
        listed = ", ".join(f"{name} {count}" for name, count in unknown.most_common(8))
        if total == len(labels):
            raise DataError(f"{self.where}: no object has a label of data.classes ({', '.join(self.class_index)}); "
                            f"found {listed}")
        log.warning(f"{self.where}: {total} of {len(labels)} objects have a label outside data.classes ({listed}); "
                    "they take no part in classification")

    def require(self, name: str, split: str | None) -> None:
        """A DataError when no object of the split has modality `name`."""
        if name == "metadata":
            has = bool(self.catalogue_present().any())
        else:
            has = self.source.has_values(name)
        if not has:
            what = "finite catalogue value" if name == "metadata" else f"'{name}' value"
            raise DataError(f"{self.where}: no object has a {what}, and model.mode needs {name}; "
                            "choose a mode that uses the modalities this split has")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def metadata_matrix(self) -> np.ndarray:
        """(n, 38) metadata of the kept rows as the model sees them (NaN where missing or unusable)."""
        out = np.full((len(self.rows), N_METADATA), np.nan, dtype=np.float32)
        if not self.read_metadata:
            return out
        raw = self.source.column("metadata")
        for j, i in enumerate(self.rows):
            if raw[i] is None:
                continue
            try:
                out[j] = prepare_metadata(raw[i], self.sentinels)
            except BadRow:
                pass
        return out

    def catalogue_present(self) -> np.ndarray:
        """(n,) whether each kept row has at least one finite catalogue value."""
        return np.isfinite(self.metadata_matrix()[:, :N_CATALOGUE]).any(1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = int(self.rows[index])
        record = self.source.row(row)
        label = record["label"]
        item: dict[str, Any] = {"label": torch.tensor(self.class_index.get(label, -1)),
                                "object_id": torch.tensor(self.ids[row])}
        present = dict.fromkeys(ENCODERS, False)
        masked = False
        meta = np.full(N_METADATA, np.nan, dtype=np.float32)
        if self.read_metadata and record["metadata"] is not None:
            try:
                meta = prepare_metadata(record["metadata"], self.sentinels)
            except BadRow as exc:
                masked = self._bad(exc, row) or masked
        if "metadata" in self.modalities:
            present["metadata"] = bool(np.isfinite(meta[:N_CATALOGUE]).any())
        item["metadata"] = torch.from_numpy(meta)
        if "photometry" in self.modalities:
            steps, mask = None, None
            if record["photometry"] is not None:
                try:
                    period = 10.0 ** float(meta[PERIOD_INDEX]) if self.phased else None
                    steps, mask = self._light_curve(record["photometry"], period, index)
                    present["photometry"] = True
                except BadRow as exc:
                    masked = self._bad(exc, row) or masked
            if steps is None:
                steps, mask = np.zeros((self.seq_len, 5), np.float32), np.zeros(self.seq_len, bool)
                mask[0] = True  # one "valid" zero step keeps attention finite; the modality is absent anyway
            item["photometry"], item["photometry_mask"] = torch.from_numpy(steps), torch.from_numpy(mask)
        if "spectra" in self.modalities:
            spectrum = None
            if record["spectra"] is not None:
                try:
                    spectrum = preprocess_spectrum(record["spectra"])
                    present["spectra"] = True
                except BadRow as exc:
                    masked = self._bad(exc, row) or masked
            item["spectra"] = torch.from_numpy(spectrum if spectrum is not None else np.zeros((3, N_SPECTRA_PIXELS), np.float32))
        item["present"] = torch.tensor([present[m] for m in ENCODERS])
        item["masked"] = torch.tensor(masked)
        item["valid"] = item["present"].any()
        return item

    def _light_curve(self, photometry: Any, period: float | None, index: int) -> tuple[np.ndarray, np.ndarray]:
        lc = clean_light_curve(photometry, period)
        if len(lc) <= self.seq_len:
            return crop_light_curve(lc, self.seq_len, None)
        # Drawn from (seed, epoch, index): reproducible and resumable.
        rng = np.random.default_rng([self.seed, self.epoch, index, zlib.crc32(b"astrom3")]) if self.train else None
        if period is not None and np.isfinite(period) and period > 0:
            # A folded curve: seq_len points over the whole phase (random in training, evenly spaced
            # otherwise), in phase order; a contiguous crop would keep only part of the cycle.
            keep = (np.sort(rng.choice(len(lc), self.seq_len, replace=False)) if rng is not None
                    else np.linspace(0, len(lc) - 1, self.seq_len).round().astype(int))
            return crop_light_curve(lc[keep], self.seq_len, None)
        start = int(rng.integers(0, len(lc) - self.seq_len + 1)) if rng is not None else None
        return crop_light_curve(lc, self.seq_len, start)

    def _bad(self, exc: BadRow, row: int) -> bool:
        """A present but unusable modality: a DataError, or (bad_rows=mask) True: left out for this object."""
        if self.bad_rows == "error":
            file, line = self.source.locate(row)
            raise DataError(f"{file}, row {line}, object {self.ids[row]}: {exc}; "
                            "set data.bad_rows=mask to leave such values out") from None
        return True
