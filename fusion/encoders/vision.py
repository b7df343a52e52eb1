"""Vision encoders: any torchvision classification model by name, with explicit surgery."""

from __future__ import annotations

import difflib
import logging
import numbers
from collections.abc import Mapping, Sequence

import torch
import torchvision
from einops import rearrange
from torch import nn
from torchvision.models import WeightsEnum, get_model, get_model_weights, get_weight, list_models
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from fusion import surgery
from fusion.checks import positive_int
from fusion.encoders.base import Encoder, apply_freeze, channel_stats
from fusion.weights import load_weights

OUTPUTS = ("pooled", "map", "tokens")
log = logging.getLogger(__name__)


class Standardize(nn.Module):
    """Per-channel (x - mean) / std, stored as buffers so it follows the model's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NodeOutput(nn.Module):
    """An FX feature extractor reduced to the one node it returns, in the form asked for."""

    def __init__(self, extractor: nn.Module, output: str) -> None:
        super().__init__()
        self.extractor = extractor
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.extractor(x)["features"]
        if self.output == "pooled":
            return features.mean(dim=(2, 3)) if features.dim() == 4 else features.mean(dim=1)
        if self.output == "tokens" and features.dim() == 4:
            return rearrange(features, "b c h w -> b (h w) c")
        return features


def classification_models() -> list[str]:
    return list_models(module=torchvision.models)


def resolve_weights(name: str, weights: str | WeightsEnum | None) -> WeightsEnum | None:
    """`"DEFAULT"`, `"IMAGENET1K_V1"`, `"ResNet18_Weights.IMAGENET1K_V1"` or an enum -> enum."""
    if weights is None or isinstance(weights, WeightsEnum):
        return weights
    if "." in weights:
        try:
            return get_weight(weights)
        except (ValueError, KeyError, AttributeError):
            pass
    enum = get_model_weights(name)
    try:
        return enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        available = list(dict.fromkeys(["DEFAULT", *enum.__members__]))
        raise ValueError(
            f"weights '{weights}': model '{name}' has no such weights; available: {available}"
        ) from None


# Models whose builders need settings to act as encoders: Inception's and GoogLeNet's
# auxiliary heads return namedtuples in train mode (an encoder returns one tensor).
BUILD_SETTINGS = {
    "inception_v3": {"aux_logits": False},
    "googlenet": {"aux_logits": False},
}
# The weights of the auxiliary heads those settings leave unbuilt (module key globs): left out
# of the load on purpose, where any other key without a place in the model is an error.
UNBUILT_KEYS = {"inception_v3": ("AuxLogits.*",), "googlenet": ("aux1.*", "aux2.*")}


def build_backbone(name: str, weights: WeightsEnum | None) -> nn.Module:
    """Build a torchvision model by name, with its weights loaded through `fusion.weights`.

    Settings are those of torchvision's own builder: Inception and GoogLeNet with weights
    convert ImageNet-normalized inputs to their own (`transform_input`), as their weights
    expect; the weights of their auxiliary heads are reported ignored and left out.
    """
    if name not in classification_models():
        close = difflib.get_close_matches(name, classification_models(), n=5)
        raise ValueError(f"unknown torchvision model '{name}'; did you mean {close}?")
    settings = dict(BUILD_SETTINGS.get(name, {}))
    if "aux_logits" in settings:
        settings.update(init_weights=weights is None, transform_input=weights is not None)
    if weights is None:
        return get_model(name, **settings)
    model = get_model(name, num_classes=len(weights.meta["categories"]), **settings)
    log.info("%s", load_weights(model, weights, ignore_unexpected=UNBUILT_KEYS.get(name, ())))
    return model


def default_map_node(model: nn.Module) -> str:
    """The last graph node before the final pooling: the backbone's last feature map."""
    nodes = get_graph_node_names(model)[1]
    pools = [i for i, n in enumerate(nodes) if "pool" in n.split(".")[-1]]
    if not pools:
        raise ValueError(
            f"{type(model).__name__} has no final pooling node; pass layer=<node name>, "
            f"e.g. one of {nodes[-5:]}"
        )
    return nodes[pools[-1] - 1]


def classifier_unused(model: nn.Module, layer: str | None) -> bool:
    """Whether the output leaves the classifier out: no tapped node, or one before it."""
    if layer is None:
        return True
    nodes = get_graph_node_names(model)[1]
    classifier = surgery.find_classifier(model)
    return layer in nodes and classifier in nodes and nodes.index(layer) < nodes.index(classifier)


def tap_node(model: nn.Module, layer: str | None, output: str) -> nn.Module:
    """A module returning graph node `layer` (torchvision's FX feature extraction)."""
    nodes = get_graph_node_names(model)[1]
    layer = layer or default_map_node(model)
    if layer not in nodes:
        close = difflib.get_close_matches(layer, nodes, n=5, cutoff=0.5)
        raise ValueError(
            f"{type(model).__name__} has no node '{layer}'; close matches: {close}; list all "
            f"{len(nodes)} with torchvision.models.feature_extraction.get_graph_node_names"
        )
    return NodeOutput(create_feature_extractor(model, return_nodes={layer: "features"}), output)


SMALL_IMAGE = 64


def image_size_pair(value: object) -> tuple[int, int]:
    """`image_size` as (height, width) of positive ints; one int is a square."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise ValueError(f"image_size must be an int or [height, width], got {value!r}")
        return positive_int("image_size[0]", value[0]), positive_int("image_size[1]", value[1])
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        size = positive_int("image_size", value)
        return size, size
    raise ValueError(f"image_size must be an int or [height, width], got {value!r}")


def build_vision_encoder(
    name: str = "resnet18",
    weights: str | None = None,
    weights_file: str | None = None,
    weights_prefix: str | None = None,
    strict: bool = True,
    in_channels: int = 3,
    image_size: int | Sequence[int] = (224, 224),
    small_input_stem: bool | str = False,
    output: str = "pooled",
    layer: str | None = None,
    use_weights_transforms: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pre: Sequence[Mapping] | None = None,
    post: Sequence[Mapping] | None = None,
    freeze: bool | str | Sequence[str] | None = None,
    trainable_stages: int | None = None,
) -> Encoder:
    """A torchvision classifier turned into a feature encoder, configured in plain arguments.

    - `weights`: torchvision weights by name (`"DEFAULT"`, `"IMAGENET1K_V1"`), loaded from
      the torch hub cache; `weights_file`: any checkpoint `fusion.weights` reads, loaded
      after the classifier is removed (when the output does not use it), so a file with
      another number of classes loads strictly: its classifier keys are unexpected.
    - `output`: "pooled" vector, spatial "map" [C, H, W], or "tokens" [H*W, C]; `layer`
      taps any graph node instead of the last one.
    - `small_input_stem` / `in_channels`: stem surgery that keeps pretrained filters;
      `small_input_stem="auto"` adapts the stem when a side of `image_size` is under
      `SMALL_IMAGE` pixels (where a stride-4 stem would leave too few positions).
    - `pre` / `post`: new layers before / after the backbone (`surgery.build_layers` specs).
    - `freeze` / `trainable_stages`: see `fusion.encoders.base.apply_freeze`.
    Preprocessing is part of the encoder, so it consumes raw [0, 1] images: the weights'
    own `transforms()` when they exist (3 channels), else standardization. `image_size` is
    [height, width], or one int for a square.
    """
    in_channels = positive_int("in_channels", in_channels)
    image_size = image_size_pair(image_size)
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got '{output}'")
    enum = resolve_weights(name, weights)
    preprocess = image_preprocess(enum, in_channels, mean, std, use_weights_transforms)
    backbone = build_backbone(name, enum)
    removed = surgery.remove_classifier(backbone) if classifier_unused(backbone, layer) else None
    if weights_file is not None:  # the removed classifier's weights are left out on purpose
        ignored = [f"{removed}.*"] if removed else []
        report = load_weights(
            backbone, weights_file, prefix=weights_prefix, strict=strict, ignore_unexpected=ignored
        )
        log.info("%s", report)
    if small_input_stem == "auto":
        small_input_stem = min(image_size) < SMALL_IMAGE
    elif not isinstance(small_input_stem, bool):
        raise ValueError(
            f"small_input_stem must be true, false or 'auto', got {small_input_stem!r}"
        )
    if small_input_stem:
        surgery.adapt_stem_for_small_inputs(backbone)
    surgery.adapt_input_channels(backbone, in_channels)
    if output != "pooled" or layer is not None:
        backbone = tap_node(backbone, layer, output)
    return apply_freeze(
        Encoder(
            backbone,
            input_shape=(in_channels, *image_size),
            preprocess=preprocess,
            pre=surgery.build_layers(pre, "pre"),
            post=surgery.build_layers(post, "post"),
            backbone_output=f"the backbone's output '{output}'",
        ),
        freeze,
        trainable_stages,
    )


def image_preprocess(
    weights: WeightsEnum | None,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    use_weights_transforms: bool,
) -> nn.Module:
    if weights is not None and use_weights_transforms and in_channels == 3:
        if (mean is None) != (std is None):
            given, other = ("mean", "std") if std is None else ("std", "mean")
            raise ValueError(
                f"{given}: given without {other}, while the pretrained weights' transforms "
                f"would supply both; give {other} too (or neither, to use the weights' own)"
            )
        if mean is None:
            return weights.transforms()
    mean = [0.5] * in_channels if mean is None else mean
    std = [0.25] * in_channels if std is None else std
    return Standardize(*channel_stats(mean, std, in_channels))


def timm_classifiers(model: nn.Module) -> list[str]:
    """The classifier's module names in a timm model's pretrained config (`fc`, `head.fc`, or
    several for distilled models): what `num_classes=0` and `features_only` leave out."""
    names = model.pretrained_cfg.get("classifier") or []
    return [names] if isinstance(names, str) else list(names)


def build_timm_encoder(
    name: str,
    pretrained: bool = False,
    weights_file: str | None = None,
    strict: bool = True,
    in_channels: int = 3,
    image_size: int | Sequence[int] = (224, 224),
    output: str = "pooled",
    feature_index: int = -1,
    pre: Sequence[Mapping] | None = None,
    post: Sequence[Mapping] | None = None,
    freeze: bool | str | Sequence[str] | None = None,
    trainable_stages: int | None = None,
) -> Encoder:
    """A timm model as an encoder (optional extra: `pip install 'fusion[timm]'`).

    "pooled" uses timm's `num_classes=0`; "map" and "tokens" use `features_only` and take
    the feature level `feature_index`. Normalization comes from the model's pretrained config.
    """
    try:
        import timm
    except ImportError as err:
        raise ImportError("timm encoders need timm: pip install 'fusion[timm]'") from err
    in_channels = positive_int("in_channels", in_channels)
    image_size = image_size_pair(image_size)
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got '{output}'")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ValueError(f"unknown timm model '{name}'; did you mean {close}?")
    kwargs = {"in_chans": in_channels}
    if output == "pooled":
        kwargs["num_classes"] = 0
    else:
        kwargs["features_only"] = True
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if weights_file is not None:  # the classifier timm left out: its weights too
        ignored = [f"{c}.*" for c in timm_classifiers(model)]
        report = load_weights(model, weights_file, strict=strict, ignore_unexpected=ignored)
        log.info("%s", report)
    config = model.pretrained_cfg
    mean = list(config.get("mean", (0.5,) * 3))
    std = list(config.get("std", (0.25,) * 3))
    if len(mean) != in_channels:
        mean, std = [sum(mean) / len(mean)] * in_channels, [sum(std) / len(std)] * in_channels
    backbone = model if output == "pooled" else TimmFeatureLevel(model, feature_index, output)
    return apply_freeze(
        Encoder(
            backbone,
            input_shape=(in_channels, *image_size),
            preprocess=Standardize(*channel_stats(mean, std, in_channels)),
            pre=surgery.build_layers(pre, "pre"),
            post=surgery.build_layers(post, "post"),
            backbone_output=f"the backbone's output '{output}'",
        ),
        freeze,
        trainable_stages,
    )


class TimmFeatureLevel(nn.Module):
    """One level of a timm `features_only` model, as a map or flattened tokens."""

    def __init__(self, model: nn.Module, index: int, output: str) -> None:
        super().__init__()
        self.model = model
        self.index = index
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model(x)[self.index]
        if self.output == "tokens":
            return rearrange(features, "b c h w -> b (h w) c")
        return features
