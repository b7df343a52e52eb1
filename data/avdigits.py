"""AV-Digits: handwritten digit scans paired with spoken digit words, both degraded.

Images are scikit-learn's 1,797 real 8x8 digit scans; audio clips are espeak-ng speech
from `data/make_avdigits_speech.py`, committed as a compact asset. Each sample pairs an
image with a clip of the same digit. Splits are fixed by `seed`, and the speakers of the
validation and test clips are never heard in training. Every sample is degraded (image
occlusion and noise, audio noise at a low signal-to-noise ratio) with its own strength,
so that neither modality alone suffices and fusing them pays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

SPEECH_ASSET = Path(__file__).resolve().parent / "assets" / "avdigits_speech.npz"
SPLITS = ("train", "val", "test")
MODALITIES = ("image", "audio")
IMAGE_SIZE = (8, 8)


@dataclass(frozen=True)
class SpeechClips:
    """Variable-length float32 clips with their digit and speaker."""

    clips: list[np.ndarray]
    digits: np.ndarray
    speakers: np.ndarray
    speaker_names: np.ndarray
    sample_rate: int


def load_speech_clips(path: str | Path = SPEECH_ASSET) -> SpeechClips:
    """Read the speech asset written by `data.make_avdigits_speech`, checking its layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"AV-Digits speech asset not found at {path}; regenerate it with "
            "`make speech` (needs espeak-ng) or point data.speech_path at a copy"
        )
    with np.load(path) as npz:
        required = ("waveforms", "offsets", "digits", "speakers", "speaker_names", "sample_rate")
        missing = [k for k in required if k not in npz.files]
        if missing:
            raise ValueError(f"{path} lacks arrays {missing}; it has {sorted(npz.files)}")
        waveforms = npz["waveforms"].astype(np.float32) / 32768.0
        offsets = npz["offsets"]
        digits = npz["digits"].astype(np.int64)
        if len(offsets) != len(digits) + 1:
            raise ValueError(
                f"{path}: 'offsets' has {len(offsets)} entries, expected {len(digits) + 1} "
                "(one more than the number of clips)"
            )
        clips = [waveforms[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        return SpeechClips(
            clips=clips,
            digits=digits,
            speakers=npz["speakers"].astype(np.int64),
            speaker_names=npz["speaker_names"],
            sample_rate=int(npz["sample_rate"]),
        )


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Split indices into len(fractions) parts with the same label mix, in shuffled order."""
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    bounds = np.cumsum(fractions)[:-1]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.round(bounds * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
            part.append(chunk)
    return [rng.permutation(np.concatenate(p)) for p in parts]


def _check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be [min, max] with {low} <= min <= max <= {high}, got {value}")
    return float(value[0]), float(value[1])


class AVDigits(Dataset):
    """One split of AV-Digits; items are `{"image": [1, 8, 8], "audio": [T], "label": int}`.

    All degradations are drawn once from `seed` when the split is built, so every epoch
    and every run sees the same samples.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        seed: int = 0,
        fractions: Sequence[float] = (0.6, 0.2, 0.2),
        clip_seconds: float = 1.0,
        occlusion: Sequence[float] = (0.4, 0.8),
        image_noise_std: float = 0.3,
        audio_snr_db: Sequence[float] = (-12.0, -3.0),
        max_samples: int | None = None,
        speech_path: str | Path = SPEECH_ASSET,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
        if len(fractions) != 3 or min(fractions) <= 0 or not np.isclose(sum(fractions), 1.0):
            raise ValueError(f"fractions must be 3 positive numbers summing to 1, got {fractions}")
        if image_noise_std < 0:
            raise ValueError(f"image_noise_std must be >= 0, got {image_noise_std}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be a positive integer or None, got {max_samples}")
        self.split = split
        self.occlusion = _check_range("occlusion", occlusion, 0.0, 1.0)
        self.image_noise_std = float(image_noise_std)
        self.audio_snr_db = _check_range("audio_snr_db", audio_snr_db, -60.0, 60.0)

        speech = load_speech_clips(speech_path)
        self.sample_rate = speech.sample_rate
        self.clip_samples = int(round(clip_seconds * speech.sample_rate))
        split_id = SPLITS.index(split)
        digits = load_digits()
        image_part = stratified_split(digits.target, fractions, np.random.default_rng(seed))
        speaker_part = np.split(
            np.random.default_rng([seed, 1]).permutation(len(speech.speaker_names)),
            np.round(np.cumsum(fractions)[:-1] * len(speech.speaker_names)).astype(int),
        )
        image_idx = image_part[split_id][:max_samples]
        self.speakers = np.sort(speaker_part[split_id])
        self.speaker_names = [str(speech.speaker_names[s]) for s in self.speakers]

        rng = np.random.default_rng([seed, 2, split_id])
        labels = digits.target[image_idx].astype(np.int64)
        clip_ids = self._pair_clips(speech, labels, rng)
        self.images = self._degrade_images(digits.images[image_idx] / 16.0, rng)
        self.audio = self._degrade_audio([speech.clips[i] for i in clip_ids], rng)
        self.labels = torch.from_numpy(labels)
        self.clip_ids = clip_ids

    def _pair_clips(
        self, speech: SpeechClips, labels: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        in_split = np.isin(speech.speakers, self.speakers)
        pool = {d: np.flatnonzero(in_split & (speech.digits == d)) for d in range(10)}
        for d, ids in pool.items():
            if len(ids) == 0:
                raise ValueError(f"no '{self.split}' speaker says digit {d} in the speech asset")
        return np.array([rng.choice(pool[int(label)]) for label in labels], dtype=np.int64)

    def _degrade_images(self, images: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """Blank a random square covering a random fraction of the image, then add noise."""
        height, width = IMAGE_SIZE
        out = images.astype(np.float32).copy()
        low, high = self.occlusion
        for img in out:
            side = int(round(np.sqrt(rng.uniform(low, high)) * height))
            if side > 0:
                top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
                img[top : top + side, left : left + side] = 0.0
        out += rng.normal(0.0, self.image_noise_std, out.shape).astype(np.float32)
        return torch.from_numpy(out).unsqueeze(1)

    def _degrade_audio(self, clips: list[np.ndarray], rng: np.random.Generator) -> torch.Tensor:
        """Place each clip at a random offset in a fixed window, add white noise at a random SNR."""
        out = np.zeros((len(clips), self.clip_samples), dtype=np.float32)
        low, high = self.audio_snr_db
        for row, clip in zip(out, clips, strict=True):
            if len(clip) > self.clip_samples:
                start = (len(clip) - self.clip_samples) // 2
                clip = clip[start : start + self.clip_samples]
            offset = rng.integers(0, self.clip_samples - len(clip) + 1)
            row[offset : offset + len(clip)] = clip
            noise_power = np.mean(clip**2) / 10 ** (rng.uniform(low, high) / 10)
            row += rng.normal(0.0, np.sqrt(noise_power), self.clip_samples).astype(np.float32)
        return torch.from_numpy(out)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return {
            "image": self.images[index],
            "audio": self.audio[index],
            "label": int(self.labels[index]),
        }
