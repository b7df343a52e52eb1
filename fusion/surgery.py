"""Explicit, architecture-agnostic edits to pretrained networks.

Every change to a backbone (dropping its classifier, adapting its stem, freezing it) goes
through here, so encoders never poke at a model's private layout themselves.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

CLASSIFIER_NAMES = ("fc", "classifier", "head", "heads")


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Return the module that owns `name` (a dotted path) and the attribute to set on it."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at dotted path `name` for `new`; return the old one."""
    parent, attr = get_submodule_parent(model, name)
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def remove_classifier(model: nn.Module) -> str:
    """Replace the model's final classifier with `nn.Identity`, whatever the model calls it.

    Returns the attribute name that was replaced, so a caller can report what it removed.
    """
    for name in CLASSIFIER_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            replace_module(model, name, nn.Identity())
            return name
    raise ValueError(
        f"{type(model).__name__} has no classifier attribute among {CLASSIFIER_NAMES}; "
        f"its top-level children are {[n for n, _ in model.named_children()]}"
    )


def first_module_of_type(model: nn.Module, kind: type[nn.Module]) -> tuple[str, nn.Module]:
    """The first submodule of type `kind` in registration order (the stem, for a CNN)."""
    for name, module in model.named_modules():
        if isinstance(module, kind):
            return name, module
    raise ValueError(f"{type(model).__name__} has no {kind.__name__} layer")


def adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """Make the stem convolution accept `in_channels`, keeping its learned filters.

    One channel gets the sum of the RGB kernels (a grey image then produces the same
    activations as the same image in RGB); N channels repeat the kernels cyclically and
    rescale by 3/N so activations keep their magnitude (timm's recipe).
    """
    name, conv = first_module_of_type(model, nn.Conv2d)
    if conv.in_channels == in_channels:
        return
    if conv.groups != 1:
        raise ValueError(f"cannot adapt grouped stem convolution '{name}'")
    weight = conv.weight.detach()
    if in_channels == 1:
        new_weight = weight.sum(dim=1, keepdim=True)
    else:
        repeats = -(-in_channels // conv.in_channels)
        new_weight = weight.repeat(1, repeats, 1, 1)[:, :in_channels]
        new_weight = new_weight * (conv.in_channels / in_channels)
    new_conv = _conv_like(conv, in_channels=in_channels)
    with torch.no_grad():
        new_conv.weight.copy_(new_weight)
        if conv.bias is not None:
            new_conv.bias.copy_(conv.bias)
    replace_module(model, name, new_conv)


def adapt_stem_for_small_inputs(model: nn.Module, kernel_size: int = 3) -> None:
    """Keep full resolution through the stem for tiny images (8x8 digits, CIFAR-sized inputs).

    The stem convolution becomes stride 1 with a small kernel (its pretrained filters are
    centre-cropped) and the first max-pool is removed, as in the CIFAR variants of ResNet.
    """
    name, conv = first_module_of_type(model, nn.Conv2d)
    new_conv = _conv_like(conv, kernel_size=kernel_size, stride=1, padding=kernel_size // 2)
    k_old, k_new = conv.kernel_size[0], kernel_size
    start = max((k_old - k_new) // 2, 0)
    with torch.no_grad():
        cropped = conv.weight[:, :, start : start + k_new, start : start + k_new]
        if cropped.shape[-1] == k_new:
            new_conv.weight.copy_(cropped)
        if conv.bias is not None:
            new_conv.bias.copy_(conv.bias)
    replace_module(model, name, new_conv)
    try:
        pool_name, _ = first_module_of_type(model, nn.MaxPool2d)
    except ValueError:
        return
    replace_module(model, pool_name, nn.Identity())


def _conv_like(conv: nn.Conv2d, **overrides) -> nn.Conv2d:
    kwargs = dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    kwargs.update(overrides)
    return nn.Conv2d(**kwargs).to(device=conv.weight.device, dtype=conv.weight.dtype)


def set_trainable(modules: nn.Module | Iterable[nn.Module], trainable: bool) -> None:
    """Freeze or unfreeze every parameter of the given module(s)."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(trainable)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
