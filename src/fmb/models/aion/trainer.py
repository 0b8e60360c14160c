"""`fmb retrain aion`: Euclid <-> HSC adapters through the frozen AION image codec (or a codec fine-tune).

Loss: masked MSE between the Euclid input and its round trip Euclid -> HSC -> codec -> HSC ->
Euclid (in flux, or in arcsinh space with model.loss_space=asinh), plus optionally
model.latent_weight x MSE between the codec latents of the adapted image and of its reconstruction.
Codec fine-tune mode: model.codec.train = encoder | decoder | all (needs model.gradient=full).
Without the published codec: model.codec.standin_steps pretrains a stand-in (fmb.models.aion.standin).
`model.transformer` and `model.embed` are read by `fmb embed aion` (the AION transformer is not trained here);
model.transformer.random_init writes a random stand-in transformer into the run for it.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fmb.data.surveys.euclid_desi import (
    EUCLID_BAND_COLUMNS,
    embedding_splits,
    open_split,
    target_columns,
)
from fmb.errors import ConfigError
from fmb.models.aion.data import (
    COLUMNS,
    SIZE,
    SPECTRUM_COLUMN,
    EuclidBands,
    EuclidBandsAndSpectrum,
    Fit,
)
from fmb.models.aion.embedder import AionEmbedder, embedding_transformer, takes_spectra
from fmb.models.aion.model import HSC_BANDS, AionAdapters, AionImageCodec, CodecConfig, Norm
from fmb.models.aion.pretrained import ensure_standin as ensure_transformer_standin
from fmb.models.aion.samples import band_errors, sample_grid, write_grid
from fmb.models.aion.standin import ensure_standin
from fmb.models.aion.transformer import DEFAULT_ENCODER_TOKENS, PRESETS
from fmb.models.aion.weights import build_codec, require_codec_source, save_codec
from fmb.train import BaseTrainer, BaseTrainingConfig, StepOutput, parallel
from fmb.train import checkpoint as ckpt
from fmb.train.embed import EmbedBatch

log = logging.getLogger("fmb")

FAMILY = "aion"
BAND_NAMES = tuple(c.removesuffix("_image") for c in EUCLID_BAND_COLUMNS)
ADAPTERS_FILE = "adapters.safetensors"
STANDIN_DIR = "standin_codec"
STANDIN_TRANSFORMER_DIR = "standin_transformer"


@dataclass
class AionCodecSettings:
    path: str | None = None  # local codec directory (paths_local.yaml: aion_codec); see fmb.models.aion.weights
    random_init: bool = False  # untrained codec of shape `shape` (demos and tests only; warns loudly)
    standin_steps: int = 0  # with random_init: first pretrain it this many steps on synthetic HSC (models/aion/standin.py)
    shape: CodecConfig = field(default_factory=CodecConfig)  # filled from config.json when loading `path`
    train: Literal["none", "encoder", "decoder", "all"] = "none"  # codec fine-tune mode
    lr: float | None = None  # learning rate of fine-tuned codec weights (None: train.optim.lr)
    activation_checkpointing: bool = False  # recompute codec activations in backward (gradient=full)
    clamp_decoded: bool = True  # bound decoded HSC flux to the codec's clamp range


@dataclass
class AionTransformerSettings:
    path: str | None = None  # AION model directory (fmb.models.aion.pretrained); unset: paths_local.yaml aion_model
    size: str | None = "base"  # preset it must have: base | large | xlarge (demo: stand-ins); null: any size
    random_init: bool = False  # write a RANDOM stand-in of `size` to <run>/standin_transformer (demos, tests)


@dataclass
class AionEmbedSettings:
    transformer: bool = True  # embedding_image / _spectrum / _joint from the AION transformer (needs its weights)
    num_encoder_tokens: int = DEFAULT_ENCODER_TOKENS  # encoder token budget (AION.encode's; the FMB study used 600)
    redshift: bool = True  # zero-shot `aion_redshift` from the decoder, when the transformer predicts tok_z
    codec_latents: bool = False  # also the pooled image-codec latents: embedding_image_codec, _image_codec_encoder


@dataclass
class AionModelConfig:
    codec: AionCodecSettings = field(default_factory=AionCodecSettings)
    transformer: AionTransformerSettings = field(default_factory=AionTransformerSettings)
    embed: AionEmbedSettings = field(default_factory=AionEmbedSettings)
    depth: int = 2  # U-Net max-pool steps
    hidden: int = 16  # U-Net widths hidden, 2 x hidden, ... (16/32/64)
    norm: Norm = "batch"
    euclid_softening: float = 0.01  # adapters see arcsinh(Euclid flux / this)
    gradient: Literal["ste", "full"] = "ste"  # straight-through the codec, or backprop through it
    loss_space: Literal["flux", "asinh"] = "flux"
    latent_weight: float = 0.0  # latent-consistency term
    freeze_adapters: bool = False  # train only the codec (codec fine-tune mode)
    init_from: str | None = None  # fmb aion checkpoint (adapters + codec) to start from


@dataclass
class AionDataConfig:
    path: str | None = None  # Euclid+DESI parquet shards or save_to_disk directory
    train_split: str = "train"
    val_split: str | None = None  # None: hold out val_fraction of train by object_id
    val_fraction: float = 0.05
    fit: Fit = "resize"  # bring cutouts to 96 px by antialiased resize, or by centre crop (needs >= 96 px)
    synthetic: int = 0  # > 0: write this many synthetic objects under <out>/data and train on them
    sample_grid: int = 4  # objects in the PNG written at each validation (0: none)


@dataclass
class AionConfig(BaseTrainingConfig):
    model: AionModelConfig = field(default_factory=AionModelConfig)
    data: AionDataConfig = field(default_factory=AionDataConfig)


def check_config(model: AionModelConfig) -> None:
    if model.codec.train != "none" and model.gradient != "full":
        raise ConfigError(f"model.codec.train={model.codec.train} needs model.gradient=full: with the straight-through "
                          "gradient no gradient reaches the codec")
    if model.freeze_adapters and model.codec.train == "none":
        raise ConfigError("model.freeze_adapters=true with model.codec.train=none leaves nothing to train")
    if not model.init_from:
        require_codec_source(model.codec.path, model.codec.random_init)
    if model.codec.standin_steps < 0:
        raise ConfigError(f"model.codec.standin_steps must be >= 0, got {model.codec.standin_steps}")
    if model.codec.standin_steps and (model.codec.path or not model.codec.random_init or model.init_from):
        raise ConfigError("model.codec.standin_steps pretrains a stand-in for a missing codec: it needs "
                          "model.codec.random_init=true and no model.codec.path or model.init_from")
    transformer = model.transformer
    if transformer.size is not None and transformer.size not in PRESETS:
        raise ConfigError(f"model.transformer.size={transformer.size} is not one of {', '.join(PRESETS)} (or null)")
    if transformer.random_init and (transformer.path or transformer.size is None):
        raise ConfigError("model.transformer.random_init=true writes a stand-in of model.transformer.size: it needs "
                          "a size and no model.transformer.path")
    if model.embed.num_encoder_tokens < 1:
        raise ConfigError(f"model.embed.num_encoder_tokens must be >= 1, got {model.embed.num_encoder_tokens}")
    if model.depth < 0 or model.hidden < 1:
        raise ConfigError(f"model.depth must be >= 0 and model.hidden >= 1, got {model.depth} and {model.hidden}")


def build_adapters(cfg: AionModelConfig, codec: AionImageCodec) -> AionAdapters:
    codec.model.checkpointing = cfg.codec.activation_checkpointing
    return AionAdapters(codec, n_euclid=len(BAND_NAMES), depth=cfg.depth, hidden=cfg.hidden, norm=cfg.norm,
                        euclid_softening=cfg.euclid_softening, gradient=cfg.gradient,
                        clamp_decoded=cfg.codec.clamp_decoded, latent_consistency=cfg.latent_weight > 0)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    valid = valid.to(prediction.dtype)
    return ((prediction - target) ** 2 * valid).sum() / valid.sum().clamp_min(1)


class AionTrainer(BaseTrainer):
    family = FAMILY
    config_cls = AionConfig
    summary_keys = ("recon",)

    def check_config(self) -> None:
        check_config(self.config.model)

    def demo_data(self) -> tuple[str, dict[str, Any]]:
        return "euclid-desi", {"image_size": SIZE}

    def prepare(self) -> None:
        data = self.config.data
        codec = self.config.model.codec
        if codec.standin_steps:
            directory = self.run_dir / STANDIN_DIR
            with self.main_process_first() as is_main:
                if is_main:
                    ensure_standin(directory, codec.shape, codec.standin_steps, self.cfg.seed, self.device,
                                   self.amp_dtype == torch.bfloat16, self.cfg.progress and sys.stderr.isatty())
            # From here on it is a codec on disk like the published one: config.yaml records its path (and no
            # steps), so the saved config re-runs as is; <dir>/standin.json keeps how it was made.
            codec.path, codec.standin_steps = str(directory.resolve()), 0
        transformer = self.config.model.transformer
        if transformer.random_init:
            directory = self.run_dir / STANDIN_TRANSFORMER_DIR
            with self.main_process_first() as is_main:
                if is_main:
                    ensure_transformer_standin(directory, transformer.size, self.cfg.seed)
            transformer.path, transformer.random_init = str(directory.resolve()), False  # as for the stand-in codec
        if data.path is None:
            raise ConfigError("data.path is not set: point it at the Euclid+DESI data (paths_local.yaml: "
                              "euclid_desi), or add --demo to train on built-in synthetic data")

    def new_model(self) -> nn.Module:
        """Adapters around a codec of the configured shape (weights from a checkpoint, or fresh)."""
        return build_adapters(self.config.model, AionImageCodec(self.config.model.codec.shape))

    def build_model(self) -> nn.Module:
        cfg = self.config.model
        if cfg.init_from:
            # Adapters and codec from an earlier aion run (e.g. to fine-tune the codec after the adapters).
            source = ckpt.find_checkpoint(Path(cfg.init_from))
            cfg.codec.shape = ckpt.read_config(source, AionConfig, family=FAMILY).model.codec.shape
            model = self.new_model()
            log.info(f"initialised adapters and codec from {ckpt.load_weights(model, source, FAMILY)}")
        else:
            codec = build_codec(cfg.codec.path, cfg.codec.random_init, cfg.codec.shape)
            cfg.codec.shape = codec.cfg  # recorded in checkpoints, so they rebuild without the codec files
            model = build_adapters(cfg, codec)
        codec_trainable = {"none": [], "encoder": model.codec.encoder_parameters(),
                           "decoder": model.codec.decoder_parameters(),
                           "all": list(model.codec.parameters())}[cfg.codec.train]
        for p in model.codec.parameters():
            p.requires_grad_(False)
        for p in codec_trainable:
            p.requires_grad_(True)
        if cfg.freeze_adapters:
            for p in [*model.euclid_to_hsc.parameters(), *model.hsc_to_euclid.parameters()]:
                p.requires_grad_(False)
        return model

    def lr_for(self, name: str) -> float | None:
        return self.config.model.codec.lr if name.startswith("codec.") else None

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.config.model.codec.train == "none":
            model.codec.eval()

    def datasets_for(self, split: str) -> EuclidBands:
        data = self.config.data
        rows = open_split(data.path, split, COLUMNS, data.val_split, data.val_fraction, self.cfg.seed, data.train_split)
        return EuclidBands(rows, SIZE, data.fit)

    def build_datasets(self):
        self.val_set = self.datasets_for("validation")
        return self.datasets_for("train"), self.val_set

    def prepare_embedding(self, directory: Path, work: Path) -> None:
        """The AION transformer and codecs to embed with (fmb.models.aion.embedder), checked against the
        run's image codec; the embedder itself is built around the loaded adapters at the first batch."""
        self.aion = embedding_transformer(self.config.model, AionImageCodec(self.config.model.codec.shape))
        self.embedder: AionEmbedder | None = None

    def embedding_datasets(self, data: str | None, split: str | None) -> list[tuple[str, EuclidBands]]:
        spectra = takes_spectra(self.aion)
        columns = COLUMNS + [SPECTRUM_COLUMN] if spectra else COLUMNS
        targets = tuple(target_columns(data or self.config.data.path, columns))
        splits = embedding_splits(data, split, columns + list(targets), self.config.data, self.cfg.seed)
        dataset = EuclidBandsAndSpectrum if spectra else EuclidBands
        return [(name, dataset(rows, SIZE, self.config.data.fit, targets)) for name, rows in splits]

    def embed_batch(self, model: nn.Module, batch: dict) -> EmbedBatch:
        """`image`, `spectrum`, `joint` from the AION transformer and the zero-shot `aion_redshift`; with
        model.embed.codec_latents also the pooled codec latents (fmb.models.aion.embedder)."""
        if self.embedder is None:
            aion = self.aion.to(self.device) if self.aion is not None else None
            self.embedder = AionEmbedder(model, aion, self.config.model.embed, self.device)
        vectors, present = self.embedder(batch)
        predictions = {name: value.float().cpu().numpy() for name, value in self.embedder.predictions.items()}
        return EmbedBatch(vectors, present, predictions)

    def random_init_state(self, fresh: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Untrained adapters around the same (pretrained) codec: what the adapters learned, alone."""
        return {k: trained[k] if k.startswith("codec.") else v for k, v in fresh.items()}

    def _space(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.model.loss_space == "asinh":
            soft = self.config.model.euclid_softening
            return torch.asinh(x / soft) * soft
        return x

    def _losses(self, out: dict[str, torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prediction, target = self._space(out["euclid"].float()), self._space(batch["euclid"])
        recon = masked_mse(prediction, target, batch["valid"])
        if "latent_decoded" not in out:
            return recon, {"recon": recon}
        latent = F.mse_loss(out["latent_decoded"].float(), out["latent"].detach().float())
        return recon + self.config.model.latent_weight * latent, {"recon": recon, "latent": latent}

    def compute_loss(self, model: nn.Module, batch: dict) -> StepOutput:
        loss, parts = self._losses(model(batch["euclid"]), batch)
        return StepOutput(loss=loss, components=parts, n_samples=batch["euclid"].shape[0])

    def validation_step(self, model: nn.Module, batch: dict) -> dict[str, tuple[torch.Tensor, float]]:
        out = model(batch["euclid"])
        loss, parts = self._losses(out, batch)
        n = batch["euclid"].shape[0]
        metrics = {name: (value.detach() * n, n) for name, value in {"loss": loss, **parts}.items()}
        mse, psnr = band_errors(out["euclid"].float(), batch["euclid"], batch["valid"])
        for k, band in enumerate(BAND_NAMES):
            metrics[f"mse_{band}"] = (mse[:, k].sum(), n)
            metrics[f"psnr_{band}"] = (psnr[:, k].sum(), n)
        metrics["psnr"] = (psnr.mean(dim=1).sum(), n)
        return metrics

    def on_validation_end(self, model: nn.Module, step: int, metrics: dict[str, float]) -> None:
        # Under FSDP the weights are shards and every forward is a collective: every rank gathers the
        # state and runs the sample forward; rank 0 writes.
        sharded = parallel.is_sharded(self.cfg.parallel, self.dist)
        if not (self.dist.is_main or sharded):
            return
        full = parallel.full_model_state(model, self.cfg.parallel, self.dist)
        if self.dist.is_main:
            adapters = {k: v for k, v in full.items() if not k.startswith("codec.")}
            ckpt.save_safetensors(adapters, self.run_dir / ADAPTERS_FILE, {"fmb_family": FAMILY, "step": str(step)})
            if self.config.model.codec.train != "none":
                save_codec(model.codec, self.run_dir / "codec",
                           {k[len("codec."):]: v for k, v in full.items() if k.startswith("codec.")})
        count = min(self.config.data.sample_grid, len(self.val_set))
        if count <= 0:
            return
        items = [self.val_set[i] for i in range(count)]
        euclid = torch.stack([item["euclid"] for item in items]).to(self.device)
        was_training = model.training
        model.eval()
        with torch.no_grad(), self.autocast():
            out = model(euclid)
        if was_training:
            self.set_train_mode(model)
        if not self.dist.is_main:
            return
        spread = out["euclid"].float().flatten(-2).std(dim=-1)  # (objects, bands) spatial spread
        if bool((spread < 1e-6 * euclid.abs().flatten(-2).amax(-1).clamp_min(1e-12)).all()):
            log.warning("the reconstructed Euclid images are flat: the codec passes no structure (a random codec "
                        "without a stand-in?), so PSNR only measures the background; use the published codec "
                        "(model.codec.path) or model.codec.standin_steps=300")
        grid = sample_grid(euclid, out["hsc"], out["euclid"], self.config.model.euclid_softening)
        path = write_grid(self.run_dir / "samples" / f"{ckpt.step_dirname(step)}.png", grid)
        log.info(f"sample grid: {path} (rows: objects; columns: Euclid {' '.join(BAND_NAMES)} | "
                 f"HSC-like {' '.join(b[-1].lower() for b in HSC_BANDS)} | reconstructed Euclid)")
