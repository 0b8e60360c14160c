"""`fmb embed astropt`: per-object embeddings of a trained AstroPT, in fmb's embedding schema.

Columns: object_id, targetid, redshift, `embedding_images`, `embedding_spectra` (L2-normalised;
null where the modality is absent for that object) and `embedding_joint` =
normalize(normalize(image) + normalize(spectrum)) (one of them alone where the other is absent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from fmb.data.surveys.euclid_desi import embedding_rows
from fmb.embeddings import EmbeddingWriter, joint_embedding
from fmb.models.astropt.data import COLUMNS, EuclidDesiPatches
from fmb.models.astropt.trainer import AstroPTConfig, build_astropt, load_into, model_inputs
from fmb.train import checkpoint as ckpt
from fmb.train.distributed import resolve_device
from fmb.train.loader import to_device


def embed(checkpoint: Path, data: str | None, out: Path, options: dict[str, Any]) -> Path:
    directory = ckpt.find_checkpoint(checkpoint)
    config = ckpt.read_config(directory, AstroPTConfig, options.get("set", []))
    torch.manual_seed(config.train.seed)
    model = build_astropt(config.model)
    if not options.get("random_init"):
        load_into(model, directory)
    device = resolve_device(options.get("device", "auto"), 0)
    model.to(device).eval()

    data_cfg = config.data
    rows, truth = embedding_rows(data, options.get("split"), COLUMNS, data_cfg, config.train.seed)
    dataset = EuclidDesiPatches(rows, config.model.modalities, data_cfg.image_size, data_cfg.spectrum_length, tuple(truth),
                                data_cfg.resample_spectra)
    writer = EmbeddingWriter(out)
    remaining = Subset(dataset, range(writer.rows_done, len(dataset)))
    loader = DataLoader(remaining, batch_size=options.get("batch_size", 64), num_workers=options.get("num_workers", 2),
                        pin_memory=device.type == "cuda")
    layer, reduction = options.get("layer", "middle"), options.get("reduction", "mean")
    for batch in tqdm(loader, desc="embed astropt", unit="batch", disable=None):
        targets = {name: batch[name].numpy() for name in ("targetid", "redshift", *truth)}
        object_id = batch["object_id"].numpy()
        batch = to_device(batch, device)
        tokens, positions, masks = model_inputs(model.modalities, batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            vectors = model.embed(tokens, positions, masks, layer=layer, reduction=reduction)
        vectors = {name: F.normalize(v.float(), dim=-1) for name, v in vectors.items()}
        present = {name: masks[name].any(dim=1) for name in vectors}
        vectors["joint"] = joint_embedding(vectors, present)
        present["joint"] = torch.stack(list(present.values())).any(dim=0)
        writer.add(object_id, targets, vectors, present)
    return writer.finish()
