"""How much our training loop costs over a minimal hand-written PyTorch loop.

    python -m experiments.bench_trainer [--steps 30] [--batch-size 64] [--repeats 5]
        [--device cpu] [--out outputs/benchmarks/trainer.json]

Both loops train the same image model of the built-in example (ResNet-18 for 8x8 grey
scans, a linear head) from the same initial weights, with AdamW at the same learning rate, on the same
batches collated once and kept in memory (so data loading is not timed). They alternate,
swapping which goes first each repeat, after one warm-up each; the table gives the median
seconds per step and our overhead, ours / plain - 1. tqdm is replaced by a pass-through
while ours runs, so a terminal's progress bar is not timed either.

Both loops must end with the same weights, which shows they did the same work. That check
(`parity`) is separate from the timing: on CUDA, cuDNN and cuBLAS pick nondeterministic
kernels by default (atomic adds in convolution backward), so two runs of the very same
loop drift apart over the steps and an absolute difference of the weights (batch-norm
variances in the hundreds included) says nothing. The parity runs ask for deterministic
kernels (`torch.use_deterministic_algorithms`, cuDNN deterministic and not benchmarking,
`CUBLAS_WORKSPACE_CONFIG` set before CUDA starts), run our loop twice and the plain loop
once, and compare each floating-point tensor relative to its largest value. Any drift left
(an op without a deterministic CUDA kernel only warns) is measured by our loop against
itself, `run_to_run_diff`; the loops agree (`same`) when their difference is within the
dtype's tolerance (the square root of its machine epsilon: half its digits) plus twice
that drift.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fusion.training.loop as loop
from experiments.benchmarking import machine_info, synchronize, write_json
from experiments.builders import build_split, compose_config
from fusion.batch import Batch, collate
from fusion.encoders import build_vision_encoder
from fusion.fusers import ConcatFuser
from fusion.heads import ClassificationHead
from fusion.model import MultimodalModel

LR = 2e-3  # configs/trainer's stage-1 learning rate
NUM_CLASSES = 10


def image_model(seed: int = 0) -> MultimodalModel:
    """The default data's image model as stage 1 trains it (configs/model/encoder/image/resnet18)."""
    torch.manual_seed(seed)
    encoder = build_vision_encoder(
        "resnet18", in_channels=1, image_size=(8, 8), small_input_stem=True, mean=[0.3], std=[0.4]
    )
    return MultimodalModel.build(
        {"image": encoder}, fuser=ConcatFuser, head=ClassificationHead, num_classes=NUM_CLASSES
    )


def make_batches(steps: int, batch_size: int, device: torch.device, seed: int = 0) -> list[Batch]:
    """`steps` training batches (cycling over the split as needed), collated once, on `device`."""
    torch.manual_seed(seed)
    dataset = build_split(compose_config().data, "train")
    order = torch.randperm(len(dataset)).tolist()
    batches = []
    for step in range(steps):
        start = step * batch_size
        idx = [order[i % len(order)] for i in range(start, start + batch_size)]
        batch = collate([{"image": dataset[i]["image"], "label": dataset[i]["label"]} for i in idx])
        batches.append(batch.to(device))
    return batches


@contextmanager
def no_progress_bar() -> Iterator[None]:
    """Let `train_epoch` iterate its batches directly, whether or not stderr is a terminal."""
    original = loop.tqdm
    loop.tqdm = lambda iterable, **_: iterable
    try:
        yield
    finally:
        loop.tqdm = original


def run_ours(model: nn.Module, batches: list[Batch], device: torch.device) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    with no_progress_bar():
        loop.train_epoch(model, batches, optimizer, device)


def run_plain(model: nn.Module, batches: list[Batch], device: torch.device) -> None:
    """The tutorial loop, calling the model exactly as `train_epoch` does."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    model.train()
    for batch in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(batch.inputs, batch.present, batch.condition), batch.targets)
        loss.backward()
        optimizer.step()


Runner = Callable[[nn.Module, list[Batch], torch.device], None]


def time_run(
    run: Runner, initial: nn.Module, batches: list[Batch], device: torch.device
) -> tuple[float, nn.Module]:
    """Seconds per step of one run from a fresh copy of the initial weights, and the trained copy."""
    model = copy.deepcopy(initial)
    synchronize(device)
    start = time.perf_counter()
    run(model, batches, device)
    synchronize(device)
    return (time.perf_counter() - start) / len(batches), model


def relative_diff(a: nn.Module, b: nn.Module) -> tuple[float, str | None]:
    """The largest difference between two models' floating-point tensors, each relative to
    the tensor's largest magnitude in `b` (so large batch-norm variances and small weights
    weigh alike), and the name of the tensor it is in (None when they are equal). Integer
    counters are left out."""
    worst, where = 0.0, None
    theirs = b.state_dict()
    for name, x in a.state_dict().items():
        if not x.is_floating_point():
            continue
        y = theirs[name].double()
        scale = max(y.abs().max().item(), torch.finfo(x.dtype).tiny)
        diff = (x.double() - y).abs().max().item() / scale
        if diff > worst:
            worst, where = diff, name
    return worst, where


def parity_tolerance(dtype: torch.dtype) -> float:
    """The difference two runs of the same arithmetic may show after rounding in another
    order: half the digits of `dtype` (the square root of its machine epsilon)."""
    return math.sqrt(torch.finfo(dtype).eps)


@contextmanager
def deterministic_kernels() -> Iterator[None]:
    """Deterministic cuDNN and cuBLAS kernels for the parity runs, restored after. An op
    without a deterministic CUDA kernel warns (`warn_only`) instead of failing: the
    run-to-run difference then measures what it leaves."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:]


def deterministic_cublas(device: torch.device) -> bool:
    """Set `CUBLAS_WORKSPACE_CONFIG`, which cuBLAS reads once when CUDA starts, for
    deterministic matrix products; False when CUDA started earlier without it (the parity
    result then says so)."""
    if device.type != "cuda" or os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        return True
    if torch.cuda.is_initialized():
        return False
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    return True


def parity(
    initial: nn.Module, batches: list[Batch], device: torch.device, cublas_deterministic: bool
) -> dict[str, object]:
    """Whether both loops end with the same weights, with deterministic kernels: our loop
    against the plain one, against the drift of our loop against itself."""
    with deterministic_kernels(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = time_run(run_ours, initial, batches, device)[1]
        again = time_run(run_ours, initial, batches, device)[1]
        plain = time_run(run_plain, initial, batches, device)[1]
    nondeterministic = set()
    for w in caught:  # "<op> does not have a deterministic implementation, but you set ..."
        op, found, _ = str(w.message).partition(" does not have a deterministic")
        if found:
            nondeterministic.add(op)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    diff, tensor = relative_diff(ours, plain)
    drift = relative_diff(ours, again)[0]
    dtype = next(initial.parameters()).dtype
    tolerance = parity_tolerance(dtype)
    return {
        "relative_diff": diff,
        "tensor": tensor,
        "run_to_run_diff": drift,
        "tolerance": tolerance,
        "dtype": str(dtype).removeprefix("torch."),
        "same": diff <= tolerance + 2 * drift,
        "nondeterministic_ops": sorted(nondeterministic),
        "cublas_deterministic": cublas_deterministic,
    }


def benchmark(
    steps: int,
    batch_size: int,
    repeats: int,
    device: torch.device,
    cublas_deterministic: bool = True,
) -> dict[str, object]:
    initial = image_model().to(device)
    batches = make_batches(steps, batch_size, device)
    runners: dict[str, Runner] = {"ours": run_ours, "plain": run_plain}
    for run in runners.values():  # warm-up: allocator, kernels, lazy initialization
        time_run(run, initial, batches[:2], device)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(repeats):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            times[name].append(time_run(runners[name], initial, batches, device)[0])
    ours, plain = statistics.median(times["ours"]), statistics.median(times["plain"])
    return {
        "steps": steps,
        "batch_size": batch_size,
        "repeats": repeats,
        "seconds_per_step": {"ours": ours, "plain": plain},
        "all_seconds_per_step": times,
        "overhead_percent": 100 * (ours / plain - 1),
        "parity": parity(initial, batches, device, cublas_deterministic),
    }


def parity_line(check: dict[str, object]) -> str:
    """The parity verdict in words, with the numbers it rests on."""
    verdict = "same weights" if check["same"] else "DIFFERENT WEIGHTS"
    where = f" (largest in {check['tensor']})" if check["tensor"] else ""
    line = (
        f"{verdict}: relative difference {check['relative_diff']:.1e}{where}, run-to-run "
        f"{check['run_to_run_diff']:.1e}, tolerance {check['tolerance']:.1e} ({check['dtype']})"
    )
    if check["nondeterministic_ops"]:
        line += f"; without a deterministic kernel: {', '.join(check['nondeterministic_ops'])}"
    if not check["cublas_deterministic"]:
        line += "; CUDA started before CUBLAS_WORKSPACE_CONFIG was set"
    return line


def table(result: dict[str, object]) -> str:
    sps = result["seconds_per_step"]
    return "\n".join(
        [
            "| loop | median s/step | steps/s |",
            "|---|---|---|",
            f"| ours (train_epoch) | {sps['ours']:.4f} | {1 / sps['ours']:.1f} |",
            f"| plain PyTorch | {sps['plain']:.4f} | {1 / sps['plain']:.1f} |",
            f"\noverhead: {result['overhead_percent']:+.1f}%",
            f"parity after training: {parity_line(result['parity'])}",
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per timed run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each loop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/trainer.json"))
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    device = torch.device(args.device)
    cublas = deterministic_cublas(device)  # before anything starts CUDA
    result = {
        **benchmark(args.steps, args.batch_size, args.repeats, device, cublas),
        "machine": machine_info(device),
    }
    print(table(result))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
