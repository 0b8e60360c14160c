"""`fmb embed aion`: per-object AION embeddings of the adapted (HSC-like) Euclid image and the DESI spectrum.

Columns (fmb's embedding schema): object_id, redshift and truth_* when the data has them;
`embedding_image`, `embedding_spectrum` (null without a spectrum), `embedding_joint` from the AION
transformer and `aion_redshift` from its decoder (fmb.models.aion.embedder); with
model.embed.codec_latents also `embedding_image_codec` and `embedding_image_codec_encoder`.
The transformer comes from model.transformer.path, else paths_local.yaml `aion_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from fmb.data.euclid_desi import embedding_rows
from fmb.embeddings import EmbeddingWriter
from fmb.errors import ConfigError
from fmb.models.aion.data import COLUMNS, SIZE, SPECTRUM_COLUMN, EuclidBands, EuclidBandsAndSpectrum
from fmb.models.aion.embedder import AionEmbedder
from fmb.models.aion.model import AionImageCodec
from fmb.models.aion.pretrained import PATHS_KEY, AionModel, load_aion
from fmb.models.aion.trainer import AionModelConfig, build_adapters, load_checkpoint_model
from fmb.paths import find_paths_file
from fmb.train.distributed import resolve_device


def embedding_transformer(cfg: AionModelConfig, image_codec: AionImageCodec) -> AionModel | None:
    """The AION transformer and codecs to embed with (None with model.embed.transformer=false)."""
    if not cfg.embed.transformer:
        if not cfg.embed.codec_latents:
            raise ConfigError("model.embed.transformer=false and model.embed.codec_latents=false leave nothing to embed")
        return None
    path = cfg.transformer.path or find_paths_file().resolved().get(PATHS_KEY)
    if not path:
        raise ConfigError(f"no AION transformer to embed with: set `{PATHS_KEY}:` in paths_local.yaml to the "
                          "polymathic-ai/aion-base directory (docs/aion.md), or --set model.transformer.path=DIR; "
                          "--set model.embed.transformer=false --set model.embed.codec_latents=true embeds the codec "
                          "latents alone")
    return load_aion(path, cfg.transformer.size, image_codec)


def embed(checkpoint: Path, data: str | None, out: Path, options: dict[str, Any]) -> Path:
    model, config, directory = load_checkpoint_model(checkpoint, options.get("set", []))
    if options.get("random_init"):  # baseline: untrained adapters around the same (pretrained) codec
        torch.manual_seed(config.train.seed)
        fresh = build_adapters(config.model, AionImageCodec(config.model.codec.shape))
        fresh.codec.load_state_dict(model.codec.state_dict())
        model = fresh
    device = resolve_device(options.get("device", "auto"), 0)
    model.to(device).eval()
    aion = embedding_transformer(config.model, model.codec)
    embedder = AionEmbedder(model, aion and aion.to(device), config.model.embed, device)
    columns = COLUMNS + [SPECTRUM_COLUMN] if embedder.spectra else COLUMNS
    rows, targets = embedding_rows(data, options.get("split"), columns, config.data, config.train.seed)
    dataset = (EuclidBandsAndSpectrum if embedder.spectra else EuclidBands)(rows, SIZE, config.data.fit, tuple(targets))
    writer = EmbeddingWriter(out)
    loader = DataLoader(Subset(dataset, range(writer.rows_done, len(dataset))), batch_size=options.get("batch_size", 64),
                        num_workers=options.get("num_workers", 2), pin_memory=device.type == "cuda")
    with torch.no_grad():
        for batch in tqdm(loader, desc="embed aion", unit="batch", disable=None):
            vectors, present = embedder(batch)
            values = {name: batch[name].numpy() for name in targets}
            values.update({name: value.float().cpu().numpy() for name, value in embedder.predictions.items()})
            writer.add(batch["object_id"].numpy(), values, vectors, present)
    return writer.finish()
