"""`fmb embed astrom3`: per-modality embeddings of a checkpoint, in fmb's embedding schema.

Columns: object_id, label (string; null where the label is not one of the checkpoint's
classes), class_index (-1 for those), valid (false for rows left out as bad input),
`embedding_<modality>` per modality the model has (photometry, spectra, metadata; null for
invalid rows), `embedding_joint` (normalised sum), and `predicted` for classification
checkpoints. `--split NAME` picks the split (default: the checkpoint's validation split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from fmb.embeddings import EmbeddingWriter, joint_embedding
from fmb.errors import ConfigError
from fmb.models.astrom3.data import AstroM3Dataset
from fmb.models.astrom3.model import AstroM3
from fmb.models.astrom3.trainer import INPUTS, load_checkpoint_config
from fmb.train import checkpoint as ckpt
from fmb.train.distributed import resolve_device


@torch.no_grad()
def embed(checkpoint: Path, data: str | None, out_file: Path, options: dict[str, Any]) -> Path:
    directory = ckpt.find_checkpoint(Path(checkpoint))
    cfg = load_checkpoint_config(directory)
    if options.get("set"):
        raise ConfigError("astrom3 embed takes no --set options; choose the split with --split NAME")
    path = data or cfg.data.path
    if path is None:
        raise ConfigError(f"{directory} names no data path (converted weights?): pass --data")
    classes = cfg.data.classes
    dataset = AstroM3Dataset(path, options.get("split") or cfg.data.val_split, classes, cfg.model.seq_len, train=False,
                             bad_rows="mask", strict_labels=False)
    torch.manual_seed(cfg.train.seed)
    model = AstroM3(cfg.model, num_classes=len(classes))
    if not options.get("random_init"):
        ckpt.load_state_strict(model, ckpt.read_safetensors(directory / ckpt.MODEL_FILE), str(directory))
    device = resolve_device(options.get("device", "auto"), 0)
    model.to(device).eval()
    torch.manual_seed(0)  # ProbSparse samples keys: fixed draws give reproducible embeddings

    writer = EmbeddingWriter(out_file)
    remaining = Subset(dataset, range(writer.rows_done, len(dataset)))
    loader = DataLoader(remaining, batch_size=int(options.get("batch_size", 64)), shuffle=False, num_workers=0)
    names = np.array(classes, dtype=object)
    for batch in loader:
        out = model(*[batch[k].to(device) for k in INPUTS])
        valid = batch["valid"]
        index = batch["label"].numpy()
        targets = {"label": [names[i] if i >= 0 else None for i in index], "class_index": index.astype(np.int32),
                   "valid": valid.numpy()}
        if "logits" in out:
            targets["predicted"] = names[out["logits"].argmax(1).cpu().numpy()].tolist()
        vectors = {name: out[name].float() for name in model.modalities}
        present = {name: valid for name in vectors}
        if len(vectors) > 1:
            vectors["joint"] = joint_embedding(vectors, present)
            present["joint"] = valid
        writer.add(batch["object_id"].numpy(), targets, vectors, present)
    return writer.finish()
