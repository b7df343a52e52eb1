"""Explicit, architecture-agnostic edits to pretrained networks.

Every change to a backbone (dropping its classifier, adapting its stem, adding layers) goes
through here, so encoders never poke at a model's private layout themselves; freezing lives
in `fusion.freezing`.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from fusion.checks import dropout_rate, finite_number, positive_int

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


def find_classifier(model: nn.Module) -> str:
    """Dotted name of the model's final classification layer, whatever the model calls it.

    The classifier attribute is found by its conventional name (`fc`, `classifier`, `head`,
    `heads`); inside a container (VGG's and ConvNeXt's `classifier`, ViT's `heads`) it is
    the last `nn.Linear` or 1x1 `nn.Conv2d` (SqueezeNet's), so the norm, flatten and pooling
    layers around it are kept.
    """
    containers = []
    for name in CLASSIFIER_NAMES:
        attr = getattr(model, name, None)
        if _is_classifier_layer(attr):
            return name
        if isinstance(attr, nn.Module):
            layers = [n for n, m in attr.named_modules() if _is_classifier_layer(m)]
            if layers:
                return f"{name}.{layers[-1]}"
            containers.append(f"'{name}' ({_layer_types(attr)})")
    if containers:
        raise ValueError(
            f"{type(model).__name__}'s {', '.join(containers)} holds no nn.Linear or 1x1 "
            "nn.Conv2d to use as its classifier"
        )
    raise ValueError(
        f"{type(model).__name__} has no classifier: expected a child named one of "
        f"{CLASSIFIER_NAMES}, found children {[n for n, _ in model.named_children()]}"
    )


def _is_classifier_layer(module: object) -> bool:
    """A final layer that maps features to classes: a linear layer or a 1x1 convolution."""
    if isinstance(module, nn.Conv2d):
        return module.kernel_size == (1, 1)
    return isinstance(module, nn.Linear)


def _layer_types(module: nn.Module) -> str:
    leaves = [type(m).__name__ for m in module.modules() if not list(m.children())]
    return ", ".join(leaves) or "empty"


def remove_classifier(model: nn.Module) -> str:
    """Replace the final classifier with `nn.Identity`; return its dotted name."""
    name = find_classifier(model)
    replace_module(model, name, nn.Identity())
    return name


def replace_classifier(model: nn.Module, num_classes: int) -> nn.Linear | nn.Conv2d:
    """Swap the final classifier for a fresh layer of its kind with the same input size."""
    num_classes = positive_int("num_classes", num_classes)
    name = find_classifier(model)
    old = model.get_submodule(name)
    if isinstance(old, nn.Conv2d):
        new = _conv_like(old, out_channels=num_classes)
    else:
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    replace_module(model, name, new)
    return new


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
    in_channels = positive_int("in_channels", in_channels)
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


def match_parameters(
    model: nn.Module, patterns: Iterable[str], argument: str
) -> dict[str, list[str]]:
    """The parameter names each glob pattern matches, in the model's order.

    A pattern that matches nothing is an error naming `argument` (what the patterns were
    given as) and showing a few names, since a silent no-op is how a setting goes unused.
    """
    names = [name for name, _ in model.named_parameters()]
    hits = {p: [n for n in names if fnmatch.fnmatchcase(n, p)] for p in patterns}
    for pattern, matched in hits.items():
        if not matched:
            raise ValueError(
                f"{argument}: pattern '{pattern}' matches no parameter of "
                f"{type(model).__name__}; names look like {names[:4]} ... {names[-2:]}"
            )
    return hits


def stages(model: nn.Module, min_stages: int = 4) -> list[tuple[str, nn.Module]]:
    """The model's blocks in forward order, for "freeze all but the last N" and layer decay.

    Top-level children that own parameters are the stages; while there are fewer than
    `min_stages`, the largest container among them is expanded into its children (so a
    MobileNet's `features` or a ViT's `encoder.layers` become one stage per block).
    """
    found = [(n, m) for n, m in model.named_children() if _has_params(m)]
    while len(found) < min_stages:
        sizes = [count_parameters(m) if len(list(m.children())) > 1 else -1 for _, m in found]
        if not sizes or max(sizes) < 0:
            break
        i = sizes.index(max(sizes))
        name, container = found[i]
        children = [(f"{name}.{n}", m) for n, m in container.named_children() if _has_params(m)]
        found[i : i + 1] = children
    return found


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


# Normalization layers by type: all their parameters are gains and shifts, never decayed.
NORM_TYPES = (
    nn.modules.batchnorm._NormBase,  # batch, instance and sync batch norm
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    lr_mult: Mapping[str, float] | None = None,
    weight_decay_for: Mapping[str, float] | None = None,
    layer_decay: float | None = None,
    decay_roots: Sequence[str] = ("",),
    no_decay_norm_bias: bool = True,
) -> list[dict]:
    """Optimizer parameter groups with per-part learning rates and weight decay.

    - `lr_mult`: glob pattern on parameter names -> learning-rate multiplier (first match
      wins), e.g. `{"encoders.*.backbone.*": 0.1}` to fine-tune backbones gently.
    - `weight_decay_for`: pattern -> weight decay, e.g. L2 on new layers only.
    - `layer_decay`: layer-wise decay over the stages of each module in `decay_roots`
      ("" is the whole model); stage i of n gets `layer_decay ** (n - 1 - i)`.
    - `no_decay_norm_bias`: biases and normalization weights get no weight decay (see
      `no_decay_parameters`); `weight_decay_for` does not override this.
    All parameters are included, frozen ones too, so that unfreezing later needs no new
    optimizer. A pattern of `lr_mult` or `weight_decay_for` that matches no parameter name
    is a `ValueError` naming the argument: see `check_param_patterns`. So is a learning
    rate that is not a finite number > 0, or a weight decay that is not one >= 0.
    """
    lr = finite_number("lr", lr)
    weight_decay = finite_number("weight_decay", weight_decay, inclusive=True)
    lr_mult = _pattern_values("lr_mult", lr_mult)
    weight_decay_for = _pattern_values("weight_decay_for", weight_decay_for)
    check_param_patterns(model, lr_mult=lr_mult, weight_decay_for=weight_decay_for)
    stage_scale = {}
    if layer_decay is not None and (
        not _is_number(layer_decay) or not 0 < layer_decay <= 1  # NaN fails the comparison
    ):
        raise ValueError(f"layer_decay must be a number in (0, 1], got {layer_decay!r}")
    roots = _decay_roots(model, decay_roots)
    if layer_decay is not None:
        for root in roots:
            stage_scale.update(_layer_decay_scales(model, layer_decay, root))
    no_decay = no_decay_parameters(model) if no_decay_norm_bias else set()
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        mult = next((m for p, m in lr_mult.items() if fnmatch.fnmatchcase(name, p)), 1.0)
        scale = next((v for prefix, v in stage_scale.items() if name.startswith(prefix)), 1.0)
        decay = next(
            (d for p, d in weight_decay_for.items() if fnmatch.fnmatchcase(name, p)), weight_decay
        )
        if name in no_decay:
            decay = 0.0
        groups.setdefault((lr * mult * scale, decay), []).append(param)
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _typed(value: object) -> str:
    """A value as messages show it: its type, then its repr (`str 'high'`, `float nan`)."""
    return f"{type(value).__name__} {value!r}"


def _pattern_values(argument: str, mapping: Mapping[str, float] | None) -> dict[str, float]:
    """`lr_mult` / `weight_decay_for` as a dict of glob -> finite number >= 0, or an error
    naming the argument and the glob: a string would become the optimizer's weight decay,
    a negative multiplier a negative learning rate, NaN a model of NaN."""
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise ValueError(
            f"{argument}: expected a dict of glob pattern -> number, got {_typed(mapping)}"
        )
    values = {}
    for pattern, value in mapping.items():
        if not isinstance(pattern, str):
            raise ValueError(f"{argument}: expected glob patterns as keys, got {_typed(pattern)}")
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"{argument}[{pattern!r}]: expected a finite number >= 0, got {_typed(value)}"
            )
        values[pattern] = float(value)
    return values


def _decay_roots(model: nn.Module, roots: Sequence[str]) -> list[str]:
    """`decay_roots` as submodule names of `model` ("" is the model), or an error naming the
    missing one, the model's submodules and the closest names."""
    if isinstance(roots, str) or not isinstance(roots, Sequence):
        raise ValueError(
            f'decay_roots: expected a list of submodule names ("" for the whole model), '
            f"got {_typed(roots)}"
        )
    names = [name for name, _ in model.named_modules() if name]
    for root in roots:
        if not isinstance(root, str):
            raise ValueError(f"decay_roots: expected submodule names, got {_typed(root)}")
        if root and root not in names:
            close = difflib.get_close_matches(root, names, n=3)
            children = [name for name, _ in model.named_children()]
            nested = next((name for name in names if "." in name), None)
            example = f" (nested ones by dotted name, e.g. {nested!r})" if nested else ""
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(
                f"decay_roots: {type(model).__name__} has no submodule {root!r}; its "
                f"submodules are {children}{example}{hint}"
            )
    return list(roots)


def _layer_decay_scales(model: nn.Module, layer_decay: float, root: str) -> dict[str, float]:
    target = model.get_submodule(root) if root else model
    prefix = f"{root}." if root else ""
    found = stages(target)
    n = len(found)
    return {f"{prefix}{name}.": layer_decay ** (n - 1 - i) for i, (name, _) in enumerate(found)}


def check_param_patterns(model: nn.Module, **patterns: Mapping[str, float] | None) -> None:
    """Refuse a glob (of `lr_mult=`, `weight_decay_for=`, ...) matching no parameter name.

    `param_groups` calls it; a trainer can call it on the built model before the first
    step, so a mistyped pattern stops the run before anything trains.
    """
    for argument, mapping in patterns.items():
        match_parameters(model, mapping or {}, argument)


def no_decay_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters that weight decay must not shrink, by role and module type.

    Every parameter of a normalization layer (`NORM_TYPES`), and every bias or gain, i.e.
    every parameter with fewer than two dimensions (what it adds or scales per feature,
    where weight matrices and kernels have two or more), plus the biases of `_BIASES_BY_TYPE`:
    `nn.MultiheadAttention`'s `in_proj_bias` and layer-scale vectors included, whatever
    they are called.
    """
    names = set()
    for module_name, module in model.named_modules():
        biases = [id(getattr(module, a, None)) for a in _BIASES_BY_TYPE.get(type(module), ())]
        for param_name, param in module.named_parameters(recurse=False):
            if isinstance(module, NORM_TYPES) or param.dim() < 2 or id(param) in biases:
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


# Biases with more than one dimension: attention's learned key and value biases, [1, 1, E].
_BIASES_BY_TYPE = {nn.MultiheadAttention: ("bias_k", "bias_v")}


LAYER_TYPES = ("linear", "conv", "pool", "flatten", "dropout", "relu", "gelu", "batchnorm")
POOL_KINDS = ("avg", "max")
# Layer types that take a feature map, [batch, C, H, W]: a conv or pool given a vector or
# tokens would fail, or read a 3-D input as one unbatched map and mix the batch's samples.
MAP_LAYER_TYPES = ("conv", "pool")
LayerSpec = Mapping[str, object] | nn.Module


def build_layers(
    specs: Sequence[LayerSpec] | nn.Module | None, name: str | None = None
) -> nn.Sequential | None:
    """New layers from plain specs, each sized by the layer before it (lazy modules).

    `[{"type": "conv", "channels": 256, "kernel": 3, "batchnorm": False},
    {"type": "pool", "kernel": 2}, {"type": "pool"}, {"type": "flatten"},
    {"type": "dropout", "p": 0.2}, {"type": "linear", "dim": 128}]`. Input sizes are never
    written down: `nn.LazyLinear` and `nn.LazyConv2d` learn them at the encoder's dry run.
    An `nn.Module` in the list (or in place of it) is used as it is. A bad spec fails here,
    naming its position (`name[i]`, e.g. `post[0]`, or `layer i` without a name), its type
    and the argument, not at the dry run; an input a layer cannot take fails at the
    encoder's dry run, named the same way (`fusion.encoders.base.Encoder`), for which the
    returned `nn.Sequential` keeps each layer's type in `kinds` (a module's class name for
    a module).
    """
    if specs is None or (isinstance(specs, Sequence) and not specs):
        return None
    if isinstance(specs, nn.Module):
        specs = [specs]
    if isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence):
        what = name or "layers"
        raise ValueError(
            f"{what} must be a list of layer specs or modules, got {type(specs).__name__}"
        )
    built = [_build_layer(layer_label(name, i), spec) for i, spec in enumerate(specs)]
    layers = nn.Sequential(*(layer for layer, _ in built))
    layers.kinds = tuple(kind for _, kind in built)
    return layers


def layer_label(name: str | None, index: int) -> str:
    """How messages name layer `index` of the list `name`: `post[0]`, or `layer 0`."""
    return f"layer {index}" if name is None else f"{name}[{index}]"


def _build_layer(label: str, spec: LayerSpec) -> tuple[nn.Module, str]:
    """One layer from its spec (or the module itself) and its type, errors prefixed with
    its position."""
    if isinstance(spec, nn.Module):
        return spec, type(spec).__name__
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{label}: expected a spec such as {{'type': 'linear', 'dim': 128}} or an "
            f"nn.Module, got {type(spec).__name__} {spec!r}"
        )
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in LAYER_TYPES:
        raise ValueError(f"{label}: unknown type '{kind}'; expected one of {LAYER_TYPES}")
    try:
        return _make_layer(kind, spec), kind
    except ValueError as err:
        raise ValueError(f"{label} ({kind}): {err}") from None


def layer_input_problem(kind: str, layer: nn.Module, shape: Sequence[int]) -> str | None:
    """What layer `layer`, of type `kind`, expects and does not find in its per-sample input
    `shape` (batch left out), as "expected ..., found", or None when it can take it.

    Checked on the input the encoder's dry run gives the layer, so nothing is computed by
    hand: a conv or pool needs a map [C, H, W], and a sliding pool a map at least as large
    as its kernel.
    """
    shape = list(shape)
    if kind in MAP_LAYER_TYPES and len(shape) != 3:
        return f"expected a feature map [C, H, W], found {shape}"
    if kind == "pool" and isinstance(layer, (nn.AvgPool2d, nn.MaxPool2d)):
        kernel = layer.kernel_size
        height, width = (kernel, kernel) if isinstance(kernel, int) else kernel
        if height > shape[1] or width > shape[2]:
            shown = kernel if isinstance(kernel, int) else list(kernel)
            return f"expected a map of at least {height}x{width} for kernel {shown}, found {shape}"
    return None


def _make_layer(kind: str, spec: dict) -> nn.Module:
    """The layer of type `kind`, after checking that `spec` has exactly its arguments."""
    factory = _LAYER_FACTORIES[kind]
    params = inspect.signature(factory).parameters
    unknown = sorted(set(spec) - set(params))
    if unknown:
        raise ValueError(f"unknown arguments {unknown}; {kind} takes {sorted(params)}")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in spec]
    if missing:
        raise ValueError(f"missing arguments {missing}")
    return factory(**spec)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _size2d(name: str, value: object) -> int | tuple[int, int]:
    """A positive int, or a [height, width] pair of them."""
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return positive_int(f"{name}[0]", value[0]), positive_int(f"{name}[1]", value[1])
    if isinstance(value, Sequence) and not isinstance(value, str):
        raise ValueError(f"{name} must be an int or [height, width], got {value!r}")
    return positive_int(name, value)


def _linear(dim: int, bias: bool = True) -> nn.Module:
    return nn.LazyLinear(positive_int("dim", dim), bias=_flag("bias", bias))


def _conv(channels: int, kernel: int = 3, stride: int = 1, batchnorm: bool = True) -> nn.Module:
    """Conv (same padding), optional batch norm, ReLU."""
    kernel = positive_int("kernel", kernel)
    conv = nn.LazyConv2d(
        positive_int("channels", channels),
        kernel,
        stride=positive_int("stride", stride),
        padding=kernel // 2,
    )
    norm = [nn.LazyBatchNorm2d()] if _flag("batchnorm", batchnorm) else []
    return nn.Sequential(conv, *norm, nn.ReLU())


def _pool(
    kind: str = "avg",
    size: int | Sequence[int] | None = None,
    kernel: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
) -> nn.Module:
    """Global by default; `size`: an adaptive pool to that output size; `kernel` (and
    `stride`, by default the kernel): a sliding window."""
    if kind not in POOL_KINDS:
        raise ValueError(f"kind must be one of {POOL_KINDS}, got {kind!r}")
    if kernel is None:
        if stride is not None:
            raise ValueError(f"stride ({stride!r}) needs a kernel")
        adaptive = nn.AdaptiveAvgPool2d if kind == "avg" else nn.AdaptiveMaxPool2d
        return adaptive(1 if size is None else _size2d("size", size))
    if size is not None:
        raise ValueError(
            f"give size (an adaptive pool, got {size!r}) or kernel (a sliding window, got "
            f"{kernel!r}), not both"
        )
    sliding = nn.AvgPool2d if kind == "avg" else nn.MaxPool2d
    return sliding(
        _size2d("kernel", kernel), stride=None if stride is None else _size2d("stride", stride)
    )


_LAYER_FACTORIES = {
    "linear": _linear,
    "conv": _conv,
    "pool": _pool,
    "flatten": lambda: nn.Flatten(1),
    "dropout": lambda p=0.1: nn.Dropout(dropout_rate(p, "p")),
    "relu": lambda: nn.ReLU(),
    "gelu": lambda: nn.GELU(),
    "batchnorm": lambda: nn.LazyBatchNorm1d(),
}


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
