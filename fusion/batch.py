"""Batches as dicts keyed by modality, with presence masks instead of `None` holes.

`collate` stacks dataset items (see `fusion.data`) into a `Batch`:

- a tensor modality whose items share a shape is stacked, with a `[B]` mask;
- a sequence modality whose items differ only in their first dimension (feature sequences
  `[T, D]`, waveforms `[T]` of varying length) is zero-padded to the longest, with a
  `[B, T]` mask that is `True` at real positions. Which modalities are sequences: those
  declared so (`padded=`, or the dataset's kinds `audio` and `features` through
  `Collate.for_dataset`), and, when nothing is declared, items of two or more dimensions
  (`[T, D]`). One-dimensional items are vectors (a table row) unless declared: a row of
  another length is refused, never padded as if it were a sequence;
- text stays a list of strings (`""` where absent);
- a missing modality (`None` or no key) is a zero placeholder with `present` `False`,
  even when every item of the batch lacks it (its shape then comes from the dataset's
  `Modality.info["shape"]`, or one of the split's items when built by `Collate.for_dataset`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fusion.data import (
    CONDITION_KEY,
    MODALITY_TARGETS_KEY,
    RESERVED_KEYS,
    TARGET_KEY,
    Modality,
    Task,
)


@dataclass
class Batch:
    """One batch: `inputs[m]` is modality m for every sample; `present[m]` says which are real
    (`[B]`, or `[B, T]` for padded sequences)."""

    inputs: dict[str, torch.Tensor | list[str]]
    present: dict[str, torch.Tensor]
    targets: torch.Tensor | dict[str, torch.Tensor]
    condition: torch.Tensor | None = None
    modality_targets: dict[str, torch.Tensor] | None = None
    encoded: frozenset[str] = frozenset()
    """Modalities whose `inputs` are already their encoder's features (a feature cache)."""

    def __len__(self) -> int:
        return len(next(iter(self.present.values())))

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            inputs={
                m: x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x
                for m, x in self.inputs.items()
            },
            present={m: p.to(device, non_blocking=True) for m, p in self.present.items()},
            targets=_to(self.targets, device),
            condition=None if self.condition is None else self.condition.to(device),
            modality_targets=_to(self.modality_targets, device),
            encoded=self.encoded,
        )


def _to(value, device):
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: v.to(device, non_blocking=True) for k, v in value.items()}
    return value.to(device, non_blocking=True)


def _stack_labels(name: str, values: list) -> torch.Tensor | dict[str, torch.Tensor]:
    """Labels as one tensor, or a dict of tensors when each item's label is a dict."""
    if isinstance(values[0], Mapping):
        keys = list(values[0])
        for i, v in enumerate(values):
            if not isinstance(v, Mapping) or list(v) != keys:
                raise ValueError(f"item {i}: '{name}' should have the keys {keys}, got {v}")
        return {k: _stack_numbers(f"{name}.{k}", [v[k] for v in values]) for k in keys}
    return _stack_numbers(name, values)


def _stack_numbers(name: str, values: list) -> torch.Tensor:
    """Labels (class indices, or numbers for a regression) as one tensor; an item whose
    label is no number, not the kind of the others, not finite, or a negative integer (no
    class index) is named."""
    if values and all(isinstance(v, torch.Tensor) for v in values):
        shapes = [list(v.shape) for v in values]
        odd = next((i for i, shape in enumerate(shapes) if shape != shapes[0]), None)
        if odd is not None:
            raise ValueError(
                f"item {odd}: '{name}' is a tensor of shape {shapes[odd]}, item 0's of shape "
                f"{shapes[0]}; every item's '{name}' needs one shape"
            )
        stacked = torch.stack(values)
    else:
        try:
            stacked = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError):
            stacked = None
    if stacked is not None:
        bad = (
            (~torch.isfinite(stacked)).nonzero()
            if stacked.is_floating_point()
            else (stacked < 0).nonzero()
            if stacked.dtype != torch.bool
            else []
        )
        if len(bad):
            i = int(bad[0, 0])
            expected = "a finite number" if stacked.is_floating_point() else "a class index >= 0"
            raise ValueError(f"item {i}: '{name}' is {values[i]!r}; expected {expected}")
        return stacked
    kinds = [type(v).__name__ for v in values]
    for i, v in enumerate(values):
        if not isinstance(v, (int, float, bool, torch.Tensor)):
            raise ValueError(
                f"item {i}: '{name}' is {kinds[i]} {v!r}; expected a number: labels are class "
                "indices (or numbers)"
            )
        if kinds[i] != kinds[0]:
            raise ValueError(
                f"item {i}: '{name}' is {kinds[i]} {v!r}; expected a number like item 0's "
                f"({kinds[0]} {values[0]!r}): labels are class indices (or numbers)"
            )
    raise ValueError(f"'{name}': the items' values {values[:8]} do not stack into one tensor")


PADDED_KINDS = ("audio", "features")
"""Modality kinds (`fusion.data.MODALITY_KINDS`) whose items are sequences of varying length
along their first dimension, padded by `collate`: waveforms `[T]`, feature sequences `[T, D]`.
Images and table rows of different sizes are refused instead."""


def _stack_modality(
    modality: str,
    values: list[Any],
    placeholder: torch.Tensor | str | None,
    sequence: bool | None = None,
    kind: str | None = None,
) -> tuple[torch.Tensor | list[str], torch.Tensor]:
    """One modality's inputs and presence mask, padded along the first dimension if needed.

    `sequence`: True when the modality is declared a sequence (padded), False when declared
    something else (never padded), None when undeclared (items of 2+ dimensions are padded,
    one-dimensional ones are vectors)."""
    present = torch.tensor([v is not None for v in values], dtype=torch.bool)
    real = [(i, v) for i, v in enumerate(values) if v is not None]
    if not real:
        if isinstance(placeholder, str):
            return [placeholder] * len(values), present
        if placeholder is None:
            raise ValueError(
                f"modality '{modality}' is missing from every item of the batch and its shape "
                "is unknown: declare it in the dataset's Modality info as 'shape'"
            )
        return placeholder.expand(len(values), *placeholder.shape).clone(), present
    if all(isinstance(v, str) for _, v in real):
        return [v if v is not None else "" for v in values], present
    tensors = _as_tensors(modality, real)
    first_index, first = next(iter(tensors.items()))
    ragged = False
    for i, t in tensors.items():
        if t.shape == first.shape:
            continue
        if t.dim() == first.dim() >= 1 and t.shape[1:] == first.shape[1:]:
            if sequence is False or (sequence is None and t.dim() == 1):
                raise ValueError(_not_a_sequence(modality, kind, i, t, first_index, first))
            ragged = True
            continue
        raise ValueError(
            f"modality '{modality}': item {i} has shape {tuple(t.shape)}, item {first_index} "
            f"has {tuple(first.shape)}; items can differ only in their first (length) "
            "dimension, which is padded"
        )
    if not ragged:
        filler = torch.zeros_like(first)
        return torch.stack([tensors.get(i, filler) for i in range(len(values))]), present
    length = max(t.shape[0] for t in tensors.values())
    out = first.new_zeros(len(values), length, *first.shape[1:])
    mask = torch.zeros(len(values), length, dtype=torch.bool)
    for i, t in tensors.items():
        out[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return out, mask


def _not_a_sequence(
    modality: str, kind: str | None, i: int, item: torch.Tensor, j: int, first: torch.Tensor
) -> str:
    """Why items of different lengths of a modality that is no sequence are refused."""
    if item.dim() == 1:
        sizes = f"item {i} has {len(item)} values, item {j} has {len(first)}"
    else:
        sizes = f"item {i} has shape {tuple(item.shape)}, item {j} has {tuple(first.shape)}"
    if kind is not None:
        return (
            f"modality '{modality}' ({kind}): {sizes}; every item of a {kind} modality has "
            f"one shape (only {' and '.join(PADDED_KINDS)} modalities are padded to the longest)"
        )
    return (
        f"modality '{modality}': {sizes}; one-dimensional items are vectors (a table row), "
        "which are never padded: give every item the same size, or declare the modality a "
        f"sequence to pad it (Collate(padded=['{modality}']), or kind 'audio' or 'features' "
        "in the dataset's modalities with Collate.for_dataset)"
    )


def _as_tensors(modality: str, real: list[tuple[int, Any]]) -> dict[int, torch.Tensor]:
    """Each item's value as a tensor, one dtype for all: stacking would otherwise promote
    float32 items to float64 (or cast floats into an int batch) without a word."""
    tensors = {}
    for i, value in real:
        if isinstance(value, str):
            other, kind = next((j, type(v).__name__) for j, v in real if not isinstance(v, str))
            raise ValueError(
                f"modality '{modality}': item {i} is text (str), item {other} is a {kind}; a "
                "modality is text in every item or in none"
            )
        try:
            tensors[i] = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"modality '{modality}': item {i} is a {type(value).__name__}, expected a "
                f"tensor, a numpy array or a list of numbers ({err})"
            ) from None
    first_index, first = next(iter(tensors.items()))
    for i, tensor in tensors.items():
        if tensor.dtype != first.dtype:
            raise ValueError(
                f"modality '{modality}': item {i} is {tensor.dtype}, item {first_index} is "
                f"{first.dtype}; every item of a modality needs the same dtype"
            )
    return tensors


class Collate:
    """The DataLoader `collate_fn` for dataset items; see the module docstring.

    `placeholders[m]` stands in for modality m when no item of a batch has it: a tensor of
    one item's shape, or `""` for text.
    """

    def __init__(
        self,
        placeholders: Mapping[str, torch.Tensor | str] | None = None,
        tasks: Mapping[str, Task] | None = None,
        *,
        kinds: Mapping[str, str] | None = None,
        padded: Iterable[str] | None = None,
    ) -> None:
        """`tasks` (the dataset's): labels of classification tasks are checked to be class
        indices of those tasks, so a float or out-of-range label is named, not trained on.

        `kinds` (modality -> the dataset's kind) and `padded` (modality names) declare which
        modalities are sequences, padded to the longest item of a batch: those in `padded`
        and those of a kind in `PADDED_KINDS`. A declared modality that is no sequence is
        never padded; an undeclared one is padded when its items have two or more
        dimensions (`[T, D]`), never when they have one (see the module docstring).
        """
        self.placeholders = dict(placeholders or {})
        self.tasks = dict(tasks or {})
        if isinstance(padded, str):
            raise TypeError(f"padded must be a list of modality names, got str {padded!r}")
        self.kinds = dict(kinds or {})
        self.padded = set(padded or ()) | {m for m, k in self.kinds.items() if k in PADDED_KINDS}

    def is_sequence(self, modality: str) -> bool | None:
        """Whether `modality` is declared a sequence (True), declared something else
        (False), or undeclared (None)."""
        if modality in self.padded:
            return True
        return False if modality in self.kinds else None

    @classmethod
    def for_dataset(cls, dataset: Any) -> Collate:
        """A collate that knows each declared modality's placeholder: its declared shape
        (`Modality.info["shape"]`, a variable length as 1), else zeros like the first item
        of the split that has it."""
        modalities: Mapping[str, Modality] = getattr(dataset, "modalities", {}) or {}
        placeholders: dict[str, torch.Tensor | str] = {}
        for name, modality in modalities.items():
            if modality.kind == "text":
                placeholders[name] = ""
            elif "shape" in modality.info:
                shape = [1 if d is None else int(d) for d in modality.info["shape"]]
                placeholders[name] = torch.zeros(shape)
        unknown = [m for m in modalities if m not in placeholders]
        for index in range(len(dataset)) if unknown else ():
            item = dataset[index]
            for m in list(unknown):
                if item.get(m) is not None:
                    placeholders[m] = torch.zeros_like(torch.as_tensor(item[m]))
                    unknown.remove(m)
            if not unknown:
                break
        kinds = {name: modality.kind for name, modality in modalities.items()}
        return cls(placeholders, getattr(dataset, "tasks", None), kinds=kinds)

    def __call__(self, items: Sequence[Mapping[str, object]]) -> Batch:
        if not items:
            raise ValueError("collate received an empty list of items")
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise TypeError(
                    f"item {i} is a {type(item).__name__}, expected a dict of modality name -> "
                    "value (see fusion.data)"
                )
        modalities = sorted(
            {k for item in items for k in item if k not in RESERVED_KEYS} | set(self.placeholders)
        )
        inputs: dict[str, torch.Tensor | list[str]] = {}
        present: dict[str, torch.Tensor] = {}
        for modality in modalities:
            values = [item.get(modality) for item in items]
            inputs[modality], present[modality] = _stack_modality(
                modality,
                values,
                self.placeholders.get(modality),
                self.is_sequence(modality),
                self.kinds.get(modality),
            )
        empty = [i for i in range(len(items)) if not any(p[i].any() for p in present.values())]
        if empty:
            raise ValueError(
                f"item {empty[0]} has no modality: each of {modalities} is missing (None or "
                "no key); a sample needs at least one input"
            )
        for i, item in enumerate(items):
            if TARGET_KEY not in item:
                raise KeyError(f"item {i} has no '{TARGET_KEY}'; keys are {sorted(item)}")
        targets = _stack_labels(TARGET_KEY, [item[TARGET_KEY] for item in items])
        check_class_indices(targets, self.tasks)
        condition = None
        if any(CONDITION_KEY in item for item in items):
            missing = [i for i, item in enumerate(items) if CONDITION_KEY not in item]
            if missing:
                raise KeyError(f"items {missing} have no '{CONDITION_KEY}' while others do")
            condition = torch.as_tensor([item[CONDITION_KEY] for item in items])
        modality_targets = None
        if MODALITY_TARGETS_KEY in items[0]:
            modality_targets = _stack_labels(
                MODALITY_TARGETS_KEY, [item[MODALITY_TARGETS_KEY] for item in items]
            )
        return Batch(inputs, present, targets, condition, modality_targets)


def check_class_indices(
    targets: torch.Tensor | dict[str, torch.Tensor], tasks: Mapping[str, Task]
) -> None:
    """Each classification task's labels are integer class indices in [0, classes): a float
    label would be read as class probabilities and a negative one ignored or out of range."""
    if isinstance(targets, dict):
        labels = {f"{TARGET_KEY}.{name}": (name, value) for name, value in targets.items()}
    elif len(tasks) == 1:
        labels = {TARGET_KEY: (next(iter(tasks)), targets)}
    else:
        return
    for where, (name, values) in labels.items():
        task = tasks.get(name)
        if task is None or task.kind not in ("multiclass", "binary"):
            continue
        if values.is_floating_point() or values.dtype == torch.bool:
            raise ValueError(
                f"'{where}': task '{name}' ({task.kind}) takes class indices, found {values.dtype} "
                f"labels {values[:4].tolist()}"
            )
        outside = ((values < 0) | (values >= len(task.classes))).nonzero()
        if len(outside):
            i = int(outside[0, 0])
            raise ValueError(
                f"item {i}: '{where}' is {values[i].tolist()}; task '{name}' has "
                f"{len(task.classes)} classes, so a label is an index in [0, {len(task.classes) - 1}]"
            )


collate = Collate()
"""Collate items whose modalities each appear in at least one item of every batch; nothing
is declared, so `[T, D]` items of different lengths are padded and one-dimensional ones must
share their size (use `Collate(padded=[...])` or `Collate.for_dataset` for waveforms)."""
