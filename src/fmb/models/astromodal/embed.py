"""`fmb embed astromodal`: per-object embeddings (mean of the final hidden states over the
object's tokens) of a trained checkpoint, written to parquet with the object ids."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from fmb.config import ConfigLayers, build, read_yaml
from fmb.data.splits import holdout_mask
from fmb.errors import CheckpointError
from fmb.models.astromodal.data import SequenceDataset, TokenShards, collate_sequences
from fmb.models.astromodal.model import AstromodalTransformer
from fmb.models.astromodal.tokenize import Tokenizers, encode_dataset
from fmb.train import checkpoint as ckpt
from fmb.train.distributed import resolve_device

log = logging.getLogger("fmb")


def checkpoint_dir(path: Path) -> Path:
    """A step directory, or the newest complete one of a run directory."""
    path = Path(path)
    if ckpt.is_complete(path):
        return path
    latest = ckpt.latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path} is neither a checkpoint directory nor a run directory with checkpoints")
    return latest


def load_model(directory: Path) -> tuple[AstromodalTransformer, Tokenizers, Any]:
    """(model with loaded weights, its tokenisers, run config) of an astromodal checkpoint."""
    from fmb.models.astromodal.trainer import AstromodalConfig

    directory = checkpoint_dir(directory)
    ckpt.check_family(directory, "astromodal")
    layers = ConfigLayers()
    layers.add(read_yaml(directory / ckpt.CONFIG_FILE), str(directory / ckpt.CONFIG_FILE))
    config = build(AstromodalConfig, layers)
    run_dir = Path(config.train.out) if config.train.out else directory.parent.parent
    toks = Tokenizers.load(Path(config.data.tokenizers) if config.data.tokenizers else run_dir / "tokenizers")
    model = AstromodalTransformer(config.model, toks.vocabulary(), toks.image.latent)
    ckpt.load_state_strict(model, ckpt.read_safetensors(directory / ckpt.MODEL_FILE), str(directory))
    return model.eval(), toks, config


@torch.no_grad()
def embed_shards(model: AstromodalTransformer, shards: TokenShards, rows: np.ndarray, batch_size: int,
                 device: torch.device) -> np.ndarray:
    """(len(rows), d_model) float32 mean-pooled final hidden states over real tokens."""
    dataset = SequenceDataset(shards, model.vocab, model.max_len, rows)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_sequences)
    model.to(device)
    out = []
    for batch in loader:
        tokens, types, mask = (batch[k].to(device) for k in ("tokens", "types", "mask"))
        _, hidden = model(tokens, types, mask, return_hidden=True)
        weights = mask[..., None].float()
        out.append(((hidden.float() * weights).sum(1) / weights.sum(1)).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.tok_emb.embedding_dim), np.float32)


def embed(checkpoint: Path, data: str | None, out_file: Path, options: dict[str, Any]) -> Path:
    model, toks, config = load_model(checkpoint)
    device = resolve_device(options.get("device", "auto"), 0)
    out_file = Path(out_file)
    if data is None:  # the run's validation objects
        run_dir = Path(config.train.out)
        shards = TokenShards(Path(config.data.tokens) if config.data.tokens else run_dir / "tokens")
        keys = shards.objects(["key"]).column("key").to_numpy()
        rows = np.flatnonzero(holdout_mask(keys, config.data.val_fraction, config.data.split_seed))
    else:
        shards_dir = Path(data)
        if not (shards_dir / "meta.json").is_file():  # hypercube fields: encode them first
            shards_dir = out_file.with_suffix(".tokens")
            encode_dataset(data, toks_dir(config), shards_dir)
        shards = TokenShards(shards_dir)
        rows = np.arange(len(shards))
    vectors = embed_shards(model, shards, rows, int(options.get("batch_size", 64)), device)
    objects = shards.objects().take(pa.array(rows))
    table = objects.append_column("embedding", pa.FixedSizeListArray.from_arrays(
        pa.array(vectors.reshape(-1)), vectors.shape[1]))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out_file)
    log.info(f"embedded {len(rows)} objects ({vectors.shape[1]} dims) into {out_file}")
    return out_file


def toks_dir(config: Any) -> Path:
    return Path(config.data.tokenizers) if config.data.tokenizers else Path(config.train.out) / "tokenizers"
