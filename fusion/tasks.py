"""Task kinds: the loss each kind trains with and the metrics it is scored by.

A dataset declares each task's kind (`fusion.data.Task`); an `Objective` adds how that task
is trained and scored, with a default for every kind:

| kind       | head outputs      | targets              | loss (default first)        | metrics (default)                 |
|------------|-------------------|----------------------|-----------------------------|-----------------------------------|
| multiclass | C logits          | class index          | cross_entropy               | accuracy, f1_macro                |
| binary     | 2 logits          | class index (0 or 1) | cross_entropy               | accuracy, f1, auroc               |
| multilabel | C logits          | C values in {0, 1}   | bce                         | f1_micro, f1_macro, map           |
| regression | K values          | K numbers            | mse, l1, huber              | mae, rmse, pearson, spearman      |

A binary task keeps two logits, so predictions, confusion matrices and conditional heads
treat it as a class like any other: its cross-entropy equals binary cross-entropy with
logits on the logits' difference, and `pos_weight` (BCE's weight of the positive class)
is the class weight `[1, pos_weight]`.

Losses are summed over the batch (the loop divides by the number of samples); a sample's
loss is the mean over its labels (multilabel) or targets (regression). Metrics are
torchmetrics objects (https://lightning.ai/docs/torchmetrics), updated batch by batch and
computed over the whole split, synchronized across DDP processes. Each metric's direction
is torchmetrics' own `higher_is_better`. The affect metrics follow MultiBench's
`eval_affect` and MulT (Tsai et al., ACL 2019): Acc-2 is the agreement of signs
(negative against non-negative), its F1 is weighted over the two classes, and Acc-7 rounds
scores clipped to [-3, 3] to seven classes.
"""

from __future__ import annotations

import difflib
import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchmetrics
from torch import nn
from torchmetrics import classification as tmc
from torchmetrics import regression as tmr

from fusion.data import Task

LOSSES = {
    "multiclass": ("cross_entropy",),
    "binary": ("cross_entropy",),
    "multilabel": ("bce",),
    "regression": ("mse", "l1", "huber"),
}
DEFAULT_METRICS = {
    "multiclass": ("accuracy", "f1_macro"),
    "binary": ("accuracy", "f1", "auroc"),
    "multilabel": ("f1_micro", "f1_macro", "map"),
    "regression": ("mae", "rmse", "pearson", "spearman"),
}
LOSS_NAME = "loss"
CLASSIFICATION = ("multiclass", "binary")
"""Kinds whose prediction is one class (confusion matrices, conditional routing)."""


class _SignAccuracy(tmc.BinaryAccuracy):
    """Acc-2: whether prediction and target have the same sign (negative vs non-negative)."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update((preds >= 0).long(), (target >= 0).long())


class _SignF1(tmc.MulticlassF1Score):
    """Acc-2's F1, weighted over the two sign classes (MultiBench's `eval_affect`)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(num_classes=2, average="weighted", **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update((preds >= 0).long(), (target >= 0).long())


class _SevenClassAccuracy(tmc.MulticlassAccuracy):
    """Acc-7: scores clipped to [-3, 3] and rounded to the seven integers."""

    def __init__(self, **kwargs) -> None:
        super().__init__(num_classes=7, average="micro", **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(_seven(preds), _seven(target))


def _seven(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.clamp(-3, 3)).long() + 3


def _outputs(task: Task) -> int:
    return task.num_outputs


MetricFactory = Callable[..., torchmetrics.Metric]
METRICS: dict[str, dict[str, MetricFactory]] = {
    "accuracy": {
        "multiclass": lambda t, **kw: tmc.MulticlassAccuracy(_outputs(t), average="micro", **kw),
        "binary": lambda t, **kw: tmc.BinaryAccuracy(**kw),
        "multilabel": lambda t, **kw: tmc.MultilabelAccuracy(_outputs(t), average="micro", **kw),
    },
    "f1_macro": {
        "multiclass": lambda t, **kw: tmc.MulticlassF1Score(_outputs(t), average="macro", **kw),
        "multilabel": lambda t, **kw: tmc.MultilabelF1Score(_outputs(t), average="macro", **kw),
    },
    "f1_micro": {
        "multilabel": lambda t, **kw: tmc.MultilabelF1Score(_outputs(t), average="micro", **kw)
    },
    "f1": {"binary": lambda t, **kw: tmc.BinaryF1Score(**kw)},
    "auroc": {
        "binary": lambda t, **kw: tmc.BinaryAUROC(**kw),
        "multiclass": lambda t, **kw: tmc.MulticlassAUROC(_outputs(t), **kw),
    },
    "map": {
        "multilabel": lambda t, **kw: tmc.MultilabelAveragePrecision(
            _outputs(t), average="macro", **kw
        )
    },
    "mae": {"regression": lambda t, **kw: tmr.MeanAbsoluteError(**kw)},
    "rmse": {"regression": lambda t, **kw: tmr.MeanSquaredError(squared=False, **kw)},
    "pearson": {"regression": lambda t, **kw: tmr.PearsonCorrCoef(num_outputs=_outputs(t), **kw)},
    "spearman": {"regression": lambda t, **kw: tmr.SpearmanCorrCoef(num_outputs=_outputs(t), **kw)},
    "acc2": {"regression": lambda t, **kw: _SignAccuracy(**kw)},
    "acc2_f1": {"regression": lambda t, **kw: _SignF1(**kw)},
    "acc7": {"regression": lambda t, **kw: _SevenClassAccuracy(**kw)},
}
"""Metric name -> {task kind: factory}; a name is available for the kinds it lists."""

_EXAMPLE_TASKS = {
    "multiclass": Task("multiclass", ("a", "b", "c")),
    "binary": Task("binary", ("no", "yes")),
    "multilabel": Task("multilabel", ("a", "b")),
    "regression": Task("regression"),
}


def _higher_is_better(name: str) -> bool:
    """torchmetrics' own direction of metric `name`; it leaves Pearson's open (None), which
    is better higher as a score of agreement."""
    kind = next(iter(METRICS[name]))
    return _build(name, _EXAMPLE_TASKS[kind]).higher_is_better is not False


def _build(name: str, task: Task, sync: bool = False) -> torchmetrics.Metric:
    """Metric `name` for `task`. torchmetrics warns that rank metrics (Spearman, AUROC) keep
    every prediction: that is how they are computed over the whole split, so it is no news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all targets and predictions")
        return METRICS[name][task.kind](task, sync_on_compute=sync)


_LOWER_IS_BETTER = {LOSS_NAME} | {name for name in METRICS if not _higher_is_better(name)}
FRACTIONS = frozenset(METRICS) - _LOWER_IS_BETTER - {"pearson", "spearman"}
"""Metrics whose value is a fraction in [0, 1] (shown as a percentage)."""


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of `metric` is better, from its last name part
    (`val/written/mae` -> mae): losses and errors, as torchmetrics declares them."""
    return metric.rsplit("/", 1)[-1] in _LOWER_IS_BETTER


def is_fraction(metric: str) -> bool:
    """Whether `metric` (by its last name part) is a fraction in [0, 1]."""
    return metric.rsplit("/", 1)[-1] in FRACTIONS


def format_score(metric: str, value: float) -> str:
    """A percentage for fractions (accuracy, F1), else four decimals."""
    return f"{value:.2%}" if is_fraction(metric) else f"{value:.4f}"


def _number(name: str, value: object, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if value < low:
        raise ValueError(f"{name}: expected a number >= {low}, got {value!r}")
    return float(value)


def _per_class(name: str, values: object, task: Task, positive: bool) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name}: expected a list with one number per class, got {values!r}")
    if len(values) != len(task.classes):
        raise ValueError(
            f"{name}: expected {len(task.classes)} numbers, one per class {list(task.classes)}, "
            f"got {len(values)}: {list(values)}"
        )
    out = tuple(_number(f"{name}[{i}]", v) for i, v in enumerate(values))
    if positive and not any(out):
        raise ValueError(f"{name}: every weight is 0, so nothing would be learned")
    return out


@dataclass
class TaskSettings:
    """The config of one task's objective (`tasks.<name>` in Hydra): unset values take the
    task kind's defaults. See `Objective` for each setting."""

    loss: str | None = None
    label_smoothing: float | None = None
    class_weights: list[float] | None = None
    pos_weight: Any = None  # one number, or one per label (multilabel)
    huber_delta: float | None = None
    metrics: list[str] | None = None


@dataclass(frozen=True)
class Objective:
    """How one task trains and is scored: its loss and its metrics.

    - `loss`: one of `LOSSES[task.kind]` (None: the kind's default).
    - `label_smoothing` (cross-entropy, in [0, 1)): the target puts that mass uniformly on
      every class (Szegedy et al. 2016; `torch.nn.functional.cross_entropy`).
    - `class_weights` (cross-entropy): one weight per class, scaling each sample's loss.
    - `pos_weight` (binary: one number; multilabel: one number or one per label): the
      weight of positive targets in binary cross-entropy (`BCEWithLogitsLoss`).
    - `huber_delta` (huber): where the loss turns from squared to linear.
    - `metrics`: names from `METRICS` for this kind (None: `DEFAULT_METRICS`; the first is
      the task's main score).

    Raises ValueError naming the setting when it does not fit the task's kind.
    """

    task: Task
    loss: str | None = None
    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None
    pos_weight: float | tuple[float, ...] | None = None
    huber_delta: float = 1.0
    metrics: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        kind = self.task.kind
        losses = LOSSES[kind]
        loss = losses[0] if self.loss is None else self.loss
        if loss not in losses:
            raise ValueError(f"loss: a {kind} task trains with one of {list(losses)}, got {loss!r}")
        object.__setattr__(self, "loss", loss)
        if self.label_smoothing:
            self._only("label_smoothing", loss == "cross_entropy", "cross-entropy")
            smoothing = _number("label_smoothing", self.label_smoothing)
            if smoothing >= 1:
                raise ValueError(f"label_smoothing: expected a number in [0, 1), got {smoothing}")
        if self.class_weights is not None:
            self._only("class_weights", loss == "cross_entropy", "cross-entropy")
            weights = _per_class("class_weights", self.class_weights, self.task, positive=True)
            object.__setattr__(self, "class_weights", weights)
        if self.pos_weight is not None:
            self._only("pos_weight", kind in ("binary", "multilabel"), "binary and multilabel")
            object.__setattr__(self, "pos_weight", self._pos_weight())
        if self.huber_delta != 1.0:
            self._only("huber_delta", loss == "huber", "the huber")
        _number("huber_delta", self.huber_delta)
        if self.huber_delta <= 0:
            raise ValueError(f"huber_delta: expected a number > 0, got {self.huber_delta}")
        object.__setattr__(self, "metrics", self._metric_names())

    def _only(self, setting: str, applies: bool, losses: str) -> None:
        if not applies:
            raise ValueError(
                f"{setting}: applies to {losses} losses; this {self.task.kind} task trains "
                f"with {self.loss}"
            )

    def _pos_weight(self) -> float | tuple[float, ...]:
        value = self.pos_weight
        if self.task.kind == "binary" or isinstance(value, numbers.Real):
            return _number("pos_weight", value)
        return _per_class("pos_weight", value, self.task, positive=False)

    def _metric_names(self) -> tuple[str, ...]:
        kind = self.task.kind
        names = self.metrics if self.metrics is not None else DEFAULT_METRICS[kind]
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ValueError(f"metrics: expected a non-empty list of metric names, got {names!r}")
        available = [n for n, kinds in METRICS.items() if kind in kinds]
        for name in names:
            if name not in available:
                close = difflib.get_close_matches(str(name), available, n=3, cutoff=0.5)
                hint = f"; did you mean {close}?" if close else ""
                raise ValueError(
                    f"metrics: a {kind} task is scored by {available}, got {name!r}{hint}"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"metrics: each metric once, got {list(names)}")
        return tuple(names)

    @property
    def main_metric(self) -> str:
        """The task's main score: its first metric."""
        return self.metrics[0]  # type: ignore[index]  # a tuple after __post_init__

    def build_metrics(self, sync: bool = False) -> dict[str, torchmetrics.Metric]:
        """Fresh torchmetrics objects, one per metric name; with `sync`, `compute()` gathers
        their states from every DDP process."""
        return {name: _build(name, self.task, sync) for name in self.metrics or ()}

    def targets(self, outputs: torch.Tensor, targets: torch.Tensor, where: str) -> torch.Tensor:
        """`targets` shaped and typed for the loss, or ValueError naming `where` (the
        batch key) when they cannot be this task's targets for `outputs`."""
        kind, batch = self.task.kind, outputs.shape[0]
        if kind in ("multiclass", "binary"):
            return targets
        expected = [batch, outputs.shape[1]]
        if kind == "regression" and outputs.shape[1] == 1 and targets.dim() == 1:
            targets = targets[:, None]
        if list(targets.shape) != expected:
            what = "targets per sample" if kind == "regression" else "0/1 values, one per label"
            raise ValueError(
                f"'{where}': a {kind} task with {outputs.shape[1]} outputs takes {what}, shaped "
                f"{expected}; got {list(targets.shape)}"
            )
        if kind == "multilabel" and ((targets != 0) & (targets != 1)).any():
            bad = targets[(targets != 0) & (targets != 1)][:4].tolist()
            raise ValueError(f"'{where}': multilabel targets are 0 or 1, found {bad}")
        targets = targets.to(outputs.dtype)
        if self.task.target_scale:  # the head learns standardized targets
            center, scale = self._standardization(targets)
            targets = (targets - center) / scale
        return targets

    def _standardization(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        center = self.task.target_center or (0.0,) * self.task.num_targets
        return like.new_tensor(center), like.new_tensor(self.task.target_scale)

    def loss_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss summed over the batch (outputs `[B, C or K]`, targets from `targets`)."""
        outputs = outputs.float()
        if self.loss == "cross_entropy":
            weight = self._class_weight(outputs)
            return nn.functional.cross_entropy(
                outputs,
                targets,
                weight=weight,
                reduction="sum" if weight is None else "none",
                label_smoothing=self.label_smoothing,
            ).sum()
        if self.loss == "bce":
            pos = None if self.pos_weight is None else outputs.new_tensor(self.pos_weight)
            per = nn.functional.binary_cross_entropy_with_logits(
                outputs, targets, pos_weight=pos, reduction="none"
            )
        elif self.loss == "mse":
            per = nn.functional.mse_loss(outputs, targets, reduction="none")
        elif self.loss == "l1":
            per = nn.functional.l1_loss(outputs, targets, reduction="none")
        else:
            per = nn.functional.huber_loss(
                outputs, targets, reduction="none", delta=self.huber_delta
            )
        return per.mean(dim=1).sum()

    def _class_weight(self, outputs: torch.Tensor) -> torch.Tensor | None:
        """Class weights, with `pos_weight` as `[1, pos_weight]` for a binary task."""
        if self.class_weights is not None:
            weights = list(self.class_weights)
            if self.pos_weight is not None:
                weights[1] *= self.pos_weight
            return outputs.new_tensor(weights)
        if self.pos_weight is not None:
            return outputs.new_tensor([1.0, self.pos_weight])
        return None

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        """What the metrics take: logits (multiclass), the positive class's probability
        (binary), each label's probability (multilabel), the values (regression; `[B]`
        for one target)."""
        outputs = outputs.float()
        kind = self.task.kind
        if kind == "binary":
            return outputs.softmax(dim=1)[:, 1]
        if kind == "multilabel":
            return outputs.sigmoid()
        if kind == "regression":
            if self.task.target_scale:  # back to the targets' units
                center, scale = self._standardization(outputs)
                outputs = outputs * scale + center
            if outputs.shape[1] == 1:
                return outputs[:, 0]
        return outputs

    def metric_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """The targets the metrics take, from those `targets` made (in the targets' units)."""
        kind = self.task.kind
        if kind == "multilabel":
            return targets.long()
        if kind == "regression":
            if self.task.target_scale:
                center, scale = self._standardization(targets)
                targets = targets * scale + center
            if targets.shape[1] == 1:
                return targets[:, 0]
        return targets


def objectives_for(
    tasks: Mapping[str, Task], settings: Mapping[str, Mapping] | None = None
) -> dict[str, Objective]:
    """One `Objective` per task, from `settings` (`{task name: Objective's keyword
    arguments}`; tasks not named get the defaults). ValueError names an unknown task or
    setting as `tasks.<name>.<setting>: <reason>`."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(tasks))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(tasks), n=3, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(
            f"tasks.{unknown[0]}: the data has no task '{unknown[0]}'; its tasks are "
            f"{list(tasks)}{hint}"
        )
    out = {}
    fields = ("loss", "label_smoothing", "class_weights", "pos_weight", "huber_delta", "metrics")
    for name, task in tasks.items():
        given = dict(settings.get(name) or {})
        extra = sorted(set(given) - set(fields))
        if extra:
            close = difflib.get_close_matches(extra[0], fields, n=3, cutoff=0.5)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"tasks.{name}.{extra[0]}: no such setting; expected {fields}{hint}")
        if given.get("metrics") is None and task.metrics:
            given["metrics"] = task.metrics
        try:
            out[name] = Objective(task, **given)
        except ValueError as err:
            raise ValueError(f"tasks.{name}.{err}") from None
    return out


def main_metric(objectives: Mapping[str, Objective]) -> str:
    """The main score of a model predicting these tasks: the task's own for one task; for
    several, `accuracy` (their mean) when every task computes one, else the loss."""
    if len(objectives) == 1:
        return next(iter(objectives.values())).main_metric
    if all("accuracy" in o.metrics for o in objectives.values()):
        return "accuracy"
    return LOSS_NAME


def metric_names(objectives: Mapping[str, Objective]) -> list[str]:
    """The scores an evaluation computes, without the split prefix: a single task's metrics
    (`accuracy`), or each task's (`written/accuracy`) and, when every task computes an
    accuracy, their mean (`accuracy`)."""
    if len(objectives) == 1:
        return list(next(iter(objectives.values())).metrics)
    names = [f"{t}/{m}" for t, o in objectives.items() for m in o.metrics]
    if main_metric(objectives) == "accuracy":
        names.insert(0, "accuracy")
    return names
