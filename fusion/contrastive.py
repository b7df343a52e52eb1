"""CLIP-style contrastive alignment of two modalities: the symmetric InfoNCE loss with a
learnable temperature (Radford et al., "Learning Transferable Visual Models From Natural
Language Supervision", ICML 2021, section 2.3; InfoNCE: van den Oord et al., 2018).

Row i of each modality's embeddings is a positive pair; every other row of the batch is a
negative. Under DDP the negatives come from every process: the embeddings are gathered with
`torch.distributed.nn.functional.all_gather`, whose backward pass returns each process its
share of the gradient, so the loss is that of the global batch, whatever each process's
share of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from fusion.fusers.transformer import masked_mean

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

    def forward(self, a: torch.Tensor, b: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """The loss of the pairs of every process (this one's rows against all columns);
        with `gather` False, of this process's pairs alone (no collective: evaluation,
        where processes may hold different numbers of batches).

        Processes may hold different numbers of pairs (some samples lack a modality), none
        included: this process's share of the cross-entropy sum is scaled by
        world_size / (pairs over all processes), so that DDP's mean of the processes'
        gradients is the gradient of the global mean. Fewer than 2 pairs in all: a zero
        that keeps every parameter in the graph (nothing to contrast).
        """
        if a.dim() != 2 or a.shape != b.shape:
            raise ValueError(
                f"expected two embeddings of one shape [batch, dim], got {list(a.shape)} and "
                f"{list(b.shape)}"
            )
        a, b = nn.functional.normalize(a, dim=1), nn.functional.normalize(b, dim=1)
        sizes = gathered_sizes(len(a), a.device) if gather else [len(a)]
        scale = self.log_scale.clamp(max=self.max_log_scale).exp()
        if sum(sizes) < 2:
            return (a.sum() + b.sum() + scale) * 0.0
        all_b, all_a = gather_with_gradients(b, sizes), gather_with_gradients(a, sizes)
        first = sum(sizes[: rank()]) if gather else 0
        targets = torch.arange(first, first + len(a), device=a.device)
        a_to_b = nn.functional.cross_entropy(scale * a @ all_b.T, targets, reduction="sum")
        b_to_a = nn.functional.cross_entropy(scale * b @ all_a.T, targets, reduction="sum")
        return (a_to_b + b_to_a) / 2 * (len(sizes) / sum(sizes))


def pair_name(pair: Sequence[str]) -> str:
    return f"{pair[0]}_{pair[1]}"


def check_pairs(pairs: object, modalities: Sequence[str]) -> list[tuple[str, str]]:
    """`pairs` as a list of distinct modality pairs of `modalities`; ValueError naming the
    pair otherwise."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError(
            f"pairs: expected a list of modality pairs, e.g. [[image, audio]], got {pairs!r}"
        )
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"pairs[{i}]: expected two modality names, got {pair!r}")
        a, b = (str(m) for m in pair)
        unknown = [m for m in (a, b) if m not in modalities]
        if unknown:
            raise ValueError(
                f"pairs[{i}]: the data has no modality {unknown[0]!r}; it has {list(modalities)}"
            )
        if a == b:
            raise ValueError(f"pairs[{i}]: a modality is aligned with another, got [{a}, {b}]")
        if (a, b) in out or (b, a) in out:
            raise ValueError(f"pairs[{i}]: [{a}, {b}] is listed twice")
        out.append((a, b))
    return out


def pooled(features: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One vector per sample `[B, D]` and whether the sample has the modality `[B]`, from
    an encoder's features (`[B, D]`, or tokens `[B, T, D]` averaged over their `[B, T]`
    mask) and its output mask (None: present everywhere). Absent samples get zeros,
    whatever their features held (NaN included), so no gradient meets them."""
    if features.dim() == 3:
        mask = mask if mask is not None else features.new_ones(features.shape[:2], dtype=torch.bool)
        return masked_mean(features, mask), mask.any(dim=1)
    if mask is None:
        return features, features.new_ones(len(features), dtype=torch.bool)
    present = mask if mask.dim() == 1 else mask.any(dim=1)
    zero = torch.zeros((), dtype=features.dtype, device=features.device)
    return torch.where(present[:, None], features, zero), present


class ContrastivePairs(nn.Module):
    """A linear projection of each paired modality's features to `projection_dim`, and one
    `InfoNCE` (with its own learned temperature) per pair, on the samples that have both.

    `embed(features, masks)` projects each modality (`features[m]`: `[B, D_m]` or tokens
    `[B, T, D_m]`; `masks[m]`: the encoder's output mask, see `MultimodalModel.output_masks`);
    `loss(embedded)` is the mean over the pairs that have at least 2 samples with both (on
    all processes). Raises ValueError for a pair of unknown modalities.
    """

    def __init__(
        self,
        in_dims: Mapping[str, int],
        pairs: Sequence[Sequence[str]],
        projection_dim: int = 64,
        temperature: float = CLIP_INITIAL_TEMPERATURE,
    ) -> None:
        super().__init__()
        self.pairs = check_pairs(pairs, list(in_dims))
        used = list(dict.fromkeys(m for pair in self.pairs for m in pair))
        self.projections = nn.ModuleDict({m: nn.Linear(in_dims[m], projection_dim) for m in used})
        self.losses = nn.ModuleDict({pair_name(p): InfoNCE(temperature) for p in self.pairs})

    @property
    def modalities(self) -> list[str]:
        return list(self.projections)

    def embed(
        self, features: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each paired modality's embedding `[B, projection_dim]` and its presence `[B]`."""
        out = {}
        for m, projection in self.projections.items():
            vector, present = pooled(features[m], masks.get(m))
            out[m] = (projection(vector), present)
        return out

    def pair_losses(
        self, embedded: Mapping[str, tuple[torch.Tensor, torch.Tensor]], gather: bool = True
    ) -> dict[str, tuple[torch.Tensor, int]]:
        """Each pair's InfoNCE over `embed`'s output (`gather`: see InfoNCE), by
        `pair_name`, with its number of samples that have both modalities (on all processes)."""
        out = {}
        for a, b in self.pairs:
            (ea, pa), (eb, pb) = embedded[a], embedded[b]
            both = pa & pb
            name = pair_name((a, b))
            shares = gathered_sizes(int(both.sum()), both.device) if gather else [int(both.sum())]
            out[name] = (self.losses[name](ea[both], eb[both], gather), sum(shares))
        return out

    def loss(
        self, embedded: Mapping[str, tuple[torch.Tensor, torch.Tensor]], gather: bool = True
    ) -> torch.Tensor:
        """The mean of the pairs' InfoNCE over the pairs with at least 2 samples."""
        losses = self.pair_losses(embedded, gather).values()
        counted = sum(n >= 2 for _, n in losses)
        return sum(loss for loss, _ in losses) / max(counted, 1)

    def forward(
        self, features: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return self.loss(self.embed(features, masks))


def distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if distributed_world() > 1 else 0


def gathered_sizes(size: int, device: torch.device) -> list[int]:
    """Every process's number of rows, in rank order (`[size]` in one process)."""
    if distributed_world() == 1:
        return [size]
    if dist.get_backend() != "nccl":
        device = torch.device("cpu")
    sizes = [torch.zeros((), dtype=torch.long, device=device) for _ in range(distributed_world())]
    dist.all_gather(sizes, torch.tensor(size, device=device))
    return [int(n) for n in sizes]


def gather_with_gradients(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every process's `x` ([sizes[rank], ...]), concatenated in rank order; gradients flow
    back to each. Rows are padded to the largest share for the collective, then cut."""
    if len(sizes) == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    padded = nn.functional.pad(x, (0, 0, 0, max(sizes) - len(x)))
    parts = all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)], dim=0)
