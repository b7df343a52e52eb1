"""MBT: fusion through a few shared attention-bottleneck tokens (Nagrani et al., 2021).

Nagrani, Yang, Arnab, Jansen, Schmid and Sun, "Attention Bottlenecks for Multimodal Fusion",
NeurIPS 2021. Each modality keeps its own transformer stream; in the last `fusion_layers`
layers, the streams exchange information only through a handful of bottleneck tokens, which forces each
modality to condense what it shares. Absent modalities and padded tokens are key-padding-masked;
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
    _learned_token,
    masked_mean,
    token_count,
)


class BottleneckFuser(Fuser):
    """Multimodal Bottleneck Transformer (MBT; Nagrani et al., NeurIPS 2021), for any number
    M >= 2 of modalities.

    Each modality m is projected to `dim` by a Linear layer, a learned position embedding (per
    token index, up to `max_tokens`, as in ViT and AST which MBT builds on) is added, and a
    learned CLS token of its own is prepended: z_m^0 = [cls_m, Linear(X_m) + pos_m]. Every
    modality has its own `num_layers` pre-norm transformer layers (theta_m, not shared):

    - the first L_f = num_layers - `fusion_layers` layers are unimodal:
      z_m^{l+1} = Transformer(z_m^l; theta_m^l);
    - in the last `fusion_layers` layers, each modality attends over its own tokens and the
      `bottlenecks` shared bottleneck tokens z_fsn, and the bottleneck is the mean of the modalities'
      updated copies (the paper's eq. 8-9):
      [z_m^{l+1} || zhat_fsn,m^{l+1}] = Transformer([z_m^l || z_fsn^l]; theta_m^l),
      z_fsn^{l+1} = mean_m zhat_fsn,m^{l+1}.
      The initial z_fsn is learned.

    Readout: each modality's CLS output after its own final LayerNorm, averaged over the
    modalities: `out_dim = dim`. The paper passes each CLS through one shared linear
    classifier and averages the logits, which for a linear head is the same thing; averaging
    (rather than concatenating) is its choice.

    Vector features [B, D] count as one-token sequences; token features [B, T_m, D] may differ
    in length across modalities.

    Missing modalities and padding: `present[m]` ([B] or [B, T_m]) becomes a key-padding mask
    (the CLS and bottleneck tokens are never masked, so attention always has a key). A
    modality absent from a sample is left out of that sample's bottleneck mean (renormalized
    over the present modalities) and out of its CLS average, so it has no influence at all.
    A sample with every modality absent keeps its bottleneck tokens and gives zeros.

    Args:
        in_dims: modality -> feature size.
        dim: the common token size; divisible by `heads`.
        num_layers: transformer layers per modality.
        fusion_layers: how many of the last layers fuse, 1 <= fusion_layers <= num_layers;
            the paper's L_f is `num_layers - fusion_layers`, so `fusion_layers = num_layers`
            is its early fusion (L_f = 0: bottlenecks from the first layer) and 1 its latest.
        bottlenecks: the number B of shared bottleneck tokens (the paper uses 4).
        heads: attention heads.
        dropout: in attention, residual and feed-forward paths.
        max_tokens: the most tokens one modality may have (size of its position table).

    Raises:
        ValueError: fewer than 2 modalities; a size or count that is not a positive integer,
            `fusion_layers > num_layers`, `dim` not divisible by `heads`, `dropout` outside
            [0, 1) (each naming the argument); in forward, a modality with more than
            `max_tokens` tokens, or features and masks that break the fuser contract.
    """

    def __init__(
        self,
        in_dims: Mapping[str, int],
        dim: int = 64,
        num_layers: int = 2,
        fusion_layers: int = 1,
        bottlenecks: int = 4,
        heads: int = 4,
        dropout: float = 0.1,
        max_tokens: int = 64,
    ) -> None:
        super().__init__(in_dims)
        if len(self.modalities) < 2:
            raise ValueError(
                f"BottleneckFuser needs at least 2 modalities in in_dims, got {self.modalities}"
            )
        for name, value in (
            ("dim", dim),
            ("num_layers", num_layers),
            ("fusion_layers", fusion_layers),
            ("bottlenecks", bottlenecks),
            ("heads", heads),
            ("max_tokens", max_tokens),
        ):
            positive_int(name, value)
        _check_attention_args(dim, heads, num_layers, dropout)
        if fusion_layers > num_layers:
            raise ValueError(
                f"fusion_layers ({fusion_layers}) must be at most num_layers ({num_layers}): "
                "it counts the last layers, which fuse the modalities"
            )
        count = len(self.modalities)
        self.num_layers, self.max_tokens = num_layers, max_tokens
        self.first_fusion_layer = num_layers - fusion_layers  # L_f in the paper
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in self.in_dims.items()})
        self.cls_tokens = _learned_token(count, dim)
        self.position_embedding = _learned_token(count, max_tokens, dim)
        self.bottleneck = _learned_token(1, bottlenecks, dim)
        self.layers = nn.ModuleDict(
            {
                m: nn.ModuleList(
                    nn.TransformerEncoderLayer(
                        dim,
                        heads,
                        dim_feedforward=4 * dim,
                        dropout=dropout,
                        activation="gelu",
                        batch_first=True,
                        norm_first=True,
                    )
                    for _ in range(num_layers)
                )
                for m in self.modalities
            }
        )
        self.norm = nn.ModuleDict({m: nn.LayerNorm(dim) for m in self.modalities})
        self.out_dim = dim

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`features[m]` [B, D_m] or [B, T_m, D_m], `present[m]` [B] or [B, T_m] bool
        (None: everything present) -> [B, dim]."""
        xs, masks = self.maybe_masked_tokens(features, present)
        batch = xs[0].shape[0]
        streams, padding, here = {}, dict.fromkeys(self.modalities), None
        if masks is not None:  # None: every token real, nothing to mask anywhere
            always = torch.ones(batch, 1, dtype=torch.bool, device=xs[0].device)
            here = torch.stack([mask.any(dim=1) for mask in masks], dim=1)  # [B, M]
            padding = {
                m: ~torch.cat([always, mask], dim=1)
                for m, mask in zip(self.modalities, masks, strict=True)
            }
        for i, (m, x) in enumerate(zip(self.modalities, xs, strict=True)):
            if x.shape[1] > self.max_tokens:
                raise ValueError(
                    f"modality '{m}' has {x.shape[1]} tokens, more than "
                    f"max_tokens={self.max_tokens}"
                )
            tokens = self.proj[m](x) + self.position_embedding[i, : x.shape[1]]
            cls = self.cls_tokens[i].expand(batch, 1, -1).to(tokens.dtype)
            streams[m] = torch.cat([cls, tokens], dim=1)
        bottleneck = self.bottleneck.expand(batch, -1, -1)
        for index in range(self.num_layers):
            if index < self.first_fusion_layer:
                for m in self.modalities:
                    streams[m] = self.layers[m][index](streams[m], src_key_padding_mask=padding[m])
                continue
            copies = []
            for m in self.modalities:
                length = streams[m].shape[1]
                joint = torch.cat([streams[m], bottleneck.to(streams[m].dtype)], dim=1)
                keys = None  # the bottleneck tokens are never masked
                if padding[m] is not None:
                    keys = torch.cat(
                        [padding[m], padding[m].new_zeros(batch, self.bottleneck.shape[1])], dim=1
                    )
                out = self.layers[m][index](joint, src_key_padding_mask=keys)
                streams[m] = out[:, :length]
                copies.append(out[:, length:])
            bottleneck = self.bottleneck_mean(torch.stack(copies, dim=1), here, bottleneck)
        cls = torch.stack([self.norm[m](streams[m][:, 0]) for m in self.modalities], dim=1)
        return masked_mean(cls, here)

    @staticmethod
    def bottleneck_mean(
        copies: torch.Tensor, here: torch.Tensor | None, previous: torch.Tensor
    ) -> torch.Tensor:
        """z_fsn = the mean of the modalities' bottleneck copies `copies` [B, M, n, dim] over
        the modalities present in each sample (`here` [B, M], None: all of them); a sample
        with none keeps `previous` [B, n, dim]."""
        if here is None:  # every modality present: the plain mean
            return copies.sum(dim=1) / token_count(copies)
        chosen = here[:, :, None, None]
        total = torch.where(chosen, copies, 0.0).sum(dim=1)
        mean = total / here.sum(dim=1).clamp(min=1).to(copies.dtype)[:, None, None]
        return torch.where(here.any(dim=1)[:, None, None], mean, previous.to(mean.dtype))
