"""MulT: a crossmodal transformer for every ordered pair of modalities (Tsai et al., 2019).

Tsai, Bai, Liang, Kolter, Morency and Salakhutdinov, "Multimodal Transformer for Unaligned
Multimodal Language Sequences", ACL 2019. Each modality's tokens are reinforced by every other
modality through crossmodal attention (the target's tokens query the source's), so sequences of
different lengths need no alignment. Absent modalities and padded tokens are key-padding-masked;
inputs go through `Fuser.tokens`, which zeroes them first, so whatever they hold cannot reach
the output.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fusion.checks import positive_int
from fusion.fusers.base import Fuser
from fusion.fusers.transformer import (
    _check_attention_args,
    _CrossAttentionBlock,
    _learned_token,
    masked_mean,
)

READOUTS = ("last", "mean")


def sinusoidal_positions(
    count: int, dim: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The sinusoidal position table [count, dim] of Vaswani et al. (2017), used by MulT:
    `PE[t, 2i] = sin(t / 10000^(2i / dim))` and `PE[t, 2i + 1] = cos(t / 10000^(2i / dim))`."""
    position = torch.arange(count, device=device, dtype=torch.float32)[:, None]
    exponent = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
    angles = position / 10000.0**exponent  # [count, ceil(dim / 2)]
    table = torch.zeros(count, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : dim // 2])
    return table.to(dtype)


def last_token(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`x[b, t]` [B, D] at the last t where `mask[b, t]` [B, T] is True; zeros where none is.
    `mask` None: every token is real, the last one is picked."""
    if mask is None:
        return x[:, -1]
    index = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, index, 0).amax(dim=1)
    picked = x[torch.arange(x.shape[0], device=x.device), last]
    return torch.where(mask.any(dim=1, keepdim=True), picked, 0.0)


class CrossmodalTransformer(nn.Module):
    """CM_{source -> target} of MulT: `depth` pre-norm blocks in which the target's tokens
    query the source's tokens, followed by a LayerNorm.

    As in the paper (eq. 5-6) every block reads the same low-level source tokens Z_source^[0]
    (normalized by the block's own LayerNorm) while the target stream is updated block by block.
    The residual adds the un-normalized stream, as the authors' code does (the paper's equation
    writes LN on the residual too). A learned null key is attended to only by samples where the
    source has no real token: attention then always has a key, the result is finite and the
    same on every kernel, and the absent source's values are never read. Where the source is
    present the null key is masked, so the block is exactly the paper's attention.

    Shapes: `target` [B, T_target, dim], `source` [B, T_source, dim], `source_real`
    [B, T_source] bool -> [B, T_target, dim]. `source_real` None: every source token is real
    (the null key is then masked for every sample; it stays in, so that it keeps its zero
    gradient, which optimizers and DDP expect of a parameter used every step).
    """

    def __init__(self, dim: int, heads: int, dropout: float, depth: int) -> None:
        super().__init__()
        self.null = _learned_token(1, 1, dim)
        self.blocks = nn.ModuleList(_CrossAttentionBlock(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, target: torch.Tensor, source: torch.Tensor, source_real: torch.Tensor | None
    ) -> torch.Tensor:
        null = self.null.expand(source.shape[0], -1, -1).to(source.dtype)
        keys = torch.cat([null, source], dim=1)
        if source_real is None:  # only the null key is masked
            padding = torch.zeros(keys.shape[:2], dtype=torch.bool, device=keys.device)
            padding[:, 0] = True
        else:
            absent = ~source_real.any(dim=1, keepdim=True)
            padding = ~torch.cat([absent, source_real], dim=1)
        for block in self.blocks:
            target = block(target, keys, padding)
        return self.norm(target)


class MulTFuser(Fuser):
    """Multimodal Transformer (MulT; Tsai et al., ACL 2019), for any number M >= 2 of modalities.

    1. Each modality m is projected to `dim` by a Linear layer applied token by token (the
       paper's temporal Conv1D with kernel size 1) and the sinusoidal positions of Vaswani et
       al. (2017) are added (then dropout): Z_m^[0] = Linear(X_m) + PE.
    2. For every ordered pair (source -> target), a `CrossmodalTransformer` of `cross_layers`
       pre-norm blocks in which the target's tokens query Z_source^[0]: M * (M - 1) of them,
       in `self.crossmodal[target][source]`.
    3. Per target, its M - 1 crossmodal outputs are concatenated along features (in modality
       order) to [B, T_target, (M - 1) * dim] and passed through `self_layers` pre-norm
       self-attention layers (GELU feed-forward of 4x the width) and a LayerNorm.
    4. Per target a readout: `readout="last"` the last real token (the paper's choice),
       `"mean"` the mean over its real tokens.
    5. The M readouts are concatenated in modality order, [B, M * (M - 1) * dim], and, with
       `out_dim`, projected by a Linear layer; `out_dim=None` keeps the concatenation.

    Vector features [B, D] count as one-token sequences; token features [B, T_m, D] may differ
    in length across modalities (no alignment is needed).

    Missing modalities and padding: `present[m]` ([B] or [B, T_m]) becomes a key-padding mask.
    A source absent from a sample is replaced, for that sample, by its crossmodal transformer's
    learned null key, so its values (NaN included) have no influence. A target absent from a
    sample gives zeros in its slot of the output (its queries still run, on zeroed inputs, so
    that attention stays finite, and are then dropped). A sample with every modality absent
    gives an output independent of its values (zeros when `out_dim` is None).

    Args:
        in_dims: modality -> feature size; the order fixes the output layout.
        dim: the common size every modality is projected to; divisible by `heads`.
        heads: attention heads, in crossmodal and self-attention layers.
        cross_layers: blocks per crossmodal transformer (D in the paper).
        self_layers: self-attention layers per target modality.
        dropout: in attention, residual and feed-forward paths, and on the embeddings.
        readout: "last" or "mean", see above.
        out_dim: size of the final projection, or None for no projection.

    Raises:
        ValueError: fewer than 2 modalities; a size or count that is not a positive integer,
            `dim` not divisible by `heads`, `dropout` outside [0, 1), an unknown `readout`
            (each naming the argument); in forward, features or masks that break the fuser
            contract (see `Fuser.check`).
    """

    def __init__(
        self,
        in_dims: Mapping[str, int],
        dim: int = 64,
        heads: int = 4,
        cross_layers: int = 1,
        self_layers: int = 1,
        dropout: float = 0.1,
        readout: str = "last",
        out_dim: int | None = None,
    ) -> None:
        super().__init__(in_dims)
        if len(self.modalities) < 2:
            raise ValueError(
                f"MulTFuser needs at least 2 modalities in in_dims, got {self.modalities}"
            )
        for name, value in (
            ("dim", dim),
            ("heads", heads),
            ("cross_layers", cross_layers),
            ("self_layers", self_layers),
        ):
            positive_int(name, value)
        positive_int("out_dim", out_dim, allow_none=True)
        _check_attention_args(dim, heads, cross_layers, dropout)
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {list(READOUTS)}, got {readout!r}")
        self.dim, self.readout = dim, readout
        count = len(self.modalities)
        width = (count - 1) * dim  # a target's concatenated crossmodal outputs
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in self.in_dims.items()})
        self.embedding_dropout = nn.Dropout(dropout)
        self.crossmodal = nn.ModuleDict(
            {
                target: nn.ModuleDict(
                    {
                        source: CrossmodalTransformer(dim, heads, dropout, cross_layers)
                        for source in self.modalities
                        if source != target
                    }
                )
                for target in self.modalities
            }
        )
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            dim_feedforward=4 * width,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # No nested tensors: the output must not depend on how PyTorch packs padded tokens.
        self.self_attention = nn.ModuleDict(
            {
                target: nn.TransformerEncoder(
                    layer, self_layers, norm=nn.LayerNorm(width), enable_nested_tensor=False
                )
                for target in self.modalities
            }
        )
        concatenated = count * width
        self.project = None if out_dim is None else nn.Linear(concatenated, out_dim)
        self.out_dim = concatenated if out_dim is None else out_dim

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`features[m]` [B, D_m] or [B, T_m, D_m], `present[m]` [B] or [B, T_m] bool
        (None: everything present) -> [B, out_dim]."""
        xs, masks = self.maybe_masked_tokens(features, present)
        embedded = {}
        real = (
            dict.fromkeys(self.modalities)
            if masks is None
            else dict(zip(self.modalities, masks, strict=True))
        )
        for m, x in zip(self.modalities, xs, strict=True):
            z = self.proj[m](x)
            positions = sinusoidal_positions(z.shape[1], self.dim, z.device, z.dtype)
            embedded[m] = self.embedding_dropout(z + positions)
        readouts = []
        for target, pairs in self.crossmodal.items():
            crossed = torch.cat(
                [
                    cm(embedded[target], embedded[source], real[source])
                    for source, cm in pairs.items()
                ],
                dim=-1,
            )
            mask = real[target]
            # An absent target has no real key: its (finite) tokens attend to each other and
            # its readout is dropped below, rather than attention over nothing giving NaN.
            padding = None if mask is None else ~(mask | ~mask.any(dim=1, keepdim=True))
            hidden = self.self_attention[target](crossed, src_key_padding_mask=padding)
            pooled = (
                last_token(hidden, mask) if self.readout == "last" else masked_mean(hidden, mask)
            )
            readouts.append(pooled)
        fused = torch.cat(readouts, dim=-1)
        return fused if self.project is None else self.project(fused)
