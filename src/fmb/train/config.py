"""The shared training configuration: every family's run config has a `train:` section of this type.

These dataclass defaults are the only defaults; recipes in configs/ override what a family needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fmb.errors import ConfigError


def _require_positive(section: str, obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 1:
            raise ConfigError(f"config key '{section}.{name}' = {value}: must be at least 1")


@dataclass
class OptimConfig:
    """AdamW (fused on CUDA). Weight decay applies to >= 2-D weights only."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    # Embedding tables (nn.Embedding) are matrices but are usually not decayed.
    decay_embeddings: bool = False


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, as a factor of each parameter group's own learning rate."""

    kind: Literal["cosine", "constant", "plateau"] = "cosine"
    warmup_steps: int = 0
    # cosine: decays to lr * min_lr_ratio at decay_steps (default: the run's total steps).
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None
    # plateau: after warmup, multiply by plateau_factor when the validation metric has not
    # improved for plateau_patience evaluations (never below lr * min_lr_ratio).
    plateau_metric: str = "val/loss"
    plateau_mode: Literal["min", "max"] = "min"
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    plateau_threshold: float = 1e-4


@dataclass
class CheckpointConfig:
    every: int = 1000  # optimizer steps; the last step is always saved
    keep_last: int = 3
    best_metric: str | None = "val/loss"  # any logged validation metric; None: no best tracking
    best_mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        _require_positive("train.checkpoint", self, ("every",))


@dataclass
class EarlyStoppingConfig:
    patience: int = 0  # evaluations without improvement before stopping; 0 disables
    min_delta: float = 0.0
    metric: str = "val/loss"
    mode: Literal["min", "max"] = "min"


@dataclass
class TrainConfig:
    out: str | None = None  # run directory; default runs/<model> under paths.runs
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    seed: int = 0

    batch_size: int = 32  # per process, per micro-step
    grad_accum_steps: int = 1
    # If set, grad_accum_steps is derived: global_batch_size / (batch_size * world_size).
    global_batch_size: int | None = None
    max_steps: int | None = None  # optimizer steps; or give epochs
    epochs: int | None = None

    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    clip_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    max_nonfinite_steps: int = 10  # stop after this many non-finite steps in a row

    eval_every: int = 500
    eval_at_start: bool = False  # validate once before the first step (a baseline for the curve)
    eval_max_batches: int | None = None  # per process; None: the whole validation split
    log_every: int = 50
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)

    num_workers: int = 2
    parallel: Literal["ddp", "fsdp"] = "ddp"  # fsdp: shard weights/grads/optimizer state (fully_shard)
    # torch intra-op CPU threads; None: torch's default (all cores). On a shared machine 1 can be
    # several times faster: threads that wait for each other lose to other processes.
    cpu_threads: int | None = None
    compile: bool = False
    tf32: bool = True
    progress: bool = True
    log_to: list[str] = field(default_factory=list)  # tensorboard, wandb

    def __post_init__(self) -> None:
        _require_positive("train", self, ("batch_size", "grad_accum_steps", "global_batch_size", "max_steps", "epochs",
                                          "eval_every", "log_every", "eval_max_batches", "cpu_threads"))


@dataclass
class BaseTrainingConfig:
    """A run: the family adds typed `model` and `data` sections next to `train`."""

    train: TrainConfig = field(default_factory=TrainConfig)
