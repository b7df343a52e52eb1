"""CLIP-style contrastive alignment of two modalities: the symmetric InfoNCE loss with a
learnable temperature (Radford et al., "Learning Transferable Visual Models From Natural
Language Supervision", ICML 2021, section 2.3; InfoNCE: van den Oord et al., 2018).

Row i of each modality's embeddings is a positive pair; every other row of the batch is a
negative. Under DDP the negatives come from every process: the embeddings are gathered with
`torch.distributed.nn.functional.all_gather`, whose backward pass returns each process its
share of the gradient, so the loss is that of the global batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

CLIP_INITIAL_TEMPERATURE = 0.07  # CLIP's initial temperature, so scale = 1 / 0.07
CLIP_MAX_SCALE = 100.0  # CLIP clips the logit scale to at most 100


class InfoNCE(nn.Module):
    """Symmetric InfoNCE between paired embeddings `a` and `b`, each [B, D].

    logits = exp(log_scale) * normalize(a) @ normalize(b).T, and the loss is the mean of
    the cross-entropies of the rows (a -> b) and of the columns (b -> a), with the pair
    (i, i) as the target. `log_scale` (the log inverse temperature) is learned, starts at
    log(1 / 0.07) and is clamped to at most log(100), as in CLIP.
    """

    def __init__(
        self,
        temperature: float = CLIP_INITIAL_TEMPERATURE,
        learn_temperature: bool = True,
        max_scale: float = CLIP_MAX_SCALE,
    ) -> None:
        super().__init__()
        if not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if not 1 / temperature <= max_scale < math.inf:
            raise ValueError(
                f"max_scale must be finite and at least 1 / temperature ({1 / temperature:g}), "
                f"got {max_scale}"
            )
        self.log_scale = nn.Parameter(
            torch.tensor(math.log(1 / temperature)), requires_grad=learn_temperature
        )
        self.max_log_scale = math.log(max_scale)

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.log_scale.detach().clamp(max=self.max_log_scale)))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dim() != 2 or a.shape != b.shape:
            raise ValueError(
                f"expected two embeddings of one shape [batch, dim], got {list(a.shape)} and "
                f"{list(b.shape)}"
            )
        a, b = nn.functional.normalize(a, dim=1), nn.functional.normalize(b, dim=1)
        first = gathered_offset(len(a))
        all_b, all_a = gather_with_gradients(b), gather_with_gradients(a)
        scale = self.log_scale.clamp(max=self.max_log_scale).exp()
        targets = torch.arange(first, first + len(a), device=a.device)
        a_to_b = nn.functional.cross_entropy(scale * a @ all_b.T, targets)
        b_to_a = nn.functional.cross_entropy(scale * b @ all_a.T, targets)
        return (a_to_b + b_to_a) / 2


def distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gathered_offset(batch: int) -> int:
    """Where this process's rows start in the gathered batch (equal shares per process)."""
    return dist.get_rank() * batch if distributed_world() > 1 else 0


def gather_with_gradients(x: torch.Tensor) -> torch.Tensor:
    """Every process's `x`, concatenated in rank order; gradients flow back to each."""
    if distributed_world() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)
