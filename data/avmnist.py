"""AV-MNIST as MultiBench distributes it: MNIST digits paired with spoken-digit spectrograms.

AV-MNIST comes from MFAS (Pérez-Rúa et al., CVPR 2019): 28x28 MNIST images with most of
their energy removed, each paired with a 112x112 spectrogram of the same digit spoken
(with background noise). MultiBench (Liang et al., NeurIPS 2021; github.com/pliang279/
MultiBench, `datasets/avmnist/get_data.py`) ships it as `avmnist.tar.gz`, unpacked as:

    <root>/image/train_data.npy   [60000, 784] (or [N, 28, 28]), pixel values 0-255
    <root>/image/test_data.npy    [10000, 784]
    <root>/audio/train_data.npy   [60000, 112, 112] (or [N, 12544]), values 0-255
    <root>/audio/test_data.npy    [10000, 112, 112]
    <root>/train_labels.npy       [60000] digits 0-9
    <root>/test_labels.npy        [10000]

MultiBench validates on the last 5,000 training samples and trains on the first 55,000;
`val_size` keeps that split. Both modalities are pictures ([1, 28, 28] and [1, 112, 112]),
so both are of kind `image` and go to image encoders. Arrays are memory-mapped: an item
reads its own rows only.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import torch

from data import checks
from fusion.data import Modality, MultimodalDataset, Task, file_digest

SPLITS = ("train", "val", "test")
SIDES = {"image": 28, "audio": 112}
"""Each modality's picture side, as MultiBench reshapes them."""
DIGIT = Task("multiclass", classes=tuple(str(d) for d in range(10)))
PIXEL_SCALE = 255.0
STATS_SAMPLES = 2000
"""Training samples (evenly spaced) that estimate each modality's mean and std."""
FORMAT_VERSION = 1  # bump when what an item holds changes for the same files and settings


def split_files(root: Path, source: str) -> dict[str, Path]:
    """The files of MultiBench's `source` part ("train" or "test"), by modality and label."""
    files = {m: root / m / f"{source}_data.npy" for m in SIDES}
    files["label"] = root / f"{source}_labels.npy"
    return files


def require_files(files: dict[str, Path]) -> None:
    missing = [str(p.resolve()) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"AV-MNIST file(s) not found: {missing}; point data.root at the unpacked "
            "avmnist folder of MultiBench (image/, audio/, train_labels.npy, test_labels.npy)"
        )


def as_pictures(array: np.ndarray, side: int, path: Path) -> np.ndarray:
    """A view of `array` as [N, side, side]: MultiBench stores images flat ([N, side²])."""
    shape = tuple(array.shape)
    if shape[1:] in ((side * side,), (side, side), (1, side, side)):
        return array.reshape(len(array), side, side)
    raise ValueError(
        f"{path} holds an array of shape {list(shape)}; expected [N, {side * side}], "
        f"[N, {side}, {side}] or [N, 1, {side}, {side}]"
    )


def read_labels(path: Path) -> np.ndarray:
    """Digits [N] as int64, from [N] or [N, 1] integral values in 0-9."""
    labels = np.load(path)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"{path} holds labels of shape {list(labels.shape)}; expected [N]")
    if labels.size and (np.any(labels != np.round(labels)) or labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path} holds labels outside the digits 0-9: {np.unique(labels)[:20]}")
    return labels.astype(np.int64)


def check_lengths(arrays: dict[str, np.ndarray], files: dict[str, Path]) -> None:
    """Every file of a part holds the same number of samples."""
    first = next(iter(arrays))
    for name, array in arrays.items():
        if len(array) != len(arrays[first]):
            raise ValueError(
                f"{files[name]} has {len(array)} samples (shape {list(array.shape)}) but "
                f"{files[first]} has {len(arrays[first])} (shape {list(arrays[first].shape)})"
            )


def training_size(labels: Path, total: int, val_size: int) -> int:
    """Training samples left once the last `val_size` of `total` go to validation."""
    if val_size >= total:
        raise ValueError(f"val_size={val_size} leaves no training samples: {labels} has {total}")
    return total - val_size


def pixel_stats(path: Path, side: int, stop: int) -> tuple[float, float, float]:
    """Mean, std and maximum of the raw pixel values of the first `stop` samples in `path`
    (the training part), from up to `STATS_SAMPLES` evenly spaced ones; memoized per file
    version."""
    stat = path.stat()
    return _pixel_stats(str(path.resolve()), stat.st_size, stat.st_mtime_ns, side, stop)


@functools.lru_cache(maxsize=16)
def _pixel_stats(path: str, size: int, mtime_ns: int, side: int, stop: int) -> tuple[float, ...]:
    pictures = as_pictures(np.load(path, mmap_mode="r"), side, Path(path))
    rows = np.unique(np.linspace(0, stop - 1, min(stop, STATS_SAMPLES)).astype(np.int64))
    values = np.asarray(pictures[rows], dtype=np.float64)
    return float(values.mean()), float(values.std()), float(values.max())


def check_scale(path: Path, dtype: np.dtype, top: float, normalize: bool) -> None:
    """Pixels are used in [0, 1]: integer pixels (0-255) are divided by 255, never used
    raw; float pixels are divided by 255 with `normalize` (MultiBench's 0-255 floats), so
    floats already in [0, 1] or values above 255 cannot be what the files hold."""
    if np.issubdtype(dtype, np.integer) and not normalize:
        raise ValueError(
            f"data.normalize: false would use the {dtype} pixels of {path} (0-255) unscaled; "
            "expected true for integer pixels (they are divided by 255), found false"
        )
    if normalize and top > PIXEL_SCALE:
        raise ValueError(
            f"data.normalize: true divides by {PIXEL_SCALE:g}, but {path} holds values up to "
            f"{top:g} (sampled); expected pixel values 0-{PIXEL_SCALE:g}"
        )
    if normalize and not np.issubdtype(dtype, np.integer) and 0 < top <= 1:
        raise ValueError(
            f"data.normalize: true would divide {path}'s {dtype} pixels, already in [0, 1] "
            f"(max {top:g} sampled), by {PIXEL_SCALE:g} again; set data.normalize=false"
        )


class AVMNIST(MultimodalDataset):
    """One split of AV-MNIST: `{"image": [1, 28, 28], "audio": [1, 112, 112], "label": digit}`.

    `root` is the unpacked avmnist folder (see the module docstring). `val_size` samples
    at the end of the training files form the validation split (MultiBench: 5,000), the
    rest the training split; test is the test files. `normalize` divides pixel values by
    255 as MultiBench does (integer pixels always are; floats already in [0, 1] are refused
    with it). `max_samples` keeps the first samples of the split. Each
    modality's `mean` and `std` (for the image encoder's standardization) are estimated on
    the training split.
    """

    splits = SPLITS
    deterministic = True

    def __init__(
        self,
        split: str = "train",
        *,
        root: str | os.PathLike[str],
        val_size: int = 5000,
        max_samples: int | None = None,
        normalize: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
        checks.integer("val_size", val_size, 1)
        checks.max_samples(max_samples)
        checks.flag("normalize", normalize)
        self.split = split
        self.root = Path(root)
        self.settings = {"val_size": val_size, "max_samples": max_samples, "normalize": normalize}
        self.scale = PIXEL_SCALE if normalize else 1.0
        self.files = split_files(self.root, "test" if split == "test" else "train")
        require_files(self.files)
        arrays = self._open()
        for m, array in arrays.items():
            if np.issubdtype(array.dtype, np.integer):
                check_scale(self.files[m], array.dtype, 0.0, normalize)
        self.labels = read_labels(self.files["label"])
        check_lengths({**arrays, "label": self.labels}, self.files)
        self.rows = self._rows(len(self.labels), val_size, max_samples)
        self._arrays: dict[str, np.ndarray] | None = arrays
        self._modalities = self._describe(val_size)

    def _open(self) -> dict[str, np.ndarray]:
        """Each modality's pictures [N, side, side], memory-mapped."""
        return {
            m: as_pictures(np.load(self.files[m], mmap_mode="r"), side, self.files[m])
            for m, side in SIDES.items()
        }

    def _rows(self, total: int, val_size: int, max_samples: int | None) -> range:
        """This split's rows of its files: train [0, N - val_size), val the last val_size."""
        if self.split == "test":
            rows = range(total)
        else:
            cut = training_size(self.files["label"], total, val_size)
            rows = range(cut) if self.split == "train" else range(cut, total)
        return rows if max_samples is None else rows[:max_samples]

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The memory-mapped arrays, reopened after unpickling (workers get paths, not data)."""
        if self._arrays is None:
            self._arrays = self._open()
        return self._arrays

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def _describe(self, val_size: int) -> dict[str, Modality]:
        """Both modalities, with the pixel statistics of the training split (from the
        training files, whichever split this is)."""
        train = split_files(self.root, "train")
        require_files(train)
        total = len(np.load(train["label"], mmap_mode="r"))
        stop = training_size(train["label"], total, val_size)
        out = {}
        for m, side in SIDES.items():
            mean, std, top = pixel_stats(train[m], side, stop)
            check_scale(train[m], np.load(train[m], mmap_mode="r").dtype, top, self.scale > 1)
            mean, std = mean / self.scale, max(std / self.scale, 1e-6)
            info = {"shape": [1, side, side], "in_channels": 1, "image_size": [side, side]}
            out[m] = Modality("image", {**info, "mean": [mean], "std": [std]})
        return out

    @property
    def modalities(self) -> dict[str, Modality]:
        """Two grey pictures: digit images [1, 28, 28] and spectrograms [1, 112, 112]."""
        return self._modalities

    @property
    def tasks(self) -> dict[str, Task]:
        return {"digit": DIGIT}

    def fingerprint(self) -> str:
        """The bytes of the files this split reads, the settings and the format version."""
        digests = {name: file_digest(path) for name, path in self.files.items()}
        settings = {"split": self.split, **self.settings}
        return json.dumps([FORMAT_VERSION, settings, digests], sort_keys=True)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, object]:
        row = self.rows[index]
        item: dict[str, object] = {
            m: torch.from_numpy(np.asarray(array[row], dtype=np.float32) / self.scale).unsqueeze(0)
            for m, array in self.arrays.items()
        }
        item["label"] = int(self.labels[row])
        return item
