"""`fmb embed aion`: per-object codec-latent embeddings of the adapted (HSC-like) Euclid image.

Columns (fmb's embedding schema): object_id, redshift and truth_* when the data has them;
`embedding_image` = the codec's pre-quantisation latents (embedding_dim, 5 for AION) pooled over
the 24 x 24 grid; `embedding_image_encoder` = the encoder features before the 1x1 projection
(hidden_dims wide) pooled likewise. Pooling = per-channel mean and standard deviation over the
grid (2 x channels): the mean keeps colour and flux, the spread keeps how the object fills the
grid (size, concentration), which a mean alone averages away. Float32 fixed-size lists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from fmb.data.surveys.euclid_desi import embedding_rows
from fmb.embeddings import EmbeddingWriter
from fmb.models.aion.data import COLUMNS, SIZE, EuclidBands
from fmb.models.aion.model import HSC_BANDS, AionImageCodec
from fmb.models.aion.trainer import build_adapters, load_checkpoint_model
from fmb.train.distributed import resolve_device


def grid_pool(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2C) float32: per-channel mean, then standard deviation, over the grid."""
    features = features.float()
    return torch.cat([features.mean(dim=(-1, -2)), features.std(dim=(-1, -2))], dim=1)


def embed(checkpoint: Path, data: str | None, out: Path, options: dict[str, Any]) -> Path:
    model, config, directory = load_checkpoint_model(checkpoint, options.get("set", []))
    if options.get("random_init"):  # baseline: untrained adapters around the same (pretrained) codec
        torch.manual_seed(config.train.seed)
        fresh = build_adapters(config.model, AionImageCodec(config.model.codec.shape))
        fresh.codec.load_state_dict(model.codec.state_dict())
        model = fresh
    device = resolve_device(options.get("device", "auto"), 0)
    model.to(device).eval()
    rows, targets = embedding_rows(data, options.get("split"), COLUMNS, config.data, config.train.seed)
    dataset = EuclidBands(rows, SIZE, config.data.fit, tuple(targets))
    writer = EmbeddingWriter(out)
    loader = DataLoader(Subset(dataset, range(writer.rows_done, len(dataset))), batch_size=options.get("batch_size", 64),
                        num_workers=options.get("num_workers", 2), pin_memory=device.type == "cuda")
    codec = model.codec
    with torch.no_grad():
        for batch in tqdm(loader, desc="embed aion", unit="batch", disable=None):
            hsc = model.to_hsc(batch["euclid"].to(device, non_blocking=True))
            encoded = codec.encode_features(hsc, HSC_BANDS)
            vectors = {"image": grid_pool(codec.pre_quant_proj(encoded)), "image_encoder": grid_pool(encoded)}
            writer.add(batch["object_id"].numpy(), {name: batch[name].numpy() for name in targets}, vectors)
    return writer.finish()
