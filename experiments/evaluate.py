"""Evaluate a finished run's fused model, and how it holds up without or with noisy modalities.

    python -m experiments.evaluate outputs/runs/<run>                       # the test split
    python -m experiments.evaluate outputs/runs/<run> --split val
    python -m experiments.evaluate outputs/runs/<run> --robustness --levels 0 0.5 1 2

The model is rebuilt from the run's resolved `config.yaml` and loaded whole from
`checkpoints/best.pt`: nothing is trained and no stage-1 checkpoint is needed. Writes
`eval_<split>.json` under `--out` (default `<run>/eval`), with the keys `summary.json` uses.

`--robustness` (after MultiBench) takes each modality in turn and measures accuracy when it
is dropped (its `present` mask cleared) and when Gaussian noise is added to its input, with
std = level x that input's std on the split. Noise is drawn from a generator seeded with the
run's seed, the same draw for every level, so the curves differ only by the level. Writes
`robustness.json` and `robustness.png` next to the evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from data.avdigits import SPLITS
from fusion.batch import Batch
from experiments.schema import ConfigError, validate
from experiments.train import (
    FUSE_STATE,
    build_encoder,
    build_fused,
    make_loaders,
    reseed,
    resolve_device,
    resolve_precision,
    task_classes,
)
from fusion.model import MultimodalModel
from fusion.training import EpochMetrics, evaluate, load_checkpoint
from fusion.weights import load_weights

DEFAULT_LEVELS = (0.0, 0.25, 0.5, 1.0, 2.0)
Perturbation = Callable[[Batch], Batch]


class EvaluateError(Exception):
    """Something evaluation needs is missing; the message names it and says how to get it."""


def load_run(run_dir: Path) -> tuple[DictConfig, dict[str, Any]]:
    """The run's resolved config and its best checkpoint, or a message on how to make them."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise EvaluateError(
            f"{config} not found: `python -m experiments.train` writes it when a run starts; "
            "pass the directory of a training run"
        )
    best = run_dir / "checkpoints" / "best.pt"
    if not best.is_file():
        if (run_dir / "checkpoints" / FUSE_STATE).is_file():
            how = (
                "this run stopped before stage 2 finished; finish it with `python -m "
                f"experiments.train <the run's overrides> trainer.resume={run_dir}` "
                "and evaluate the new run"
            )
        else:
            how = "`python -m experiments.train` writes it when stage 2 finishes"
        raise EvaluateError(f"{best} not found: {how}")
    # through the schema, so a run from before a setting existed gets its default
    return validate(OmegaConf.load(config)), load_checkpoint(best, required=("model",))


def rebuild_model(
    cfg: DictConfig, state: dict[str, torch.Tensor], num_classes: int | dict[str, int]
) -> MultimodalModel:
    """The stage-2 model as `train.fused_model` wires it, with every weight from `state`."""
    encoders = {modality: build_encoder(cfg, modality) for modality in cfg.model.encoders}
    model = build_fused(cfg, encoders, num_classes)
    load_weights(model, state)
    return model


def drop(modality: str) -> Perturbation:
    """Mark `modality` missing in every sample, as a dataset without it would."""

    def apply(batch: Batch) -> Batch:
        present = {**batch.present, modality: torch.zeros_like(batch.present[modality])}
        return dataclasses.replace(batch, present=present)

    return apply


def add_noise(modality: str, std: float, seed: int) -> Perturbation:
    """Add N(0, std^2) to `modality`'s input; a fresh generator per call gives every level
    the same draw."""
    generator = torch.Generator().manual_seed(seed)

    def apply(batch: Batch) -> Batch:
        x = batch.inputs[modality]
        noisy = x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return dataclasses.replace(batch, inputs={**batch.inputs, modality: noisy})

    return apply


def input_std(batches: Iterable[Batch], modality: str) -> float | None:
    """The modality's input std over the samples that have it; None for non-tensor inputs."""
    count, total, squares = 0, 0.0, 0.0
    for batch in batches:
        x = batch.inputs[modality]
        if not isinstance(x, torch.Tensor):
            return None
        x = x[batch.present[modality]].double()
        count += x.numel()
        total += float(x.sum())
        squares += float(x.pow(2).sum())
    mean = total / max(count, 1)
    return math.sqrt(max(squares / max(count, 1) - mean**2, 0.0))


class Evaluator:
    """One model on one split: every pass starts from the run's seed, so passes differ only
    by their perturbation (the train split's augmentations draw from the global generator)."""

    def __init__(
        self,
        model: MultimodalModel,
        loaders: dict[str, DataLoader],
        split: str,
        seed: int,
        device: torch.device,
        precision: str = "32",
    ) -> None:
        self.model, self.loaders, self.split = model.to(device), loaders, split
        self.seed, self.device = seed, device
        self.precision = resolve_precision(precision, device)
        self.loss_weights = getattr(model.head, "loss_weights", None)

    def batches(self) -> DataLoader:
        reseed(self.seed, self.loaders)
        return self.loaders[self.split]

    def __call__(self, perturb: Perturbation | None = None) -> EpochMetrics:
        batches = self.batches()
        if perturb is not None:
            batches = map(perturb, batches)
        return evaluate(
            self.model,
            batches,
            self.device,
            loss_weights=self.loss_weights,
            precision=self.precision,
        )


def robustness(evaluator: Evaluator, levels: Sequence[float]) -> dict[str, Any]:
    """Accuracy per modality when dropped and at each noise level, with the clean accuracy."""
    modalities = evaluator.model.modalities
    stds = {m: input_std(evaluator.batches(), m) for m in modalities}
    report: dict[str, Any] = {
        "split": evaluator.split,
        "seed": evaluator.seed,
        "levels": list(levels),
        "clean_accuracy": evaluator().accuracy,
        "modalities": {},
    }
    for m in modalities:
        entry: dict[str, Any] = {"input_std": stds[m], "dropped": evaluator(drop(m)).accuracy}
        if stds[m] is None:
            entry["noise"] = None
            entry["note"] = "inputs are not tensors (e.g. text); no noise added"
        else:
            entry["noise"] = [
                evaluator(add_noise(m, level * stds[m], evaluator.seed)).accuracy
                for level in levels
            ]
        report["modalities"][m] = entry
    return report


def metrics_table(split: str, metrics: EpochMetrics) -> str:
    tasks = list(metrics.tasks)
    lines = [
        "| split | loss | accuracy |" + "".join(f" {t} |" for t in tasks),
        "|---|---:|---:|" + "---:|" * len(tasks),
        f"| {split} | {metrics.loss:.4f} | {metrics.accuracy:.2%} |"
        + "".join(f" {metrics.tasks[t]:.2%} |" for t in tasks),
    ]
    return "\n".join(lines)


def robustness_table(report: dict[str, Any]) -> str:
    """One row per modality: its input std, accuracy at each noise level, and when dropped."""
    levels = report["levels"]
    lines = [
        "| modality | input std |" + "".join(f" noise x{lv:g} |" for lv in levels) + " dropped |",
        "|---|---:|" + "---:|" * (len(levels) + 1),
    ]
    for m, entry in report["modalities"].items():
        noise = entry["noise"] or ["-"] * len(levels)
        std = "-" if entry["input_std"] is None else f"{entry['input_std']:.3g}"
        cells = [f"{a:.2%}" if isinstance(a, float) else a for a in noise]
        lines.append(f"| {m} | {std} | " + " | ".join(cells) + f" | {entry['dropped']:.2%} |")
    notes = [f"{m}: {e['note']}" for m, e in report["modalities"].items() if "note" in e]
    lines.append(f"\nclean accuracy on {report['split']}: {report['clean_accuracy']:.2%}")
    return "\n".join(lines + notes)


def plot_robustness(report: dict[str, Any], path: Path) -> None:
    """Accuracy against noise level, one line per modality, dashed at its dropped accuracy."""
    try:
        import matplotlib
    except ImportError as err:  # an optional dependency: evaluation runs without it
        raise EvaluateError(
            f"{path} needs matplotlib (pip install matplotlib); the JSON results are written"
        ) from err

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (m, entry) in enumerate(report["modalities"].items()):
        color = f"C{i}"
        if entry["noise"] is not None:
            ax.plot(report["levels"], entry["noise"], "o-", color=color, label=f"{m} noised")
        ax.axhline(entry["dropped"], color=color, linestyle="--", label=f"{m} dropped")
    ax.set_xlabel("noise std / input std")
    ax.set_ylabel(f"{report['split']} accuracy")
    ax.set_ylim(-0.02, 1.02)  # keep a line at 0 or 1 visible
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a training run's output directory")
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument("--robustness", action="store_true", help="drop and noise each modality")
    parser.add_argument(
        "--levels",
        type=float,
        nargs="+",
        default=list(DEFAULT_LEVELS),
        help="noise std as multiples of each input's std (with --robustness)",
    )
    parser.add_argument("--out", type=Path, help="output directory (default: <run_dir>/eval)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    if any(not math.isfinite(lv) or lv < 0 for lv in args.levels):
        parser.error(f"--levels must be finite and >= 0, got {args.levels}")
    args.levels = sorted(set(args.levels))
    return args


def run(args: argparse.Namespace) -> None:
    cfg, state = load_run(args.run_dir)
    out = args.out or args.run_dir / "eval"
    loaders = make_loaders(cfg)
    num_classes = task_classes(cfg, loaders[args.split].dataset)
    model = rebuild_model(cfg, state["model"], num_classes)
    evaluator = Evaluator(
        model, loaders, args.split, cfg.seed, resolve_device(args.device), cfg.trainer.precision
    )
    metrics = evaluator()
    print(metrics_table(args.split, metrics))
    write_json(
        out / f"eval_{args.split}.json",
        {
            "run_dir": str(args.run_dir),
            "split": args.split,
            "fuser": type(model.fuser).__name__,
            "head": type(model.head).__name__,
            **metrics.as_dict(f"{args.split}/fused"),
        },
    )
    if args.robustness:
        report = robustness(evaluator, args.levels)
        print(robustness_table(report))
        write_json(out / "robustness.json", report)
        plot_robustness(report, out / "robustness.png")
    print(f"written to {out}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (EvaluateError, ConfigError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
