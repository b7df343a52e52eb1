"""OGM-GE gradient modulation and Gradient-Blending weights against their papers' equations."""

import copy
import math

import pytest
import torch
from torch import nn

from fusion.auxiliary import AuxiliaryLosses, AuxiliaryTraining
from fusion.batch import Batch
from fusion.data import Task
from fusion.encoders.base import Encoder
from fusion.fusers import ConcatFuser
from fusion.heads import ClassificationHead
from fusion.imbalance import OGMGE, GradientBlending
from fusion.model import MultimodalModel
from fusion.tasks import Objective
from fusion.training.loop import batch_loss

DIGITS = {"digit": Objective(Task("multiclass", tuple("0123")))}


def test_the_dominant_modality_gets_1_minus_tanh_alpha_ratio():
    ogm = OGMGE(["image", "audio"], DIGITS, alpha=0.4)
    ratios, coefficients = ogm.coefficients({"image": 0.8, "audio": 0.4})
    assert ratios == {"image": 2.0, "audio": 0.5}
    assert coefficients == {"image": pytest.approx(1 - math.tanh(0.8)), "audio": 1.0}
    three = OGMGE(["a", "b", "c"], DIGITS, alpha=1.0)  # each against the others' mean
    ratios, coefficients = three.coefficients({"a": 0.6, "b": 0.2, "c": 0.4})
    assert ratios == pytest.approx({"a": 2.0, "b": 0.4, "c": 1.0})
    assert coefficients == {"a": pytest.approx(1 - math.tanh(2.0)), "b": 1.0, "c": 1.0}
    ogm.set_epoch(3)
    late = OGMGE(["image", "audio"], DIGITS, alpha=0.4, start_epoch=2, end_epoch=2)
    late.set_epoch(3)  # after its epochs: ratios logged, nothing modulated
    assert late.coefficients({"image": 0.8, "audio": 0.4})[1] == {"image": 1.0, "audio": 1.0}


def test_scores_are_the_true_class_probability_with_one_modality_present():
    ogm = OGMGE(["a", "b"], DIGITS)
    y = torch.tensor([0, 1, 2])
    a_logits = torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 3.0]])
    b_logits = torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 5.0, 0]])

    def predict(masks):
        return torch.where(masks["a"][:, None], a_logits, 0.0) + torch.where(
            masks["b"][:, None], b_logits, 0.0
        )

    masks = {"a": torch.tensor([True, True, True]), "b": torch.tensor([True, True, False])}
    scores = ogm.scores(predict, masks, y)
    true_a = a_logits.softmax(1)[[0, 1, 2], y]
    assert scores["a"] == pytest.approx(float(true_a.mean()))
    assert scores["b"] == pytest.approx(0.25)  # uniform on its two samples; the third lacks b


def model() -> MultimodalModel:
    torch.manual_seed(0)
    encoders = {
        "image": Encoder(nn.Sequential(nn.Linear(5, 64), nn.ReLU()), input_shape=(5,)),
        "audio": Encoder(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), input_shape=(3,)),
    }
    return MultimodalModel.build(encoders, ConcatFuser, ClassificationHead, 4)


def batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    inputs = {"image": torch.randn(16, 5, generator=g), "audio": torch.randn(16, 3, generator=g)}
    present = {m: torch.ones(16, dtype=torch.bool) for m in inputs}
    return Batch(inputs, present, torch.randint(0, 4, (16,), generator=g))


def gradients(trained: nn.Module, data: Batch) -> dict[str, torch.Tensor]:
    trained.train()
    outputs, terms = trained(data.inputs, data.present, targets=data.targets)
    task, _ = batch_loss(outputs, data.targets, DIGITS)
    terms.total(task).backward()
    return {n: p.grad.clone() for n, p in trained.model.named_parameters()}, terms.logs


def plain_gradients(fused: MultimodalModel, data: Batch) -> dict[str, torch.Tensor]:
    fused.train()
    task, _ = batch_loss(fused(data.inputs, data.present), data.targets, DIGITS)
    task.backward()
    return {n: p.grad.clone() for n, p in fused.named_parameters()}


def test_modulation_scales_only_the_dominant_encoders_gradients():
    fused, data = model(), batch()
    plain = plain_gradients(copy.deepcopy(fused), data)
    ogm = OGMGE(fused.modalities, DIGITS, alpha=0.3, noise=False)
    found, logs = gradients(AuxiliaryTraining(fused, modulation=ogm), data)
    k = logs["ogm/coefficient/image"], logs["ogm/coefficient/audio"]
    assert (k[0] < 1) != (k[1] < 1)  # one modality dominates, and only it is slowed
    ratio = logs["ogm/ratio/image"]
    dominant = "image" if ratio > 1 else "audio"
    assert logs[f"ogm/coefficient/{dominant}"] == pytest.approx(
        1 - math.tanh(0.3 * logs[f"ogm/ratio/{dominant}"])
    )
    for name, grad in found.items():
        scale = (
            logs[f"ogm/coefficient/{dominant}"] if name.startswith(f"encoders.{dominant}") else 1.0
        )
        torch.testing.assert_close(grad, scale * plain[name], msg=name)


def test_generalization_enhancement_adds_noise_of_the_gradients_spread():
    fused, data = model(), batch()
    plain = plain_gradients(copy.deepcopy(fused), data)
    torch.manual_seed(5)
    ogm = OGMGE(fused.modalities, DIGITS, alpha=0.3, noise=True)
    found, logs = gradients(AuxiliaryTraining(fused, modulation=ogm), data)
    name = "encoders.image.backbone.0.weight"  # 320 entries
    k = logs["ogm/coefficient/image"]
    noise = found[name] - k * plain[name]
    assert float(noise.std() / (k * plain[name]).std()) == pytest.approx(1.0, abs=0.15)
    assert abs(float(noise.mean())) < 0.2 * float((k * plain[name]).std())
    for other in ("fuser", "head"):  # only encoders get noise
        for key, grad in found.items():
            if key.startswith(other):
                torch.testing.assert_close(grad, plain[key], msg=key)


def test_outside_its_epochs_the_modulation_changes_nothing():
    fused, data = model(), batch()
    plain = plain_gradients(copy.deepcopy(fused), data)
    ogm = OGMGE(fused.modalities, DIGITS, start_epoch=2)
    trained = AuxiliaryTraining(fused, modulation=ogm)
    trained.start_epoch(1)
    found, logs = gradients(trained, data)
    assert logs["ogm/coefficient/image"] == logs["ogm/coefficient/audio"] == 1.0
    for name, grad in found.items():
        torch.testing.assert_close(grad, plain[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modalities": ["image"]}, "2 or more modalities"),
        ({"objectives": {"y": Objective(Task("regression", ("y",)))}}, "one classification task"),
        ({"alpha": 0.0}, "alpha: expected a finite number > 0"),
        ({"start_epoch": 3, "end_epoch": 2}, "start_epoch <= end_epoch"),
    ],
)
def test_ogm_ge_settings_that_cannot_work_are_named(kwargs, message):
    settings = {"modalities": ["image", "audio"], "objectives": DIGITS, **kwargs}
    with pytest.raises(ValueError, match=message):
        OGMGE(**settings)


def metrics(train: list[float], val: list[float]) -> dict[str, float]:
    """An epoch's metrics: train and val losses of the fused head, then of a and b."""
    names = ["loss", "aux/unimodal/a", "aux/unimodal/b"]
    return {
        **{f"train/{n}": v for n, v in zip(names, train, strict=True)},
        **{f"val/{n}": v for n, v in zip(names, val, strict=True)},
    }


def test_blending_weights_are_the_generalization_over_the_squared_overfitting():
    blend = GradientBlending(["a", "b"])
    assert blend.initial_weights() == {"task": 1 / 3, "unimodal/a": 1 / 3, "unimodal/b": 1 / 3}
    assert blend.update(1, metrics([1.0, 1.2, 1.4], [1.1, 1.3, 1.5])) is None  # nothing before
    weights = blend.update(2, metrics([0.6, 0.9, 1.0], [0.9, 1.2, 1.6]))
    # fused: dG = 1.1 - 0.9 = 0.2, dO = 0.3 - 0.1 = 0.2 -> 0.2 / 0.04 = 5
    # a:     dG = 1.3 - 1.2 = 0.1, dO = 0.3 - 0.1 = 0.2 -> 0.1 / 0.04 = 2.5
    # b:     dG = 1.5 - 1.6 < 0 (it generalizes worse) -> 0
    assert weights == pytest.approx({"task": 5 / 7.5, "unimodal/a": 2.5 / 7.5, "unimodal/b": 0.0})


def test_blending_estimates_every_n_epochs_and_sets_the_auxiliary_weights():
    fused = model()
    aux = AuxiliaryLosses({"image": 64, "audio": 4}, DIGITS, unimodal=1.0)
    blend = GradientBlending(fused.modalities, every=2)
    trained = AuxiliaryTraining(fused, aux, blending=blend)
    assert aux.weights() == pytest.approx(
        {"task": 1 / 3, "unimodal/image": 1 / 3, "unimodal/audio": 1 / 3}
    )

    def epoch(train, val):
        names = ["loss", "aux/unimodal/image", "aux/unimodal/audio"]
        return {
            **{f"train/{n}": v for n, v in zip(names, train, strict=True)},
            **{f"val/{n}": v for n, v in zip(names, val, strict=True)},
        }

    assert trained.end_epoch(1, epoch([9, 9, 9], [9, 9, 9])) is None  # not due
    assert trained.end_epoch(2, epoch([1.0, 1.0, 1.0], [1.2, 1.2, 1.2])) is None  # first look
    assert trained.end_epoch(3, epoch([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])) is None  # not due
    weights = trained.end_epoch(4, epoch([0.8, 0.8, 0.8], [1.1, 1.0, 1.2]))
    # dG: 0.1, 0.2, 0; dO: 0.3 - 0.2 = 0.1, 0.2 - 0.2 = 0 (clamped), ...
    assert weights["unimodal/audio"] == 0.0 and weights["unimodal/image"] > weights["task"]
    assert aux.weights() == pytest.approx(weights)
    state = trained.state_dict()  # the weights and the last estimate resume with the run
    assert state["blending.previous_epoch"] == 4
    torch.testing.assert_close(state["auxiliary.weight_values"][1:], torch.tensor(
        [weights["unimodal/image"], weights["unimodal/audio"]], dtype=torch.float64))  # fmt: skip
