"""InfoNCE against its definition, its gradient to the temperature, and retrieval metrics on
cases small enough to rank by hand."""

import math

import pytest
import torch

from fusion.analysis.retrieval import ranks, retrieval_metrics
from fusion.contrastive import InfoNCE


def by_definition(a, b, scale):
    """The symmetric InfoNCE written out row by row."""
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    n = len(a)
    total = 0.0
    for i in range(n):
        rows = [scale * float(a[i] @ b[j]) for j in range(n)]
        cols = [scale * float(b[i] @ a[j]) for j in range(n)]
        total += -rows[i] + math.log(sum(math.exp(r) for r in rows))
        total += -cols[i] + math.log(sum(math.exp(c) for c in cols))
    return total / (2 * n)


def test_infonce_is_the_mean_of_both_directions_cross_entropies():
    a, b = pairs(5)
    loss = InfoNCE(temperature=0.5).double()
    scale = float(loss.log_scale.detach().exp())  # 2, as near as a float32 parameter holds log 2
    assert scale == pytest.approx(2.0, rel=1e-7)
    assert float(loss(a, b).detach()) == pytest.approx(by_definition(a, b, scale), rel=1e-12)
    assert loss.temperature == pytest.approx(0.5)


def test_the_temperature_gets_its_gradient_and_stops_at_the_clamp():
    a, b = pairs(6)
    loss = InfoNCE(temperature=0.2).double()
    loss(a, b).backward()
    # d/d(log s) of CE_i = s * (E_p[z_i.] - z_ii), for rows and for columns
    z = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    s = float(loss.log_scale.detach().exp())  # 5, as near as float32 holds log 5
    rows = (torch.softmax(s * z, 1) * z).sum(1) - z.diag()
    cols = (torch.softmax(s * z.T, 1) * z.T).sum(1) - z.diag()
    expected = float(s * (rows.mean() + cols.mean()) / 2)
    assert float(loss.log_scale.grad) == pytest.approx(expected, rel=1e-10)
    clamped = InfoNCE(temperature=0.001, max_scale=1000.0).double()
    with torch.no_grad():
        clamped.log_scale.fill_(math.log(2000.0))  # past the clamp: no gradient
    clamped(a, b).backward()
    assert float(clamped.log_scale.grad) == 0.0


def test_infonce_refuses_what_it_cannot_pair():
    with pytest.raises(ValueError, match=r"got \[4, 3\] and \[5, 3\]"):
        InfoNCE()(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        InfoNCE(temperature=0)


def test_ranks_of_pairs_and_of_labels():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    items = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.1]])
    # query 0 is closest to item 2, then items 0 and 1 (tied): its pair (0) ranks 3 (ties
    # count against it); query 1's pair (1) ties with item 0: rank 2; query 2's pair is first
    assert ranks(queries, items).tolist() == [3, 2, 1]
    labels = torch.tensor([0, 1, 0])  # items 0 and 2 share label 0
    assert ranks(queries, items, labels).tolist() == [1, 2, 1]


def test_retrieval_metrics_both_directions():
    a = torch.eye(4)
    b = torch.eye(4)[[0, 1, 3, 2]]  # rows 2 and 3 swapped: their pairs rank second
    metrics = retrieval_metrics(a, b, ("image", "audio"), recall_at=(1, 2))
    assert metrics == {
        "image_to_audio/R@1": 0.5,
        "image_to_audio/R@2": 0.5,
        "image_to_audio/median_rank": 1.0,
        "audio_to_image/R@1": 0.5,
        "audio_to_image/R@2": 0.5,
        "audio_to_image/median_rank": 1.0,
    }


def pairs(n=8):
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(n, 4, generator=g, dtype=torch.float64),
        torch.randn(n, 4, generator=g, dtype=torch.float64),
    )


def _half_batch_worker(rank, port, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        a, b = (x[rank * 4 : rank * 4 + 4].clone().requires_grad_() for x in pairs())
        loss = InfoNCE(temperature=0.2).double()
        value = loss(a, b)
        value.backward()
        torch.save(
            {"loss": value.detach(), "a": a.grad, "b": b.grad, "scale": loss.log_scale.grad},
            out / f"rank{rank}.pt",
        )
        dist.barrier()  # neither process leaves while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_two_processes_with_gathered_negatives_give_the_global_batch_loss(tmp_path):
    """Each process holds half the pairs; with the negatives gathered, the mean of their
    losses is the one-process loss of the whole batch, and their gradients (averaged as DDP
    does) are its gradients."""
    import socket

    import torch.multiprocessing as mp

    a, b = (x.clone().requires_grad_() for x in pairs())
    loss = InfoNCE(temperature=0.2).double()
    whole = loss(a, b)
    whole.backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_half_batch_worker, args=(port, tmp_path), nprocs=2, start_method="spawn")
    ranks_ = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # float64 throughout: only the order of the sums differs
    assert float((ranks_[0]["loss"] + ranks_[1]["loss"]) / 2) == pytest.approx(
        float(whole.detach()), rel=1e-12
    )
    torch.testing.assert_close(
        torch.cat([r["a"] for r in ranks_]) / 2, a.grad, rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        torch.cat([r["b"] for r in ranks_]) / 2, b.grad, rtol=1e-10, atol=1e-12
    )
    averaged = (ranks_[0]["scale"] + ranks_[1]["scale"]) / 2
    assert float(averaged) == pytest.approx(float(loss.log_scale.grad), rel=1e-10)
