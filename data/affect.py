"""Affect benchmarks in MultiBench's pickles: CMU-MOSI, CMU-MOSEI, UR-FUNNY and MUStARD.

MultiBench (Liang et al., NeurIPS 2021; github.com/pliang279/MultiBench,
`datasets/affect/get_data.py`) distributes each as one pickle (`mosi_raw.pkl`,
`mosei_raw.pkl` or `mosei_senti_data.pkl`, `humor.pkl` for UR-FUNNY, `sarcasm.pkl` for
MUStARD) holding a dict of splits `train`, `valid` and `test`, each a dict of:

- `vision`, `audio`, `text`: float arrays [N, T, D] of features per word-aligned step
  (T = 50 for MOSI/MOSEI; D: vision 35 (FACET) or 713, or 371 (OpenFace) for
  UR-FUNNY/MUStARD; audio 74 (COVAREP) or 81; text 300 (GloVe));
- `labels`: [N, 1, 1] (also read: [N], [N, 1], [N, 1, K] whose first value is the
  sentiment): sentiment in [-3, 3] for MOSI/MOSEI, 0/1 for UR-FUNNY (humor) and MUStARD
  (sarcasm);
- `id`: sample ids (not read).

Sequences are padded with zeros at the front. As MultiBench reads them, samples whose text
is all zeros are dropped, and each sample starts at its first word (`trim`): the steps
before it are padding in all three modalities. Non-finite feature values (MultiBench
replaces -inf in audio) become 0, with a count in the log.

A pickle can name any Python callable to run when it is loaded; these are read with an
allow-list of what MultiBench's files hold (dicts, lists, strings, numbers and numpy
arrays), so a file that names anything else is refused before any of it runs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data import checks
from fusion.data import Modality, MultimodalDataset, Task, file_digest

log = logging.getLogger("fusion")

SPLITS = ("train", "val", "test")
SPLIT_KEYS = {"train": "train", "val": "valid", "test": "test"}
"""Our split names and the pickle's."""
MODALITIES = ("vision", "audio", "text")
TASKS = ("binary", "seven_class", "regression")
ZERO_SENTIMENT = ("negative", "drop")
SENTIMENT_CLASSES = ("negative", "positive")
BINARY_LABEL_CLASSES = ("no", "yes")
"""UR-FUNNY: is the punchline humorous? MUStARD: is the utterance sarcastic?"""
SEVEN_CLASSES = tuple(str(s) for s in range(-3, 4))
FORMAT_VERSION = 1  # bump when what an item holds changes for the same file and settings


@dataclass(frozen=True)
class AffectPart:
    """One split of a pickle: float32 features [N, T, D] per modality, labels [N]."""

    features: dict[str, np.ndarray]
    labels: np.ndarray


@dataclass(frozen=True)
class AffectFile:
    """A whole pickle, checked and cleaned; `binary_labels` when every label is 0/1 or ±1
    (UR-FUNNY, MUStARD) rather than a sentiment score."""

    parts: dict[str, AffectPart]
    binary_labels: bool


def load_affect(path: str | os.PathLike[str]) -> AffectFile:
    """Read a MultiBench affect pickle once per process and file version (all splits
    share it), checking its layout and zeroing non-finite features."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"affect pickle not found at {path.resolve()}; point data.path at MultiBench's "
            "mosi_raw.pkl, mosei_raw.pkl, mosei_senti_data.pkl, humor.pkl or sarcasm.pkl"
        )
    stat = path.stat()
    return _load_affect(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _load_affect(path: str, size: int, mtime_ns: int) -> AffectFile:
    raw = _unpickle(path)
    keys = list(SPLIT_KEYS.values())
    if not isinstance(raw, Mapping) or any(k not in raw for k in keys):
        found = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
        raise ValueError(f"{path} should hold a dict with the splits {keys}; it holds {found}")
    parts = {key: _read_part(raw[key], path, key) for key in keys}
    _check_feature_sizes(parts, path)
    values = np.unique(np.concatenate([p.labels for p in parts.values()]))
    binary = set(values.tolist()) <= {0.0, 1.0} or set(values.tolist()) <= {-1.0, 1.0}
    return AffectFile(parts, binary)


SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("builtins", "bytearray"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Builds only plain containers and numpy arrays: a pickle is data, never code."""

    def __init__(self, handle, path: str, **kwargs) -> None:
        super().__init__(handle, **kwargs)
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(
                f"{self.path} names {module}.{name}, which an affect pickle never holds "
                "(only dicts, lists and numpy arrays): refusing to load it"
            )
        return super().find_class(module, name)


def _unpickle(path: str) -> object:
    """The pickle's object; Python 2 pickles (UR-FUNNY's tools) need latin-1 strings."""
    with open(path, "rb") as handle:
        try:
            return _ArrayUnpickler(handle, path).load()
        except UnicodeDecodeError:
            handle.seek(0)
            return _ArrayUnpickler(handle, path, encoding="latin1").load()


def _read_part(part: object, path: str, key: str) -> AffectPart:
    """One split's features and labels, with matching sample counts."""
    required = [*MODALITIES, "labels"]
    if not isinstance(part, Mapping) or any(k not in part for k in required):
        found = sorted(part) if isinstance(part, Mapping) else type(part).__name__
        raise ValueError(f"{path}: split '{key}' should have the arrays {required}; it has {found}")
    features = {m: _features(part[m], path, key, m) for m in MODALITIES}
    count = len(features["text"])
    for m, array in features.items():
        if len(array) != count:
            raise ValueError(
                f"{path}: split '{key}' has {m} of shape {list(array.shape)} but text of "
                f"shape {list(features['text'].shape)}; every modality needs one row per sample"
            )
    return AffectPart(features, _sentiment(part["labels"], path, key, count))


def _features(value: object, path: str, key: str, modality: str) -> np.ndarray:
    """[N, T, D] float32 with non-finite values set to 0 (and counted in the log)."""
    array = np.asarray(value, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(
            f"{path}: split '{key}' has {modality} of shape {list(array.shape)}; "
            "expected [samples, steps, features]"
        )
    bad = ~np.isfinite(array)
    count = int(bad.sum())
    if count:
        array[bad] = 0.0
        log.info("%s [%s] %s: replaced %d non-finite values with 0", path, key, modality, count)
    return array


def _sentiment(value: object, path: str, key: str, count: int) -> np.ndarray:
    """Labels [N] float64: the first value of each sample's label array."""
    labels = np.asarray(value, dtype=np.float64)
    if labels.ndim == 0 or len(labels) != count or 0 in labels.shape[1:]:
        raise ValueError(
            f"{path}: split '{key}' has labels of shape {list(labels.shape)} for {count} "
            "samples; expected [N], [N, 1] or [N, 1, 1]"
        )
    labels = labels[(slice(None),) + (0,) * (labels.ndim - 1)]
    if not np.isfinite(labels).all():
        raise ValueError(f"{path}: split '{key}' has non-finite labels")
    return labels


def _check_feature_sizes(parts: Mapping[str, AffectPart], path: str) -> None:
    """Each modality has one feature size D across the splits (one encoder serves all)."""
    for m in MODALITIES:
        shapes = {key: p.features[m].shape for key, p in parts.items()}
        if len({shape[2] for shape in shapes.values()}) > 1:
            listed = ", ".join(f"{key} {list(s)}" for key, s in shapes.items())
            raise ValueError(f"{path}: {m} has different feature sizes across splits: {listed}")


def first_words(text: np.ndarray) -> np.ndarray:
    """Each sample's first step with a nonzero word vector (0 when its text is empty)."""
    return np.argmax(np.any(text != 0, axis=2), axis=1)


def sentiment_targets(labels: np.ndarray, task: str) -> list[int] | list[float]:
    """The targets of `task` from sentiment scores (or 0/1, ±1 labels, for `binary`).

    `binary`: 1 when the label is > 0, else 0 (a zero counts as negative, as in
    MultiBench's loader). `seven_class`: the label clipped to [-3, 3] and rounded (to even
    at .5, like numpy and MulT's evaluation), shifted to class indices 0-6 for "-3".."3".
    `regression`: the score itself.
    """
    if task == "binary":
        return [int(v > 0) for v in labels]
    if task == "seven_class":
        return [int(v) + 3 for v in np.round(np.clip(labels, -3.0, 3.0))]
    return [float(v) for v in labels]


AFFECT_METRICS = ("mae", "pearson", "acc2", "acc2_f1", "acc7")
"""Sentiment regression's metrics as MOSI/MOSEI papers report them (MAE first: the main one)."""


class Affect(MultimodalDataset):
    """One split of a MultiBench affect pickle: three feature sequences and a label.

    Items are `{"vision": [T, Dv], "audio": [T, Da], "text": [T, Dt], "label": target}`,
    with T the steps from the first word on when `trim` (so T varies: `collate` pads and
    masks), else the pickle's full T (front padding included, as MultiBench's `max_pad`).
    `task`: `binary` (positive vs. negative sentiment), `seven_class` (the sentiment
    rounded to -3..3) or `regression` (the score). `zero_sentiment`: for `binary`, whether
    a sentiment of exactly 0 counts as `negative` (MultiBench's loader) or is dropped from
    the split (the "non-zero" Acc-2 that MultiBench's `eval_affect` reports by default).

    UR-FUNNY and MUStARD labels are already binary (0/1, or ±1): they are detected (every
    label of the file is 0/1 or ±1), only `task=binary` applies, and the classes are
    ("no", "yes"): humor or sarcasm present. `max_samples` keeps the first samples.
    """

    splits = SPLITS
    deterministic = True

    def __init__(
        self,
        split: str = "train",
        *,
        path: str | os.PathLike[str],
        task: str = "binary",
        zero_sentiment: str = "negative",
        trim: bool = True,
        max_samples: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
        checks.choice("task", task, TASKS)
        checks.choice("zero_sentiment", zero_sentiment, ZERO_SENTIMENT)
        if zero_sentiment == "drop" and task != "binary":
            raise ValueError(
                "data.zero_sentiment: 'drop' applies to task='binary' only; expected "
                f"'negative' with data.task={task}, found 'drop'"
            )
        checks.flag("trim", trim)
        checks.max_samples(max_samples)
        self.split = split
        self.path = Path(path)
        self.task = task
        self.trim = trim
        self.settings = {
            "task": task,
            "zero_sentiment": zero_sentiment,
            "trim": trim,
            "max_samples": max_samples,
        }
        data = load_affect(self.path)
        self.binary_labels = data.binary_labels
        self._check_task(zero_sentiment)
        part = data.parts[SPLIT_KEYS[split]]
        if trim:
            self._check_aligned(part)
        self.rows = self._select(part, zero_sentiment)[:max_samples]
        self.starts = first_words(part.features["text"][self.rows]) if trim else None
        self.targets = sentiment_targets(part.labels[self.rows], task)
        self.shapes = {m: part.features[m].shape[1:] for m in MODALITIES}
        self._data: AffectFile | None = data

    def _check_task(self, zero_sentiment: str) -> None:
        if self.binary_labels and (self.task != "binary" or zero_sentiment == "drop"):
            raise ValueError(
                f"{self.path} has binary labels (0/1 or ±1: UR-FUNNY or MUStARD), so only "
                f"task='binary' with zero_sentiment='negative' applies; got task='{self.task}', "
                f"zero_sentiment='{zero_sentiment}'"
            )

    def _check_aligned(self, part: AffectPart) -> None:
        """Trimming cuts every modality at the first word: they must share their steps."""
        shapes = {m: list(part.features[m].shape) for m in MODALITIES}
        if len({s[1] for s in shapes.values()}) > 1:
            raise ValueError(
                f"{self.path}: split '{SPLIT_KEYS[self.split]}' has vision {shapes['vision']}, "
                f"audio {shapes['audio']} and text {shapes['text']}; trim=true needs "
                "word-aligned modalities with the same number of steps (or set trim=false)"
            )

    def _select(self, part: AffectPart, zero_sentiment: str) -> np.ndarray:
        """Rows with some text (MultiBench drops the others) and, if asked, nonzero labels."""
        keep = np.any(part.features["text"] != 0, axis=(1, 2))
        empty = int((~keep).sum())
        if empty:
            log.info(
                "%s [%s]: dropped %d of %d samples whose text is all zeros",
                self.path,
                SPLIT_KEYS[self.split],
                empty,
                len(keep),
            )
        if zero_sentiment == "drop":
            keep &= part.labels != 0
        return np.flatnonzero(keep)

    @property
    def data(self) -> AffectFile:
        """The loaded pickle, reloaded after unpickling (workers get the path, not the data)."""
        if self._data is None:
            self._data = load_affect(self.path)
        return self._data

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}

    @property
    def modalities(self) -> dict[str, Modality]:
        """Three feature sequences; their length varies (None) when trimmed."""
        return {
            m: Modality(
                "features",
                {"shape": [None if self.trim else steps, dim], "input_dim": dim},
            )
            for m, (steps, dim) in self.shapes.items()
        }

    @property
    def tasks(self) -> dict[str, Task]:
        if self.task == "regression":  # what MOSI/MOSEI papers report (MulT, MultiBench)
            return {self.task: Task("regression", metrics=AFFECT_METRICS)}
        if self.task == "seven_class":
            return {self.task: Task("multiclass", classes=SEVEN_CLASSES)}
        classes = BINARY_LABEL_CLASSES if self.binary_labels else SENTIMENT_CLASSES
        return {self.task: Task("binary", classes=classes)}

    def fingerprint(self) -> str:
        """The pickle's bytes, the split, the settings and the format version."""
        settings = {"split": self.split, **self.settings}
        return json.dumps([FORMAT_VERSION, settings, file_digest(self.path)], sort_keys=True)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, object]:
        row = self.rows[index]
        start = 0 if self.starts is None else int(self.starts[index])
        features = self.data.parts[SPLIT_KEYS[self.split]].features
        item: dict[str, object] = {
            m: torch.from_numpy(features[m][row, start:].copy()) for m in MODALITIES
        }
        item["label"] = self.targets[index]
        return item
