"""Task kinds: each kind's loss against its formula, metrics over a whole split, settings."""

import math

import pytest
import torch
from torch import nn

from fusion.batch import Batch
from fusion.data import Task
from fusion.tasks import (
    DEFAULT_METRICS,
    Objective,
    format_score,
    lower_is_better,
    main_metric,
    metric_names,
    objectives_for,
)
from fusion.training.loop import batch_loss, evaluate, fit

CPU = torch.device("cpu")
DIGITS = Task("multiclass", tuple("0123456789"))
YES_NO = Task("binary", ("no", "yes"))
LABELS = Task("multilabel", ("a", "b", "c"))
SCORE = Task("regression")


def test_cross_entropy_with_label_smoothing_and_class_weights_follows_its_formula():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    y = torch.tensor([0, 2])
    task = Task("multiclass", ("a", "b", "c"))
    log_p = logits.log_softmax(dim=1)
    plain = -(log_p[0, 0] + log_p[1, 2])
    assert Objective(task).loss_sum(logits, y) == pytest.approx(float(plain))
    # smoothing 0.3: the target is 0.7 on the class and 0.1 on each of the 3 classes
    smooth = -sum(0.7 * log_p[i, c] + 0.1 * log_p[i].sum() for i, c in enumerate((0, 2)))
    smoothed = Objective(task, label_smoothing=0.3).loss_sum(logits, y)
    assert smoothed == pytest.approx(float(smooth))
    weighted = Objective(task, class_weights=(2.0, 1.0, 0.5)).loss_sum(logits, y)
    assert weighted == pytest.approx(float(-(2.0 * log_p[0, 0] + 0.5 * log_p[1, 2])))


def test_a_binary_tasks_pos_weight_is_binary_cross_entropy_on_the_logit_difference():
    logits = torch.tensor([[0.3, 1.2], [1.0, -0.5], [0.0, 0.4]])
    y = torch.tensor([1, 0, 1])
    bce = nn.functional.binary_cross_entropy_with_logits(
        logits[:, 1] - logits[:, 0], y.float(), pos_weight=torch.tensor(3.0), reduction="sum"
    )
    assert Objective(YES_NO, pos_weight=3).loss_sum(logits, y) == pytest.approx(float(bce))


def test_multilabel_and_regression_losses_are_the_mean_over_a_samples_outputs():
    logits = torch.tensor([[1.0, -1.0, 0.0], [2.0, 0.5, -3.0]])
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    p = logits.sigmoid()
    per_label = -(y * p.log() * torch.tensor([2.0, 1.0, 1.0]) + (1 - y) * (1 - p).log())
    got = Objective(LABELS, pos_weight=[2.0, 1.0, 1.0]).loss_sum(logits, y)
    assert got == pytest.approx(float(per_label.mean(dim=1).sum()), rel=1e-6)

    pred, target = torch.tensor([[1.0], [4.0]]), torch.tensor([[2.0], [1.0]])
    assert Objective(SCORE).loss_sum(pred, target) == pytest.approx(1.0 + 9.0)
    assert Objective(SCORE, loss="l1").loss_sum(pred, target) == pytest.approx(1.0 + 3.0)
    # huber with delta 2: 0.5 * 1^2 for the small error, 2 * (3 - 0.5 * 2) for the large one
    huber = Objective(SCORE, loss="huber", huber_delta=2.0).loss_sum(pred, target)
    assert huber == pytest.approx(0.5 + 4.0)


def batch(x, y):
    return Batch({"x": x}, {"x": torch.ones(len(x), dtype=torch.bool)}, y, None)


def run_metrics(task, outputs, targets, batch_size=2, **settings):
    """The metrics of `outputs` against `targets` through the loop's evaluate, in batches."""
    objective = Objective(task, **settings)

    class Fixed(nn.Module):
        def forward(self, inputs, present, condition=None):
            return inputs["x"]

    batches = [batch(outputs[i : i + batch_size], targets[i : i + batch_size])
               for i in range(0, len(outputs), batch_size)]  # fmt: skip
    return evaluate(Fixed(), batches, CPU, objectives={"t": objective})


def test_regression_metrics_are_computed_over_the_whole_split_not_per_batch():
    pred = torch.tensor([[0.5], [2.0], [-1.0], [3.5]])
    target = torch.tensor([0.0, 2.5, -2.0, 3.0])
    result = run_metrics(SCORE, pred, target, metrics=["mae", "rmse", "pearson", "acc2", "acc7"])
    errors = (pred[:, 0] - target).abs()
    assert result.scores["mae"] == pytest.approx(float(errors.mean()))
    assert result.scores["rmse"] == pytest.approx(math.sqrt(float((errors**2).mean())))
    whole = torch.corrcoef(torch.stack([pred[:, 0], target]))[0, 1]
    assert result.scores["pearson"] == pytest.approx(float(whole), rel=1e-5)  # not per batch
    assert result.scores["acc2"] == 1.0  # every sign agrees (0.0 counts as non-negative)
    # rounded and clipped: 0.5 -> 0 (round half to even) vs 0, 2 vs 2 (2.5 -> 2), -1 vs -2, 3 vs 3
    assert result.scores["acc7"] == 0.75
    assert result.main == "mae" and result.score() == result.scores["mae"]
    assert result.loss == pytest.approx(float(((pred[:, 0] - target) ** 2).mean()))


def test_classification_metrics_match_their_definitions():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 0, 1, 1])
    result = run_metrics(YES_NO, logits, y)
    # predicted [0, 1, 0, 1]: two right; precision 1/2, recall 1/2 -> F1 0.5;
    # P(yes) = [0.12, 0.73, 0.27, 0.95]: of the 4 (positive, negative) pairs, 3 are ordered
    assert result.scores == pytest.approx({"accuracy": 0.5, "f1": 0.5, "auroc": 0.75})

    probs = torch.tensor([[3.0, -3.0, 3.0], [3.0, 3.0, -3.0], [-3.0, -3.0, -3.0]])
    labels = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 0, 1]])
    result = run_metrics(LABELS, probs, labels, batch_size=1)
    # per label (tp, fp, fn): a (2, 0, 0), b (0, 1, 0), c (1, 0, 1)
    assert result.scores["f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert result.scores["f1_macro"] == pytest.approx((1.0 + 0.0 + 2 / 3) / 3)


def test_each_kind_has_its_default_loss_metrics_and_direction():
    for task in (DIGITS, YES_NO, LABELS, SCORE):
        objective = Objective(task)
        assert objective.metrics == DEFAULT_METRICS[task.kind]
    assert Objective(SCORE).loss == "mse" and Objective(LABELS).loss == "bce"
    assert [lower_is_better(f"val/{m}") for m in ("mae", "rmse", "pearson", "map", "loss")] == [
        True, True, False, False, True,
    ]  # fmt: skip
    assert format_score("accuracy", 0.5) == "50.00%" and format_score("mae", 0.5) == "0.5000"


def test_a_task_declares_the_metrics_its_field_reports():
    affect = Task("regression", metrics=("mae", "pearson", "acc2", "acc2_f1", "acc7"))
    assert objectives_for({"sentiment": affect})["sentiment"].main_metric == "mae"
    chosen = objectives_for({"sentiment": affect}, {"sentiment": {"metrics": ["acc7"]}})
    assert chosen["sentiment"].metrics == ("acc7",)


def test_main_metric_of_several_tasks():
    mixed = objectives_for({"written": DIGITS, "sum": SCORE})
    assert main_metric(mixed) == "loss"
    assert metric_names(mixed) == [
        "written/accuracy", "written/f1_macro", "sum/mae", "sum/rmse", "sum/pearson",
        "sum/spearman",
    ]  # fmt: skip
    classes = objectives_for({"written": DIGITS, "same": YES_NO})
    assert main_metric(classes) == "accuracy" and metric_names(classes)[0] == "accuracy"


@pytest.mark.parametrize(
    ("task", "settings", "message"),
    [
        (SCORE, {"label_smoothing": 0.1}, "tasks.t.label_smoothing: applies to cross-entropy losses; this regression task trains with mse"),
        (DIGITS, {"label_smoothing": 1.0}, "tasks.t.label_smoothing: expected a number in [0, 1), got 1.0"),
        (DIGITS, {"class_weights": [1.0, 2.0]}, "tasks.t.class_weights: expected 10 numbers, one per class ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9'], got 2: [1.0, 2.0]"),
        (YES_NO, {"class_weights": [0.0, 0.0]}, "tasks.t.class_weights: every weight is 0, so nothing would be learned"),
        (YES_NO, {"pos_weight": "high"}, "tasks.t.pos_weight: expected a finite number, got 'high'"),
        (LABELS, {"pos_weight": [1.0, -2.0, 1.0]}, "tasks.t.pos_weight[1]: expected a number >= 0.0, got -2.0"),
        (DIGITS, {"pos_weight": 2.0}, "tasks.t.pos_weight: applies to binary and multilabel losses; this multiclass task trains with cross_entropy"),
        (SCORE, {"loss": "bce"}, "tasks.t.loss: a regression task trains with one of ['mse', 'l1', 'huber'], got 'bce'"),
        (SCORE, {"huber_delta": 2.0}, "tasks.t.huber_delta: applies to the huber losses; this regression task trains with mse"),
        (SCORE, {"metrics": ["accuracy"]}, "tasks.t.metrics: a regression task is scored by ['mae', 'rmse', 'pearson', 'spearman', 'acc2', 'acc2_f1', 'acc7'], got 'accuracy'; did you mean ['acc7', 'acc2']?"),
        (LABELS, {"metrics": ["f1_mcro"]}, "tasks.t.metrics: a multilabel task is scored by ['accuracy', 'f1_macro', 'f1_micro', 'map'], got 'f1_mcro'; did you mean ['f1_micro', 'f1_macro']?"),
        (DIGITS, {"weight": 2.0}, "tasks.t.weight: no such setting; expected ('loss', 'label_smoothing', 'class_weights', 'pos_weight', 'huber_delta', 'metrics'); did you mean ['pos_weight', 'class_weights']?"),
    ],
)  # fmt: skip
def test_settings_that_do_not_fit_the_task_are_named(task, settings, message):
    with pytest.raises(ValueError) as err:
        objectives_for({"t": task}, {"t": settings})
    assert str(err.value) == message


def test_settings_for_a_task_the_data_lacks_are_named_with_close_matches():
    with pytest.raises(ValueError) as err:
        objectives_for({"written": DIGITS, "sum": SCORE}, {"wrtten": {"label_smoothing": 0.1}})
    assert str(err.value) == (
        "tasks.wrtten: the data has no task 'wrtten'; its tasks are ['written', 'sum']; "
        "did you mean ['written']?"
    )


def test_targets_that_cannot_be_the_tasks_are_named():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError) as err:
        batch_loss(logits, torch.tensor([[1, 0], [0, 1]]), {"t": Objective(LABELS)})
    assert str(err.value) == (
        "'label': a multilabel task with 3 outputs takes 0/1 values, one per label, shaped "
        "[2, 3]; got [2, 2]"
    )
    with pytest.raises(ValueError, match=r"^'label': multilabel targets are 0 or 1, found \[2\]$"):
        batch_loss(logits, torch.tensor([[1, 0, 2], [0, 1, 0]]), {"t": Objective(LABELS)})
    with pytest.raises(ValueError) as err:
        batch_loss(
            {"sum": torch.zeros(2, 1)}, {"sum": torch.zeros(2, 2)}, {"sum": Objective(SCORE)}
        )
    assert str(err.value) == (
        "'label.sum': a regression task with 1 outputs takes targets per sample, shaped [2, 1]; "
        "got [2, 2]"
    )


def test_a_regression_keeps_the_epoch_with_the_lowest_validation_error():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(64)

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 1)

        def forward(self, inputs, present, condition=None):
            return self.layer(inputs["x"])

    def batches(lo, hi):
        return [batch(x[i : i + 8], y[i : i + 8]) for i in range(lo, hi, 8)]

    history = []
    model = Linear()
    result = fit(
        model, batches(0, 48), batches(48, 64), epochs=6, lr=0.1, weight_decay=0.0,
        device=CPU, objectives={"y": Objective(SCORE)},
        on_epoch=lambda e, m: history.append(m),
    )  # fmt: skip
    maes = [m["val/mae"] for m in history]
    assert result.best["val/mae"] == min(maes) and maes[-1] < maes[0] / 2
    assert set(history[0]) >= {"train/mae", "val/rmse", "val/pearson", "val/spearman"}


def test_a_standardized_regression_learns_scaled_targets_and_scores_in_their_units():
    """With a center and scale, the loss is on (y - center) / scale and the metrics on the
    predictions mapped back: an output of 0 predicts the center."""
    task = Task("regression", ("y",), target_center=(1000.0,), target_scale=(400.0,))
    objective = Objective(task)
    outputs = torch.tensor([[0.0], [1.0], [-0.5]])
    y = torch.tensor([1000.0, 1800.0, 600.0])
    scaled = objective.targets(outputs, y, "label")
    torch.testing.assert_close(scaled, torch.tensor([[0.0], [2.0], [-1.0]]))
    assert float(objective.loss_sum(outputs, scaled)) == pytest.approx(0 + 1 + 0.25)
    torch.testing.assert_close(
        objective.predictions(outputs), torch.tensor([1000.0, 1400.0, 800.0])
    )
    torch.testing.assert_close(objective.metric_targets(scaled), y)
    mae = objective.build_metrics()["mae"]
    mae.update(objective.predictions(outputs), objective.metric_targets(scaled))
    assert float(mae.compute()) == pytest.approx((0 + 400 + 200) / 3)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kind": "multiclass", "classes": ("a", "b"), "target_scale": (1.0,)}, "target_scale: a regression task's"),
        ({"kind": "regression", "target_scale": (0.0,)}, r"target_scale: expected finite numbers \(scales > 0\)"),
        ({"kind": "regression", "target_center": (1.0, 2.0)}, "one number per target \\(1\\)"),
    ],
)  # fmt: skip
def test_target_scales_that_cannot_work_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        Task(**settings)
