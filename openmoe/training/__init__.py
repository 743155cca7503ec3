"""Training: config, optimizers/schedules, checkpoints, metrics, the loop."""

from .config import ConfigError, TrainConfig, load_config
from .trainer import Trainer, TrainingDiverged

__all__ = ["ConfigError", "TrainConfig", "load_config", "Trainer", "TrainingDiverged"]
