"""Euclid band cutouts (VIS, NISP Y, J, H) of the Euclid + DESI sample as 4 x 96 x 96 flux tensors, and
(for `fmb embed`) the DESI spectra.

Per band: the 2-D array is multiplied by ZP_nu / 3631 (fmb.data.surveys.euclid_desi.EUCLID_ZERO_POINTS),
non-finite pixels become 0 and are masked out of the loss, and the cutout is brought to 96 x 96
(`resize`: antialiased bilinear, any input size; `crop`: centre crop, inputs must be >= 96). A band
that is null or entirely non-finite is absent: zeros, masked out of the loss (an object with no band
at all contributes nothing, and embeds without an image: `has_image` False). A band that is not a
2-D array is an error naming the file, row, column and object.

Spectra: flux with NaN -> 0, inverse variance 1 / error^2 (0 where the error is not positive and finite),
and a bad-pixel mask (non-finite flux or zero inverse variance) on the DESI grid. A row without a
spectrum is embedded without one (`has_spectrum` False); a spectrum that is present but unusable (another
wavelength grid, no errors, every pixel bad) too, reported as a data fault naming the file and row.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fmb.data.surveys.euclid_desi import (
    DESI_PIXELS,
    EUCLID_BAND_COLUMNS,
    EUCLID_ZERO_POINTS,
    SplitRows,
    desi_flux,
    inverse_variance,
    scalar_values,
)
from fmb.errors import DataError

log = logging.getLogger("fmb")

COLUMNS = ["object_id", *EUCLID_BAND_COLUMNS]
SPECTRUM_COLUMN = "spectrum"
SIZE = 96
Fit = Literal["resize", "crop"]


def band_image(values: object, size: int, fit: Fit, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One band's 2-D array -> (size, size) flux with NaN -> 0, and its validity mask (all False for a
    null or entirely non-finite band: absent)."""
    if values is None:
        return torch.zeros(size, size), torch.zeros(size, size, dtype=torch.bool)
    if isinstance(values, list):  # rows of different lengths come back as a list
        raise DataError(f"{where}: the band is not a rectangular 2-D array")
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 2 or min(array.shape) == 0:
        raise DataError(f"{where}: expected a 2-D image, got shape {array.shape}")
    valid = np.isfinite(array)
    if not valid.any():
        return torch.zeros(size, size), torch.zeros(size, size, dtype=torch.bool)
    image = torch.from_numpy(np.where(valid, array, 0.0).astype(np.float32))
    mask = torch.from_numpy(valid.astype(np.float32))
    height, width = image.shape
    if fit == "crop":
        if height < size or width < size:
            raise DataError(f"{where}: the cutout is {height} x {width}, smaller than {size} x {size} "
                            "(data.fit=crop); use data.fit=resize")
        top, left = (height - size) // 2, (width - size) // 2
        return image[top:top + size, left:left + size], mask[top:top + size, left:left + size] > 0.5
    if (height, width) != (size, size):
        both = F.interpolate(torch.stack([image, mask])[None], size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False)[0]
        # A resized pixel is valid only when every input pixel behind it was.
        return both[0], both[1] > 0.999
    return image, mask > 0.5


class EuclidBands(Dataset):
    def __init__(self, rows: SplitRows, size: int = SIZE, fit: Fit = "resize", extra_columns: tuple[str, ...] = ()) -> None:
        self.rows = rows
        self.extra_columns = extra_columns  # scalar columns passed through (targets, for embeddings)
        self.size = size
        self.fit = fit
        self.factors = [EUCLID_ZERO_POINTS[c] / 3631.0 for c in EUCLID_BAND_COLUMNS]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.item(self.rows.row(i), i)

    def item(self, row: dict, i: int) -> dict:
        object_id = int(row["object_id"])
        images, masks = [], []
        for column, factor in zip(EUCLID_BAND_COLUMNS, self.factors, strict=True):
            where = f"{self.rows.where(i)}, column {column}, object_id {object_id}"
            image, mask = band_image(row[column], self.size, self.fit, where)
            images.append(image * factor)
            masks.append(mask)
        valid = torch.stack(masks)
        return {"object_id": torch.tensor(object_id, dtype=torch.int64), "euclid": torch.stack(images),
                "valid": valid, "has_image": valid.any(), "targets": scalar_values(row, self.extra_columns)}


def desi_spectrum(value: dict | None, resample: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A row's `spectrum` struct -> (flux with NaN -> 0, inverse variance, bad-pixel mask) on the DESI grid,
    or None when the row has no spectrum. The grid is checked by `desi_flux`; a spectrum that is present
    but unusable (off the grid, no error array, every pixel bad) raises DataError saying what is wrong."""
    flux = desi_flux(value, resample=resample)
    if flux is None:
        return None
    if value.get("error") is None:
        raise DataError("the spectrum has no error array (so no inverse variance)")
    error = np.asarray(value["error"], dtype=np.float64).reshape(-1)
    if error.shape != flux.shape:
        raise DataError(f"the spectrum has {flux.size} flux values but {error.size} errors")
    ivar = inverse_variance(error).astype(np.float32)
    bad = ~np.isfinite(flux) | (ivar <= 0)
    if bad.all():
        raise DataError("every spectrum pixel is NaN or has no valid error")
    return np.where(bad, 0.0, flux).astype(np.float32), np.where(bad, 0.0, ivar).astype(np.float32), bad


class EuclidBandsAndSpectrum(EuclidBands):
    """EuclidBands plus the DESI spectrum (`spectrum_flux`, `spectrum_ivar`, `spectrum_bad`, `has_spectrum`);
    rows without one get zeros and has_spectrum False; an unusable one is a data fault (`fault_spectrum`)."""

    def __init__(self, rows: SplitRows, size: int = SIZE, fit: Fit = "resize", extra_columns: tuple[str, ...] = (),
                 resample_spectra: bool = False) -> None:
        super().__init__(rows, size, fit, extra_columns)
        self.resample_spectra = resample_spectra
        self.empty = (np.zeros(DESI_PIXELS, np.float32), np.zeros(DESI_PIXELS, np.float32), np.ones(DESI_PIXELS, bool))

    def __getitem__(self, i: int) -> dict:
        row = self.rows.row(i)
        item = self.item(row, i)
        item["fault_spectrum"] = ""
        try:
            spectrum = desi_spectrum(row[SPECTRUM_COLUMN], self.resample_spectra)
        except DataError as exc:
            item["fault_spectrum"] = f"{exc} (object_id {item['object_id'].item()}, {self.rows.where(i)})"
            spectrum = None
        flux, ivar, bad = self.empty if spectrum is None else spectrum
        return {**item, "spectrum_flux": torch.from_numpy(flux), "spectrum_ivar": torch.from_numpy(ivar),
                "spectrum_bad": torch.from_numpy(bad), "has_spectrum": torch.tensor(spectrum is not None)}
