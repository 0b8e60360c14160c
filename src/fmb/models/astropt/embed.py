"""`fmb embed astropt`: per-object embeddings of a trained AstroPT to parquet.

Columns: object_id, targetid, redshift, `embedding_<modality>` (float32 lists; null where the
modality is absent for that object) and `embedding_joint` = normalize(normalize(image) +
normalize(spectrum)) (the image or spectrum alone where the other is absent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from fmb.config import ConfigLayers, build, parse_set_option
from fmb.data.euclid_desi import open_split
from fmb.data.tables import available_splits
from fmb.errors import ConfigError, DataError
from fmb.models.astropt.data import COLUMNS, EuclidDesiPatches
from fmb.models.astropt.trainer import AstroPTConfig, build_astropt, load_into, model_inputs
from fmb.train import checkpoint as ckpt
from fmb.train.distributed import resolve_device
from fmb.train.loader import to_device


def load_run_config(directory: Path, sets: list[str]) -> AstroPTConfig:
    layers = ConfigLayers()
    layers.add_file(directory / ckpt.CONFIG_FILE)
    for option in sets:
        layers.set(*parse_set_option(option), source=f"--set {option}")
    return build(AstroPTConfig, layers)


def embed(checkpoint: Path, data: str | None, out: Path, options: dict[str, Any]) -> Path:
    directory = ckpt.find_checkpoint(checkpoint)
    config = load_run_config(directory, options.get("set", []))
    torch.manual_seed(config.train.seed)
    model = build_astropt(config.model)
    if not options.get("random_init"):
        load_into(model, directory)
    device = resolve_device(options.get("device", "auto"), 0)
    model.to(device).eval()

    data_cfg = config.data
    split = options.get("split")
    if data is None:
        if data_cfg.path is None:
            raise ConfigError(f"{directory}: its config has no data.path; pass --data")
        rows = open_split(data_cfg.path, split or "validation", COLUMNS, data_cfg.val_split, data_cfg.val_fraction,
                          config.train.seed, data_cfg.train_split)
    else:
        splits = available_splits(Path(data))
        if split is None and len(splits) > 1:
            raise ConfigError(f"{data} has splits {', '.join(splits)}: choose one with --split")
        rows = open_split(data, split or (splits[0] if splits else "all"), COLUMNS, None, 0.0, 0)
    if len(rows) == 0:
        raise DataError("nothing to embed: the selected split is empty")

    dataset = EuclidDesiPatches(rows, config.model.modalities, data_cfg.image_size, data_cfg.spectrum_length)
    loader = DataLoader(dataset, batch_size=options.get("batch_size", 64), num_workers=options.get("num_workers", 2),
                        pin_memory=device.type == "cuda")
    layer, reduction = options.get("layer", "middle"), options.get("reduction", "mean")
    names = [m.name for m in model.modalities]
    columns: dict[str, list] = {"object_id": [], "targetid": [], "redshift": []}
    vectors: dict[str, list] = {name: [] for name in names}
    present: dict[str, list] = {name: [] for name in names}
    for batch in tqdm(loader, desc="embed astropt", unit="batch", disable=None):
        for key in columns:
            columns[key].append(batch[key].numpy())
        batch = to_device(batch, device)
        tokens, positions, masks = model_inputs(model.modalities, batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out_vectors = model.embed(tokens, positions, masks, layer=layer, reduction=reduction)
        for name in names:
            vectors[name].append(F.normalize(out_vectors[name].float(), dim=-1).cpu())
            present[name].append(masks[name].any(dim=1).cpu())
    return write_embeddings(out, columns, vectors, present)


def write_embeddings(out: Path, columns: dict[str, list], vectors: dict[str, list], present: dict[str, list]) -> Path:
    table = {key: np.concatenate(parts) for key, parts in columns.items()}
    stacked = {name: torch.cat(parts) for name, parts in vectors.items()}
    mask = {name: torch.cat(parts) for name, parts in present.items()}
    joint = sum(stacked[name] * mask[name][:, None] for name in stacked)
    stacked["joint"] = F.normalize(joint, dim=-1)
    mask["joint"] = torch.stack(list(mask.values())).any(dim=0)
    for name, values in stacked.items():
        width = values.shape[1]
        flat = pa.array(values.numpy().astype(np.float32).reshape(-1))
        absent = pa.array(~mask[name].numpy())
        table[f"embedding_{name}"] = pa.FixedSizeListArray.from_arrays(flat, width, mask=absent)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), out)
    return out
