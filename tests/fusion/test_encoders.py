from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import get_model

from fusion import surgery
from fusion.encoders import (
    LogMelSpectrogram,
    build_sequence_encoder,
    build_spectrogram_encoder,
    build_vision_encoder,
)


def test_vision_encoder_out_dim_is_inferred():
    enc = build_vision_encoder("resnet18", in_channels=1, image_size=(8, 8), small_input_stem=True)
    assert enc.out_dim == 512
    assert enc(torch.rand(3, 1, 8, 8)).shape == (3, 512)
    assert enc.backbone.conv1.stride == (1, 1) and isinstance(enc.backbone.maxpool, nn.Identity)


def test_vision_encoder_other_architecture():
    enc = build_vision_encoder("mobilenet_v3_small", image_size=(32, 32))
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, enc.out_dim)


def test_audio_encoder_shapes():
    enc = build_spectrogram_encoder(sample_rate=8000, clip_samples=4000, hop_length=160, n_mels=32)
    assert enc.preprocess(torch.randn(2, 4000)).shape == (2, 1, 32, 26)
    assert enc(torch.randn(2, 4000)).shape == (2, enc.out_dim)


def test_logmel_is_level_invariant():
    front = LogMelSpectrogram()
    wave = torch.randn(1, 8000)
    assert torch.allclose(front(wave), front(10 * wave), atol=1e-3)


def test_one_channel_stem_keeps_pretrained_response():
    model = get_model("resnet18").eval()
    grey = torch.rand(1, 1, 32, 32)
    expected = model.conv1(grey.expand(1, 3, 32, 32))
    surgery.adapt_input_channels(model, 1)
    assert torch.allclose(model.conv1(grey), expected, atol=1e-5)


def test_many_channel_stem_keeps_magnitude():
    model = get_model("resnet18").eval()
    x = torch.rand(1, 1, 32, 32)
    expected = model.conv1(x.expand(1, 3, 32, 32))
    surgery.adapt_input_channels(model, 6)
    assert torch.allclose(model.conv1(x.expand(1, 6, 32, 32)), expected, atol=1e-5)


def test_adapting_the_stem_to_no_channels_is_refused():
    with pytest.raises(ValueError, match=r"^in_channels must be a positive integer, got 0$"):
        surgery.adapt_input_channels(get_model("resnet18"), 0)


def test_vision_image_size_may_be_one_int_for_a_square():
    enc = build_vision_encoder("resnet18", image_size=8, in_channels=1, small_input_stem=True)
    assert enc.input_shape == (1, 8, 8)


def test_sequence_encoder_is_exported_like_the_other_builders():
    import fusion.encoders

    assert "build_sequence_encoder" in fusion.encoders.__all__
    assert fusion.encoders.build_sequence_encoder.__module__ == "fusion.encoders.sequence"


def test_frozen_encoder_has_no_gradients_and_stays_in_eval():
    enc = build_vision_encoder(in_channels=1, image_size=(8, 8), small_input_stem=True).freeze()
    parent = nn.ModuleDict({"enc": enc}).train()
    assert not enc.training and not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    before = enc.backbone.bn1.running_mean.clone()
    parent["enc"](torch.rand(4, 1, 8, 8))
    assert torch.equal(before, enc.backbone.bn1.running_mean)
    enc.unfreeze()
    parent.train()
    assert enc.training and all(p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize(
    ("output", "layer", "shape"),
    [
        ("pooled", None, (512,)),
        ("map", None, (512, 2, 2)),
        ("tokens", None, (4, 512)),
        ("pooled", "layer3.1.relu_1", (256,)),
        ("map", "layer2.0.relu", (128, 8, 8)),
    ],
)
def test_vision_outputs(output, layer, shape):
    enc = build_vision_encoder("resnet18", image_size=(64, 64), output=output, layer=layer)
    assert enc.out_shape == shape
    assert enc(torch.rand(2, 3, 64, 64)).shape == (2, *shape)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "resnt18"}, r"unknown torchvision model 'resnt18'; did you mean \['resnet18'"),
        (
            {"weights": "IMAGENET9K"},
            r"weights 'IMAGENET9K': model 'resnet18' has no such weights; available: \['DEFAULT', 'IMAGENET1K_V1'\]",
        ),
        (
            {"layer": "layer4.1.relu2"},
            r"no node 'layer4.1.relu2'; close matches: \['layer4.1.relu'",
        ),
        ({"output": "grid"}, "output must be one of"),
        ({"in_channels": 0}, r"^in_channels must be a positive integer, got 0$"),
        ({"in_channels": 2.0}, r"^in_channels must be a positive integer, got 2.0$"),
        ({"image_size": (0, 8)}, r"^image_size\[0\] must be a positive integer, got 0$"),
        ({"image_size": [8, -1]}, r"^image_size\[1\] must be a positive integer, got -1$"),
        ({"image_size": 0}, r"^image_size must be a positive integer, got 0$"),
        (
            {"image_size": (8, 8, 8)},
            r"^image_size must be an int or \[height, width\], got \(8, 8, 8\)$",
        ),
        ({"image_size": "8"}, r"^image_size must be an int or \[height, width\], got '8'$"),
    ],
)
def test_vision_bad_input_is_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_vision_encoder(**{"name": "resnet18", "image_size": (32, 32), **kwargs})


@pytest.mark.parametrize(("output", "shape"), [("pooled", (512,)), ("tokens", (4, 512))])
def test_timm_encoder(output, shape):
    from fusion.encoders.vision import build_timm_encoder

    enc = build_timm_encoder("resnet18", in_channels=1, image_size=(64, 64), output=output)
    assert enc.out_shape == shape
    with pytest.raises(ValueError, match="unknown timm model 'resnet-18'"):
        build_timm_encoder("resnet-18")


def test_vision_weights_by_name_load_from_the_hub_cache(torch_home):
    from torchvision.models import ResNet18_Weights
    from torchvision.transforms._presets import ImageClassification

    reference = get_model("resnet18").eval()
    torch.save(reference.state_dict(), torch_home / Path(ResNet18_Weights.IMAGENET1K_V1.url).name)
    enc = build_vision_encoder("resnet18", weights="IMAGENET1K_V1", image_size=(64, 64)).eval()
    assert isinstance(enc.preprocess, ImageClassification)  # the weights' own transforms
    x = torch.rand(2, 3, 64, 64)
    reference.fc = nn.Identity()
    assert torch.equal(enc(x), reference(enc.preprocess(x)))


def test_std_without_mean_beside_the_weights_transforms_is_refused(torch_home):
    """The weights' transforms would otherwise be used and the std dropped without a word."""
    from torchvision.models import ResNet18_Weights

    path = torch_home / Path(ResNet18_Weights.IMAGENET1K_V1.url).name
    torch.save(get_model("resnet18").state_dict(), path)
    with pytest.raises(ValueError) as caught:
        build_vision_encoder("resnet18", weights="IMAGENET1K_V1", std=[0.2, 0.2, 0.2])
    assert str(caught.value) == (
        "std: given without mean, while the pretrained weights' transforms would supply both; "
        "give mean too (or neither, to use the weights' own)"
    )


def test_vision_weights_missing_offline_say_where_to_put_them(torch_home):
    from fusion.weights import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="TORCH_HOME") as err:
        build_vision_encoder("resnet18", weights="DEFAULT")
    assert str(torch_home) in str(err.value)


def tiny_vision(**kwargs):
    """resnet18 on 8x8 one-channel images: a [512, 1, 1] map, built in well under a second."""
    return build_vision_encoder(
        "resnet18", in_channels=1, image_size=8, small_input_stem=True, **kwargs
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"post": [{"type": "pool"}]},
            "post[0] (pool): expected a feature map [C, H, W], found [512] "
            "(the backbone's output 'pooled')",
        ),
        (
            {"output": "map", "post": [{"type": "pool", "kernel": 3}, {"type": "flatten"}]},
            "post[0] (pool): expected a map of at least 3x3 for kernel 3, found [512, 1, 1] "
            "(the backbone's output 'map')",
        ),
        (
            {"output": "tokens", "post": [{"type": "conv", "channels": 8}]},
            "post[0] (conv): expected a feature map [C, H, W], found [1, 512] "
            "(the backbone's output 'tokens')",
        ),
        (
            {"output": "map", "post": [{"type": "flatten"}, {"type": "pool"}]},
            "post[1] (pool): expected a feature map [C, H, W], found [512] "
            "(the output of post[0] (flatten))",
        ),
        (
            {
                "output": "map",
                "post": [{"type": "conv", "channels": 8}, {"type": "pool", "kernel": [1, 2]}],
            },
            "post[1] (pool): expected a map of at least 1x2 for kernel [1, 2], found [8, 1, 1] "
            "(the output of post[0] (conv))",
        ),
        (
            {"pre": [{"type": "pool", "kernel": 16}]},
            "pre[0] (pool): expected a map of at least 16x16 for kernel 16, found [1, 8, 8] "
            "(the preprocessed input)",
        ),
    ],
)
def test_a_layer_that_cannot_take_its_input_is_named_at_construction(kwargs, message):
    with pytest.raises(ValueError) as caught:
        tiny_vision(**kwargs)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("kwargs", "prefix", "cause"),
    [
        (
            {"output": "map", "post": [{"type": "conv", "channels": 8}, {"type": "batchnorm"}]},
            "post[1] (batchnorm) failed on its input [8, 1, 1] (the output of post[0] (conv)): ",
            "expected 2D or 3D input (got 4D input)",
        ),
        (
            {"post": [nn.Linear(3, 4)]},
            "post[0] (Linear) failed on its input [512] (the backbone's output 'pooled'): ",
            "mat1 and mat2 shapes cannot be multiplied (2x512 and 3x4)",
        ),
    ],
)
def test_any_failure_of_a_layer_at_the_dry_run_names_the_layer_and_its_input(kwargs, prefix, cause):
    """Torch's own message follows, and the original error is kept as the cause."""
    with pytest.raises(ValueError) as caught:
        tiny_vision(**kwargs)
    assert str(caught.value) == prefix + cause
    assert str(caught.value.__cause__) == cause


def test_other_encoders_name_their_post_layers_too():
    with pytest.raises(ValueError) as caught:
        build_sequence_encoder(input_dim=4, hidden=16, post=[{"type": "pool"}])
    assert str(caught.value) == (
        "post[0] (pool): expected a feature map [C, H, W], found [16] (the backbone's output)"
    )


def test_layers_that_fit_build_and_leave_no_dry_run_hooks_behind():
    enc = tiny_vision(
        output="map",
        post=[{"type": "conv", "channels": 8}, {"type": "pool", "kernel": 1}, {"type": "flatten"}],
    )
    assert enc.out_shape == (8,) and enc.post.kinds == ("conv", "pool", "flatten")
    assert enc(torch.rand(3, 1, 8, 8)).shape == (3, 8)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in enc.post)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mean": [0.5], "std": [0.0]}, "std: expected values > 0, found [0.0]"),
        ({"std": [-0.25]}, "std: expected values > 0, found [-0.25]"),
        ({"mean": [float("nan")]}, "mean: expected finite values, found [nan]"),
        ({"std": [float("inf")]}, "std: expected finite values, found [inf]"),
        (
            {"mean": [0.5, 0.5]},
            "mean: expected 1 value (one per input channel), found 2: [0.5, 0.5]",
        ),
        (
            {"std": 0.25},
            "std: expected a list of numbers, one per input channel, found 0.25",
        ),
        ({"std": ["0.25"]}, "std: expected numbers, found ['0.25']"),
    ],
)
def test_bad_mean_or_std_is_refused_before_the_backbone_is_built(monkeypatch, kwargs, message):
    """A zero std built, then gave non-finite features and a NaN loss at stage 1."""

    def unreachable(*_args):
        raise AssertionError("the backbone was built before mean and std were checked")

    monkeypatch.setattr("fusion.encoders.vision.build_backbone", unreachable)
    with pytest.raises(ValueError) as caught:
        tiny_vision(**kwargs)
    assert str(caught.value) == message


def test_channel_stats_take_arrays_and_name_the_channel_count():
    from fusion.encoders.base import channel_stats

    assert channel_stats(np.array([0.5, 0.4]), torch.tensor([0.25, 0.5]), 2) == (
        [0.5, 0.4],
        [0.25, 0.5],
    )
    with pytest.raises(ValueError) as caught:
        channel_stats([0.5] * 3, [0.2, 0.0, 0.3], 3)
    assert str(caught.value) == "std: expected values > 0, found [0.2, 0.0, 0.3]"
    with pytest.raises(ValueError) as caught:
        channel_stats([0.5], [0.25], 3)
    assert str(caught.value) == "mean: expected 3 values (one per input channel), found 1: [0.5]"
    enc = tiny_vision(mean=np.array([0.5]), std=torch.tensor([0.25]))
    assert torch.isfinite(enc(torch.rand(2, 1, 8, 8))).all()
