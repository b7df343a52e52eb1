"""The alignment stage: InfoNCE between encoders' projections, masks, retrieval, errors."""

import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fusion.batch import Batch, collate
from fusion.contrastive import check_pairs
from fusion.encoders.base import Encoder
from fusion.encoders.tabular import build_tabular_encoder
from fusion.training.align import AlignmentModel, evaluate_alignment, fit_alignment
from fusion.training.distributed import SINGLE, Distributed
from fusion.training.sampling import EpochSampler

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


class PairedViews(Dataset):
    """`views` as items (float64), with view 'b' missing from about a quarter of them."""

    def __init__(self, n: int, seed: int) -> None:
        inputs, self.labels = views(n, seed)
        self.a, self.b = inputs["a"].double(), inputs["b"].double()
        self.missing = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.25

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"a": self.a[i], "b": None if self.missing[i] else self.b[i],
                "label": int(self.labels[i])}  # fmt: skip


def collate_float64(items: list[dict]) -> Batch:
    batch = collate(items)  # float32 inputs, as the library's
    return dataclasses.replace(batch, inputs={m: x.double() for m, x in batch.inputs.items()})


def align_with(distributed: Distributed):
    """Three epochs of alignment on global batches of 16 (each process: its share)."""

    def loader(n: int, seed: int, train: bool) -> DataLoader:
        sampler = EpochSampler(
            n, shuffle=train, seed=0, rank=distributed.rank,
            world_size=distributed.world_size, pad=train,
        )  # fmt: skip
        return DataLoader(
            PairedViews(n, seed), batch_size=16 // distributed.world_size, sampler=sampler,
            collate_fn=collate_float64,
        )  # fmt: skip

    torch.manual_seed(0)
    encoders = {  # no batch norm: its statistics are per process
        m: Encoder(nn.Sequential(nn.Linear(4, 16), nn.ReLU()), input_shape=(4,)) for m in ("a", "b")
    }
    aligner = AlignmentModel(encoders, [["a", "b"]], projection_dim=8).double()
    result = fit_alignment(
        aligner, loader(96, 0, True), loader(40, 1, False), epochs=3, lr=1e-2,
        weight_decay=0.01, device=CPU, labels=lambda b: b.targets, distributed=distributed,
    )  # fmt: skip
    return aligner, result


def _align_worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        aligner, result = align_with(Distributed(rank, 2))
        torch.save({"model": aligner.state_dict(), "best": result.best}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_align_as_one_on_the_same_global_batches(tmp_path):
    """Under DDP each process holds half of every batch, with a different number of pairs
    (view 'b' is missing at random); with the negatives gathered, the weights, the kept
    epoch and the whole-split metrics are those of one process (float64: only the order of
    the sums differs)."""
    single, result = align_with(SINGLE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_align_worker, args=(port, tmp_path), nprocs=2, start_method="spawn")
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in single.state_dict().items():
            torch.testing.assert_close(saved["model"][name], value, rtol=0, atol=1e-10)
        assert saved["best"].keys() == result.best.keys()
        for key, value in result.best.items():
            assert saved["best"][key] == pytest.approx(value, rel=1e-9), key
