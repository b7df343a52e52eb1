"""MultimodalModel: each modality through its own encoder, then a fuser, then a head."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Set
from typing import Any

import torch
from torch import nn

from fusion.encoders.base import Encoder
from fusion.fusers import Fuser
from fusion.summary import summarize

FuserFactory = Callable[..., Fuser]
HeadFactory = Callable[..., nn.Module]


class MultimodalModel(nn.Module):
    """Routes `inputs[modality]` through `encoders[modality]`, fuses, and applies the head.

    The forward pass is written out in full, so what happens to each modality is visible
    in one place. Inputs are checked against each encoder's `input_shape` so that a wrong
    tensor fails with the modality's name rather than deep inside a convolution. The fuser
    gets each modality's output mask (`output_masks`), so padded tokens and absent samples
    never reach it, whatever their values.
    """

    def __init__(
        self,
        encoders: Mapping[str, Encoder],
        fuser: Fuser,
        head: nn.Module,
        modality_dropout: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if not encoders:
            raise ValueError("MultimodalModel needs at least one encoder")
        self.encoders = nn.ModuleDict(dict(encoders))
        self.fuser = fuser
        self.head = head
        self.modality_dropout = ModalityDropout(modality_dropout or {}, list(encoders))
        if list(fuser.in_dims) != list(self.encoders):
            raise ValueError(
                f"fuser was built for modalities {list(fuser.in_dims)}, "
                f"encoders are {list(self.encoders)}"
            )

    @classmethod
    def build(
        cls,
        encoders: Mapping[str, Encoder],
        fuser: FuserFactory,
        head: HeadFactory,
        num_classes: int | Mapping[str, int],
        modality_dropout: Mapping[str, float] | None = None,
    ) -> MultimodalModel:
        """Wire factories together, feeding each one the sizes of the part before it.

        A fuser that already produces predictions (late fusion) is given `num_classes`
        and followed by a pass-through head instead of `head`.
        """
        in_dims = {m: enc.out_dim for m, enc in encoders.items()}
        if getattr(_target_class(fuser), "produces_logits", False):
            if isinstance(num_classes, Mapping):
                raise ValueError(
                    f"late fusion predicts one set of classes, but the task has several "
                    f"({sorted(num_classes)}); use another fuser with model/head=multitask"
                )
            fuser_module = fuser(in_dims=in_dims, num_classes=num_classes)
            head_module = PassThroughHead()
        else:
            fuser_module = fuser(in_dims=in_dims)
            head_module = head(in_dim=fuser_module.out_dim, num_classes=num_classes)
        return cls(encoders, fuser_module, head_module, modality_dropout)

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def check_inputs(self, inputs: Mapping[str, Any], encoded: Set[str] = frozenset()) -> None:
        for modality, encoder in self.encoders.items():
            if modality not in inputs:
                raise KeyError(
                    f"the model needs modality '{modality}', but the batch only has "
                    f"{sorted(inputs)}"
                )
            if modality not in encoded:
                encoder.check_input(inputs[modality], modality)
            elif tuple(inputs[modality].shape[1:]) != encoder.out_shape:
                raise ValueError(
                    f"modality '{modality}': cached features have shape "
                    f"{list(inputs[modality].shape)}, the encoder gives "
                    f"[batch, {', '.join(map(str, encoder.out_shape))}]"
                )

    def encode(
        self,
        inputs: Mapping[str, Any],
        encoded: Set[str] = frozenset(),
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each modality's features; those in `encoded` already are features (cached).

        `present[m]` reaches the encoders that take their input mask (`takes_mask`).
        """
        self.check_inputs(inputs, encoded)
        present = present or {}
        return {
            m: inputs[m] if m in encoded else encoder.encode(inputs[m], present.get(m))
            for m, encoder in self.encoders.items()
        }

    def output_masks(
        self,
        inputs: Mapping[str, Any],
        present: Mapping[str, torch.Tensor] | None = None,
        encoded: Set[str] = frozenset(),
    ) -> dict[str, torch.Tensor]:
        """The fuser's `present`: each modality's mask of its features, not of its input.

        `encoder.output_mask` turns the input mask ([B] or [B, T], absent: all present) into
        [B] for vectors or [B, T'] for tokens, False at padding, so an attention fuser never
        attends to padding. Cached (`encoded`) modalities already carry that mask (see
        `FeatureCache`); without one they count as present everywhere.
        """
        present = present or {}
        masks = {}
        for m, encoder in self.encoders.items():
            if m not in encoded:
                masks[m] = encoder.output_mask(inputs[m], present.get(m))
            elif m in present:
                masks[m] = present[m]
        return masks

    def forward(
        self,
        inputs: Mapping[str, Any],
        present: Mapping[str, torch.Tensor] | None = None,
        condition: torch.Tensor | None = None,
        encoded: Set[str] = frozenset(),
    ) -> torch.Tensor:
        features = self.encode(inputs, encoded, present)
        masks = self.output_masks(inputs, present, encoded)
        if self.training:
            masks = self.modality_dropout(masks, len(next(iter(features.values()))))
        fused = self.fuser(features, masks)
        return self.head(fused, condition)

    def example_inputs(self, batch_size: int = 2) -> dict[str, Any]:
        """A batch every encoder accepts, on the model's device, for dry runs."""
        device = next(self.parameters()).device
        return {
            m: x.to(device) if isinstance(x, torch.Tensor) else x
            for m, enc in self.encoders.items()
            for x in [enc.example_input(batch_size)]
        }

    def summary(self, max_depth: int = 4) -> str:
        """Keras-style table: each module's type, output shape, parameters, trainable."""
        inputs = self.example_inputs()
        condition = torch.zeros(2, dtype=torch.long, device=next(self.parameters()).device)
        return summarize(self, lambda: self(inputs, condition=condition), max_depth=max_depth)


class PassThroughHead(nn.Module):
    """The head after a fuser that already predicts (late fusion)."""

    def forward(self, fused: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return fused


def _target_class(factory: Callable) -> object:
    """The class a factory builds (a class, or a `functools.partial` of one)."""
    return getattr(factory, "func", factory)


class ModalityDropout(nn.Module):
    """Drop whole modalities during training by clearing their `present` mask.

    Each modality is dropped with its own probability, independently per sample; a sample
    that would lose every modality it has keeps them all, so no sample is left empty.
    """

    def __init__(self, rates: Mapping[str, float], modalities: list[str]) -> None:
        super().__init__()
        unknown = sorted(set(rates) - set(modalities))
        if unknown:
            raise ValueError(
                f"modality_dropout names modalities {unknown} the model does not have "
                f"(it has {modalities})"
            )
        bad = {m: p for m, p in rates.items() if not 0.0 <= p < 1.0}
        if bad:
            raise ValueError(f"modality_dropout rates must be in [0, 1), got {bad}")
        self.rates = {m: float(p) for m, p in rates.items() if p > 0}
        self.modalities = modalities

    def forward(
        self, present: Mapping[str, torch.Tensor] | None, batch_size: int
    ) -> Mapping[str, torch.Tensor] | None:
        if not self.rates:
            return present
        present = dict(present or {})
        device = next(iter(present.values())).device if present else None
        before = {
            m: present.get(m, torch.ones(batch_size, dtype=torch.bool, device=device))
            for m in self.rates
        }
        after = {}
        for m, mask in before.items():
            keep = torch.rand(batch_size, device=mask.device) >= self.rates[m]
            after[m] = mask & keep.view(-1, *[1] * (mask.dim() - 1))  # [B] or token masks [B, T]
        masks = {**present, **after}
        always = [m for m in self.modalities if m not in masks]  # no mask: present everywhere
        left = [p.reshape(batch_size, -1).any(1) for p in masks.values()]
        kept = torch.stack(left, dim=1).any(dim=1) | bool(always)
        for m in after:
            restore = kept.view(-1, *[1] * (after[m].dim() - 1))
            present[m] = torch.where(restore, after[m], before[m])
        return present
