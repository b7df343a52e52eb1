"""Perturbations of one modality's inputs, by the modality's kind (after MultiBench).

MultiBench (Liang et al., NeurIPS 2021 Datasets and Benchmarks; `robustness/` in
pliang279/MultiBench) tests each modality under imperfections of its own kind: images get
grey, lower contrast, inversion, colour casts, salt and pepper, Gaussian noise, rotation,
flips and crops; audio white noise and dropped samples; text typos (swapped, shuffled,
mistyped, repeated or omitted letters); time series noise and dropped steps; tables dropped
and swapped entries; at noise levels 0, 0.1, 0.2, ..., where the level is both the chance
that a sample (or word, entry) is hit and the noise's std. Here the level is one strength
per perturbation instead (the share of the area, pixels, letters, words or columns hit, a
blur's width, an SNR, ...), and each perturbation is a pure function of one batch's inputs
of a modality

    perturbation(x, level, generator) -> x'        (audio ones also take `lengths`)

with `level` in [0, 1]: 0 returns the inputs unchanged (an equal copy, exactly) and 1 is the
strongest. A random one draws its numbers from `generator`, always as many and in the same
order whatever the level (each function's docstring says which): the level only thresholds
or scales them. So passes over a split that start from one seed differ only by the level, as
`fusion.analysis.robustness` requires, and what a level corrupts holds what a lower level
corrupts (salt and pepper's pixels, the mistyped letters, the dropped words and columns).

Inputs are what the datasets give (`fusion.data`): images `[B, C, H, W]` or `[B, H, W]`
floats in [0, 1] (encoders standardize them), audio waveforms `[B, T]` (zero-padded clips
with their `lengths`), text a list of strings, tables `[B, F]` (standardized numeric columns,
then categorical codes). Each perturbation declares the kind it fits (`PERTURBATIONS`,
`for_kind`); Gaussian noise scaled to the input's std ("noise", any kind but text) lives in
`fusion.analysis.robustness`, which knows the split's statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchaudio.functional as audio_functional
from torchvision.transforms.v2 import functional as image_functional

NOISE = "noise"
"""Gaussian noise with std = level x the input's std on the split (any kind but text); it
needs the split's statistics, so `fusion.analysis.robustness` applies it."""

SNR_AT_LEVEL_0 = 40.0
SNR_AT_LEVEL_1 = -10.0
BLUR_SIGMA = 0.1
"""The blur's sigma at level 1, as a share of the image's shorter side."""
MAX_SHIFT = 0.5
"""The time shift at level 1, as a share of the clip's length."""

QWERTY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def check_level(level: float) -> None:
    if not (isinstance(level, (int, float)) and 0.0 <= level <= 1.0):
        raise ValueError(f"a perturbation's level must be a number in [0, 1], got {level!r}")


def image_size(x: torch.Tensor) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected images [B, C, H, W] or [B, H, W], got {shape}")
    return x.shape[-2], x.shape[-1]


def pixel_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A `[B, H, W]` mask broadcast over the channels of `x`."""
    return mask.unsqueeze(1) if x.dim() == 4 else mask


# ----------------------------------------------------------------------------- image


def occlusion(x: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
    """A rectangle of `level` of each image's area (sides sqrt(level) x H and sqrt(level) x W,
    rounded), blanked to 0 (black) at a uniform random place. Draws `rand(B, 2)`: where the
    rectangle starts, as a share of the rows and columns it can start at."""
    check_level(level)
    height, width = image_size(x)
    where = torch.rand(len(x), 2, generator=generator)
    if level == 0:
        return x.clone()
    h, w = (round(math.sqrt(level) * side) for side in (height, width))
    top = (where[:, 0] * (height - h + 1)).floor().long()
    left = (where[:, 1] * (width - w + 1)).floor().long()
    rows, cols = torch.arange(height), torch.arange(width)
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # [B, H]
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # [B, W]
    mask = in_rows[:, :, None] & in_cols[:, None, :]
    return x.masked_fill(pixel_mask(mask, x).to(x.device), 0.0)


def blur(x: torch.Tensor, level: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian blur with sigma = level x a tenth of the image's shorter side (in pixels:
    0.8 for 8 x 8 digits, 22 for 224 x 224 photos at level 1), kernel 2 ceil(3 sigma) + 1
    (torchvision's `gaussian_blur`, edges reflected). Draws nothing."""
    check_level(level)
    height, width = image_size(x)
    sigma = level * BLUR_SIGMA * min(height, width)
    if sigma == 0:
        return x.clone()
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * min(height, width) - 1)  # reflect padding
    return image_functional.gaussian_blur(x, [kernel, kernel], [sigma, sigma])


def contrast(
    x: torch.Tensor, level: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Contrast scaled by 1 - level towards each image's mean grey (torchvision's
    `adjust_contrast`, clamped to [0, 1]): level 1 leaves a uniform grey image. Images of
    other than 1 or 3 channels: each channel as a grey image. Draws nothing."""
    check_level(level)
    image_size(x)
    if level == 0:
        return x.clone()
    images = x if x.dim() == 4 else x.unsqueeze(1)
    if images.shape[1] not in (1, 3):
        images = images.reshape(-1, 1, *images.shape[-2:])
    out = image_functional.adjust_contrast(images, 1.0 - level)
    return out.reshape(x.shape)


def salt_and_pepper(x: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
    """Each pixel (all its channels), with probability `level`, set to 1 (salt) or 0
    (pepper), half each. Draws `rand(2, B, H, W)`: whether each pixel is hit, then salt
    (below 1/2) or pepper."""
    check_level(level)
    height, width = image_size(x)
    hit, salty = torch.rand(2, len(x), height, width, generator=generator)
    if level == 0:
        return x.clone()
    hit = hit < level
    salt, pepper = hit & (salty < 0.5), hit & (salty >= 0.5)
    out = x.masked_fill(pixel_mask(salt, x).to(x.device), 1.0)
    return out.masked_fill(pixel_mask(pepper, x).to(x.device), 0.0)


# ----------------------------------------------------------------------------- audio


def snr_db(level: float) -> float:
    """The SNR of `noise_snr` at `level`: 40 dB (noise RMS 1% of the clip's) near level 0,
    falling linearly by 5 dB per 0.1 to 0 dB at 0.8 and -10 dB at 1 (noise RMS 3.2 x the
    clip's); level 0 itself adds nothing."""
    return SNR_AT_LEVEL_0 + (SNR_AT_LEVEL_1 - SNR_AT_LEVEL_0) * level


def clip_lengths(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected waveforms [B, T], got {shape}")
    if lengths is None:
        return torch.full((len(x),), x.shape[1], dtype=torch.long)
    return lengths.to("cpu", torch.long)


def noise_snr(
    x: torch.Tensor,
    level: float,
    generator: torch.Generator,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """White Gaussian noise at an SNR of `snr_db(level)` on each clip's real samples (its
    first `lengths`; padding left alone): torchaudio's `add_noise` scales the drawn noise so
    that each clip's SNR is exactly that. A silent clip stays silent. Draws `randn(B, T)`."""
    check_level(level)
    lengths = clip_lengths(x, lengths)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    if level == 0:
        return x.clone()
    snr = torch.full((len(x),), snr_db(level), dtype=x.dtype, device=x.device)
    # a clip without real samples has no SNR: one sample keeps the scale finite (0, silent)
    noisy = audio_functional.add_noise(x, noise, snr, lengths.clamp_min(1).to(x.device))
    real = torch.arange(x.shape[1]) < lengths[:, None]
    return torch.where(real.to(x.device), noisy, x)


def time_shift(
    x: torch.Tensor,
    level: float,
    generator: torch.Generator,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each clip rotated later or earlier (a fair coin each) by round(level x half its
    length) samples within its length: what leaves one end comes back at the other, so the
    clip keeps its sound and its noise floor (a zero-filled gap would be digital silence, which
    no recording holds). Draws `rand(B)`: later below 1/2."""
    check_level(level)
    lengths = clip_lengths(x, lengths)
    later = torch.rand(len(x), generator=generator) < 0.5
    if level == 0:
        return x.clone()
    shift = (level * MAX_SHIFT * lengths.double()).round().long()
    shift = torch.where(later, shift, -shift)
    t = torch.arange(x.shape[1])
    real = t[None, :] < lengths[:, None]
    source = torch.remainder(t[None, :] - shift[:, None], lengths.clamp_min(1)[:, None])
    moved = x.gather(1, torch.where(real, source, t[None, :]).to(x.device))
    return torch.where(real.to(x.device), moved, x)


def clipping(
    x: torch.Tensor,
    level: float,
    generator: torch.Generator | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hard clipping: each clip's real samples capped at +-(1 - level) x their peak
    |amplitude| (an overdriven recorder): level 1 silences it. Draws nothing."""
    check_level(level)
    lengths = clip_lengths(x, lengths)
    if level == 0:
        return x.clone()
    real = (torch.arange(x.shape[1]) < lengths[:, None]).to(x.device)
    cap = (1.0 - level) * (x.abs() * real).amax(dim=1, keepdim=True)
    return torch.where(real, torch.maximum(torch.minimum(x, cap), -cap), x)


# ----------------------------------------------------------------------------- text


def keyboard_neighbours() -> dict[str, str]:
    """Each letter's neighbours on a QWERTY keyboard: left and right in its row, and the
    keys it touches in the rows above and below (each row sits half a key right of the one
    above it, so home-row key i touches top-row keys i and i + 1, bottom-row keys i - 1 and i)."""
    neighbours = {}
    for r, row in enumerate(QWERTY_ROWS):
        for i, key in enumerate(row):
            near = [row[j] for j in (i - 1, i + 1) if 0 <= j < len(row)]
            if r > 0:
                near += [QWERTY_ROWS[r - 1][j] for j in (i, i + 1) if j < len(QWERTY_ROWS[r - 1])]
            if r < len(QWERTY_ROWS) - 1:
                near += [
                    QWERTY_ROWS[r + 1][j] for j in (i - 1, i) if 0 <= j < len(QWERTY_ROWS[r + 1])
                ]
            neighbours[key] = "".join(near)
    return neighbours


NEIGHBOURS = keyboard_neighbours()


def check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"expected a list of strings (one per sample), got {type(texts).__name__}")


def typos(texts: Sequence[str], level: float, generator: torch.Generator) -> list[str]:
    """Each ASCII letter, with probability `level`, replaced by a neighbouring key on a
    QWERTY keyboard (`NEIGHBOURS`), its case kept; other characters are left alone, so the
    length does not change. Draws `rand(2, len(text))` per text: whether each character is
    hit, then which neighbour."""
    check_level(level)
    check_texts(texts)
    out = []
    for text in texts:
        hit, which = torch.rand(2, len(text), generator=generator).tolist()
        if level == 0:
            out.append(text)
            continue
        chars = list(text)
        for i, char in enumerate(text):
            near = NEIGHBOURS.get(char.lower())
            if near and hit[i] < level:
                key = near[min(int(which[i] * len(near)), len(near) - 1)]
                chars[i] = key.upper() if char.isupper() else key
        out.append("".join(chars))
    return out


def word_dropout(texts: Sequence[str], level: float, generator: torch.Generator) -> list[str]:
    """Each word (split at whitespace), with probability `level`, removed; the words kept
    are joined by single spaces (level 1 leaves an empty text). Draws `rand(words)` per
    text: a word is removed when its number is below `level`."""
    check_level(level)
    check_texts(texts)
    out = []
    for text in texts:
        words = text.split()
        draws = torch.rand(len(words), generator=generator).tolist()
        if level == 0:
            out.append(text)
            continue
        out.append(" ".join(w for w, u in zip(words, draws, strict=True) if u >= level))
    return out


# ----------------------------------------------------------------------------- tabular


def column_dropout(x: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
    """Each cell, with probability `level`, set to 0: every row loses its own columns (the
    source failed to give those features for that sample), so the share lost does not
    depend on the batch size, and a level's dropped cells include every lower level's. 0 is
    what an empty cell of a manifest table holds: a numeric column's train mean (after
    standardization), categorical code 0 (empty or unseen). Draws `rand(B, F)`."""
    check_level(level)
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a table [B, F], got {shape}")
    dropped = torch.rand(x.shape, generator=generator) < level
    if level == 0:
        return x.clone()
    return x.masked_fill(dropped.to(x.device), 0.0)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Perturbation:
    """A named perturbation of the inputs of one modality kind; `apply(x, level, generator)`
    (audio: also `lengths=`); `level` says what a level means."""

    name: str
    kind: str
    apply: Callable
    level: str

    @property
    def takes_lengths(self) -> bool:
        return self.kind == "audio"


PERTURBATIONS: dict[str, Perturbation] = {
    p.name: p
    for p in (
        Perturbation("occlusion", "image", occlusion, "share of the image's area blanked"),
        Perturbation("blur", "image", blur, "Gaussian sigma in tenths of the shorter side"),
        Perturbation("contrast", "image", contrast, "1 - contrast factor"),
        Perturbation("salt_pepper", "image", salt_and_pepper, "share of pixels set to 0 or 1"),
        Perturbation("noise_snr", "audio", noise_snr, "(40 - SNR in dB) / 50"),
        Perturbation("time_shift", "audio", time_shift, "rotation / half the clip"),
        Perturbation("clipping", "audio", clipping, "1 - cap / the clip's peak"),
        Perturbation("typos", "text", typos, "share of letters mistyped"),
        Perturbation("word_dropout", "text", word_dropout, "share of words removed"),
        Perturbation("column_dropout", "tabular", column_dropout, "share of cells set to 0"),
    )
}
"""Every perturbation by name, beside `NOISE`."""

NAMES = (NOISE, *PERTURBATIONS)


def for_kind(kind: str | None) -> list[Perturbation]:
    """The perturbations of a modality kind, in `PERTURBATIONS` order (none for `features`
    or an unknown kind, which get Gaussian noise only)."""
    return [p for p in PERTURBATIONS.values() if p.kind == kind]
