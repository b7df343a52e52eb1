"""Vision encoders: any torchvision classification model by name, with explicit surgery."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models import get_model

from fusion import surgery
from fusion.encoders.base import Encoder


class Standardize(nn.Module):
    """Per-channel (x - mean) / std, stored as buffers so it follows the model's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_vision_encoder(
    name: str = "resnet18",
    weights: str | None = None,
    in_channels: int = 3,
    image_size: Sequence[int] = (224, 224),
    small_input_stem: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Encoder:
    """A torchvision classifier turned into a feature encoder.

    The model is built by name with `torchvision.models.get_model`, its classifier is
    removed, its stem is optionally adapted to small images and to `in_channels`, and
    standardization is part of the encoder so it consumes raw [0, 1] images.
    """
    backbone = get_model(name, weights=weights)
    surgery.remove_classifier(backbone)
    if small_input_stem:
        surgery.adapt_stem_for_small_inputs(backbone)
    surgery.adapt_input_channels(backbone, in_channels)
    mean = mean if mean is not None else [0.5] * in_channels
    std = std if std is not None else [0.25] * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(
            f"mean and std need {in_channels} values (one per input channel), "
            f"got {len(mean)} and {len(std)}"
        )
    return Encoder(
        backbone,
        input_shape=(in_channels, *image_size),
        preprocess=Standardize(mean, std),
    )
