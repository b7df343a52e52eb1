"""Training: the loop, evaluation, and checkpoints."""

from fusion.training.checkpoint import load_checkpoint, save_checkpoint
from fusion.training.loop import EpochMetrics, FitResult, evaluate, fit, predict, set_seed

__all__ = [
    "EpochMetrics",
    "FitResult",
    "evaluate",
    "fit",
    "load_checkpoint",
    "predict",
    "save_checkpoint",
    "set_seed",
]
