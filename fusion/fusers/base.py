"""The fuser contract, and the masking every fuser shares.

A fuser is built from `in_dims` (modality -> feature size), exposes `out_dim`, and is called
as `fuser(features, present)`. `features[m]` is a vector batch [B, D] or a token batch
[B, T, D]; `present[m]` is a bool mask [B] (is the modality there for this sample) or, for
tokens, [B, T] (which tokens are real). A missing modality changes nothing but its mask:
fusers never read an absent modality's values, so the output cannot depend on them.

Masking costs a few operations per modality and call, which is most of a small fuser's
step, so two things are done once rather than on every call: inputs are checked once per
signature (names, shapes, dtypes, devices, autocast state), and when every modality is
present in every sample (`present` is None or its masks are all True) the masks are not
applied at all. Both give the same values as the full path: masking a present value is
the identity.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping

import torch
from torch import nn

from fusion.checks import positive_int

Features = Mapping[str, torch.Tensor]
Present = Mapping[str, torch.Tensor] | None

CHECKED_SIGNATURES = 64
"""Input signatures a fuser remembers as checked (token counts that vary by batch give many);
past this many the memory starts over."""


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
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
        return None

    def check_masks(self, features: Features, present: Present) -> None:
        """Each mask in `present` is bool, [B] or [B, T] for its modality's features (a vector
        counts as one token). The checks of `token_mask`, for fusers that skip it."""
        if present is None:
            return
        for m in self.modalities:
            if m in present:
                x = features[m]
                _check_mask(m, present[m], x.shape[0], x.shape[1] if x.dim() == 3 else 1)

    def check_once(self, features: Features, present: Present) -> None:
        """`check` and `check_masks`, run once per input signature: the modalities' names,
        shapes, dtypes and devices, the masks' names, shapes and dtypes, and the autocast
        state. Their verdict depends on nothing else but the parameters' dtype, and that can
        only change through `.to()` (or its kin) or loading a state dict, which forget the
        signatures seen (`_apply`, `_load_from_state_dict`). A parameter of another dtype set
        by hand into a submodule is the one change not seen: features of the old dtype then
        fail in the first layer, with torch's own message.
        """
        key = None if torch.compiler.is_compiling() else _signature(features, present)
        if key is None:
            self.check(features, present)
            self.check_masks(features, present)
            return
        seen = self.__dict__.setdefault("_checked_signatures", {})
        if key in seen:
            return
        self.check(features, present)
        self.check_masks(features, present)
        if len(seen) >= CHECKED_SIGNATURES:
            seen.clear()
        seen[key] = None

    def _apply(self, *args, **kwargs):
        self.__dict__.pop("_checked_signatures", None)  # the parameters' dtype may change
        return super()._apply(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.__dict__.pop("_checked_signatures", None)  # assign=True may change the dtype
        super()._load_from_state_dict(*args, **kwargs)

    def every_modality_present(self, present: Present) -> bool:
        """True when no sample misses a modality and no token is padding, so masking would
        change nothing: `present` is None, or each of its masks is all True.

        Only masks on the CPU are read: on an accelerator, reading a mask waits for the work
        queued before it (a host sync), which costs more than masking does, so a mask there
        is applied without looking at it. Under torch.compile masks are always applied (a
        branch on a value would break the graph).
        """
        if present is None:
            return True
        if torch.compiler.is_compiling():
            return False
        for m in self.modalities:
            if m in present:
                p = present[m]
                if p.device.type != "cpu" or not bool(p.all()):
                    return False
        return True

    def token_mask(self, modality: str, x: torch.Tensor, present: Present) -> torch.Tensor:
        """Bool mask [B, T] of the real tokens of `x` ([B, D] counts as one token)."""
        batch, tokens = x.shape[0], (x.shape[1] if x.dim() == 3 else 1)
        mask = torch.ones(batch, tokens, dtype=torch.bool, device=x.device)
        if present is None or modality not in present:
            return mask
        p = present[modality]
        _check_mask(modality, p, batch, tokens)
        p = p.to(device=x.device)
        if p.dim() == 1:
            return mask & p[:, None]
        return p

    def vectors(
        self, features: Features, present: Present
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Features as vectors [B, D] in modality order, absent ones zeroed, and the mask [B, M].

        Token inputs are averaged over their real tokens, so every vector fuser also
        accepts token sequences.
        """
        xs, masks = self.maybe_masked_vectors(features, present)
        if masks is None:
            return xs, torch.ones(xs[0].shape[0], len(xs), dtype=torch.bool, device=xs[0].device)
        return xs, torch.stack(masks, dim=1)

    def maybe_masked_vectors(
        self, features: Features, present: Present
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """`vectors`, with the masks as a list of [B] (one per modality, in modality order;
        stack them for `vectors`' [B, M]), or None when every modality is present in every
        sample (`every_modality_present`): the features are then returned as they are, and
        a fuser can leave out every masking step, which would change no value."""
        self.check_once(features, present)
        if self.every_modality_present(present):
            xs = [features[m] for m in self.modalities]
            return [
                x if x.dim() == 2 else self._vector(m, x, present)[0]
                for m, x in zip(self.modalities, xs, strict=True)
            ], None
        xs, masks = [], []
        for m in self.modalities:
            x, mask = self._vector(m, features[m], present)
            xs.append(x)
            masks.append(mask)
        return xs, masks

    def _vector(
        self, modality: str, x: torch.Tensor, present: Present
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One modality as vectors [B, D], zero where absent, and its mask [B]."""
        if x.dim() == 2:
            p = None if present is None else present.get(modality)
            if p is None:
                return x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            if p.dim() == 2:  # [B, 1]: one token
                p = p[:, 0]
            if p.device != x.device:
                p = p.to(device=x.device)
            return torch.where(p.unsqueeze(1), x, 0.0), p
        tokens = self.token_mask(modality, x, present)
        # A select, not a product: 0 * NaN would be NaN.
        real = torch.where(tokens.unsqueeze(-1), x, 0.0)
        x = real.sum(1) / tokens.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
        mask = tokens.any(dim=1)
        return torch.where(mask[:, None], x, 0.0), mask

    def tokens(
        self, features: Features, present: Present
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Features as token sequences [B, T, D] (a vector is one token) with masks [B, T].

        Padded or absent tokens are zeroed, so their values cannot leak through anything
        that forgets the mask.
        """
        xs, masks = self.maybe_masked_tokens(features, present)
        if masks is None:
            masks = [torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) for x in xs]
        return xs, masks

    def maybe_masked_tokens(
        self, features: Features, present: Present
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """`tokens`, with None for the masks when every modality is present in every sample
        and no token is padding (`every_modality_present`): the features are returned as
        they are (a vector as one token), and a fuser can leave out every mask."""
        self.check_once(features, present)
        xs = [features[m] for m in self.modalities]
        xs = [x.unsqueeze(1) if x.dim() == 2 else x for x in xs]
        if self.every_modality_present(present):
            return xs, None
        masks = [self.token_mask(m, x, present) for m, x in zip(self.modalities, xs, strict=True)]
        xs = [torch.where(mask.unsqueeze(-1), x, 0.0) for x, mask in zip(xs, masks, strict=True)]
        return xs, masks


def _check_mask(modality: str, p: torch.Tensor, batch: int, tokens: int) -> None:
    """A presence mask is bool, [B] or [B, T]; anything else is refused, naming the modality."""
    if p.dtype != torch.bool:
        raise ValueError(
            f"modality '{modality}': present mask must be a bool tensor, got {p.dtype}"
        )
    if not ((p.dim() == 1 and p.shape[0] == batch) or p.shape == (batch, tokens)):
        raise ValueError(
            f"modality '{modality}': present mask has shape {list(p.shape)}, expected "
            f"[{batch}] or [{batch}, {tokens}]"
        )


def _signature(features: Features, present: Present) -> Hashable | None:
    """What `Fuser.check_once` keys its verdict on; None (check every time) for inputs that
    are not tensors, which `check` then refuses with its own message."""
    try:
        return (
            tuple(
                (m, x.shape, x.dtype, x.device, torch.is_autocast_enabled(x.device.type))
                for m, x in features.items()
            ),
            None if present is None else tuple((m, p.shape, p.dtype) for m, p in present.items()),
        )
    except (AttributeError, TypeError):
        return None


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over the positions where `mask` is True; exact zeros elsewhere, and in rows
    with nothing present.

    Masked scores are replaced (a select), never multiplied by the mask, so whatever they
    hold, NaN or Inf included, reaches neither the weights nor their gradients.
    """
    mask = mask.expand_as(scores)
    lowest = torch.finfo(scores.dtype).min
    weights = torch.softmax(torch.where(mask, scores, lowest), dim=dim)
    return torch.where(mask, weights, 0.0)
