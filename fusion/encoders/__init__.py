"""Encoders, one family per modality, all behind the `Encoder` contract.

Text encoders import `transformers` only when built (optional extra `fusion[text]`).
"""

from fusion.encoders.audio import (
    LogMelSpectrogram,
    build_spectrogram_encoder,
    build_ssl_speech_encoder,
)
from fusion.encoders.base import Encoder, apply_freeze
from fusion.encoders.sequence import build_sequence_encoder
from fusion.encoders.tabular import build_tabular_encoder
from fusion.encoders.text import build_text_encoder, minilm_path
from fusion.encoders.vision import build_timm_encoder, build_vision_encoder

__all__ = [
    "Encoder",
    "LogMelSpectrogram",
    "apply_freeze",
    "build_sequence_encoder",
    "build_spectrogram_encoder",
    "build_ssl_speech_encoder",
    "build_tabular_encoder",
    "build_text_encoder",
    "build_timm_encoder",
    "build_vision_encoder",
    "minilm_path",
]
