"""A tiny real family for testing the training core: an MLP regressing a planted linear target."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from fmb.errors import ConfigError
from fmb.models import Family
from fmb.train import BaseTrainer, BaseTrainingConfig, StepOutput
from fmb.train.embed import EmbedBatch


@dataclass
class ToyModelConfig:
    hidden: int = 16
    dropout: float = 0.0


@dataclass
class ToyDataConfig:
    n_train: int = 64
    n_val: int = 16
    nan_from_step: int | None = None  # make the loss NaN from this optimizer step on
    kill_at_step: int | None = None  # send SIGTERM to this process during this step
    noise: float = 0.01
    fault_every: int | None = None  # mark every k-th object's "x" as present but unusable (a data fault)


@dataclass
class ToyConfig(BaseTrainingConfig):
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    data: ToyDataConfig = field(default_factory=ToyDataConfig)


class ToyDataset(Dataset):
    def __init__(self, n: int, seed: int, noise: float, fault_every: int | None = None) -> None:
        self.fault_every = fault_every
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=gen)
        weight = torch.arange(1, 9, dtype=torch.float32) / 8
        self.y = self.x @ weight + noise * torch.randn(n, generator=gen)
        self.ids = torch.arange(n) + 1000 * seed

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        item = {"x": self.x[i], "y": self.y[i], "object_id": self.ids[i], "targets": {"y": self.y[i]}}
        if self.fault_every:
            item["fault_x"] = f"x is broken (toy row {i})" if i % self.fault_every == 0 else ""
        return item


class ToyModel(nn.Module):
    def __init__(self, cfg: ToyModelConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class ToyTrainer(BaseTrainer):
    family = "toy"
    config_cls = ToyConfig
    calls = 0

    def new_model(self) -> nn.Module:
        return ToyModel(self.config.model)

    def build_datasets(self):
        data = self.config.data
        return ToyDataset(data.n_train, 1, data.noise, data.fault_every), ToyDataset(data.n_val, 2, data.noise, data.fault_every)

    def embedding_datasets(self, data, split):
        train, val = self.build_datasets()
        chosen = {"train": train, "validation": val}
        if split is not None and split not in chosen:
            raise ConfigError(f"--split {split}: toy has train, validation")
        return [(name, ds) for name, ds in chosen.items() if split in (None, name)]

    def embed_batch(self, model, batch) -> EmbedBatch:
        hidden = model.net[:-1](batch["x"])  # the features before the regression head
        return EmbedBatch({"joint": hidden})

    def compute_loss(self, model, batch) -> StepOutput:
        data = self.config.data
        step = self.progress.step
        if data.kill_at_step is not None and step == data.kill_at_step and model.training:
            os.kill(os.getpid(), signal.SIGTERM)
        pred = model(batch["x"])
        if data.nan_from_step is not None and step >= data.nan_from_step and model.training:
            pred = pred * float("nan")
        loss = torch.mean((pred.float() - batch["y"]) ** 2)
        # A figure of the whole batch (like a contrastive loss): it depends on which objects share it.
        spread = pred.float().std() if len(pred) > 1 else pred.float().sum() * 0.0
        return StepOutput(loss=loss, components={"mae": (pred.float() - batch["y"]).abs().mean(), "spread": spread},
                          n_samples=len(batch["y"]))


def write_points(out_dir, n: int, seed: int) -> Path:
    """A synthetic data kind the toy family brings: n points of the planted linear target."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = ToyDataset(n, seed, 0.01)
    torch.save({"x": data.x, "y": data.y}, out_dir / "points.pt")
    return out_dir


FAMILY = Family(name="toy", summary="test MLP", trainer=ToyTrainer,
                synthetic={"toy-points": ("tests.toy:write_points", "points of a planted linear target")})


def toy_config(out, **train) -> ToyConfig:
    cfg = ToyConfig()
    cfg.train.out = str(out)
    cfg.train.num_workers = 0
    cfg.train.progress = False
    cfg.train.log_every = 1
    cfg.train.eval_every = 1000
    cfg.train.checkpoint.every = 1000
    cfg.train.max_steps = 8
    cfg.train.batch_size = 8
    cfg.train.optim.lr = 1e-2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg
