import pytest
import torch
from torch import nn

from fusion.encoders.base import Encoder
from fusion.fusers import ConcatFuser, GatedFuser
from fusion.heads import ClassificationHead
from fusion.model import MultimodalModel


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


def test_summary_lists_shapes_parameters_and_frozen_parts():
    model = tiny_model()
    model.encoders["image"].freeze()
    rows = {line.split()[0]: line.split() for line in model.summary().splitlines()[2:-2]}
    assert rows["image"][1:] == ["Encoder", "[4]", "20", "no"]
    assert rows["audio"][1:] == ["Encoder", "[6]", "42", "yes"]
    assert rows["head"][2] == "[3]"
    assert model.summary().splitlines()[-1] == "total parameters: 95   trainable: 75   frozen: 20"


def test_modality_dropout_drops_at_its_rate_but_never_everything():
    from fusion.model import ModalityDropout

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


def test_late_fusion_with_several_tasks_is_explained():
    from fusion.fusers import LateFusion

    encoders = {"image": Encoder(Scale(1.0, 4), input_shape=(4,))}
    with pytest.raises(ValueError, match=r"late fusion predicts one set of classes.*multitask"):
        MultimodalModel.build(encoders, LateFusion, ClassificationHead, {"a": 2, "b": 3})
