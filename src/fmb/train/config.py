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


def _require_range(section: str, obj: object, name: str, low: float, high: float, low_open: bool = False,
                   high_open: bool = False) -> None:
    value = getattr(obj, name)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"config key '{section}.{name}' = {value:g}: must be in {bounds}")


@dataclass
class OptimConfig:
    """AdamW (fused on CUDA). Weight decay applies to >= 2-D weights only."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    # Embedding tables (nn.Embedding) are matrices but are usually not decayed.
    decay_embeddings: bool = False

    def __post_init__(self) -> None:
        _require_range("train.optim", self, "lr", 0.0, float("inf"))
        _require_range("train.optim", self, "weight_decay", 0.0, float("inf"))
        _require_range("train.optim", self, "eps", 0.0, 1.0, low_open=True)
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"config key 'train.optim.betas[{i}]' = {beta:g}: must be in [0, 1)")


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

    def __post_init__(self) -> None:
        _require_range("train.schedule", self, "warmup_steps", 0, float("inf"))
        _require_range("train.schedule", self, "min_lr_ratio", 0.0, 1.0)
        _require_range("train.schedule", self, "plateau_factor", 0.0, 1.0, low_open=True)
        _require_positive("train.schedule", self, ("decay_steps", "plateau_patience"))


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
    # Stop when more than this share of a modality's samples is present but unusable (corrupt image
    # bytes, a spectrum on the wrong grid); absent (null) modalities do not count. 1 disables.
    max_unusable_fraction: float = 0.05

    eval_every: int = 500
    eval_at_start: bool = False  # validate once before the first step (a baseline for the curve)
    eval_max_batches: int | None = None  # the first N batches of the validation split, in all; None: all of it
    log_every: int = 50
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)

    num_workers: int = 2
    parallel: Literal["ddp", "fsdp"] = "ddp"  # fsdp: shard weights/grads/optimizer state (fully_shard)
    # torch intra-op CPU threads; None: torch's default (all cores). On a shared machine 1 can be
    # several times faster: threads that wait for each other lose to other processes.
    cpu_threads: int | None = None
    compile: bool = False
    # Recompute each transformer block's activations in backward instead of keeping them: much less
    # activation memory for about a third more compute (astropt, astroclip, specformer, astromodal).
    activation_checkpointing: bool = False
    tf32: bool = True
    progress: bool = True
    log_to: list[str] = field(default_factory=list)  # tensorboard, wandb

    def __post_init__(self) -> None:
        _require_positive("train", self, ("batch_size", "grad_accum_steps", "global_batch_size", "max_steps", "epochs",
                                          "eval_every", "log_every", "eval_max_batches", "cpu_threads"))
        _require_range("train", self, "clip_grad_norm", 0.0, float("inf"))
        _require_range("train", self, "max_unusable_fraction", 0.0, 1.0)
        if self.num_workers < 0:
            raise ConfigError(f"config key 'train.num_workers' = {self.num_workers}: must be 0 or more")


@dataclass
class BaseTrainingConfig:
    """A run: the family adds typed `model` and `data` sections next to `train`."""

    train: TrainConfig = field(default_factory=TrainConfig)
