import functools

import pytest
import torch
from torch import nn

from fusion.encoders.base import Encoder
from fusion.fusers import ConcatFuser, GatedFuser
from fusion.heads import ClassificationHead
from fusion.model import ModalityDropout, MultimodalModel


class Scale(nn.Module):
    """A recognisable backbone: multiplies its input by a fixed factor."""

    def __init__(self, factor: float, dim: int) -> None:
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(x.flatten(1)) * self.factor


def tiny_model(fuser=ConcatFuser):
    encoders = {
        "image": Encoder(Scale(1.0, 4), input_shape=(1, 2, 2)),
        "audio": Encoder(Scale(-1.0, 6), input_shape=(6,)),
    }
    return MultimodalModel.build(encoders, fuser=fuser, head=ClassificationHead, num_classes=3)


def test_each_modality_goes_through_its_own_encoder():
    model = tiny_model()
    inputs = {"image": torch.randn(2, 1, 2, 2), "audio": torch.randn(2, 6)}
    features = model.encode(inputs)
    assert torch.allclose(features["image"], model.encoders["image"](inputs["image"]))
    assert torch.allclose(features["audio"], model.encoders["audio"](inputs["audio"]))
    # the input dict's order does not matter: the name is the route
    reversed_inputs = dict(reversed(list(inputs.items())))
    assert torch.allclose(model(inputs), model(reversed_inputs))


def test_sizes_flow_from_encoders_to_head():
    model = tiny_model(GatedFuser)
    assert model.fuser.in_dims == {"image": 4, "audio": 6}
    assert model.head.in_dim == model.fuser.out_dim


def test_all_trainable_parameters_learn():
    model = tiny_model(GatedFuser)
    out = model({"image": torch.randn(3, 1, 2, 2), "audio": torch.randn(3, 6)})
    nn.functional.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_missing_modality_is_named():
    model = tiny_model()
    with pytest.raises(
        KeyError, match=r"needs modality 'audio', but the batch only has \['image'\]"
    ):
        model({"image": torch.randn(2, 1, 2, 2)})


def test_a_presence_mask_for_a_modality_the_batch_lacks_is_named():
    model = tiny_model()
    inputs = {"image": torch.randn(2, 1, 2, 2), "audio": torch.randn(2, 6)}
    mistyped = {"imgae": torch.tensor([True, False])}  # would leave every image present
    with pytest.raises(
        KeyError,
        match=r"present names \['imgae'\], which the batch does not have; its modalities are "
        r"\['audio', 'image'\]",
    ):
        model(inputs, mistyped)


def test_a_training_batch_of_one_is_refused_where_a_batch_norm_would_learn_from_it():
    model = tiny_model()
    model.encoders["audio"].backbone.proj = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
    one = {"image": torch.randn(1, 1, 2, 2), "audio": torch.randn(1, 6)}
    with pytest.raises(
        ValueError,
        match=r"^a training batch of 1 sample: batch norm encoders\.audio\.backbone\.proj\.1 "
        r"cannot estimate statistics from one sample; use batches of 2 or more, or call "
        r"model\.eval\(\)",
    ):
        model(one)
    assert model.eval()(one).shape == (1, 3)  # running statistics: fine
    model.train()
    assert model(one, encoded={"audio"}).shape == (1, 3)  # a cached encoder does not run


def test_inputs_that_are_not_a_dict_are_named():
    with pytest.raises(TypeError, match=r"inputs must be a dict \{modality: tensor\}, got list"):
        tiny_model()([torch.randn(2, 1, 2, 2), torch.randn(2, 6)])


def test_wrong_shape_names_modality_expected_and_received():
    model = tiny_model()
    with pytest.raises(
        ValueError, match=r"modality 'audio': expected a tensor of shape \[batch, 6\], got \[2, 5\]"
    ):
        model({"image": torch.randn(2, 1, 2, 2), "audio": torch.randn(2, 5)})


def test_fuser_for_other_modalities_is_rejected():
    encoders = {"image": Encoder(Scale(1.0, 4), input_shape=(4,))}
    with pytest.raises(ValueError, match="fuser was built for modalities"):
        MultimodalModel(encoders, ConcatFuser({"audio": 4}), ClassificationHead(4, 2))


@pytest.mark.parametrize(
    ("fuser", "head", "message"),
    [
        pytest.param(
            GatedFuser({"image": 4}, dim=8),
            ClassificationHead(100, 3),
            r"^head.in_dim is 100 but the fuser gives out_dim 8; build the head with "
            r"in_dim=fuser.out_dim, as MultimodalModel.build does$",
            id="gated",
        ),
        pytest.param(
            "late",
            ClassificationHead(4, 3),
            r"^head.in_dim is 4 but the fuser gives out_dim 3 \(its predictions: a fuser that "
            r"produces logits is followed by PassThroughHead\)",
            id="late",
        ),
    ],
)
def test_head_for_another_fused_size_is_rejected(fuser, head, message):
    from fusion.fusers import LateFusion

    encoders = {"image": Encoder(Scale(1.0, 4), input_shape=(4,))}
    if fuser == "late":
        fuser = LateFusion({"image": 4}, num_classes=3)
    with pytest.raises(ValueError, match=message):
        MultimodalModel(encoders, fuser, head)


def test_late_fusion_is_followed_by_a_pass_through_head():
    from fusion.fusers import LateFusion
    from fusion.model import PassThroughHead

    model = tiny_model(fuser=functools.partial(LateFusion, combine="probs"))
    assert isinstance(model.head, PassThroughHead)
    encoders = {"image": Encoder(Scale(1.0, 4), input_shape=(4,))}
    fuser = LateFusion({"image": 4}, num_classes=3)
    MultimodalModel(encoders, fuser, PassThroughHead())
    MultimodalModel(encoders, fuser, ClassificationHead(3, 3))


def test_summary_lists_shapes_parameters_and_frozen_parts():
    model = tiny_model()
    model.encoders["image"].freeze()
    rows = {line.split()[0]: line.split() for line in model.summary().splitlines()[2:-2]}
    assert rows["image"][1:] == ["Encoder", "[4]", "20", "no"]
    assert rows["audio"][1:] == ["Encoder", "[6]", "42", "yes"]
    assert rows["head"][2] == "[3]"
    assert model.summary().splitlines()[-1] == "total parameters: 95   trainable: 75   frozen: 20"


def test_modality_dropout_drops_at_its_rate_but_never_everything():
    dropout = ModalityDropout({"image": 0.5, "audio": 0.5}, ["image", "audio"])
    present = dropout(None, 10_000)
    image, audio = present["image"], present["audio"]
    assert (image | audio).all()
    assert 0.23 < (~image).float().mean() < 0.27  # dropped (0.5) while audio is kept (0.5)
    partial = {"image": torch.tensor([True, False]), "audio": torch.tensor([False, True])}
    for _ in range(20):
        out = dropout(partial, 2)
        assert (out["image"] | out["audio"]).all()
        assert not (out["image"] & ~partial["image"]).any()  # never brings back a missing one


def test_modality_dropout_only_in_training_and_validated():
    model = MultimodalModel.build(
        {
            "image": Encoder(Scale(1.0, 4), input_shape=(1, 2, 2)),
            "audio": Encoder(Scale(-1.0, 6), input_shape=(6,)),
        },
        fuser=ConcatFuser,
        head=ClassificationHead,
        num_classes=3,
        modality_dropout={"audio": 0.9},
    )
    inputs = {"image": torch.randn(64, 1, 2, 2), "audio": torch.randn(64, 6)}
    model.eval()
    assert torch.equal(model(inputs), model(inputs))
    model.train()
    assert not torch.equal(model(inputs), model(inputs))
    with pytest.raises(ValueError, match=r"names modalities \['text'\]"):
        MultimodalModel.build(
            dict(model.encoders), ConcatFuser, ClassificationHead, 3, modality_dropout={"text": 0.1}
        )


@pytest.mark.parametrize("rate", [1.0, -0.1, "0.5", None])
def test_modality_dropout_rates_are_named(rate):
    with pytest.raises(
        ValueError, match=rf"^modality_dropout\['audio'\] must be in \[0, 1\), got {rate!r}$"
    ):
        ModalityDropout({"image": 0.1, "audio": rate}, ["image", "audio"])


def test_late_fusion_with_several_tasks_is_explained():
    from fusion.fusers import LateFusion

    encoders = {"image": Encoder(Scale(1.0, 4), input_shape=(4,))}
    with pytest.raises(ValueError, match=r"late fusion predicts one set of classes.*multitask"):
        MultimodalModel.build(encoders, LateFusion, ClassificationHead, {"a": 2, "b": 3})


# --- bad inputs are refused by modality, before any layer runs -----------------------------


def batch(image=None, audio=None):
    return {
        "image": torch.randn(2, 1, 2, 2) if image is None else image,
        "audio": torch.randn(2, 6) if audio is None else audio,
    }


BAD_INPUTS = {
    "float64": (
        batch(audio=torch.randn(2, 6, dtype=torch.float64)),
        None,
        r"modality 'audio': expected a float32 tensor \(the model's dtype\), got float64; "
        r"convert it with x.to\(torch.float32\)",
    ),
    "float16": (
        batch(image=torch.randn(2, 1, 2, 2).half()),
        None,
        r"modality 'image': expected a float32 tensor \(the model's dtype\), got float16",
    ),
    "uint8-image": (
        batch(image=torch.zeros(2, 1, 2, 2, dtype=torch.uint8)),
        None,
        r"modality 'image': expected a float32 tensor, got uint8; integer inputs are not "
        r"scaled by the model.*x.float\(\) / 255",
    ),
    "int16-audio": (
        batch(audio=torch.zeros(2, 6, dtype=torch.int16)),
        None,
        r"modality 'audio': expected a float32 tensor, got int16.*x.float\(\) / 32768",
    ),
    "bool-input": (
        batch(audio=torch.ones(2, 6, dtype=torch.bool)),
        None,
        r"modality 'audio': expected a float32 tensor, got bool",
    ),
    "meta-device": (
        batch(audio=torch.empty(2, 6, device="meta")),
        None,
        r"modality 'audio': the input is on meta, the model on cpu",
    ),
    "batch-sizes": (
        batch(audio=torch.randn(3, 6)),
        None,
        r"modality 'audio' has 3 samples, modality 'image' has 2; every modality of a batch "
        r"needs the same number of samples",
    ),
    "empty-batch": (
        {"image": torch.randn(0, 1, 2, 2), "audio": torch.randn(0, 6)},
        None,
        r"modality 'image': the batch is empty \(0 samples\)",
    ),
    "half-mask": (
        batch(),
        {"audio": torch.tensor([1.0, 0.5])},
        r"modality 'audio': the presence mask must be a bool tensor \(True where real\), got "
        r"float32",
    ),
    "int-mask": (
        batch(),
        {"image": torch.tensor([1, 2])},
        r"modality 'image': the presence mask must be a bool tensor .*got int64",
    ),
    "list-mask": (
        batch(),
        {"audio": [True, False]},
        r"modality 'audio': the presence mask must be a bool tensor .*got list",
    ),
    "mask-batch": (
        batch(),
        {"audio": torch.ones(3, dtype=torch.bool)},
        r"modality 'audio': the presence mask has shape \[3\], expected \[2\] for an input "
        r"of shape \[2, 6\]",
    ),
    "token-mask-for-a-vector": (
        batch(),
        {"audio": torch.ones(2, 6, dtype=torch.bool)},
        r"^modality 'audio': a \[B, T\] mask \(\[2, 6\]\) was given but its encoder takes one "
        r"vector per sample \(input \[2, 6\]\), not a sequence; give a \[B\] mask \(\[2\]: "
        r"True where a sample has the modality\)$",
    ),
    "token-mask-for-an-image": (
        batch(),
        {"image": torch.ones(2, 1, dtype=torch.bool)},
        r"modality 'image': a \[B, T\] mask \(\[2, 1\]\) was given but its encoder takes one "
        r"\[1, 2, 2\] input per sample",
    ),
    "mask-rank": (
        batch(),
        {"image": torch.ones(2, 1, 2, dtype=torch.bool)},
        r"modality 'image': the presence mask has shape \[2, 1, 2\], expected \[2\] for an "
        r"input of shape \[2, 1, 2, 2\]",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_refused_naming_the_modality_before_any_layer(case):
    inputs, present, message = BAD_INPUTS[case]
    model = tiny_model()
    ran = []
    for module in model.modules():
        module.register_forward_pre_hook(lambda module, args: ran.append(module))
    with pytest.raises(ValueError, match=message):
        model(inputs, present)
    assert ran == [model]  # only the model's own forward started


BAD_CACHED = {
    "vector-token-mask": (
        torch.randn(2, 6),
        torch.ones(2, 6, dtype=torch.bool),
        r"modality 'audio': the presence mask has shape \[2, 6\], expected \[2\] for an input "
        r"of shape \[2, 6\]",
    ),
    "float64": (
        torch.randn(2, 6, dtype=torch.float64),
        None,
        r"modality 'audio': expected a float32 tensor \(the model's dtype\), got float64",
    ),
    "shape": (
        torch.randn(2, 5),
        None,
        r"modality 'audio': cached features have shape \[2, 5\], the encoder gives \[batch, 6\]",
    ),
}


@pytest.mark.parametrize("case", BAD_CACHED)
def test_bad_cached_features_are_refused_naming_the_modality(case):
    features, mask, message = BAD_CACHED[case]
    present = None if mask is None else {"audio": mask}
    with pytest.raises(ValueError, match=message):
        tiny_model()(batch(audio=features), present, encoded=frozenset({"audio"}))


def test_a_model_in_float64_takes_float64_inputs():
    model = tiny_model().double()
    inputs = {m: x.double() for m, x in batch().items()}
    assert model(inputs).dtype == torch.float64
    with pytest.raises(ValueError, match=r"modality 'image': expected a float64 tensor"):
        model(batch())


def test_modalities_the_model_does_not_use_are_not_checked():
    """A stage-1 (unimodal) model takes the whole batch: the other modalities are not its."""
    extra = dict(batch(), text=["a", "b", "c"])
    present = {"text": torch.tensor([0.5, 1.0, 2.0])}
    assert tiny_model()(extra, present).shape == (2, 3)


def test_a_token_mask_for_a_table_is_refused_and_fits_only_sequences():
    """A [B, F] mask over a table row would zero columns and change the output silently."""
    from fusion.encoders.tabular import build_tabular_encoder

    table = build_tabular_encoder(num_numeric=4, categorical_cardinalities=[], hidden=[8])
    sequence = Encoder(nn.Linear(3, 4), input_shape=(5, 3))  # [T, D] tokens per sample
    model = MultimodalModel.build(
        {"tab": table, "seq": sequence}, ConcatFuser, ClassificationHead, 3
    ).eval()
    inputs = {"tab": torch.randn(2, 4), "seq": torch.randn(2, 5, 3)}
    with pytest.raises(ValueError) as caught:
        model(inputs, {"tab": torch.tensor([[True, True, False, False]] * 2)})
    assert str(caught.value) == (
        "modality 'tab': a [B, T] mask ([2, 4]) was given but its encoder takes one vector per "
        "sample (input [2, 4]), not a sequence; give a [B] mask ([2]: True where a sample has "
        "the modality)"
    )
    padding = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    out = model(inputs, {"tab": torch.tensor([True, True]), "seq": padding})
    poisoned = {**inputs, "seq": inputs["seq"].masked_fill(~padding.unsqueeze(-1), float("nan"))}
    torch.testing.assert_close(model(poisoned, {"seq": padding}), out)
