"""`fmb embed astroclip`: image and spectrum embeddings in the shared space, per object, to parquet.

Columns: object_id, targetid, redshift, `embedding_image` and `embedding_spectrum` (L2-normalised
float32 lists; null where that modality is missing for the object) and `embedding_joint`
= normalize(image + spectrum) (FMB's joint embedding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from fmb.data.surveys.euclid_desi import open_split
from fmb.embeddings import EmbeddingWriter, joint_embedding
from fmb.errors import ConfigError, DataError
from fmb.models.astroclip.data import EUCLID_COLUMNS, AstroClipHDF5, EuclidDesiPairs
from fmb.models.astroclip.trainer import FAMILY, AstroCLIPConfig, build_astroclip, load_weights
from fmb.train import checkpoint as ckpt
from fmb.train.distributed import resolve_device
from fmb.train.loader import to_device

# HDF5 split name -> fraction of every group (upstream: first 80% train, the rest test).
_HDF5_SPLITS = {"train": "train", "validation": "validation", "test": "validation", "all": "all"}


def _dataset(config: AstroCLIPConfig, path: str, split: str, named: bool) -> torch.utils.data.Dataset:
    data = config.data
    if data.format == "hdf5":
        if split not in _HDF5_SPLITS:
            raise ConfigError(f"--split for HDF5 data is one of {', '.join(_HDF5_SPLITS)}, got '{split}'")
        fraction = {"train": (0.0, data.train_fraction), "validation": (data.train_fraction, 1.0),
                    "all": (0.0, 1.0)}[_HDF5_SPLITS[split]]
        return AstroClipHDF5(path, fraction, data.image_size, data.spectrum_length)
    if named:
        rows = open_split(path, split, EUCLID_COLUMNS, data.val_split, data.val_fraction, config.train.seed,
                          data.train_split)
    else:
        rows = open_split(path, split, EUCLID_COLUMNS, None, 0.0, 0)
    return EuclidDesiPairs(rows, data.image_size, data.spectrum_length, resample_spectra=data.resample_spectra)


def embed(checkpoint: Path, data: str | None, out: Path, options: dict[str, Any]) -> Path:
    directory = ckpt.find_checkpoint(Path(checkpoint))
    config = ckpt.read_config(directory, AstroCLIPConfig, options.get("set", []))
    torch.manual_seed(config.train.seed)
    model = build_astroclip(config.model, config.data.image_size)
    if not options.get("random_init"):
        load_weights(model, directory, FAMILY)
    device = resolve_device(options.get("device", "auto"), 0)
    model.to(device).eval()

    split = options.get("split")
    if data is None:
        if config.data.path is None:
            raise ConfigError(f"{directory}: its config has no data.path; pass --data")
        dataset = _dataset(config, config.data.path, split or "validation", named=True)
    else:
        dataset = _dataset(config, data, split or "all", named=False)
    if len(dataset) == 0:
        raise DataError("nothing to embed: the selected split is empty")

    writer = EmbeddingWriter(out)
    loader = DataLoader(Subset(dataset, range(writer.rows_done, len(dataset))), batch_size=options.get("batch_size", 64),
                        num_workers=options.get("num_workers", 0), pin_memory=device.type == "cuda")
    with torch.no_grad():
        for batch in tqdm(loader, desc="embed astroclip", unit="batch", disable=None):
            targets = {key: batch[key].numpy() for key in ("targetid", "redshift")}
            object_id = batch["object_id"].numpy()
            batch = to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                image, spectrum, _ = model(batch["image"], batch["spectrum"])
            valid = batch["valid"]
            vectors = {"image": F.normalize(image.float(), dim=-1), "spectrum": F.normalize(spectrum.float(), dim=-1)}
            present = {"image": valid, "spectrum": valid}
            vectors["joint"] = joint_embedding(vectors, present)
            present["joint"] = valid
            writer.add(object_id, targets, vectors, present)
    return writer.finish()
