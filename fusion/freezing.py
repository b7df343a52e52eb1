"""Freeze and unfreeze parts of a model, with one meaning of frozen everywhere.

A frozen part has no gradients, updates no statistics (batch norm in eval mode) and is
deterministic (dropout off), and it stays so when the model is put in train mode: a frozen
part is one whose parameters are all frozen, together with the parameter-free modules it
holds (its dropouts, activations). Thawing gives the part back its gradients and train mode.

`model.train()` sets every submodule to train mode, so freezing registers a forward pre-hook
on each frozen part that puts it back in eval mode before it runs (until then its `training`
flag reads True); `fusion.encoders.base.Encoder.train` puts its frozen parts back at once.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence

from torch import nn

from fusion.surgery import match_parameters, stages

# Frozen parts that carry the hook already (weak, so a model's lifetime is its own).
_HOOKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def frozen_parts(module: nn.Module) -> list[nn.Module]:
    """The largest submodules that have parameters, none of them trainable."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        return [module]
    return [part for child in module.children() for part in frozen_parts(child)]


def set_frozen_to_eval(module: nn.Module) -> None:
    """Put every frozen part of `module` in eval mode (after `train()` made it train)."""
    for part in frozen_parts(module):
        if any(m.training for m in part.modules()):
            part.eval()


def set_trainable(modules: nn.Module | Iterable[nn.Module], trainable: bool) -> None:
    """Freeze or thaw every parameter of the given module(s), and their mode with them.

    Frozen modules go to eval mode and stay there under `train()`; thawed ones go to train
    mode, since a module is thawed to be trained (`eval()` works on them as usual).
    """
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(trainable)
        if trainable:
            module.train()
        else:
            _keep_frozen_in_eval(module)


def set_trainable_by_pattern(
    model: nn.Module, patterns: str | Sequence[str], trainable: bool
) -> list[str]:
    """Freeze or thaw the parameters whose names match any glob pattern.

    Returns the names it changed; a pattern that matches nothing is an error that lists a
    few parameter names, since a silent no-op is how "frozen" layers end up training.
    Thawing puts the model in the mode it had (train mode if it was wholly frozen); the
    parts left frozen are in eval mode either way.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    hits = match_parameters(model, patterns, "freeze")
    changed = list(dict.fromkeys(name for names in hits.values() for name in names))
    wholly_frozen = frozen_parts(model) == [model]
    params = dict(model.named_parameters())
    for name in changed:
        params[name].requires_grad_(trainable)
    if trainable:
        model.train(model.training or wholly_frozen)
    _keep_frozen_in_eval(model)
    return changed


def freeze_all_but_last(model: nn.Module, n: int) -> list[str]:
    """Freeze every stage but the last `n` (n=0 freezes all); return the trainable stages."""
    found = stages(model)
    if not 0 <= n <= len(found):
        raise ValueError(
            f"cannot keep the last {n} stages trainable: {type(model).__name__} has "
            f"{len(found)} stages {[name for name, _ in found]}"
        )
    return _thaw_last(model, found, n)


def _thaw_last(model: nn.Module, found: list[tuple[str, nn.Module]], n: int) -> list[str]:
    """Freeze `model`, then thaw the last `n` of its stages `found`; their names."""
    set_trainable(model, False)
    keep = found[len(found) - n :] if n else []
    set_trainable([m for _, m in keep], True)
    _keep_frozen_in_eval(model)  # the stages left frozen get their own hooks
    return [name for name, _ in keep]


def _keep_frozen_in_eval(module: nn.Module) -> None:
    """Frozen parts of `module` to eval mode now, and before each of their forwards; a
    hooked part that thaws later is left alone by its hook."""
    set_frozen_to_eval(module)
    for part in frozen_parts(module):
        if part not in _HOOKED:
            part.register_forward_pre_hook(_frozen_to_eval_hook)
            _HOOKED.add(part)


def _frozen_to_eval_hook(module: nn.Module, args: tuple) -> None:
    set_frozen_to_eval(module)


class GradualUnfreezing:
    """Unfreeze a model's stages from the last to the first as training progresses.

    From `start_epoch`, every `every` epochs `stages_per_step` more stages become
    trainable (ULMFiT's schedule). The optimizer should hold all parameters from the
    start; frozen ones have no gradient, so it leaves them untouched until they thaw.
    """

    def __init__(
        self, model: nn.Module, start_epoch: int = 1, every: int = 1, stages_per_step: int = 1
    ) -> None:
        if start_epoch < 1 or every < 1 or stages_per_step < 1:
            raise ValueError(
                "start_epoch, every and stages_per_step must be >= 1, got "
                f"{start_epoch}, {every}, {stages_per_step}"
            )
        self.model = model
        self.stages = stages(model)
        self.start_epoch, self.every, self.stages_per_step = start_epoch, every, stages_per_step

    def trainable_stages(self, epoch: int) -> int:
        if epoch < self.start_epoch:
            return 0
        steps = 1 + (epoch - self.start_epoch) // self.every
        return min(len(self.stages), steps * self.stages_per_step)

    def step(self, epoch: int) -> list[str]:
        """Apply the schedule for `epoch` (1-based); return the stages now trainable."""
        return _thaw_last(self.model, self.stages, self.trainable_stages(epoch))
