"""The fuser contract, and the masking every fuser shares.

A fuser is built from `in_dims` (modality -> feature size), exposes `out_dim`, and is called
as `fuser(features, present)`. `features[m]` is a vector batch [B, D] or a token batch
[B, T, D]; `present[m]` is a bool mask [B] (is the modality there for this sample) or, for
tokens, [B, T] (which tokens are real). A missing modality changes nothing but its mask:
fusers never read an absent modality's values, so the output cannot depend on them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fusion.checks import positive_int

Features = Mapping[str, torch.Tensor]
Present = Mapping[str, torch.Tensor] | None


class Fuser(nn.Module):
    """Base class: fixes the modality order (that of `in_dims`) and checks its inputs."""

    def __init__(self, in_dims: Mapping[str, int]) -> None:
        super().__init__()
        if not isinstance(in_dims, Mapping):
            raise ValueError(
                f"in_dims must be a dict {{modality: feature size}}, got "
                f"{type(in_dims).__name__} {in_dims!r}"
            )
        if not in_dims:
            raise ValueError("a fuser needs at least one modality in in_dims")
        names = [m for m in in_dims if not isinstance(m, str)]
        if names:
            raise ValueError(
                f"in_dims must be a dict {{modality: feature size}} keyed by modality names "
                f"(strings), got keys {names!r}"
            )
        self.in_dims = {m: positive_int(f"in_dims['{m}']", d) for m, d in in_dims.items()}
        self.modalities = list(in_dims)
        self.out_dim: int

    def check(self, features: Features, present: Present) -> None:
        """Every expected modality is there with its declared size, floating point of the
        fuser's dtype, and one batch size; `features` and `present` name no other modality."""
        first = None
        weights = self._weights_dtype()
        expected = None if weights is None else (weights, "the dtype of its parameters")
        for m in self.modalities:
            if m not in features:
                raise KeyError(f"fuser expects modality '{m}', got features for {sorted(features)}")
            x = features[m]
            if x.dim() not in (2, 3) or x.shape[-1] != self.in_dims[m]:
                raise ValueError(
                    f"modality '{m}': fuser expects features [batch, {self.in_dims[m]}] or "
                    f"[batch, tokens, {self.in_dims[m]}], got {list(x.shape)}"
                )
            if not x.is_floating_point():
                raise ValueError(
                    f"modality '{m}': fuser expects floating-point features, got {x.dtype}"
                )
            if torch.is_autocast_enabled(x.device.type):
                pass  # layers cast: bfloat16 features meet float32 parameters
            elif expected is None:
                expected = (x.dtype, f"those of modality '{m}'")
            elif x.dtype != expected[0]:
                raise ValueError(
                    f"modality '{m}': fuser expects {expected[0]} features ({expected[1]}), "
                    f"got {x.dtype}; convert them with x.to({expected[0]})"
                    + (f", or the fuser with fuser.to({x.dtype})" if weights else "")
                )
            first = first or (m, len(x))
            if len(x) != first[1]:
                raise ValueError(
                    f"modality '{m}' has a batch of {len(x)} samples, modality '{first[0]}' "
                    f"has {first[1]}; every modality needs the same batch size"
                )
        for given, name in ((features, "features"), (present or {}, "present")):
            unknown = sorted(set(given) - set(self.modalities))
            if unknown:
                raise KeyError(
                    f"{name} names modalities {unknown} that this fuser does not fuse "
                    f"(it fuses {self.modalities})"
                )

    def _weights_dtype(self) -> torch.dtype | None:
        """The dtype features must have: that of the fuser's floating parameters.

        Under autocast features may differ (layers cast them), so `check` skips it there. A
        fuser without parameters (plain concatenation) takes any floating dtype, but one
        for all modalities.
        """
        for tensor in (*self.parameters(), *self.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
        return None

    def token_mask(self, modality: str, x: torch.Tensor, present: Present) -> torch.Tensor:
        """Bool mask [B, T] of the real tokens of `x` ([B, D] counts as one token)."""
        batch, tokens = x.shape[0], (x.shape[1] if x.dim() == 3 else 1)
        mask = torch.ones(batch, tokens, dtype=torch.bool, device=x.device)
        if present is None or modality not in present:
            return mask
        p = present[modality]
        if p.dtype != torch.bool:
            raise ValueError(
                f"modality '{modality}': present mask must be a bool tensor, got {p.dtype}"
            )
        p = p.to(device=x.device)
        if p.dim() == 1 and p.shape[0] == batch:
            return mask & p[:, None]
        if p.shape == (batch, tokens):
            return p
        raise ValueError(
            f"modality '{modality}': present mask has shape {list(p.shape)}, expected "
            f"[{batch}] or [{batch}, {tokens}]"
        )

    def vectors(
        self, features: Features, present: Present
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Features as vectors [B, D] in modality order, absent ones zeroed, and the mask [B, M].

        Token inputs are averaged over their real tokens, so every vector fuser also
        accepts token sequences.
        """
        self.check(features, present)
        xs, masks = [], []
        for m in self.modalities:
            x = features[m]
            tokens = self.token_mask(m, x, present)
            if x.dim() == 3:  # a select, not a product: 0 * NaN would be NaN
                real = torch.where(tokens.unsqueeze(-1), x, torch.zeros_like(x))
                x = real.sum(1) / tokens.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
            mask = tokens.any(dim=1)
            xs.append(torch.where(mask[:, None], x, torch.zeros_like(x)))
            masks.append(mask)
        return xs, torch.stack(masks, dim=1)

    def tokens(
        self, features: Features, present: Present
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Features as token sequences [B, T, D] (a vector is one token) with masks [B, T].

        Padded or absent tokens are zeroed, so their values cannot leak through anything
        that forgets the mask.
        """
        self.check(features, present)
        xs, masks = [], []
        for m in self.modalities:
            x = features[m]
            x = x.unsqueeze(1) if x.dim() == 2 else x
            mask = self.token_mask(m, x, present)
            xs.append(torch.where(mask.unsqueeze(-1), x, torch.zeros_like(x)))
            masks.append(mask)
        return xs, masks


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over the positions where `mask` is True; exact zeros elsewhere, and in rows
    with nothing present.

    Masked scores are replaced (a select), never multiplied by the mask, so whatever they
    hold, NaN or Inf included, reaches neither the weights nor their gradients.
    """
    mask = mask.expand_as(scores)
    lowest = torch.full_like(scores, torch.finfo(scores.dtype).min)
    weights = torch.softmax(torch.where(mask, scores, lowest), dim=dim)
    return torch.where(mask, weights, torch.zeros_like(weights))
