"""AstroCLIP samples: an RGB image and a DESI spectrum per object, from two on-disk formats.

- `hdf5`: the AstroCLIP cross-match (data-formats.md section 2): g, r, z flux images in
  nanomaggies turned into RGB with the Legacy Survey stretch, then centre-cropped (144 in the
  reference); `spectrum` (7781, 1). Split per group: the first `train_fraction` of every group
  is train, the rest validation (upstream: 80%).
- `euclid_desi`: the Euclid + DESI matched sample (section 1): the `RGB_image` resized to
  `image_size`, the DESI flux. An object without a usable spectrum or image is kept with
  `valid = False` so the batch stays aligned; the loss and metrics leave it out.

The spectrum goes to the model as raw flux: SpecFormer standardises each object itself.
Training-time augmentation (random flips and 90-degree rotations) is drawn per sample from
(seed, epoch, index), so it is reproducible and independent of workers; evaluation sets none.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from fmb.data.hdf5 import HDF5Source
from fmb.data.surveys.astroclip import FIELDS
from fmb.data.surveys.euclid_desi import (
    DESI_PIXELS,
    FLUX_COLUMNS,
    RGB_COLUMNS,
    SplitRows,
    desi_flux,
    rgb_tensor,
    scalar_values,
)
from fmb.errors import DataError

log = logging.getLogger("fmb")

# Legacy Survey colour composite: band -> (RGB plane, scale); g is blue, r green, z red.
LEGACY_RGB = {"g": (2, 6.0), "r": (1, 3.4), "z": (0, 2.2)}


def legacy_survey_rgb(image: np.ndarray, bands: tuple[str, ...] = ("g", "r", "z"), q: float = 20.0,
                      minimum: float = 0.03) -> torch.Tensor:
    """(H, W, bands) flux in nanomaggies -> (3, H, W) float32 RGB in [0, 1] (arcsinh stretch).

    Each band is scaled and offset (x * scale + minimum); the mean of the non-negative planes,
    I, sets the stretch arcsinh(Q I) / sqrt(Q) / I applied to every plane; then clip to [0, 1].
    """
    planes = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    scales = torch.tensor([LEGACY_RGB[b][1] for b in bands]).view(-1, 1, 1)
    scaled = planes * scales + minimum
    intensity = scaled.clamp(min=0).mean(dim=0)
    stretch = torch.asinh(q * intensity) / np.sqrt(q)
    intensity = intensity + (intensity == 0) * 1e-6
    rgb = torch.zeros_like(scaled)
    rgb[[LEGACY_RGB[b][0] for b in bands]] = scaled * (stretch / intensity)
    return rgb.clamp_(0.0, 1.0)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    if size > min(height, width):
        raise DataError(f"crop {size} is larger than the image ({height} x {width})")
    top, left = (height - size) // 2, (width - size) // 2
    return image[..., top : top + size, left : left + size]


def augment(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random horizontal / vertical flips and a rotation by a multiple of 90 degrees."""
    flip_h, flip_v, quarter_turns = rng.integers(0, 2), rng.integers(0, 2), int(rng.integers(0, 4))
    dims = [d for d, flip in ((-1, flip_h), (-2, flip_v)) if flip]
    if dims:
        image = torch.flip(image, dims)
    return torch.rot90(image, quarter_turns, dims=(-2, -1)) if quarter_turns else image


class _Augmented(Dataset):
    """Per-sample random streams from (seed, epoch, index); set_epoch is called by the trainer."""

    def __init__(self, augment: bool, seed: int) -> None:
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def maybe_augment(self, image: torch.Tensor, index: int) -> torch.Tensor:
        if not self.augment:
            return image
        return augment(image, np.random.default_rng([self.seed, self.epoch, index]))


class AstroClipHDF5(_Augmented):
    """The AstroCLIP HDF5 cross-match; `fraction` selects the same rows of every group."""

    def __init__(self, path: str, fraction: tuple[float, float], crop: int, spectrum_length: int = DESI_PIXELS,
                 augment: bool = False, seed: int = 0, images: bool = True) -> None:
        super().__init__(augment, seed)
        self.source = HDF5Source(path, list(FIELDS) if images else list(FIELDS[1:]), fraction)
        self.crop = crop
        self.spectrum_length = spectrum_length
        self.images = images

    def __len__(self) -> int:
        return len(self.source)

    def where(self, index: int) -> str:
        group, row = self.source.locate(index)
        return f"{self.source.path} group '{group}' row {row}"

    def __getitem__(self, index: int) -> dict:
        row = self.source.row(index)
        spectrum = row["spectrum"].reshape(-1) if row["spectrum"].ndim == 2 and row["spectrum"].shape[1] == 1 else row["spectrum"]
        if spectrum.shape != (self.spectrum_length,):
            raise DataError(f"{self.where(index)}: field 'spectrum' has shape {row['spectrum'].shape}, "
                            f"expected ({self.spectrum_length}, 1)")
        has_spectrum = bool(np.isfinite(spectrum).any())  # HDF5 has no nulls: an all-NaN spectrum is absent
        targetid = torch.tensor(int(row["targetid"]), dtype=torch.int64)
        item = {
            "spectrum": torch.from_numpy(np.nan_to_num(spectrum.astype(np.float32))),
            "valid": torch.tensor(has_spectrum), "has_spectrum": torch.tensor(has_spectrum),
            "has_image": torch.tensor(False),
            "object_id": targetid,
            "targets": {"redshift": torch.tensor(float(row["redshift"]), dtype=torch.float32), "targetid": targetid},
        }
        if self.images:
            image = row["image"]
            if image.ndim != 3 or image.shape[-1] != 3:
                raise DataError(f"{self.where(index)}: field 'image' has shape {image.shape}, "
                                "expected (H, W, 3) with bands g, r, z")
            has_image = bool(np.isfinite(image).any())  # all NaN: absent
            rgb = center_crop(legacy_survey_rgb(np.nan_to_num(image)), self.crop)
            item["image"] = self.maybe_augment(rgb, index).contiguous() if has_image else torch.zeros_like(rgb)
            item["has_image"] = torch.tensor(has_image)
            item["valid"] = torch.tensor(has_spectrum and has_image)  # a contrastive pair needs both
        return item


def euclid_columns(images: bool) -> list[str]:
    """The Euclid + DESI columns read: SpecFormer's spectra alone, or AstroCLIP's with the images."""
    return ["object_id", "targetid", "redshift", *(RGB_COLUMNS if images else []), *FLUX_COLUMNS]


class EuclidDesiPairs(_Augmented):
    """Euclid RGB images and DESI spectra from the Euclid + DESI matched sample."""

    def __init__(self, rows: SplitRows, image_size: int, spectrum_length: int = DESI_PIXELS,
                 augment: bool = False, seed: int = 0, images: bool = True, resample_spectra: bool = False,
                 extra_columns: tuple[str, ...] = ()) -> None:
        super().__init__(augment, seed)
        self.rows = rows
        self.extra_columns = tuple(c for c in extra_columns if c != "redshift")  # carried along (for embeddings)
        self.image_size = image_size
        self.spectrum_length = spectrum_length
        self.images = images
        self.resample_spectra = resample_spectra

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        """Image and spectrum of one object; `valid` when both are usable (the contrastive pair). A
        modality present but unusable is a data fault (`fault_image`, `fault_spectrum`, with the file
        and row), counted by the trainer; a null one is simply absent."""
        row = self.rows.row(index)
        object_id = int(row["object_id"])
        where = f"object_id {object_id}, {self.rows.where(index)}"
        item = {
            "object_id": torch.tensor(object_id, dtype=torch.int64),
            "targets": {"targetid": torch.tensor(int(row["targetid"]), dtype=torch.int64),
                        **scalar_values(row, ("redshift", *self.extra_columns))},
            "fault_spectrum": "",
        }
        try:
            flux = desi_flux(row["spectrum"], resample=self.resample_spectra)
        except DataError as exc:
            item["fault_spectrum"] = f"{exc} ({where})"
            flux = None
        item["has_spectrum"] = torch.tensor(flux is not None)
        spectrum = np.zeros(self.spectrum_length, dtype=np.float32)
        if flux is not None:
            # Bad pixels take the object's mean flux, so they do not move its standardisation much.
            filled = np.where(np.isfinite(flux), flux, np.nanmean(flux))[: self.spectrum_length]
            spectrum[: len(filled)] = filled
        item["spectrum"] = torch.from_numpy(spectrum)
        has_image = False
        if self.images:
            item["fault_image"] = ""
            try:
                image, has_image = self.maybe_augment(rgb_tensor(row["RGB_image"], self.image_size), index).contiguous(), True
            except DataError as exc:
                if row["RGB_image"] is not None:
                    item["fault_image"] = f"{exc} ({where})"
                image = torch.zeros(3, self.image_size, self.image_size)
            item["image"] = image
        item["has_image"] = torch.tensor(has_image)
        # A contrastive pair needs both; spectrum-only datasets (SpecFormer) need the spectrum.
        item["valid"] = item["has_spectrum"] & (item["has_image"] | (not self.images))
        return item
