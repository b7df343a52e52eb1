"""A Keras-style model summary: every module with its output shape from a dry run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fusion.surgery import count_parameters


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(list(value.shape[1:]))  # per sample: the batch dimension is dropped
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_shape(v) for v in value) + ")"
    return type(value).__name__


def summarize(model: nn.Module, run: Callable[[], Any], max_depth: int = 4) -> str:
    """Table of modules up to `max_depth` levels: type, output shape, parameters, trainable.

    `run` performs one forward pass (a dry run, in eval mode without gradients); each
    module's output shape is recorded by a hook. Shapes are per sample, without batch.
    """
    shapes: dict[str, str] = {}
    hooks = []
    rows = [
        (n, m)
        for n, m in model.named_modules()
        if n and n.count(".") < max_depth and not isinstance(m, nn.Identity)
    ]
    for name, module in rows:

        def record(_module, _inputs, output, name=name):
            shapes.setdefault(name, _shape(output))

        hooks.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    header = f"{'module':<44}{'type':<24}{'output shape':<22}{'params':>12}  trainable"
    lines = [header, "-" * len(header)]
    for name, module in rows:
        total, trainable = count_parameters(module), count_parameters(module, trainable_only=True)
        state = (
            "-"
            if total == 0
            else "yes"
            if trainable == total
            else "no"
            if not trainable
            else "partly"
        )
        label = "  " * name.count(".") + name.rsplit(".", 1)[-1]
        lines.append(
            f"{label:<44}{type(module).__name__:<24}{shapes.get(name, '-'):<22}{total:>12,}  {state}"
        )
    total, trainable = count_parameters(model), count_parameters(model, trainable_only=True)
    lines += [
        "-" * len(header),
        f"total parameters: {total:,}   trainable: {trainable:,}   frozen: {total - trainable:,}",
    ]
    return "\n".join(lines)
