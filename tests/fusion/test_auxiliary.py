"""Auxiliary losses beside the task loss: unimodal heads and InfoNCE between modalities."""

import copy

import pytest
import torch
from torch import nn

from fusion.auxiliary import AuxiliaryLosses, AuxiliaryTraining
from fusion.batch import Batch
from fusion.contrastive import InfoNCE
from fusion.data import Task
from fusion.encoders.base import Encoder
from fusion.fusers import GatedFuser
from fusion.heads import ClassificationHead
from fusion.model import MultimodalModel
from fusion.tasks import Objective
from fusion.training.loop import batch_loss, train_epoch

DIGITS = {"digit": Objective(Task("multiclass", tuple("0123")))}


def features_and_masks(seed: int = 0):
    """Image vectors [6, 5] (sample 2 absent) and audio tokens [6, 3, 4] (sample 4 absent,
    the last token of sample 0 padding)."""
    g = torch.Generator().manual_seed(seed)
    features = {"image": torch.randn(6, 5, generator=g), "audio": torch.randn(6, 3, 4, generator=g)}
    image = torch.ones(6, dtype=torch.bool)
    image[2] = False
    audio = torch.ones(6, 3, dtype=torch.bool)
    audio[4] = False
    audio[0, 2] = False
    return features, {"image": image, "audio": audio}


def losses(**settings) -> AuxiliaryLosses:
    torch.manual_seed(0)
    return AuxiliaryLosses({"image": 5, "audio": 4}, DIGITS, **settings)


def test_unimodal_losses_are_each_modalitys_head_on_the_samples_that_have_it():
    aux = losses(unimodal=0.5)
    features, masks = features_and_masks()
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    found = aux(features, masks, y)
    image_head, audio_head = aux.heads["image"]["digit"], aux.heads["audio"]["digit"]
    keep = [0, 1, 3, 4, 5]
    image = nn.functional.cross_entropy(
        image_head(features["image"][keep]), y[keep], reduction="sum"
    )
    tokens = [features["audio"][0, :2].mean(0)] + [
        features["audio"][i].mean(0) for i in (1, 2, 3, 5)
    ]
    audio = nn.functional.cross_entropy(
        audio_head(torch.stack(tokens)), y[[0, 1, 2, 3, 5]], reduction="sum"
    )
    assert set(found) == {"unimodal/image", "unimodal/audio"}
    torch.testing.assert_close(found["unimodal/image"], image)
    torch.testing.assert_close(found["unimodal/audio"], audio)
    assert aux.weights() == {"task": 1.0, "unimodal/image": 0.5, "unimodal/audio": 0.5}


def test_the_contrastive_loss_is_infonce_of_the_pairs_times_the_batch():
    aux = losses(contrastive=0.2, pairs=[["image", "audio"]], projection_dim=3)
    features, masks = features_and_masks()
    found = aux(features, masks, torch.zeros(6, dtype=torch.long))
    both = [0, 1, 3, 5]
    projections = aux.contrastive.projections
    audio = torch.stack(
        [features["audio"][0, :2].mean(0)] + [features["audio"][i].mean(0) for i in (1, 3, 5)]
    )
    expected = InfoNCE()(projections["image"](features["image"][both]), projections["audio"](audio))
    assert set(found) == {"contrastive/image_audio"}
    torch.testing.assert_close(found["contrastive/image_audio"], 6 * expected)
    assert aux.weights() == {"task": 1.0, "contrastive/image_audio": pytest.approx(0.2)}


def test_masked_positions_have_no_influence_and_every_parameter_trains():
    aux = losses(unimodal=1.0, contrastive=1.0, pairs=[["image", "audio"]])
    features, masks = features_and_masks()
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    clean = {k: v.detach() for k, v in aux(features, masks, y).items()}
    poisoned = {m: x.clone() for m, x in features.items()}
    poisoned["image"][2] = torch.nan
    poisoned["audio"][4] = torch.inf
    poisoned["audio"][0, 2] = torch.nan
    found = aux(poisoned, masks, y)
    for name, value in found.items():
        torch.testing.assert_close(value, clean[name], rtol=0, atol=0, msg=name)
    sum(found.values()).backward()
    for name, p in aux.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def model(seed: int = 0) -> MultimodalModel:
    torch.manual_seed(seed)
    encoders = {
        "image": Encoder(nn.Sequential(nn.Linear(5, 6), nn.ReLU()), input_shape=(5,)),
        "audio": Encoder(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), input_shape=(3,)),
    }
    return MultimodalModel.build(encoders, GatedFuser, ClassificationHead, 4)


def batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    present = {"image": torch.ones(8, dtype=torch.bool), "audio": torch.rand(8, generator=g) > 0.3}
    inputs = {"image": torch.randn(8, 5, generator=g), "audio": torch.randn(8, 3, generator=g)}
    return Batch(inputs, present, torch.randint(0, 4, (8,), generator=g))


def trained(seed: int = 0) -> AuxiliaryTraining:
    fused = model(seed)
    aux = AuxiliaryLosses(
        {"image": 6, "audio": 4}, DIGITS, unimodal=0.3, contrastive=0.1, pairs=[["image", "audio"]]
    )
    return AuxiliaryTraining(fused, aux)


def test_a_training_step_follows_the_task_loss_plus_the_weighted_auxiliary_losses():
    """One SGD step of lr 1 moves each parameter by minus the gradient of the mean over the
    batch of the task loss plus the weighted auxiliary losses; the metrics' loss is the
    task's, each auxiliary loss is scored per sample and each weight per step."""
    step = trained()
    reference = copy.deepcopy(step)
    data = batch()
    reference.train()
    outputs, terms = reference(data.inputs, data.present, targets=data.targets)
    task, _ = batch_loss(outputs, data.targets, DIGITS)
    losses = terms.losses
    hand = task + 0.3 * (losses["unimodal/image"] + losses["unimodal/audio"])
    hand = hand + 0.1 * losses["contrastive/image_audio"]
    (hand / len(data)).backward()
    optimizer = torch.optim.SGD(step.parameters(), lr=1.0)
    metrics = train_epoch(step, [data], optimizer, torch.device("cpu"), objectives=DIGITS)
    for (name, after), before in zip(step.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(after, before.detach() - before.grad, msg=name)
    assert metrics.loss == pytest.approx(float(task.detach()) / len(data))
    for name, value in losses.items():
        assert metrics.scores[f"aux/{name}"] == pytest.approx(float(value.detach()) / len(data))
    assert metrics.scores["aux/weight/unimodal/image"] == pytest.approx(0.3)
    assert metrics.scores["aux/weight/task"] == 1.0
    assert set(metrics.scores) == {
        "accuracy", "f1_macro", *(f"aux/{n}" for n in losses),
        *(f"aux/weight/{n}" for n in ("task", *losses)),
    }  # fmt: skip


def test_evaluation_and_checkpoints_are_the_wrapped_models():
    step = trained().eval()
    data = batch()
    outputs, terms = step(data.inputs, data.present, targets=data.targets)
    torch.testing.assert_close(outputs, step.model(data.inputs, data.present))
    torch.testing.assert_close(step(data.inputs, data.present), outputs)
    assert set(terms.losses) == {"unimodal/image", "unimodal/audio", "contrastive/image_audio"}
    assert not any(k.startswith("auxiliary") for k in step.model.state_dict())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"unimodal": -1.0}, "unimodal: expected a finite weight >= 0"),
        ({"unimodal": float("nan")}, "unimodal: expected a finite weight >= 0"),
        ({}, "every auxiliary weight is 0"),
        ({"contrastive": 0.1}, "pairs: a contrastive weight needs pairs"),
        ({"unimodal": 1.0, "pairs": [["image", "audio"]]}, "contrastive: pairs are given but"),
        ({"contrastive": 0.1, "pairs": [["image", "text"]]}, "no modality 'text'"),
    ],
)
def test_settings_that_cannot_work_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        losses(**settings)


def test_a_modality_the_model_lacks_is_refused():
    aux = AuxiliaryLosses({"image": 6, "depth": 4}, DIGITS, unimodal=1.0)
    with pytest.raises(ValueError, match=r"modalities \['depth'\] the model does not have"):
        AuxiliaryTraining(model(), aux)
