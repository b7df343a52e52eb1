"""Helpers every benchmark script shares: machine description, timing, tables, JSON."""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, since platform.processor() is often empty."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a timing depends on, so numbers from different machines are not compared blindly."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    """CUDA kernels run asynchronously; wait for them so the clock measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of `fn` in milliseconds: robust to the odd slow run (GC, scheduler)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def interleaved_ms(
    fns: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    device: torch.device,
    min_sample_s: float = 0.002,
    max_calls: int = 1000,
    budget_s: float | None = None,
    min_rounds: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Per-call times in milliseconds of each function in `fns`: `rounds` samples each, taken
    in turn.

    Each round times every function once, in an order that rotates from round to round, so
    that a slow spell of a shared machine falls on all of them alike and the ratio of two
    functions' samples from one round is a fair comparison. A sample times the same number
    of calls for every function: enough for the fastest to last `min_sample_s` (at most
    `max_calls`), so that the clock's resolution and the timing's own cost do not count.
    With `budget_s`, fewer rounds (not under `min_rounds`) when `rounds` would take longer.
    `clock` is wall time by default; `time.thread_time` counts only the CPU time of this
    thread, which other jobs on the machine do not inflate (for single-threaded CPU work).
    """
    names = list(fns)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    once = {}
    for name, fn in fns.items():
        synchronize(device)
        start = clock()
        fn()
        synchronize(device)
        once[name] = clock() - start
    calls = max(1, min(max_calls, math.ceil(min_sample_s / max(min(once.values()), 1e-9))))
    if budget_s is not None:
        per_round = calls * sum(once.values())
        rounds = max(min(rounds, min_rounds), min(rounds, int(budget_s / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            synchronize(device)
            start = clock()
            for _ in range(calls):
                fn()
            synchronize(device)
            samples[name].append((clock() - start) * 1e3 / calls)
    return samples


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """The median of the per-round ratios of two `interleaved_ms` sample lists: each ratio
    compares samples taken side by side, so drift of the machine's speed cancels out."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
