"""The training floor: config, preparation, one train_step, the epoch loop, checkpoints,
progress reports, accounting and typed results (finetune, the training bench and users' own
loops share it)."""

from wasi_tool.training.config import FinetuneConfig
from wasi_tool.training.loop import StepResult, Trainer, evaluate, train_step
from wasi_tool.training.prepare import Prepared, prepare_for_training
from wasi_tool.training.progress import Progress, Silent
from wasi_tool.training.results import EpochRecord, FinetuneMetrics

__all__ = [
    "EpochRecord",
    "FinetuneConfig",
    "FinetuneMetrics",
    "Prepared",
    "Progress",
    "Silent",
    "StepResult",
    "Trainer",
    "evaluate",
    "prepare_for_training",
    "train_step",
]
