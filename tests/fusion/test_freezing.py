"""Frozen means no gradients, no statistic updates and no dropout, under train() too."""

import pytest
import torch
from torch import nn
from torchvision.models import get_model

from fusion import freezing
from fusion.encoders import build_vision_encoder


def net() -> nn.Sequential:
    """Batch norm and dropout in a block that can be frozen, and a trainable top."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
    return nn.Sequential(block, nn.Dropout(0.5), nn.Linear(8, 3))


def assert_fixed(module: nn.Module, x: torch.Tensor) -> None:
    """Two passes agree and batch-norm statistics do not move."""
    before = {k: v.clone() for k, v in module.state_dict().items()}
    assert torch.equal(module(x), module(x))
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_frozen_block_stays_fixed_when_the_model_trains():
    model = net()
    freezing.set_trainable(model[0], False)
    model.train()
    x = torch.randn(16, 6)
    assert_fixed(model[0], x)
    assert not any(m.training for m in model[0].modules())
    assert model[1].training and model[2].weight.requires_grad  # the rest trains as asked
    model(x).sum().backward()
    assert model[0][0].weight.grad is None and model[2].weight.grad is not None


def test_freezing_a_plain_torchvision_model_keeps_its_statistics():
    model = get_model("resnet18")
    freezing.set_trainable(model, False)
    model.train()  # a training loop's call, which freezing survives
    assert_fixed(model, torch.rand(2, 3, 32, 32))


def test_thawing_restores_training_behaviour():
    model = net()
    freezing.set_trainable(model, False)
    freezing.set_trainable(model, True)
    x = torch.randn(16, 6)
    mean = model[0][1].running_mean.clone()
    assert not torch.equal(model(x), model(x))  # dropout is back
    assert not torch.equal(model[0][1].running_mean, mean)
    assert all(p.requires_grad for p in model.parameters())


def test_backbone_frozen_in_an_encoder_has_no_dropout_or_statistics():
    encoder = build_vision_encoder(
        "mobilenet_v3_small",
        image_size=(32, 32),
        freeze="backbone",
        post=[{"type": "linear", "dim": 4}],
    )
    dropouts = [m for m in encoder.backbone.modules() if isinstance(m, nn.Dropout)]
    assert dropouts  # the classifier's dropout stays in the backbone once the Linear is gone
    nn.ModuleDict({"image": encoder}).train()
    assert not any(m.training for m in dropouts) and encoder.post.training
    assert_fixed(encoder.backbone, torch.rand(2, 3, 32, 32))


def test_patterns_freeze_parts_and_thaw_them_back():
    model = net()
    assert freezing.set_trainable_by_pattern(model, ["0.*"], False) == [
        "0.0.weight",
        "0.0.bias",
        "0.1.weight",
        "0.1.bias",
    ]
    model.train()
    assert_fixed(model[0], torch.randn(16, 6))
    freezing.set_trainable_by_pattern(model, "0.*", True)
    assert all(m.training for m in model.modules())


def test_all_but_last_and_gradual_unfreezing_put_thawed_stages_in_train_mode():
    model = get_model("resnet18")
    assert freezing.freeze_all_but_last(model, 1) == ["fc"]
    model.train()
    assert_fixed(model.layer4, torch.rand(2, 256, 4, 4))
    assert not model.layer4.training and model.fc.training
    schedule = freezing.GradualUnfreezing(model)
    assert schedule.step(2) == ["layer4", "fc"]
    assert model.layer4[0].bn1.training and not model.layer3[0].bn1.training
    model.train()
    assert_fixed(model.layer3, torch.rand(2, 128, 8, 8))


def test_frozen_parts_are_the_largest_wholly_frozen_modules():
    model = net()
    freezing.set_trainable(model[0][1], False)
    assert freezing.frozen_parts(model) == [model[0][1]]
    freezing.set_trainable(model[0][0], False)
    assert freezing.frozen_parts(model) == [model[0]]  # the dropout inside goes with it


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda m: freezing.set_trainable_by_pattern(m, ["0.*", "layer9.*"], False),
            ValueError,
            "freeze: pattern 'layer9.*' matches no parameter of Sequential; names look like "
            "['0.0.weight', '0.0.bias', '0.1.weight', '0.1.bias'] ... ['2.weight', '2.bias']",
        ),
        (
            lambda m: freezing.freeze_all_but_last(m, 4),
            ValueError,
            "cannot keep the last 4 stages trainable: Sequential has 3 stages ['0.0', '0.1', '2']",
        ),
        (
            lambda m: freezing.freeze_all_but_last(m, -1),
            ValueError,
            "cannot keep the last -1 stages trainable: Sequential has 3 stages ['0.0', '0.1', '2']",
        ),
        (
            lambda m: freezing.GradualUnfreezing(m, start_epoch=0),
            ValueError,
            "start_epoch, every and stages_per_step must be >= 1, got 0, 1, 1",
        ),
        (
            lambda m: freezing.GradualUnfreezing(m, every=1, stages_per_step=0),
            ValueError,
            "start_epoch, every and stages_per_step must be >= 1, got 1, 1, 0",
        ),
    ],
)
def test_bad_freezing_requests_are_named(call, error, message):
    model = net()
    with pytest.raises(error) as err:
        call(model)
    assert str(err.value) == message
    assert all(p.requires_grad for p in model.parameters())  # refused before changing anything
