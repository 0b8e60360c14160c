"""`fmb retrain astropt`: configuration and the BaseTrainer subclass."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fmb.data.surveys.euclid_desi import (
    DESI_PIXELS,
    SplitRows,
    embedding_splits,
    open_split,
    target_columns,
)
from fmb.embeddings import OLD_NAMES, joint_embedding
from fmb.errors import ConfigError
from fmb.models.astropt.data import EuclidDesiPatches, columns_for
from fmb.models.astropt.model import PRESETS, AstroPT, GPTShape, Modality, next_patch_loss
from fmb.train import BaseTrainer, BaseTrainingConfig, StepOutput
from fmb.train.embed import EmbedBatch

log = logging.getLogger("fmb")

FAMILY = "astropt"


def default_modalities() -> list[Modality]:
    # Euclid+DESI: 224 px RGB in 16 px patches (196 tokens), DESI flux in patches of 10 (779 tokens);
    # loss weights balance the token counts.
    return [
        Modality(name="images", input_size=16 * 16 * 3, patch_size=16, positions="index", loss_weight=779 / 196),
        Modality(name="spectra", input_size=10, patch_size=10, positions="index", loss_weight=196 / 779),
    ]


@dataclass
class AstroPTModelConfig:
    preset: str | None = "095M"  # architecture by name (see PRESETS); n_layer/n_head/n_embd override it
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int = 1024
    dropout: float = 0.0
    bias: bool = False
    tokeniser: Literal["aim", "affine"] = "aim"
    modalities: list[Modality] = field(default_factory=default_modalities)
    init_from: str | None = None  # fmb astropt run or checkpoint directory (e.g. from `fmb convert astropt`)
    # `fmb embed`: which block's output (the middle one, before the final norm, or the last, after it),
    # reduced over each modality's valid tokens.
    embed_layer: Literal["middle", "last"] = "middle"
    embed_reduction: Literal["mean", "last", "exp_decay"] = "mean"


@dataclass
class AstroPTDataConfig:
    path: str | None = None  # Euclid+DESI parquet shards or save_to_disk directory
    train_split: str = "train"
    val_split: str | None = None  # None: hold out val_fraction of train by object_id
    val_fraction: float = 0.05
    image_size: int = 224
    spectrum_length: int = DESI_PIXELS
    resample_spectra: bool = False  # interpolate spectra whose wavelengths are not the DESI grid (else a data fault)
    synthetic: int = 0  # > 0: write this many synthetic objects under <out>/data and train on them


@dataclass
class AstroPTConfig(BaseTrainingConfig):
    model: AstroPTModelConfig = field(default_factory=AstroPTModelConfig)
    data: AstroPTDataConfig = field(default_factory=AstroPTDataConfig)


def model_shape(cfg: AstroPTModelConfig) -> GPTShape:
    layers, heads, width = None, None, None
    if cfg.preset is not None:
        if cfg.preset not in PRESETS:
            raise ConfigError(f"model.preset '{cfg.preset}' is not one of {', '.join(PRESETS)}")
        layers, heads, width, _ = PRESETS[cfg.preset]
    layers, heads, width = cfg.n_layer or layers, cfg.n_head or heads, cfg.n_embd or width
    if None in (layers, heads, width):
        raise ConfigError("set model.preset or all of model.n_layer, model.n_head, model.n_embd")
    return GPTShape(n_layer=layers, n_head=heads, n_embd=width, block_size=cfg.block_size,
                    dropout=cfg.dropout, bias=cfg.bias, tokeniser=cfg.tokeniser)


def check_modalities(model: AstroPTModelConfig, data: AstroPTDataConfig) -> None:
    names = sorted(m.name for m in model.modalities)
    if not names or set(names) - {"images", "spectra"}:
        raise ConfigError(f"model.modalities must be 'images' and/or 'spectra' for Euclid+DESI data, got {names}")
    tokens = 0
    for mod in model.modalities:
        if mod.name == "images":
            if data.image_size % mod.patch_size:
                raise ConfigError(f"data.image_size {data.image_size} is not a multiple of the images patch_size {mod.patch_size}")
            if mod.input_size != mod.patch_size**2 * 3 or mod.positions != "index":
                raise ConfigError(f"images modality: input_size must be patch_size^2 x 3 = {mod.patch_size**2 * 3} "
                                  "with index positions")
            tokens += (data.image_size // mod.patch_size) ** 2
        else:
            if mod.input_size != mod.patch_size:
                raise ConfigError(f"spectra modality: input_size ({mod.input_size}) must equal patch_size ({mod.patch_size})")
            if mod.positions == "float" and mod.pos_input_size != mod.patch_size:
                raise ConfigError("spectra modality with float (wavelength) positions needs pos_input_size = patch_size")
            tokens += -(-data.spectrum_length // mod.patch_size)
    if tokens > model.block_size:
        raise ConfigError(f"the sequence has {tokens} tokens but model.block_size is {model.block_size}")


def build_astropt(cfg: AstroPTModelConfig) -> AstroPT:
    return AstroPT(model_shape(cfg), cfg.modalities)


class AstroPTTrainer(BaseTrainer):
    family = FAMILY
    config_cls = AstroPTConfig
    summary_keys = ("images", "spectra")

    def check_config(self) -> None:
        check_modalities(self.config.model, self.config.data)
        model_shape(self.config.model)

    def demo_data(self) -> tuple[str, dict[str, Any]]:
        return "euclid-desi", {}

    def prepare(self) -> None:
        if self.config.data.path is None:
            raise ConfigError("data.path is not set: point it at the Euclid+DESI data (paths_local.yaml: "
                              "euclid_desi), or add --demo to train on built-in synthetic data")
        reference_lr = PRESETS.get(self.config.model.preset or "", (0, 0, 0, None))[3]
        if reference_lr and abs(self.cfg.optim.lr - reference_lr) / reference_lr > 0.01:
            log.info(f"note: train.optim.lr={self.cfg.optim.lr:g}; the reference peak lr of preset "
                     f"{self.config.model.preset} is {reference_lr:g}")

    def new_model(self) -> nn.Module:
        model = build_astropt(self.config.model)
        self.modalities = model.modalities
        return model

    def dataset(self, rows: SplitRows, targets: tuple[str, ...] = ()) -> EuclidDesiPatches:
        data = self.config.data
        return EuclidDesiPatches(rows, self.config.model.modalities, data.image_size, data.spectrum_length, targets,
                                 resample_spectra=data.resample_spectra)

    def build_datasets(self):
        data = self.config.data
        columns = columns_for(self.config.model.modalities)
        return tuple(self.dataset(open_split(data.path, split, columns, data.val_split, data.val_fraction, self.cfg.seed,
                                             data.train_split)) for split in ("train", "validation"))

    def embedding_datasets(self, data: str | None, split: str | None) -> list[tuple[str, EuclidDesiPatches]]:
        columns = columns_for(self.config.model.modalities)
        targets = tuple(target_columns(data or self.config.data.path, columns))
        splits = embedding_splits(data, split, columns + list(targets), self.config.data, self.cfg.seed)
        return [(name, self.dataset(rows, targets)) for name, rows in splits]

    def embed_batch(self, model: nn.Module, batch: dict) -> EmbedBatch:
        """Per modality: the configured block's output reduced over its valid tokens, L2-normalised
        (null where the object lacks the modality); joint = normalize(sum of the normalised ones)."""
        tokens, positions, masks = model_inputs(self.modalities, batch)
        cfg = self.config.model
        raw = model.embed(tokens, positions, masks, layer=cfg.embed_layer, reduction=cfg.embed_reduction)
        vectors = {OLD_NAMES.get(name, name): F.normalize(v.float(), dim=-1) for name, v in raw.items()}
        present = {OLD_NAMES.get(name, name): masks[name].any(dim=1) for name in raw}
        vectors["joint"] = joint_embedding(vectors, present)
        present["joint"] = torch.stack(list(present.values())).any(dim=0)
        return EmbedBatch(vectors, present)

    def compute_loss(self, model: nn.Module, batch: dict) -> StepOutput:
        tokens, positions, masks = model_inputs(self.modalities, batch)
        predictions = model(tokens, positions)
        loss, parts = next_patch_loss(self.modalities, tokens, predictions, masks)
        n = len(batch["object_id"])
        return StepOutput(loss=loss, components=parts, n_samples=n,
                          n_tokens=n * sum(t.shape[1] for t in tokens.values()))


def model_inputs(modalities: list[Modality], batch: dict) -> tuple[dict, dict, dict]:
    """Token, position and mask dicts for the model from a collated batch (already on the device)."""
    tokens, positions, masks = {}, {}, {}
    for mod in modalities:
        values = batch[mod.name]
        if values.dtype == torch.uint8:  # 8-bit image patches (fmb.models.astropt.data.rgb_patches)
            values = values.float().div_(255.0)
        tokens[mod.name] = values
        masks[mod.name] = batch[f"{mod.name}_mask"]
        if mod.positions == "index":
            positions[mod.name] = torch.arange(values.shape[1], device=values.device).expand(values.shape[0], -1)
        else:
            positions[mod.name] = batch[f"{mod.name}_positions"]
    return tokens, positions, masks
