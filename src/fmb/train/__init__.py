"""The shared training core: BaseTrainer and its configuration."""

from fmb.train.config import BaseTrainingConfig, TrainConfig
from fmb.train.trainer import BaseTrainer, RunResult, StepOutput

__all__ = ["BaseTrainer", "BaseTrainingConfig", "RunResult", "StepOutput", "TrainConfig"]
