"""AstroPT samples from the Euclid + DESI sample: RGB image patches and DESI spectrum patches.

Image: decoded, resized to `image_size` where it differs, cut into patch x patch x 3 tokens
flattened in (row, column, channel) order, kept as 8-bit values (scaled to [0, 1] on the device). Spectrum: cleaned (see fmb.data.surveys.euclid_desi), cut
into patches of `patch_size` pixels. Each modality carries a token mask, so an object with no
spectrum (or a broken image) still trains on its other modality without misaligning the batch.
A modality that is present but unusable is reported as a data fault (`fault_image`,
`fault_spectrum`: what is wrong, with the file and row), counted and checked by the trainer.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from fmb.data.surveys.euclid_desi import (
    FLUX_COLUMNS,
    RGB_COLUMNS,
    SplitRows,
    clean_spectrum,
    rgb_array,
    rgb_resized,
    scalar_values,
)
from fmb.errors import DataError
from fmb.models.astropt.model import Modality

log = logging.getLogger("fmb")

COLUMNS = ["object_id", "targetid", "redshift", *RGB_COLUMNS, *FLUX_COLUMNS]


def columns_for(modalities: list[Modality]) -> list[str]:
    """The columns a model with these modalities reads (an image-only model skips the spectra)."""
    names = {m.name for m in modalities}
    return [c for c in COLUMNS if not ((c in RGB_COLUMNS and "images" not in names)
                                       or (c in FLUX_COLUMNS and "spectra" not in names))]


def image_patches(image: np.ndarray, patch: int) -> np.ndarray:
    """(H, W, C) -> (H/p * W/p, p * p * C), patches in raster order, each in (row, column, channel) order."""
    height, width, channels = image.shape
    grid = image.reshape(height // patch, patch, width // patch, patch, channels).transpose(0, 2, 1, 3, 4)
    return grid.reshape(-1, patch * patch * channels)


def rgb_patches(image_struct: dict | None, size: int, patch: int) -> torch.Tensor:
    """`RGB_image` -> `image_patches` of the image at `size`, as 8-bit values: `model_inputs` scales them
    to [0, 1] on the device, so a quarter of the bytes cross from DataLoader workers and to the GPU.
    An image of another size is resized (antialiased bilinear) and rounded back to 8 bits, as a
    Pillow resize gives it."""
    array = rgb_array(image_struct)
    if array.shape[:2] != (size, size):
        array = rgb_resized(array, size).mul_(255.0).round_().to(torch.uint8).permute(1, 2, 0).numpy()
    return torch.from_numpy(image_patches(array, patch))


def spectrum_patches(values: np.ndarray, valid: np.ndarray, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to a multiple of `patch` with zeros; a patch is valid when all its real pixels are (`valid`:
    one truth value per pixel, of any dtype)."""
    size = len(values)
    if len(valid) != size:
        raise ValueError(f"spectrum_patches: {size} values but {len(valid)} validity flags")
    padded = np.zeros(size + (-size) % patch, values.dtype)
    padded[:size] = values
    mask = np.ones(len(padded) // patch, bool)
    # the patches holding an invalid pixel, from the invalid pixels' positions (a reduction along
    # rows of `patch` pixels costs several times more)
    mask[np.flatnonzero(~np.asarray(valid, bool)) // patch] = False
    return torch.from_numpy(padded.reshape(-1, patch)), torch.from_numpy(mask)


class EuclidDesiPatches(Dataset):
    def __init__(self, rows: SplitRows, modalities: list[Modality], image_size: int, spectrum_length: int,
                 extra_columns: tuple[str, ...] = (), resample_spectra: bool = False) -> None:
        self.rows = rows
        self.resample_spectra = resample_spectra
        self.extra_columns = tuple(c for c in extra_columns if c != "redshift")  # carried along (truth, for embeddings)
        self.modalities = {m.name: m for m in modalities}
        self.image_size = image_size
        self.spectrum_length = spectrum_length
        self.image_tokens = (image_size // self.modalities["images"].patch_size) ** 2 if "images" in self.modalities else 0
        spectra = self.modalities.get("spectra")
        self.spectrum_tokens = -(-spectrum_length // spectra.patch_size) if spectra else 0
        # Float-position spectra: wavelength positions scaled to [0, 1] over the DESI range, as patches
        # (the same for every sample, so made once).
        self.positions = None
        if spectra and spectra.positions == "float":
            wavelength01 = np.linspace(0.0, 1.0, spectrum_length, dtype=np.float32)
            self.positions, _ = spectrum_patches(wavelength01, np.ones(spectrum_length, bool), spectra.patch_size)

    def __len__(self) -> int:
        return len(self.rows)

    def shuffle_blocks(self) -> list[np.ndarray] | None:
        return self.rows.shuffle_blocks()

    def where(self, i: int, object_id: int) -> str:
        """Sample `i` for a fault message: its object_id, file and row."""
        return f"object_id {object_id}, {self.rows.where(i)}"

    def __getitem__(self, i: int) -> dict:
        row = self.rows.row(i)
        object_id = int(row["object_id"])
        item = {  # scalar_tensor: an int64 exactly as torch.tensor gives it, in half the time
            "object_id": torch.scalar_tensor(object_id, dtype=torch.int64),
            "targets": {"targetid": torch.scalar_tensor(int(row["targetid"]), dtype=torch.int64),
                        **scalar_values(row, ("redshift", *self.extra_columns))},
        }
        if "images" in self.modalities:
            patch = self.modalities["images"].patch_size
            item["fault_image"] = ""
            try:
                tokens = rgb_patches(row["RGB_image"], self.image_size, patch)
                mask = torch.ones(len(tokens), dtype=torch.bool)
            except DataError as exc:
                if row["RGB_image"] is not None:  # present but unusable; a null image is simply absent
                    where = self.where(i, object_id)
                    item["fault_image"] = f"{exc} ({where})"
                    log.debug(f"{where}: image skipped: {exc}")
                tokens = torch.zeros(self.image_tokens, patch * patch * 3, dtype=torch.uint8)
                mask = torch.zeros(self.image_tokens, dtype=torch.bool)
            item["images"], item["images_mask"] = tokens, mask
        if "spectra" in self.modalities:
            spec = self.modalities["spectra"]
            item["fault_spectrum"] = ""
            try:
                cleaned = clean_spectrum(row["spectrum"], self.spectrum_length, resample=self.resample_spectra)
            except DataError as exc:
                where = self.where(i, object_id)
                item["fault_spectrum"] = f"{exc} ({where})"
                log.debug(f"{where}: spectrum skipped: {exc}")
                cleaned = None
            if cleaned is None:
                tokens = torch.zeros(self.spectrum_tokens, spec.patch_size)
                mask = torch.zeros(self.spectrum_tokens, dtype=torch.bool)
            else:
                tokens, mask = spectrum_patches(*cleaned, spec.patch_size)
            item["spectra"], item["spectra_mask"] = tokens, mask
            if self.positions is not None:
                item["spectra_positions"] = self.positions.clone()  # each sample's own, as before
        return item
