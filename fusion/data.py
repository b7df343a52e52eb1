"""The dataset contract: what a multimodal dataset declares, and what its items are.

Every part of the recipe (loaders, the feature cache, both training stages, evaluation,
reports) reads a dataset through this contract alone, so the built-in AV-Digits, the
manifest dataset (a table of the user's files) and the public-format readers are
interchangeable.

An item is a dict:

- one entry per modality, keyed by its name: a tensor (image `[C, H, W]`, audio `[T]`,
  tabular `[F]`, a feature sequence `[T, D]`), a string (text), or `None` when the sample
  lacks that modality (it becomes a `False` in the batch's presence mask);
- `"label"`: the target of the dataset's one task, or a dict `{task name: target}`;
- optionally `"condition"`: an int routing the sample to one head of a conditional head;
- optionally `"modality_targets"`: `{modality: target}`, the stage-1 target of each
  modality named in `modality_tasks` (when what a modality shows is not the label).

A dataset object is one split and declares:

- `modalities`: `{name: Modality}` in a stable order (the route each input takes);
- `tasks`: `{name: Task}`; one entry means `"label"` is a plain value;
- `splits`: the split names it has, among them `"train"` and `"val"` (the recipe trains on
  the first and selects the best epoch on the second; every split but train is evaluated);
- `deterministic`: whether items are fixed (the same at every access), so frozen
  encoders' features can be cached;
- `fingerprint()`: a string that changes whenever the items would (files' contents,
  settings, seeds, code version), keying every cache built from the data.

Optional: `modality_tasks` (`{modality: (target name, Task)}`: stage 1 trains that
modality's encoder on `item["modality_targets"][modality]` instead of the label; the others
train on the label), `num_conditions`, and, for a split redrawn at every
access (augmented), `fixed_view(v)`: the v-th fixed draw of it, which stage 2 trains on so
that features can be cached (`trainer.fuse.views`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

MODALITY_KINDS = ("image", "audio", "text", "tabular", "features")
TASK_KINDS = ("multiclass", "binary", "multilabel", "regression")
TARGET_KEY = "label"
CONDITION_KEY = "condition"
MODALITY_TARGETS_KEY = "modality_targets"
RESERVED_KEYS = (TARGET_KEY, CONDITION_KEY, MODALITY_TARGETS_KEY)


class DataFileError(ValueError):
    """A sample's file cannot be read; the message names the file and where it is listed
    (a manifest's row and column). Readers raise it, entry points report it without a
    traceback."""


def reader_message(err: DataFileError) -> str:
    """The reader's own message: one re-raised from a DataLoader worker carries the
    worker's traceback, whose last line is that message."""
    return str(err).rpartition(f"{type(err).__name__}: ")[2].strip()


@dataclass(frozen=True)
class Modality:
    """One modality of a dataset: its kind and what an encoder needs to size itself.

    `kind` is one of `MODALITY_KINDS`. `info` holds the facts encoders are configured
    from, under the names of the encoder settings they fill (a `???` in an encoder config
    is taken from here), and `shape`, one item's shape (`None` for a varying length), which
    stands in for the modality when a whole batch lacks it. Per kind:

    - image: `shape` [C, H, W], `in_channels`, `image_size` [H, W], `mean` and `std` [C]
      (of the train split's pixel values, for the encoder's standardization);
    - audio: `shape` [T], `sample_rate` (Hz), `clip_samples` (T);
    - text: nothing (a list of strings; the encoder tokenizes);
    - tabular: `shape` [F], `num_numeric`, `categorical_cardinalities` (numeric columns
      first, then categorical codes as floats), `columns` (their names, in that order);
    - features: `shape` [T or None, D], `input_dim` (D).
    """

    kind: str
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in MODALITY_KINDS:
            raise ValueError(f"modality kind must be one of {MODALITY_KINDS}, got '{self.kind}'")


@dataclass(frozen=True)
class Task:
    """One prediction target: its kind and its classes (names, in label order).

    Multiclass and binary targets are class indices into `classes`; multilabel targets are
    one 0/1 value per class. A `regression` task has `num_targets` numbers per sample and
    no classes; with `target_center` and `target_scale` (one number per target, e.g. the
    train split's mean and standard deviation) the head learns (y - center) / scale, and
    predictions and metrics are in the targets' own units. `metrics` names the metrics the
    field reports for this task (see `fusion.tasks.METRICS`; empty: the kind's defaults).
    """

    kind: str = "multiclass"
    classes: tuple[str, ...] = ()
    num_targets: int = 1
    metrics: tuple[str, ...] = ()
    target_center: tuple[float, ...] = ()
    target_scale: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task kind must be one of {TASK_KINDS}, got '{self.kind}'")
        if self.kind in ("multiclass", "binary", "multilabel") and len(self.classes) < 2:
            raise ValueError(
                f"a {self.kind} task needs at least 2 classes, got {list(self.classes)}"
            )
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        for name in ("target_center", "target_scale"):
            values = tuple(float(v) for v in getattr(self, name))
            if values and (self.kind != "regression" or len(values) != self.num_targets):
                raise ValueError(
                    f"{name}: a regression task's one number per target "
                    f"({self.num_targets}), got {list(values)} for a {self.kind} task"
                )
            if not all(math.isfinite(v) for v in values) or (
                name == "target_scale" and any(v <= 0 for v in values)
            ):
                raise ValueError(
                    f"{name}: expected finite numbers (scales > 0), got {list(values)}"
                )
            object.__setattr__(self, name, values)

    @property
    def num_outputs(self) -> int:
        """The head's output size for this task."""
        return self.num_targets if self.kind == "regression" else len(self.classes)


class MultimodalDataset(Dataset):
    """Base class for one split of a multimodal dataset (see the module docstring).

    Subclasses set `modalities`, `tasks`, `splits` and `split`, implement `__len__` and
    `__getitem__`, and override `fingerprint()` with what determines their items (the
    default hashes every item, which reads the whole split once).
    """

    modalities: Mapping[str, Modality]
    tasks: Mapping[str, Task]
    splits: Sequence[str] = ("train", "val", "test")
    split: str
    deterministic: bool = True
    modality_tasks: Mapping[str, tuple[str, Task]] = {}
    num_conditions: int | None = None

    def fingerprint(self) -> str:
        return item_digest(self)

    @property
    def num_classes(self) -> int | dict[str, int]:
        return output_sizes(self.tasks)


def output_sizes(tasks: Mapping[str, Task]) -> int | dict[str, int]:
    """A head's output size: one int for a single task, else one per task name."""
    if len(tasks) == 1:
        return next(iter(tasks.values())).num_outputs
    return {name: task.num_outputs for name, task in tasks.items()}


def check_dataset(dataset: Any, where: str = "dataset") -> None:
    """Raise a `TypeError` naming every part of the contract `dataset` lacks or gets wrong."""
    problems = []
    for name in ("modalities", "tasks", "splits", "split", "deterministic", "fingerprint"):
        if not hasattr(dataset, name):
            problems.append(f"no '{name}'")
    if not problems:
        if not dataset.modalities or not all(
            isinstance(m, Modality) for m in dataset.modalities.values()
        ):
            problems.append("'modalities' must map each name to a fusion.data.Modality")
        if not dataset.tasks or not all(isinstance(t, Task) for t in dataset.tasks.values()):
            problems.append("'tasks' must map each name to a fusion.data.Task")
        missing = [s for s in ("train", "val") if s not in dataset.splits]
        if missing:
            problems.append(f"'splits' {list(dataset.splits)} lacks {missing}")
        clash = sorted(set(dataset.modalities) & set(RESERVED_KEYS))
        if clash:
            problems.append(f"modality names {clash} are reserved item keys")
        unknown = sorted(set(getattr(dataset, "modality_tasks", {})) - set(dataset.modalities))
        if unknown:
            problems.append(f"'modality_tasks' names modalities {unknown} it does not have")
    if problems:
        raise TypeError(
            f"{where} ({type(dataset).__name__}) does not follow the dataset contract "
            f"(fusion/data.py): {'; '.join(problems)}"
        )


def _update(digest: Any, value: Any) -> None:
    """Feed a nested value (tensors, arrays, strings, numbers, dicts, lists) to `digest`."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        digest.update(f"tensor{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        digest.update(f"array{value.dtype}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            digest.update(f"key{key!r}".encode())
            _update(digest, value[key])
    elif isinstance(value, list | tuple):
        digest.update(f"seq{len(value)}".encode())
        for item in value:
            _update(digest, item)
    else:
        digest.update(repr(value).encode())


def fingerprint(*values: Any) -> str:
    """A short stable hash of nested values: tensors and arrays hash by content, not identity.
    Every cache key (stage-1 encoders, features) is made with it."""
    digest = hashlib.sha256()
    for value in values:
        _update(digest, value)
    return digest.hexdigest()[:20]


def item_digest(dataset: Any) -> str:
    """A hash of every item: for a dataset that cannot say what determines its content.
    It reads the raw data once (cheap next to encoding it)."""
    digest = hashlib.sha256()
    for index in range(len(dataset)):
        _update(digest, dataset[index])
    return digest.hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes: caches are keyed on what a file holds, not its name.

    Memoized per process by (path, size, modification time), so asking again is free.
    """
    stat = os.stat(path)
    return _file_digest(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _file_digest(path: str, size: int, mtime_ns: int, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
