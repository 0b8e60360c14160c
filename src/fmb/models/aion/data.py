"""Euclid band cutouts (VIS, NISP Y, J, H) of the Euclid + DESI sample as 4 x 96 x 96 flux tensors.

Per band: the 2-D array is multiplied by ZP_nu / 3631 (fmb.data.surveys.euclid_desi.EUCLID_ZERO_POINTS),
non-finite pixels become 0 and are masked out of the loss, and the cutout is brought to 96 x 96
(`resize`: antialiased bilinear, any input size; `crop`: centre crop, inputs must be >= 96). A band
that is missing or entirely non-finite is an error naming the file, row, column and object.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fmb.data.surveys.euclid_desi import (
    EUCLID_BAND_COLUMNS,
    EUCLID_ZERO_POINTS,
    SplitRows,
    scalar_values,
)
from fmb.errors import DataError

COLUMNS = ["object_id", *EUCLID_BAND_COLUMNS]
SIZE = 96
Fit = Literal["resize", "crop"]


def band_image(values: object, size: int, fit: Fit, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One band's 2-D array -> (size, size) flux with NaN -> 0, and its validity mask."""
    if values is None:
        raise DataError(f"{where}: the band is null")
    if isinstance(values, list):  # rows of different lengths come back as a list
        raise DataError(f"{where}: the band is not a rectangular 2-D array")
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 2 or min(array.shape) == 0:
        raise DataError(f"{where}: expected a 2-D image, got shape {array.shape}")
    valid = np.isfinite(array)
    if not valid.any():
        raise DataError(f"{where}: every pixel is NaN or infinite")
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
        row = self.rows.row(i)
        object_id = int(row["object_id"])
        images, masks = [], []
        for column, factor in zip(EUCLID_BAND_COLUMNS, self.factors, strict=True):
            where = f"{self.rows.where(i)}, column {column}, object_id {object_id}"
            image, mask = band_image(row[column], self.size, self.fit, where)
            images.append(image * factor)
            masks.append(mask)
        return {"object_id": torch.tensor(object_id, dtype=torch.int64), "euclid": torch.stack(images),
                "valid": torch.stack(masks), "targets": scalar_values(row, self.extra_columns)}
