"""Batches as dicts keyed by modality, with a presence mask instead of `None` holes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

TARGET_KEY = "label"
CONDITION_KEY = "condition"
MODALITY_TARGETS_KEY = "modality_targets"
RESERVED_KEYS = (TARGET_KEY, CONDITION_KEY, MODALITY_TARGETS_KEY)


@dataclass
class Batch:
    """One batch: `inputs[m]` is modality m for every sample; `present[m]` says which are real."""

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
        return {k: torch.as_tensor([v[k] for v in values]) for k in keys}
    return torch.as_tensor(values)


def collate(items: Sequence[Mapping[str, object]]) -> Batch:
    """Stack dataset items into a `Batch`.

    A modality that an item lacks (key absent or `None`) becomes zeros in its slot and a
    `False` in `present`, so every tensor in the batch keeps one shape. Text stays a list of
    strings (an empty string where absent): its encoder tokenizes it.
    """
    if not items:
        raise ValueError("collate received an empty list of items")
    modalities = sorted({k for item in items for k in item if k not in RESERVED_KEYS})
    inputs: dict[str, torch.Tensor] = {}
    present: dict[str, torch.Tensor] = {}
    for modality in modalities:
        values = [item.get(modality) for item in items]
        present[modality] = torch.tensor([v is not None for v in values], dtype=torch.bool)
        real = [v for v in values if v is not None]
        if not real:
            raise ValueError(f"modality '{modality}' is missing from every item of the batch")
        if all(isinstance(v, str) for v in real):
            inputs[modality] = [v if v is not None else "" for v in values]
            continue
        real = [torch.as_tensor(v) for v in real]
        shape = real[0].shape
        for i, v in enumerate(values):
            if v is not None and torch.as_tensor(v).shape != shape:
                raise ValueError(
                    f"modality '{modality}': item {i} has shape {tuple(torch.as_tensor(v).shape)}, "
                    f"expected {tuple(shape)} like the first item in the batch"
                )
        filler = torch.zeros_like(real[0])
        inputs[modality] = torch.stack(
            [torch.as_tensor(v) if v is not None else filler for v in values]
        )
    for i, item in enumerate(items):
        if TARGET_KEY not in item:
            raise KeyError(f"item {i} has no '{TARGET_KEY}'; keys are {sorted(item)}")
    targets = _stack_labels(TARGET_KEY, [item[TARGET_KEY] for item in items])
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
