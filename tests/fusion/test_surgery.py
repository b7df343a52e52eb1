import pytest
import torch
from torch import nn
from torchvision.models import get_model

from fusion import freezing, surgery
from fusion.encoders import build_vision_encoder


def small_resnet(**kwargs):
    return build_vision_encoder(
        "resnet18", in_channels=1, image_size=(16, 16), small_input_stem=True, **kwargs
    )


@pytest.mark.parametrize(
    ("name", "classifier", "out_dim"),
    [
        ("resnet18", "fc", 512),
        ("mobilenet_v3_small", "classifier.3", 1024),
        ("convnext_tiny", "classifier.2", 768),
        ("vgg11", "classifier.6", 4096),
    ],
)
def test_remove_classifier_keeps_a_feature_vector(name, classifier, out_dim):
    model = get_model(name).eval()
    assert surgery.remove_classifier(model) == classifier
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, out_dim)


def test_vit_classifier_is_found_inside_heads():
    assert surgery.find_classifier(get_model("vit_b_16")) == "heads.head"


def test_replace_classifier_infers_its_input_size():
    model = get_model("mobilenet_v3_small").eval()
    surgery.replace_classifier(model, num_classes=7)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


class Classified(nn.Module):
    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3)
        self.classifier = classifier


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            nn.Sequential(nn.Linear(2, 2)),
            "Sequential has no classifier: expected a child named one of "
            "('fc', 'classifier', 'head', 'heads'), found children ['0']",
        ),
        (
            Classified(nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU())),
            "Classified's 'classifier' (Conv2d, ReLU) holds no nn.Linear or 1x1 nn.Conv2d to "
            "use as its classifier",
        ),
    ],
)
def test_classifier_not_found_is_explained(model, message):
    with pytest.raises(ValueError) as err:
        surgery.find_classifier(model)
    assert str(err.value) == message


def test_squeezenet_classifier_is_its_1x1_convolution():
    model = get_model("squeezenet1_1").eval()
    assert surgery.find_classifier(model) == "classifier.1"
    assert isinstance(surgery.replace_classifier(model, 7), nn.Conv2d)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 7)


def test_stages_follow_forward_order():
    names = [name for name, _ in surgery.stages(get_model("resnet18"))]
    assert names == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    mobilenet = [name for name, _ in surgery.stages(get_model("mobilenet_v3_small"))]
    assert mobilenet[0] == "features.0" and len(mobilenet) > 10


def test_freeze_by_pattern_and_errors():
    model = get_model("resnet18")
    changed = freezing.set_trainable_by_pattern(model, ["conv1.*", "layer1.*"], False)
    assert "conv1.weight" in changed and "layer1.0.conv1.weight" in changed
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(changed)
    with pytest.raises(ValueError, match=r"pattern 'layer9\.\*' matches no parameter"):
        freezing.set_trainable_by_pattern(model, "layer9.*", False)


def test_freeze_all_but_last():
    model = get_model("resnet18")
    assert freezing.freeze_all_but_last(model, 2) == ["layer4", "fc"]
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "fc"}
    with pytest.raises(ValueError, match="has 7 stages"):
        freezing.freeze_all_but_last(model, 8)


def train_steps(module, inputs, steps=3):
    optimizer = torch.optim.SGD(surgery.param_groups(module, lr=0.1, weight_decay=0.0), lr=0.1)
    module.train()
    for _ in range(steps):
        optimizer.zero_grad()
        module(inputs).pow(2).mean().backward()
        optimizer.step()


def test_frozen_backbone_and_its_batchnorm_stay_put_while_new_layers_train():
    encoder = small_resnet(freeze="backbone", post=[{"type": "linear", "dim": 8}])
    backbone = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    post = {k: v.clone() for k, v in encoder.post.state_dict().items()}
    train_steps(encoder, torch.rand(4, 1, 16, 16))
    for key, value in encoder.backbone.state_dict().items():
        assert torch.equal(value, backbone[key]), key  # weights and running statistics
    assert all(not torch.equal(v, post[k]) for k, v in encoder.post.state_dict().items())


def test_trainable_stages_thaw_only_the_last_ones():
    encoder = small_resnet(freeze="backbone", trainable_stages=1)
    layer1 = {k: v.clone() for k, v in encoder.backbone.layer1.state_dict().items()}
    layer4 = encoder.backbone.layer4.state_dict()["0.conv1.weight"].clone()
    train_steps(encoder, torch.rand(4, 1, 16, 16))
    assert all(torch.equal(v, layer1[k]) for k, v in encoder.backbone.layer1.state_dict().items())
    assert not torch.equal(encoder.backbone.layer4.state_dict()["0.conv1.weight"], layer4)
    assert not encoder.backbone.layer1[0].bn1.training and encoder.backbone.layer4[0].bn1.training


def test_freeze_patterns_from_config():
    encoder = small_resnet(freeze=["backbone.conv1.*", "backbone.bn1.*"])
    assert not encoder.backbone.conv1.weight.requires_grad
    assert encoder.backbone.layer1[0].conv1.weight.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"freeze": "most"}, "freeze must be one of"),
        ({"trainable_stages": 2}, "trainable_stages needs freeze='backbone'"),
    ],
)
def test_bad_freeze_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_resnet(**kwargs)


def test_gradual_unfreezing_thaws_from_the_top():
    model = get_model("resnet18")
    schedule = freezing.GradualUnfreezing(model, start_epoch=2, every=2, stages_per_step=1)
    assert [schedule.trainable_stages(e) for e in range(1, 7)] == [0, 1, 1, 2, 2, 3]
    assert schedule.step(1) == [] and not any(p.requires_grad for p in model.parameters())
    assert schedule.step(4) == ["layer4", "fc"]
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "fc"}


def test_optimizer_leaves_frozen_parameters_until_they_thaw():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    schedule = freezing.GradualUnfreezing(model)
    optimizer = torch.optim.AdamW(surgery.param_groups(model, lr=0.1, weight_decay=0.1))
    first = model[0].weight.clone()
    for epoch in (1, 2):
        schedule.step(epoch)
        optimizer.zero_grad()
        model(torch.rand(4, 3)).sum().backward()
        optimizer.step()
        assert torch.equal(model[0].weight, first) == (epoch == 1)


def test_param_groups_multipliers_decay_and_coverage():
    encoder = small_resnet(post=[{"type": "linear", "dim": 4}])
    groups = surgery.param_groups(
        encoder,
        lr=1.0,
        weight_decay=0.01,
        lr_mult={"backbone.*": 0.1},
        weight_decay_for={"post.*": 0.5},
    )
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in encoder.parameters())  # each exactly once
    lookup = {id(p): g for g in groups for p in g["params"]}
    assert lookup[id(encoder.backbone.conv1.weight)]["lr"] == pytest.approx(0.1)
    assert lookup[id(encoder.backbone.bn1.weight)]["weight_decay"] == 0.0
    assert lookup[id(encoder.post[0].weight)]["weight_decay"] == 0.5
    assert lookup[id(encoder.post[0].bias)]["weight_decay"] == 0.0


def test_layer_wise_decay_shrinks_towards_the_input():
    model = nn.ModuleDict({"backbone": get_model("resnet18")})
    groups = surgery.param_groups(
        model, lr=1.0, weight_decay=0.0, layer_decay=0.5, decay_roots=["backbone"]
    )
    lookup = {id(p): g["lr"] for g in groups for p in g["params"]}
    backbone = model["backbone"]
    assert lookup[id(backbone.fc.weight)] == 1.0
    assert lookup[id(backbone.layer4[0].conv1.weight)] == 0.5
    assert lookup[id(backbone.conv1.weight)] == 0.5**6


def test_new_layers_learn_their_input_sizes():
    encoder = build_vision_encoder(
        "resnet18",
        image_size=(32, 32),
        output="map",
        pre=[{"type": "conv", "channels": 3, "kernel": 1}],
        post=[
            {"type": "conv", "channels": 32},
            {"type": "pool", "kind": "max"},
            {"type": "flatten"},
            {"type": "dropout", "p": 0.2},
            {"type": "linear", "dim": 16},
        ],
    )
    assert encoder.out_shape == (16,)
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in encoder.parameters())
    assert encoder.post[0][0].weight.shape == (32, 512, 3, 3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "transformer"}, "unknown type 'transformer'"),
        (
            {"type": "linear", "width": 3},
            r"layer 1 \(linear\): unknown arguments \['width'\]; linear takes \['bias', 'dim'\]",
        ),
        ({"type": "linear"}, r"layer 1 \(linear\): missing arguments \['dim'\]"),
        (
            {"type": "linear", "dim": 0},
            r"layer 1 \(linear\): dim must be a positive integer, got 0",
        ),
        ({"type": "conv", "channels": -3}, r"layer 1 \(conv\): channels must be .*, got -3"),
        (
            {"type": "conv", "channels": 8, "kernel": 2.5},
            r"layer 1 \(conv\): kernel must .*got 2.5",
        ),
        (
            {"type": "conv", "channels": 8, "batchnorm": "no"},
            r"batchnorm must be true or false, got 'no'",
        ),
        ({"type": "dropout", "p": 1.5}, r"layer 1 \(dropout\): p must be in \[0, 1\), got 1.5"),
        (
            {"type": "pool", "kind": "min"},
            r"layer 1 \(pool\): kind must be one of \('avg', 'max'\), got 'min'",
        ),
        (
            {"type": "pool", "size": 2, "kernel": 2},
            r"give size \(an adaptive pool, got 2\) or kernel",
        ),
        ({"type": "pool", "stride": 2}, r"layer 1 \(pool\): stride \(2\) needs a kernel"),
        (
            {"type": "pool", "size": [1, 2, 3]},
            r"size must be an int or \[height, width\], got \[1, 2, 3\]",
        ),
        ({"type": "pool", "kernel": [2, 0]}, r"kernel\[1\] must be a positive integer, got 0"),
        (5, r"layer 1: expected a spec such as .* or an nn.Module, got int 5"),
        (nn.ReLU, r"layer 1: expected a spec .* or an nn.Module, got type"),
    ],
)
def test_bad_layer_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        surgery.build_layers([{"type": "flatten"}, spec])


def test_layer_specs_pool_by_window_or_size_conv_without_norm_and_modules_as_layers():
    layers = surgery.build_layers(
        [
            {"type": "conv", "channels": 4, "batchnorm": False},
            {"type": "pool", "kind": "max", "kernel": 2},
            {"type": "pool", "kernel": [2, 1], "stride": 1},
            {"type": "pool", "size": [2, 1]},
            nn.Flatten(1),
            {"type": "linear", "dim": 3},
        ]
    )
    assert [type(m) for m in layers[0]] == [nn.LazyConv2d, nn.ReLU]  # no batch norm
    out = layers(torch.randn(2, 3, 8, 8))  # 8x8 -> 4x4 -> 3x4 -> 2x1, 4 channels
    assert out.shape == (2, 3) and layers[5].in_features == 8
    assert isinstance(surgery.build_layers([{"type": "pool"}])[0], nn.AdaptiveAvgPool2d)
    conv = surgery.build_layers([{"type": "conv", "channels": 4}])[0]
    assert [type(m) for m in conv] == [nn.LazyConv2d, nn.LazyBatchNorm2d, nn.ReLU]
    single = nn.Linear(3, 2)
    assert surgery.build_layers(single)[0] is single
    with pytest.raises(
        ValueError, match=r"layers must be a list of layer specs or modules, got dict"
    ):
        surgery.build_layers({"type": "relu"})


def test_named_layer_lists_say_which_list_and_keep_each_layer_type():
    """An encoder builds its lists as `pre` and `post`, so messages say `post[1]`."""
    with pytest.raises(ValueError) as caught:
        surgery.build_layers([{"type": "flatten"}, {"type": "dropout", "p": 1.5}], "post")
    assert str(caught.value) == "post[1] (dropout): p must be in [0, 1), got 1.5"
    with pytest.raises(ValueError) as caught:
        surgery.build_layers([{"type": "pol"}], "pre")
    assert str(caught.value) == f"pre[0]: unknown type 'pol'; expected one of {surgery.LAYER_TYPES}"
    with pytest.raises(ValueError) as caught:
        surgery.build_layers({"type": "relu"}, "post")
    assert str(caught.value) == "post must be a list of layer specs or modules, got dict"
    layers = surgery.build_layers([{"type": "conv", "channels": 4}, nn.Flatten(1)], "post")
    assert isinstance(layers, nn.Sequential) and layers.kinds == ("conv", "Flatten")


@pytest.mark.parametrize(
    ("spec", "shape", "problem"),
    [
        ({"type": "pool"}, [512], "expected a feature map [C, H, W], found [512]"),
        ({"type": "conv", "channels": 4}, [4, 512], "expected a feature map [C, H, W], found [4, 512]"),
        ({"type": "pool", "kernel": 3}, [8, 2, 5], "expected a map of at least 3x3 for kernel 3, found [8, 2, 5]"),
        ({"type": "pool", "kernel": [2, 6]}, [8, 2, 5], "expected a map of at least 2x6 for kernel [2, 6], found [8, 2, 5]"),
        ({"type": "pool", "kernel": [2, 5]}, [8, 2, 5], None),
        ({"type": "pool", "size": 4}, [8, 2, 2], None),  # an adaptive pool takes any map
        ({"type": "linear", "dim": 4}, [3, 5], None),
    ],
)  # fmt: skip
def test_layer_input_problem(spec, shape, problem):
    layers = surgery.build_layers([spec])
    assert surgery.layer_input_problem(layers.kinds[0], layers[0], shape) == problem


def test_no_weight_decay_on_biases_and_norms_whatever_their_names():
    model = nn.ModuleDict(
        {
            "attn": nn.MultiheadAttention(8, 2, add_bias_kv=True),
            "rms": nn.RMSNorm(8),
            "group": nn.GroupNorm(2, 8),
            "instance": nn.InstanceNorm1d(8, affine=True),
            "linear": nn.Linear(8, 8),
            "embedding": nn.Embedding(4, 8),
        }
    )
    groups = surgery.param_groups(model, lr=1.0, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "linear.weight",
        "embedding.weight",
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1e-3}, "lr must be a finite number > 0, got -0.001"),
        ({"lr": 0}, "lr must be a finite number > 0, got 0"),
        ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
        ({"lr": "1e-3"}, "lr must be a finite number > 0, got '1e-3'"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0, got -0.1"),
        ({"weight_decay": float("inf")}, "weight_decay must be a finite number >= 0, got inf"),
        ({"layer_decay": 2.0}, "layer_decay must be a number in (0, 1], got 2.0"),
        ({"layer_decay": 0}, "layer_decay must be a number in (0, 1], got 0"),
        ({"layer_decay": float("nan")}, "layer_decay must be a number in (0, 1], got nan"),
        ({"layer_decay": True}, "layer_decay must be a number in (0, 1], got True"),
        ({"layer_decay": "0.5"}, "layer_decay must be a number in (0, 1], got '0.5'"),
        (
            {"weight_decay_for": {"0.*": "high"}},
            "weight_decay_for['0.*']: expected a finite number >= 0, got str 'high'",
        ),
        (
            {"weight_decay_for": {"0.*": -1e-4}},
            "weight_decay_for['0.*']: expected a finite number >= 0, got float -0.0001",
        ),
        ({"lr_mult": {"0.*": -0.1}}, "lr_mult['0.*']: expected a finite number >= 0, got float -0.1"),
        ({"lr_mult": {"0.*": float("nan")}}, "lr_mult['0.*']: expected a finite number >= 0, got float nan"),
        ({"lr_mult": {"0.*": float("inf")}}, "lr_mult['0.*']: expected a finite number >= 0, got float inf"),
        ({"lr_mult": {"0.*": None}}, "lr_mult['0.*']: expected a finite number >= 0, got NoneType None"),
        ({"lr_mult": {"0.*": False}}, "lr_mult['0.*']: expected a finite number >= 0, got bool False"),
        ({"lr_mult": [0.1]}, "lr_mult: expected a dict of glob pattern -> number, got list [0.1]"),
    ],
    ids=[
        "lr-negative", "lr-zero", "lr-nan", "lr-string", "wd-negative", "wd-inf", "ld-2", "ld-0",
        "ld-nan", "ld-bool", "ld-string", "wdf-string", "wdf-negative", "mult-negative",
        "mult-nan", "mult-inf", "mult-none", "mult-bool", "mult-list",
    ],
)  # fmt: skip
def test_param_group_rates_that_cannot_train_are_refused(kwargs, message):
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError) as err:
        surgery.param_groups(model, **{"lr": 1e-3, "weight_decay": 0.0, **kwargs})
    assert str(err.value) == message


@pytest.mark.parametrize("num_classes", [0, -2, 2.5, True])
def test_replace_classifier_needs_a_positive_class_count(num_classes):
    model = nn.Sequential()
    model.fc = nn.Linear(4, 3)
    with pytest.raises(ValueError) as err:
        surgery.replace_classifier(model, num_classes)
    assert str(err.value) == f"num_classes must be a positive integer, got {num_classes!r}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"lr_mult": {"1.*": 0.1, "head.*": 2.0}},
            "lr_mult: pattern 'head.*' matches no parameter of Sequential; names look like "
            "['0.weight', '0.bias', '1.weight', '1.bias'] ... ['1.weight', '1.bias']",
        ),
        (
            {"weight_decay_for": {"0.wieght": 0.5}},
            "weight_decay_for: pattern '0.wieght' matches no parameter of Sequential; names "
            "look like ['0.weight', '0.bias', '1.weight', '1.bias'] ... ['1.weight', '1.bias']",
        ),
    ],
)
def test_param_group_patterns_that_match_nothing_are_refused(kwargs, message):
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError) as err:
        surgery.param_groups(model, lr=1.0, weight_decay=0.0, **kwargs)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        surgery.check_param_patterns(model, **kwargs)
    assert str(err.value) == message


def test_param_groups_multipliers_may_be_zero_or_integers():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    groups = surgery.param_groups(model, lr=1.0, weight_decay=0.0, lr_mult={"0.*": 0, "1.*": 2})
    assert sorted(g["lr"] for g in groups) == [0.0, 2.0]


def test_a_decay_root_that_is_no_submodule_is_named_with_the_close_ones():
    from fusion.encoders import build_vision_encoder

    encoder = build_vision_encoder("resnet18", image_size=(32, 32))
    with pytest.raises(ValueError) as caught:
        surgery.param_groups(
            encoder, lr=1e-3, weight_decay=1e-4, layer_decay=0.5, decay_roots=["backbone9"]
        )
    assert str(caught.value) == (
        "decay_roots: Encoder has no submodule 'backbone9'; its submodules are ['preprocess', "
        "'pre', 'backbone', 'post'] (nested ones by dotted name, e.g. 'backbone.conv1'); did you "
        "mean ['backbone', 'backbone.fc', 'backbone.bn1']?"
    )
    with pytest.raises(ValueError, match=r"^decay_roots: expected a list of submodule names"):
        surgery.param_groups(encoder, lr=1e-3, weight_decay=0.0, decay_roots="backbone")
    groups = surgery.param_groups(
        encoder, lr=1.0, weight_decay=0.0, layer_decay=0.5, decay_roots=["backbone.layer4"]
    )
    rates = {g["lr"] for g in groups}  # a nested root is decayed, the rest keeps lr
    assert 1.0 in rates and min(rates) < 1.0
