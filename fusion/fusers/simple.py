"""Concatenation and the gated multimodal unit."""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping

import torch
from torch import nn

from fusion.checks import dropout_rate, positive_int
from fusion.fusers.base import Fuser, masked_softmax


class ConcatFuser(Fuser):
    """Concatenate modality features, optionally followed by a linear projection."""

    def __init__(
        self, in_dims: Mapping[str, int], proj_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__(in_dims)
        positive_int("proj_dim", proj_dim, allow_none=True)
        dropout_rate(dropout)
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
        xs, _ = self.maybe_masked_vectors(features, present)
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
        positive_int("dim", dim)
        dropout_rate(dropout)
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
        xs, masks = self.maybe_masked_vectors(features, present)
        hidden = torch.stack(
            [torch.tanh(self.proj[m](x)) for m, x in zip(self.modalities, xs, strict=True)], dim=1
        )  # [B, M, dim]
        logits = self.gate(torch.cat(xs, dim=1)).view(-1, len(self.modalities), self.dim)
        if masks is None:
            weights = torch.softmax(logits, dim=1)
        else:
            weights = masked_softmax(logits, torch.stack(masks, dim=1)[:, :, None], dim=1)
        return self.dropout((weights * hidden).sum(dim=1))


class _ProjectedFuser(Fuser):
    """Shared start of the pooling fusers: each modality linearly projected to one size `dim`."""

    def __init__(self, in_dims: Mapping[str, int], dim: int = 256, dropout: float = 0.0) -> None:
        super().__init__(in_dims)
        positive_int("dim", dim)
        dropout_rate(dropout)
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in self.in_dims.items()})
        self.dropout = nn.Dropout(dropout)
        self.dim = dim
        self.out_dim = dim

    def project(
        self, features: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected features [B, M, dim], zero where a modality is absent, and the mask [B, M]
        (None when every modality is present: see `Fuser.maybe_masked_vectors`).

        The zeroing is after the projection, so an absent modality does not add its bias.
        """
        xs, masks = self.maybe_masked_vectors(features, present)
        hidden = torch.stack(
            [self.proj[m](x) for m, x in zip(self.modalities, xs, strict=True)], dim=1
        )
        if masks is None:
            return hidden, None
        mask = torch.stack(masks, dim=1)
        return torch.where(mask[:, :, None], hidden, 0.0), mask

    def projected_sum(
        self, features: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sum over modalities of `project`'s features [B, dim], and the mask (None when
        every modality is present). Then, in float32 or float64, the projections are added
        as they come: the same sum as over the stacked tensor, without the stacking. (In a
        16-bit dtype the stacked sum accumulates in float32 and rounds once, so it stays.)"""
        xs, masks = self.maybe_masked_vectors(features, present)
        projected = [self.proj[m](x) for m, x in zip(self.modalities, xs, strict=True)]
        if masks is None and projected[0].dtype in (torch.float32, torch.float64):
            return functools.reduce(operator.add, projected), None
        hidden, mask = torch.stack(projected, dim=1), None
        if masks is not None:
            mask = torch.stack(masks, dim=1)
            hidden = torch.where(mask[:, :, None], hidden, 0.0)
        return hidden.sum(dim=1), mask


class SumFuser(_ProjectedFuser):
    """Project every modality to `dim` and add them: the simplest additive fusion baseline.

    Cheap, and the output size does not grow with the number of modalities. An absent
    modality adds nothing, so the output's scale follows how many are present; use
    `MeanFuser` when it should not.
    """

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        total, _ = self.projected_sum(features, present)
        return self.dropout(total)


class MeanFuser(_ProjectedFuser):
    """Project every modality to `dim` and average over the modalities present per sample.

    Averaging rather than adding keeps the output's scale the same whatever subset of
    modalities a sample has, the idea behind the mean over available modalities in HeMIS
    (Havaei et al., 2016). A sample with none present gets zeros.
    """

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        total, mask = self.projected_sum(features, present)
        if mask is None:  # every modality counts; an integer count is exact in any dtype
            return self.dropout(total / len(self.modalities))
        count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(total.dtype)
        return self.dropout(total / count)


class AttentionFuser(_ProjectedFuser):
    """Attention over modalities: a weighted sum whose weights depend on each sample's content.

    Modality attention after Hori et al. (2017, "Attention-Based Multimodal Fusion for Video
    Description"), without a decoder query: a small MLP shared by all modalities scores each
    projected modality, and a softmax over the modalities present gives the weights, so an
    absent modality gets weight 0 and the others are renormalized (all absent: zeros). The
    weights of the last forward are kept, detached, in `last_weights` [B, M] for inspection.
    """

    last_weights: torch.Tensor | None

    def __init__(
        self,
        in_dims: Mapping[str, int],
        dim: int = 256,
        hidden: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dims, dim, dropout)
        positive_int("hidden", hidden)
        # No bias on the last layer: the softmax ignores a score shift shared by all
        # modalities, so such a bias could never learn.
        self.scorer = nn.Sequential(
            nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1, bias=False)
        )
        self.last_weights = None

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        hidden, mask = self.project(features, present)
        scores = self.scorer(hidden).squeeze(-1)  # [B, M]
        weights = torch.softmax(scores, dim=1) if mask is None else masked_softmax(scores, mask, 1)
        self.last_weights = weights.detach()
        return self.dropout((weights[:, :, None] * hidden).sum(dim=1))
