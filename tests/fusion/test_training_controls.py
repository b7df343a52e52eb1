"""How each optimizer step is taken (gradient accumulation, clipping) and which epoch is kept
(the monitored metric, its direction, early stopping)."""

import os

import pytest
import torch
from torch import nn

from fusion.batch import Batch
from fusion.data import Task
from fusion.encoders.base import Encoder
from fusion.fusers import GatedFuser
from fusion.heads import ClassificationHead
from fusion.model import MultimodalModel
from fusion.tasks import Objective, lower_is_better
from fusion.training import fit
from fusion.training.loop import train_epoch
from fusion.training.monitor import Monitor, check_monitor
from fusion.training.settings import worker_count
from tests.fusion.test_training import model_with_bn, separable_batches

CPU = torch.device("cpu")


def model_without_bn(dtype=torch.float64):
    """Batch norm sees each batch, so only a model without it trains alike on one batch of
    2B samples and on two accumulated batches of B."""
    torch.manual_seed(0)
    encoders = {
        "a": Encoder(nn.Sequential(nn.Linear(3, 8), nn.ReLU()), input_shape=(3,)),
        "b": Encoder(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), input_shape=(4,)),
    }
    model = MultimodalModel.build(encoders, GatedFuser, ClassificationHead, num_classes=3)
    return model.to(dtype)


def in_float64(batches):
    return [
        Batch({m: x.double() for m, x in b.inputs.items()}, b.present, b.targets) for b in batches
    ]


def merged(batches, size):
    """The same samples in batches of `size` of the given ones (the last may be smaller)."""
    out = []
    for i in range(0, len(batches), size):
        group = batches[i : i + size]
        out.append(
            Batch(
                {m: torch.cat([b.inputs[m] for b in group]) for m in group[0].inputs},
                {m: torch.cat([b.present[m] for b in group]) for m in group[0].present},
                torch.cat([b.targets for b in group]),
            )
        )
    return out


@pytest.mark.parametrize("n_batches", [4, 5])  # 5: the last optimizer step has one batch
def test_accumulated_batches_train_as_the_large_batch(n_batches):
    small = in_float64(separable_batches(n_batches, batch=16))
    trained = {}
    for name, batches, accumulate in (("small", small, 2), ("large", merged(small, 2), 1)):
        model = model_without_bn()
        fit(model, batches, small, epochs=2, lr=1e-2, weight_decay=0.01, device=CPU,
            accumulate=accumulate)  # fmt: skip
        trained[name] = model.state_dict()
    # float64: the sums differ only in their order, ~1e-16 relative; AdamW keeps that size
    for key, value in trained["large"].items():
        torch.testing.assert_close(trained["small"][key], value, rtol=1e-12, atol=1e-12)


def test_clipping_caps_the_step_at_the_norm():
    model = model_without_bn()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    batch = in_float64(separable_batches(1, batch=16))
    train_epoch(model, batch, optimizer, CPU, clip_grad_norm=0.01)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    # one SGD step of lr 1 moves the weights by the clipped gradient, of norm 0.01 up to
    # clip_grad_norm_'s 1e-6 added to the gradient norm (here > 0.1): relative error < 1e-5
    assert float((after - before).norm()) == pytest.approx(0.01, rel=1e-5)


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    history = []
    model = model_with_bn()
    result = fit(
        model, separable_batches(), separable_batches(2), epochs=10, lr=1e-2, weight_decay=0.0,
        device=CPU, on_epoch=lambda e, m: history.append(m),
        monitor=Monitor("val/accuracy", patience=2, min_delta=1.0),  # nothing improves by 1
    )  # fmt: skip
    assert (result.epochs_done, result.finished, result.stopped_early) == (3, True, True)
    assert [m["epoch"] for m in history] == [1, 2, 3]
    best = max(history, key=lambda m: m["val/accuracy"])  # the first of the best
    assert result.best == best


def test_a_loss_is_kept_at_its_lowest():
    history = []
    result = fit(
        model_with_bn(), separable_batches(), separable_batches(2), epochs=4, lr=5e-2,
        weight_decay=0.0, device=CPU, on_epoch=lambda e, m: history.append(m),
        monitor=Monitor("val/loss"),
    )  # fmt: skip
    lowest = min(history, key=lambda m: m["val/loss"])
    assert result.best == lowest and not result.stopped_early


def test_metric_directions_and_improvement_margins():
    assert lower_is_better("val/loss") and lower_is_better("val/same/loss")
    assert not lower_is_better("val/accuracy") and not lower_is_better("val/digit/accuracy")
    assert lower_is_better("val/mae") and lower_is_better("val/score/rmse")
    assert not lower_is_better("val/pearson") and not lower_is_better("val/map")
    loss, accuracy = Monitor("val/loss"), Monitor("val/accuracy")
    assert loss.better(0.5, 0.6) and not loss.better(0.6, 0.5) and loss.better(1.0, None)
    assert accuracy.better(0.6, 0.5) and not accuracy.better(0.5, 0.5)
    assert not accuracy.better(0.55, 0.5, margin=0.1) and loss.better(0.3, 0.5, margin=0.1)


def classes(*names):
    return {name: Objective(Task("multiclass", ("a", "b", "c"))) for name in names}


@pytest.mark.parametrize(
    ("metric", "objectives", "message"),
    [
        ("val/acc", classes("digit"), "expected one of ['val/loss', 'val/accuracy', 'val/f1_macro'], got 'val/acc'; did you mean ['val/accuracy', 'val/f1_macro', 'val/loss']?"),
        ("val/digit/accuracy", classes("digit"), "expected one of ['val/loss', 'val/accuracy', 'val/f1_macro'], got 'val/digit/accuracy'; did you mean ['val/accuracy']?"),
        ("val/spoken/accuracy", classes("written", "same"), "expected one of ['val/loss', 'val/accuracy', 'val/written/accuracy', 'val/written/f1_macro', 'val/same/accuracy', 'val/same/f1_macro'], got 'val/spoken/accuracy'; did you mean ['val/same/accuracy', 'val/accuracy', 'val/written/accuracy']?"),
        ("val/accuracy", {"score": Objective(Task("regression"))}, "expected one of ['val/loss', 'val/mae', 'val/rmse', 'val/pearson', 'val/spearman'], got 'val/accuracy'; did you mean ['val/spearman', 'val/mae', 'val/pearson']?"),
    ],
)  # fmt: skip
def test_a_metric_no_epoch_computes_is_refused_with_close_matches(metric, objectives, message):
    with pytest.raises(ValueError) as err:
        check_monitor(metric, objectives)
    assert str(err.value) == message
    check_monitor("val/loss", objectives)


def test_bad_settings_are_refused_by_the_loop():
    with pytest.raises(ValueError, match=r"^accumulate must be >= 1, got 0$"):
        fit(model_with_bn(), [], [], epochs=1, lr=1e-3, weight_decay=0.0, device=CPU,
            accumulate=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"^patience must be None or >= 1, got 0$"):
        Monitor(patience=0)


@pytest.mark.parametrize(
    "cuda, cores, local, expected",
    [
        (False, 16, None, 0),  # CPU: the training process uses every core
        (True, 16, None, 8),  # one process: 15 spare cores, at most 8 workers
        (True, 16, "4", 3),  # torchrun, 4 processes: 4 cores each, one for training
        (True, 2, None, 1),
        (True, 1, None, 0),
    ],
)
def test_num_workers_null_chooses_from_the_cores_when_there_is_a_gpu(
    monkeypatch, cuda, cores, local, expected
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cores)))
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert worker_count(None) == expected
    assert worker_count(3) == 3  # a number is taken as it is


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # torch's own, per loader
def test_loader_settings_that_cannot_work_here_are_said(monkeypatch, caplog):
    from fusion.training.loaders import loader_warnings, make_loader
    from fusion.training.settings import TrainerConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    trainer = TrainerConfig(num_workers=3, pin_memory=True)
    with caplog.at_level("WARNING", logger="fusion"):
        loader_warnings(trainer)
    assert caplog.messages == [
        "trainer.pin_memory=true: there is no CUDA device to pin memory for; ignored",
        "trainer.num_workers=3: more loader processes than the 2 cores this process may use; "
        "they share those cores, so beyond that count they mostly cost memory and start-up "
        "time (every epoch, without trainer.persistent_workers)",
    ]
    assert not make_loader(list(range(4)), "val", trainer, 0, collate_fn=list).pin_memory
