"""Shapley values of modalities, against games and models whose values are known by hand."""

import itertools
import math

import pytest
import torch
from torch import nn

from fusion.analysis.contributions import (
    MAX_MODALITIES,
    coalitions,
    contributions,
    contributions_table,
    plot_contributions,
    shapley_values,
)
from fusion.analysis.robustness import robustness
from fusion.batch import Batch
from fusion.data import Task
from fusion.encoders.base import Encoder
from fusion.fusers import ConcatFuser
from fusion.heads import ClassificationHead
from fusion.model import MultimodalModel
from fusion.tasks import Objective
from tests.fusion.test_interaction import evaluator_on


def game(values: dict[str, float]) -> dict[frozenset[str], float]:
    """A game from {"": v(none), "a": v(a), "ab": v(ab), ...} (one letter per modality)."""
    return {frozenset(k): v for k, v in values.items()}


def test_two_modalities_follow_the_closed_form():
    v = game({"": 0.1, "a": 0.5, "b": 0.3, "ab": 0.9})
    phi = shapley_values(v, ["a", "b"])
    assert phi["a"] == pytest.approx(0.5 * ((0.5 - 0.1) + (0.9 - 0.3)))  # 0.5
    assert phi["b"] == pytest.approx(0.5 * ((0.3 - 0.1) + (0.9 - 0.5)))  # 0.3
    assert phi == pytest.approx({"a": 0.5, "b": 0.3})


def test_efficiency_symmetry_and_a_dummy_on_five_modalities():
    """v depends on how many of a, b a coalition holds (a and b are alike) and on c, d;
    e changes nothing (a dummy)."""
    generator = torch.Generator().manual_seed(0)
    table = torch.rand(3, 2, 2, generator=generator).tolist()
    players = ["a", "b", "c", "d", "e"]
    v = {
        frozenset(s): table[len({"a", "b"} & set(s))][int("c" in s)][int("d" in s)]
        for s in coalitions(players)
    }
    phi = shapley_values(v, players)
    assert sum(phi.values()) == pytest.approx(v[frozenset(players)] - v[frozenset()], abs=1e-12)
    assert phi["a"] == pytest.approx(phi["b"], abs=1e-12)
    assert phi["e"] == pytest.approx(0.0, abs=1e-12)
    assert len(coalitions(players)) == 32 and coalitions(["a", "b"]) == [
        (),
        ("a",),
        ("b",),
        ("a", "b"),
    ]


def test_more_than_five_modalities_are_refused():
    players = [f"m{i}" for i in range(MAX_MODALITIES + 1)]
    v = {frozenset(s): 0.0 for r in range(7) for s in itertools.combinations(players, r)}
    with pytest.raises(ValueError) as caught:
        shapley_values(v, players)
    assert str(caught.value) == (
        "exact Shapley values score all 2^M coalitions of the M modalities; 6 modalities "
        "(m0, m1, m2, m3, m4, m5) would take 64, and at most 5 modalities (32 coalitions) "
        "are supported"
    )
    encoders = {m: Encoder(nn.Identity(), input_shape=(1,)) for m in players}
    six = MultimodalModel.build(encoders, fuser=ConcatFuser, head=ClassificationHead, num_classes=2)
    with pytest.raises(ValueError, match=r"^exact Shapley values .* 6 modalities \(m0, m1"):
        contributions(evaluator_on(six, []))  # refused before the split is read
    with pytest.raises(ValueError, match=r"the game has no value for the coalitions \[\{'a'\}\]"):
        shapley_values(game({"": 0.0, "b": 1.0, "ab": 1.0}), ["a", "b"])


def linear_model(weights, bias=None, num_classes=2) -> MultimodalModel:
    """Identity encoders of scalar modalities a and b, concatenation and a linear head with
    the given weights ([classes, 2]): logit c = w_ca a + w_cb b + bias_c (task 'same')."""
    encoders = {m: Encoder(nn.Identity(), input_shape=(1,)) for m in ("a", "b")}
    model = MultimodalModel.build(
        encoders,
        fuser=lambda in_dims: ConcatFuser(in_dims),
        head=ClassificationHead,
        num_classes=num_classes,
    )
    with torch.no_grad():
        model.head.mlp[0].weight.copy_(torch.tensor(weights))
        model.head.mlp[0].bias.copy_(torch.tensor(bias or [0.0] * num_classes))
    return model


def batch_of(labels, a, b) -> Batch:
    return Batch(
        inputs={"a": torch.tensor(a)[:, None], "b": torch.tensor(b)[:, None]},
        present={m: torch.ones(len(a), dtype=torch.bool) for m in ("a", "b")},
        targets=torch.tensor(labels),
    )


# Logits [0, a + b]: 'yes' when a + b > 0, and 'no' (the first class wins a tie) with
# nothing present. Correct predictions: a alone 3/5, b alone 4/5, both 4/5, none 2/5.
HAND = dict(labels=[1, 1, 1, 0, 0], a=[2.0, 1.0, -1.0, -1.0, 1.0], b=[1.0, -2.0, 3.0, -1.0, -3.0])


def test_two_modalities_of_a_hand_built_model():
    evaluator = evaluator_on(linear_model([[0.0, 0.0], [1.0, 1.0]]), [batch_of(**HAND)])
    report = contributions(evaluator)
    # torchmetrics computes in float32: 0.4 is 0.4000000059604645
    empty = report["coalitions"][0]
    assert empty["present"] == [] and (empty["score"], empty["loss"]) == pytest.approx(
        (0.4, math.log(2))
    )
    assert (report["all"], report["empty"]) == pytest.approx((0.8, 0.4))
    assert report["only"] == pytest.approx({"a": 0.6, "b": 0.8})
    assert report["dropped"] == pytest.approx({"a": 0.8, "b": 0.6})
    # 1/2 [(v(a) - v()) + (v(ab) - v(b))] = 1/2 [0.2 + 0], and for b 1/2 [0.4 + 0.2]
    assert report["shapley"] == pytest.approx({"a": 0.1, "b": 0.3})
    loss = {tuple(c["present"]): -c["loss"] for c in report["coalitions"]}
    assert report["shapley_loss"]["a"] == pytest.approx(
        0.5 * ((loss[("a",)] - loss[()]) + (loss[("a", "b")] - loss[("b",)]))
    )
    assert sum(report["shapley_loss"].values()) == pytest.approx(loss[("a", "b")] - loss[()])
    classes = report["classes"]["same"]
    # yes (3 samples): recall 2/3 with a, b or both, 0 with none; no (2): 1/2 with a alone
    assert classes["yes"]["samples"] == 3 and classes["no"]["samples"] == 2
    assert classes["yes"]["shapley"] == pytest.approx({"a": 1 / 3, "b": 1 / 3})
    assert classes["no"]["shapley"] == pytest.approx({"a": -1 / 4, "b": 1 / 4})
    for m in ("a", "b"):  # accuracy is the classes' recalls weighted by their shares
        weighted = 3 / 5 * classes["yes"]["shapley"][m] + 2 / 5 * classes["no"]["shapley"][m]
        assert weighted == pytest.approx(report["shapley"][m])
    assert report["value"] == "accuracy" and report["samples"] == 5


def test_an_ignored_modality_gets_exactly_zero():
    """The head's weights on b are 0: b changes no output, in any coalition."""
    model = linear_model([[0.5, 0.0], [-1.0, 0.0]], bias=[0.1, -0.2])
    batch = batch_of([0, 1, 1, 0, 1, 0], *torch.randn(2, 6).tolist())
    report = contributions(evaluator_on(model, [batch]))
    assert report["shapley"]["b"] == 0.0 and report["shapley_loss"]["b"] == 0.0
    assert report["shapley"]["a"] == report["all"] - report["empty"]  # efficiency
    assert all(
        e["shapley"] is None or e["shapley"]["b"] == 0.0 for e in report["classes"]["same"].values()
    )


def test_symmetric_modalities_get_equal_values():
    """The same input in both modalities, the same weights: a and b are interchangeable."""
    x = torch.randn(8).tolist()
    model = linear_model([[0.3, 0.3], [-0.7, -0.7]], bias=[0.05, 0.0])
    report = contributions(evaluator_on(model, [batch_of([0, 1, 1, 0, 0, 1, 1, 0], x, x)]))
    assert report["only"]["a"] == report["only"]["b"]
    assert report["shapley"]["a"] == report["shapley"]["b"]
    assert report["shapley_loss"]["a"] == report["shapley_loss"]["b"]
    assert sum(report["shapley"].values()) == pytest.approx(report["all"] - report["empty"])


def test_a_lower_is_better_score_counts_its_decrease():
    """Regression y = a + b, scored by MAE: none 2.5, a alone 2.0, b alone 1.5, both 0; so
    v = -MAE gives a 1/2 [(-2 + 2.5) + (0 + 1.5)] = 1 and b 1/2 [(-1.5 + 2.5) + (0 + 2)] = 1.5."""
    model = linear_model([[1.0, 1.0]], num_classes=1)
    batch = Batch(
        inputs={"a": torch.tensor([[1.0], [-2.0]]), "b": torch.tensor([[3.0], [1.0]])},
        present={m: torch.ones(2, dtype=torch.bool) for m in ("a", "b")},
        targets=torch.tensor([4.0, -1.0]),
    )
    mae = {"sum": Objective(Task("regression"), metrics=("mae",))}
    report = contributions(evaluator_on(model, [batch], mae))
    assert (report["metric"], report["lower_is_better"], report["value"]) == ("mae", True, "-mae")
    assert (report["all"], report["empty"]) == (0.0, 2.5)
    assert report["only"] == {"a": 2.0, "b": 1.5}
    assert report["shapley"] == pytest.approx({"a": 1.0, "b": 1.5})
    assert report["classes"] == {}
    assert "mae is lower-is-better, so a modality's value is how much it lowers it" in (
        contributions_table(report)
    )


def test_dropped_and_all_are_the_evaluation_and_robustness_scores():
    model = MultimodalModel.build(
        {
            "image": Encoder(nn.Linear(4, 3), input_shape=(4,)),
            "audio": Encoder(nn.Linear(2, 3), input_shape=(2,)),
        },
        fuser=ConcatFuser,
        head=lambda in_dim, num_classes: ClassificationHead(in_dim, num_classes, hidden=[5]),
        num_classes=3,
    )
    batches = [
        Batch(
            inputs={"image": torch.randn(n, 4), "audio": torch.randn(n, 2)},
            present={"image": torch.ones(n, dtype=torch.bool), "audio": torch.rand(n) > 0.3},
            targets=torch.randint(0, 3, (n,)),
        )
        for n in (6, 4)
    ]
    objectives = {"digit": Objective(Task("multiclass", ("0", "1", "2")))}
    evaluator = evaluator_on(model, batches, objectives)
    report = contributions(evaluator)
    dropped = robustness(evaluator, [0.0])
    assert report["all"] == dropped["clean"] == evaluator().accuracy
    assert report["dropped"] == {m: e["dropped"] for m, e in dropped["modalities"].items()}
    assert report["samples"] == 10 and list(report["classes"]["digit"]) == ["0", "1", "2"]


def test_a_head_that_cannot_take_nothing_present_is_named():
    class LogHead(nn.Module):
        in_dim = 2

        def forward(self, fused, condition=None):
            return torch.log(fused.abs())  # -inf where every feature is 0

    encoders = {m: Encoder(nn.Identity(), input_shape=(1,)) for m in ("a", "b")}
    model = MultimodalModel(encoders, ConcatFuser({"a": 1, "b": 1}), LogHead())
    batch = batch_of([0, 1], [1.0, 2.0], [3.0, 4.0])
    with pytest.raises(ValueError) as caught:
        contributions(evaluator_on(model, [batch]))
    assert str(caught.value).startswith(
        "with no modality present, ConcatFuser and LogHead give a non-finite loss (nan"
    )


def test_the_table_and_plot_show_every_modality_and_class(tmp_path):
    evaluator = evaluator_on(linear_model([[0.0, 0.0], [1.0, 1.0]]), [batch_of(**HAND)])
    report = contributions(evaluator)
    table = contributions_table(report)
    assert "| a | +10.00 pp |" in table and "| b | +30.00 pp |" in table
    assert "| a | +10.00 pp | " + f"{report['shapley_loss']['a']:+.4f} | 60.00% | 80.00% |" in table
    assert (
        "all modalities 80.00%, none 40.00%; the Shapley values (Shapley 1953) add up to the difference, +40.00 pp"
        in table
    )
    assert "| yes | 3 | 66.67% | 0.00% | +33.33 pp | +33.33 pp |" in table
    assert "| no | 2 | 100.00% | 100.00% | -25.00 pp | +25.00 pp |" in table
    plot_contributions(report, tmp_path / "contributions.png")
    assert (tmp_path / "contributions.png").read_bytes()[:4] == b"\x89PNG"
