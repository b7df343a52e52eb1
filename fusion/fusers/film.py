"""Feature-wise linear modulation: one modality conditions the features of the others."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fusion.checks import positive_int
from fusion.fusers.base import Fuser


class FiLMFuser(Fuser):
    """FiLM (Perez et al., 2018): the `conditioner` modality scales and shifts the others.

    For every other modality m, features h_m (projected to `dim`, or kept as they are when
    `dim` is None) become `gamma_m(c) * h_m + beta_m(c)`, and the results are concatenated.
    As in the paper, the generator predicts delta-gamma (gamma = 1 + linear(c)) with a zero
    bias, so modulation starts near the identity instead of rescaling features at random.
    When the conditioner is absent for a sample the modulation is the identity, so its
    values cannot matter; an absent modulated modality contributes zeros. Without a
    `conditioner`, the last modality conditions the others.
    """

    def __init__(
        self, in_dims: Mapping[str, int], conditioner: str | None = None, dim: int | None = 256
    ) -> None:
        super().__init__(in_dims)
        conditioner = self.modalities[-1] if conditioner is None else conditioner
        if conditioner not in self.in_dims:
            raise ValueError(
                f"conditioner must be one of the modalities {self.modalities}, got {conditioner!r}"
            )
        if len(self.modalities) < 2:
            raise ValueError(
                f"FiLM needs at least two modalities in in_dims (a conditioner and one to "
                f"modulate), got {self.modalities}"
            )
        if dim is not None:
            positive_int("dim", dim)
        self.conditioner = conditioner
        self.modulated = [m for m in self.modalities if m != conditioner]
        sizes = {m: dim or self.in_dims[m] for m in self.modulated}
        self.proj = nn.ModuleDict(
            {m: nn.Linear(self.in_dims[m], dim) if dim else nn.Identity() for m in self.modulated}
        )
        self.film = nn.ModuleDict(
            {m: nn.Linear(self.in_dims[conditioner], 2 * size) for m, size in sizes.items()}
        )
        for generator in self.film.values():
            nn.init.zeros_(generator.bias)
        self.out_dim = sum(sizes.values())

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        xs, masks = self.maybe_masked_vectors(features, present)  # None: all present
        by_name = dict(zip(self.modalities, xs, strict=True))
        cond = by_name[self.conditioner]
        if masks is not None:
            has = dict(zip(self.modalities, masks, strict=True))
        out = []
        for m in self.modulated:
            h = self.proj[m](by_name[m])
            modulation = self.film[m](cond)
            if masks is not None:  # identity modulation where the conditioner is absent
                modulation = torch.where(has[self.conditioner].unsqueeze(1), modulation, 0.0)
            delta_gamma, beta = modulation.chunk(2, dim=-1)
            h = (1 + delta_gamma) * h + beta
            out.append(h if masks is None else torch.where(has[m].unsqueeze(1), h, 0.0))
        return torch.cat(out, dim=1)
