"""Audio encoders: spectral front ends feeding an image CNN, or a pretrained speech SSL model.

Both kinds take raw waveforms at the data's sample rate and resample inside the encoder,
so a dataset never has to know what rate a model was trained at.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

import torch
import torchaudio
from torch import nn
from torchaudio.models import wav2vec2_model, wavlm_model
from torchaudio.pipelines import Wav2Vec2Bundle

from fusion import surgery
from fusion.checks import positive_int
from fusion.encoders.base import Encoder, apply_freeze
from fusion.encoders.vision import build_backbone, resolve_weights
from fusion.weights import load_weights

FRONT_ENDS = ("logmel", "mfcc")
POOLINGS = ("mean", "max", "first", "none")
# torchaudio's bundles name the constructor of their architecture by a string.
_SSL_FACTORIES = {"Wav2Vec2": wav2vec2_model, "WavLM": wavlm_model}


class LogMelSpectrogram(nn.Module):
    """Waveform [B, T] -> standardized log-mel image [B, 1, n_mels, frames].

    Each clip is standardized on its own, so the encoder sees the same picture whatever
    the recording level; this matters when the noise level varies from clip to clip.
    """

    def __init__(
        self,
        sample_rate: int = 8000,
        n_fft: int = 256,
        hop_length: int = 80,
        n_mels: int = 40,
    ) -> None:
        super().__init__()
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        logmel = torch.log(self.melspec(waveform) + 1e-6).unsqueeze(1)
        mean = logmel.mean(dim=(-2, -1), keepdim=True)
        std = logmel.std(dim=(-2, -1), keepdim=True)
        return (logmel - mean) / (std + 1e-5)


class MFCCFeatures(nn.Module):
    """Waveform [B, T] -> MFCCs with per-coefficient mean/variance normalization [B, 1, n_mfcc, frames].

    A recording gain or a fixed microphone response adds a constant to each cepstral
    coefficient; normalizing every coefficient over time (CMVN) removes both, which one
    standardization of the whole image would not do for the higher coefficients.
    """

    def __init__(
        self,
        sample_rate: int = 8000,
        n_fft: int = 256,
        hop_length: int = 80,
        n_mels: int = 40,
        n_mfcc: int = 20,
    ) -> None:
        super().__init__()
        self.mfcc = torchaudio.transforms.MFCC(
            sample_rate=sample_rate,
            n_mfcc=n_mfcc,
            melkwargs={"n_fft": n_fft, "hop_length": hop_length, "n_mels": n_mels},
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        mfcc = self.mfcc(waveform)
        mean = mfcc.mean(dim=-1, keepdim=True)
        std = mfcc.std(dim=-1, keepdim=True)
        return ((mfcc - mean) / (std + 1e-5)).unsqueeze(1)


class WaveformStandardization(nn.Module):
    """Zero mean, unit variance per clip: the input normalization some SSL models were trained with.

    torchaudio's own wrapper normalizes over the whole batch tensor at once, which makes a
    clip's features depend on its batch mates; fairseq, where the weights come from,
    normalizes each clip, as done here.
    """

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(waveform, waveform.shape[-1:])


class FramePooling(nn.Module):
    """Frames [B, T, D] -> one vector [B, D] (mean, max, first), or the frames unchanged (none)."""

    def __init__(self, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":
            return frames.mean(dim=1)
        if self.pooling == "max":
            return frames.amax(dim=1)
        if self.pooling == "first":
            return frames[:, 0]
        return frames

    def extra_repr(self) -> str:
        return repr(self.pooling)


class SSLSpeechBackbone(nn.Module):
    """A torchaudio wav2vec2-family model read out at one transformer layer, then pooled.

    Middle layers often carry more phonetic or speaker information than the last one, so
    the layer is a choice; `extract_features` stops computing after it.
    """

    def __init__(self, model: nn.Module, layer: int, pool: FramePooling) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        self.pool = pool

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        layers, _ = self.model.extract_features(waveform, num_layers=self.layer + 1)
        return self.pool(layers[self.layer])


def build_spectrogram_encoder(
    backbone: str = "resnet18",
    weights: str | None = None,
    sample_rate: int = 8000,
    clip_samples: int = 8000,
    n_fft: int = 256,
    hop_length: int = 80,
    n_mels: int = 40,
    front_end: str = "logmel",
    n_mfcc: int = 20,
    input_sample_rate: int | None = None,
    post: Sequence[Mapping] | None = None,
    freeze: bool | str | Sequence[str] | None = None,
    trainable_stages: int | None = None,
) -> Encoder:
    """A log-mel or MFCC front end and a torchvision CNN (any, by name) whose stem takes one channel.

    `sample_rate` is the rate the front end analyses at; `input_sample_rate` is the data's
    rate (default: the same) and `clip_samples` counts samples at that rate.
    """
    sizes = {"sample_rate": sample_rate, "clip_samples": clip_samples, "n_fft": n_fft,
             "hop_length": hop_length, "n_mels": n_mels, "n_mfcc": n_mfcc}  # fmt: skip
    for name, value in sizes.items():
        positive_int(name, value)
    positive_int("input_sample_rate", input_sample_rate, allow_none=True)
    analysed = clip_samples * sample_rate / (input_sample_rate or sample_rate)
    if analysed < n_fft:
        raise ValueError(
            f"clip_samples is {clip_samples} ({analysed:.0f} at the front end's {sample_rate} Hz), "
            f"shorter than one analysis window (n_fft={n_fft}); use longer clips or a smaller n_fft"
        )
    if front_end == "mfcc" and n_mfcc > n_mels:
        raise ValueError(f"n_mfcc must be at most n_mels ({n_mels}), got {n_mfcc}")
    if front_end == "logmel":
        spectral = LogMelSpectrogram(sample_rate, n_fft, hop_length, n_mels)
    elif front_end == "mfcc":
        spectral = MFCCFeatures(sample_rate, n_fft, hop_length, n_mels, n_mfcc)
    else:
        raise ValueError(f"front_end must be one of {FRONT_ENDS}, got {front_end!r}")
    net = build_backbone(backbone, resolve_weights(backbone, weights))
    surgery.remove_classifier(net)
    surgery.adapt_input_channels(net, 1)
    preprocess = _chain(_resampler(input_sample_rate, sample_rate), spectral)
    encoder = Encoder(
        net,
        input_shape=(clip_samples,),
        preprocess=preprocess,
        post=surgery.build_layers(post, "post"),
    )
    return apply_freeze(encoder, freeze, trainable_stages)


def build_ssl_speech_encoder(
    bundle: str = "WAV2VEC2_BASE",
    pretrained: bool = True,
    layer: int | None = None,
    pooling: str = "mean",
    input_sample_rate: int | None = None,
    clip_samples: int = 16000,
    post: Sequence[Mapping] | None = None,
    freeze: bool | str | Sequence[str] | None = None,
    trainable_stages: int | None = None,
) -> Encoder:
    """A torchaudio speech SSL model (wav2vec 2.0, HuBERT, WavLM) as an encoder.

    `bundle` is a `torchaudio.pipelines` name; `layer` picks the transformer layer whose
    output is used (None: the last; negative counts from the end) and the layers after it
    are not built at all, so they neither cost memory nor sit untrained under DDP.
    `pooling="none"` gives the frame sequence [B, T, D] for attention fusers. Inputs at
    `input_sample_rate` (default: the bundle's) are resampled to the bundle's rate;
    `clip_samples` counts samples at the input rate. Pretrained weights come through
    `fusion.weights.load_weights` from torchaudio's cache, `$TORCH_HOME/hub/checkpoints`
    (nothing is downloaded): when the file is not there, `WeightsUnavailableError` names the
    url and the path to place it at.
    """
    spec = _ssl_bundle(bundle)
    params = spec._params
    n_layers = params["encoder_num_layers"]
    layer = n_layers - 1 if layer is None else layer
    if not -n_layers <= layer < n_layers:
        raise ValueError(
            f"layer {layer} is out of range: {bundle} has {n_layers} transformer layers "
            f"(use 0..{n_layers - 1}, or -{n_layers}..-1 counting from the last)"
        )
    layer %= n_layers
    pool = FramePooling(pooling)  # validates `pooling` before the slow construction
    model = _SSL_FACTORIES[spec._model_type](
        **{**params, "encoder_num_layers": layer + 1, "aux_num_out": None}
    )
    if pretrained:
        _load_ssl_weights(model, spec, bundle, kept_layers=layer + 1)
    sample_rate = int(spec.sample_rate)
    preprocess = _chain(
        _resampler(input_sample_rate, sample_rate),
        WaveformStandardization() if spec._normalize_waveform else None,
    )
    encoder = Encoder(
        SSLSpeechBackbone(model, layer, pool),
        input_shape=(clip_samples,),
        preprocess=preprocess,
        post=surgery.build_layers(post, "post"),
    )
    return apply_freeze(encoder, freeze, trainable_stages)


def ssl_bundle_names() -> list[str]:
    """Every `torchaudio.pipelines` bundle `build_ssl_speech_encoder` accepts."""
    pipelines = torchaudio.pipelines
    return sorted(n for n in pipelines.__all__ if isinstance(getattr(pipelines, n), Wav2Vec2Bundle))


def _ssl_bundle(name: str) -> Wav2Vec2Bundle:
    names = ssl_bundle_names()
    if name not in names:
        close = difflib.get_close_matches(name.upper(), names, n=5, cutoff=0.5)
        hint = f"did you mean one of {close}?" if close else f"choose from {names}"
        raise ValueError(f"{name!r} is not a wav2vec2-family torchaudio bundle; {hint}")
    return getattr(torchaudio.pipelines, name)


def _load_ssl_weights(
    model: nn.Module, spec: Wav2Vec2Bundle, bundle: str, kept_layers: int
) -> None:
    """Load a bundle's checkpoint into a model built without its CTC head and later layers.

    Those dropped parts are named to `load_weights` as left out on purpose; any other key
    without a place in the model means the checkpoint does not fit the architecture, and
    `load_weights` refuses it (as it does missing or shape-mismatched keys).
    """
    layers = range(kept_layers, spec._params["encoder_num_layers"])
    dropped = ["aux.*", *(f"encoder.transformer.layers.{i}.*" for i in layers)]
    load_weights(model, spec, ignore_unexpected=dropped)


def _resampler(input_sample_rate: int | None, sample_rate: int) -> nn.Module | None:
    """A resampler from the data's rate to the model's, built once; None when they agree."""
    if input_sample_rate is None or input_sample_rate == sample_rate:
        return None
    return torchaudio.transforms.Resample(input_sample_rate, sample_rate)


def _chain(*steps: nn.Module | None) -> nn.Module | None:
    """The given steps as one module; a lone step is returned as is, keeping its state-dict keys."""
    kept = [step for step in steps if step is not None]
    if len(kept) <= 1:
        return kept[0] if kept else None
    return nn.Sequential(*kept)
