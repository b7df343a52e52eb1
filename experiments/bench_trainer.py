"""How much our training loop costs over a minimal hand-written PyTorch loop.

    python -m experiments.bench_trainer [--steps 30] [--batch-size 64] [--repeats 5]
        [--device cpu] [--out outputs/benchmarks/trainer.json]

Both loops train the same image model of the built-in example (ResNet-18 for 8x8 grey
scans, a linear head) from the same initial weights, with AdamW at the same learning rate, on the same
batches collated once and kept in memory (so data loading is not timed). They alternate,
swapping which goes first each repeat, after one warm-up each; the table gives the median
seconds per step and our overhead, ours / plain - 1. tqdm is replaced by a pass-through
while ours runs, so a terminal's progress bar is not timed either. Both loops must end
with the same weights (`max_weight_diff`), which shows they did the same work.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
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


def max_weight_diff(a: nn.Module, b: nn.Module) -> float:
    return max(
        (x - y).abs().max().item()
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def benchmark(steps: int, batch_size: int, repeats: int, device: torch.device) -> dict[str, object]:
    initial = image_model().to(device)
    batches = make_batches(steps, batch_size, device)
    runners: dict[str, Runner] = {"ours": run_ours, "plain": run_plain}
    for run in runners.values():  # warm-up: allocator, kernels, lazy initialization
        time_run(run, initial, batches[:2], device)
    times: dict[str, list[float]] = {name: [] for name in runners}
    trained: dict[str, nn.Module] = {}
    for r in range(repeats):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            seconds, trained[name] = time_run(runners[name], initial, batches, device)
            times[name].append(seconds)
    ours, plain = statistics.median(times["ours"]), statistics.median(times["plain"])
    return {
        "steps": steps,
        "batch_size": batch_size,
        "repeats": repeats,
        "seconds_per_step": {"ours": ours, "plain": plain},
        "all_seconds_per_step": times,
        "overhead_percent": 100 * (ours / plain - 1),
        "max_weight_diff": max_weight_diff(trained["ours"], trained["plain"]),
    }


def table(result: dict[str, object]) -> str:
    sps = result["seconds_per_step"]
    return "\n".join(
        [
            "| loop | median s/step | steps/s |",
            "|---|---|---|",
            f"| ours (train_epoch) | {sps['ours']:.4f} | {1 / sps['ours']:.1f} |",
            f"| plain PyTorch | {sps['plain']:.4f} | {1 / sps['plain']:.1f} |",
            f"\noverhead: {result['overhead_percent']:+.1f}% "
            f"(max weight difference after training: {result['max_weight_diff']:.1e})",
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
    result = {
        **benchmark(args.steps, args.batch_size, args.repeats, device),
        "machine": machine_info(device),
    }
    print(table(result))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
