"""`fmb embed astrom3`: per-modality embeddings of a checkpoint to parquet.

Columns: object_id, label (string; null where the label is not one of the checkpoint's
classes), class_index (-1 for those), valid (false for rows left out as bad input: their
embeddings are NaN), one float32 list column `<modality>_embedding` per modality the model
has (photometry, spectra, metadata), and `predicted` for classification checkpoints.
Options through --set: split=NAME (default: the checkpoint's validation split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from fmb.errors import ConfigError
from fmb.models.astrom3.data import AstroM3Dataset
from fmb.models.astrom3.model import AstroM3
from fmb.models.astrom3.trainer import INPUTS, load_checkpoint_config, resolve_checkpoint
from fmb.train import checkpoint as ckpt
from fmb.train.distributed import resolve_device


def parse_options(sets: list[str]) -> dict[str, str]:
    options = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or key not in ("split",):
            raise ConfigError(f"--set {item}: astrom3 embed understands only split=NAME")
        options[key] = value
    return options


@torch.no_grad()
def embed(checkpoint: Path, data: str | None, out_file: Path, options: dict[str, Any]) -> Path:
    directory = resolve_checkpoint(checkpoint)
    cfg = load_checkpoint_config(directory)
    extra = parse_options(options.get("set", []))
    path = data or cfg.data.path
    if path is None:
        raise ConfigError(f"{directory} names no data path (converted weights?): pass --data")
    classes = cfg.data.classes
    dataset = AstroM3Dataset(path, extra.get("split", cfg.data.val_split), classes, cfg.model.seq_len, train=False,
                             bad_rows="mask", strict_labels=False)
    model = AstroM3(cfg.model, num_classes=len(classes))
    ckpt.load_state_strict(model, ckpt.read_safetensors(directory / ckpt.MODEL_FILE), str(directory))
    device = resolve_device(options.get("device", "auto"), 0)
    model.to(device).eval()
    torch.manual_seed(0)  # ProbSparse samples keys: fixed draws give reproducible embeddings

    loader = DataLoader(dataset, batch_size=int(options.get("batch_size", 64)), shuffle=False, num_workers=0)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in loader:
        inputs = [batch[k].to(device) for k in INPUTS]
        out = model(*inputs)
        valid = batch["valid"].numpy()
        columns = {"object_id": batch["object_id"].numpy(), "class_index": batch["label"].numpy(), "valid": valid}
        for name in model.modalities:
            columns[f"{name}_embedding"] = out[name].float().cpu().numpy()
        if "logits" in out:
            columns["predicted"] = out["logits"].argmax(1).cpu().numpy()
        for name, value in columns.items():
            if name.endswith("_embedding"):
                value = np.where(valid[:, None], value, np.nan)
            parts.setdefault(name, []).append(value)
    merged = {name: np.concatenate(values) for name, values in parts.items()}

    names = np.array(classes, dtype=object)
    index = merged["class_index"]
    table = {
        "object_id": pa.array(merged["object_id"], pa.int64()),
        "label": pa.array([names[i] if i >= 0 else None for i in index], pa.string()),
        "class_index": pa.array(index, pa.int32()),
        "valid": pa.array(merged["valid"], pa.bool_()),
    }
    for name in model.modalities:
        values = merged[f"{name}_embedding"].astype(np.float32)
        table[f"{name}_embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    if "predicted" in merged:
        table["predicted"] = pa.array(names[merged["predicted"]].tolist(), pa.string())
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), out_file)
    return out_file
