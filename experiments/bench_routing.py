"""Benchmark ConditionalHead's grouped (batched) routing against a per-sample Python loop.

    python -m experiments.bench_routing [--batch-sizes 32 64 ...] [--in-dim 256] [--classes 10]
        [--conditions 4] [--repeats 20] [--warmup 3] [--modes no_grad fwd_bwd] [--out PATH]

Both paths run the same heads on the same inputs: the loop sends each sample through
`head.heads[int(c)]` and concatenates, which is what grouping replaces. For each batch size and
mode (`no_grad`: inference; `fwd_bwd`: forward, `.sum().backward()`) it reports the median of
`--repeats` timed runs after `--warmup` untimed ones, the speed-up loop / batched, and the
largest absolute difference between the two outputs (they must agree). Prints a Markdown table
and writes the rows with machine info as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from experiments.benchmarking import (
    default_device,
    machine_info,
    markdown_table,
    median_ms,
    write_json,
)
from fusion.heads import ConditionalHead

MODES = ("no_grad", "fwd_bwd")


def loop_forward(head: ConditionalHead, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """The naive routing that grouping replaces: one head call per sample."""
    return torch.cat([head.heads[int(c)](x[i : i + 1]) for i, c in enumerate(condition)], dim=0)


def step(forward: Callable[[], torch.Tensor], head: ConditionalHead, mode: str) -> None:
    """One timed unit of work in the given mode; gradients are cleared so they never pile up."""
    if mode == "no_grad":
        with torch.no_grad():
            forward()
        return
    forward().sum().backward()
    head.zero_grad(set_to_none=True)


def bench_batch(
    head: ConditionalHead, batch: int, args: argparse.Namespace, device: torch.device
) -> list[dict[str, Any]]:
    """One row per mode for this batch size, both paths on the same inputs."""
    x = torch.randn(batch, args.in_dim, device=device)
    condition = torch.randint(0, args.conditions, (batch,), device=device)
    batched = partial(head, x, condition)
    looped = partial(loop_forward, head, x, condition)
    with torch.no_grad():
        diff = (batched() - looped()).abs().max().item()
    rows = []
    for mode in args.modes:
        timing = (args.repeats, args.warmup, device)
        batched_ms = median_ms(partial(step, batched, head, mode), *timing)
        loop_ms = median_ms(partial(step, looped, head, mode), *timing)
        rows.append(
            {
                "batch": batch,
                "mode": mode,
                "batched_ms": batched_ms,
                "loop_ms": loop_ms,
                "speedup": loop_ms / batched_ms,
                "max_abs_diff": diff,
            }
        )
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--in-dim", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--conditions", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/routing.json"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = default_device()
    head = ConditionalHead(args.in_dim, args.classes, args.conditions).to(device)
    rows = [row for batch in args.batch_sizes for row in bench_batch(head, batch, args, device)]
    print(
        markdown_table(
            ["batch", "mode", "batched ms", "loop ms", "speed-up", "max abs diff"],
            [
                [
                    r["batch"],
                    r["mode"],
                    f"{r['batched_ms']:.3f}",
                    f"{r['loop_ms']:.3f}",
                    f"{r['speedup']:.1f}x",
                    f"{r['max_abs_diff']:.1e}",
                ]
                for r in rows
            ],
        )
    )
    config = {k: v for k, v in vars(args).items() if k != "out"}
    write_json(args.out, {"machine": machine_info(device), "config": config, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
