"""Features of frozen encoders, computed once per split and read from disk afterwards.

With frozen encoders, a fusion ablation spends nearly all its time re-running the same
encoders on the same inputs, epoch after epoch and run after run. When an encoder is
frozen and a split's items are deterministic, its features are a pure function of (the
encoder's weights and configuration, the data), so they are computed once, written as a
`.npy` file under a key of exactly those inputs, and every later epoch, run and multirun
job reads them instead. Change the weights, the encoder's settings or the data, and the
key changes, so the cache is rebuilt; files appear under their final name only once
complete (written to a temporary name, then renamed), so a crash mid-write never leaves a
cache that a later run would trust, and a damaged file is rebuilt with a warning. Free
space is checked before writing, and a disk that fills up anyway is an `OSError` naming
the file (never the SIGBUS of a write into a memory map).

Layout: `<root>/<data key>/labels.pt` (sample masks, targets, conditions: small, loaded
whole), `<root>/<data key>/<modality>-<encoder key>-<dtype>.npy` ([N, *out_shape], float32
or float16, read through `np.load(mmap_mode="r")`, so data larger than memory works) and
`<modality>-<encoder key>-mask.pt`, the encoder's output mask ([N], or [N, T'] for tokens)
and the sha256 digest of the `.npy` file's bytes, taken while it was written. A read checks
the file against that digest (1 to 2 ms per MB of features), so a file whose content changed
since (another modality's features copied over it, values edited) is rebuilt with a
warning naming it, never read; a cache written before digests were kept is rebuilt once.
Once a file has passed, its size and modification time are kept with the digest, and later
reads hash it again only when either differs (or when the time is too close to the check's
to tell a later change: see `StoredMask.unchanged`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fusion.batch import Batch, collate
from fusion.data import fingerprint, item_digest
from fusion.encoders.base import sample_mask
from fusion.training.checkpoint import (
    CheckpointError,
    atomic_path,
    load_checkpoint,
    save_checkpoint,
)

log = logging.getLogger("fusion")

CACHE_VERSION = 2  # 2: output masks beside the features
DTYPES = {"float32": np.float32, "float16": np.float16}
LABEL_FIELDS = ("present", "targets", "condition", "modality_targets")
DIGEST_PREFIX = "sha256:"  # the digest of a features file, kept in its mask file
DIGEST_CHUNK = 1 << 22  # bytes read at a time to hash a features file


def encoder_key(
    encoder: nn.Module, config: Any = None, autocast: str = "float32", weights: str | None = None
) -> str:
    """Everything that shapes an encoder's features: its structure (which includes its
    preprocessing), every weight and buffer, the caller's `config` (e.g. the encoder's
    Hydra config, for settings no module attribute shows) and the compute precision.

    `weights` is a digest of the state the encoder holds, when the caller knows it (a
    stage-1 checkpoint records the `fingerprint` of its state): the weights are then not
    hashed again (about 1 s per 100 MB)."""
    state = encoder.state_dict() if weights is None else weights
    return fingerprint(CACHE_VERSION, repr(encoder), state, config, autocast)


def data_key(dataset: Dataset) -> str:
    """The dataset's `fingerprint()` (see `fusion.data`) when it defines one; else a hash of
    every item."""
    own = getattr(dataset, "fingerprint", None)
    content = own() if callable(own) else item_digest(dataset)
    return fingerprint(CACHE_VERSION, type(dataset).__name__, content, len(dataset))


def is_deterministic(dataset: Dataset) -> bool:
    """Whether the dataset says its items never change (no random augmentation).

    Datasets opt in with a `deterministic` attribute; one that does not say is assumed to
    draw new items, and is never cached.
    """
    return bool(getattr(dataset, "deterministic", False))


def is_frozen(encoder: nn.Module) -> bool:
    """Frozen means fixed features: no trainable parameter, and eval mode under train()."""
    if any(p.requires_grad for p in encoder.parameters()):
        return False
    frozen = getattr(encoder, "frozen", None)  # an Encoder says; a plain module shows it by mode
    return not encoder.training if frozen is None else bool(frozen)


class FeatureCache:
    """Encoded splits on disk under `root`, stored as `dtype` ("float32" or "float16")."""

    def __init__(self, root: str | Path, dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"feature cache dtype must be one of {sorted(DTYPES)}, got '{dtype}'")
        self.root = Path(root)
        self.dtype = dtype

    def encode(
        self,
        model: nn.Module,
        dataset: Dataset,
        modalities: Iterable[str],
        device: torch.device,
        *,
        keys: Mapping[str, str],
        batch_size: int = 256,
        collate_fn: Callable = collate,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        num_workers: int = 0,
        split: str | None = None,
    ) -> EncodedDataset:
        """`dataset` with `modalities` replaced by their cached features, built if missing.

        `model.encoders[m]` must be frozen and `dataset` deterministic; `keys[m]` is the
        encoder's `encoder_key`. Missing features (and labels) are computed in one pass,
        its items read by `num_workers` worker processes (in order, so the result is the
        same with any number); the model's other modalities are still read from `dataset`
        and encoded live. `split` names the split in the log.
        """
        cached = list(modalities)
        if not is_deterministic(dataset):
            raise ValueError(
                f"{type(dataset).__name__} is not deterministic (random augmentation?): "
                "its items change at every access, so their features cannot be cached"
            )
        for m in cached:
            if not is_frozen(model.encoders[m]):
                raise ValueError(f"modality '{m}': only a frozen encoder's features can be cached")
        folder = self.root / data_key(dataset)
        paths = {m: folder / f"{m}-{keys[m]}-{self.dtype}.npy" for m in cached}
        mask_paths = {m: folder / f"{m}-{keys[m]}-mask.pt" for m in cached}
        shapes = {m: (len(dataset), *model.encoders[m].out_shape) for m in cached}
        labels_path = folder / "labels.pt"
        stored = {m: _read_mask(mask_paths[m], shapes[m]) for m in cached}
        masks = {m: None if stored[m] is None else stored[m].mask for m in cached}
        missing = [
            m
            for m in cached
            if stored[m] is None or not self._valid(paths[m], shapes[m], stored[m])
        ]
        labels = _read_labels(labels_path)
        if missing or labels is None:
            log.info("feature cache: encoding %s%s into %s", missing, of_split(split), folder)
            loader = DataLoader(
                dataset,
                batch_size=batch_size,
                collate_fn=collate_fn,
                num_workers=num_workers,
                pin_memory=device.type == "cuda",
                generator=torch.Generator(),  # not the global one: a cache miss draws nothing
            )
            labels, built, digests = self._build(
                model, loader, {m: paths[m] for m in missing}, shapes, device, autocast
            )
            for m, mask in built.items():
                save_checkpoint(mask_paths[m], {"mask": mask, "digest": digests[m]})
                masks[m] = mask
            save_checkpoint(labels_path, labels)
        else:
            log.info("feature cache: reading %s%s from %s", cached, of_split(split), folder)
        features = {m: np.load(paths[m], mmap_mode="r") for m in cached}
        labels = {**labels, "present": {**labels["present"], **masks}}
        live = [m for m in model.encoders if m not in features]
        return EncodedDataset(dataset, features, labels, live, collate_fn)

    def _valid(self, path: Path, shape: tuple[int, ...], stored: StoredMask) -> bool:
        """Whether `path` holds features of `shape`, whose bytes have the digest recorded
        when they were written, finite wherever the stored mask says the encoder output is
        present; a damaged or changed file is said and rebuilt.

        Reading and hashing the bytes is skipped when the file's size and modification time
        are those recorded when it last passed this check, and it cannot have changed since
        within the same tick of the file system's clock (its recorded time is older than
        the record's own: the rule git uses against "racily clean" files)."""
        if not path.is_file():
            return False
        try:
            features = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:  # cut short or overwritten
            _rebuilding(f"{path} is corrupt or truncated ({err})")
            return False
        expected = (shape, np.dtype(DTYPES[self.dtype]))
        if (features.shape, features.dtype) != expected:
            _rebuilding(
                f"{path}: expected features of shape {list(shape)} and dtype {expected[1]}, "
                f"found {list(features.shape)} and {features.dtype}"
            )
            return False
        if stored.unchanged(path):
            return True
        found = file_digest(path)
        if found != stored.digest:
            _rebuilding(
                f"{path} does not hold the features written there: its content changed since "
                f"(copied over from another file, or edited; expected {stored.digest}, found "
                f"{found})"
            )
            return False
        present = stored.mask.numpy().astype(bool)
        broken = ~np.isfinite(features).reshape(*present.shape, -1).all(axis=-1) & present
        if broken.any():
            rows = np.flatnonzero(broken.reshape(len(broken), -1).any(axis=1))
            _rebuilding(
                f"{path} holds NaN or infinite features for {len(rows)} samples that have the "
                f"modality (the first: sample {rows[0]}); expected finite features"
            )
            return False
        stored.record(path)
        return True

    @torch.no_grad()
    def _build(
        self,
        model: nn.Module,
        loader: DataLoader,
        paths: dict[str, Path],
        shapes: dict[str, tuple[int, ...]],
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
        """Encode every batch once into `.npy` files that appear only when complete; return
        the split's labels, gathered in the same pass, the output mask of each modality
        encoded now and the digest of each file written (hashed as it is written).

        The labels hold each modality's [N] sample mask (a padded [B, T] input mask's T
        changes from batch to batch, so it could not be stacked). A cached modality's
        encoder never runs again, so its output mask ([N], or [N, T'] for tokens: what the
        fuser needs) is kept beside its features, under the same encoder key.
        """
        dtype = np.dtype(DTYPES[self.dtype])
        check_free_space({path: npy_size(shapes[m], dtype) for m, path in paths.items()})
        with contextlib.ExitStack() as stack:
            files = {}
            for m, path in paths.items():
                tmp = stack.enter_context(atomic_path(path))
                files[m] = NpyWriter(stack.enter_context(open(tmp, "wb", buffering=0)), path)
            for m, file in files.items():
                file.write(npy_header(shapes[m], dtype))
            labels, masks = [], {m: [] for m in paths}
            for batch in loader:
                on_device = batch.to(device)
                present = {m: sample_mask(p, len(p)) for m, p in batch.present.items()}
                labels.append(dataclasses.replace(batch, inputs={}, present=present))
                with autocast():
                    for m, file in files.items():
                        encoder = model.encoders[m]
                        x, p = on_device.inputs[m], on_device.present.get(m)
                        features = encoder.encode(x, p).float().cpu().numpy()
                        if features.shape[1:] != shapes[m][1:]:
                            raise ValueError(
                                f"modality '{m}': the encoder's out_shape is "
                                f"{list(shapes[m][1:])}, but it gave features of shape "
                                f"{list(features.shape[1:])}"
                            )
                        file.write(np.ascontiguousarray(features, dtype=dtype))
                        masks[m].append(encoder.output_mask(x, p).cpu())
            for m, file in files.items():
                file.check_size(npy_size(shapes[m], dtype))
        digests = {m: file.digest() for m, file in files.items()}
        return stack_labels(labels), {m: torch.cat(parts) for m, parts in masks.items()}, digests


def of_split(split: str | None) -> str:
    return "" if split is None else f" of the {split} split"


def _rebuilding(problem: str) -> None:
    """Say that a cache file is unusable and will be rebuilt (never silently reused)."""
    log.warning("feature cache: %s; rebuilding it", problem)


@dataclasses.dataclass
class StoredMask:
    """What a cached modality's mask file (`path`) holds: the encoder's output mask, the
    digest of its features file, and that file's size and modification time (ns) when it
    last passed `FeatureCache._valid` (None before)."""

    path: Path
    mask: torch.Tensor
    digest: str
    checked: tuple[int, int] | None

    def unchanged(self, features: Path) -> bool:
        """Whether `features` is as it was when checked, by its size and modification
        time, and was older than this record, so that a change since would show."""
        found = os.stat(features)
        if self.checked != (found.st_size, found.st_mtime_ns):
            return False
        return found.st_mtime_ns < os.stat(self.path).st_mtime_ns

    def record(self, features: Path) -> None:
        """Keep `features`' size and time as checked now (rewrites the small mask file)."""
        found = os.stat(features)
        self.checked = (found.st_size, found.st_mtime_ns)
        save_checkpoint(
            self.path, {"mask": self.mask, "digest": self.digest, "checked": list(self.checked)}
        )


def _read_mask(path: Path, shape: tuple[int, ...]) -> StoredMask | None:
    """A cached modality's stored mask and digest (`StoredMask`), or None when missing,
    unreadable, not fitting its features' shape `shape` ([N] for vectors and maps, [N, T']
    for tokens) or without a digest (written before digests were kept): to rebuild."""
    try:
        stored = load_checkpoint(path, required=("mask",))
    except FileNotFoundError:
        return None
    except CheckpointError as err:
        _rebuilding(str(err))
        return None
    mask, digest = stored["mask"], stored.get("digest")
    expected = shape[:2] if len(shape) == 3 else shape[:1]
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(expected):
        found = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        _rebuilding(f"{path}: expected a mask of shape {list(expected)}, found {found}")
        return None
    if not isinstance(digest, str) or not digest.startswith(DIGEST_PREFIX):
        log.info(
            "feature cache: %s records no digest of its features (written by an older "
            "version), so they cannot be checked; rebuilding them",
            path,
        )
        return None
    checked = stored.get("checked")
    valid = isinstance(checked, list) and len(checked) == 2 and all(type(v) is int for v in checked)
    return StoredMask(path, mask, digest, tuple(checked) if valid else None)


def file_digest(path: Path) -> str:
    """`sha256:<hex>` of a file's bytes, read in chunks (1 to 2 ms per MB)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(DIGEST_CHUNK):
            digest.update(chunk)
    return DIGEST_PREFIX + digest.hexdigest()


def _read_labels(path: Path) -> dict[str, Any] | None:
    """A split's cached labels, or None when they are missing or unreadable (to rebuild)."""
    try:
        return load_checkpoint(path, required=LABEL_FIELDS)
    except FileNotFoundError:
        return None
    except CheckpointError as err:
        _rebuilding(str(err))
        return None


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The `.npy` header of a C-ordered array of `shape` and `dtype`."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def npy_size(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes of a `.npy` file holding an array of `shape` and `dtype`."""
    return len(npy_header(shape, dtype)) + int(np.prod(shape)) * dtype.itemsize


def check_free_space(sizes: Mapping[Path, int]) -> None:
    """Refuse, before anything is written, files that the disk has no room for."""
    if not sizes:
        return
    folder = next(iter(sizes)).parent
    folder.mkdir(parents=True, exist_ok=True)
    needed, free = sum(sizes.values()), shutil.disk_usage(folder).free
    if needed > free:
        raise OSError(
            errno.ENOSPC,
            f"feature cache: writing {[p.name for p in sizes]} into {folder} needs {needed} bytes "
            f"of free space, {free} are free; free some, or set paths.feature_cache_dir to a "
            "larger disk (or trainer.feature_cache.enabled=false)",
        )


class NpyWriter:
    """A `.npy` file written with plain writes, not through a memory map: on a full disk a
    write into a memory map kills the process with SIGBUS, a plain write raises ENOSPC,
    here an `OSError` naming the file. `file` is unbuffered (every error surfaces in
    `write`); `path` is the name it will have once complete."""

    def __init__(self, file: io.RawIOBase, path: Path) -> None:
        self.file, self.path, self.size = file, path, 0
        self.hash = hashlib.sha256()

    def write(self, data: bytes | np.ndarray) -> None:
        view = memoryview(data).cast("B")
        self.size += len(view)
        self.hash.update(view)
        try:
            while view:
                view = view[self.file.write(view) :]
        except OSError as err:
            free = shutil.disk_usage(self.path.parent).free
            raise OSError(
                err.errno,
                f"feature cache: writing {self.path} failed ({err.strerror}); it needs "
                f"{self.size - len(view)} more bytes at least, {free} are free on its disk",
            ) from err

    def digest(self) -> str:
        """`file_digest` of what was written, without reading the file back."""
        return DIGEST_PREFIX + self.hash.hexdigest()

    def check_size(self, expected: int) -> None:
        """A file shorter than its header says would be refused by every later read."""
        if self.size != expected:
            raise ValueError(
                f"feature cache: {self.path} should hold {expected} bytes, {self.size} were "
                "written: the dataset gave fewer or more items than its length"
            )


def stack_labels(batches: Iterable[Batch]) -> dict[str, Any]:
    """Everything but the inputs of every batch, concatenated: masks, targets, conditions."""
    parts = list(batches)
    return {
        "present": _cat([b.present for b in parts]),
        "targets": _cat([b.targets for b in parts]),
        "condition": _cat([b.condition for b in parts]),
        "modality_targets": _cat([b.modality_targets for b in parts]),
    }


def _cat(values: list) -> Any:
    if values[0] is None:
        return None
    if isinstance(values[0], dict):
        return {k: torch.cat([v[k] for v in values]) for k in values[0]}
    return torch.cat(values)


def _take(value: Any, index: torch.Tensor) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: v[index] for k, v in value.items()}
    return value[index]


def keep_batch(batch: Batch) -> Batch:
    """The DataLoader `collate_fn` for `EncodedDataset`: its `__getitems__` already batches."""
    return batch


class EncodedDataset(Dataset):
    """A split whose cached modalities are features read from disk, a batch at a time.

    `__getitems__` (which `DataLoader` calls with a whole batch of indices) reads those rows
    of each memory-mapped array at once and returns a ready `Batch`, marked `encoded` for
    the cached modalities. The `live` modalities (encoders not cached) are read from the
    original dataset and collated as usual; with none, the original items are never read.

    A cached modality's `present` is its encoder's output mask, stored by the cache
    ([N] for vectors, [N, T'] for token features [N, T', D]), so the model hands it to the
    fuser as is; a live modality's is the collated one, which its encoder turns into its
    output mask.
    """

    deterministic = True

    def __init__(
        self,
        dataset: Dataset,
        features: Mapping[str, np.ndarray],
        labels: Mapping[str, Any],
        live: Iterable[str] = (),
        collate_fn: Callable = collate,
    ) -> None:
        self.dataset = dataset
        self.features = dict(features)
        self.labels = dict(labels)
        self.live = list(live)
        self.collate_fn = collate_fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        """Anything else (views, classes, task, ...) is the original dataset's."""
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitems__(self, indices: list[int]) -> Batch:
        index = torch.as_tensor(indices, dtype=torch.long)
        inputs = {
            m: torch.from_numpy(np.ascontiguousarray(array[index.numpy()])).float()
            for m, array in self.features.items()
        }
        present = _take(self.labels["present"], index)
        if self.live:
            raw = self.collate_fn([self.dataset[i] for i in indices])
            inputs.update({m: raw.inputs[m] for m in self.live})
            present.update({m: raw.present[m] for m in self.live})
        return Batch(
            inputs=inputs,
            present={m: mask for m, mask in present.items() if m in inputs},
            targets=_take(self.labels["targets"], index),
            condition=_take(self.labels["condition"], index),
            modality_targets=_take(self.labels["modality_targets"], index),
            encoded=frozenset(self.features),
        )

    def __getitem__(self, index: int) -> Batch:
        return self.__getitems__([index])

    def __getstate__(self) -> dict[str, Any]:
        """Pickle memory maps as their file names (for worker processes), not their data."""
        state = dict(self.__dict__)
        state["features"] = {
            m: _MappedFile(a.filename) if isinstance(a, np.memmap) else a
            for m, a in self.features.items()
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["features"] = {
            m: np.load(a.path, mmap_mode="r") if isinstance(a, _MappedFile) else a
            for m, a in state["features"].items()
        }
        self.__dict__.update(state)


@dataclasses.dataclass(frozen=True)
class _MappedFile:
    path: str
