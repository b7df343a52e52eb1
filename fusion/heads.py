"""Heads: turn the fused vector into predictions.

Every head is called as `head(fused, condition=None)`. Plain and mixture-of-experts heads
ignore `condition`; the conditional head needs it; the multi-task head returns a dict of
logits keyed by task, which the trainer matches to the batch's labels by name.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fusion.checks import dropout_rate, positive_int

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
Dropout = float | Sequence[float]
"""One rate for every hidden layer, or a list with one rate per hidden layer."""


def layer_sizes(widths: object, name: str) -> list[int]:
    """Hidden-layer sizes as a list of positive ints (`hidden: 256` is not a list)."""
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise ValueError(f"{name} must be a list of layer sizes, e.g. [256], got {widths!r}")
    return [positive_int(f"every size in {name}", size) for size in widths]


def dropout_per_layer(dropout: Dropout, count: int, layers: str) -> list[float]:
    """`count` dropout rates: one rate repeated, or a list that must have one per layer."""
    if isinstance(dropout, (str, bytes)) or not isinstance(dropout, Sequence):
        return [dropout_rate(dropout)] * count
    if len(dropout) != count:
        raise ValueError(
            f"dropout has {len(dropout)} rates {list(dropout)}, but {layers} has {count} layer(s): "
            "give one rate per layer, or one number for all"
        )
    return [dropout_rate(p, f"dropout[{i}]") for i, p in enumerate(dropout)]


def _mlp_layers(
    in_dim: int, widths: Sequence[int], activation: str, dropout: Dropout, name: str
) -> tuple[list[nn.Module], int]:
    """Linear -> activation -> dropout per width, and the width it ends on.

    Shared by every head so that they all check their arguments the same way.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got '{activation}'")
    sizes = layer_sizes(widths, name)
    rates = dropout_per_layer(dropout, len(sizes), name)
    layers: list[nn.Module] = []
    width = positive_int("in_dim", in_dim)
    for size, rate in zip(sizes, rates, strict=True):
        layers += [nn.Linear(width, size), ACTIVATIONS[activation](), nn.Dropout(rate)]
        width = size
    return layers, width


class ClassificationHead(nn.Module):
    """An MLP from the fused vector to `num_classes` logits (or regression outputs).

    `dropout` follows each hidden layer: one rate for all, or a list of one per layer.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        dropout: Dropout = 0.0,
    ) -> None:
        super().__init__()
        num_classes = positive_int("num_classes", num_classes)
        layers, width = _mlp_layers(in_dim, hidden, activation, dropout, "hidden")
        layers.append(nn.Linear(width, num_classes))
        self.mlp = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.num_classes = num_classes

    def forward(self, fused: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        check_fused(fused, self.in_dim)
        return self.mlp(fused)


class MultiTaskHead(nn.Module):
    """An optional shared trunk, then one classification branch per task.

    Tasks that share a trunk share what they learn about the fused vector, while each keeps
    its own output layer. A list `dropout` gives one rate per layer, the trunk's (`shared`)
    first, then each branch's (`hidden`). `loss_weights` lives here, next to the tasks it weights, so the
    trainer can read one place; tasks it does not name weigh 1.0.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: Mapping[str, int],
        hidden: Sequence[int] = (),
        activation: str = "relu",
        dropout: Dropout = 0.0,
        shared: Sequence[int] = (),
        loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, Mapping) or not num_classes:
            raise ValueError(
                "num_classes must map each task name to its number of classes, e.g. "
                f"{{'digit': 10, 'speaker': 4}}, got {num_classes!r}"
            )
        bad_names = [t for t in num_classes if not isinstance(t, str) or not t or "." in t]
        if bad_names:
            raise ValueError(
                f"task names in num_classes must be non-empty strings without '.', got {bad_names}"
            )
        shared, hidden = layer_sizes(shared, "shared"), layer_sizes(hidden, "hidden")
        rates = dropout_per_layer(dropout, len(shared) + len(hidden), "shared + hidden")
        layers, width = _mlp_layers(in_dim, shared, activation, rates[: len(shared)], "shared")
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict(
            {
                task: ClassificationHead(width, classes, hidden, activation, rates[len(shared) :])
                for task, classes in num_classes.items()
            }
        )
        self.tasks = list(num_classes)
        self.in_dim = in_dim
        self.num_classes = {task: head.num_classes for task, head in self.heads.items()}
        self.loss_weights = self._loss_weights(loss_weights or {})

    def _loss_weights(self, given: Mapping[str, float]) -> dict[str, float]:
        unknown = sorted(set(given) - set(self.tasks))
        if unknown:
            raise ValueError(
                f"loss_weights names unknown tasks {unknown}; the tasks are {self.tasks}"
            )
        negative = {t: w for t, w in given.items() if not _finite_number(w) or w < 0}
        if negative:
            raise ValueError(f"loss_weights must be non-negative numbers, got {negative}")
        return {task: float(given.get(task, 1.0)) for task in self.tasks}

    def forward(
        self, fused: torch.Tensor, condition: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        check_fused(fused, self.in_dim)
        shared = self.trunk(fused)
        return {task: self.heads[task](shared) for task in self.tasks}


class ConditionalHead(nn.Module):
    """One classification head per condition value; each sample goes through its condition's.

    Use it when the same label space is read differently under known conditions (recording
    site, device, subject group). `num_classes` is a single int: every condition predicts
    the same classes, so the outputs stack into one tensor [B, num_classes]. For different
    label spaces use MultiTaskHead. Every condition's head has the same layers (`hidden`,
    `activation`, `dropout`) unless `per_condition` gives, for each condition id in order, a
    mapping that overrides some of them, e.g. `[{}, {"hidden": [64, 64], "dropout": 0.3}]`.

    The batch is grouped by condition and each head runs once on its group, so the cost is
    that of one head on the batch. Every head takes part in every forward pass (on an empty
    group if its condition is absent), so all parameters always receive a gradient (zeros
    for an absent condition) and DDP needs no `find_unused_parameters`. Grouping reads the
    group sizes on the host: one device sync per call.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        num_conditions: int,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        dropout: Dropout = 0.0,
        per_condition: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, Mapping):
            raise ValueError(
                "ConditionalHead takes num_classes as one int shared by every condition, got a "
                "mapping; use MultiTaskHead for one set of classes per task"
            )
        self.num_conditions = positive_int("num_conditions", num_conditions)
        shared = {"hidden": hidden, "activation": activation, "dropout": dropout}
        specs = self._head_specs(per_condition, shared)
        self.heads = nn.ModuleList(self._head(i, in_dim, num_classes, spec) for i, spec in specs)
        self.in_dim = in_dim
        self.num_classes = self.heads[0].num_classes

    def _head_specs(
        self, per_condition: Sequence[Mapping[str, Any]] | None, shared: dict[str, Any]
    ) -> list[tuple[int, dict[str, Any]]]:
        """Each condition's head arguments: the shared ones, overridden by its own spec."""
        if per_condition is None:
            return [(i, shared) for i in range(self.num_conditions)]
        if isinstance(per_condition, (str, Mapping)) or not isinstance(per_condition, Sequence):
            raise ValueError(
                f"per_condition must be a list of {self.num_conditions} mappings (one per "
                f"condition id), got {per_condition!r}"
            )
        if len(per_condition) != self.num_conditions:
            raise ValueError(
                f"per_condition has {len(per_condition)} head specs, but num_conditions is "
                f"{self.num_conditions}: give one per condition id"
            )
        specs = []
        for i, spec in enumerate(per_condition):
            if not isinstance(spec, Mapping):
                raise ValueError(
                    f"per_condition[{i}] must be a mapping of head arguments {sorted(shared)}, "
                    f"got {spec!r}"
                )
            unknown = sorted(set(spec) - set(shared))
            if unknown:
                raise ValueError(
                    f"per_condition[{i}] has unknown keys {unknown}; expected some of "
                    f"{sorted(shared)}"
                )
            specs.append((i, {**shared, **spec}))
        return specs

    @staticmethod
    def _head(index: int, in_dim: int, num_classes: int, spec: dict[str, Any]) -> nn.Module:
        """One condition's head; a bad argument names the condition it belongs to."""
        try:
            return ClassificationHead(in_dim, num_classes, **spec)
        except ValueError as err:
            raise ValueError(f"condition {index}'s head: {err}") from None

    def check_condition(self, fused: torch.Tensor, condition: torch.Tensor | None) -> None:
        """Fail with the offending values before they index the wrong head or crash a gather."""
        if condition is None:
            raise ValueError(
                "ConditionalHead needs a condition: a LongTensor [batch] of condition ids in "
                f"[0, {self.num_conditions}), one per sample"
            )
        check_fused(fused, self.in_dim)
        if condition.shape != (fused.shape[0],):
            raise ValueError(
                f"condition must have shape [{fused.shape[0]}] (one id per sample), "
                f"got {list(condition.shape)}"
            )
        if condition.dtype == torch.bool or condition.is_floating_point() or condition.is_complex():
            raise ValueError(f"condition must hold integer ids, got dtype {condition.dtype}")
        outside = (condition < 0) | (condition >= self.num_conditions)
        if outside.any():
            values = sorted(set(condition[outside].tolist()))
            raise ValueError(
                f"condition values {values} are outside [0, {self.num_conditions}): this head "
                f"has {self.num_conditions} heads (num_conditions={self.num_conditions})"
            )

    def forward(self, fused: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        self.check_condition(fused, condition)
        condition = condition.to(device=fused.device, dtype=torch.long)
        order = torch.argsort(condition, stable=True)
        sizes = torch.bincount(condition, minlength=self.num_conditions).tolist()
        groups = fused.index_select(0, order).split(sizes)
        grouped = torch.cat(
            [head(group) for head, group in zip(self.heads, groups, strict=True)], dim=0
        )
        return torch.empty_like(grouped).index_copy(0, order, grouped)


class MixtureOfExpertsHead(nn.Module):
    """Soft mixture of experts: a gate over the fused vector weights each expert's logits.

    Each expert is a ClassificationHead; the gate is one linear layer followed by a softmax
    at `temperature` (below 1 sharpens the choice of expert, above 1 evens it out). Every
    expert runs on every sample, so all of them train from the first step. The last gate
    weights are kept, detached, in `last_gate` [B, num_experts] to see which expert handles
    which samples.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        num_experts: int = 4,
        hidden: Sequence[int] = (128,),
        activation: str = "relu",
        dropout: Dropout = 0.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        num_experts = positive_int("num_experts", num_experts)
        if not _finite_number(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.experts = nn.ModuleList(
            ClassificationHead(in_dim, num_classes, hidden, activation, dropout)
            for _ in range(num_experts)
        )
        self.gate = nn.Linear(in_dim, num_experts)
        self.temperature = float(temperature)
        self.in_dim = in_dim
        self.num_classes = self.experts[0].num_classes
        self.last_gate: torch.Tensor | None = None

    def forward(self, fused: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        check_fused(fused, self.in_dim)
        gate = torch.softmax(self.gate(fused) / self.temperature, dim=-1)  # [B, E]
        logits = torch.stack([expert(fused) for expert in self.experts], dim=-2)  # [B, E, K]
        self.last_gate = gate.detach()
        return (gate.unsqueeze(-1) * logits).sum(dim=-2)


def check_fused(fused: torch.Tensor, in_dim: int) -> None:
    """A head takes the fused features [batch, in_dim]; anything else is named here, not
    as a matrix-multiply error inside its first layer."""
    if fused.dim() != 2 or fused.shape[1] != in_dim:
        raise ValueError(f"fused must be [batch, {in_dim}], got {list(fused.shape)}")


def _finite_number(value: object) -> bool:
    """A real, finite number (bools and strings from a config are not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
