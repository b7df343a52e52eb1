"""Synthesize the spoken-digit half of AV-Digits with espeak-ng.

Each *speaker* is one eSpeak English voice (accent) plus a voice variant (timbre), a speaking
rate and a pitch, drawn from a seeded RNG so the set is reproducible. Every speaker says
"zero".."nine" once. Clips are resampled, silence-trimmed, peak-normalized and stored as one
small ``np.savez_compressed`` file, which is committed so that running experiments never needs
espeak-ng; only regenerating the asset does.

Asset layout (read by ``data.avdigits.load_speech_clips``):
    waveforms      int16 [T]     all clips concatenated
    offsets        int64 [N+1]   clip i is waveforms[offsets[i]:offsets[i+1]]
    digits         int64 [N]     0..9
    speakers       int64 [N]     index into speaker_names
    speaker_names  str   [S]     e.g. "en-us+m3 s=150 p=40"
    sample_rate    int64 []      Hz

Usage (from the repository root):
    python -m data.make_avdigits_speech [--out PATH] [--sample-rate 8000] [--speakers 48]
        [--seed 0] [--workers N]

The output depends on the installed espeak-ng version (it was built with 1.51), so regenerate
only when you mean to change the data.
"""

import argparse
import io
import itertools
import os
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

DEFAULT_OUT = Path(__file__).resolve().parent / "assets" / "avdigits_speech.npz"

# Native eSpeak English voices (files under gmw/). MBROLA voices (mb/) are left out: they need
# separately installed diphone databases and would make regeneration fragile.
VOICES = (
    "en-us",
    "en-us-nyc",
    "en-gb",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
)

# Variants from espeak-ng-data/voices/!v that sound like plausible human talkers: the stock
# male/female timbres, croak, four Klatt-synthesizer modes (klatt6 renders the same as klatt)
# and a few female personas to even out the gender balance.
# Left out on purpose: whisper* (unvoiced, a different task), robot/effect voices, and
# near-duplicates. espeak-ng silently ignores unknown variants, so they are checked up front.
VARIANTS = (
    *(f"m{i}" for i in range(1, 9)),
    *(f"f{i}" for i in range(1, 6)),
    "croak",
    "klatt",
    "klatt2",
    "klatt3",
    "klatt4",
    "Annie",
    "aunty",
    "belinda",
    "steph",
)

RATE_WPM = (120, 220)  # -s range, inclusive
PITCH = (20, 80)  # -p range (0..99, 50 = the voice's own pitch), inclusive
# -a amplitude. The default (100) drives the Klatt variants into hard int16 clipping; 50 leaves
# about 1.6x headroom on every voice/variant/rate/pitch corner tried.
AMPLITUDE = 50

PEAK = 0.9  # peak level after normalization, as a fraction of int16 full scale
TRIM_DB = 40.0  # frames quieter than (loudest frame - TRIM_DB) count as silence
FRAME_MS = 5.0  # frame length for the silence detector
MARGIN_MS = 10.0  # kept on each side of the detected speech, so onsets are not cut
MIN_CLIP_S = 0.15  # anything shorter means synthesis or trimming went wrong
SIZE_BUDGET_BYTES = 3_000_000  # the asset is committed to git, so keep it small


class SpeechAssetError(RuntimeError):
    """A clip or the assembled asset failed a sanity check."""


@dataclass(frozen=True)
class Speaker:
    """One synthetic talker: accent, timbre, speaking rate and pitch."""

    voice: str
    variant: str
    rate: int
    pitch: int

    @property
    def name(self) -> str:
        """Human-readable id that is enough to re-synthesize this speaker."""
        return f"{self.voice}+{self.variant} s={self.rate} p={self.pitch}"

    def espeak_args(self) -> list[str]:
        """espeak-ng flags; amplitude is fixed so every speaker gets the same headroom."""
        return [
            "-v",
            f"{self.voice}+{self.variant}",
            "-s",
            str(self.rate),
            "-p",
            str(self.pitch),
            "-a",
            str(AMPLITUDE),
        ]


def find_espeak() -> str:
    """Locate espeak-ng, explaining that the committed asset makes it optional."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        sys.exit(
            "error: espeak-ng is not on PATH. Install it (e.g. `apt-get install espeak-ng`) to "
            "regenerate the speech asset. Running experiments does not need it: they use "
            "the committed data/assets/avdigits_speech.npz."
        )
    return exe


def check_voices(exe: str, voices: tuple[str, ...], variants: tuple[str, ...]) -> str:
    """Fail on unknown voices/variants, which espeak-ng would silently replace; return version."""
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    data_dir = Path(version.split("Data at:")[-1].strip())
    listing = subprocess.run([exe, "--voices=en"], capture_output=True, text=True, check=True)
    # Columns: Pty Language Age/Gender VoiceName File [Other languages]
    native = {
        cols[1]
        for cols in (line.split() for line in listing.stdout.splitlines()[1:])
        if len(cols) >= 5 and cols[4].startswith("gmw/")
    }
    bad_voices = [v for v in voices if v not in native]
    bad_variants = [v for v in variants if not (data_dir / "voices" / "!v" / v).is_file()]
    if bad_voices or bad_variants:
        raise SpeechAssetError(
            f"unknown espeak-ng voices {bad_voices} / variants {bad_variants}; "
            f"native English voices are {sorted(native)}, variants live in {data_dir}/voices/!v"
        )
    return version.split("Data at:")[0].strip()


def choose_speakers(
    n: int, seed: int, voices: tuple[str, ...], variants: tuple[str, ...]
) -> list[Speaker]:
    """Draw n distinct (voice, variant) pairs, balanced over both, with random rate and pitch.

    Greedy balancing keeps every accent within one speaker of the others (and variants as even
    as that allows), so a random speaker split still sees every accent.
    """
    pairs = [(v, w) for v in voices for w in variants]
    if n > len(pairs):
        raise SpeechAssetError(f"asked for {n} speakers but only {len(pairs)} voice+variant pairs")
    rng = np.random.default_rng(seed)
    remaining = [pairs[i] for i in rng.permutation(len(pairs))]
    voice_uses: Counter[str] = Counter()
    variant_uses: Counter[str] = Counter()
    speakers = []
    for _ in range(n):
        # min() keeps the first of equals, so ties are broken by the random permutation.
        i = min(
            range(len(remaining)),
            key=lambda j: (voice_uses[remaining[j][0]], variant_uses[remaining[j][1]]),
        )
        voice, variant = remaining.pop(i)
        voice_uses[voice] += 1
        variant_uses[variant] += 1
        rate = int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1))
        pitch = int(rng.integers(PITCH[0], PITCH[1] + 1))
        speakers.append(Speaker(voice, variant, rate, pitch))
    return speakers


def synthesize(exe: str, speaker: Speaker, word: str) -> tuple[np.ndarray, int]:
    """Run espeak-ng once and return mono float32 audio in [-1, 1) and its sample rate."""
    cmd = [exe, *speaker.espeak_args(), "--stdout", word]
    result = subprocess.run(cmd, capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        raise SpeechAssetError(
            f"`{' '.join(cmd)}` failed ({result.returncode}): {result.stderr.decode().strip()}"
        )
    # --stdout writes a streaming WAV header with placeholder sizes; libsndfile reads to EOF.
    audio, rate = sf.read(io.BytesIO(result.stdout), dtype="int16", always_2d=True)
    if np.abs(audio.astype(np.int32)).max(initial=0) >= 32767:
        raise SpeechAssetError(f"espeak-ng output clipped for {speaker.name!r} saying {word!r}")
    return audio.mean(axis=1, dtype=np.float32) / 32768.0, rate


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling, so nothing above the new Nyquist aliases back in.

    Uses torchaudio's Kaiser-windowed sinc ("kaiser_best" settings): sharper and with less
    aliasing than its default Hann window, and the clips are short enough not to care.
    """
    out = AF.resample(
        torch.from_numpy(audio),
        rate_in,
        rate_out,
        lowpass_filter_width=64,
        rolloff=0.9475,
        resampling_method="sinc_interp_kaiser",
        beta=14.769656459379492,
    )
    return out.numpy()


def trim_silence(audio: np.ndarray, rate: int) -> np.ndarray:
    """Cut leading/trailing silence by frame energy, relative to the loudest frame.

    A relative threshold adapts to each variant's loudness; TRIM_DB is low enough to keep the
    weak fricatives at the edges of words such as "six", "seven" and "five".
    """
    frame = max(1, round(rate * FRAME_MS / 1000))
    n_frames = len(audio) // frame
    energy = np.square(audio[: n_frames * frame].reshape(n_frames, frame)).mean(axis=1)
    if n_frames == 0 or energy.max() <= 0:
        return audio[:0]
    loud = np.flatnonzero(energy >= energy.max() * 10 ** (-TRIM_DB / 10))
    margin = round(rate * MARGIN_MS / 1000)
    start = max(0, loud[0] * frame - margin)
    stop = min(len(audio), (loud[-1] + 1) * frame + margin)
    return audio[start:stop]


def to_int16(audio: np.ndarray) -> np.ndarray:
    """Peak-normalize to PEAK so all talkers are equally loud, then quantize."""
    return np.round(audio * (PEAK * 32767 / np.abs(audio).max())).astype(np.int16)


def render_clip(exe: str, speaker: Speaker, digit: int, sample_rate: int) -> np.ndarray:
    """Synthesize, resample, trim and normalize one digit; fail naming speaker and digit."""
    word = DIGIT_WORDS[digit]
    audio, rate = synthesize(exe, speaker, word)
    audio = trim_silence(resample(audio, rate, sample_rate), sample_rate)
    if len(audio) < MIN_CLIP_S * sample_rate:
        raise SpeechAssetError(
            f"clip for {speaker.name!r} saying {word!r} is {len(audio) / sample_rate:.3f}s "
            f"after trimming (< {MIN_CLIP_S}s): empty or nearly silent"
        )
    return to_int16(audio)


def build_asset(
    exe: str, speakers: list[Speaker], sample_rate: int, workers: int
) -> dict[str, np.ndarray]:
    """Render every (speaker, digit) clip in parallel and pack them into the asset arrays."""
    jobs = [(s, d) for s in range(len(speakers)) for d in range(len(DIGIT_WORDS))]
    # espeak-ng runs as a subprocess, so threads give real parallelism here.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        clips = list(
            pool.map(lambda job: render_clip(exe, speakers[job[0]], job[1], sample_rate), jobs)
        )
    lengths = np.array([len(c) for c in clips], dtype=np.int64)
    return {
        "waveforms": np.concatenate(clips),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "digits": np.array([d for _, d in jobs], dtype=np.int64),
        "speakers": np.array([s for s, _ in jobs], dtype=np.int64),
        "speaker_names": np.array([s.name for s in speakers], dtype=np.str_),
        "sample_rate": np.array(sample_rate, dtype=np.int64),
    }


def validate_asset(asset: dict[str, np.ndarray]) -> None:
    """Check layout, clip health and that every speaker has each digit exactly once."""
    wave, offsets, digits, spk, names = (
        asset[k] for k in ("waveforms", "offsets", "digits", "speakers", "speaker_names")
    )
    if wave.dtype != np.int16 or offsets.dtype != np.int64 or names.dtype.kind != "U":
        raise SpeechAssetError("asset arrays have the wrong dtypes")
    if offsets[0] != 0 or offsets[-1] != len(wave) or len(offsets) != len(digits) + 1:
        raise SpeechAssetError("offsets do not tile waveforms")
    for i, (a, b) in enumerate(itertools.pairwise(offsets)):
        where = f"{names[spk[i]]!r} saying {DIGIT_WORDS[digits[i]]!r}"
        clip = wave[a:b].astype(np.int32)
        if b <= a or not clip.any():
            raise SpeechAssetError(f"empty clip for {where}")
        if np.abs(clip).max() >= 32767:
            raise SpeechAssetError(f"clipped samples in clip for {where}")
    counts = np.zeros((len(names), len(DIGIT_WORDS)), dtype=np.int64)
    np.add.at(counts, (spk, digits), 1)
    bad = np.argwhere(counts != 1)
    if len(bad):
        s, d = bad[0]
        raise SpeechAssetError(
            f"speaker {names[s]!r} has {counts[s, d]} clips of {DIGIT_WORDS[d]!r}, expected 1"
        )


def summarize(asset: dict[str, np.ndarray], path: Path, speakers: list[Speaker]) -> None:
    """Print what was written, with duration stats that catch bad trimming at a glance."""
    rate = int(asset["sample_rate"])
    seconds = np.diff(asset["offsets"]) / rate
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1e6:.2f} MB)")
    print(f"clips: {len(seconds)}  speakers: {len(asset['speaker_names'])}  sample rate: {rate} Hz")
    print(
        f"clip seconds: min {seconds.min():.3f}  median {np.median(seconds):.3f}  "
        f"max {seconds.max():.3f}  total {seconds.sum():.1f}"
    )
    per_digit = "  ".join(
        f"{w} {np.median(seconds[asset['digits'] == d]):.2f}" for d, w in enumerate(DIGIT_WORDS)
    )
    print(f"median seconds per digit: {per_digit}")
    for label, counts in (
        ("voices", Counter(s.voice for s in speakers)),
        ("variants", Counter(s.variant for s in speakers)),
    ):
        print(f"{label}: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    if size > SIZE_BUDGET_BYTES:
        print(
            f"warning: asset is {size / 1e6:.2f} MB, over the {SIZE_BUDGET_BYTES / 1e6:.0f} MB "
            "budget for a committed file; use fewer --speakers",
            file=sys.stderr,
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .npz path")
    parser.add_argument("--sample-rate", type=int, default=8000, help="output rate in Hz")
    # 48 = 6 per accent; 60 speakers came out at 3.6 MB, over the size budget.
    parser.add_argument("--speakers", type=int, default=48, help="number of synthetic speakers")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing speakers")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="parallel espeak-ng processes"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exe = find_espeak()
    try:
        version = check_voices(exe, VOICES, VARIANTS)
        speakers = choose_speakers(args.speakers, args.seed, VOICES, VARIANTS)
        print(f"{version}: {len(speakers)} speakers x {len(DIGIT_WORDS)} digits")
        asset = build_asset(exe, speakers, args.sample_rate, args.workers)
        validate_asset(asset)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.out, **asset)
        with np.load(args.out) as written:  # round-trip: check what experiments will read
            validate_asset({k: written[k] for k in written.files})
    except SpeechAssetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summarize(asset, args.out, speakers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
