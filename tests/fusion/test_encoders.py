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


@pytest.mark.parametrize(
    ("name", "attr"),
    [("resnet18", "fc"), ("mobilenet_v3_small", "classifier"), ("vit_b_16", "heads")],
)
def test_remove_classifier_finds_it_by_name(name, attr):
    model = get_model(name)
    assert surgery.remove_classifier(model) == attr
    assert isinstance(getattr(model, attr), nn.Identity)


def test_remove_classifier_explains_failure():
    with pytest.raises(ValueError, match="no classifier attribute"):
        surgery.remove_classifier(nn.Sequential(nn.Linear(2, 2)))


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
