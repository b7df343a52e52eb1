"""Bilinear pooling fusers: MLB, MFB, MFH, MUTAN and BLOCK.

A bilinear map z_k = x^T W_k y between two modalities needs a d_x x d_y x o weight tensor
(134M parameters for 512-dim inputs and o = 512). These methods factorize that tensor, so that
z is computed from per-modality projections multiplied elementwise (a Hadamard product);
they differ in how the factors are shared and pooled:

- MLBFuser: rank `mm_dim`, one tanh factor per modality; an optional linear layer after.
- MFBFuser: rank `factor` per output (windows of `factor` products summed), then signed
  square root and L2 normalization.
- MFHFuser: `order` cascaded MFB blocks, each multiplying in the previous block's product;
  each block normalized, then all concatenated.
- MutanFuser: Tucker decomposition with tanh factors and a core whose slices have rank
  `rank`, then a linear layer.
- BlockFuser: block-term decomposition: `chunks` small rank-`rank` Tucker cores on chunks
  of the projections, each normalized, then a linear layer.

The papers define them for two modalities; here each is the same product over N >= 2
modalities (a multilinear map with the same factorization, one factor per modality), which
for two modalities is exactly the paper's equation.

Token inputs [B, T, D] are averaged over their real tokens first (`Fuser.vectors`), as for
every vector fuser. A missing modality's factor becomes the multiplicative identity (a vector
of ones) in every product, selected with `torch.where`, so the product reduces to the present
modalities and the absent modality's values (NaN included) reach neither the output nor any
gradient. With every modality absent the product is all ones: a constant output, the same
for every such sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusion.checks import dropout_rate, positive_int
from fusion.fusers.base import Fuser


def hadamard(factors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None) -> torch.Tensor:
    """Elementwise product of one factor per modality ([B, ...] each, in modality order);
    where `masks[i]` ([B]) is False, modality i's factor is replaced by ones (a select, never
    a multiplication by the mask, so whatever it holds has no influence). `masks` None:
    every modality is present."""
    product = None
    for i, factor in enumerate(factors):
        if masks is not None:
            present = masks[i].reshape(-1, *[1] * (factor.dim() - 1))
            factor = torch.where(present, factor, 1.0)
        product = factor if product is None else product * factor
    return product


def signed_sqrt(z: torch.Tensor) -> torch.Tensor:
    """Power normalization sign(z) * sqrt(|z|), elementwise.

    Exact for |z| >= eps (the dtype's machine epsilon) and linear below (z / sqrt(eps)), so
    its gradient stays finite at 0, where sqrt's is infinite (the usual
    sqrt(relu(z)) - sqrt(relu(-z)) turns an exact zero into NaN gradients).
    """
    return z / torch.sqrt(z.abs().clamp_min(torch.finfo(z.dtype).eps))


def power_l2(z: torch.Tensor) -> torch.Tensor:
    """Signed square root, then L2 normalization over the last dimension (MFB's and BLOCK's
    normalization); a zero vector stays zero."""
    return F.normalize(signed_sqrt(z), p=2.0, dim=-1)


def sum_pool(z: torch.Tensor, window: int) -> torch.Tensor:
    """[B, o * window] -> [B, o]: output j sums entries j * window ... (j + 1) * window - 1."""
    return z.unflatten(-1, (-1, window)).sum(dim=-1)


def chunk_sizes(total: int, chunks: int) -> list[int]:
    """`chunks` sizes as equal as possible summing to `total`, the larger ones first."""
    base, extra = divmod(total, chunks)
    return [base + 1] * extra + [base] * (chunks - extra)


class _PoolingFuser(Fuser):
    """A fuser of products between modalities: at least two of them."""

    method = "bilinear pooling"

    def __init__(self, in_dims: Mapping[str, int]) -> None:
        super().__init__(in_dims)
        if len(self.modalities) < 2:
            raise ValueError(
                f"{self.method} fuses products between modalities and needs at least two in "
                f"in_dims, got {len(self.modalities)}: {self.modalities}"
            )

    def linears(self, size: int) -> nn.ModuleDict:
        """One linear layer per modality, from its feature size to `size`."""
        return nn.ModuleDict({m: nn.Linear(d, size) for m, d in self.in_dims.items()})


class MLBFuser(_PoolingFuser):
    """Multimodal low-rank bilinear pooling, MLB (Kim et al., ICLR 2017, "Hadamard Product for
    Low-rank Bilinear Pooling"): f = P^T (tanh(U^T x) * tanh(V^T y)) + b.

    Each modality is projected to `mm_dim` (with a bias) and squashed by tanh; the projections
    are multiplied elementwise, and an optional linear layer P maps the product to `out_dim`.
    For N modalities the product has one tanh factor per modality. Dropout acts on the
    product, before P.

    Args:
        in_dims: modality -> feature size (two or more modalities).
        mm_dim: size of the joint (Hadamard product) space, the rank of the factorized
            bilinear map (1200 in the paper, for 2400 and 2048-dim inputs).
        out_dim: output size of P; None returns the product itself ([B, mm_dim]).
        dropout: dropout rate on the product.

    Shapes: features[m] [B, d_m] or [B, T, d_m] (averaged over real tokens) -> [B, out_dim].
    A missing modality's tanh factor is 1, so the product is that of the present ones; with
    none present it is all ones.

    Raises:
        ValueError: fewer than two modalities, or a size or rate out of range (naming it).
    """

    method = "MLB"

    def __init__(
        self,
        in_dims: Mapping[str, int],
        mm_dim: int = 256,
        out_dim: int | None = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dims)
        positive_int("mm_dim", mm_dim)
        positive_int("out_dim", out_dim, allow_none=True)
        dropout_rate(dropout)
        self.proj = self.linears(mm_dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(mm_dim, out_dim) if out_dim else None
        self.out_dim = out_dim or mm_dim

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        xs, masks = self.maybe_masked_vectors(features, present)
        factors = [torch.tanh(self.proj[m](x)) for m, x in zip(self.modalities, xs, strict=True)]
        joint = self.dropout(hadamard(factors, masks))
        return self.out(joint) if self.out is not None else joint


class MFBFuser(_PoolingFuser):
    """Multimodal factorized bilinear pooling, MFB (Yu et al., ICCV 2017, "Multi-modal
    Factorized Bilinear Pooling with Co-Attention Learning for Visual Question Answering").

    z_j = sum over i in window j of (U^T x * V^T y)_i, with each modality projected (linear,
    with a bias) to `factor * mm_dim`, the product dropped out, sum-pooled over consecutive
    windows of `factor` entries, then power-normalized (sign(z) sqrt|z|) and L2-normalized,
    as in the paper. Each output is a bilinear form of rank `factor`. For N modalities the
    product has one projection per modality. An optional linear layer maps z to `out_dim`.

    Args:
        in_dims: modality -> feature size (two or more modalities).
        mm_dim: o, the number of pooled outputs (1000 in the paper).
        factor: k, the window size: the rank of each output's factorization (5 in the paper).
        out_dim: output size of an optional linear layer after the normalization; None
            returns z itself ([B, mm_dim], unit L2 norm).
        dropout: dropout rate on the product, before pooling (0.1 in the paper).

    Shapes: features[m] [B, d_m] or [B, T, d_m] (averaged over real tokens) -> [B, out_dim].
    A missing modality's projection is replaced by ones, so the product is that of the
    present ones; with none present it is all ones (z is then constant).

    Raises:
        ValueError: fewer than two modalities, or a size or rate out of range (naming it).
    """

    method = "MFB"

    def __init__(
        self,
        in_dims: Mapping[str, int],
        mm_dim: int = 128,
        factor: int = 5,
        out_dim: int | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_dims)
        positive_int("mm_dim", mm_dim)
        positive_int("factor", factor)
        positive_int("out_dim", out_dim, allow_none=True)
        dropout_rate(dropout)
        self.proj = self.linears(factor * mm_dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(mm_dim, out_dim) if out_dim else None
        self.factor = factor
        self.out_dim = out_dim or mm_dim

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        xs, masks = self.maybe_masked_vectors(features, present)
        factors = [self.proj[m](x) for m, x in zip(self.modalities, xs, strict=True)]
        expanded = self.dropout(hadamard(factors, masks))
        z = power_l2(sum_pool(expanded, self.factor))
        return self.out(z) if self.out is not None else z


class MFHFuser(_PoolingFuser):
    """Multimodal factorized high-order pooling, MFH (Yu et al., IEEE TNNLS 2018, "Beyond
    Bilinear: Generalized Multimodal Factorized High-order Pooling for Visual Question
    Answering").

    `order` (p) MFB blocks in cascade. Block i has its own projections; its expanded product
    is e_i = dropout(e_{i-1} * U_i^T x * V_i^T y) (e_0 = 1), so block i holds interactions
    of order i + 1. Each e_i is sum-pooled over windows of `factor`, power- and
    L2-normalized on its own, and the p results are concatenated: [B, order * mm_dim]. For N
    modalities each block's product has one projection per modality. An optional linear
    layer maps the concatenation to `out_dim`.

    Args:
        in_dims: modality -> feature size (two or more modalities).
        mm_dim: o, the pooled outputs per block (1000 in the paper).
        factor: k, the window size (5 in the paper).
        order: p, the number of cascaded blocks (2 in the paper; 1 is MFB).
        out_dim: output size of an optional linear layer; None returns the concatenation.
        dropout: dropout rate on each block's expanded product (0.1 in the paper); the
            dropped-out product is the one passed to the next block.

    Shapes: features[m] [B, d_m] or [B, T, d_m] (averaged over real tokens) ->
    [B, out_dim or order * mm_dim]. A missing modality's projections are replaced by ones in
    every block; with none present every block's product is all ones.

    Raises:
        ValueError: fewer than two modalities, or a size or rate out of range (naming it).
    """

    method = "MFH"

    def __init__(
        self,
        in_dims: Mapping[str, int],
        mm_dim: int = 64,
        factor: int = 5,
        order: int = 2,
        out_dim: int | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_dims)
        positive_int("mm_dim", mm_dim)
        positive_int("factor", factor)
        positive_int("order", order)
        positive_int("out_dim", out_dim, allow_none=True)
        dropout_rate(dropout)
        self.blocks = nn.ModuleList([self.linears(factor * mm_dim) for _ in range(order)])
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(order * mm_dim, out_dim) if out_dim else None
        self.factor = factor
        self.out_dim = out_dim or order * mm_dim

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        xs, masks = self.maybe_masked_vectors(features, present)
        expanded, pooled = None, []
        for block in self.blocks:
            product = hadamard(
                [block[m](x) for m, x in zip(self.modalities, xs, strict=True)], masks
            )
            expanded = self.dropout(product if expanded is None else expanded * product)
            pooled.append(power_l2(sum_pool(expanded, self.factor)))
        z = torch.cat(pooled, dim=-1)
        return self.out(z) if self.out is not None else z


class MutanFuser(_PoolingFuser):
    """Multimodal Tucker fusion, MUTAN (Ben-younes et al., ICCV 2017, "MUTAN: Multimodal
    Tucker Fusion for Visual Question Answering").

    A Tucker decomposition of the bilinear tensor: factor matrices x~ = tanh(W_x x) and
    y~ = tanh(W_y y) (size `proj_dim`), a core tensor T_c ([proj_dim, proj_dim, mm_dim]) and
    an output matrix W_o. Each slice T_c[:, :, k] is constrained to rank `rank`, which makes
    the core product a sum of Hadamard products: z = sum_r (M_r^T x~) * (N_r^T y~), and the
    output W_o^T z + b ([B, out_dim]). For N modalities the core has one mode per modality
    and each of its rank terms one factor per modality: z = sum_r prod_m (M_{m,r}^T x~_m).
    The rank factors are affine (with biases), as in the authors' code; dropout acts on the
    tanh projections x~_m.

    Args:
        in_dims: modality -> feature size (two or more modalities).
        proj_dim: size of each modality's Tucker factor x~_m (310 in the paper).
        mm_dim: size of the core's output mode, z (510 in the paper).
        rank: R, the rank of each core slice (10 in the paper).
        out_dim: output size of W_o.
        dropout: dropout rate on the projections x~_m.

    Shapes: features[m] [B, d_m] or [B, T, d_m] (averaged over real tokens) -> [B, out_dim].
    A missing modality's rank factors M_{m,r}^T x~_m are replaced by ones, so each rank term
    is the product of the present ones; with none present z = rank (all entries).

    Raises:
        ValueError: fewer than two modalities, or a size or rate out of range (naming it).
    """

    method = "MUTAN"

    def __init__(
        self,
        in_dims: Mapping[str, int],
        proj_dim: int = 128,
        mm_dim: int = 128,
        rank: int = 10,
        out_dim: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_dims)
        positive_int("proj_dim", proj_dim)
        positive_int("mm_dim", mm_dim)
        positive_int("rank", rank)
        positive_int("out_dim", out_dim)
        dropout_rate(dropout)
        self.proj = self.linears(proj_dim)
        # Row r * mm_dim + k of core[m] is column k of M_{m,r}: the R factors side by side.
        self.core = nn.ModuleDict({m: nn.Linear(proj_dim, rank * mm_dim) for m in self.in_dims})
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(mm_dim, out_dim)
        self.rank = rank
        self.out_dim = out_dim

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        xs, masks = self.maybe_masked_vectors(features, present)
        factors = [
            self.core[m](self.dropout(torch.tanh(self.proj[m](x)))).unflatten(-1, (self.rank, -1))
            for m, x in zip(self.modalities, xs, strict=True)
        ]  # [B, rank, mm_dim] each
        return self.out(hadamard(factors, masks).sum(dim=1))


class BlockFuser(_PoolingFuser):
    """Block-superdiagonal fusion, BLOCK (Ben-younes et al., AAAI 2019, "BLOCK: Bilinear
    Superdiagonal Fusion for Visual Question Answering and Visual Relationship Detection").

    A block-term decomposition of the bilinear tensor: each modality is projected (linear,
    with a bias) to `mm_dim` and cut into `chunks` consecutive chunks (sizes as equal as
    possible); chunk c of every modality meets only chunk c of the others, through its own
    small Tucker core of rank `rank`: z_c = sum_r (A_{c,r}^T x~_c) * (B_{c,r}^T y~_c), of the
    chunk's size. Each z_c is power- and L2-normalized (as in the authors' code, before
    concatenation), the chunks concatenated back to `mm_dim` and mapped by W_o to `out_dim`.
    For N modalities each rank term has one factor per modality. Dropout acts on the
    projections x~.

    Args:
        in_dims: modality -> feature size (two or more modalities).
        mm_dim: size of each modality's projection and of the concatenated z (1600 in the
            paper).
        chunks: number of blocks in the superdiagonal (20 in the paper); at most mm_dim.
        rank: rank of each block's core (15 in the paper).
        out_dim: output size of W_o.
        dropout: dropout rate on the projections (0.1 in the authors' VQA setting).

    Shapes: features[m] [B, d_m] or [B, T, d_m] (averaged over real tokens) -> [B, out_dim].
    A missing modality's rank factors are replaced by ones in every block, so each block
    reduces to the product of the present modalities; with none present every block is the
    constant (rank, ..., rank) before normalization.

    Raises:
        ValueError: fewer than two modalities, a size or rate out of range, or more chunks
            than mm_dim (naming the argument).
    """

    method = "BLOCK"

    def __init__(
        self,
        in_dims: Mapping[str, int],
        mm_dim: int = 256,
        chunks: int = 8,
        rank: int = 10,
        out_dim: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_dims)
        positive_int("mm_dim", mm_dim)
        positive_int("chunks", chunks)
        positive_int("rank", rank)
        positive_int("out_dim", out_dim)
        dropout_rate(dropout)
        if chunks > mm_dim:
            raise ValueError(
                f"chunks must be at most mm_dim ({mm_dim}) so that no chunk is empty, got {chunks}"
            )
        self.sizes = chunk_sizes(mm_dim, chunks)
        self.proj = self.linears(mm_dim)
        # Row r * size + j of a chunk's layer is column j of that chunk's rank-r factor.
        self.cores = nn.ModuleDict(
            {
                m: nn.ModuleList([nn.Linear(size, rank * size) for size in self.sizes])
                for m in self.in_dims
            }
        )
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(mm_dim, out_dim)
        self.rank = rank
        self.out_dim = out_dim

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        xs, masks = self.maybe_masked_vectors(features, present)
        pieces = {
            m: self.dropout(self.proj[m](x)).split(self.sizes, dim=-1)
            for m, x in zip(self.modalities, xs, strict=True)
        }
        blocks = []
        for c in range(len(self.sizes)):
            factors = [
                self.cores[m][c](pieces[m][c]).unflatten(-1, (self.rank, -1))
                for m in self.modalities
            ]  # [B, rank, size] each
            blocks.append(power_l2(hadamard(factors, masks).sum(dim=1)))
        return self.out(torch.cat(blocks, dim=-1))
