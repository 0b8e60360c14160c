"""Learning-rate schedules as a multiplier of each parameter group's own base learning rate.

A schedule is asked for `factor(step)` before every optimizer step; a plateau schedule also
`observe`s the validation metric after each evaluation. State is plain floats and ints so it
round-trips through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
from typing import Any

from fmb.train.config import ScheduleConfig


class Schedule:
    def __init__(self, cfg: ScheduleConfig, total_steps: int) -> None:
        self.cfg = cfg
        self.total_steps = total_steps
        self.plateau_scale = 1.0
        self.best: float | None = None
        self.bad_evals = 0

    def warmup(self, step: int) -> float:
        if self.cfg.warmup_steps > 0 and step < self.cfg.warmup_steps:
            return (step + 1) / self.cfg.warmup_steps
        return 1.0

    def factor(self, step: int) -> float:
        """Multiplier for optimizer step `step` (0-based)."""
        cfg = self.cfg
        if cfg.kind == "constant":
            return self.warmup(step)
        if cfg.kind == "plateau":
            return self.warmup(step) * self.plateau_scale
        decay_steps = cfg.decay_steps or self.total_steps
        if step < cfg.warmup_steps:
            return self.warmup(step)
        if step >= decay_steps:
            return cfg.min_lr_ratio
        progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine

    def observe(self, metrics: dict[str, float], step: int) -> None:
        """Feed a validation result (plateau schedules only react after warmup)."""
        cfg = self.cfg
        if cfg.kind != "plateau" or step < cfg.warmup_steps or cfg.plateau_metric not in metrics:
            return
        value = metrics[cfg.plateau_metric]
        if self.best is None or is_improvement(value, self.best, cfg.plateau_mode, cfg.plateau_threshold):
            self.best = value
            self.bad_evals = 0
            return
        self.bad_evals += 1
        if self.bad_evals > cfg.plateau_patience:
            self.plateau_scale = max(cfg.min_lr_ratio, self.plateau_scale * cfg.plateau_factor)
            self.bad_evals = 0

    def state_dict(self) -> dict[str, Any]:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau_scale = float(state["plateau_scale"])
        self.best = state["best"]
        self.bad_evals = int(state["bad_evals"])


def is_improvement(value: float, best: float, mode: str, min_delta: float) -> bool:
    if mode == "min":
        return value < best - min_delta
    return value > best + min_delta


class EarlyStopping:
    """Counts evaluations without improvement of one metric."""

    def __init__(self, patience: int, min_delta: float, metric: str, mode: str) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.metric = metric
        self.mode = mode
        self.best: float | None = None
        self.bad_evals = 0

    def should_stop(self, metrics: dict[str, float]) -> bool:
        if self.patience <= 0 or self.metric not in metrics:
            return False
        value = metrics[self.metric]
        if self.best is None or is_improvement(value, self.best, self.mode, self.min_delta):
            self.best = value
            self.bad_evals = 0
            return False
        self.bad_evals += 1
        return self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.bad_evals = int(state["bad_evals"])


class BestTracker:
    """The best value so far of the metric that names the best checkpoint (`checkpoints/best.json`)."""

    def __init__(self, metric: str | None, mode: str) -> None:
        self.metric, self.mode = metric, mode
        self.record: dict[str, Any] | None = None  # {"metric", "value", "step"}

    def improves(self, metrics: dict[str, float]) -> bool:
        if not self.metric or self.metric not in metrics or not math.isfinite(metrics[self.metric]):
            return False
        return self.record is None or is_improvement(metrics[self.metric], self.record["value"], self.mode, 0.0)

    def update(self, metrics: dict[str, float], step: int) -> dict[str, Any] | None:
        """The new record if `metrics` improve on the best (and remember it), else None."""
        if not self.improves(metrics):
            return None
        self.record = {"metric": self.metric, "value": metrics[self.metric], "step": step}
        return self.record

    def state_dict(self) -> dict[str, Any] | None:
        return self.record

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.record = state
