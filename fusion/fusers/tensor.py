"""Multiplicative fusers: tensor fusion, its low-rank form, and bilinear interactions.

All three model products between modalities rather than sums, so a feature of one modality
can scale (gate) the features of another. They differ in how they keep the product small.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from fusion.checks import dropout_rate, positive_int
from fusion.fusers.base import Fuser

MAX_TENSOR_SIZE = 2**20


def _extend(x: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """[x, 1] for present samples and [0, ..., 0, 1] for absent ones (`present` None: all
    present).

    The constant 1 is what lets a product of modalities keep each modality's own (and every
    lower-order) term; zeroing an absent modality's part leaves exactly the interactions of
    the present ones, and its values cannot reach the output.
    """
    if present is not None:
        x = torch.where(present.unsqueeze(1), x, 0.0)
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


class TensorFuser(Fuser):
    """Tensor Fusion Network (Zadeh et al., 2017, "Tensor Fusion Network for Multimodal
    Sentiment Analysis"), for any number of modalities.

    Each modality is (optionally) projected to `dim_per_modality`, extended with a constant 1,
    and the outer product of all extended vectors is flattened: it holds every unimodal,
    bimodal, ..., M-modal product of features. An optional linear layer maps it to `out_dim`
    (`out_dim=None` returns the raw flattened tensor, of size prod(d_m + 1)). An absent
    modality's extended vector is (0, ..., 0, 1), so the tensor reduces to the interactions of
    the present modalities. The size grows as a product, hence the small default projection
    and the guard at `MAX_TENSOR_SIZE`.
    """

    def __init__(
        self,
        in_dims: Mapping[str, int],
        dim_per_modality: int | None = 16,
        out_dim: int | None = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dims)
        positive_int("dim_per_modality", dim_per_modality, allow_none=True)
        positive_int("out_dim", out_dim, allow_none=True)
        dropout_rate(dropout)
        dims = {m: dim_per_modality or d for m, d in self.in_dims.items()}
        tensor_size = math.prod(d + 1 for d in dims.values())
        if tensor_size > MAX_TENSOR_SIZE:
            raise ValueError(
                f"the fused tensor would have prod(d_m + 1) = {tensor_size} entries for sizes "
                f"{dims}, over the limit of {MAX_TENSOR_SIZE}: lower dim_per_modality"
            )
        self.proj = (
            nn.ModuleDict({m: nn.Linear(d, dim_per_modality) for m, d in self.in_dims.items()})
            if dim_per_modality
            else None
        )
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(tensor_size, out_dim) if out_dim else None
        self.out_dim = out_dim or tensor_size

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        xs, masks = self.maybe_masked_vectors(features, present)
        if self.proj is not None:
            xs = [self.proj[m](x) for m, x in zip(self.modalities, xs, strict=True)]
        extended = [_extend(x, None if masks is None else masks[i]) for i, x in enumerate(xs)]
        fused = extended[0]
        for z in extended[1:]:  # the outer product, flattened: [B, i * j]
            fused = (fused[:, :, None] * z[:, None, :]).flatten(1)
        fused = self.dropout(fused)
        return self.out(fused) if self.out is not None else fused


class LowRankFuser(Fuser):
    """Low-rank Multimodal Fusion (Liu et al., 2018, "Efficient Low-rank Multimodal Fusion
    with Modality-Specific Factors").

    TFN followed by a linear layer is a weight tensor of size prod(d_m + 1) x out_dim
    contracted with the outer product. LMF writes that weight as a sum of `rank` outer products
    of per-modality factors W_m[r] ([d_m + 1, out_dim]), so the product never has to be
    built: h = sum_r w_r * prod_m ([x_m, 1] @ W_m[r]) + b, linear rather than exponential in
    the number of modalities. Absent modalities are (0, ..., 0, 1), as in TFN.

    Unlike MultiBench's implementation, the factors are registered parameters and train.
    """

    def __init__(self, in_dims: Mapping[str, int], out_dim: int = 128, rank: int = 4) -> None:
        super().__init__(in_dims)
        positive_int("out_dim", out_dim)
        positive_int("rank", rank)
        self.factors = nn.ParameterList(
            [nn.Parameter(self._init_factor(rank, d, out_dim)) for d in self.in_dims.values()]
        )
        # Equal weights of 1/sqrt(rank): the rank terms are independent at init, so their
        # sum keeps the scale of one term.
        self.fusion_weights = nn.Parameter(torch.full((rank,), rank**-0.5))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.rank = rank
        self.out_dim = out_dim

    @staticmethod
    def _init_factor(rank: int, dim: int, out_dim: int) -> torch.Tensor:
        """Each [x, 1] @ W_m[r] starts with unit variance for unit-variance features.

        Half the variance goes to the features' rows and half to the constant's row, so a
        sample with a modality absent (only the constant left) keeps outputs of the same order
        instead of collapsing by a factor of sqrt(d_m).
        """
        factor = torch.randn(rank, dim + 1, out_dim)
        factor[:, :dim] *= (2 * dim) ** -0.5
        factor[:, dim] *= 0.5**0.5
        return factor

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        xs, masks = self.maybe_masked_vectors(features, present)
        product = None
        for i, (x, factor) in enumerate(zip(xs, self.factors, strict=True)):
            extended = _extend(x, None if masks is None else masks[i])
            term = torch.einsum("bi,rio->bro", extended, factor)
            product = term if product is None else product * term
        return torch.einsum("bro,r->bo", product, self.fusion_weights) + self.bias


class BilinearFuser(Fuser):
    """Multiplicative interactions (Jayakumar et al., 2020, "Multiplicative Interactions and
    Where to Find Them"): out_k = x^T W_k y + (U x)_k + (V y)_k + b_k.

    The first modality (in `in_dims` order) is the context x; the others, concatenated, are
    y. This is the paper's hypernetwork reading: x produces the weights (x^T W) of a linear
    layer applied to y, so for three or more modalities the context interacts with each
    other modality, but those do not interact with one another (use TensorFuser or
    LowRankFuser for all interactions).

    The full W is [out_dim, d_x, d_y], e.g. 33M parameters for 512-dim inputs and
    out_dim=128. It is contracted with y first, through a view of W as [out_dim * d_x, d_y]
    (a matrix product that reads W as it is stored, so no step copies it), then with x. With
    `rank`, W_k = sum_r C[r, k] (A[r] outer B[r]) (a CP decomposition, as in
    the paper's low-rank variant), computed as C^T ((A x) * (B y)) without building W.

    Absent modalities are zero (via `vectors`), which removes them from every term: each term
    is linear in x, in y, or in both, and y's blocks enter separately. What remains for an
    absent context is V y + b, which depends only on present values.
    """

    def __init__(
        self, in_dims: Mapping[str, int], out_dim: int = 128, rank: int | None = None
    ) -> None:
        super().__init__(in_dims)
        if len(self.modalities) < 2:
            raise ValueError(
                f"in_dims must name at least two modalities for a bilinear fuser, got "
                f"{self.modalities}"
            )
        positive_int("out_dim", out_dim)
        positive_int("rank", rank, allow_none=True)
        context_dim = self.in_dims[self.modalities[0]]
        rest_dim = sum(self.in_dims[m] for m in self.modalities[1:])
        # Inits give each bilinear term unit variance for unit-variance inputs.
        if rank is None:
            self.weight = nn.Parameter(
                torch.randn(out_dim, context_dim, rest_dim) * (context_dim * rest_dim) ** -0.5
            )
        else:
            self.context_factor = nn.Parameter(torch.randn(rank, context_dim) * context_dim**-0.5)
            self.rest_factor = nn.Parameter(torch.randn(rank, rest_dim) * rest_dim**-0.5)
            self.out_factor = nn.Parameter(torch.randn(rank, out_dim) * rank**-0.5)
        self.context_linear = nn.Linear(context_dim, out_dim, bias=False)
        self.rest_linear = nn.Linear(rest_dim, out_dim)
        self.rank = rank
        self.out_dim = out_dim

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        xs, _ = self.maybe_masked_vectors(features, present)
        x, y = xs[0], torch.cat(xs[1:], dim=1)
        if self.rank is None:
            out_dim, context_dim, rest_dim = self.weight.shape
            wy = y @ self.weight.view(out_dim * context_dim, rest_dim).t()  # [B, k * i]
            bilinear = (wy.view(-1, out_dim, context_dim) @ x.unsqueeze(-1)).squeeze(-1)
        else:
            hidden = (x @ self.context_factor.t()) * (y @ self.rest_factor.t())  # [B, rank]
            bilinear = hidden @ self.out_factor
        return bilinear + self.context_linear(x) + self.rest_linear(y)
