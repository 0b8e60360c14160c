"""The family-specific step of `fmb embed aion`: one batch -> ({modality: vectors}, {modality: present}).

The Euclid bands go through the Euclid -> HSC adapter and the image codec (576 tokens), DESI spectra
through the spectrum codec (273 tokens). The AION transformer then encodes
- the image tokens alone -> `image`;
- the spectrum tokens alone, for the objects that have a spectrum -> `spectrum` (absent for the others);
- both in one pass, image first -> `joint` (objects without a spectrum: their spectrum tokens are masked,
  so it is their image alone);
each the mean of upstream `encode`'s outputs over the object's kept tokens, the first
`model.embed.num_encoder_tokens` of them (with 600 the joint pass keeps the 576 image tokens and the
first 24 spectrum tokens, as in the FMB study). The joint encoding also feeds the decoder, whose redshift
token distribution gives the zero-shot `aion_redshift` (its expectation), left in `predictions`.
`model.embed.codec_latents` adds the image codec's pooled latents (`image_codec`, `image_codec_encoder`:
per-channel mean and spread over the 24 x 24 grid), the embedding fmb wrote before the transformer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fmb.data.surveys.euclid_desi import DESI_WAVELENGTH
from fmb.errors import ConfigError
from fmb.models.aion.model import HSC_BANDS, AionAdapters, AionImageCodec
from fmb.models.aion.pretrained import PATHS_KEY, AionModel, load_aion
from fmb.models.aion.transformer import IMAGE_HSC, MODALITIES, REDSHIFT, SPECTRUM_DESI
from fmb.paths import find_paths_file

if TYPE_CHECKING:
    from fmb.models.aion.trainer import AionEmbedSettings, AionModelConfig


def embedding_transformer(cfg: AionModelConfig, image_codec: AionImageCodec) -> AionModel | None:
    """The AION transformer and codecs to embed with (None with model.embed.transformer=false):
    model.transformer.path, else paths_local.yaml `aion_model`."""
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


def takes_spectra(aion: AionModel | None) -> bool:
    """Whether the transformer has a DESI spectrum input (and its codec)."""
    return aion is not None and aion.spectrum is not None and SPECTRUM_DESI in aion.transformer.cfg.domains_in


def grid_pool(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2C) float32: per-channel mean, then standard deviation, over the grid."""
    features = features.float()
    return torch.cat([features.mean(dim=(-1, -2)), features.std(dim=(-1, -2))], dim=1)


class AionEmbedder:
    """`embedder(batch)` -> ({modality: (B, D) float32}, {modality: (B,) bool present}); the zero-shot
    predictions of that batch ({"aion_redshift": (B,)}) are then in `embedder.predictions`."""

    def __init__(self, adapters: AionAdapters, aion: AionModel | None, settings: AionEmbedSettings,
                 device: torch.device) -> None:
        self.adapters, self.aion, self.settings, self.device = adapters, aion, settings, device
        self.wavelength = torch.from_numpy(DESI_WAVELENGTH).float().to(device)
        self.spectra = takes_spectra(aion)
        self.redshift = (settings.redshift and aion is not None and aion.redshift is not None
                         and REDSHIFT in aion.transformer.cfg.domains_out)
        self.predictions: dict[str, torch.Tensor] = {}

    def __call__(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A batch already on the device (the embed runner sets autocast by the run's precision)."""
        codec = self.adapters.codec
        hsc = self.adapters.to_hsc(batch["euclid"])
        features = codec.encode_features(hsc, HSC_BANDS)
        latents = codec.pre_quant_proj(features)
        vectors, present = {}, {}
        if self.settings.codec_latents:
            vectors["image_codec"], vectors["image_codec_encoder"] = grid_pool(latents), grid_pool(features)
            present["image_codec"] = present["image_codec_encoder"] = batch["has_image"]
        self.predictions = {}
        if self.aion is not None:
            self.encode(codec.quantizer.indices(latents).flatten(1), batch, vectors, present)
        return vectors, present

    def encode(self, image: torch.Tensor, batch: dict, vectors: dict, present: dict) -> None:
        transformer, budget = self.aion.transformer, self.settings.num_encoder_tokens
        B = image.shape[0]
        has_image = batch["has_image"]
        vectors["image"] = transformer.encode({IMAGE_HSC: image}, budget=budget).mean()
        present["image"] = has_image
        if not self.spectra:
            return
        has = batch["has_spectrum"]
        rows = has.nonzero()[:, 0]
        spectrum = torch.zeros(B, MODALITIES[SPECTRUM_DESI].num_tokens, dtype=torch.long, device=self.device)
        vectors["spectrum"] = torch.zeros_like(vectors["image"])
        if len(rows):
            flux, ivar, bad = (batch[f"spectrum_{k}"][rows] for k in ("flux", "ivar", "bad"))
            spectrum[rows] = self.aion.spectrum.tokens(flux, ivar, bad, self.wavelength)
            alone = transformer.encode({SPECTRUM_DESI: spectrum[rows]}, budget=budget).mean()
            vectors["spectrum"] = vectors["spectrum"].index_copy(0, rows, alone)
        present["spectrum"] = has
        # The joint embedding from what each object has (an object with neither: unmasked, and null).
        either = has_image | has
        masks = {name: (either & ~present_rows)[:, None].expand_as(ids)
                 for name, present_rows, ids in ((IMAGE_HSC, has_image, image), (SPECTRUM_DESI, has, spectrum))
                 if not present_rows.all()}
        joint = transformer.encode({IMAGE_HSC: image, SPECTRUM_DESI: spectrum}, masks or None, budget)
        present["joint"] = either
        vectors["joint"] = joint.mean()
        if self.redshift:
            logits = transformer.predict(joint, [REDSHIFT])[REDSHIFT][:, 0]
            self.predictions["aion_redshift"] = self.aion.redshift.expectation(logits)
