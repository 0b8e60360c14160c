"""`fmb embed astromodal`: per-object embeddings (mean of the final hidden states over the
object's tokens) of a trained checkpoint, written to parquet with the object ids."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from fmb.data.splits import holdout_mask
from fmb.embeddings import EmbeddingWriter
from fmb.models.astromodal.data import SequenceDataset, TokenShards, collate_sequences
from fmb.models.astromodal.model import AstromodalTransformer
from fmb.models.astromodal.tokenize import Tokenizers, encode_dataset
from fmb.train import checkpoint as ckpt
from fmb.train.distributed import resolve_device

log = logging.getLogger("fmb")


def tokenizer_dir(config: Any, directory: Path) -> Path:
    """The run's fitted tokenisers: data.tokenizers, else <run>/tokenizers."""
    run_dir = Path(config.train.out) if config.train.out else ckpt.find_checkpoint(Path(directory)).parent.parent
    return Path(config.data.tokenizers) if config.data.tokenizers else run_dir / "tokenizers"


def load_model(directory: Path) -> tuple[AstromodalTransformer, Tokenizers, Any]:
    """(model with loaded weights, its tokenisers, run config) of an astromodal checkpoint."""
    from fmb.models.astromodal.trainer import AstromodalConfig

    directory = ckpt.find_checkpoint(Path(directory))
    ckpt.check_family(directory, "astromodal")
    config = ckpt.read_config(directory, AstromodalConfig)
    toks = Tokenizers.load(tokenizer_dir(config, directory))
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
    """fmb's embedding schema: object_id (the S-PLUS id), the object's field and truth columns,
    and `embedding_joint` (the whole token sequence: every modality the object has)."""
    model, toks, config = load_model(checkpoint)
    if options.get("random_init"):
        torch.manual_seed(config.train.seed)
        model = AstromodalTransformer(config.model, toks.vocabulary(), toks.image.latent).eval()
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
            encode_dataset(data, tokenizer_dir(config, checkpoint), shards_dir)
        shards = TokenShards(shards_dir)
        rows = np.arange(len(shards))
    writer = EmbeddingWriter(out_file)
    rows = rows[writer.rows_done:]
    objects = shards.objects().take(pa.array(rows))
    batch_rows = int(options.get("batch_size", 64)) * 16
    for start in range(0, len(rows), batch_rows):
        chunk = slice(start, start + batch_rows)
        vectors = embed_shards(model, shards, rows[chunk], int(options.get("batch_size", 64)), device)
        part = objects.slice(start, len(rows[chunk]))
        targets = {name: part.column(name).to_numpy(zero_copy_only=False) for name in part.column_names
                   if name not in ("id", "key")}
        writer.add(part.column("id").to_numpy(zero_copy_only=False), targets, {"joint": vectors})
    written = writer.finish()
    log.info(f"embedded {writer.rows_done} objects into {written}")
    return written
