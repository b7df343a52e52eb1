"""Thread policies on a quiet and on a shared machine: stage-1 training steps per policy.

    python -m experiments.bench_threads [--rounds 3] [--steps 40] [--out outputs/benchmarks/threads]

A stage-1 step of the default data's image model (ResNet-18 on 8x8 images, batch 64, fused
AdamW) is timed in a fresh process per measurement, since OpenMP reads its settings when it
loads. Each thread policy runs on a quiet machine, beside a busy process (one core spinning in
Python: another user's job) and beside a twin (the same training in another process with the
same policy: two runs of a sweep, or two processes of torchrun). Rounds repeat every
measurement in a rotated order, so the policies are compared side by side under the same
machine noise. The table gives each policy's median ms per step and its ratio to libgomp's
default on a quiet machine.

Policies: `libgomp default` (a thread at a barrier spins 300,000 iterations before it sleeps,
while the threads fit the cores), `ours (spin 1k)` (what every entry point sets,
`experiments/__init__.py`: 1,000), `spin 10k`, `passive` (`OMP_WAIT_POLICY=PASSIVE`: sleep at
once) and `1 thread` (`OMP_NUM_THREADS=1`, with our spinning).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

POLICIES = {
    "libgomp default": {"GOMP_SPINCOUNT": "300000"},
    "ours (spin 1k)": {},  # what experiments/__init__.py sets
    "spin 10k": {"GOMP_SPINCOUNT": "10000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
BASELINE = "libgomp default"
CONDITIONS = ("quiet", "busy", "twin")
THREAD_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
BUSY = "while True: pass"


def worker(steps: int, warmup: int, batch_size: int) -> None:
    """Time `steps` training steps after `warmup`; print the per-step milliseconds as JSON."""
    import torch
    import torch.nn.functional as F

    from experiments.bench_trainer import image_model
    from fusion.training.optim import default_optimizer

    model = image_model()
    optimizer = default_optimizer([{"params": list(model.parameters())}], 2e-3, 0.01)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (batch_size,), generator=generator)
    present = {"image": torch.ones(batch_size, dtype=torch.bool)}
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model({"image": images}, present), labels).backward()
        optimizer.step()
        if step >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({"step_ms": times, "threads": torch.get_num_threads()}))


def environment(policy: str) -> dict[str, str]:
    """This process's environment with only `policy`'s thread settings."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    return env | POLICIES[policy]


def measure(policy: str, condition: str, args: argparse.Namespace) -> dict[str, Any]:
    """One worker's step times under `policy`, beside the competitor `condition` names."""
    command = [sys.executable, "-m", "experiments.bench_threads", "--worker"]
    command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    competitor = None
    if condition == "busy":
        competitor = subprocess.Popen([sys.executable, "-c", BUSY])
    elif condition == "twin":  # as long as the measured run and then some
        twin = [*command[:-4], "--steps", str(args.steps * 3), "--batch-size", str(args.batch_size)]
        competitor = subprocess.Popen(twin, env=environment(policy), stdout=subprocess.DEVNULL)
    try:
        if competitor is not None:
            time.sleep(1.0)  # the competitor is running (the twin past its imports)
        result = subprocess.run(
            command, env=environment(policy), capture_output=True, text=True, check=False
        )
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if result.returncode != 0:
        raise SystemExit(f"worker ({policy}, {condition}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict[str, list[float]]], baseline: float) -> str:
    lines = [
        "| policy | " + " | ".join(f"{c} ms/step | {c} ratio" for c in CONDITIONS) + " |",
        "|---|" + "---:|---:|" * len(CONDITIONS),
    ]
    for policy, by_condition in results.items():
        cells = []
        for condition in CONDITIONS:
            median = statistics.median(by_condition[condition])
            cells += [f"{median:.1f}", f"{median / baseline:.2f}"]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/threads"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.steps, warmup=5, batch_size=args.batch_size)
        return None
    cells = list(itertools.product(POLICIES, CONDITIONS))
    results: dict[str, dict[str, list[float]]] = {p: {c: [] for c in CONDITIONS} for p in POLICIES}
    threads: dict[str, int] = {}
    for round_index in range(args.rounds):
        shift = round_index % len(cells)
        for policy, condition in cells[shift:] + cells[:shift]:
            found = measure(policy, condition, args)
            results[policy][condition].append(statistics.median(found["step_ms"]))
            threads[policy] = found["threads"]
            print(f"round {round_index + 1}: {policy}, {condition}: "
                  f"{results[policy][condition][-1]:.1f} ms", file=sys.stderr)  # fmt: skip
    baseline = statistics.median(results[BASELINE]["quiet"])
    text = table(results, baseline)
    print(text)
    report = {
        "cpus": os.cpu_count(),
        "threads": threads,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "median_step_ms": {
            p: {c: statistics.median(v) for c, v in r.items()} for p, r in results.items()
        },
        "per_round_ms": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "threads.md").write_text(text + "\n")
    (args.out / "threads.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'threads.json'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
