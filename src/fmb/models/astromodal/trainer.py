"""astromodal training: tokenise S-PLUS fields (fitting the tokenisers if needed), then train the
causal token transformer with cross-entropy + reconstruction losses."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fmb.data.splits import holdout_mask
from fmb.errors import ConfigError, DataError
from fmb.models.astromodal.data import SequenceDataset, TokenShards, collate_sequences
from fmb.models.astromodal.model import (
    AstromodalModelConfig,
    AstromodalTransformer,
    LossConfig,
    astromodal_loss,
)
from fmb.models.astromodal.tokenize import (
    CONFIG_FILE,
    KINDS,
    Tokenizers,
    encode_dataset,
    fit_tokenizers,
)
from fmb.models.astromodal.tokenizers import TokenizerConfig
from fmb.train import BaseTrainer, BaseTrainingConfig, StepOutput
from fmb.train.embed import EmbedBatch

log = logging.getLogger("fmb")


@dataclass
class AstromodalDataConfig:
    path: str | None = None  # directory of datacube_<FIELD>.parquet files (or one file)
    synthetic: int = 0  # > 0 (--demo) and no path: write this many synthetic objects under <out>/data
    tokenizers: str | None = None  # fitted tokenisers; default <out>/tokenizers, fitted there if absent
    tokens: str | None = None  # token shards; default <out>/tokens, encoded there if absent
    val_fraction: float = 0.05  # objects held out by a hash of their id
    split_seed: int = 0


@dataclass
class AstromodalConfig(BaseTrainingConfig):
    model: AstromodalModelConfig = field(default_factory=AstromodalModelConfig)
    data: AstromodalDataConfig = field(default_factory=AstromodalDataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)


def prepare_tokens(config: AstromodalConfig, run_dir: Path, main: bool) -> tuple[Path, Path]:
    """(tokeniser directory, token shard directory), creating what is missing when `main`."""
    data = config.data
    tok_dir = Path(data.tokenizers) if data.tokenizers else run_dir / "tokenizers"
    shard_dir = Path(data.tokens) if data.tokens else run_dir / "tokens"
    if not main or ((tok_dir / CONFIG_FILE).is_file() and (shard_dir / "meta.json").is_file()):
        return tok_dir, shard_dir
    path = data.path
    if path is None:
        raise ConfigError("set data.path to a directory of datacube_<FIELD>.parquet files "
                          "(or data.tokens to encoded shards), or use --demo")
    if not (tok_dir / CONFIG_FILE).is_file():
        fit_tokenizers(path, tok_dir, config.tokenizer, list(KINDS))
    if not (shard_dir / "meta.json").is_file():
        encode_dataset(path, tok_dir, shard_dir)
    return tok_dir, shard_dir


class AstromodalTrainer(BaseTrainer):
    family = "astromodal"
    config_cls = AstromodalConfig
    summary_keys = ("ce",)

    def demo_data(self) -> tuple[str, dict[str, Any]]:
        return "splus", {}

    def prepare(self) -> None:
        with self.main_process_first() as main:
            tok_dir, shard_dir = prepare_tokens(self.config, self.run_dir, main)
        self._load_tokenizers(tok_dir)
        self.shards = self._check_shards(TokenShards(shard_dir), tok_dir)

    def _load_tokenizers(self, directory: Path) -> None:
        self.tokenizers = Tokenizers.load(directory)
        self.vocab = self.tokenizers.vocabulary()

    def _check_shards(self, shards: TokenShards, tok_dir: Path) -> TokenShards:
        if shards.meta.get("vocabulary") != self.vocab.to_json():
            raise DataError(f"{shards.dir} was encoded with other tokenisers than {tok_dir}; "
                            "re-encode it (`fmb tokenize encode`) or point data.tokenizers at the right ones")
        return shards

    def new_model(self) -> nn.Module:
        return AstromodalTransformer(self.config.model, self.vocab, self.tokenizers.image.latent)

    def build_model(self) -> nn.Module:
        model = super().build_model()
        load_targets(model, self.tokenizers)
        return model

    def prepare_embedding(self, directory: Path, work: Path) -> None:
        """The run's fitted tokenisers (data.tokenizers, else <run>/tokenizers); fields given with
        --data are encoded with them into `work`."""
        run_dir = Path(self.cfg.out) if self.cfg.out else Path(directory).parent.parent
        self.tokenizer_dir = Path(self.config.data.tokenizers) if self.config.data.tokenizers else run_dir / "tokenizers"
        self._load_tokenizers(self.tokenizer_dir)
        self.run_tokens = Path(self.config.data.tokens) if self.config.data.tokens else run_dir / "tokens"
        self.embed_work = work

    def embedding_datasets(self, data: str | None, split: str | None) -> list[tuple[str, Dataset]]:
        """The run's token shards split as in training (train / validation hold-out by id), or the
        fields (or shards) given with --data, whole."""
        if data is None:
            shards = self._check_shards(TokenShards(self.run_tokens), self.tokenizer_dir)
            keys = shards.objects(["key"]).column("key").to_numpy()
            held = holdout_mask(keys, self.config.data.val_fraction, self.config.data.split_seed)
            choices = {"train": np.flatnonzero(~held), "validation": np.flatnonzero(held)}
        else:
            directory = Path(data)
            if not (directory / "meta.json").is_file():  # hypercube fields: encode them first
                directory = self.embed_work / "tokens"
                with self.main_process_first() as main:
                    if main and not (directory / "meta.json").is_file():
                        encode_dataset(data, self.tokenizer_dir, directory)
            shards = self._check_shards(TokenShards(directory), self.tokenizer_dir)
            choices = {"all": np.arange(len(shards))}
        if split is not None and split not in choices:
            raise ConfigError(f"--split {split}: astromodal embeds {', '.join(choices)} here")
        objects = shards.objects()
        self.embed_ids = np.asarray(objects.column("id").to_pylist(), dtype=object)
        self.embed_targets = {name: objects.column(name).to_numpy(zero_copy_only=False)
                              for name in objects.column_names if name not in ("id", "key")}
        max_len = self.config.model.max_len
        return [(name, SequenceDataset(shards, self.vocab, max_len, rows))
                for name, rows in choices.items() if split in (None, name)]

    def embed_batch(self, model: nn.Module, batch: dict) -> EmbedBatch:
        """`joint`: the final hidden states averaged over the object's real tokens (every modality it
        has); the object's field file and truth columns carried along."""
        tokens, types, mask = batch["tokens"], batch["types"], batch["mask"]
        _, hidden = model(tokens, types, mask, return_hidden=True)
        weights = mask[..., None].float()
        rows = batch["index"].cpu().numpy()
        targets = {name: values[rows] for name, values in self.embed_targets.items()}
        return EmbedBatch({"joint": (hidden.float() * weights).sum(1) / weights.sum(1)}, targets=targets,
                          ids=self.embed_ids[rows])

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        objects = self.shards.objects(["id", "key"])
        self.object_ids = np.asarray(objects.column("id").to_pylist(), dtype=object)
        keys = objects.column("key").to_numpy()
        held = holdout_mask(keys, self.config.data.val_fraction, self.config.data.split_seed)
        max_len = self.config.model.max_len
        train = SequenceDataset(self.shards, self.vocab, max_len, np.flatnonzero(~held))
        val = SequenceDataset(self.shards, self.vocab, max_len, np.flatnonzero(held))
        return train, (val if len(val) else None)

    def collate_fn(self) -> Any:
        return collate_sequences

    def batch_ids(self, batch: Any) -> list:
        return self.object_ids[batch["index"].numpy()].tolist()

    def _terms(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        tokens, types, mask = batch["tokens"], batch["types"], batch["mask"]
        logits = model(tokens[:, :-1], types[:, :-1], mask[:, :-1])
        return astromodal_loss(logits, tokens[:, 1:], types[:, 1:], self.vocab, self.model.targets,
                               self.config.loss, sample=model.training)

    def compute_loss(self, model: nn.Module, batch: Any) -> StepOutput:
        total, terms = self._terms(model, batch)
        b, t = batch["tokens"].shape
        return StepOutput(loss=total, components={k: v for k, (v, _) in terms.items()}, n_samples=b,
                          n_tokens=b * (t - 1))

    def validation_step(self, model: nn.Module, batch: Any) -> dict[str, tuple[torch.Tensor, float]]:
        """Token-weighted cross-entropy and position-weighted reconstruction errors."""
        total, terms = self._terms(model, batch)
        b = batch["tokens"].shape[0]
        out = {"loss": (total.detach().float() * b, b)}
        out.update({k: (v.detach() * n, n) for k, (v, n) in terms.items()})
        return out


def load_targets(model: AstromodalTransformer, toks: Tokenizers) -> None:
    """Copy codebooks and normalised bin centres into the model's reconstruction buffers."""
    with torch.no_grad():
        model.targets.image.copy_(toks.image.codebook)
        model.targets.scalar.copy_(toks.scalar.normalised_centres())
        for g, codebook in toks.spectrum.codebooks.items():
            getattr(model.targets, f"spec_{g}").copy_(codebook)
