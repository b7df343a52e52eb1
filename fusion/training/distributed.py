"""Data-parallel training across processes: who this process is, and the collectives we use.

Processes are started by a launcher, never by us: `torchrun` (which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT), or SLURM through submitit (whose
`TorchDistributedEnvironment` turns SLURM's task variables into the same ones). Every
process runs the same entry point; `Distributed` says which one it is, and rank 0 alone
writes files and logs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class Distributed:
    """This process's place among `world_size` processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over every process (float64, so counts stay exact)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: object) -> list[object]:
        """Every process's `value`, in rank order, on every process."""
        if not self.enabled:
            return [value]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Give every process rank 0's buffers (batch-norm statistics): DDP syncs them before
        each training forward, so after an epoch each process holds its last batch's."""
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. writes a cache), then the others (who read it)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


SINGLE = Distributed()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_processes() -> int:
    """How many processes the launcher started: WORLD_SIZE (torchrun), else SLURM's tasks."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SUBMITIT_EXECUTOR" in os.environ:
        return int(os.environ.get("SLURM_NTASKS") or os.environ.get("SUBMITIT_LOCAL_NTASKS", 1))
    return 1


def _export_submitit_environment() -> None:
    """Under submitit (SLURM or its local executor), set torchrun's variables from its own."""
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got '{backend}'")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend 'nccl' needs CUDA devices, this run is on '{device.type}'")
    return backend


def init_distributed(backend: str, device: torch.device, timeout_s: float = 1800) -> Distributed:
    """Join the launcher's process group (once per process); one process needs none.

    On GPUs each process takes `cuda:<local rank>`, so one node's processes share its GPUs.
    """
    _export_submitit_environment()
    if launched_processes() == 1:
        return Distributed()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            resolve_backend(backend, device),
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return Distributed(rank, world_size, local_rank)


def local_device(device: torch.device, context: Distributed) -> torch.device:
    """This process's device: its own GPU (by local rank) when training on CUDA."""
    if device.type == "cuda" and context.enabled:
        return torch.device("cuda", context.local_rank)
    return device
