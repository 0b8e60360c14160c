"""`fmb embed aion`: per-object codec-latent embeddings of the adapted (HSC-like) Euclid image.

Columns: object_id; `embedding_image` = the codec's pre-quantisation latents (embedding_dim,
5 for AION) mean-pooled over the 24 x 24 grid; `embedding_image_encoder` = the encoder features
before the 1x1 projection (hidden_dims wide) mean-pooled likewise. Float32 fixed-size lists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fmb.data.euclid_desi import open_split
from fmb.data.tables import available_splits
from fmb.errors import ConfigError, DataError
from fmb.models.aion.data import COLUMNS, SIZE, EuclidBands
from fmb.models.aion.model import HSC_BANDS
from fmb.models.aion.trainer import load_checkpoint_model
from fmb.train.distributed import resolve_device


def embed(checkpoint: Path, data: str | None, out: Path, options: dict[str, Any]) -> Path:
    model, config, directory = load_checkpoint_model(checkpoint, options.get("set", []))
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

    loader = DataLoader(EuclidBands(rows, SIZE, data_cfg.fit), batch_size=options.get("batch_size", 64),
                        num_workers=options.get("num_workers", 2), pin_memory=device.type == "cuda")
    ids, latents, features = [], [], []
    codec = model.codec
    with torch.no_grad():
        for batch in tqdm(loader, desc="embed aion", unit="batch", disable=None):
            ids.append(batch["object_id"].numpy())
            hsc = model.to_hsc(batch["euclid"].to(device, non_blocking=True))
            encoded = codec.encode_features(hsc, HSC_BANDS)
            features.append(encoded.float().mean(dim=(-1, -2)).cpu())
            latents.append(codec.pre_quant_proj(encoded).float().mean(dim=(-1, -2)).cpu())
    table = {"object_id": np.concatenate(ids)}
    for name, parts in (("embedding_image", latents), ("embedding_image_encoder", features)):
        values = torch.cat(parts).numpy().astype(np.float32)
        table[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), out)
    return out
