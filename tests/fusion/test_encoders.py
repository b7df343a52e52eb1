from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import get_model

from fusion import surgery
from fusion.encoders import LogMelSpectrogram, build_spectrogram_encoder, build_vision_encoder


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


def test_vision_weights_missing_offline_say_where_to_put_them(torch_home):
    from fusion.weights import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="TORCH_HOME") as err:
        build_vision_encoder("resnet18", weights="DEFAULT")
    assert str(torch_home) in str(err.value)
