"""Training: the loop, evaluation, and checkpoints."""

from fusion.training.checkpoint import load_checkpoint, save_checkpoint
from fusion.training.loop import EpochMetrics, FitResult, evaluate, fit, predict, set_seed
from fusion.training.precision import Precision

__all__ = [
    "EpochMetrics",
    "FitResult",
    "Precision",
    "evaluate",
    "fit",
    "load_checkpoint",
    "predict",
    "save_checkpoint",
    "set_seed",
]
