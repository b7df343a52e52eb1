"""Audio encoders: a torchaudio log-mel front end feeding an image backbone."""

from __future__ import annotations

import torch
import torchaudio
from torch import nn
from torchvision.models import get_model

from fusion import surgery
from fusion.encoders.base import Encoder


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


def build_spectrogram_encoder(
    backbone: str = "resnet18",
    weights: str | None = None,
    sample_rate: int = 8000,
    clip_samples: int = 8000,
    n_fft: int = 256,
    hop_length: int = 80,
    n_mels: int = 40,
) -> Encoder:
    """A log-mel front end and a torchvision CNN whose stem takes one channel."""
    net = get_model(backbone, weights=weights)
    surgery.remove_classifier(net)
    surgery.adapt_input_channels(net, 1)
    front_end = LogMelSpectrogram(sample_rate, n_fft, hop_length, n_mels)
    return Encoder(net, input_shape=(clip_samples,), preprocess=front_end)
