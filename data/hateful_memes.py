"""Hateful Memes (Kiela et al., NeurIPS 2020): is a meme, its picture and its caption
together, hateful?

The release (hatefulmemeschallenge.com, final phase) unpacks as:

    <root>/img/<id>.png        the memes (RGB or RGBA PNGs of varying size)
    <root>/train.jsonl         8,500 lines
    <root>/dev_seen.jsonl      500 (validation)     <root>/dev_unseen.jsonl   540
    <root>/test_seen.jsonl     1,000 (test)         <root>/test_unseen.jsonl  2,000

with one JSON object per line: `{"id": 42953, "img": "img/42953.png", "label": 0,
"text": "..."}` (label 1 = hateful). The "unseen" files are the second phase's splits;
`val_file` and `test_file` choose them. The paper's benchmark compares unimodal and
multimodal models on exactly this pairing: the caption or the picture alone is often
benign, their combination is not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from data import checks
from fusion.data import Modality, MultimodalDataset, Task, file_digest

SPLITS = ("train", "val", "test")
HATEFUL = Task("binary", classes=("not hateful", "hateful"))
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
FORMAT_VERSION = 1  # bump when what an item holds changes for the same files and settings


def read_annotations(path: Path) -> list[dict[str, object]]:
    """The lines of a split's jsonl file, each checked for `img`, `text` and a 0/1 label;
    errors name the file and the line."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Hateful Memes split file not found: {path.resolve()}; point data.root at the "
            "unpacked release (img/, train.jsonl, dev_seen.jsonl, test_seen.jsonl, ...)"
        )
    lines = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                lines.append(parse_line(line, path, number))
    return lines


def parse_line(line: str, path: Path, number: int) -> dict[str, object]:
    """One annotation: `img` (path under the root), `text` (str) and `label` (0 or 1)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}, line {number}: expected a JSON object, got {line.strip()[:80]}")
    missing = [k for k in ("img", "text") if k not in record]
    if missing:
        raise ValueError(f"{path}, line {number}: no {missing} in {sorted(record)}")
    for key in ("img", "text"):
        if not isinstance(record[key], str):
            raise ValueError(
                f"{path}, line {number}: '{key}' must be a string, found "
                f"{type(record[key]).__name__} {record[key]!r}"
            )
    if "label" not in record:
        raise ValueError(
            f"{path}, line {number}: no 'label'; every split is trained on or scored, so each "
            "line needs one (the first phase's test.jsonl has none: use test_seen.jsonl)"
        )
    if record["label"] not in (0, 1) or isinstance(record["label"], bool):
        raise ValueError(f"{path}, line {number}: label must be 0 or 1, got {record['label']!r}")
    return {"img": record["img"], "text": record["text"], "label": int(record["label"])}


class HatefulMemes(MultimodalDataset):
    """One split of Hateful Memes: `{"image": [3, H, W], "text": str, "label": 0 or 1}`.

    `root` is the unpacked release. Train is `train.jsonl`; val and test are `val_file`
    and `test_file` (default `dev_seen.jsonl` and `test_seen.jsonl`, which carry labels).
    Images are decoded as RGB, scaled to [0, 1] and resized to `image_size` [H, W] with
    antialiasing (aspect ratio not kept); the image encoder standardizes them with the
    ImageNet mean and std its pretrained weights expect. `max_samples` keeps the first
    lines.
    """

    splits = SPLITS
    deterministic = True

    def __init__(
        self,
        split: str = "train",
        *,
        root: str | os.PathLike[str],
        image_size: tuple[int, int] | list[int] = (224, 224),
        val_file: str = "dev_seen.jsonl",
        test_file: str = "test_seen.jsonl",
        max_samples: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
        self.image_size = list(checks.image_size(image_size))
        checks.max_samples(max_samples)
        self.split = split
        self.root = Path(root)
        self.settings = {"image_size": self.image_size, "max_samples": max_samples}
        files = {"train": "train.jsonl", "val": val_file, "test": test_file}
        self.annotation_file = self.root / files[split]
        self.records = read_annotations(self.annotation_file)[:max_samples]
        self.images = [self.root / str(r["img"]) for r in self.records]
        self._check_images()

    def _check_images(self) -> None:
        missing = [str(p.resolve()) for p in self.images if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) named in {self.annotation_file} are missing, "
                f"e.g. {missing[:3]}"
            )

    @property
    def modalities(self) -> dict[str, Modality]:
        """RGB images [3, H, W] (ImageNet statistics) and the meme's caption."""
        info = {
            "shape": [3, *self.image_size],
            "in_channels": 3,
            "image_size": list(self.image_size),
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        }
        return {"image": Modality("image", info), "text": Modality("text")}

    @property
    def tasks(self) -> dict[str, Task]:
        return {"hateful": HATEFUL}

    def fingerprint(self) -> str:
        """The bytes of the split's jsonl file and of every image it names, the settings and
        the format version (file digests are memoized, so only the first call reads them)."""
        images = [file_digest(p) for p in self.images]
        settings = {"split": self.split, "file": self.annotation_file.name, **self.settings}
        return json.dumps(
            [FORMAT_VERSION, settings, file_digest(self.annotation_file), images], sort_keys=True
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, object]:
        record = self.records[index]
        return {
            "image": self.load_image(self.images[index]),
            "text": record["text"],
            "label": record["label"],
        }

    def load_image(self, path: Path) -> torch.Tensor:
        """[3, H, W] float in [0, 1]: decoded as RGB (alpha dropped, grey repeated), scaled
        by its integer type's range (8- or 16-bit PNGs alike), resized."""
        decoded = decode_image(str(path), mode=ImageReadMode.RGB)
        pixels = TF.to_dtype(decoded, torch.float32, scale=True)
        return TF.resize(pixels, self.image_size, antialias=True)
