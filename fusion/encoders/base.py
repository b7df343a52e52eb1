"""The Encoder contract: raw modality input in, features out, sizes known up front."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from fusion import surgery
from fusion.freezing import (
    freeze_all_but_last,
    set_frozen_to_eval,
    set_trainable,
    set_trainable_by_pattern,
)


class Encoder(nn.Module):
    """Preprocessing + backbone for one modality, with its input and output shapes known.

    `input_shape` is the per-sample shape the encoder accepts (no batch dimension), so a
    model can reject a wrong tensor with a message that names the modality; it is `None`
    for inputs that are not tensors (text as a list of strings). `out_shape` is found by a
    dry run on `example_input()`, never computed by hand: `(D,)` for a vector, `(T, D)` for
    a token sequence, `(C, H, W)` for a feature map.

    The forward pass is `post(backbone(pre(preprocess(x))))`: `preprocess` is fixed input
    handling (normalization, spectrogram), `pre` and `post` are new trainable layers added
    before and after the pretrained `backbone` (lazy modules, sized by the dry run).
    Subclasses for non-tensor inputs override `example_input`. A `pre` or `post` layer that
    cannot take what the dry run gives it fails there, at construction, naming the layer
    (`post[0] (pool)`), what it expected and the input it found; `backbone_output` is what
    such messages call the backbone's output (e.g. "the backbone's output 'pooled'").

    Masks: `output_mask(x, present)` says which parts of `self(x)` are real, which is what
    the fuser's `present` must be. An encoder that needs its input mask to ignore padding
    sets `takes_mask = True` and accepts `forward(x, mask=None)`; `encode(x, present)`
    calls every encoder the right way.
    """

    takes_mask: bool = False
    """Whether `forward(x, mask=None)` takes the input's presence mask ([B], or [B, T] for
    padded inputs), so that padding cannot reach its features."""

    def __init__(
        self,
        backbone: nn.Module,
        input_shape: Sequence[int] | None,
        preprocess: nn.Module | None = None,
        pre: nn.Module | None = None,
        post: nn.Module | None = None,
        backbone_output: str = "the backbone's output",
    ) -> None:
        super().__init__()
        self.preprocess = preprocess if preprocess is not None else nn.Identity()
        self.pre = pre if pre is not None else nn.Identity()
        self.backbone = backbone
        self.post = post if post is not None else nn.Identity()
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        self.frozen = False
        self.backbone_output = backbone_output
        self.out_shape = self._infer_out_shape()

    @property
    def out_dim(self) -> int:
        """Feature size: the vector length, the token width, or the map's channels."""
        if len(self.out_shape) == 2:
            return self.out_shape[-1]
        return self.out_shape[0]

    def example_input(self, batch_size: int = 2) -> Any:
        """A batch the encoder accepts, for dry runs (shape inference, model summaries)."""
        if self.input_shape is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no input_shape; override example_input()"
            )
        return torch.zeros(batch_size, *self.input_shape)

    @torch.no_grad()
    def _infer_out_shape(self) -> tuple[int, ...]:
        was_training = self.training
        self.eval()
        try:
            with self._naming_layer_failures():
                out = self.forward(self.example_input(2))
        finally:
            self.train(was_training)
        if not isinstance(out, torch.Tensor) or out.dim() not in (2, 3, 4):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{type(self.backbone).__name__} produced {shape}; an Encoder must produce "
                "[batch, D], [batch, T, D] or [batch, C, H, W]"
            )
        return tuple(out.shape[1:])

    def _added_layers(self) -> list[tuple[str, str, nn.Module, str]]:
        """The `pre` and `post` layers: (label, type, module, what its input is called)."""
        raw = isinstance(self.preprocess, nn.Identity)  # no preprocessing
        first_inputs = {
            "pre": "the input" if raw else "the preprocessed input",
            "post": self.backbone_output,
        }
        found = []
        for name, source in first_inputs.items():
            stack = getattr(self, name)
            if isinstance(stack, nn.Identity):
                continue
            listed = isinstance(stack, nn.Sequential)
            layers = list(stack) if listed else [stack]
            kinds = getattr(stack, "kinds", ())  # `surgery.build_layers` keeps the spec types
            if len(kinds) != len(layers):
                kinds = [type(layer).__name__ for layer in layers]
            for index, (layer, kind) in enumerate(zip(layers, kinds, strict=True)):
                label = surgery.layer_label(name, index) if listed else name
                found.append((label, kind, layer, source))
                source = f"the output of {label} ({kind})"
        return found

    @contextmanager
    def _naming_layer_failures(self) -> Iterator[None]:
        """During the dry run, an input a `pre`/`post` layer cannot take
        (`surgery.layer_input_problem`), or any error the layer raises, becomes a ValueError
        naming the layer, its type, and the input it got and where that came from."""
        running: list[tuple[str, str, object, str]] = []  # the layer now in its forward

        def before(label: str, kind: str, source: str, layer: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            found = list(x.shape[1:]) if isinstance(x, torch.Tensor) else type(x).__name__
            if isinstance(found, list):
                problem = surgery.layer_input_problem(kind, layer, found)
                if problem:
                    raise ValueError(f"{label} ({kind}): {problem} ({source})")
            running.append((label, kind, found, source))

        def after(*_: object) -> None:  # returns None: a forward hook's result replaces the output
            running.pop()

        handles = []
        for label, kind, layer, source in self._added_layers():
            hook = partial(before, label, kind, source)
            handles.append(layer.register_forward_pre_hook(hook, prepend=True))
            handles.append(layer.register_forward_hook(after))
        try:
            yield
        except Exception as err:
            if not running:  # not in a layer, or refused by `before`: as it is
                raise
            label, kind, found, source = running[-1]
            raise ValueError(
                f"{label} ({kind}) failed on its input {found} ({source}): {err}"
            ) from err
        finally:
            for handle in handles:
                handle.remove()

    def check_input(self, x: Any, modality: str) -> None:
        """Raise a message naming `modality` when `x` does not fit `input_shape`."""
        if self.input_shape is None:
            return
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"modality '{modality}': expected a tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"modality '{modality}': expected a tensor of shape "
                f"[batch, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}"
            )

    def forward(self, x: Any) -> torch.Tensor:
        return self.post(self.backbone(self.pre(self.preprocess(x))))

    def encode(self, x: Any, present: torch.Tensor | None = None) -> torch.Tensor:
        """`self(x)`, handing `present` over as `mask` when the encoder takes one.

        The one way the model and the feature cache call an encoder, so an encoder of padded
        sequences sees its mask wherever it runs.
        """
        if self.takes_mask:
            return self(x, mask=present)
        return self(x)

    def output_mask(self, x: Any, present: torch.Tensor | None = None) -> torch.Tensor:
        """Bool presence mask of `self(x)`: what the fuser's `present` is for this modality.

        `present` is the input's mask: [B], [B, T] for padded inputs, or None (all
        present). Vector and map outputs get [B] (a sample is there if any of its input
        positions is); token outputs [B, T'] get that [B] mask on every token. Subclasses
        whose tokens include padding refine it, so attention never reaches the padding.
        """
        samples = sample_mask(present, len(x), self._device(x))
        if len(self.out_shape) != 2:
            return samples
        return samples.unsqueeze(1).repeat(1, self.out_shape[0])

    def _device(self, x: Any) -> torch.device:
        """Where this encoder's masks belong: its input's device, else its parameters'."""
        if isinstance(x, torch.Tensor):
            return x.device
        parameter = next(self.parameters(), None)
        return torch.device("cpu") if parameter is None else parameter.device

    def freeze(self) -> Encoder:
        """Stop training this encoder for good (`fusion.freezing`: no gradients, eval mode
        even under `model.train()`); `frozen` tells the feature cache its features are fixed.
        """
        set_trainable(self, False)
        self.frozen = True
        return self

    def unfreeze(self) -> Encoder:
        """Train this encoder again: gradients and train mode, as before `freeze()`."""
        self.frozen = False
        set_trainable(self, True)
        return self

    def train(self, mode: bool = True) -> Encoder:
        """`nn.Module.train`, keeping the frozen parts (or all of a frozen encoder) in eval."""
        super().train(mode and not self.frozen)
        set_frozen_to_eval(self)
        return self


def sample_mask(
    present: torch.Tensor | None, batch_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """[B] bool: which samples have the modality, from its [B] or padded [B, T] mask.

    A padded sample counts as present when any of its positions is real; `None` means
    every sample is present.
    """
    if present is None:
        return torch.ones(batch_size, dtype=torch.bool, device=device)
    if present.dim() not in (1, 2) or present.shape[0] != batch_size:
        raise ValueError(
            f"a presence mask must be [{batch_size}] or [{batch_size}, T], "
            f"got {list(present.shape)}"
        )
    present = present.to(dtype=torch.bool)
    return present if present.dim() == 1 else present.any(dim=1)


FREEZE_CHOICES = ("none", "all", "backbone")


def apply_freeze(
    encoder: Encoder,
    freeze: bool | str | Sequence[str] | None = None,
    trainable_stages: int | None = None,
) -> Encoder:
    """Freeze part of an encoder, as its config asks.

    `freeze`: `None`/"none" trains everything; "all" (or `True`) freezes the encoder;
    "backbone" freezes the pretrained backbone but not the new `pre`/`post` layers, and with
    `trainable_stages=N` keeps its last N stages trainable; a list of glob patterns freezes
    the matching parameter names (e.g. `["backbone.conv1.*", "backbone.layer1.*"]`).
    """
    if freeze is None or freeze is False or freeze == "none":
        if trainable_stages is not None:
            raise ValueError("trainable_stages needs freeze='backbone'")
        return encoder
    if freeze is True or freeze == "all":
        return encoder.freeze()
    if freeze == "backbone":
        if trainable_stages is None:
            set_trainable(encoder.backbone, False)
        else:
            freeze_all_but_last(encoder.backbone, trainable_stages)
    elif isinstance(freeze, str):
        raise ValueError(
            f"freeze must be one of {FREEZE_CHOICES} or a list of patterns, got '{freeze}'"
        )
    else:
        set_trainable_by_pattern(encoder, list(freeze), False)
    return encoder.train(encoder.training)


def channel_stats(mean: object, std: object, channels: int) -> tuple[list[float], list[float]]:
    """`mean` and `std` of a per-channel standardization `(x - mean) / std`, checked: one
    finite number per input channel each, and every std > 0 (a zero std makes every feature
    non-finite, and training stops on a NaN loss). Lists, tuples, numpy arrays and tensors
    are accepted. Every encoder that standardizes with a given mean and std checks them here.
    """
    mean, std = _per_channel("mean", mean, channels), _per_channel("std", std, channels)
    if not all(s > 0 for s in std):
        raise ValueError(f"std: expected values > 0, found {std}")
    return mean, std


def _per_channel(name: str, values: object, channels: int) -> list[float]:
    """`values` as `channels` finite floats, or a ValueError naming `name`."""
    if hasattr(values, "tolist"):  # a numpy array or a tensor
        values = values.tolist()
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        raise ValueError(
            f"{name}: expected a list of numbers, one per input channel, found {values!r}"
        )
    values = [v.item() if hasattr(v, "item") else v for v in values]
    if len(values) != channels:
        raise ValueError(
            f"{name}: expected {channels} value{'s' if channels != 1 else ''} (one per "
            f"input channel), found {len(values)}: {values}"
        )
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name}: expected numbers, found {values}")
    values = [float(v) for v in values]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name}: expected finite values, found {values}")
    return values
