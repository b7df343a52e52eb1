"""A fusion ablation with frozen encoders, with the feature cache and without.

    python -m experiments.bench_cache [--fusers concat gated attention film lmf transformer]
        [--epochs 10] [--rounds 1] [--out outputs/benchmarks/cache] [-- extra overrides ...]

Runs the real entry point as one Hydra multirun over the fusers, three times: with
`trainer.feature_cache.enabled=false`; with the cache on, starting from an empty cache (the
sweep pays for encoding every split once: "cold"); and again with the cache that sweep
filled ("warm": a sweep extended or rerun later). All reuse the same stage-1 encoders,
trained once beforehand if missing (not timed). With `--rounds R` the three sweeps run R
times in turn (each round's cold sweep from an empty cache), so that a machine's drift
touches them alike. The first table gives each fuser's test accuracy (the same in every
round, or the benchmark fails), the median wall time of each sweep, and the median over
rounds of each round's speed-up, uncached / cached.

The second splits the jobs' time by phase, from each job's `timings.json` (`fusion.timing`):
the median over a sweep's jobs of each phase, the fixed cost of a job (everything but its
stage-2 epochs) and, per sweep, the time outside the jobs (starting Python, imports, Hydra
composing and launching, the checks of every job before the first starts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from experiments.benchmarking import machine_info, markdown_table, write_json
from experiments.builders import compose_config, unwritable
from experiments.schema import ConfigError
from fusion.timing import TIMINGS_FILE

DEFAULT_FUSERS = ("concat", "gated", "attention", "film", "lmf", "transformer")
ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ("uncached", "cached_cold", "cached_warm")
EPOCHS_PHASE = "stage 2 epochs"  # what a job of an ablation is for; the rest is fixed cost


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
    summaries, timings = {}, []
    for job in sorted(sweep_dir.iterdir()):
        if (job / "summary.json").is_file():
            summary = json.loads((job / "summary.json").read_text())
            summaries[summary["fuser"]] = summary
            timings.append(json.loads((job / TIMINGS_FILE).read_text()))
    if len(summaries) != len(fusers):
        raise SystemExit(f"{name} sweep: expected {len(fusers)} summaries, found {len(summaries)}")
    return seconds, summaries, timings


def phase_medians(rounds: list[tuple[float, list[dict[str, Any]]]]) -> dict[str, float]:
    """One sweep's medians over its jobs in every round (each round: the sweep's wall
    seconds and its jobs' timings): each phase, the job's total and its fixed cost (total
    minus the stage-2 epochs); and, median over rounds, the sweep's time outside its jobs."""
    timings = [t for _, jobs in rounds for t in jobs]
    phases = list(dict.fromkeys(p for t in timings for p in t["seconds"]))
    medians = {p: statistics.median(t["seconds"].get(p, 0.0) for t in timings) for p in phases}
    medians["job total"] = statistics.median(t["total"] for t in timings)
    medians["fixed cost per job"] = statistics.median(
        t["total"] - t["seconds"].get(EPOCHS_PHASE, 0.0) for t in timings
    )
    medians["outside the jobs (sweep)"] = statistics.median(
        seconds - sum(t["total"] for t in jobs) for seconds, jobs in rounds
    )
    return medians


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


def check_jobs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Compose every job's config before anything trains, so that a mistyped fuser or a bad
    override fails in a second, not after the stage-1 warm-up; and probe `--out`."""
    problem = unwritable(args.out)
    if problem:
        parser.error(f"argument --out: expected a folder this user can write to, found {problem}")
    for fuser in args.fusers:
        try:
            compose_config(f"model/fusion={fuser}", f"trainer.fuse.epochs={args.epochs}",
                           *args.overrides)  # fmt: skip
        except ConfigError as err:
            parser.error(f"config error: {err}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Overrides of experiments.train for every run go after --, e.g. "
        "-- data.max_samples=256 trainer.pretrain.epochs=2",
    )
    parser.add_argument(
        "--fusers", nargs="+", default=list(DEFAULT_FUSERS), help="model/fusion options to sweep"
    )
    parser.add_argument("--epochs", type=int, default=10, help="stage-2 epochs of each job")
    parser.add_argument("--rounds", type=int, default=1, help="the three sweeps, R times in turn")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/benchmarks/cache"),
        help="the benchmark's folder: its runs, feature cache and cache.json (replaced each time)",
    )
    parser.add_argument("overrides", nargs="*", help="overrides for every run, after --")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"argument --rounds: expected an integer >= 1, got {args.rounds}")
    check_jobs(parser, args)
    out = args.out.resolve()
    for owned in ("features", "warmup"):  # the benchmark's own, from an earlier run
        shutil.rmtree(out / owned, ignore_errors=True)
    warm_stage_one(out, args.overrides)
    rounds: dict[str, list[tuple[float, list[dict[str, Any]]]]] = {name: [] for name in SWEEPS}
    summaries: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        shutil.rmtree(out / "features", ignore_errors=True)  # the cold sweep starts empty
        for name in SWEEPS:
            seconds, found, timings = sweep(
                out, name, args.fusers, args.epochs, name != "uncached", args.overrides
            )
            if summaries.setdefault(name, found) != found:
                raise SystemExit(f"{name} sweep: its summaries differ from an earlier round's")
            rounds[name].append((seconds, timings))
    walls = {name: [seconds for seconds, _ in rounds[name]] for name in SWEEPS}
    wall = {name: statistics.median(values) for name, values in walls.items()}
    speedup = {
        name: statistics.median(p / c for p, c in zip(walls["uncached"], walls[name], strict=True))
        for name in SWEEPS[1:]
    }
    plain, cold, warm = (summaries[name] for name in SWEEPS)
    metric = "test/fused/accuracy"
    rows = [
        [fuser, f"{plain[fuser][metric]:.2%}", f"{cold[fuser][metric]:.2%}",
         f"{warm[fuser][metric]:.2%}"]
        for fuser in plain
    ]  # fmt: skip
    rows.append(["**sweep wall time**", *(f"{wall[name]:.1f} s" for name in SWEEPS)])
    rows.append(["**speed-up**", "1.0x", *(f"{speedup[name]:.1f}x" for name in SWEEPS[1:])])
    print(markdown_table(["fuser", "uncached", "cached (cold)", "cached (warm)"], rows))
    difference = max(abs(run[f][metric] - plain[f][metric]) for run in (cold, warm) for f in plain)
    print(f"\n{len(args.fusers)} fusers, {args.epochs} epoch(s) each, {args.rounds} round(s); "
          f"largest accuracy difference from uncached: {100 * difference:.2f} points\n")  # fmt: skip
    phases = {name: phase_medians(rounds[name]) for name in SWEEPS}
    names = list(dict.fromkeys(p for medians in phases.values() for p in medians))
    print(markdown_table(
        ["seconds (median per job)", "uncached", "cached (cold)", "cached (warm)"],
        [[p, *(f"{phases[s].get(p, 0.0):.3f}" for s in SWEEPS)] for p in names],
    ))  # fmt: skip
    report = {
        "machine": machine_info(torch.device("cpu")),
        "fusers": args.fusers,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "overrides": args.overrides,
        "seconds": walls,
        "median_seconds": wall,
        "speedup": speedup,
        "phases": phases,
        "accuracy": {f: {name: summaries[name][f][metric] for name in SWEEPS} for f in plain},
        "max_accuracy_difference": difference,
    }
    write_json(out / "cache.json", report)
    print(f"\nwritten to {out / 'cache.json'}")
    return report


if __name__ == "__main__":
    main()
