"""Write AV-Digits as a folder of real files and a manifest, the manifest dataset's example.

    python -m data.export_avdigits OUT_DIR [--max-samples N] [--seed S]

writes `OUT_DIR/images/<split>_<i>.png` (8x8 grey), `OUT_DIR/audio/<split>_<i>.wav`
(16-bit PCM) and `OUT_DIR/manifest.csv` (columns image, audio, label, split; paths relative
to OUT_DIR), so that `data=manifest data.path=OUT_DIR/manifest.csv data.target=label`
trains on the same samples as the built-in reader. Each split is its fixed draw
(`augment=False`, the train split too): files hold one draw, not a fresh one per epoch.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

import soundfile
import torch
from torchvision.io import encode_png, write_file

from data.avdigits import SPLITS, AVDigits

COLUMNS = ("image", "audio", "label", "split")


def png_pixels(image: torch.Tensor) -> torch.Tensor:
    """A float image as uint8 pixels: clipped to [0, 1] (the noise leaves it), then scaled."""
    return (image.clamp(0.0, 1.0) * 255).round().to(torch.uint8)


def draw_splits(max_samples: int | None, seed: int) -> dict[str, AVDigits]:
    """Each split's fixed draw."""
    return {
        split: AVDigits(split, augment=False, max_samples=max_samples, seed=seed)
        for split in SPLITS
    }


def export(
    out_dir: str | Path, max_samples: int | None = None, seed: int = 0, overwrite: bool = False
) -> Path:
    """Write the files and the manifest under `out_dir`; returns the manifest's path.
    A file of the same name already there is refused (`FileExistsError`, before anything
    is written) unless `overwrite`.

    Clips are scaled by one factor, 1 / (the largest absolute sample over every split), so
    that none clips in 16-bit PCM and their relative loudness is kept.
    """
    out = Path(out_dir)
    datasets = draw_splits(max_samples, seed)
    names = ["manifest.csv"] + [
        f"{folder}/{split}_{i}.{ext}"
        for split, dataset in datasets.items()
        for i in range(len(dataset))
        for folder, ext in (("images", "png"), ("audio", "wav"))
    ]
    held = [name for name in names if (out / name).exists()]
    if held and not overwrite:
        raise FileExistsError(
            f"{out} already holds {len(held)} of the files this export would write "
            f"({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); nothing was written. "
            "Choose a new or empty folder, or pass --overwrite to replace them"
        )
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    items = {split: list(dataset) for split, dataset in datasets.items()}
    peak = max(float(item["audio"].abs().max()) for split in items.values() for item in split)
    scale = 1.0 / peak if peak > 0 else 1.0
    rows = []
    for split, split_items in items.items():
        sample_rate = datasets[split].sample_rate
        for i, item in enumerate(split_items):
            image, audio = f"images/{split}_{i}.png", f"audio/{split}_{i}.wav"
            write_file(str(out / image), encode_png(png_pixels(item["image"])))
            clip = (item["audio"] * scale).numpy()
            soundfile.write(out / audio, clip, sample_rate, subtype="PCM_16")
            rows.append({"image": image, "audio": audio, "label": item["label"], "split": split})
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    counts = ", ".join(f"{len(v)} {k}" for k, v in items.items())
    print(
        f"wrote {len(rows)} samples ({counts}) to {out}: images/*.png (8x8 grey), "
        f"audio/*.wav ({datasets['train'].sample_rate} Hz, 16-bit, scaled by 1/{peak:.3f}), "
        f"and {manifest}"
    )
    return manifest


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m data.export_avdigits",
        description="Write AV-Digits as image and audio files plus manifest.csv.",
    )
    parser.add_argument("out_dir", help="folder to write into (created if needed)")
    parser.add_argument("--max-samples", type=int, default=None, help="at most N per split")
    parser.add_argument("--seed", type=int, default=0, help="AV-Digits seed (splits, draws)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace files of the same names in out_dir"
    )
    args = parser.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"--max-samples must be a positive integer, got {args.max_samples}")
    folder = Path(args.out_dir)
    blocking = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        parser.error(f"argument out_dir: expected a folder, but {blocking} is a file")
    try:
        return export(args.out_dir, args.max_samples, args.seed, args.overwrite)
    except FileExistsError as err:
        parser.error(f"argument out_dir: {err}")


if __name__ == "__main__":
    main()
