"""AstroM3 training: trimodal CLIP pre-training (`model.mode: clip`) and classification
fine-tuning (`photo`, `spectra`, `meta`, `all`), from scratch or from a CLIP checkpoint
(`model.init_from`), optionally with frozen encoders.

Objects train with what they have: the CLIP loss of each pair runs over the objects with both
of its modalities, a classifier over the objects with a known label and its modality (`all`: any).

Validation reports `loss` and `retrieval_acc` (CLIP: how often the partner of an object is the
best match within its batch, over the objects of each pair and both directions), or `loss`,
`accuracy`, `macro_f1` and `recall_<class>` (classification); the confusion matrix of every
validation is written to `<run>/confusion/step_NNNNNNN.json` and `<run>/confusion_matrix.json`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fmb.data.missing import ColumnStatistics
from fmb.data.surveys.astrom3 import METADATA_NAMES
from fmb.data.tables import available_splits
from fmb.embeddings import OLD_NAMES, joint_embedding
from fmb.errors import ConfigError, DataError
from fmb.models.astrom3.data import AstroM3DataConfig, AstroM3Dataset
from fmb.models.astrom3.model import (
    CLIP_PAIRS,
    ENCODERS,
    MODALITIES,
    AstroM3,
    AstroM3ModelConfig,
    pair_name,
    pair_presence,
    trimodal_clip_loss,
)
from fmb.train import BaseTrainer, BaseTrainingConfig, StepOutput
from fmb.train import checkpoint as ckpt
from fmb.train.embed import EmbedBatch

log = logging.getLogger("fmb")

INPUTS = ("photometry", "photometry_mask", "spectra", "metadata", "present")  # absent keys: None (unused modality)


@dataclass
class AstroM3Config(BaseTrainingConfig):
    model: AstroM3ModelConfig = field(default_factory=AstroM3ModelConfig)
    data: AstroM3DataConfig = field(default_factory=AstroM3DataConfig)


# ----------------------------------------------------------------------------- metrics


def classification_metrics(confusion: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Accuracy, macro-F1 (over classes present in truth or predictions) and per-class recall
    from a confusion matrix with true classes as rows."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    true = confusion.sum(1)
    pred = confusion.sum(0)
    out = {"accuracy": float(tp.sum() / max(confusion.sum(), 1.0))}
    present = (true + pred) > 0
    f1 = np.where(present, 2 * tp / np.maximum(true + pred, 1e-12), 0.0)
    out["macro_f1"] = float(f1[present].mean()) if present.any() else 0.0
    for i, name in enumerate(classes):
        if true[i] > 0:
            out[f"recall_{name}"] = float(tp[i] / true[i])
    return out


def retrieval_hits(a: torch.Tensor, b: torch.Tensor, both: torch.Tensor) -> torch.Tensor:
    """Among the rows with both modalities (`both`), the number of rows of a whose best match in b
    is its partner, plus the same from b to a."""
    sim = (a.float() @ b.float().T).masked_fill(~(both[:, None] & both[None, :]), float("-inf"))
    target = torch.arange(len(a), device=a.device)
    return ((sim.argmax(1) == target) & both).sum() + ((sim.argmax(0) == target) & both).sum()


# ----------------------------------------------------------------------------- trainer


class AstroM3Trainer(BaseTrainer):
    family = "astrom3"
    config_cls = AstroM3Config
    summary_keys = ("masked",)

    def __init__(self, config: AstroM3Config) -> None:
        super().__init__(config)
        mode = config.model.mode
        produced = ({"val/loss", "val/retrieval_acc"} if mode == "clip"
                    else {"val/loss", "val/accuracy", "val/macro_f1"})
        for key, name in (("train.checkpoint.best_metric", config.train.checkpoint.best_metric),
                          ("train.early_stopping.metric", config.train.early_stopping.metric),
                          ("train.schedule.plateau_metric", config.train.schedule.plateau_metric)):
            if name is not None and name not in produced:
                raise ConfigError(f"{key}={name} is not reported in model.mode={mode}; "
                                  f"choose one of {', '.join(sorted(produced))}")
        if mode == "clip" and (config.model.init_from or config.model.freeze_encoders):
            raise ConfigError("model.init_from and model.freeze_encoders apply to fine-tuning modes, not model.mode=clip")
        self.metadata_stats: ColumnStatistics | None = None
        self.last_confusion: np.ndarray | None = None

    @property
    def classes(self) -> list[str]:
        return self.config.data.classes

    # -------------------------------------------------------------- data

    def demo_data(self) -> tuple[str, dict[str, Any]]:
        missing = self.config.data.synthetic_missing
        return "astrom3", ({"missing": dict(missing)} if missing else {})

    def prepare(self) -> None:
        if self.config.data.path is None:
            raise ConfigError("set data.path to an AstroM3 parquet directory (or ${paths.astrom3}), or use --demo")

    def _dataset_options(self) -> dict[str, Any]:
        data, mode = self.config.data, self.config.model.mode
        return dict(classes=self.classes, seq_len=self.config.model.seq_len, modalities=MODALITIES[mode],
                    sentinels=data.missing_sentinels, phased=data.phased, cache_row_groups=data.cache_row_groups)

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        data, mode = self.config.data, self.config.model.mode
        # The single-modality classifiers need their modality in every split; clip and all use what there is.
        required = MODALITIES[mode] if len(MODALITIES[mode]) == 1 else ()
        common = dict(**self._dataset_options(), bad_rows=data.bad_rows, seed=self.cfg.seed,
                      labels_needed=mode != "clip", required=required)
        train = AstroM3Dataset(data.path, data.train_split, train=True,
                               label_fraction=data.label_fraction if mode != "clip" else 1.0, **common)
        val = AstroM3Dataset(data.path, data.val_split, train=False, **common)
        if len(MODALITIES[mode]) > 1:
            self._check_pairs(train, data.train_split)
        self.metadata_stats = ColumnStatistics.of(train.metadata_matrix(), METADATA_NAMES,
                                                  f"{data.path} (split {data.train_split}) metadata")
        return train, val

    def _check_pairs(self, train: AstroM3Dataset, split: str) -> None:
        """clip / all: report modalities no training object has; clip needs two of them."""
        held = [name for name in ENCODERS
                if (train.catalogue_present().any() if name == "metadata" else train.source.has_values(name))]
        absent = [name for name in ENCODERS if name not in held]
        if self.config.model.mode == "clip" and len(held) < 2:
            raise DataError(f"{train.where}: CLIP needs two modalities, but no object has {' or '.join(absent)}")
        if absent:
            log.warning(f"{train.where}: no object has {', '.join(absent)}; its encoder learns nothing")

    # -------------------------------------------------------------- model

    def new_model(self) -> nn.Module:
        return AstroM3(self.config.model, num_classes=len(self.classes))

    def build_model(self) -> nn.Module:
        cfg = self.config.model
        model = self.new_model()
        if self.metadata_stats is not None:
            stats = self.metadata_stats
            model.set_metadata_stats(torch.from_numpy(stats.mean), torch.from_numpy(stats.std), torch.from_numpy(stats.used))
        if cfg.init_from:
            # Every encoder, projection and the metadata statistics this model has, from an astrom3 run
            # (a CLIP run holds all of them); the classification head stays new.
            source = ckpt.load_weights(model, cfg.init_from, self.family, exclude=("head.",), subset=True)
            log.info(f"encoders and metadata statistics initialised from {source}")
        if cfg.freeze_encoders:
            for name, param in model.named_parameters():
                if not name.startswith("head."):
                    param.requires_grad_(False)
        return model

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.config.model.freeze_encoders:  # frozen encoders also keep dropout off
            for name, module in model.named_children():
                if name != "head":
                    module.eval()

    # -------------------------------------------------------------- loss and metrics

    def _step(self, model: nn.Module, batch: dict[str, torch.Tensor], evaluating: bool) -> tuple[StepOutput, dict[str, torch.Tensor]]:
        """The loss over the objects that can teach it, and summed evaluation statistics."""
        present = batch["present"]
        out = model(*(batch.get(k) for k in INPUTS))
        masked = batch["masked"].float().mean()
        sums: dict[str, torch.Tensor] = {"masked": batch["masked"].sum().double()}
        if self.config.model.mode == "clip":
            both = pair_presence(present)
            parts = trimodal_clip_loss({name: out[name] for name in ENCODERS}, out["scales"], present)
            loss = parts.pop("loss")
            components = {**parts, "masked": masked}
            for i, name in enumerate(("scale_ps", "scale_sm", "scale_mp")):
                components[name] = out["scales"][i].detach()
            if evaluating:
                sums["hits"] = sum(retrieval_hits(out[a], out[b], both[pair_name(a, b)]) for a, b in CLIP_PAIRS).double()
                for name, value in parts.items():
                    count = both[name].sum().double()
                    sums[name] = value.double() * count
                    sums[f"n_{name}"] = count
            return StepOutput(loss=loss, components=components, n_samples=len(present)), sums
        # From the config, not the model: under DDP the model is a wrapper without `modalities`.
        columns = [ENCODERS.index(m) for m in MODALITIES[self.config.model.mode]]
        labels = batch["label"]
        usable = present[:, columns].any(1) & (labels >= 0)
        logits = out["logits"].float()
        weight = usable.to(logits.dtype)
        rows = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
        loss = (rows * weight).sum() / weight.sum().clamp_min(1.0)
        if evaluating:
            k = len(self.classes)
            sums["n"] = usable.sum().double()
            sums["loss"] = (rows * weight).sum().double()
            sums["confusion"] = torch.bincount((labels * k + logits.argmax(1))[usable], minlength=k * k).double()
        return StepOutput(loss=loss, components={"masked": masked}, n_samples=len(present)), sums

    def compute_loss(self, model: nn.Module, batch: Any) -> StepOutput:
        return self._step(model, batch, evaluating=False)[0]

    def embedding_datasets(self, data: str | None, split: str | None) -> list[tuple[str, Dataset]]:
        path = data or self.config.data.path
        if path is None:
            raise ConfigError("the checkpoint's config names no data path (converted weights?): pass --data")
        names = available_splits(Path(path)) if Path(path).is_dir() else []
        if split is not None and names and split not in names:
            raise ConfigError(f"--split {split}: {path} has {', '.join(names)}")
        chosen = [split] if split else (names or [None])
        return [(name or "all", AstroM3Dataset(path, name, train=False, bad_rows="mask", **self._dataset_options()))
                for name in chosen]

    def embed_batch(self, model: nn.Module, batch: dict) -> EmbedBatch:
        """Per modality the projected embedding (null where the object lacks it or it is unusable),
        joint = normalised sum of those present; the label (null outside the run's classes), class
        index and, for classifiers, the predicted class (from the modalities present)."""
        out = model(*(batch.get(k) for k in INPUTS))
        valid = batch["valid"]
        names = np.array(self.classes, dtype=object)
        index = batch["label"].cpu().numpy()
        targets = {"label": [names[i] if i >= 0 else None for i in index], "class_index": index.astype(np.int32),
                   "valid": valid.cpu().numpy()}
        if "logits" in out:
            targets["predicted"] = names[out["logits"].argmax(1).cpu().numpy()].tolist()
        vectors = {OLD_NAMES.get(name, name): out[name].float() for name in model.modalities}
        present = {OLD_NAMES.get(name, name): batch["present"][:, ENCODERS.index(name)] for name in model.modalities}
        if len(vectors) > 1:
            vectors["joint"] = joint_embedding(vectors, present)
            present["joint"] = valid
        return EmbedBatch(vectors, present, targets)

    def validation_step(self, model: nn.Module, batch: Any) -> dict[str, tuple[torch.Tensor, float]]:
        _, sums = self._step(model, batch, evaluating=True)
        return {name: (value, 1.0) for name, value in sums.items()}  # plain sums: validation_metrics divides

    def validation_metrics(self, totals: dict[str, tuple[torch.Tensor, float]],
                           rows: dict[str, torch.Tensor]) -> dict[str, float]:
        values = {name: total for name, (total, _) in totals.items()}
        metrics = {"masked": float(values.pop("masked"))}
        if self.config.model.mode == "clip":
            counts = {name: float(values.pop(f"n_{name}")) for name in map(lambda p: pair_name(*p), CLIP_PAIRS)}
            metrics["retrieval_acc"] = float(values.pop("hits")) / max(2 * sum(counts.values()), 1.0)
            parts = {name: float(values[name]) / max(count, 1.0) for name, count in counts.items()}
            metrics.update(parts, loss=sum(parts.values()))
            return metrics
        n = max(float(values.pop("n")), 1.0)
        metrics["loss"] = float(values["loss"]) / n
        k = len(self.classes)
        self.last_confusion = values["confusion"].cpu().numpy().reshape(k, k)
        metrics.update(classification_metrics(self.last_confusion, self.classes))
        return metrics

    def on_validation_end(self, model: nn.Module, step: int, metrics: dict[str, float]) -> None:
        if self.last_confusion is None or not self.dist.is_main:
            return
        record = {"step": step, "classes": self.classes, "rows": "true class", "columns": "predicted class",
                  "matrix": self.last_confusion.astype(int).tolist(), "metrics": metrics}
        folder = self.run_dir / "confusion"
        folder.mkdir(exist_ok=True)
        text = json.dumps(record, indent=1)
        (folder / f"{ckpt.step_dirname(step)}.json").write_text(text)
        (self.run_dir / "confusion_matrix.json").write_text(text)
