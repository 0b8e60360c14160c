"""`fmb retrain astroclip` (contrastive alignment) and `fmb retrain specformer` (spectrum pre-training).

Fine-tuning modes (`model.finetune`), each training exactly the parameters it names:
- `full`: everything (training from scratch);
- `heads`: the two cross-attention heads and a learnable logit scale; both backbones frozen,
  kept in eval mode and left out of the optimizer (the reference alignment);
- `heads+image`: also the last `model.image_blocks` image blocks and the final image norm,
  at `model.image_lr`;
- `heads+image+spectrum`: also the SpecFormer backbone, at `model.spectrum_lr`.
SpecFormer's reconstruction head is only used by pre-training, so alignment always freezes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fmb.data.surveys.astroclip import TRAIN_FRACTION
from fmb.data.surveys.euclid_desi import (
    DESI_PIXELS,
    SplitRows,
    embedding_splits,
    open_split,
    target_columns,
)
from fmb.embeddings import joint_embedding
from fmb.errors import ConfigError
from fmb.models.astroclip.data import AstroClipHDF5, EuclidDesiPairs, euclid_columns
from fmb.models.astroclip.model import (
    SPECFORMER_PRESETS,
    VIT_PRESETS,
    AstroCLIP,
    SpecFormer,
    SpecFormerShape,
    ViTShape,
    chunk_mask,
    clip_logits,
    masked_modelling_loss,
    retrieval_hits,
    spectrum_tokens,
)
from fmb.train import BaseTrainer, BaseTrainingConfig, StepOutput
from fmb.train import checkpoint as ckpt
from fmb.train.embed import EmbedBatch
from fmb.train.evaluator import ValidationBatch
from fmb.train.losses import masked_clip_loss

log = logging.getLogger("fmb")

FAMILY = "astroclip"
SPECFORMER_FAMILY = "specformer"
IMAGE_BACKBONE = "image_backbone"  # meta.json "component" of a converted AstroDINO backbone


@dataclass
class AstroCLIPModelConfig:
    image_preset: str = "large"  # ViT width/depth/heads (see VIT_PRESETS); large = AstroDINO ViT-L
    patch_size: int = 12
    drop_path: float = 0.0
    layerscale: float = 1e-5
    # False: the image head sees patch embeddings without CLS or positions, as the published
    # AstroCLIP head was trained (set by `fmb convert` for that checkpoint).
    image_positions: bool = True
    spectrum_preset: str = "base"  # SpecFormer width/depth/heads (see SPECFORMER_PRESETS)
    spectrum_max_len: int = 800
    spectrum_slice: int = 20  # pixels per SpecFormer token (reference 20, stride 10)
    spectrum_stride: int = 10
    spectrum_dropout: float = 0.0
    embed_dim: int = 1024  # shared space
    head_heads: int = 4
    head_dropout: float = 0.1
    logit_scale: float = 15.5  # fixed multiplier, or the initial exp(log_scale) when learnable
    learnable_scale: bool = False
    finetune: Literal["full", "heads", "heads+image", "heads+image+spectrum"] = "full"
    image_blocks: int = 0  # last image blocks (+ final norm) trained by the heads+image modes
    image_lr: float | None = None  # learning rate of trained image-backbone parameters (None: train.optim.lr)
    spectrum_lr: float | None = None  # learning rate of trained SpecFormer parameters (None: train.optim.lr)
    init_from: str | None = None  # fmb astroclip checkpoint directory (whole model)
    image_init_from: str | None = None  # converted AstroDINO backbone directory (`fmb convert astroclip`)
    spectrum_init_from: str | None = None  # specformer checkpoint directory (trained or converted)


@dataclass
class AstroCLIPDataConfig:
    format: Literal["hdf5", "euclid_desi"] = "hdf5"
    path: str | None = None  # HDF5 file, or Euclid+DESI parquet shards / save_to_disk directory
    image_size: int = 144  # pixels the encoder sees: HDF5 centre crop, Euclid RGB resize
    spectrum_length: int = DESI_PIXELS
    resample_spectra: bool = False  # euclid_desi: interpolate spectra whose wavelengths are not the DESI grid
    augment: bool = True  # flips and 90-degree rotations of training images
    train_fraction: float = TRAIN_FRACTION  # hdf5: first part of every group is train, the rest validation
    train_split: str = "train"  # euclid_desi
    val_split: str | None = None  # euclid_desi; None: hold out val_fraction of train by object_id
    val_fraction: float = 0.05
    synthetic: int = 0  # > 0: write this many synthetic objects under <out>/data and train on them
    synthetic_image_size: int = 152


@dataclass
class AstroCLIPConfig(BaseTrainingConfig):
    model: AstroCLIPModelConfig = field(default_factory=AstroCLIPModelConfig)
    data: AstroCLIPDataConfig = field(default_factory=AstroCLIPDataConfig)


@dataclass
class SpecFormerModelConfig:
    preset: str = "base"
    max_len: int = 800
    slice: int = 20  # pixels per token (reference 20, stride 10)
    stride: int = 10
    dropout: float = 0.0
    mask_chunks: int = 6
    mask_width: int = 50  # tokens per masked chunk
    init_from: str | None = None  # specformer checkpoint directory


@dataclass
class SpecFormerConfig(BaseTrainingConfig):
    model: SpecFormerModelConfig = field(default_factory=SpecFormerModelConfig)
    data: AstroCLIPDataConfig = field(default_factory=AstroCLIPDataConfig)


# ----------------------------------------------------------------------------- building


def _preset(table: dict, name: str, key: str) -> tuple[int, int, int]:
    if name not in table:
        raise ConfigError(f"{key} '{name}' is not one of {', '.join(table)}")
    return table[name]


def specformer_shape(preset: str, max_len: int, slice_length: int, stride: int, dropout: float,
                     key: str) -> SpecFormerShape:
    width, depth, heads = _preset(SPECFORMER_PRESETS, preset, key)
    return SpecFormerShape(width=width, depth=depth, heads=heads, max_len=max_len, slice_length=slice_length,
                           slice_stride=stride, dropout=dropout)


def build_astroclip(cfg: AstroCLIPModelConfig, image_size: int) -> AstroCLIP:
    width, depth, heads = _preset(VIT_PRESETS, cfg.image_preset, "model.image_preset")
    if image_size % cfg.patch_size:
        raise ConfigError(f"data.image_size {image_size} is not a multiple of model.patch_size {cfg.patch_size}")
    image = ViTShape(width=width, depth=depth, heads=heads, patch_size=cfg.patch_size, image_size=image_size,
                     drop_path=cfg.drop_path, layerscale=cfg.layerscale)
    spectrum = specformer_shape(cfg.spectrum_preset, cfg.spectrum_max_len, cfg.spectrum_slice, cfg.spectrum_stride,
                                cfg.spectrum_dropout, "model.spectrum_preset")
    return AstroCLIP(image, spectrum, cfg.embed_dim, cfg.head_heads, cfg.head_dropout, cfg.logit_scale,
                     cfg.learnable_scale, cfg.image_positions)


def trained_prefixes(cfg: AstroCLIPModelConfig, depth: int) -> tuple[str, ...] | None:
    """Qualified-name prefixes of the trained parameters; None: everything (mode `full`)."""
    if cfg.finetune == "full":
        return None
    prefixes = ["image_encoder.head.", "spectrum_encoder.head.", "log_scale"]
    if cfg.finetune in ("heads+image", "heads+image+spectrum"):
        if not 0 < cfg.image_blocks <= depth:
            raise ConfigError(f"model.finetune={cfg.finetune} needs 1 <= model.image_blocks <= {depth}, "
                              f"got {cfg.image_blocks}")
        prefixes += [f"image_encoder.backbone.blocks.{i}." for i in range(depth - cfg.image_blocks, depth)]
        prefixes.append("image_encoder.backbone.norm.")
    if cfg.finetune == "heads+image+spectrum":
        prefixes.append("spectrum_encoder.backbone.")
    return tuple(prefixes)


def apply_finetune(model: AstroCLIP, cfg: AstroCLIPModelConfig) -> None:
    prefixes = trained_prefixes(cfg, len(model.image_encoder.backbone.blocks))
    for name, param in model.named_parameters():
        param.requires_grad_(prefixes is None or name.startswith(prefixes))
    model.spectrum_encoder.backbone.head.requires_grad_(False)
    if not cfg.image_positions:  # unused: the head sees bare patch embeddings
        model.image_encoder.backbone.cls_token.requires_grad_(False)
        model.image_encoder.backbone.pos_embed.requires_grad_(False)


# ----------------------------------------------------------------------------- shared data handling


class _DataMixin:
    """Demo data, datasets and embedding rows shared by the two trainers."""

    def demo_data(self) -> tuple[str, dict[str, Any]]:
        data = self.config.data
        if data.format == "hdf5":
            return "astroclip", {"image_size": data.synthetic_image_size}
        return "euclid-desi", {}

    def prepare(self) -> None:
        if self.config.data.path is None:
            raise ConfigError("data.path is not set: point it at the AstroCLIP HDF5 file (paths_local.yaml: "
                              "astroclip_h5) or Euclid+DESI data with data.format=euclid_desi, or add --demo")

    def dataset(self, split: str, images: bool, path: str | None = None, rows: SplitRows | None = None,
                targets: tuple[str, ...] = ()) -> Dataset:
        """A split of the run's data, of another HDF5 file (`path`) or given Euclid+DESI rows;
        augmentation only when training."""
        data = self.config.data
        training = split == "train" and rows is None and path is None
        if data.format == "hdf5":
            fraction = {"train": (0.0, data.train_fraction), "validation": (data.train_fraction, 1.0),
                        "all": (0.0, 1.0)}[split]
            return AstroClipHDF5(path or data.path, fraction, data.image_size, data.spectrum_length,
                                 augment=training and data.augment, seed=self.cfg.seed, images=images)
        if rows is None:
            rows = open_split(data.path, split, euclid_columns(images), data.val_split, data.val_fraction, self.cfg.seed,
                              data.train_split)
        return EuclidDesiPairs(rows, data.image_size, data.spectrum_length, augment=training and data.augment,
                               seed=self.cfg.seed, images=images, resample_spectra=data.resample_spectra,
                               extra_columns=targets)

    def embedding_datasets(self, data: str | None, split: str | None) -> list[tuple[str, Dataset]]:
        images = self.family == FAMILY
        if self.config.data.format == "hdf5":
            # HDF5 groups split by position: the run's train / validation parts, or a whole other file.
            names = ["train", "validation"] if data is None else ["all"]
            if split is not None and split not in names:
                raise ConfigError(f"--split for {'this run' if data is None else data} (HDF5) is one of {', '.join(names)}")
            return [(name, self.dataset(name, images, path=data)) for name in ([split] if split else names)]
        columns = euclid_columns(images)
        targets = tuple(target_columns(data or self.config.data.path, columns))
        splits = embedding_splits(data, split, columns + list(targets), self.config.data, self.cfg.seed)
        return [(name, self.dataset(name, images, rows=rows, targets=targets)) for name, rows in splits]


# ----------------------------------------------------------------------------- AstroCLIP


class AstroCLIPTrainer(_DataMixin, BaseTrainer):
    family = FAMILY
    config_cls = AstroCLIPConfig
    summary_keys = ("scale",)

    def new_model(self) -> nn.Module:
        return build_astroclip(self.config.model, self.config.data.image_size)

    def build_model(self) -> nn.Module:
        cfg = self.config.model
        model = super().build_model()  # with model.init_from
        if cfg.image_init_from:
            source = ckpt.load_weights(model.image_encoder.backbone, cfg.image_init_from, FAMILY, IMAGE_BACKBONE)
            log.info(f"image backbone from {source}")
        if cfg.spectrum_init_from:
            source = ckpt.load_weights(model.spectrum_encoder.backbone, cfg.spectrum_init_from, SPECFORMER_FAMILY)
            log.info(f"spectrum backbone from {source}")
        if cfg.finetune != "full" and not (cfg.init_from or (cfg.image_init_from and cfg.spectrum_init_from)):
            log.warning(f"model.finetune={cfg.finetune} keeps backbones frozen, but they were not loaded "
                        "(model.init_from, or model.image_init_from and model.spectrum_init_from): "
                        "their weights are random")
        apply_finetune(model, cfg)
        return model

    def build_datasets(self):
        return self.dataset("train", images=True), self.dataset("validation", images=True)

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()
        # Frozen parts stay in eval mode: no drop-path / dropout noise in features nobody trains.
        for module in model.modules():
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()

    def lr_for(self, name: str) -> float | None:
        cfg = self.config.model
        if name.startswith("image_encoder.backbone."):
            return cfg.image_lr
        if name.startswith("spectrum_encoder.backbone."):
            return cfg.spectrum_lr
        return None

    def embed_batch(self, model: nn.Module, batch: dict) -> EmbedBatch:
        """Image and spectrum in the shared space, L2-normalised, each where the object has it (a
        single-modality object still gets its one embedding); joint = normalize(image + spectrum)."""
        image, spectrum, _ = model(batch["image"], batch["spectrum"])
        vectors = {"image": F.normalize(image.float(), dim=-1), "spectrum": F.normalize(spectrum.float(), dim=-1)}
        present = {"image": batch["has_image"], "spectrum": batch["has_spectrum"]}
        vectors["joint"] = joint_embedding(vectors, present)
        present["joint"] = present["image"] | present["spectrum"]
        return EmbedBatch(vectors, present)

    def compute_loss(self, model: nn.Module, batch: dict) -> StepOutput:
        image, spectrum, scale = model(batch["image"], batch["spectrum"])
        loss = masked_clip_loss(clip_logits(image, spectrum, scale), batch["valid"])
        n = len(batch["valid"])
        return StepOutput(loss=loss, components={"scale": scale.detach().float()}, n_samples=n)

    def validation_step(self, model: nn.Module, batch: dict) -> ValidationBatch:
        """CLIP loss batch by batch, as in training; the normalised embeddings go on as rows, for
        retrieval over the whole split."""
        image, spectrum, scale = model(batch["image"], batch["spectrum"])
        valid = batch["valid"]
        n_valid = valid.sum()
        loss = masked_clip_loss(clip_logits(image, spectrum, scale), valid)
        return ValidationBatch(sums={"loss": (loss.double() * n_valid, n_valid)},
                               rows={"image": F.normalize(image.float(), dim=-1),
                                     "spectrum": F.normalize(spectrum.float(), dim=-1), "valid": valid})

    def validation_metrics(self, totals: dict[str, tuple[torch.Tensor, float]],
                           rows: dict[str, torch.Tensor]) -> dict[str, float]:
        loss, count = totals["loss"]
        keep = rows["valid"].bool()
        image_all, spectrum_all = rows["image"][keep], rows["spectrum"][keep]
        metrics = {"loss": float(loss) / max(count, 1.0), "n_pairs": float(len(image_all))}
        for direction, (query, keys) in {"img2spec": (image_all, spectrum_all), "spec2img": (spectrum_all, image_all)}.items():
            hits = {1: 0.0, 5: 0.0}
            for start in range(0, len(query), 4096):  # bounded memory: 4096 x N similarities at a time
                chunk = retrieval_hits(query[start : start + 4096], keys, offset=start)
                for k in hits:
                    hits[k] += float(chunk[k])
            for k, value in hits.items():
                metrics[f"{direction}_top{k}"] = value / max(len(query), 1)
        return metrics


# ----------------------------------------------------------------------------- SpecFormer pre-training


def build_specformer(cfg: SpecFormerModelConfig) -> SpecFormer:
    return SpecFormer(specformer_shape(cfg.preset, cfg.max_len, cfg.slice, cfg.stride, cfg.dropout, "model.preset"))


class SpecFormerTrainer(_DataMixin, BaseTrainer):
    family = SPECFORMER_FAMILY
    config_cls = SpecFormerConfig

    def new_model(self) -> nn.Module:
        return build_specformer(self.config.model)

    def embed_batch(self, model: nn.Module, batch: dict) -> EmbedBatch:
        """`spectrum`: SpecFormer's final token embeddings averaged over the tokens."""
        shape = model.shape
        embedding, _ = model(spectrum_tokens(batch["spectrum"], shape.slice_length, shape.slice_stride))
        return EmbedBatch({"spectrum": embedding.float().mean(dim=1)}, {"spectrum": batch["has_spectrum"]})

    def build_datasets(self):
        return self.dataset("train", images=False), self.dataset("validation", images=False)

    def compute_loss(self, model: nn.Module, batch: dict) -> StepOutput:
        cfg = self.config.model
        shape = self.model.shape
        tokens = spectrum_tokens(batch["spectrum"], shape.slice_length, shape.slice_stride)
        masked = chunk_mask(len(tokens), tokens.shape[1], cfg.mask_chunks, cfg.mask_width, tokens.device)
        masked = masked & batch["valid"][:, None]  # objects without a spectrum contribute nothing
        _, reconstruction = model(tokens.masked_fill(masked[..., None], 0.0))
        loss = masked_modelling_loss(reconstruction, tokens, masked)
        n = len(tokens)
        return StepOutput(loss=loss, n_samples=n, n_tokens=n * tokens.shape[1])
