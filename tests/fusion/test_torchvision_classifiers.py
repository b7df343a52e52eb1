"""Every torchvision classification model is an encoder, and its classifier is found.

Models are built on the meta device (shapes without memory or initialization), so the
whole list runs in seconds; the models whose behaviour depends on their settings (auxiliary
heads, a 1x1-conv classifier) also run for real on small CPU inputs.
"""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import get_model, list_models
from torchvision.models.regnet import BlockParams

from fusion import freezing, surgery
from fusion.encoders import build_vision_encoder

MODELS = list_models(module=torchvision.models)
IMAGE = (224, 224)
# Larger members of families whose smaller members run by default: the same code with more
# blocks, and the longest to run even on the meta device (about 1 s each on a loaded CPU).
LARGER = {
    "convnext_base",
    "convnext_large",
    "convnext_small",
    "densenet161",
    "densenet169",
    "densenet201",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "efficientnet_v2_l",
    "efficientnet_v2_m",
    "regnet_x_16gf",
    "regnet_x_32gf",
    "regnet_y_128gf",
    "regnet_y_16gf",
    "regnet_y_32gf",
    "resnet101",
    "resnet152",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "swin_b",
    "swin_s",
    "swin_v2_b",
    "swin_v2_s",
    "vit_h_14",
    "vit_l_16",
    "vit_l_32",
    "wide_resnet101_2",
}


@pytest.fixture(autouse=True)
def regnet_widths_on_cpu(monkeypatch):
    """RegNet's builder computes its block widths with tensors and reads them back, which
    the meta device cannot do: those few numbers are computed on the CPU."""
    compute = BlockParams.from_init_params.__func__

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return compute(cls, *args, **kwargs)

    monkeypatch.setattr(BlockParams, "from_init_params", classmethod(on_cpu))


def classifier_sizes(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels
    return layer.in_features, layer.out_features


def test_the_list_is_the_whole_of_torchvision():
    assert len(MODELS) == 80 and {"squeezenet1_1", "inception_v3", "vit_h_14"} <= set(MODELS)
    assert LARGER.issubset(MODELS)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGER else n for n in MODELS]
)
def test_classifier_is_found_and_replaced_and_the_rest_is_an_encoder_that_trains(name):
    with torch.device("meta"):
        model = get_model(name).eval()  # eval: Inception's aux heads only answer in train mode
        found = surgery.find_classifier(model)
        features, classes = classifier_sizes(model.get_submodule(found))
        assert classes == 1000
        new = surgery.replace_classifier(model, 7)
        assert type(new) is type(model.get_submodule(found))
        assert model(torch.zeros(2, 3, *IMAGE)).shape == (2, 7)
        encoder = build_vision_encoder(name, image_size=IMAGE).train()
        out = encoder(torch.zeros(2, 3, *IMAGE))
    assert type(out) is torch.Tensor and out.shape == (2, features)
    assert encoder.out_shape == (features,)


def test_squeezenet_without_its_conv_classifier_trains_for_real():
    torch.manual_seed(0)
    encoder = build_vision_encoder("squeezenet1_1", image_size=(32, 32)).train()
    x = torch.rand(2, 3, 32, 32)
    out = encoder(x)
    assert type(out) is torch.Tensor and out.shape == (2, 512)
    out.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())
    freezing.set_trainable(encoder.backbone, False)
    encoder.train()
    assert torch.equal(encoder(x), encoder(x))  # frozen: dropout off, statistics fixed
