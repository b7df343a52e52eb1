"""EMAP (Hessel & Lee 2020) against models whose projection is known by hand."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from fusion.analysis.interaction import (
    SplitFeatures,
    emap,
    emap_table,
    encode_split,
    plot_emap,
    project,
    score,
)
from fusion.analysis.robustness import Evaluator
from fusion.batch import Batch
from fusion.data import Task
from fusion.encoders.base import Encoder
from fusion.fusers import ConcatFuser, Fuser
from fusion.heads import ClassificationHead
from fusion.model import MultimodalModel
from fusion.tasks import Objective

YES_NO = {"same": Objective(Task("multiclass", ("no", "yes")))}


class Product(Fuser):
    """The product of the modalities' (scalar) features: a pure cross-modal interaction;
    with `plus`, that last modality is added instead of multiplied."""

    def __init__(self, in_dims, plus: str | None = None) -> None:
        super().__init__(in_dims)
        self.plus = plus
        self.out_dim = 1

    def forward(self, features, present=None):
        xs, _ = self.vectors(features, present)
        named = dict(zip(self.modalities, xs, strict=True))
        added = named.pop(self.plus) if self.plus else 0.0
        return torch.stack(list(named.values())).prod(dim=0) + added


class YesLogit(nn.Module):
    """Logits [0, s] from a fused scalar s, times (1 + condition) when one is given."""

    in_dim = 1

    def forward(self, fused, condition=None):
        s = fused[:, :1] * (1 if condition is None else 1 + condition[:, None])
        return torch.cat([torch.zeros_like(s), s], dim=1)


def scalar_model(fuser, modalities=("a", "b")) -> MultimodalModel:
    encoders = {m: Encoder(nn.Identity(), input_shape=(1,)) for m in modalities}
    return MultimodalModel(encoders, fuser({m: 1 for m in modalities}), YesLogit())


def evaluator_on(model, batches, objectives=YES_NO, seed=0) -> Evaluator:
    """An evaluator of `model` on a 'test' split made of `batches`."""
    loaders = {"train": DataLoader([], generator=torch.Generator()), "test": batches}
    return Evaluator(model, loaders, "test", seed, torch.device("cpu"), "32", objectives)


def scalar_batch(labels, condition=None, present=None, **values) -> Batch:
    return Batch(
        inputs={m: torch.tensor(v, dtype=torch.float32)[:, None] for m, v in values.items()},
        present=present or {m: torch.ones(len(v), dtype=torch.bool) for m, v in values.items()},
        targets=torch.tensor(labels),
        condition=None if condition is None else torch.tensor(condition),
    )


def test_an_additive_model_is_its_own_projection():
    """Concatenation and a linear head: f = g(image) + h(audio), so EMAP changes nothing."""
    encoders = {
        "image": Encoder(nn.Linear(4, 3), input_shape=(4,)),
        "audio": Encoder(nn.Linear(2, 5), input_shape=(2,)),
    }
    model = MultimodalModel.build(
        encoders, fuser=ConcatFuser, head=ClassificationHead, num_classes=3
    )
    classes = {"digit": Objective(Task("multiclass", ("0", "1", "2")))}
    batches = [
        Batch(
            inputs={"image": torch.randn(n, 4), "audio": torch.randn(n, 2)},
            present={m: torch.ones(n, dtype=torch.bool) for m in ("image", "audio")},
            targets=torch.randint(0, 3, (n,)),
        )
        for n in (5, 3)
    ]
    evaluator = evaluator_on(model, batches, classes)
    found = project(evaluator, chunk_size=7)  # chunks that straddle rows of the grid
    assert found.outputs.shape == (8, 3) and found.evaluations == 64
    assert torch.allclose(found.projected, found.outputs, atol=1e-6)
    report = emap(evaluator)
    assert report["gap"] == pytest.approx({"loss": 0, "accuracy": 0, "f1_macro": 0}, abs=1e-6)
    assert report["residual_rms"] < 1e-6 and report["residual_ratio"] < 1e-10
    whole = evaluator()  # the model scored batch by batch, as experiments.evaluate does
    assert report["model"]["accuracy"] == whole.accuracy
    assert report["model"]["loss"] == pytest.approx(whole.loss, rel=1e-6)


def test_a_product_of_two_modalities_projects_to_the_hand_computed_logits():
    """f = [0, a * b]; with mean a = 2 and mean b = 2/3 the projection is
    a_i * 2/3 + 2 * b_i - 4/3."""
    batch = scalar_batch([1, 0, 1], a=[1.0, 2.0, 3.0], b=[1.0, -1.0, 2.0])
    found = project(evaluator_on(scalar_model(Product), [batch]))
    assert found.outputs[:, 1].tolist() == [1.0, -2.0, 6.0]
    by_hand = [1 * 2 / 3 + 2 * 1 - 4 / 3, 2 * 2 / 3 + 2 * -1 - 4 / 3, 3 * 2 / 3 + 2 * 2 - 4 / 3]
    assert found.projected[:, 1].tolist() == pytest.approx(by_hand, abs=1e-12)  # 4/3, -2, 14/3
    assert found.projected[:, 0].tolist() == [0.0, 0.0, 0.0]
    assert found.evaluations == 9 and found.left_out == 0 and not found.subsampled


def test_xor_has_a_large_gap():
    """On the four sign pairs the product is all interaction: its projection is 0 for
    every sample, so the projection predicts 'no' throughout (half right)."""
    batch = scalar_batch([1, 0, 0, 1], a=[1.0, 1.0, -1.0, -1.0], b=[1.0, -1.0, 1.0, -1.0])
    report = emap(evaluator_on(scalar_model(Product), [batch]))
    assert report["model"]["accuracy"] == 1.0 and report["emap"]["accuracy"] == 0.5
    assert report["gap"]["accuracy"] == 0.5
    model_loss = torch.log1p(torch.exp(torch.tensor(-1.0))).item()  # logit 1 for the right class
    assert report["model"]["loss"] == pytest.approx(model_loss, rel=1e-6)
    assert report["emap"]["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    assert report["gap"]["loss"] == pytest.approx(0.6931472 - model_loss, rel=1e-5)
    assert report["residual_ratio"] == 1.0  # nothing additive is left
    assert report["metric"] == "accuracy" and report["lower_is_better"] is False


def test_three_modalities_project_by_the_anova_terms():
    """f = a * b + c: the projection is a * mean(b) + mean(a) * b - mean(a) mean(b) + c."""
    batch = scalar_batch([1, 0, 1], a=[1.0, 2.0, 3.0], b=[1.0, -1.0, 2.0], c=[0.5, 0.0, -1.0])
    model = scalar_model(lambda in_dims: Product(in_dims, plus="c"), ("a", "b", "c"))
    found = project(evaluator_on(model, [batch]))
    assert found.outputs[:, 1].tolist() == [1.5, -2.0, 5.0]
    assert found.projected[:, 1].tolist() == pytest.approx([4 / 3 + 0.5, -2.0, 14 / 3 - 1])
    assert found.evaluations == 27


def test_a_conditional_head_is_projected_per_condition():
    """f = (1 + c) a b: each sample is projected with its own condition, averaging over
    every sample's modalities."""
    batch = scalar_batch([1, 0, 1], condition=[0, 1, 0], a=[1.0, 2.0, 3.0], b=[1.0, -1.0, 2.0])
    found = project(evaluator_on(scalar_model(Product), [batch]))
    assert found.outputs[:, 1].tolist() == [1.0, -4.0, 6.0]
    assert found.projected[:, 1].tolist() == pytest.approx([4 / 3, 2 * -2.0, 14 / 3])
    assert found.conditions == [0, 1] and found.evaluations == 18


def test_samples_missing_a_modality_are_left_out():
    present = {"a": torch.ones(4, dtype=torch.bool), "b": torch.tensor([True, False, True, True])}
    batch = scalar_batch(
        [1, 1, 0, 1], present=present, a=[1.0, 5.0, 2.0, 3.0], b=[1.0, 7.0, -1.0, 2.0]
    )
    found = project(evaluator_on(scalar_model(Product), [batch]))
    assert found.samples.tolist() == [0, 2, 3] and found.left_out == 1
    assert found.projected[:, 1].tolist() == pytest.approx([4 / 3, -2.0, 14 / 3])
    report = emap(evaluator_on(scalar_model(Product), [batch]))
    assert (report["split_samples"], report["samples"], report["left_out"]) == (4, 3, 1)
    assert "3 of 4 samples, 1 left out for a missing modality" in emap_table(report)


def test_a_subsample_is_seeded_and_projected_alone():
    batch = scalar_batch([1, 0, 0, 1], a=[1.0, 2.0, 3.0, 4.0], b=[1.0, -1.0, 2.0, 0.5])
    evaluator = evaluator_on(scalar_model(Product), [batch], seed=3)
    first, again = project(evaluator, samples=2), project(evaluator, samples=2)
    chosen = torch.randperm(4, generator=torch.Generator().manual_seed(3))[:2].sort().values
    assert first.samples.tolist() == again.samples.tolist() == chosen.tolist()
    assert torch.equal(first.projected, again.projected)
    assert first.subsampled and first.evaluations == 4
    i, j = chosen.tolist()
    a, b = [1.0, 2.0, 3.0, 4.0], [1.0, -1.0, 2.0, 0.5]
    mean_a, mean_b = (a[i] + a[j]) / 2, (b[i] + b[j]) / 2
    by_hand = [a[n] * mean_b + mean_a * b[n] - mean_a * mean_b for n in (i, j)]
    assert first.projected[:, 1].tolist() == pytest.approx(by_hand)
    assert not project(evaluator, samples=4).subsampled  # all of them: no subset


def test_token_features_of_different_lengths_are_padded_with_masks():
    short = Batch(
        inputs={"a": torch.ones(2, 2, 3)},
        present={"a": torch.tensor([[True, False], [True, True]])},
        targets=torch.zeros(2),
    )
    long = Batch(
        inputs={"a": torch.full((1, 3, 3), 2.0)},
        present={"a": torch.ones(1, 3, dtype=torch.bool)},
        targets=torch.ones(1),
    )
    split = SplitFeatures.stack([short, long])
    assert split.features["a"].shape == (3, 3, 3)
    assert split.features["a"][:2, 2].abs().sum() == 0
    assert split.masks["a"].tolist() == [[True, False, False], [True, True, False], [True] * 3]
    assert split.complete().tolist() == [True, True, True]


def test_padded_tokens_do_not_reach_the_projection_of_an_additive_model():
    encoders = {
        "tokens": Encoder(nn.Identity(), input_shape=(3, 2)),
        "vector": Encoder(nn.Identity(), input_shape=(2,)),
    }
    model = MultimodalModel.build(
        encoders, fuser=ConcatFuser, head=ClassificationHead, num_classes=2
    )
    batch = Batch(
        inputs={"tokens": torch.randn(4, 3, 2), "vector": torch.randn(4, 2)},
        present={
            "tokens": torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool),
            "vector": torch.ones(4, dtype=torch.bool),
        },
        targets=torch.tensor([0, 1, 1, 0]),
    )
    evaluator = evaluator_on(model, [batch])
    found = project(evaluator)
    assert torch.allclose(found.projected, found.outputs, atol=1e-6)
    encoded = encode_split(evaluator)
    assert score(evaluator, encoded).loss == pytest.approx(evaluator().loss, rel=1e-6)


def test_a_head_with_several_tasks_is_projected_per_task():
    class TwoTasks(nn.Module):
        in_dim = 2

        def __init__(self):
            super().__init__()
            self.x, self.y = nn.Linear(2, 3), nn.Linear(2, 2)

        def forward(self, fused, condition=None):
            return {"x": self.x(fused), "y": self.y(fused)}

    encoders = {m: Encoder(nn.Identity(), input_shape=(1,)) for m in ("a", "b")}
    model = MultimodalModel(encoders, ConcatFuser({"a": 1, "b": 1}), TwoTasks())
    objectives = {
        "x": Objective(Task("multiclass", ("0", "1", "2"))),
        "y": Objective(Task("multiclass", ("0", "1"))),
    }
    batch = Batch(
        inputs={"a": torch.randn(5, 1), "b": torch.randn(5, 1)},
        present={m: torch.ones(5, dtype=torch.bool) for m in ("a", "b")},
        targets={"x": torch.tensor([0, 1, 2, 0, 1]), "y": torch.tensor([0, 1, 1, 0, 1])},
    )
    evaluator = evaluator_on(model, [batch], objectives)
    found = project(evaluator)
    assert sorted(found.projected) == ["x", "y"]
    for task in ("x", "y"):
        assert torch.allclose(found.projected[task], found.outputs[task], atol=1e-6)
    report = emap(evaluator)
    assert report["metric"] == "accuracy"  # the mean of the tasks' accuracies
    assert report["gap"]["x/accuracy"] == 0 and report["gap"]["y/accuracy"] == 0


def test_too_many_evaluations_and_bad_sample_counts_are_refused():
    batch = scalar_batch([1, 0, 1], a=[1.0, 2.0, 3.0], b=[1.0, -1.0, 2.0])
    evaluator = evaluator_on(scalar_model(Product), [batch])
    with pytest.raises(ValueError) as caught:
        project(evaluator, max_evaluations=8)
    assert str(caught.value) == (
        "EMAP of 3 samples and 2 modalities runs the fuser and head 9 times, over the limit "
        "of 8; project a random subset of at most 2 samples (samples=, --emap-samples)"
    )
    assert project(evaluator, samples=2, max_evaluations=8).evaluations == 4
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match=f"samples: expected an integer >= 2, got {bad!r}"):
            project(evaluator, samples=bad)
    absent = {"a": torch.ones(3, dtype=torch.bool), "b": torch.zeros(3, dtype=torch.bool)}
    lacking = scalar_batch([1, 0, 1], present=absent, a=[1.0, 2.0, 3.0], b=[1.0, -1.0, 2.0])
    with pytest.raises(
        ValueError, match=r"no sample of the test split has every modality \(a, b\)"
    ):
        project(evaluator_on(scalar_model(Product), [lacking]))


def test_the_table_and_plot_show_model_emap_and_gap(tmp_path):
    report = {
        "split": "test", "seed": 0, "modalities": ["image", "audio"], "split_samples": 10,
        "left_out": 2, "samples": 8, "subsampled": False, "conditions": None,
        "evaluations": 64, "metric": "accuracy", "lower_is_better": False,
        "model": {"loss": 0.25, "accuracy": 0.875}, "emap": {"loss": 0.75, "accuracy": 0.5},
        "gap": {"loss": 0.5, "accuracy": 0.375}, "residual_rms": 1.5, "residual_ratio": 0.25,
    }  # fmt: skip
    table = emap_table(report)
    assert table.splitlines()[:5] == [
        "| test (8 samples) | loss | accuracy |",
        "|---|---:|---:|",
        "| model | 0.2500 | 87.50% |",
        "| EMAP | 0.7500 | 50.00% |",
        "| gap | +0.5000 | +37.50 pp |",
    ]
    assert "8 of 10 samples, 2 left out for a missing modality; 64 evaluations" in table
    assert "RMS 1.5, 0.25 x the outputs' spread (sum of squares)" in table
    plot_emap(report, tmp_path / "emap.png")
    assert (tmp_path / "emap.png").read_bytes()[:4] == b"\x89PNG"
