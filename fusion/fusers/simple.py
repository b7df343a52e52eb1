"""Concatenation and the gated multimodal unit."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fusion.fusers.base import Fuser


class ConcatFuser(Fuser):
    """Concatenate modality features, optionally followed by a linear projection."""

    def __init__(
        self, in_dims: Mapping[str, int], proj_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__(in_dims)
        total = sum(self.in_dims.values())
        self.proj = (
            nn.Sequential(nn.Dropout(dropout), nn.Linear(total, proj_dim), nn.ReLU())
            if proj_dim
            else nn.Dropout(dropout)
        )
        self.out_dim = proj_dim or total

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        xs, _ = self.vectors(features, present)
        return self.proj(torch.cat(xs, dim=1))


class GatedFuser(Fuser):
    """Gated multimodal unit (Arevalo et al., 2017), generalized to any number of modalities.

    Each modality is projected to `dim` with a tanh; a gate computed from all inputs gives,
    per sample and per dimension, a softmax weight over modalities (for two modalities this
    is the GMU's sigmoid z and 1 - z). Absent modalities get no weight: the softmax is
    renormalized over those present.
    """

    def __init__(self, in_dims: Mapping[str, int], dim: int = 256, dropout: float = 0.0) -> None:
        super().__init__(in_dims)
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in self.in_dims.items()})
        self.gate = nn.Linear(sum(self.in_dims.values()), dim * len(self.modalities))
        self.dropout = nn.Dropout(dropout)
        self.dim = dim
        self.out_dim = dim

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        xs, mask = self.vectors(features, present)
        hidden = torch.stack(
            [torch.tanh(self.proj[m](x)) for m, x in zip(self.modalities, xs, strict=True)], dim=1
        )  # [B, M, dim]
        logits = self.gate(torch.cat(xs, dim=1)).view(-1, len(self.modalities), self.dim)
        logits = logits.masked_fill(~mask[:, :, None], torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=1) * mask[:, :, None]  # all-absent rows -> zeros
        return self.dropout((weights * hidden).sum(dim=1))
