"""Training the detector: the loop (``loop.py``: :func:`train`), the learning-rate and training schedules
(``schedule.py``), checkpoints (``checkpoints.py``), multi-process helpers (``distributed.py``) and the run's
options (``train_config.py``: :class:`TrainConfig`). See :mod:`.loop` for the recipe and the outputs."""

from .checkpoints import load_checkpoint, save_checkpoint
from .loop import train
from .schedule import learning_rate
from .train_config import TrainConfig, build_model, model_config_of

__all__ = [
    "TrainConfig",
    "build_model",
    "learning_rate",
    "load_checkpoint",
    "model_config_of",
    "save_checkpoint",
    "train",
]
