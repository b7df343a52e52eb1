"""AV-Digits: handwritten digit scans paired with spoken digit words, both degraded.

Images are scikit-learn's 1,797 real 8x8 digit scans; audio clips are espeak-ng speech
from `data/make_avdigits_speech.py`, committed as a compact asset. Each sample pairs an
image with a clip of the same digit. Splits are fixed by `seed`, and the speakers of the
validation and test clips are never heard in training. Every sample is degraded (image
occlusion and noise, audio noise at a low signal-to-noise ratio) with its own strength,
so that neither modality alone suffices and fusing them pays.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import json
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.npyio import NpzFile

from data import checks
from fusion.data import Modality, MultimodalDataset, Task, file_digest

SPEECH_ASSET = Path(__file__).resolve().parent / "assets" / "avdigits_speech.npz"
SPLITS = ("train", "val", "test")
MODALITIES = ("image", "audio")
TASKS = ("digit", "same", "which", "multitask", "sum", "digits", "mixed")
IMAGE_SIZE = (8, 8)
DRAW_VERSION = 2  # bump when `_draw` or the degradations change what an item holds
DIGIT = Task("multiclass", classes=tuple(str(d) for d in range(10)))
SAME = Task("binary", classes=("different", "same"))
SUM = Task("regression", num_targets=1)
DIGITS = Task("multilabel", classes=tuple(str(d) for d in range(10)))
IMAGE_MEAN, IMAGE_STD = [0.3], [0.4]  # of the degraded scans, rounded


@dataclass(frozen=True)
class SpeechClips:
    """Variable-length float32 clips with their digit and speaker."""

    clips: list[np.ndarray]
    digits: np.ndarray
    speakers: np.ndarray
    speaker_names: np.ndarray
    sample_rate: int


def load_speech_clips(path: str | Path = SPEECH_ASSET) -> SpeechClips:
    """Read the speech asset written by `data.make_avdigits_speech`, checking its layout.

    Read once per process and file version: every split and view shares the clips.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"data.speech_path: AV-Digits speech asset not found at {path}; regenerate it with "
            "`make speech` (needs espeak-ng) or point data.speech_path at a copy"
        )
    return _read_speech_clips(path, path.stat().st_mtime_ns)


READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError)
"""What numpy raises on a corrupt, truncated or pickled file."""
SPEECH_ARRAYS = ("waveforms", "offsets", "digits", "speakers", "speaker_names", "sample_rate")


def asset_error(path: Path, problem: str) -> ValueError:
    """An error about the speech asset: its config key, its path and what is wrong."""
    return ValueError(f"data.speech_path: {path}: {problem}")


@functools.lru_cache(maxsize=4)
def _read_speech_clips(path: Path, mtime_ns: int) -> SpeechClips:
    arrays = read_npz(path, SPEECH_ARRAYS)
    waveforms = speech_waveforms(arrays["waveforms"], path)
    digits, speakers, names = arrays["digits"], arrays["speakers"], arrays["speaker_names"]
    offsets, rate = arrays["offsets"], arrays["sample_rate"]
    indices(digits, "digits", 10, path)
    indices(speakers, "speakers", len(names), path)
    if len(speakers) != len(digits):
        raise asset_error(
            path, f"'speakers' has {len(speakers)} entries, expected {len(digits)} (one per clip)"
        )
    if len(offsets) != len(digits) + 1:
        raise asset_error(
            path,
            f"'offsets' has {len(offsets)} entries, expected {len(digits) + 1} (one more than "
            "the number of clips)",
        )
    indices(offsets, "offsets", len(waveforms) + 1, path)
    if offsets[0] != 0 or offsets[-1] != len(waveforms) or np.any(np.diff(offsets) < 1):
        raise asset_error(
            path,
            f"'offsets' must rise from 0 to len(waveforms)={len(waveforms)}, one clip after "
            f"another; found {offsets[:3].tolist()} ... {offsets[-2:].tolist()}",
        )
    if rate.shape != () or not np.issubdtype(rate.dtype, np.integer) or rate <= 0:
        raise asset_error(path, f"'sample_rate' must be one positive integer (Hz), found {rate!r}")
    return SpeechClips(
        clips=[waveforms[a:b] for a, b in itertools.pairwise(offsets)],
        digits=digits.astype(np.int64),
        speakers=speakers.astype(np.int64),
        speaker_names=names,
        sample_rate=int(rate),
    )


def read_npz(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays `names` of an .npz file (never pickled objects), or an error naming the
    file: corrupt, truncated, not an .npz, or lacking an array."""
    expected = f"expected an .npz archive of the arrays {list(names)}"
    try:
        loaded = np.load(path)
    except READ_ERRORS as err:
        raise asset_error(path, f"{expected}, found a corrupt file ({err})") from None
    if not isinstance(loaded, NpzFile):
        raise asset_error(path, f"{expected}, found a single {loaded.dtype} array")
    with loaded as npz:
        missing = [k for k in names if k not in npz.files]
        if missing:
            raise asset_error(path, f"lacks arrays {missing}; it has {sorted(npz.files)}")
        try:
            return {k: npz[k] for k in names}
        except READ_ERRORS as err:
            raise asset_error(path, f"{expected}, found a corrupt file ({err})") from None


def speech_waveforms(waveforms: np.ndarray, path: Path) -> np.ndarray:
    """The clips' samples as float32: int16 PCM scaled once to [-1, 1), float samples used
    as they are (they are already on that scale), any other type refused."""
    if waveforms.ndim != 1:
        raise asset_error(
            path,
            f"'waveforms' must be 1-D (all clips end to end), found shape {list(waveforms.shape)}",
        )
    if waveforms.dtype == np.int16:
        return waveforms.astype(np.float32) / 32768.0
    if waveforms.dtype in (np.float16, np.float32, np.float64):
        if not np.isfinite(waveforms).all():
            raise asset_error(path, "'waveforms' holds non-finite (NaN or infinite) samples")
        return waveforms.astype(np.float32)
    raise asset_error(
        path,
        f"'waveforms' has dtype {waveforms.dtype}; expected int16 PCM (scaled by 1/32768) or "
        "float16/32/64 samples in [-1, 1] (used as they are)",
    )


def indices(values: np.ndarray, name: str, stop: int, path: Path) -> None:
    """A 1-D array of integers in [0, stop): labels and indices into other arrays."""
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise asset_error(
            path,
            f"'{name}' must be 1-D integers, found {values.dtype} of shape {list(values.shape)}",
        )
    if len(values) and (values.min() < 0 or values.max() >= stop):
        raise asset_error(
            path,
            f"'{name}' must lie in [0, {stop}), found values from {values.min()} to {values.max()}",
        )


@functools.lru_cache(maxsize=1)
def digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digit scans [N, 8, 8] (values 0-16) and their labels, read once
    per process.

    The CSV that `sklearn.datasets.load_digits` parses is read directly when it is where
    scikit-learn keeps it: importing scikit-learn costs about 1.5 s per process, more than
    a whole fusion run on cached features.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin is not None:
        csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            table = np.loadtxt(csv, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


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


class AVDigits(MultimodalDataset):
    """One split of AV-Digits; items are `{"image": [1, 8, 8], "audio": [T], "label": int}`.

    `task` picks what is asked: `digit` (the written digit; the clip says the same one),
    `same` (do the written and the spoken digit agree? an interaction of both modalities),
    `which` (a per-sample `condition` asks for the written (0) or the spoken (1) digit) or
    `multitask` (a dict label with all three). Tasks of other kinds: `sum` (regression:
    written + spoken, a float in [0, 18]), `digits` (multilabel: the 0/1 list of which
    digits are shown or said) and `mixed` (a dict label: `written`, `sum` and `digits`).
    Every item also carries `modality_targets`, the digit each modality shows, for
    pretraining one encoder per modality.

    With `text_accuracy`, items also carry a third modality, `"text"`: a short caption
    that guesses the digit, right with that probability (the tri-modal example).

    Validation and test samples are fixed by `seed` (paired clip, occlusion, noise), so
    every evaluation sees the same samples; `view` picks another fixed draw of the same
    split (for training on several fixed draws, as `data.views.Views` does). Training
    samples, unless `augment` is false, get a new clip of the same digit and new
    degradations at every access, drawn from torch's global generator (`augment` never
    touches validation and test): the encoders cannot memorize the noise, so their
    training features stay as unreliable as their test features, which is what the fusion
    stage must learn to weigh. Seeding torch makes this reproducible.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        seed: int = 0,
        fractions: Sequence[float] = (0.6, 0.2, 0.2),
        clip_seconds: float = 1.0,
        occlusion: Sequence[float] = (0.1, 0.5),
        image_noise_std: float = 0.3,
        audio_snr_db: Sequence[float] = (-10.0, 0.0),
        augment: bool | None = None,
        text_accuracy: float | None = None,
        task: str = "digit",
        same_prob: float = 0.5,
        max_samples: int | None = None,
        speech_path: str | Path | None = None,
        view: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
        checks.choice("task", task, TASKS)
        checks.integer("seed", seed)
        checks.fractions(fractions)
        checks.real("clip_seconds", clip_seconds, 0.0, above=True)
        checks.real("image_noise_std", image_noise_std, 0.0)
        checks.probability("same_prob", same_prob)
        checks.flag("augment", augment, optional=True)
        if text_accuracy is not None:
            checks.probability("text_accuracy", text_accuracy)
        checks.max_samples(max_samples)
        checks.integer("view", view)
        self.occlusion = checks.interval("occlusion", occlusion, 0.0, 1.0)
        self.audio_snr_db = checks.interval("audio_snr_db", audio_snr_db, -60.0, 60.0)
        self.settings = {
            "split": split,
            "seed": seed,
            "fractions": list(fractions),
            "clip_seconds": clip_seconds,
            "occlusion": list(occlusion),
            "image_noise_std": image_noise_std,
            "audio_snr_db": list(audio_snr_db),
            "augment": augment,
            "text_accuracy": text_accuracy,
            "task": task,
            "same_prob": same_prob,
            "max_samples": max_samples,
            "view": view,
        }
        self.split = split
        self.image_noise_std = float(image_noise_std)
        # Augmentation redraws the train split only: validation and test stay fixed samples.
        self.augment = split == "train" and augment is not False
        self.text_accuracy = text_accuracy
        self.task = task
        self.same_prob = same_prob

        speech_path = SPEECH_ASSET if speech_path is None else speech_path
        self.speech_path = Path(speech_path)
        speech = load_speech_clips(speech_path)
        self.sample_rate = speech.sample_rate
        self.clip_samples = round(clip_seconds * speech.sample_rate)
        longest = max(len(c) for c in speech.clips)
        if longest > self.clip_samples:
            raise ValueError(
                f"data.clip_seconds: expected at least the longest clip in {self.speech_path} "
                f"({longest / speech.sample_rate:.2f} s), found {clip_seconds!r}"
            )
        split_id = SPLITS.index(split)
        scans, digit_labels = digit_scans()
        image_part = stratified_split(digit_labels, fractions, np.random.default_rng(seed))
        speaker_part = np.split(
            np.random.default_rng([seed, 1]).permutation(len(speech.speaker_names)),
            np.round(np.cumsum(fractions)[:-1] * len(speech.speaker_names)).astype(int),
        )
        image_idx = image_part[split_id][:max_samples]
        self.speakers = np.sort(speaker_part[split_id])
        self.speaker_names = [str(speech.speaker_names[s]) for s in self.speakers]

        self.labels = torch.from_numpy(digit_labels[image_idx].astype(np.int64))
        self.clean_images = torch.from_numpy(scans[image_idx] / 16.0).float().unsqueeze(1)
        in_split = np.isin(speech.speakers, self.speakers)
        self.clips = [torch.from_numpy(c) for c in speech.clips]
        self.clip_pool = [
            torch.from_numpy(np.flatnonzero(in_split & (speech.digits == d))) for d in range(10)
        ]
        for d, pool in enumerate(self.clip_pool):
            if len(pool) == 0:
                raise asset_error(self.speech_path, f"no '{split}' speaker says digit {d}")
        self.draw_seed = (seed, split_id, view)

    splits = SPLITS

    @property
    def modalities(self) -> dict[str, Modality]:
        """Images `[1, 8, 8]` and clips `[clip_samples]`, plus captions with `text_accuracy`."""
        out = {
            "image": Modality(
                "image",
                {
                    "shape": [1, *IMAGE_SIZE],
                    "in_channels": 1,
                    "image_size": list(IMAGE_SIZE),
                    "mean": IMAGE_MEAN,
                    "std": IMAGE_STD,
                },
            ),
            "audio": Modality(
                "audio",
                {
                    "shape": [self.clip_samples],
                    "sample_rate": self.sample_rate,
                    "clip_samples": self.clip_samples,
                },
            ),
        }
        if self.text_accuracy is not None:
            out["text"] = Modality("text")
        return out

    @property
    def tasks(self) -> dict[str, Task]:
        """`digit` and `which` ask for a digit, `same` for agreement, `multitask` all three;
        `sum` (regression) for written + spoken, `digits` (multilabel) for the set of digits
        shown or said, `mixed` for written, sum and digits (three kinds at once)."""
        if self.task == "multitask":
            return {"written": DIGIT, "spoken": DIGIT, "same": SAME}
        if self.task == "mixed":
            return {"written": DIGIT, "sum": SUM, "digits": DIGITS}
        return {self.task: {"same": SAME, "sum": SUM, "digits": DIGITS}.get(self.task, DIGIT)}

    @property
    def modality_tasks(self) -> dict[str, tuple[str, Task]]:
        """What each modality shows, when it is not the label: each encoder is pretrained
        on its own modality's digit (for `digit`, the label itself)."""
        if self.task == "digit":
            return {}
        own = {"image": "written", "audio": "spoken", "text": "written"}
        return {m: (own[m], DIGIT) for m in self.modalities}

    @property
    def deterministic(self) -> bool:
        """Items never change without augmentation: what a feature cache needs."""
        return not self.augment

    def fixed_view(self, view: int) -> AVDigits:
        """The `view`-th fixed draw of this split (fresh clips and degradations, the same at
        every access): stage 2 trains on several such views so features can be cached."""
        settings = {k: v for k, v in self.settings.items() if k not in ("split", "view")}
        settings.update(augment=False, speech_path=self.speech_path)
        return AVDigits(self.split, view=view, **settings)

    def fingerprint(self) -> str:
        """What determines the items: the settings, the source images, the speech file's
        bytes, and the version of the drawing code (bump `DRAW_VERSION` when it changes).
        The images are hashed once per split object, the speech file once per process
        while it is unchanged (`file_digest`)."""
        speech = file_digest(self.speech_path)
        return json.dumps([DRAW_VERSION, self.settings, speech, self.images_digest], sort_keys=True)

    @functools.cached_property
    def images_digest(self) -> str:
        return hashlib.sha256(self.clean_images.numpy().tobytes()).hexdigest()

    @property
    def num_conditions(self) -> int | None:
        return 2 if self.task == "which" else None

    def _draw(self, index: int, generator: torch.Generator | None) -> dict[str, object]:
        """Pair sample `index` with a clip (and a caption), degrade them, and label the task.

        For the `digit` task the clip says the written digit. For the others it says it
        with probability `same_prob`, and another digit otherwise, so that `same` (are the
        written and the spoken digit the same?) can only be answered from both modalities.
        """
        written = int(self.labels[index])
        spoken = written
        if self.task != "digit" and float(torch.rand((), generator=generator)) >= self.same_prob:
            spoken = (written + 1 + int(torch.randint(9, (), generator=generator))) % 10
        pool = self.clip_pool[spoken]
        clip = self.clips[int(pool[torch.randint(len(pool), (), generator=generator)])]
        item: dict[str, object] = {
            "image": occlude_and_noise(
                self.clean_images[index], self.occlusion, self.image_noise_std, generator
            ),
            "audio": place_and_noise(clip, self.clip_samples, self.audio_snr_db, generator),
            "modality_targets": {"image": written, "audio": spoken},
        }
        if self.text_accuracy is not None:
            item["text"] = noisy_caption(written, self.text_accuracy, generator)
            item["modality_targets"]["text"] = written
        same = int(written == spoken)
        if self.task == "digit":
            item["label"] = written
        elif self.task == "same":
            item["label"] = same
        elif self.task == "which":
            item["condition"] = int(torch.randint(2, (), generator=generator))
            item["label"] = spoken if item["condition"] else written
        elif self.task == "multitask":
            item["label"] = {"written": written, "spoken": spoken, "same": same}
        else:
            labels = {
                "written": written,
                "sum": float(written + spoken),
                "digits": [int(d in (written, spoken)) for d in range(10)],
            }
            item["label"] = labels if self.task == "mixed" else labels[self.task]
        return item

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, object]:
        if self.augment:
            return self._draw(index, None)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return self._draw(index, item_generator(*self.draw_seed, index))


def item_generator(*key: int) -> torch.Generator:
    """A generator seeded by `key` alone: a fixed item is drawn the same way at every
    access, in any order, without holding every drawn item in memory."""
    seed = np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(seed >> np.uint64(1)))


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTIONS = (
    "I think it is a {}.",
    "Looks like {} to me.",
    "Probably the number {}.",
    "The digit {}, maybe.",
    "{}?",
    "My guess would be {}.",
)


def noisy_caption(label: int, accuracy: float, generator: torch.Generator | None = None) -> str:
    """A short guess at the digit that names the right one with probability `accuracy`.

    Otherwise it names one of the nine others. Templates vary, and the digit appears as a
    word or a numeral, so a text encoder has to read rather than match a fixed string.
    """
    guess = label
    if float(torch.rand((), generator=generator)) >= accuracy:
        guess = (label + 1 + int(torch.randint(9, (), generator=generator))) % 10
    template = CAPTIONS[int(torch.randint(len(CAPTIONS), (), generator=generator))]
    as_word = bool(torch.rand((), generator=generator) < 0.5)
    return template.format(DIGIT_WORDS[guess] if as_word else str(guess))


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def occlude_and_noise(
    image: torch.Tensor,
    area: tuple[float, float],
    noise_std: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Blank a random square covering a fraction of the image drawn from `area`, add noise."""
    out = image.clone()
    height, width = out.shape[-2:]
    side = round((_uniform(*area, generator) ** 0.5) * min(height, width))
    if side > 0:
        top = int(torch.randint(height - side + 1, (), generator=generator))
        left = int(torch.randint(width - side + 1, (), generator=generator))
        out[..., top : top + side, left : left + side] = 0.0
    return out + noise_std * torch.randn(out.shape, generator=generator)


def place_and_noise(
    clip: torch.Tensor,
    length: int,
    snr_db: tuple[float, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Put the clip at a random offset in a `length` window, add white noise at a random SNR."""
    out = torch.zeros(length)
    offset = int(torch.randint(length - len(clip) + 1, (), generator=generator))
    out[offset : offset + len(clip)] = clip
    noise_power = clip.pow(2).mean() / 10 ** (_uniform(*snr_db, generator) / 10)
    return out + noise_power.sqrt() * torch.randn(length, generator=generator)
