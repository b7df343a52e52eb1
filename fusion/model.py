"""MultimodalModel: each modality through its own encoder, then a fuser, then a head."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Set
from typing import Any

import torch
from torch import nn

from fusion.checks import dropout_rate
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
        head_in, fuser_out = getattr(head, "in_dim", None), getattr(fuser, "out_dim", None)
        if head_in is not None and fuser_out is not None and head_in != fuser_out:
            late = (
                " (its predictions: a fuser that produces logits is followed by PassThroughHead)"
                if getattr(fuser, "produces_logits", False)
                else ""
            )
            raise ValueError(
                f"head.in_dim is {head_in} but the fuser gives out_dim {fuser_out}{late}; "
                "build the head with in_dim=fuser.out_dim, as MultimodalModel.build does"
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

    def check_inputs(
        self,
        inputs: Mapping[str, Any],
        encoded: Set[str] = frozenset(),
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Refuse, naming the modality, what would fail deep inside a layer or run on silently.

        Each modality the model needs must be there, of its encoder's shape, on the model's
        device and of its floating-point dtype (integers are not scaled here: see
        `check_dtype`); the batch must not be empty and have one size across modalities;
        each presence mask must be bool, [B] or [B, T] for a padded input, and name a
        modality of the batch. Modalities the model does not use are not looked at, so a
        stage-1 model takes the whole batch.
        """
        if not isinstance(inputs, Mapping):
            raise TypeError(
                f"inputs must be a dict {{modality: tensor}}, got {type(inputs).__name__}; "
                f"the model's modalities are {list(self.encoders)}"
            )
        unknown = sorted(set(present or {}) - set(inputs))
        if unknown:
            raise KeyError(
                f"present names {unknown}, which the batch does not have; its modalities are "
                f"{sorted(inputs)}"
            )
        dtype, device = self._parameter_dtype_device()
        sizes: dict[str, int] = {}
        for modality, encoder in self.encoders.items():
            if modality not in inputs:
                raise KeyError(
                    f"the model needs modality '{modality}', but the batch only has "
                    f"{sorted(inputs)}"
                )
            x = inputs[modality]
            if modality not in encoded:
                encoder.check_input(x, modality)
            elif not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != encoder.out_shape:
                found = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(
                    f"modality '{modality}': cached features have shape {found}, the encoder "
                    f"gives [batch, {', '.join(map(str, encoder.out_shape))}]"
                )
            if isinstance(x, torch.Tensor):
                check_dtype(modality, x, dtype, device)
            sizes[modality] = len(x)
            if present is not None and modality in present:
                check_mask(
                    modality,
                    present[modality],
                    x,
                    tokens_only=modality in encoded,
                    sequence=modality in encoded or takes_sequences(encoder, x),
                )
        check_batch_sizes(sizes)
        if self.training and set(sizes.values()) == {1}:
            self._check_batch_of_one(encoded)

    def _check_batch_of_one(self, encoded: Set[str]) -> None:
        """Refuse a training batch of one sample when a batch norm that runs would learn
        from it: its batch statistics of one sample are degenerate (and torch fails deep
        inside the layer when one value per channel is left)."""
        parts = {f"encoders.{m}": e for m, e in self.encoders.items() if m not in encoded}
        parts |= {"fuser": self.fuser, "head": self.head}
        for prefix, part in parts.items():
            for name, module in part.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                    raise ValueError(
                        f"a training batch of 1 sample: batch norm {prefix}.{name} cannot "
                        "estimate statistics from one sample; use batches of 2 or more, or "
                        "call model.eval() (or freeze that part) to use its running statistics"
                    )

    def _parameter_dtype_device(self) -> tuple[torch.dtype, torch.device | None]:
        """The dtype and device inputs must have: those of the model's floating parameters.
        Walked lazily: the first floating tensor answers, so a large model costs nothing."""
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype, tensor.device
        return torch.get_default_dtype(), None

    def encode(
        self,
        inputs: Mapping[str, Any],
        encoded: Set[str] = frozenset(),
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each modality's features; those in `encoded` already are features (cached).

        `present[m]` reaches the encoders that take their input mask (`takes_mask`). Every
        encoder sees zeros where its input is absent or padded (as `collate` pads), whatever
        those positions held: a NaN there could otherwise reach the present samples through
        any layer that mixes samples or positions (batch norm, pooling over padding).
        """
        self.check_inputs(inputs, encoded, present)
        present = present or {}
        return {
            m: inputs[m]
            if m in encoded
            else encoder.encode(zero_masked(inputs[m], present.get(m)), present.get(m))
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
        return self.from_features(features, self.output_masks(inputs, present, encoded), condition)

    def from_features(
        self,
        features: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The head's outputs from each modality's features and output mask (`encode`,
        `output_masks`): modality dropout in training, the fuser, the head."""
        if self.training:
            masks = self.modality_dropout(masks, len(next(iter(features.values()))))
        return self.head(self.fuser(features, masks), condition)

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


def check_dtype(
    modality: str, x: torch.Tensor, dtype: torch.dtype, device: torch.device | None
) -> None:
    """Inputs of the model's dtype and device, or an error that says how to convert them.

    Integer inputs are refused rather than converted: the model cannot know whether uint8
    values are pixels (to divide by 255), codes or counts, and dividing twice or not at all
    both train without a word. Readers scale where the data's meaning is known.
    """
    if not x.is_floating_point():
        raise ValueError(
            f"modality '{modality}': expected a {_dtype_name(dtype)} tensor, got "
            f"{_dtype_name(x.dtype)}; integer inputs are not scaled by the model: convert "
            "them where they are read (uint8 images: x.float() / 255, as torchvision's "
            "ToDtype(torch.float32, scale=True); int16 audio: x.float() / 32768)"
        )
    if x.dtype != dtype:
        raise ValueError(
            f"modality '{modality}': expected a {_dtype_name(dtype)} tensor (the model's "
            f"dtype), got {_dtype_name(x.dtype)}; convert it with x.to(torch."
            f"{_dtype_name(dtype)}), or the model with model.to(torch.{_dtype_name(x.dtype)})"
        )
    if device is not None and x.device != device:
        raise ValueError(
            f"modality '{modality}': the input is on {x.device}, the model on {device}; "
            "move the batch with batch.to(device)"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def takes_sequences(encoder: nn.Module, x: Any) -> bool:
    """Whether `encoder` reads a sequence along the first dimension of each sample, so that a
    [B, T] mask (False at padding) fits its input: it takes its mask (`takes_mask`), or its
    samples are token sequences [T, D]. A vector per sample (a table row, a fixed-length clip)
    or an image is not a sequence: a [B, T] mask there would zero columns or channels."""
    if getattr(encoder, "takes_mask", False):
        return True
    shape = getattr(encoder, "input_shape", None)
    if shape is None and isinstance(x, torch.Tensor):
        shape = tuple(x.shape[1:])
    return shape is not None and len(shape) == 2


def check_mask(
    modality: str, mask: Any, x: Any, tokens_only: bool = False, sequence: bool = True
) -> None:
    """A presence mask is a bool tensor [B], or [B, T] for an input padded along its first
    dimension (`tokens_only`: cached features, where only token sequences [B, T, D] have
    one; `sequence` False: an encoder that takes one vector or image per sample, see
    `takes_sequences`, so a [B, T] mask is refused). A float or int mask is refused: 0.5 or 2
    would silently count as True."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        found = _dtype_name(mask.dtype) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"modality '{modality}': the presence mask must be a bool tensor (True where "
            f"real), got {found}; build it with mask.bool() only if its values are 0 and 1"
        )
    batch = len(x)
    allowed = [(batch,)]
    if not sequence and mask.dim() == 2 and isinstance(x, torch.Tensor):
        what = "one vector" if x.dim() == 2 else f"one {list(x.shape[1:])} input"
        raise ValueError(
            f"modality '{modality}': a [B, T] mask ({list(mask.shape)}) was given but its "
            f"encoder takes {what} per sample (input {list(x.shape)}), not a sequence; give "
            f"a [B] mask ([{batch}]: True where a sample has the modality)"
        )
    if sequence and isinstance(x, torch.Tensor) and x.dim() >= (3 if tokens_only else 2):
        allowed.append((batch, x.shape[1]))
    if tuple(mask.shape) not in allowed:
        shapes = " or ".join(str(list(shape)) for shape in allowed)
        raise ValueError(
            f"modality '{modality}': the presence mask has shape {list(mask.shape)}, expected "
            f"{shapes} for an input of shape "
            f"{list(x.shape) if isinstance(x, torch.Tensor) else f'[{batch}] (a list)'}"
        )


def check_batch_sizes(sizes: Mapping[str, int]) -> None:
    """Every modality has the same number of samples, and at least one."""
    first = next(iter(sizes))
    for modality, size in sizes.items():
        if size == 0:
            raise ValueError(f"modality '{modality}': the batch is empty (0 samples)")
        if size != sizes[first]:
            raise ValueError(
                f"modality '{modality}' has {size} samples, modality '{first}' has "
                f"{sizes[first]}; every modality of a batch needs the same number of samples"
            )


def zero_masked(x: Any, mask: torch.Tensor | None) -> Any:
    """`x` with zeros where `mask` ([B] or [B, T]) is False: a select, so NaN or Inf there
    cannot survive (a product with the mask would keep them: 0 * NaN is NaN)."""
    if mask is None or not isinstance(x, torch.Tensor):
        return x
    mask = mask.to(x.device).reshape(*mask.shape, *[1] * (x.dim() - mask.dim()))
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


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
        rates = {m: dropout_rate(p, f"modality_dropout['{m}']") for m, p in rates.items()}
        self.rates = {m: p for m, p in rates.items() if p > 0}
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
