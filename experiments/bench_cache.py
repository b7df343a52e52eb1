"""A fusion ablation with frozen encoders, with the feature cache and without.

    python -m experiments.bench_cache [--fusers concat gated attention film lmf transformer]
        [--epochs 10] [--out outputs/benchmarks/cache] [-- extra overrides ...]

Runs the real entry point twice as one Hydra multirun over the fusers: first with
`trainer.feature_cache.enabled=false`, then with it on, starting from an empty cache (so
the cached sweep pays for encoding every split once). Both reuse the same stage-1
encoders, which are trained once beforehand if missing (not timed). The table gives each
fuser's test accuracy both ways, the wall time of each sweep and their ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from experiments.benchmarking import machine_info, markdown_table, write_json

DEFAULT_FUSERS = ("concat", "gated", "attention", "film", "lmf", "transformer")
ROOT = Path(__file__).resolve().parents[1]


def sweep(out: Path, name: str, fusers: list[str], epochs: int, cached: bool, extra: list[str]):
    """One multirun of the entry point; returns its wall seconds and each job's summary."""
    sweep_dir = out / name
    shutil.rmtree(sweep_dir, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "experiments.train", "--multirun",
        f"model/fusion={','.join(fusers)}",
        f"trainer.fuse.epochs={epochs}",
        f"trainer.feature_cache.enabled={str(cached).lower()}",
        f"paths.feature_cache_dir={out / 'features'}",
        f"hydra.sweep.dir={sweep_dir}",
        "logger.mode=disabled",
        *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{name} sweep failed:\n{result.stderr[-4000:]}")
    summaries = {}
    for job in sorted(sweep_dir.iterdir()):
        if (job / "summary.json").is_file():
            summary = json.loads((job / "summary.json").read_text())
            summaries[summary["fuser"]] = summary
    if len(summaries) != len(fusers):
        raise SystemExit(f"{name} sweep: expected {len(fusers)} summaries, found {len(summaries)}")
    return seconds, summaries


def warm_stage_one(out: Path, extra: list[str]) -> None:
    """Make sure the stage-1 encoders exist, so neither timed sweep trains them."""
    cmd = [
        sys.executable, "-m", "experiments.train", "trainer.fuse.epochs=1",
        "trainer.feature_cache.enabled=false", "logger.mode=disabled",
        f"hydra.run.dir={out / 'warmup'}", *extra,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"warm-up run failed:\n{result.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusers", nargs="+", default=list(DEFAULT_FUSERS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/cache"))
    parser.add_argument("overrides", nargs="*", help="more overrides for every run, after --")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    shutil.rmtree(out / "features", ignore_errors=True)
    warm_stage_one(out, args.overrides)
    plain_s, plain = sweep(out, "uncached", args.fusers, args.epochs, False, args.overrides)
    cached_s, cached = sweep(out, "cached", args.fusers, args.epochs, True, args.overrides)
    metric = "test/fused/accuracy"
    rows = [
        [fuser, f"{plain[fuser][metric]:.2%}", f"{cached[fuser][metric]:.2%}",
         f"{100 * (cached[fuser][metric] - plain[fuser][metric]):+.2f}"]
        for fuser in plain
    ]  # fmt: skip
    rows.append(["**sweep wall time**", f"{plain_s:.1f} s", f"{cached_s:.1f} s", ""])
    print(markdown_table(["fuser", "uncached", "cached", "points"], rows))
    print(f"\ncached sweep {plain_s / cached_s:.1f}x faster ({len(args.fusers)} fusers, "
          f"{args.epochs} epochs, empty cache at start)")  # fmt: skip
    report = {
        "machine": machine_info(torch.device("cpu")),
        "fusers": args.fusers,
        "epochs": args.epochs,
        "overrides": args.overrides,
        "uncached_seconds": plain_s,
        "cached_seconds": cached_s,
        "speedup": plain_s / cached_s,
        "accuracy": {f: {"uncached": plain[f][metric], "cached": cached[f][metric]} for f in plain},
        "max_accuracy_difference": max(abs(cached[f][metric] - plain[f][metric]) for f in plain),
    }
    write_json(out / "cache.json", report)
    return report


if __name__ == "__main__":
    main()
