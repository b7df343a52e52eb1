"""Late fusion: one classifier per modality, predictions combined over the modalities present."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fusion.fusers.base import Fuser, masked_softmax
from fusion.heads import ClassificationHead

COMBINES = ("logits", "probs", "learned")


class LateFusion(Fuser):
    """Each modality is classified on its own; the fused output is the combined prediction.

    It is the baseline every joint fuser has to beat, and it degrades gracefully: a missing
    modality simply leaves the combination. `combine` picks how predictions are combined,
    always over the modalities present for that sample:

    - "logits": the mean of the classifiers' logits.
    - "probs": the mean of their softmax probabilities, returned as log-probabilities. Since
      log_softmax leaves normalized log-probabilities unchanged, cross-entropy on this output
      is the negative log-likelihood of the averaged probabilities.
    - "learned": a weighted sum of logits, with one learned score per modality turned into
      weights by a softmax over the modalities present.

    A sample with no modality present gets zeros (uniform class probabilities). The output
    is already a prediction (`produces_logits`), so the model follows it with a head that
    passes it through.
    """

    produces_logits = True

    def __init__(
        self,
        in_dims: Mapping[str, int],
        num_classes: int,
        combine: str = "logits",
        hidden: Sequence[int] = (),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dims)
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {list(COMBINES)}, got {combine!r}")
        self.classifiers = nn.ModuleDict(
            {
                m: ClassificationHead(d, num_classes, hidden, dropout=dropout)
                for m, d in self.in_dims.items()
            }
        )
        self.combine = combine
        if combine == "learned":
            self.modality_scores = nn.Parameter(torch.zeros(len(self.modalities)))
        self.num_classes = self.classifiers[self.modalities[0]].num_classes
        self.out_dim = self.num_classes

    def modality_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """Per-sample weights [B, M] summing to 1 over the present modalities (0 if none)."""
        if self.combine != "learned":
            return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)
        return masked_softmax(self.modality_scores.expand(mask.shape), mask, dim=1)

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        xs, masks = self.maybe_masked_vectors(features, present)
        logits = torch.stack(
            [self.classifiers[m](x) for m, x in zip(self.modalities, xs, strict=True)], dim=1
        )  # [B, M, K]
        if masks is None and self.combine == "logits":  # every modality weighs 1 / M
            return (logits * (1.0 / len(self.modalities))).sum(dim=1)
        if masks is None and self.combine == "learned":
            weights = torch.softmax(self.modality_scores.expand(len(logits), -1), dim=1)
            return (weights.to(logits.dtype).unsqueeze(-1) * logits).sum(dim=1)
        if masks is None:
            mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        else:
            mask = torch.stack(masks, dim=1)
        if self.combine != "probs":
            weights = self.modality_weights(mask).to(logits.dtype)
            return (weights.unsqueeze(-1) * logits).sum(dim=1)
        log_probs = torch.log_softmax(logits, dim=-1)
        log_probs = log_probs.masked_fill(~mask.unsqueeze(-1), torch.finfo(log_probs.dtype).min)
        count = mask.sum(dim=1, keepdim=True)
        mean = torch.logsumexp(log_probs, dim=1) - count.clamp(min=1).to(log_probs.dtype).log()
        return torch.where(count > 0, mean, 0.0)
