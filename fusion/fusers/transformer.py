"""Attention fusers: a joint transformer over all tokens, and cross-attention from one modality.

Both take vector features [B, D] (one token per modality) or token sequences [B, T, D], and
honour `present` through key-padding masks, so an absent modality or a padded token is never
attended to. Inputs go through `Fuser.tokens`, which also zeroes those slots: their values
cannot reach the output even through a path that ignores the mask.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fusion.checks import dropout_rate, positive_int
from fusion.fusers.base import Fuser


def _check_attention_args(dim: int, heads: int, depth: int, dropout: float) -> None:
    """Fail at construction, naming the argument, rather than deep inside nn.MultiheadAttention."""
    for name, value in (("dim", dim), ("heads", heads), ("depth", depth)):
        positive_int(name, value)
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
    dropout_rate(dropout)


def _learned_token(*shape: int) -> nn.Parameter:
    """A learned embedding, initialized small (std 0.02) as in BERT and ViT."""
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=0.02))


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `x` [B, T, D] over the tokens where `mask` [B, T] is True; zeros where none are.
    `mask` None: every token is real."""
    if mask is None:
        return x.sum(dim=1) / token_count(x)
    weights = mask.unsqueeze(-1).to(x.dtype)
    total = torch.where(mask.unsqueeze(-1), x, 0.0).sum(dim=1)
    return total / weights.sum(dim=1).clamp(min=1.0)


def token_count(x: torch.Tensor) -> float:
    """T of `x` [B, T, D] as `x`'s dtype holds it (a bfloat16 rounds 257 to 256), the divisor
    `masked_mean` gets from a sum of T ones in that dtype."""
    count = float(x.shape[1])
    return count if x.dtype.itemsize >= 4 else float(torch.tensor(count, dtype=x.dtype))


class TransformerFuser(Fuser):
    """Joint self-attention over every modality's tokens, read out from a fusion token.

    The single-stream fusion of ViLT (Kim et al., 2021) and VATT (Akbari et al., 2021): each
    modality is projected to `dim`, tagged with a learned modality embedding and a learned
    position embedding (per token index within its modality, up to `max_tokens`), and a
    learned fusion token, read out like BERT's [CLS] (Devlin et al., 2019), is prepended. The
    encoder is pre-norm (Xiong et al., 2020) for stable training from scratch on top of
    pretrained features. Absent modalities and padded tokens are key-padding-masked; the
    fusion token never is, so a sample with every modality absent still gives a finite
    output (the fusion token alone). `out_dim = dim`.
    """

    def __init__(
        self,
        in_dims: Mapping[str, int],
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        dropout: float = 0.1,
        max_tokens: int = 64,
    ) -> None:
        super().__init__(in_dims)
        _check_attention_args(dim, heads, depth, dropout)
        positive_int("max_tokens", max_tokens)
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in self.in_dims.items()})
        self.modality_embedding = _learned_token(len(self.modalities), dim)
        self.position_embedding = _learned_token(max_tokens, dim)
        self.fusion_token = _learned_token(1, 1, dim)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim_feedforward=4 * dim,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # No nested tensors: the output must not depend on how PyTorch packs padded tokens.
        self.encoder = nn.TransformerEncoder(
            layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )
        self.max_tokens = max_tokens
        self.out_dim = dim

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        xs, masks = self.maybe_masked_tokens(features, present)
        batch = xs[0].shape[0]
        sequence = [self.fusion_token.expand(batch, -1, -1)]
        for i, (m, x) in enumerate(zip(self.modalities, xs, strict=True)):
            count = x.shape[1]
            if count > self.max_tokens:
                raise ValueError(
                    f"modality '{m}' has {count} tokens, more than max_tokens={self.max_tokens}"
                )
            sequence.append(
                self.proj[m](x) + self.modality_embedding[i] + self.position_embedding[:count]
            )
        padding = None  # every token real: nothing to mask
        if masks is not None:
            always = torch.ones(batch, 1, dtype=torch.bool, device=xs[0].device)
            padding = ~torch.cat([always, *masks], dim=1)
        hidden = self.encoder(torch.cat(sequence, dim=1), src_key_padding_mask=padding)
        return hidden[:, 0]


class _CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention block: query tokens attend to the context, then a feed-forward.

    The context is only read, never updated, as in the crossmodal transformer of MulT
    (Tsai et al., 2019) and the Perceiver's cross-attention (Jaegle et al., 2021).
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(4 * dim, dim),
            nn.Dropout(dropout),
        )

    def forward(
        self, query: torch.Tensor, context: torch.Tensor, padding: torch.Tensor | None
    ) -> torch.Tensor:
        """`padding` [B, T_context] is True at the context's masked keys; None: none is."""
        context = self.norm_context(context)
        attended, _ = self.attention(
            self.norm_query(query), context, context, key_padding_mask=padding, need_weights=False
        )
        query = query + self.dropout(attended)
        return query + self.ff(self.norm_ff(query))


class CrossAttentionFuser(Fuser):
    """One modality's tokens query all the others: asymmetric fusion led by `query`.

    Crossmodal attention as in MulT (Tsai et al., 2019): the `query` modality's tokens attend
    to the concatenated tokens of every other modality (the context) through `depth` pre-norm
    blocks. A learned null token is always in the context: attention over only masked keys
    is NaN or zero in PyTorch depending on the kernel, so when every context modality is
    absent the query attends to the null token instead, and the output is finite, the same
    on every kernel, and independent of the absent values.

    The output concatenates two halves, `out_dim = 2 * dim`: the mean of the attended query
    tokens over its real tokens (zeros when the query modality is absent), and the mean of
    the projected context tokens over their real tokens (zeros when all context is absent).
    The context half keeps the other modalities' evidence when the query is missing.
    Context tokens carry no position embedding: order should come from their encoders.
    Without a `query`, the first modality leads.
    """

    def __init__(
        self,
        in_dims: Mapping[str, int],
        query: str | None = None,
        dim: int = 128,
        heads: int = 4,
        dropout: float = 0.1,
        depth: int = 1,
    ) -> None:
        super().__init__(in_dims)
        if len(self.modalities) < 2:
            raise ValueError(
                f"CrossAttentionFuser needs at least 2 modalities in in_dims, got {self.modalities}"
            )
        query = self.modalities[0] if query is None else query
        if query not in self.in_dims:
            raise ValueError(
                f"query must be one of the modalities {self.modalities}, got {query!r}"
            )
        _check_attention_args(dim, heads, depth, dropout)
        self.query = query
        self.context = [m for m in self.modalities if m != query]
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in self.in_dims.items()})
        self.null_context = _learned_token(1, 1, dim)
        self.blocks = nn.ModuleList(_CrossAttentionBlock(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out_dim = 2 * dim

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        xs, masks = self.maybe_masked_tokens(features, present)
        tokens = {m: self.proj[m](x) for m, x in zip(self.modalities, xs, strict=True)}
        context = torch.cat([tokens[m] for m in self.context], dim=1)
        batch = context.shape[0]
        keys = torch.cat([self.null_context.expand(batch, -1, -1), context], dim=1)
        if masks is None:  # every token real: nothing to mask, the null token included
            real = dict.fromkeys(self.modalities)
            context_real = padding = None
        else:
            real = dict(zip(self.modalities, masks, strict=True))
            context_real = torch.cat([real[m] for m in self.context], dim=1)
            padding = ~torch.cat([torch.ones_like(context_real[:, :1]), context_real], dim=1)
        query = tokens[self.query]
        for block in self.blocks:
            query = block(query, keys, padding)
        return torch.cat(
            [
                masked_mean(self.norm(query), real[self.query]),
                masked_mean(context, context_real),
            ],
            dim=-1,
        )
