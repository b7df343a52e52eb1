"""The manifest dataset: bring a table of your files and values, get a fused model.

A manifest is a CSV (or TSV), JSONL or Parquet file with one row per sample. Its columns
become modalities: each image column, each audio column and each text column is a
modality named after it, and all numeric and categorical columns together form one
modality, `tabular`. Column kinds are inferred from the values (file extensions, dtypes,
how many distinct values) and can be overridden, as AutoGluon's `MultiModalPredictor` does
with a DataFrame. Paths in cells are relative to the manifest's folder (absolute ones are
taken as they are).

Everything the splits share (the table, the column kinds, the classes, the split of each
row and the train statistics that size the encoders) is computed once per process and
manifest version, so building train, val and test costs one read. Files are decoded item
by item, when an item is asked for.

Row numbers in messages count data rows from 1: the header does not count, so data row 1
is the first row under a CSV's header (row 2 in a spreadsheet), the first line of a JSONL
file and the first row of a Parquet file.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import copy
import csv
import dataclasses
import difflib
import functools
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile
import torch
import torchaudio.functional
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as tvf

from data import checks
from fusion.data import (
    RESERVED_KEYS,
    DataFileError,
    Modality,
    MultimodalDataset,
    Task,
    file_digest,
)

log = logging.getLogger("fusion")

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
COLUMN_KINDS = ("image", "audio", "text", "numeric", "categorical", "ignore")
FILE_KINDS = ("image", "audio")
TABULAR = "tabular"
TABULAR_KINDS = ("numeric", "categorical")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff")
PILLOW_EXTENSIONS = (".bmp", ".tif", ".tiff")  # torchvision.io decodes the others
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".au") + (
    (".mp3",) if "MP3" in soundfile.available_formats() else ()
)
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # Pillow modes of one-channel images
DECIMAL_COMMA = re.compile(r"[+-]?\d+,\d+")  # '3,45': a number in a comma-decimal locale
ID_NAMES = ("id", "uid", "uuid", "key", "index", "idx", "unnamed: 0")
CATEGORICAL_MAX_VALUES = 50  # more distinct strings than this make a text column
CATEGORICAL_MAX_CHARS = 40  # and so does any value longer than this
REGRESSION_MIN_VALUES = 20  # a float target with more distinct fractional values is refused
TARGET_KINDS = ("auto", "multiclass", "binary", "multilabel", "regression")
CLASSES = ("multiclass", "binary")  # kinds whose target is one class per row
DEFAULT_SEPARATOR = "|"  # joins the labels of a multilabel cell
REGRESSION_STRATA = 10  # a regression target's split is stratified over this many quantiles
IMAGE_STATS_SAMPLES = 500
DECODE_THREADS = 8  # files decoded at once by the file check
LONG_CLIP_RATIO = 4  # a train clip this many times the median one is said
SHORT_CLIP_RATIO = 4  # and so is one this many times shorter than the median
UNSEEN_SHARE = 0.5  # a split's share of rows whose category train lacks that is said
MISSING_NUMBER_WORDS = ("na", "n/a", "nan", "null", "none")  # a numeric cell spelled missing
MAJORITY = 0.8  # this share of a column's cells being numbers (or image, audio paths) decides
AUDIO_CROPS = ("start", "center")
READER_VERSION = 1  # bump when the items change for the same files and settings


@dataclass(frozen=True)
class ManifestSettings:
    """The settings that shape every split; hashable, as they key the per-process memo."""

    target: str
    columns: tuple[tuple[str, str], ...]
    split_column: str | None
    fractions: tuple[float, ...]
    seed: int
    image_size: tuple[int, int] | None
    image_channels: int | None
    audio_sample_rate: int
    audio_seconds: float | None
    audio_crop: str
    check_files: bool
    target_kind: str = "auto"
    label_separator: str = DEFAULT_SEPARATOR
    standardize_target: bool = True


@dataclass(frozen=True)
class EncodedTable:
    """The numeric and categorical columns of every sample as one float row: numeric
    columns standardized with the train split's mean and std, then categorical codes."""

    values: torch.Tensor  # [samples, F]
    present: np.ndarray  # whether a sample has any of these cells
    modality: Modality


@dataclass(frozen=True)
class Table:
    """What every split of one manifest shares: its rows that make samples, the split,
    label and inputs of each, and the modalities and task they declare."""

    source: Path
    row_numbers: np.ndarray  # the data row number of each sample, for messages
    split_of: np.ndarray  # the split name of each sample
    labels: np.ndarray  # each sample's class index, its 0/1 per label or its number
    task: Task
    modalities: dict[str, Modality]
    cells: dict[str, list[str | None]]  # image/audio: a file path, text: the text
    tabular: EncodedTable | None
    files: tuple[str, ...]  # every referenced file, sample by sample
    kinds: dict[str, str] = field(default_factory=dict)  # every column's kind or role
    checked: set[str] = field(default_factory=set)  # the splits whose files were checked


class ManifestDataset(MultimodalDataset):
    """One split of a table of samples: files, texts and values in columns, one row each.

    An item holds every modality (an image `[C, H, W]` in [0, 1], a clip `[T]`, a text, the
    `tabular` row `[F]`, or `None` where the row's cells are empty) and `"label"`, the class
    index of the target into `tasks[target].classes`. Rows without a target or without any
    input are skipped. Modality infos carry what encoders are sized from (see
    `fusion.data.Modality`): images `shape`, `in_channels`, `image_size`, `mean`, `std`;
    audio `shape`, `sample_rate`, `clip_samples`; tabular `shape`, `num_numeric`,
    `categorical_cardinalities`, `columns`.

    Arguments:
        split: which split this object is, one of `SPLITS`.
        path: the manifest, `.csv`, `.tsv`, `.jsonl` (one JSON object per line) or
            `.parquet` (needs `pip install 'fusion[parquet]'`).
        target: the column to predict; its distinct values are the classes (see
            `target_kind`).
        columns: `{column: kind}` for columns whose inferred kind is wrong, kinds being
            image, audio, text, numeric, categorical or ignore.
        split_column: the column naming each row's split (train, val or test; valid,
            validation and dev mean val). Default: a column named `split` if there is one,
            else a stratified split by `fractions`.
        fractions: train, val and test shares of the stratified split.
        seed: fixes the stratified split, the images sampled for statistics and the
            fixed draws of augmentation.
        image_size: `[height, width]` (or one int) every image is resized to; default the
            first train image's.
        image_channels: 1 or 3, the channels of every image; default the first train
            image's (alpha is dropped).
        audio_sample_rate: Hz every clip is resampled to.
        audio_seconds: every clip is cropped or zero-padded (at the end) to this length;
            default the longest train clip, rounded up to 0.1 s.
        audio_crop: which part of a longer clip to keep, `start` or `center`.
        augment: transforms applied to every image of the train split (built callables,
            e.g. `torchvision.transforms.v2.RandomHorizontalFlip()`; a Hydra config lists
            `_target_` specs, which Hydra builds). They must keep the image's shape.
        view: `None` redraws augmentation at every access; an int makes the train split
            that fixed draw (see `fixed_view`).
        max_samples: keep only the first N samples of the split (for quick checks; the
            statistics still come from the whole train split).
        check_files: check at construction that every referenced file exists and every image
            and clip reads (see `check_split_files`).
        target_kind: `auto` (the target's distinct values are the classes: binary for
            two, else multiclass), `multiclass`, `binary`, `multilabel` (each cell names
            several labels, joined by `label_separator` or as a list; a sample's label is
            a 0/1 per label) or `regression` (each cell a number; the split by fractions
            keeps the target's quantiles in proportion).
        label_separator: what joins a multilabel cell's label names (`comedy|drama`).
        standardize_target: a regression head learns (y - mean) / std with the train
            split's mean and std (`Task.target_center`, `target_scale`), so targets of
            any scale train alike; predictions and metrics stay in the target's units.
    """

    splits = SPLITS

    def __init__(
        self,
        split: str = "train",
        *,
        path: str | os.PathLike[str],
        target: str,
        columns: Mapping[str, str] | None = None,
        split_column: str | None = None,
        fractions: Sequence[float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        image_size: int | Sequence[int] | None = None,
        image_channels: int | None = None,
        audio_sample_rate: int = 16000,
        audio_seconds: float | None = None,
        audio_crop: str = "start",
        augment: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None,
        view: int | None = None,
        max_samples: int | None = None,
        check_files: bool = True,
        target_kind: str = "auto",
        label_separator: str = DEFAULT_SEPARATOR,
        standardize_target: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
        if view is not None:
            checks.integer("view", view)
        checks.max_samples(max_samples)
        self.settings = ManifestSettings(
            target=str(target),
            columns=column_overrides(columns),
            split_column=None if split_column is None else str(split_column),
            fractions=checks.fractions(fractions),
            seed=checks.integer("seed", seed),
            image_size=checks.image_size(image_size, optional=True),
            image_channels=checks.choice("image_channels", image_channels, (None, 1, 3)),
            audio_sample_rate=checks.integer("audio_sample_rate", audio_sample_rate, 1),
            audio_seconds=None
            if audio_seconds is None
            else checks.real("audio_seconds", audio_seconds, 0.0, above=True),
            audio_crop=checks.choice("audio_crop", audio_crop, AUDIO_CROPS),
            check_files=checks.flag("check_files", check_files),
            target_kind=checks.choice("target_kind", target_kind, TARGET_KINDS),
            label_separator=separator(label_separator),
            standardize_target=checks.flag("standardize_target", standardize_target),
        )
        transforms = image_transforms(augment)
        self.source = Path(path).expanduser().absolute()
        self.table = load_table(self.source, self.settings)
        self.split = split
        self.augment = transforms if split == "train" else ()
        self.view = view
        self.max_samples = max_samples
        if self.settings.check_files and split not in self.table.checked:
            check_split_files(self.table, split)  # train's were checked building the table
            self.table.checked.add(split)
        self.indices = np.flatnonzero(self.table.split_of == split)[:max_samples]
        self.modalities = self.table.modalities
        self.tasks = {self.settings.target: self.table.task}
        if self.augment and len(self):
            with torch.random.fork_rng(devices=[]):
                self[0]  # a transform that fails or changes an image's shape fails now

    @property
    def deterministic(self) -> bool:
        """Fixed items unless the train split is augmented afresh at every access."""
        return not self.augment or self.view is not None

    def fixed_view(self, view: int) -> ManifestDataset:
        """The `view`-th fixed draw of this split's augmentation (the same at every access),
        so that stage 2 can cache features of augmented training data."""
        if not isinstance(view, int) or view < 0:
            raise ValueError(f"view must be an integer >= 0, got {view!r}")
        drawn = copy.copy(self)
        drawn.view = view
        return drawn

    def fingerprint(self) -> str:
        """What determines this split's items: the settings, the split and its
        augmentation, what the train split fixes for every split (the classes, the
        modalities' shapes; the train statistics are in the encoded table values), and the
        content of each of its samples (its label, texts, encoded table values and the bytes
        of its files). Another split's rows and files are not in it, so an edit is told
        apart by split (a resumed run names the splits that changed)."""
        columns, cells = self._cell_digests()
        samples = hashlib.sha256(json.dumps(columns).encode())
        for row in cells:
            samples.update("|".join(row).encode())
        modalities = {
            name: {k: v for k, v in m.info.items() if k not in ("mean", "std")}
            for name, m in self.modalities.items()
        }  # an image's mean and std shape the encoder (in its config), not the items
        return json.dumps(
            {
                "reader": READER_VERSION,
                "split": self.split,
                "settings": dataclasses.asdict(self.settings),
                "augment": [repr(t) for t in self.augment],
                "view": self.view if self.augment else None,
                "max_samples": self.max_samples,
                "task": dataclasses.asdict(self.table.task),
                "modalities": {n: [m.kind, modalities[n]] for n, m in self.modalities.items()},
                "samples": samples.hexdigest(),
            },
            sort_keys=True,
            default=str,
        )

    def row_record(self) -> dict[str, Any]:
        """A short digest of each cell of each sample (4 bytes; the bytes of a file), with
        the samples' data rows: kept in checkpoints so that a resumed run can name the row,
        column and file that changed (`row_changes`). Plain tensors and lists, as a
        checkpoint loads with `weights_only=True`."""
        columns, cells = self._cell_digests()
        digests = [[int(d[:8], 16) - (1 << 31) for d in row] for row in cells]
        return {
            "rows": torch.as_tensor(self.table.row_numbers[self.indices], dtype=torch.int64),
            "columns": columns,
            "digests": torch.tensor(digests, dtype=torch.int32).reshape(len(cells), len(columns)),
        }

    def row_changes(self, record: Mapping[str, Any]) -> str:
        """How this split differs from a `row_record` taken earlier: the first sample whose
        cells changed, named by data row, column and file (or value), and how many did."""
        now = self.row_record()
        if list(record["columns"]) != now["columns"]:
            return f"its columns were {list(record['columns'])}, now {now['columns']}"
        before, after = record["digests"], now["digests"]
        if len(before) != len(after):
            return f"it held {len(before)} samples, now {len(after)}"
        differ = (before != after).any(dim=1).nonzero().flatten().tolist()
        if not differ:
            return "its rows hold the same cells (the settings or train statistics differ)"
        first = differ[0]
        changed = [c for j, c in enumerate(now["columns"]) if before[first, j] != after[first, j]]
        sample = int(self.indices[first])
        said = "; ".join(f"column '{c}': {self._cell_change(c, sample)}" for c in changed)
        more = f" (and {len(differ) - 1} more samples)" if len(differ) > 1 else ""
        return f"data row {int(now['rows'][first])}, {said}{more}"

    def _cell_change(self, column: str, sample: int) -> str:
        """What a changed cell holds now, said for a person."""
        cells = self.table.cells.get(column)
        if column == self.settings.target:
            return f"the target is now {target_text(self.table, sample)!r}"
        if cells is None:
            return "holds another value"
        value = cells[sample]
        if value is None:
            return "is empty now"
        if self.table.kinds.get(column) in FILE_KINDS:
            return f"{shown_path(value, self.source)} has other bytes"
        return f"holds another text ({value[:40]!r})"

    def _cell_digests(self) -> tuple[list[str], list[list[str]]]:
        """The columns that make this split's items (the target, each file and text column,
        each table column) and a hex digest of each of their cells, sample by sample."""
        table = self.table
        tabular = table.tabular
        table_columns = list(tabular.modality.info["columns"]) if tabular else []
        columns = [self.settings.target, *table.cells, *table_columns]
        rows = []
        for sample in self.indices.tolist():
            row = [_digest(target_text(table, sample))]
            for column, cells in table.cells.items():
                value = cells[sample]
                if value is None:
                    row.append(_digest(None))
                elif table.kinds.get(column) in FILE_KINDS:
                    row.append(file_digest(value))
                else:
                    row.append(_digest(value))
            if tabular is not None:
                present = bool(tabular.present[sample])
                row.extend(_digest((present, float(v))) for v in tabular.values[sample].tolist())
            rows.append(row)
        return columns, rows

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} '{self.split}' samples")
        sample = int(self.indices[index])
        item = {name: self._input(name, m, sample) for name, m in self.modalities.items()}
        if self.augment:
            self._augment(item, index)
        item["label"] = target_value(self.table, sample)
        return item

    def _input(self, name: str, modality: Modality, sample: int) -> Any:
        """One modality of one sample, decoded; `None` where its cells are empty."""
        table = self.table
        if modality.kind == TABULAR:
            encoded = table.tabular
            return encoded.values[sample].clone() if encoded.present[sample] else None
        cell = table.cells[name][sample]
        if cell is None or modality.kind == "text":
            return cell
        info = modality.info
        with naming_errors(self.source, int(table.row_numbers[sample]), name, cell):
            if modality.kind == "image":
                return load_image(cell, info["in_channels"], tuple(info["image_size"]))
            return load_audio(
                cell, info["sample_rate"], info["clip_samples"], self.settings.audio_crop
            )

    def _augment(self, item: dict[str, Any], index: int) -> None:
        """Transform every image in `item`: a fresh draw, or with `view` the fixed draw
        seeded by (seed, view, index), whatever the order of access."""
        if self.view is None:
            self._transform_images(item)
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed(self.settings.seed, self.view, index))
            self._transform_images(item)

    def _transform_images(self, item: dict[str, Any]) -> None:
        for name, modality in self.modalities.items():
            if modality.kind != "image" or item[name] is None:
                continue
            image = item[name]
            for transform in self.augment:
                image = transform(image)
            if image.shape != item[name].shape:
                raise ValueError(
                    f"augment changed modality '{name}' from shape {list(item[name].shape)} to "
                    f"{list(image.shape)}; transforms must keep it (give crops "
                    f"size={list(item[name].shape[-2:])})"
                )
            item[name] = image


def _digest(value: Any) -> str:
    """A hex digest of a small value (a text, a number, None)."""
    return hashlib.sha256(repr(value).encode()).hexdigest()


def shown_path(path: str, source: Path) -> str:
    """A file's path as the manifest would write it: relative to its folder when inside."""
    relative = os.path.relpath(path, source.parent)
    return path if relative.startswith("..") else relative


def draw_seed(*key: int) -> int:
    """A seed that depends on `key` alone, so a fixed draw is the same in any order."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint32)[0])


# ----------------------------------------------------------------------------- settings


def column_overrides(columns: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    """`columns` as sorted (column, kind) pairs, refusing an unknown kind."""
    pairs = []
    for name, kind in (columns or {}).items():
        kind = str(kind).lower()
        if kind not in COLUMN_KINDS:
            close = difflib.get_close_matches(kind, COLUMN_KINDS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(
                f"columns.{name}: unknown column kind '{kind}'{hint} (kinds: {list(COLUMN_KINDS)})"
            )
        pairs.append((str(name), kind))
    return tuple(sorted(pairs))


def image_transforms(augment: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], ...]:
    """`augment` as a tuple of built transforms (one callable, e.g. a Compose, is one)."""
    if augment is None:
        return ()
    transforms = (augment,) if callable(augment) else tuple(augment)
    for i, transform in enumerate(transforms):
        if not callable(transform):
            raise TypeError(
                f"augment[{i}] is {type(transform).__name__} {transform!r}, not a transform: "
                "pass built transforms (e.g. torchvision.transforms.v2.RandomHorizontalFlip()); "
                "in a Hydra config give each a _target_ and Hydra builds it"
            )
    return transforms


# ----------------------------------------------------------------------------- the table


def load_table(source: Path, settings: ManifestSettings) -> Table:
    """The manifest's shared table, read and prepared once per process and file version."""
    if not source.is_file():
        raise FileNotFoundError(f"manifest {source} does not exist")
    stat = source.stat()
    return _build_table(source, stat.st_mtime_ns, stat.st_size, settings)


@functools.lru_cache(maxsize=8)
def _build_table(source: Path, mtime_ns: int, size: int, settings: ManifestSettings) -> Table:
    frame, data_rows = read_manifest(source)
    split_column = find_split_column(frame, settings, source)
    kinds = column_kinds(frame, settings, split_column, data_rows, source)
    log.info(
        "manifest %s columns: %s", source.name, " | ".join(f"{c}={k}" for c, k in kinds.items())
    )
    check_modality_names(kinds, source)
    targets = target_cells(frame[settings.target], data_rows, settings, source)
    keep = rows_to_keep(frame, kinds, targets, data_rows, source)
    frame = frame[keep].reset_index(drop=True)
    row_numbers = data_rows[keep]
    kept = [t for t, k in zip(targets, keep, strict=True) if k]
    task, labels = make_task(kept, settings, source)
    split_of = assign_splits(
        frame, split_column, strata(task, labels), settings, row_numbers, source
    )
    if task.kind == "regression" and settings.standardize_target:
        task = with_target_scale(task, labels[split_of == "train"])
    if task.kind in CLASSES:
        warn_target_copies(frame, kinds, labels, settings.target, source)
    elif task.kind == "regression":
        warn_linear_copies(frame, kinds, labels, settings.target, source)
    refuse_untrained_columns(frame, kinds, split_of, source)
    cells, escapes = input_cells(frame, kinds, source, row_numbers)
    tabular = encode_tabular(frame, kinds, split_of, row_numbers, source)
    files = [(c, cells[c]) for c, kind in kinds.items() if kind in FILE_KINDS]
    table = Table(
        source=source,
        row_numbers=row_numbers,
        split_of=split_of,
        labels=labels,
        task=task,
        modalities={},
        cells=cells,
        tabular=tabular,
        files=tuple(paths[i] for i in range(len(labels)) for _, paths in files if paths[i]),
        kinds=kinds,
    )
    if settings.check_files:  # before the train files are read for statistics; the other
        check_split_files(table, "train")  # splits' are checked when those splits are built
        table.checked.add("train")
    warn_uncovered(kinds, task, labels, cells, tabular, split_of, row_numbers, source)
    table.modalities.update(
        declare_modalities(kinds, cells, tabular, split_of, row_numbers, settings, source)
    )
    counts = ", ".join(f"{int((split_of == s).sum())} {s}" for s in SPLITS)
    leaving = f"; {escapes} file paths leave its folder through '..'" if escapes else ""
    log.info("manifest %s: %d samples (%s)%s", source.name, len(labels), counts, leaving)
    return table


def refuse_untrained_columns(
    frame: pd.DataFrame, kinds: Mapping[str, str], split_of: np.ndarray, source: Path
) -> None:
    """Refuse an input column without a value in any train row: its encoder (or, for a
    table column, the tabular encoder's weights for it) would never see it in training, so
    the fused model would ignore it, while val/test rows would carry it in vain."""
    train = split_of == "train"
    inputs = [c for c, k in kinds.items() if k in COLUMN_KINDS and k != "ignore"]
    filled = filled_cells(frame, kinds, inputs)
    for j, column in enumerate(inputs):
        if filled[train, j].any():
            continue
        kind = kinds[column]
        others = {s: int(filled[split_of == s, j].sum()) for s in SPLITS if s != "train"}
        where = ", ".join(f"{n} {s}" for s, n in others.items() if n) or "no"
        if kind in TABULAR_KINDS:
            what = (
                f"a {kind} column of modality '{TABULAR}', so the tabular encoder cannot learn "
                "what it says and the fused model would ignore it"
            )
        else:
            what = (
                f"modality '{column}' ({kind}), so its encoder cannot be trained and the "
                "fused model would ignore it"
            )
        raise ValueError(
            f"manifest {source}: column '{column}' is empty in every one of the "
            f"{int(train.sum())} train rows (it has values in {where} rows); it is {what}. "
            f"Fill it in train rows, or drop it with data.columns={{{column}: ignore}}"
        )


def warn_target_copies(
    frame: pd.DataFrame, kinds: Mapping[str, str], labels: np.ndarray, target: str, source: Path
) -> None:
    """Say which input column restates the target: one value per class, filled in every
    row, so the model can read the answer instead of learning it (a leak)."""
    for column, kind in kinds.items():
        if kind not in ("numeric", "categorical", "text"):
            continue
        texts = [_cell_text(v) if _is_filled(v) else None for v in frame[column]]
        if None in texts:
            continue
        pairs = set(zip(texts, labels.tolist(), strict=True))
        if len(pairs) == len(set(texts)) == len(set(labels.tolist())):
            log.warning(
                "manifest %s, column '%s' has one value per class of the target '%s' in every "
                "row: the model can read the answer from it (a leak); if it is derived from "
                "the target, set data.columns={%s: ignore}", source.name, column, target, column,
            )  # fmt: skip


def with_target_scale(task: Task, train_values: np.ndarray) -> Task:
    """`task` with the train split's mean and standard deviation of its target (1 where the
    train rows all hold one value)."""
    std = float(train_values.std())
    return dataclasses.replace(
        task, target_center=(float(train_values.mean()),), target_scale=(std if std > 0 else 1.0,)
    )


def warn_linear_copies(
    frame: pd.DataFrame, kinds: Mapping[str, str], values: np.ndarray, target: str, source: Path
) -> None:
    """Say which numeric input column restates a regression target: filled in every row and
    a linear function of it (|correlation| above 0.999), so the model can read the answer
    instead of learning it (a leak)."""
    for column, kind in kinds.items():
        if kind != "numeric":
            continue
        cells = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(cells).all() or cells.std() == 0 or values.std() == 0:
            continue
        correlation = float(np.corrcoef(cells, values)[0, 1])
        if abs(correlation) > 0.999:
            log.warning(
                "manifest %s, column '%s' is a linear function of the target '%s' (correlation "
                "%.4f): the model can read the answer from it (a leak); if it is derived from "
                "the target, set data.columns={%s: ignore}", source.name, column, target,
                correlation, column,
            )  # fmt: skip


def warn_uncovered(
    kinds: Mapping[str, str],
    task: Task,
    labels: np.ndarray,
    cells: Mapping[str, list[str | None]],
    tabular: EncodedTable | None,
    split_of: np.ndarray,
    row_numbers: np.ndarray,
    source: Path,
) -> None:
    """Said out loud, since training would run on without them: classes (or labels) no
    train row has (the model never learns them) or only one row has (a typo?), files a train
    row and a val/test row share (leaked metrics), and modalities a whole split lacks (its
    metrics do not measure them)."""
    train = split_of == "train"
    if task.kind == "multilabel":
        warn_labels(task, labels, train, source)
    elif task.kind in CLASSES:
        warn_classes(task, labels, train, row_numbers, source)
    for column, values in cells.items():
        if kinds[column] not in FILE_KINDS:
            continue
        seen = {v for v, t in zip(values, train, strict=True) if t and v is not None}
        shared = [i for i, v in enumerate(values) if not train[i] and v in seen]
        if shared:
            log.warning(
                "manifest %s, column '%s': %d val/test rows use a file a train row uses too "
                "(data row %d: %s), so their metrics are not of unseen data",
                source.name, column, len(shared), int(row_numbers[shared[0]]), values[shared[0]],
            )  # fmt: skip
    present = {name: np.array([v is not None for v in values]) for name, values in cells.items()}
    if tabular is not None:
        present[TABULAR] = tabular.present
    for name, mask in present.items():
        for split in SPLITS[1:]:  # an input empty in every train row is refused earlier
            rows = split_of == split
            if rows.any() and not mask[rows].any():
                log.warning(
                    "manifest %s: modality '%s' is empty in every %s row, so the %s metrics "
                    "do not measure it", source.name, name, split, split,
                )  # fmt: skip


def warn_classes(
    task: Task, labels: np.ndarray, train: np.ndarray, row_numbers: np.ndarray, source: Path
) -> None:
    """Classes no train row has, or only one row has."""
    unseen = [k for k in range(len(task.classes)) if not (labels[train] == k).any()]
    if unseen:
        rows = row_numbers[np.isin(labels, unseen)][:5].tolist()
        log.warning(
            "manifest %s: the classes %s have no train row (data rows %s), so the model "
            "cannot learn them", source.name, [task.classes[k] for k in unseen], rows,
        )  # fmt: skip
    counts = np.bincount(labels, minlength=len(task.classes))
    single = [k for k in range(len(task.classes)) if counts[k] == 1]
    if single:
        rows = [int(row_numbers[np.flatnonzero(labels == k)[0]]) for k in single[:5]]
        log.warning(
            "manifest %s: the classes %s have one row each (data rows %s): a typo or an "
            "outlier in the target?", source.name, [task.classes[k] for k in single[:5]], rows,
        )  # fmt: skip


def warn_labels(task: Task, labels: np.ndarray, train: np.ndarray, source: Path) -> None:
    """Labels of a multilabel target that no train row has on (or every train row has)."""
    on = labels[train].sum(axis=0)
    for count, what in ((0, "on in no train row"), (int(train.sum()), "on in every train row")):
        same = [task.classes[k] for k in np.flatnonzero(on == count)]
        if same:
            log.warning(
                "manifest %s: the labels %s are %s, so the model cannot learn them",
                source.name, same, what,
            )  # fmt: skip


def classify(
    targets: Sequence[str], settings: ManifestSettings, source: Path
) -> tuple[Task, np.ndarray]:
    """The task (its classes: every sample's target, so all splits share them) and each
    sample's class index."""
    classes = sort_names(set(targets))
    if len(classes) < 2:
        raise ValueError(
            f"target '{settings.target}' in {source} has one class, {list(classes)}: "
            "classification needs at least two"
        )
    if len(classes) == len(targets):
        raise ValueError(
            f"target '{settings.target}' in {source} holds a different value in each of its "
            f"{len(targets)} rows: every class would have one sample, which no split can both "
            f"train and test; is '{settings.target}' an id column?"
        )
    if all(name.lower() in SPLIT_NAMES for name in classes):
        raise ValueError(
            f"target '{settings.target}' in {source} holds only split names {list(classes)}: "
            "it says where a row belongs, not what to predict; choose the label column as "
            "target (this one is read as the split column when it is named 'split' or given "
            "as split_column)"
        )
    spellings = collections.defaultdict(list)
    for name in classes:
        spellings[name.casefold()].append(name)
    alike = [names for names in spellings.values() if len(names) > 1]
    if alike:
        log.warning(
            "target '%s' in %s: the classes %s differ only in case, and each is a class of "
            "its own; if they mean one class, write them alike", settings.target, source.name,
            "; ".join(map(str, alike)),
        )  # fmt: skip
    kind = settings.target_kind
    if kind == "binary" and len(classes) != 2:
        raise ValueError(
            f"target '{settings.target}' in {source}: target_kind=binary needs two classes, "
            f"found {len(classes)}: {list(classes)[:10]}"
        )
    if kind == "auto":
        kind = "binary" if len(classes) == 2 else "multiclass"
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[t] for t in targets], dtype=np.int64)
    return Task(kind, classes), labels


def input_cells(
    frame: pd.DataFrame, kinds: Mapping[str, str], source: Path, row_numbers: np.ndarray
) -> tuple[dict[str, list[str | None]], int]:
    """Each image and audio column's file paths and each text column's texts (`None` for
    an empty cell), and how many paths leave the manifest's folder through '..'."""
    cells: dict[str, list[str | None]] = {}
    escapes = 0
    for column, kind in kinds.items():
        if kind in FILE_KINDS:
            cells[column], outside = file_cells(frame[column], source, row_numbers)
            escapes += outside
        elif kind == "text":
            cells[column] = [_cell_text(v) if _is_filled(v) else None for v in frame[column]]
    return cells, escapes


def declare_modalities(
    kinds: Mapping[str, str],
    cells: Mapping[str, list[str | None]],
    tabular: EncodedTable | None,
    split_of: np.ndarray,
    row_numbers: np.ndarray,
    settings: ManifestSettings,
    source: Path,
) -> dict[str, Modality]:
    """Every modality, in the manifest's column order (`tabular` where its first column
    is), sized from the train split."""
    train = split_of == "train"
    modalities: dict[str, Modality] = {}
    for column, kind in kinds.items():
        if kind == "image":
            modalities[column] = image_modality(
                column, cells[column], train, row_numbers, settings, source
            )
        elif kind == "audio":
            modalities[column] = audio_modality(
                column, cells[column], train, row_numbers, settings, source
            )
        elif kind == "text":
            modalities[column] = Modality("text")
        elif kind in TABULAR_KINDS and tabular is not None:
            modalities.setdefault(TABULAR, tabular.modality)
    return modalities


def read_manifest(source: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The manifest as a DataFrame with string column names, and the data row number of
    each of its rows (blank lines, which the readers skip, still count, so a CSV's data row
    is its file line - 1 and a JSONL file's its file line). In a CSV only empty cells are
    missing, so a category spelled "NA" or "null" stays a category."""
    suffix = source.suffix.lower()
    readers: dict[str, tuple[str, Callable[[Path], tuple[pd.DataFrame, np.ndarray]]]] = {
        ".csv": ("CSV", lambda p: _read_csv(p, ",")),
        ".tsv": ("TSV", lambda p: _read_csv(p, "\t")),
        ".jsonl": ("JSON lines", _read_jsonl),
        ".ndjson": ("JSON lines", _read_jsonl),
        ".parquet": ("Parquet", _read_parquet),
        ".pq": ("Parquet", _read_parquet),
    }
    if suffix not in readers:
        raise ValueError(
            f"manifest {source}: unknown format '{suffix}'; use .csv, .tsv, .jsonl (one JSON "
            "object per line) or .parquet"
        )
    name, reader = readers[suffix]
    try:
        frame, data_rows = reader(source)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"manifest {source}: cannot read it as {name}: {not_utf8(source)}"
        ) from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise ValueError(f"manifest {source}: cannot read it as {name}: {err}") from err
    if frame.empty:
        raise ValueError(f"manifest {source} has no data rows")
    frame.columns = [str(c).strip() for c in frame.columns]
    if len(data_rows) != len(frame):  # a reader and pandas disagree: count rows as pandas does
        data_rows = np.arange(1, len(frame) + 1)
    return frame, data_rows


def not_utf8(path: Path) -> str:
    """Where a text file stops being UTF-8: its file line and the bytes there."""
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            bad = line[err.start : err.end + 8]
            return (
                f"file line {number} (the header is line 1) holds bytes that are not UTF-8 "
                f"({bad!r}); save the file as UTF-8 (it may be Latin-1 or Windows-1252)"
            )
    return "it is not UTF-8 text; save it as UTF-8"


def _read_csv(path: Path, separator: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The table and each row's data row; a row with more cells than the header is named
    by its data row (pandas counts file lines, header included)."""
    try:
        frame = pd.read_csv(
            path, sep=separator, keep_default_na=False, na_values=[""], skipinitialspace=True
        )
    except pd.errors.ParserError as err:
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(err))
        if found is None:
            raise
        fields, line, saw = map(int, found.groups())
        raise ValueError(
            f"data row {line - 1} (file line {line}) has {saw} cells, the header {fields} "
            "(quote cells that hold the separator)"
        ) from None
    return frame, check_csv_rows(path, separator)


def check_csv_rows(path: Path, separator: str) -> np.ndarray:
    """What pandas lets through: a header naming a column twice (it would rename one
    `name.1`) and a row with fewer cells than the header (it would fill the rest as empty).
    Returns the data row of each row pandas reads: its first file line - 1, since pandas
    skips blank lines (and a cell may span lines)."""
    data_rows = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=separator)
        rows = (row for row in reader if not _blank_record(row))
        header = [name.strip() for name in next(rows, [])]
        twice = sorted({name for name in header if header.count(name) > 1})
        if twice:
            raise ValueError(f"the header names the columns {twice} more than once")
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if _blank_record(row):
                continue
            if len(row) < len(header):
                raise ValueError(
                    f"data row {start - 1} has {len(row)} cells, the header {len(header)} "
                    "(a cell left out shifts the others; leave an empty cell instead)"
                )
            data_rows.append(start - 1)
    return np.array(data_rows, dtype=np.int64)


def _blank_record(row: list[str]) -> bool:
    """A CSV line pandas skips: empty, or blanks only (`,,` is a row of empty cells)."""
    return len(row) <= 1 and not "".join(row).strip()


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """One JSON object per line, values kept as JSON typed them (no date guessing), and
    each record's file line (its data row: blank lines count)."""
    records, lines = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"line {number}: {err}") from None
            if not isinstance(record, dict):
                raise ValueError(f"line {number} is a JSON {type(record).__name__}, not an object")
            records.append(record)
            lines.append(number)
    return pd.DataFrame.from_records(records), np.array(lines, dtype=np.int64)


def _read_parquet(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError(
            f"reading the Parquet manifest {path} needs pyarrow: pip install 'fusion[parquet]'"
        ) from None
    frame = pd.read_parquet(path)
    return frame, np.arange(1, len(frame) + 1)


def check_column(frame: pd.DataFrame, name: str, setting: str, source: Path) -> None:
    """Refuse a setting that names a column the manifest lacks, suggesting close names."""
    if name in frame.columns:
        return
    close = difflib.get_close_matches(name, list(frame.columns), n=3)
    hint = f"; did you mean {close}?" if close else ""
    raise ValueError(
        f"{setting}: manifest {source} has no column '{name}'{hint} "
        f"(its columns: {list(frame.columns)})"
    )


def find_split_column(frame: pd.DataFrame, settings: ManifestSettings, source: Path) -> str | None:
    """`split_column`, else a column named `split`, else None (a stratified split)."""
    if settings.split_column is None:
        return "split" if "split" in frame.columns and settings.target != "split" else None
    check_column(frame, settings.split_column, "split_column", source)
    if settings.split_column == settings.target:
        raise ValueError(f"split_column: '{settings.split_column}' is also the target")
    return settings.split_column


def column_kinds(
    frame: pd.DataFrame,
    settings: ManifestSettings,
    split_column: str | None,
    data_rows: np.ndarray,
    source: Path,
) -> dict[str, str]:
    """Every column's role, in the manifest's order: a kind of `COLUMN_KINDS`, or
    `target`, `split` or `id` (which are not modalities)."""
    check_column(frame, settings.target, "target", source)
    overrides = dict(settings.columns)
    for name in overrides:
        check_column(frame, name, f"columns.{name}", source)
        if name in (settings.target, split_column):
            role = "target" if name == settings.target else "split column"
            raise ValueError(f"columns.{name}: '{name}' is the {role}, so it cannot be an input")
    kinds = {}
    for name in frame.columns:
        if name == settings.target:
            kinds[name] = "target"
        elif name == split_column:
            kinds[name] = "split"
        else:
            kinds[name] = overrides.get(name) or infer_kind(frame[name])
            doubt = None if name in overrides else inference_doubt(frame[name], kinds[name])
            if doubt:
                log.warning("manifest %s, column '%s': %s", source.name, name, doubt)
            filled = np.flatnonzero(frame[name].map(_is_filled).to_numpy())
            if (
                name not in overrides
                and kinds[name] != "ignore"
                and len(filled) <= len(frame) // 100 + 1 < len(frame) // 10
            ):
                log.warning(
                    "manifest %s, column '%s': a value in only %d of %d rows (data row %d); if "
                    "it is a stray key, set data.columns={%s: ignore}",
                    source.name, name, len(filled), len(frame), data_rows[filled[0]], name,
                )  # fmt: skip
    if not any(k in COLUMN_KINDS and k != "ignore" for k in kinds.values()):
        raise ValueError(f"manifest {source} has no input column: its columns are {kinds}")
    return kinds


def infer_kind(series: pd.Series) -> str:
    """A column's kind from its values: file extensions make image and audio columns, a
    numeric dtype (or strings of which `MAJORITY`, not all, are numbers) a numeric one, a
    few short repeated strings a categorical one, other strings text. A majority is enough
    so that the odd cell out (a typo, a folder) is named by the column's checks instead of
    silently turning the column into text. An id-like name with unique values is `id`; an empty column
    `ignore`."""
    values = [v for v in series if _is_filled(v)]
    if not values:
        return "ignore"
    texts = [_cell_text(v) for v in values]
    name = str(series.name).lower()
    if (name in ID_NAMES or name.endswith("_id")) and len(set(texts)) == len(texts):
        return "id"
    if pd.api.types.is_bool_dtype(series):
        return "categorical"
    if pd.api.types.is_numeric_dtype(series):
        return "numeric"
    lowered = [t.lower() for t in texts]
    spelled = [t for t in lowered if t not in MISSING_NUMBER_WORDS]
    numbers = sum(_as_number(t) is not None for t in spelled)
    if spelled and MAJORITY * len(spelled) <= numbers < len(texts):  # all: quoted on purpose
        return "numeric"
    for kind, extensions in (("image", IMAGE_EXTENSIONS), ("audio", AUDIO_EXTENSIONS)):
        if sum(t.endswith(extensions) for t in lowered) >= MAJORITY * len(lowered):
            return kind
    distinct = len(set(texts))
    few = distinct <= min(CATEGORICAL_MAX_VALUES, len(texts) / 2)
    if few and max(map(len, texts)) <= CATEGORICAL_MAX_CHARS:
        return "categorical"
    return "text"


def inference_doubt(series: pd.Series, kind: str) -> str | None:
    """Why an inferred kind may be wrong, with the override that settles it; None when the
    values leave no doubt. Said out loud: a wrong kind trains the wrong encoder silently."""
    values = [v for v in series if _is_filled(v)]
    name = series.name
    if kind == "text":
        paths = [v for v in values if str(v).lower().endswith(IMAGE_EXTENSIONS + AUDIO_EXTENSIONS)]
        if paths:
            return (
                f"read as text although {len(paths)} of {len(values)} cells are file paths; set "
                f"data.columns={{{name}: image}} (or audio) to have the others named"
            )
    if kind != "id" and (str(name).lower() in ID_NAMES or str(name).lower().endswith("_id")):
        distinct = len({_cell_text(v) for v in values})
        return (
            f"named like a row id, but its values repeat ({distinct} distinct over "
            f"{len(values)} cells), so it is read as {kind}, an input; if it identifies rows "
            f"(or groups of them), set data.columns={{{name}: ignore}}"
        )
    commas = [v for v in values if isinstance(v, str) and DECIMAL_COMMA.fullmatch(v.strip())]
    if kind in ("text", "categorical") and len(commas) >= MAJORITY * len(values):
        return (
            f"read as {kind} although {len(commas)} of {len(values)} cells are numbers "
            f"written with a decimal comma ({commas[0]!r}); write them with a '.' to have the "
            "column read as numbers"
        )
    if kind == "categorical" and any(" " in str(v) for v in values):
        distinct = len({str(v) for v in values})
        return (
            f"read as categorical ({distinct} distinct values over {len(values)} cells); if it is "
            f"free text, set data.columns={{{name}: text}}"
        )
    return None


def _as_number(value: object) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check_modality_names(kinds: Mapping[str, str], source: Path) -> None:
    """Refuse a column whose modality name an item already uses for something else."""
    has_tabular = any(k in TABULAR_KINDS for k in kinds.values())
    for column, kind in kinds.items():
        if kind not in ("image", "audio", "text"):
            continue
        if column in RESERVED_KEYS:
            clash = f"'{column}' is a reserved item key ({list(RESERVED_KEYS)})"
        elif "." in column:
            clash = "a modality name holds no '.' (it names the modality's modules)"
        elif has_tabular and column == TABULAR:
            clash = f"'{TABULAR}' names the modality of the numeric and categorical columns"
        else:
            continue
        raise ValueError(
            f"manifest {source}: column '{column}' ({kind}) cannot be a modality: {clash}; "
            f"rename the column or set columns.{column}=ignore"
        )


def separator(value: Any) -> str:
    """`label_separator`: a non-empty string that is no whitespace alone."""
    if not isinstance(value, str) or not value.strip():
        checks.fail("label_separator", "a non-empty string such as '|' or ';'", value)
    return value


def target_cells(
    series: pd.Series, data_rows: np.ndarray, settings: ManifestSettings, source: Path
) -> list[Any]:
    """Each row's target as `target_kind` reads it, `None` where the cell is empty: a class
    name, a number (regression) or a tuple of label names (multilabel)."""
    if settings.target_kind == "regression":
        return read_numbers(series, data_rows, source)
    if settings.target_kind == "multilabel":
        return read_label_sets(series, data_rows, settings.label_separator, source)
    return read_targets(series, data_rows, source)


def read_numbers(series: pd.Series, data_rows: np.ndarray, source: Path) -> list[float | None]:
    """A regression target: one finite number per filled cell."""
    out: list[float | None] = []
    for row, value in zip(data_rows, series, strict=True):
        if not _is_filled(value):
            out.append(None)
            continue
        number = _as_number(_cell_text(value)) if not isinstance(value, (list, dict)) else None
        if number is None or not math.isfinite(number):
            raise ValueError(
                f"target '{series.name}' in {source}, data row {row}: target_kind=regression "
                f"takes one finite number per row, found {_cell_text(value)!r}"
            )
        out.append(number)
    return out


def read_label_sets(
    series: pd.Series, data_rows: np.ndarray, sep: str, source: Path
) -> list[tuple[str, ...] | None]:
    """A multilabel target: the label names of each filled cell, from a list (JSONL, or a
    list written as text: `["comedy", "drama"]`) or names joined by `sep` (`comedy|drama`);
    `[]` is a row with no label on."""
    out: list[tuple[str, ...] | None] = []
    for row, value in zip(data_rows, series, strict=True):
        if isinstance(value, (list, tuple, np.ndarray)):
            names = list(value)
        elif not _is_filled(value):
            out.append(None)
            continue
        elif _written_list(value):
            names = ast.literal_eval(str(value).strip())
        else:
            names = [n.strip() for n in _cell_text(value).split(sep)]
        if any(isinstance(n, (list, dict)) for n in names):
            raise ValueError(
                f"target '{series.name}' in {source}, data row {row}: a multilabel target "
                f"lists label names, found {value!r}"
            )
        out.append(tuple(dict.fromkeys(str(n).strip() for n in names if str(n).strip())))
    texts = [str(v) for v in series if isinstance(v, str) and not _written_list(v)]
    other = [t for t in texts if DEFAULT_SEPARATOR in t]
    if sep != DEFAULT_SEPARATOR and other and not any(sep in t for t in texts):
        log.warning(
            "target '%s' in %s: label_separator is %r, which no cell holds, but %d cells hold "
            "'%s' (%r), so each reads as one label; is the separator '%s'?",
            series.name, source.name, sep, len(other), DEFAULT_SEPARATOR, other[0],
            DEFAULT_SEPARATOR,
        )  # fmt: skip
    return out


def make_task(
    targets: list[Any], settings: ManifestSettings, source: Path
) -> tuple[Task, np.ndarray]:
    """The task of the kept rows' targets and each sample's label: class indices, 0/1 per
    label (multilabel) or numbers (regression)."""
    target = f"target '{settings.target}' in {source}"
    if settings.target_kind == "regression":
        values = np.array(targets, dtype=np.float64)
        if len(np.unique(values)) < 2:
            raise ValueError(f"{target} holds one value, {values[0]:g}: nothing to predict")
        return Task("regression"), values
    if settings.target_kind == "multilabel":
        classes = sort_names({name for names in targets for name in names})
        if len(classes) < 2:
            raise ValueError(
                f"{target} names the labels {list(classes)}: a multilabel target needs at "
                f"least two (separated by {settings.label_separator!r}, or listed)"
            )
        index = {name: i for i, name in enumerate(classes)}
        labels = np.zeros((len(targets), len(classes)), dtype=np.int64)
        for i, names in enumerate(targets):
            labels[i, [index[n] for n in names]] = 1
        return Task("multilabel", classes), labels
    return classify(targets, settings, source)


def strata(task: Task, labels: np.ndarray) -> np.ndarray:
    """What a split by fractions keeps in proportion: the class, a regression target's
    quantile, nothing for multilabel targets (an even random split)."""
    if task.kind in CLASSES:
        return labels
    if task.kind == "regression":
        ranks = np.argsort(np.argsort(labels, kind="stable"), kind="stable")
        return ranks * REGRESSION_STRATA // len(labels)
    return np.zeros(len(labels), dtype=np.int64)


def target_value(table: Table, sample: int) -> int | float | list[int]:
    """An item's label: a class index, a number, or a 0/1 per label."""
    value = table.labels[sample]
    if table.task.kind == "regression":
        return float(value)
    if table.task.kind == "multilabel":
        return value.tolist()
    return int(value)


def target_text(table: Table, sample: int) -> str:
    """A sample's target as its cell would say it."""
    value = table.labels[sample]
    if table.task.kind == "regression":
        return f"{float(value):g}"
    if table.task.kind == "multilabel":
        return "|".join(table.task.classes[k] for k in np.flatnonzero(value))
    return table.task.classes[int(value)]


def read_targets(series: pd.Series, data_rows: np.ndarray, source: Path) -> list[str | None]:
    """Each row's class name, `None` where the cell is empty. Refused rather than turned into
    classes: a continuous target (set target_kind=regression), and lists or label sets
    joined by '|' (set target_kind=multilabel) when any cell is a list, a joined cell's
    names are each a row's whole label elsewhere, or more than half the cells are joined."""
    for row, value in zip(data_rows, series, strict=True):
        if isinstance(value, (list, dict)):
            raise ValueError(
                f"target '{series.name}' in {source}, data row {row}: expected one class name "
                f"or code, found a {type(value).__name__} {value!r}"
            )
    lists = [i for i, v in enumerate(series) if _is_filled(v) and _written_list(v)]
    joined = [i for i, v in enumerate(series) if _is_filled(v) and DEFAULT_SEPARATOR in str(v)]
    listed = sorted(set(lists) | set(joined))
    count = int(series.map(_is_filled).sum())
    single = {
        _cell_text(v).strip() for i, v in enumerate(series) if _is_filled(v) and i not in listed
    }
    label_sets = [  # joined names that are each a row's whole label elsewhere: a label set
        i for i in joined
        if all(part.strip() in single for part in str(series.iloc[i]).split(DEFAULT_SEPARATOR))
    ]  # fmt: skip
    if lists or label_sets or len(listed) > count / 2:
        first = listed[0]
        what = "lists" if not joined else f"lists or label sets joined by '{DEFAULT_SEPARATOR}'"
        raise ValueError(
            f"target '{series.name}' in {source}: {len(listed)} of its {count} values are "
            f"{what} (data row {data_rows[first]}: {_cell_text(series.iloc[first])!r}); "
            "each distinct list would be a class of its own: for several labels per row, set "
            "data.target_kind=multilabel; else give one class name or code per row"
        )
    filled = {v for v in series if _is_filled(v)}
    continuous = pd.api.types.is_float_dtype(series) and len(filled) > REGRESSION_MIN_VALUES
    if continuous and any(not float(v).is_integer() for v in filled):
        raise ValueError(
            f"target '{series.name}' in {source} holds {len(filled)} distinct fractional "
            "numbers, which would each be a class: to predict the number, set "
            "data.target_kind=regression (a classification target holds class names or "
            "integer codes)"
        )
    targets = [_cell_text(v) if _is_filled(v) else None for v in series]
    filled = [t for t in targets if t is not None]
    spelled = [i for i, t in enumerate(targets) if t and t.strip().lower() in MISSING_NUMBER_WORDS]
    if spelled:
        log.warning(
            "target '%s' in %s: %d rows (data rows %s) hold %r, which is read as a class of "
            "its own; leave the cell empty where the target is missing (such rows are skipped)",
            series.name, source.name, len(spelled), _rows_preview(data_rows[spelled]),
            targets[spelled[0]],
        )  # fmt: skip
    words = [i for i, t in enumerate(targets) if t is not None and _as_number(t) is None]
    distinct = set(filled)
    if not words and len(distinct) > REGRESSION_MIN_VALUES:
        numbers = sorted(float(_as_number(t)) for t in distinct)
        log.warning(
            "target '%s' in %s holds %d distinct whole numbers (%g to %g), each a class of its "
            "own with about %.1f rows; to predict the number, set data.target_kind=regression",
            series.name, source.name, len(distinct), numbers[0], numbers[-1],
            len(filled) / len(distinct),
        )  # fmt: skip
    odd = [i for i in words if i not in spelled]
    if odd and len(words) <= (1 - MAJORITY) * len(filled):
        log.warning(
            "target '%s' in %s: %d of %d values are numbers, and data row %d holds %r, which "
            "makes a class of its own", series.name, source.name, len(filled) - len(words),
            len(filled), data_rows[odd[0]], targets[odd[0]],
        )  # fmt: skip
    return targets


def _written_list(value: Any) -> bool:
    """Whether a cell is a list written as text: `[1, 2]`, `["cat", "dog"]`, `[]`."""
    text = str(value).strip()
    if not (text.startswith("[") and text.endswith("]")):
        return False
    try:
        return isinstance(ast.literal_eval(text), list)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return False


def rows_to_keep(
    frame: pd.DataFrame,
    kinds: Mapping[str, str],
    targets: Sequence[str | None],
    data_rows: np.ndarray,
    source: Path,
) -> np.ndarray:
    """Which rows make samples: those with a target and at least one input; the others
    are reported once."""
    inputs = [c for c, k in kinds.items() if k in COLUMN_KINDS and k != "ignore"]
    has_input = filled_cells(frame, kinds, inputs).any(axis=1)
    keep = has_input & np.array([t is not None for t in targets])
    skipped = np.flatnonzero(~keep)
    if len(skipped) == len(keep):
        raise ValueError(f"manifest {source}: no row has both a target and an input")
    if len(skipped):
        log.warning(
            "manifest %s: skipped %d rows without a target or without any input (data rows %s)",
            source.name,
            len(skipped),
            _rows_preview(data_rows[skipped]),
        )
    return keep


def sort_names(names: set[str]) -> tuple[str, ...]:
    """Names in a stable order: numerically when all are numbers ('2' before '10')."""
    try:
        return tuple(sorted(names, key=float))
    except ValueError:
        return tuple(sorted(names))


# ----------------------------------------------------------------------------- splits


def assign_splits(
    frame: pd.DataFrame,
    split_column: str | None,
    labels: np.ndarray,
    settings: ManifestSettings,
    row_numbers: np.ndarray,
    source: Path,
) -> np.ndarray:
    """Each sample's split, from the split column or a seeded stratified split; refuses an
    empty split."""
    if split_column is None:
        split_of = np.empty(len(labels), dtype=object)
        for name, part in zip(
            SPLITS, stratified_parts(labels, settings.fractions, settings.seed), strict=True
        ):
            split_of[part] = name
    else:
        split_of = np.array(
            [
                parse_split(value, int(row), split_column, source)
                for value, row in zip(frame[split_column], row_numbers, strict=True)
            ],
            dtype=object,
        )
    counts = {s: int((split_of == s).sum()) for s in SPLITS}
    for name, count in counts.items():
        if count:
            continue
        if split_column is None:
            how = (
                f"{len(labels)} samples split by fractions {list(settings.fractions)} give "
                f"{counts}; add rows, change fractions or add a 'split' column"
            )
        else:
            how = f"column '{split_column}' gives {counts}"
        raise ValueError(f"manifest {source}: split '{name}' has no rows ({how})")
    return split_of


def parse_split(value: Any, row: int, column: str, source: Path) -> str:
    """A split cell as a split name, accepting the usual aliases."""
    text = _cell_text(value).lower() if _is_filled(value) else ""
    if text in SPLIT_NAMES:
        return SPLIT_NAMES[text]
    shown = f"'{_cell_text(value)}'" if text else "an empty cell"
    raise ValueError(
        f"{source}, data row {row}, column '{column}': the split is {shown}; expected one of "
        f"{sorted(SPLIT_NAMES)}"
    )


def stratified_parts(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split sample indices by `fractions`, each part with the same label mix.

    Every class is shuffled and spread evenly over [0, 1) (with a random offset, so that a
    class of one sample lands anywhere); cutting the sorted positions at the cumulative
    fractions then gives each part its exact share overall and each class's share to
    within one sample.
    """
    rng = np.random.default_rng(seed)
    position = np.empty(len(labels))
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        position[members] = (np.arange(len(members)) + rng.random()) / len(members)
    order = np.lexsort((rng.random(len(labels)), position))
    cuts = np.round(np.cumsum(fractions)[:-1] * len(labels)).astype(int)
    return [np.sort(part) for part in np.split(order, cuts)]


# ----------------------------------------------------------------------------- files


def file_cells(
    series: pd.Series, source: Path, row_numbers: np.ndarray
) -> tuple[list[str | None], int]:
    """Each row's file path (relative ones read from the manifest's folder), and how many
    leave it through '..' (allowed, but worth a line in the summary). A path holding a
    control character (a NUL, a tab) is refused, shown escaped: printed as is, it would
    look like another file's name."""
    paths: list[str | None] = []
    leaving = 0
    folder = source.parent
    for value, row in zip(series, row_numbers, strict=True):
        if not _is_filled(value):
            paths.append(None)
            continue
        text = _cell_text(value)
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise ValueError(
                f"manifest {source}, data row {row}, column '{series.name}': the path {text!r} "
                "holds a control character; expected a file path"
            )
        path = Path(os.path.expanduser(text))
        if not path.is_absolute():
            leaving += Path(os.path.normpath(path)).parts[:1] == ("..",)
            path = folder / path
        paths.append(os.path.normpath(path))
    return paths, leaving


def check_split_files(table: Table, split: str) -> None:
    """Every referenced file of `split`'s samples is there and reads as its column's kind,
    before anything trains: one error for all missing files (how many, the first five),
    then one naming the first file whose header is not an image's or a clip's, then one
    naming the first file whose content does not read as a sample reads it (an image cut
    short reads its header well; a clip's samples may be NaN or out of scale). Each split
    checks its own files when it is built, so an error is reported under its split (the
    missing files of the splits not checked yet are listed with its own). An animated
    image is said: only its first frame is used."""
    source, kinds, row_numbers = table.source, table.kinds, table.row_numbers
    unchecked = [s for s in SPLITS if s == split or s not in table.checked]
    listed = [
        (int(row_numbers[i]), column, paths[i], str(table.split_of[i]))
        for column, paths in table.cells.items()
        if kinds[column] in FILE_KINDS
        for i in np.flatnonzero(np.isin(table.split_of, unchecked)).tolist()
        if paths[i] is not None
    ]
    missing = sorted(f for f in listed if not os.path.isfile(f[2]))
    if any(f[3] == split for f in missing):
        shown = "; ".join(
            f"data row {r}, column '{c}' ({s}): {p}{not_a_file(p)}" for r, c, p, s in missing[:5]
        )
        more = f"; and {len(missing) - 5} more" if len(missing) > 5 else ""
        counts = collections.Counter(f[3] for f in missing)
        per_split = ", ".join(f"{counts[s]} {s}" for s in SPLITS if counts[s])
        raise FileNotFoundError(
            f"manifest {source}: {len(missing)} referenced files do not exist or are no files "
            f"({per_split}; relative paths are read from {source.parent}): {shown}{more}"
        )
    files = [(r, c, p) for r, c, p, s in listed if s == split]
    files.sort(key=lambda f: (list(table.cells).index(f[1]), f[0]))  # column by column
    animated: dict[str, list[tuple[int, str, int]]] = collections.defaultdict(list)
    for row, column, path in files:
        with naming_errors(source, row, column, path):
            if kinds[column] == "image":
                frames = image_frames(path)
                if frames > 1:
                    animated[column].append((row, path, frames))
            else:
                probe_audio(path)
    for column, found in animated.items():
        row, path, frames = found[0]
        log.warning(
            "manifest %s, column '%s': %d %s images are animated (data row %d: %s has %d "
            "frames); only the first frame of each is used",
            source.name, column, len(found), split, row, shown_path(path, source), frames,
        )  # fmt: skip
    read = [content_reader(kinds[column], path) for _, column, path in files]
    pool = ThreadPoolExecutor(max_workers=min(DECODE_THREADS, os.cpu_count() or 1))
    try:  # decoders release the GIL; the first failure in manifest order is named
        for (row, column, path), failure in zip(files, pool.map(read_failure, read), strict=True):
            if failure is not None:
                with naming_errors(source, row, column, path):
                    raise failure
    finally:
        pool.shutdown(cancel_futures=True)


def image_frames(path: str) -> int:
    """How many frames an image holds (GIF, WebP, APNG animations), from its header; it
    fails as `probe_image` does on a file that is no image."""
    with Image.open(path) as image:
        return int(getattr(image, "n_frames", 1))


def not_a_file(path: str) -> str:
    """What stands at `path` instead of a regular file, as a note ('' when nothing does)."""
    if os.path.isdir(path):
        return " (a folder)"
    if os.path.exists(path):
        return " (not a regular file: a device, a pipe or a socket)"
    return ""


def content_reader(kind: str, path: str) -> Callable[[], Any]:
    """Read a file's content as a sample reads it: an image's pixels, a clip's samples."""
    if kind == "image":
        return functools.partial(decode_image_file, path, 3)
    return functools.partial(read_samples, path)


def read_failure(read: Callable[[], Any]) -> Exception | None:
    """Why `read` fails, or None."""
    try:
        read()
    except (OSError, RuntimeError, ValueError, Image.DecompressionBombError) as err:
        return err
    return None


@contextlib.contextmanager
def naming_errors(source: Path, row: int, column: str, path: str) -> Iterator[None]:
    """Name the manifest, data row, column and file in an error reading a cell's file."""
    where = f"{source}, data row {row}, column '{column}'"
    try:
        yield
    except FileNotFoundError as err:
        raise DataFileError(f"{where}: file {path} does not exist") from err
    except (OSError, RuntimeError, ValueError, Image.DecompressionBombError) as err:
        reason = str(err)
        if "does not exist or is not a regular file" in reason and os.path.isfile(path):
            reason = "libsndfile does not recognise it as audio (a file of another format?)"
        raise DataFileError(f"{where}: cannot decode {path}: {reason}") from err


def train_samples(paths: Sequence[str | None], train: np.ndarray) -> list[int]:
    """The train samples that have this column's file."""
    return [int(i) for i in np.flatnonzero(train) if paths[i] is not None]


# ----------------------------------------------------------------------------- images


def image_modality(
    column: str,
    paths: Sequence[str | None],
    train: np.ndarray,
    row_numbers: np.ndarray,
    settings: ManifestSettings,
    source: Path,
) -> Modality:
    """An image column's modality: its size and channels (the settings', else the first
    train image's) and the train images' per-channel mean and std."""
    samples = train_samples(paths, train)
    if not samples:
        raise ValueError(
            f"manifest {source}: column '{column}' has no image in the train split, so its "
            "size and statistics are unknown"
        )
    if len(samples) > IMAGE_STATS_SAMPLES:
        rng = np.random.default_rng(settings.seed)
        samples = sorted(rng.choice(samples, IMAGE_STATS_SAMPLES, replace=False).tolist())
    channels, size = common_shape(column, paths, samples, row_numbers, settings, source)
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for i in samples:
        with naming_errors(source, int(row_numbers[i]), column, paths[i]):
            pixels = load_image(paths[i], channels, size).double().flatten(1)
        total += pixels.sum(1)
        squares += pixels.square().sum(1)
    count = len(samples) * size[0] * size[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # a constant channel
    log.info(
        "manifest %s, column '%s': images read as %d x %d x %d (data.image_channels, "
        "data.image_size to change)", source.name, column, channels, *size,
    )  # fmt: skip
    return Modality(
        "image",
        {
            "shape": [channels, *size],
            "in_channels": channels,
            "image_size": list(size),
            "mean": [round(float(m), 6) for m in mean],
            "std": [round(float(s), 6) for s in std],
        },
    )


def common_shape(
    column: str,
    paths: Sequence[str | None],
    samples: Sequence[int],
    row_numbers: np.ndarray,
    settings: ManifestSettings,
    source: Path,
) -> tuple[int, tuple[int, int]]:
    """The channels and size images are read at: the settings', else the most common among
    the measured train images (headers only). Images of several shapes are said out loud:
    every one is resized to one shape, which may not be what the settings should say."""
    shapes = {}
    for i in samples:
        with naming_errors(source, int(row_numbers[i]), column, paths[i]):
            shapes[i] = probe_image(paths[i])
    counts = collections.Counter(shapes.values())
    (channels, size), count = counts.most_common(1)[0]
    if len(counts) > 1 and not (settings.image_channels and settings.image_size):
        odd = next(i for i, shape in shapes.items() if shape != (channels, size))
        log.warning(
            "manifest %s, column '%s': the train images have %d shapes; %d of %d are %d x %d x "
            "%d (data row %d is %d x %d x %d); every image is resized to the most common one "
            "unless data.image_size and data.image_channels say otherwise",
            source.name, column, len(counts), count, len(shapes), channels, *size,
            int(row_numbers[odd]), shapes[odd][0], *shapes[odd][1],
        )  # fmt: skip
    return settings.image_channels or channels, settings.image_size or size


def probe_image(path: str) -> tuple[int, tuple[int, int]]:
    """An image's channels (1 for grey, else 3: alpha is dropped) and (height, width),
    from its header alone."""
    with Image.open(path) as image:
        return (1 if image.mode in GREY_MODES else 3), (image.height, image.width)


def load_image(path: str, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """A float image `[channels, *size]` in [0, 1], resized with antialiasing."""
    image = decode_image_file(path, channels)
    if image.shape[0] != channels:  # GIF and WebP decode to RGB whatever the mode asks
        image = tvf.rgb_to_grayscale(image) if channels == 1 else image.repeat(3, 1, 1)
    if tuple(image.shape[-2:]) != tuple(size):
        image = tvf.resize(image, list(size), antialias=True)
    return image


def decode_image_file(path: str, channels: int) -> torch.Tensor:
    """A file's pixels as float [C, H, W] in [0, 1]: torchvision.io for the formats it
    decodes, Pillow for BMP and TIFF; the first frame of an animation."""
    if path.lower().endswith(PILLOW_EXTENSIONS):
        with Image.open(path) as image:
            if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                grey = deep_grey_pixels(image)
                return grey if channels == 1 else grey.repeat(3, 1, 1)
            pixels = tvf.pil_to_tensor(image.convert("L" if channels == 1 else "RGB"))
    else:
        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        pixels = decode_image(read_file(path), mode=mode)
    if pixels.dim() == 4:
        pixels = pixels[0]
    return tvf.to_dtype(pixels, torch.float32, scale=True)


def deep_grey_pixels(image: Image.Image) -> torch.Tensor:
    """A 16-bit or float grey image (TIFF) as float [1, H, W] in [0, 1]. Pillow's 8-bit
    conversion would saturate 16-bit values and truncate floats to 0 or 1, so: 16-bit
    integers are scaled by 1/65535, floats already in [0, 1] are kept, anything else is
    refused rather than guessed."""
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        return torch.from_numpy(array.astype(np.float32) / 65535.0)[None]
    if image.mode == "I":
        raise ValueError(
            "32-bit integer pixels (Pillow mode 'I') have no known full scale; expected "
            "8- or 16-bit integer pixels, or float pixels in [0, 1]"
        )
    low, high = float(array.min()), float(array.max())
    if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low <= high <= 1.0):
        raise ValueError(f"float pixels must lie in [0, 1]; found values from {low} to {high}")
    return torch.from_numpy(array.astype(np.float32))[None]


# ----------------------------------------------------------------------------- audio


def audio_modality(
    column: str,
    paths: Sequence[str | None],
    train: np.ndarray,
    row_numbers: np.ndarray,
    settings: ManifestSettings,
    source: Path,
) -> Modality:
    """An audio column's modality: the sample rate and clip length every clip is fit to."""
    durations = clip_durations(column, paths, train, row_numbers, source)
    if not durations and settings.audio_seconds is None:
        raise ValueError(
            f"manifest {source}: column '{column}' has no clip in the train split, so the clip "
            "length is unknown; set audio_seconds"
        )
    warn_odd_clips(column, paths, durations, row_numbers, source)
    seconds = settings.audio_seconds or longest_clip(durations)
    clip_samples = round(seconds * settings.audio_sample_rate)
    log.info(
        "manifest %s, column '%s': clips read as mono at %d Hz, %s to %.2f s (%d samples; "
        "data.audio_sample_rate, data.audio_seconds to change)", source.name, column,
        settings.audio_sample_rate, "cropped or padded", seconds, clip_samples,
    )  # fmt: skip
    return Modality(
        "audio",
        {
            "shape": [clip_samples],
            "sample_rate": settings.audio_sample_rate,
            "clip_samples": clip_samples,
        },
    )


def clip_durations(
    column: str,
    paths: Sequence[str | None],
    train: np.ndarray,
    row_numbers: np.ndarray,
    source: Path,
) -> dict[int, float]:
    """Each train clip's duration in seconds, by sample (headers only)."""
    durations = {}
    for i in train_samples(paths, train):
        with naming_errors(source, int(row_numbers[i]), column, paths[i]):
            info = probe_audio(paths[i])
        durations[i] = info.frames / info.samplerate
    return durations


def warn_odd_clips(
    column: str,
    paths: Sequence[str | None],
    durations: Mapping[int, float],
    row_numbers: np.ndarray,
    source: Path,
) -> None:
    """Say a train clip far longer than the median one (every clip is padded to the
    longest, which costs memory and time) or far shorter (it is mostly padding: silence)."""
    if not durations:
        return
    median = float(np.median(list(durations.values())))
    longest = max(durations, key=durations.__getitem__)
    if durations[longest] > LONG_CLIP_RATIO * median:
        log.warning(
            "manifest %s, column '%s': the clip of data row %d lasts %.1f s, %.0f times the "
            "median train clip (%.2f s); every clip is padded to it, which costs memory and "
            "time: set data.audio_seconds, or check that file", source.name, column,
            int(row_numbers[longest]), durations[longest], durations[longest] / median, median,
        )  # fmt: skip
    short = [i for i, d in durations.items() if d * SHORT_CLIP_RATIO < median]
    if short:
        i = min(short, key=durations.__getitem__)
        log.warning(
            "manifest %s, column '%s': the clip of data row %d (%s) lasts %s, 1/%.0f of the "
            "median train clip (%s); it is zero-padded, so the encoder hears mostly silence: "
            "check that file (%d train clips are under 1/%d of the median)", source.name,
            column, int(row_numbers[i]), shown_path(str(paths[i]), source),
            _duration(durations[i]), median / durations[i], _duration(median), len(short),
            SHORT_CLIP_RATIO,
        )  # fmt: skip


def _duration(seconds: float) -> str:
    """A duration for a person: milliseconds under 0.1 s."""
    return f"{seconds * 1000:.3g} ms" if seconds < 0.1 else f"{seconds:.2f} s"


def longest_clip(durations: Mapping[int, float]) -> float:
    """The longest clip's duration in seconds, rounded up to 0.1 s."""
    longest = max(durations.values())
    return max(0.1, math.ceil(round(longest * 10, 6)) / 10)


def probe_audio(path: str) -> Any:
    """A clip's `soundfile.info`, from its header; a clip without samples, or one whose
    data is shorter than its header says (a cut file, which libsndfile would read as a
    shorter clip without a word), is refused."""
    info = soundfile.info(path)
    if info.frames == 0:
        raise ValueError("it holds no samples (0 frames)")
    cut = re.search(r"^data\s*: (\d+) \(should be (\d+)\)", info.extra_info, re.MULTILINE)
    if cut:
        raise ValueError(
            f"it is cut short: its header says {cut[1]} bytes of samples, the file holds {cut[2]}"
        )
    return info


def read_samples(path: str) -> tuple[np.ndarray, int]:
    """A clip's float samples `[frames, channels]` and its sample rate; samples that are
    not finite or lie outside [-1, 1] are refused (integer formats always fit; a float file
    may hold any scale)."""
    data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    if not np.isfinite(data).all():
        raise ValueError(f"it holds {int((~np.isfinite(data)).sum())} NaN or infinite samples")
    peak = float(np.abs(data).max()) if data.size else 0.0
    if peak > 1.0:
        raise ValueError(
            f"float samples must lie in [-1, 1]; found a peak of {peak:.4g} (rescale the file)"
        )
    return data, rate


def load_audio(path: str, sample_rate: int, clip_samples: int, crop: str) -> torch.Tensor:
    """A mono float clip `[clip_samples]` at `sample_rate`: channels averaged, resampled,
    then cropped (from the start or the centre) or zero-padded at the end. Samples must be
    finite and in [-1, 1] (integer formats always are; a float file may hold any scale)."""
    data, rate = read_samples(path)
    wave = torch.from_numpy(data.mean(axis=1))
    if rate != sample_rate:
        wave = torchaudio.functional.resample(wave, rate, sample_rate)
    if len(wave) >= clip_samples:
        start = (len(wave) - clip_samples) // 2 if crop == "center" else 0
        return wave[start : start + clip_samples]
    return torch.nn.functional.pad(wave, (0, clip_samples - len(wave)))


# ----------------------------------------------------------------------------- tabular


def encode_tabular(
    frame: pd.DataFrame,
    kinds: Mapping[str, str],
    split_of: np.ndarray,
    row_numbers: np.ndarray,
    source: Path,
) -> EncodedTable | None:
    """The numeric and categorical columns encoded with the train split's statistics;
    `None` without such columns."""
    numeric = [c for c, k in kinds.items() if k == "numeric"]
    categorical = [c for c, k in kinds.items() if k == "categorical"]
    if not numeric and not categorical:
        return None
    train = split_of == "train"
    parts = [standardized(frame[c], train, row_numbers, source) for c in numeric]
    cardinalities = []
    for column in categorical:
        codes, cardinality = category_codes(frame[column], split_of, row_numbers, source)
        parts.append(codes)
        cardinalities.append(cardinality)
    table = torch.from_numpy(np.stack(parts, axis=1).astype(np.float32))
    present = filled_cells(frame, kinds, numeric + categorical).any(axis=1)
    info = {
        "shape": [table.shape[1]],
        "num_numeric": len(numeric),
        "categorical_cardinalities": cardinalities,
        "columns": numeric + categorical,
    }
    return EncodedTable(table, present, Modality(TABULAR, info))


def standardized(
    series: pd.Series, train: np.ndarray, row_numbers: np.ndarray, source: Path
) -> np.ndarray:
    """(value - train mean) / train std; an empty cell (or one spelled NA, N/A, NaN, null or
    None, said once) becomes 0, the train mean."""
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
    spelled = spelled_missing(series)
    if spelled.any():
        words = sorted({str(v).strip() for v in series[spelled]})
        log.warning(
            "manifest %s, column '%s': %d cells spelled %s read as missing",
            source.name, series.name, int(spelled.sum()), words,
        )  # fmt: skip
    filled = series.map(_is_filled).to_numpy() & ~spelled
    bad = np.flatnonzero(filled & np.isnan(values))
    if len(bad):
        i = bad[0]
        raise ValueError(
            f"{source}, data row {row_numbers[i]}, column '{series.name}': "
            f"'{_cell_text(series.iloc[i])}' is not a number, and the column is numeric (set "
            f"columns.{series.name}=categorical or text if it is not)"
        )
    bad = np.flatnonzero(np.isinf(values))
    if len(bad):
        i = bad[0]
        raise ValueError(
            f"{source}, data row {row_numbers[i]}, column '{series.name}': "
            f"'{_cell_text(series.iloc[i])}' is infinite; a numeric cell must be a finite "
            "number (leave it empty if it is unknown)"
        )
    reference = values[train & ~np.isnan(values)]
    with np.errstate(over="ignore"):  # an overflow is refused below, naming the column
        mean = float(reference.mean()) if len(reference) else 0.0
        std = float(reference.std()) if len(reference) else 1.0
    if not (math.isfinite(mean) and math.isfinite(std)):
        i = int(np.nanargmax(np.abs(values)))
        raise ValueError(
            f"{source}, column '{series.name}': the train values' mean or std overflows "
            f"float64 (data row {row_numbers[i]} holds {_cell_text(series.iloc[i])}); rescale "
            "the column"
        )
    if len(reference) > 1 and std == 0:
        log.warning(
            "manifest %s, column '%s': every one of its %d train values is %s (std 0), so it "
            "carries no information (every row reads as 0); if it is a constant, set "
            "data.columns={%s: ignore}", source.name, series.name, len(reference),
            _cell_text(float(reference[0])), series.name,
        )  # fmt: skip
    return np.nan_to_num((values - mean) / (std if std > 0 else 1.0), nan=0.0)


def filled_cells(frame: pd.DataFrame, kinds: Mapping[str, str], columns: list[str]) -> np.ndarray:
    """[rows, columns]: which cells hold a value (a numeric cell spelled missing does not)."""
    filled = frame[columns].map(_is_filled).to_numpy(dtype=bool, copy=True)
    for i, column in enumerate(columns):
        if kinds[column] == "numeric":
            filled[:, i] &= ~spelled_missing(frame[column])
    return filled


def spelled_missing(series: pd.Series) -> np.ndarray:
    """Which cells of a numeric column say the number is missing (`MISSING_NUMBER_WORDS`)."""
    words = series.map(lambda v: isinstance(v, str) and v.strip().lower() in MISSING_NUMBER_WORDS)
    return words.to_numpy(dtype=bool)


def category_codes(
    series: pd.Series, split_of: np.ndarray, row_numbers: np.ndarray, source: Path
) -> tuple[np.ndarray, int]:
    """Codes 1.. for the train split's values (in `sort_names` order); 0 for an empty cell
    or a value the train split never shows. Returns the codes and the cardinality. A split
    whose rows mostly hold values train never shows is said: they all read as empty."""
    names = [_cell_text(v) if _is_filled(v) else None for v in series]
    seen = {n for n, s in zip(names, split_of, strict=True) if s == "train" and n is not None}
    vocabulary = {name: code for code, name in enumerate(sort_names(seen), start=1)}
    codes = np.array([vocabulary.get(n, 0) if n is not None else 0 for n in names])
    for split in SPLITS[1:]:
        rows = np.flatnonzero(split_of == split)
        unseen = [i for i in rows if names[i] is not None and names[i] not in vocabulary]
        if len(rows) and len(unseen) > UNSEEN_SHARE * len(rows):
            values = sorted({names[i] for i in unseen})
            log.warning(
                "manifest %s, column '%s': %d of the %d %s rows hold values the train split "
                "never shows (%s; data row %d), so they are coded 0, as an empty cell: do "
                "train and %s draw from the same values?", source.name, series.name,
                len(unseen), len(rows), split, ", ".join(map(repr, values[:5]))
                + (", ..." if len(values) > 5 else ""), int(row_numbers[unseen[0]]), split,
            )  # fmt: skip
    return codes.astype(np.float32), len(vocabulary) + 1


# ----------------------------------------------------------------------------- cells


def _rows_preview(rows: Sequence[int]) -> str:
    """The first few of the data rows `rows`, and '...' past them."""
    shown = ", ".join(str(int(r)) for r in rows[:5])
    return shown + (", ..." if len(rows) > 5 else "")


def _is_filled(value: Any) -> bool:
    """Whether a cell holds a value: not None, NaN or NA, nor an empty or blank string."""
    if isinstance(value, str):
        return bool(value.strip())
    try:
        return not bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or dict cell (JSONL) holds a value
        return True


def _cell_text(value: Any) -> str:
    """A cell as text; 3.0 becomes '3' (an integer column with gaps reads as floats)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()
