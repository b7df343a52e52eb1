"""Data-parallel training on CPU with gloo: two real processes against one."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fusion.auxiliary import AuxiliaryLosses, AuxiliaryTraining
from fusion.batch import collate
from fusion.data import Task
from fusion.encoders.base import Encoder
from fusion.fusers import GatedFuser
from fusion.heads import ClassificationHead, ConditionalHead
from fusion.imbalance import OGMGE
from fusion.model import MultimodalModel
from fusion.tasks import Objective
from fusion.training import fit, load_checkpoint
from fusion.training.distributed import SINGLE, Distributed, resolve_backend
from fusion.training.sampling import EpochSampler

GLOBAL_BATCH = 16
SAMPLES = 96  # six global batches per epoch
EPOCHS = 3
LR = 1e-2


class Items(Dataset):
    """Two modalities and a per-sample condition; the label depends on both."""

    def __init__(self, n=SAMPLES, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.a, self.b = torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)
        self.condition = torch.randint(0, 2, (n,), generator=g)
        self.y = ((self.a[:, 0] + self.b[:, 0] > 0).long() + 2 * self.condition) % 3
        self.missing = torch.rand(n, generator=g) < 0.25

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {
            "a": self.a[i],
            "b": None if self.missing[i] else self.b[i],
            "condition": int(self.condition[i]),
            "label": int(self.y[i]),
        }


def build(head="mlp", modality_dropout=None, batch_norm=False):
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(8) if batch_norm else nn.Identity()
    encoders = {
        "a": Encoder(nn.Sequential(nn.Linear(5, 8), norm, nn.ReLU()), input_shape=(5,)),
        "b": Encoder(nn.Sequential(nn.Linear(3, 8), nn.ReLU()), input_shape=(3,)),
    }
    if head == "conditional":
        factory = lambda in_dim, num_classes: ConditionalHead(in_dim, num_classes, num_conditions=3)  # noqa: E731
    else:
        factory = ClassificationHead
    return MultimodalModel.build(encoders, GatedFuser, factory, 3, modality_dropout)


def loaders(distributed):
    def loader(split, n, seed):
        sampler = EpochSampler(
            n, shuffle=split == "train", seed=0, rank=distributed.rank,
            world_size=distributed.world_size, pad=split == "train",
        )  # fmt: skip
        return DataLoader(
            Items(n, seed), batch_size=GLOBAL_BATCH // distributed.world_size,
            sampler=sampler, collate_fn=collate,
        )  # fmt: skip

    return loader("train", SAMPLES, 0), loader("val", 40, 1)


def train(distributed, state_path=None, auxiliary=False, **model_kwargs):
    model = build(**model_kwargs)
    if auxiliary:  # unimodal heads, and InfoNCE with pairs only where b is present
        objectives = {"label": Objective(Task("multiclass", ("0", "1", "2")))}
        losses = AuxiliaryLosses(
            {"a": 8, "b": 8}, objectives, unimodal=0.5, contrastive=0.2, pairs=[["a", "b"]]
        )
        modulation = OGMGE(["a", "b"], objectives, alpha=0.5, noise=False)  # noise: per process
        model = AuxiliaryTraining(model, losses, modulation)
    train_batches, val_batches = loaders(distributed)
    torch.manual_seed(1 + distributed.rank)
    result = fit(
        model, train_batches, val_batches, epochs=EPOCHS, lr=LR, weight_decay=0.01,
        device=torch.device("cpu"), distributed=distributed, state_path=state_path,
    )  # fmt: skip
    return model, result


def _worker(rank, world_size, port, out, task):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        distributed = Distributed(rank, world_size)
        if task == "parity":
            model, result = train(distributed, state_path=out / "state.pt")
        elif task == "auxiliary":
            model, result = train(distributed, auxiliary=True)
        else:
            model, result = train(
                distributed, head="conditional", modality_dropout={"b": 0.5}, batch_norm=True
            )
        torch.save({"model": model.state_dict(), "best": result.best}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_two_processes(tmp_path, task):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, tmp_path, task), nprocs=2, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def parity_tolerance(model: nn.Module) -> float:
    """How far two float32 runs of the same steps may drift apart when only the order of
    their sums differs (a half batch per process, then an average, against one batch).

    Each step's gradient then carries a relative error of at most about K * u (u = 2^-24,
    K the longest reduction: a layer's widest side, as a half-batch matmul may block it
    differently). Adam divides the gradient by its own scale, so a step moves a parameter
    by at most about `lr` and the two runs' steps differ by at most lr * K * u. Each step
    also rounds a parameter of magnitude up to 1 once (u). Over every step of the run:
    steps * (lr * K * u + u).
    """
    u = 2.0**-24
    widest = max(
        max(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)
    )
    steps = EPOCHS * SAMPLES // GLOBAL_BATCH
    return steps * (LR * widest * u + u)


def test_two_processes_match_one_on_the_same_global_batches(tmp_path):
    single, single_result = train(SINGLE)
    ranks = run_two_processes(tmp_path, "parity")
    atol = parity_tolerance(single)  # 6.6e-6 here; 9e-8 was measured on a quiet machine
    assert max(p.abs().max() for p in single.parameters()) <= 1.0  # the bound's premise
    for name, value in single.state_dict().items():
        for rank in ranks:
            torch.testing.assert_close(rank["model"][name], value, rtol=0, atol=atol, msg=name)
    for key, value in single_result.best.items():  # metrics are over every process's samples
        assert ranks[0]["best"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    state = load_checkpoint(tmp_path / "state.pt")  # written once, by rank 0
    assert len(state["rank_rng"]) == 2 and state["epoch"] == 3


def test_auxiliary_losses_train_under_ddp_as_in_one_process(tmp_path):
    """Unimodal heads and InfoNCE beside the task loss, and OGM-GE's modulation: each
    process holds a different number of pairs (b is missing at random); with the negatives
    gathered and the modalities' scores summed over processes, two processes train the
    weights one process does."""
    single, single_result = train(SINGLE, auxiliary=True)
    ranks = run_two_processes(tmp_path, "auxiliary")
    atol = parity_tolerance(single)
    for name, value in single.state_dict().items():
        for rank in ranks:
            torch.testing.assert_close(rank["model"][name], value, rtol=0, atol=atol, msg=name)
    for key, value in single_result.best.items():
        if key != "val/aux/contrastive/a_b":  # evaluated on each process's own pairs
            assert ranks[0]["best"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert {"train/aux/unimodal/a", "train/aux/contrastive/a_b", "train/aux/ogm/ratio/a"} <= set(
        single_result.best
    )


def test_modality_dropout_and_a_conditional_head_train_under_ddp(tmp_path):
    """Each process's batch leaves some condition with no sample and drops modality b for
    half the samples: DDP must still see every parameter used, on every process."""
    ranks = run_two_processes(tmp_path, "routing")
    for name, value in ranks[0]["model"].items():  # in sync, batch-norm statistics included
        torch.testing.assert_close(ranks[1]["model"][name], value, rtol=0, atol=0, msg=name)
    assert ranks[0]["best"]["val/accuracy"] > 0.4  # it learned (chance is 1/3)


def test_backend_follows_the_device():
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("auto", torch.device("cuda")) == "nccl"
    with pytest.raises(ValueError, match="'nccl' needs CUDA devices"):
        resolve_backend("nccl", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("mpi", torch.device("cpu"))


FUSION_CONFIGS = sorted(
    (Path(__file__).resolve().parents[2] / "configs/model/fusion").glob("*.yaml")
)


@pytest.mark.parametrize("config", FUSION_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("head", ["mlp", "conditional", "multitask", "moe"])
def test_every_parameter_takes_part_in_every_step(config, head):
    """What lets DDP run without `find_unused_parameters`: with one modality absent from the
    whole batch, modality dropout on, and a condition that leaves a head without samples,
    every trainable parameter of every configured fuser and head still gets a gradient."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    heads = Path(__file__).resolve().parents[2] / "configs/model/head"
    torch.manual_seed(0)
    encoders = {
        "image": Encoder(nn.Linear(5, 6), input_shape=(5,)),
        "audio": Encoder(nn.Linear(3, 4), input_shape=(3,)),
    }
    num_classes = {"written": 3, "same": 2} if head == "multitask" else 3
    if "late" in config.stem and head != "mlp":
        pytest.skip("late fusion predicts itself: it takes no head")
    model = MultimodalModel.build(
        encoders,
        instantiate(OmegaConf.load(config)),
        instantiate(OmegaConf.load(heads / f"{head}.yaml")),
        num_classes,
        modality_dropout={"image": 0.5},
    )
    batch = 6
    inputs = {"image": torch.randn(batch, 5), "audio": torch.randn(batch, 3)}
    present = {
        "image": torch.ones(batch, dtype=torch.bool),
        "audio": torch.zeros(batch, dtype=torch.bool),
    }
    out = model(inputs, present, condition=torch.zeros(batch, dtype=torch.long))
    loss = sum(o.sum() for o in out.values()) if isinstance(out, dict) else out.sum()
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
