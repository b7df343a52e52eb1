"""The alignment stage: InfoNCE between encoders' projections, masks, retrieval, errors."""

import pytest
import torch

from fusion.batch import Batch
from fusion.encoders.tabular import build_tabular_encoder
from fusion.training.align import AlignmentModel, check_pairs, evaluate_alignment, fit_alignment

CPU = torch.device("cpu")


def views(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Two noisy views ('a', 'b') of one of 4 classes per sample, each in its own basis."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    centers = torch.eye(4) * 3
    a = centers[labels] + 0.3 * torch.randn(n, 4, generator=generator)
    b = centers[labels] @ torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    b = b + 0.3 * torch.randn(n, 4, generator=generator)
    return {"a": a, "b": b}, labels


def batches(n: int, seed: int, size: int = 16) -> list[Batch]:
    inputs, labels = views(n, seed)
    ones = torch.ones(n, dtype=torch.bool)
    return [
        Batch(
            {m: x[i : i + size] for m, x in inputs.items()},
            {m: ones[i : i + size] for m in inputs},
            labels[i : i + size],
            None,
        )
        for i in range(0, n, size)
    ]


def model(seed: int = 0) -> AlignmentModel:
    torch.manual_seed(seed)
    encoders = {m: build_tabular_encoder(4, hidden=[16]) for m in ("a", "b")}
    return AlignmentModel(encoders, [["a", "b"]], projection_dim=8)


def test_alignment_makes_each_view_retrieve_its_class_in_the_other():
    aligner = model()
    before = evaluate_alignment(aligner, batches(64, 1), CPU, lambda b: b.targets)
    result = fit_alignment(
        aligner, batches(128, 0), batches(64, 1), epochs=8, lr=1e-2, weight_decay=0.0,
        device=CPU, labels=lambda b: b.targets,
    )  # fmt: skip
    assert before["val/a_to_b/R@1"] < 0.6
    assert result.best["val/a_to_b/R@1"] == 1.0 and result.best["val/b_to_a/R@1"] == 1.0
    assert result.best["val/loss"] == min(m["val/loss"] for m in result.history)
    assert [m["epoch"] for m in result.history] == list(range(1, 9))


def test_every_parameter_trains_and_an_absent_view_has_no_influence():
    aligner = model()
    batch = batches(16, 0)[0]
    aligner(batch).backward()
    silent = [n for n, p in aligner.named_parameters() if p.grad is None or not p.grad.any()]
    assert silent == []
    aligner.eval()  # batch norm: the same statistics whatever the batch holds
    batch.present["b"] = batch.present["b"].clone()
    batch.present["b"][3] = False
    with torch.no_grad():
        clean = aligner(batch)
        batch.inputs["b"][3] = torch.nan  # what an absent view holds cannot matter
        assert torch.equal(aligner(batch), clean)
        kept = torch.arange(16) != 3
        without = Batch(
            {m: x[kept] for m, x in batch.inputs.items()},
            {m: p[kept] for m, p in batch.present.items()},
            batch.targets[kept],
            None,
        )
        assert aligner(without).item() == pytest.approx(clean.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([["a", "c"]], "pairs[0]: the data has no modality 'c'; it has ['a', 'b']"),
        ([["a", "a"]], "pairs[0]: a modality is aligned with another, got [a, a]"),
        ([["a", "b"], ["b", "a"]], "pairs[1]: [b, a] is listed twice"),
        ([["a"]], "pairs[0]: expected two modality names, got ['a']"),
        ([], "pairs: expected a list of modality pairs, e.g. [[image, audio]], got []"),
    ],
)
def test_pairs_that_cannot_be_aligned_are_named(pairs, message):
    with pytest.raises(ValueError) as err:
        check_pairs(pairs, ["a", "b"])
    assert str(err.value) == message
