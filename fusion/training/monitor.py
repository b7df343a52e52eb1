"""Which epoch is best, and when to stop: a monitored validation metric and its direction.

Losses and errors (`val/loss`, `val/mae`) are better lower, every other metric higher, as
torchmetrics declares them (`fusion.tasks.lower_is_better`). Early stopping follows Keras' and Lightning's
`EarlyStopping`: the stage ends once the monitored metric has not improved by more than
`min_delta` for `patience` epochs, and the best epoch's weights are kept.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass

from fusion.tasks import LOSS_NAME, Objective, lower_is_better, main_metric, metric_names


def default_monitor(objectives: Mapping[str, Objective] | None) -> str:
    """The validation metric a stage keeps its best epoch by when none is configured: the
    main score of its tasks (accuracy without declared tasks)."""
    return f"val/{main_metric(objectives) if objectives else 'accuracy'}"


def validation_metrics(objectives: Mapping[str, Objective]) -> list[str]:
    """The validation metrics every epoch computes for a model predicting these tasks: the
    loss and the tasks' metrics (`fusion.tasks.metric_names`)."""
    return [f"val/{name}" for name in (LOSS_NAME, *metric_names(objectives))]


def check_monitor(metric: str, objectives: Mapping[str, Objective]) -> None:
    """Raise ValueError when `metric` is not one `validation_metrics` computes."""
    known = validation_metrics(objectives)
    if metric not in known:
        close = difflib.get_close_matches(metric, known, n=3, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"expected one of {known}, got '{metric}'{hint}")


@dataclass
class Monitor:
    """A validation metric to select the best epoch by, and optionally to stop early on.

    `patience` None never stops early; otherwise the stage stops after `patience` epochs
    without an improvement greater than `min_delta` (in the metric's own units) over the
    last epoch that improved by that much.
    """

    metric: str = "val/accuracy"  # see default_monitor
    patience: int | None = None
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be None or >= 1, got {self.patience}")
        if not 0 <= self.min_delta < math.inf:
            raise ValueError(f"min_delta must be a finite number >= 0, got {self.min_delta}")

    def better(self, value: float, than: float | None, margin: float = 0.0) -> bool:
        """Whether `value` improves on `than` (None: nothing yet) by more than `margin`."""
        if than is None:
            return True
        return value < than - margin if lower_is_better(self.metric) else value > than + margin

    def value(self, metrics: dict[str, float]) -> float:
        if self.metric not in metrics:
            raise ValueError(
                f"the monitored metric '{self.metric}' is not computed; the epoch gives "
                f"{sorted(k for k in metrics if k.startswith('val/'))}"
            )
        return metrics[self.metric]

    def should_stop(self, epoch: int, improved_at: int) -> bool:
        """Whether `patience` epochs have passed since the epoch `improved_at`."""
        return self.patience is not None and epoch - improved_at >= self.patience
