"""Encoders, one family per modality, all behind the `Encoder` contract."""

from fusion.encoders.audio import LogMelSpectrogram, build_spectrogram_encoder
from fusion.encoders.base import Encoder
from fusion.encoders.vision import build_vision_encoder

__all__ = ["Encoder", "LogMelSpectrogram", "build_spectrogram_encoder", "build_vision_encoder"]
