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
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.builders import build_datasets, model_spec, trainer_settings
from experiments.schema import ConfigError, validate
from fusion.analysis.robustness import (
    Evaluator,
    metrics_table,
    plot_robustness,
    robustness,
    robustness_table,
)
from fusion.model import MultimodalModel
from fusion.training import load_checkpoint
from fusion.training.loaders import make_loaders
from fusion.training.recipe import FUSE_STATE, ModelSpec, build_model
from fusion.training.settings import resolve_device
from fusion.weights import load_weights

DEFAULT_LEVELS = (0.0, 0.25, 0.5, 1.0, 2.0)


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


def rebuild_model(spec: ModelSpec, tasks: Any, state: dict[str, Any]) -> MultimodalModel:
    """The stage-2 model as the recipe wires it, with every weight from `state`."""
    encoders = {modality: build() for modality, build in spec.encoders.items()}
    model = build_model(spec, encoders, tasks)
    load_weights(model, state)
    return model


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a training run's output directory")
    parser.add_argument("--split", default="test", help="a split of the run's data (default: test)")
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
    datasets = build_datasets(cfg.data)
    if args.split not in datasets:
        raise EvaluateError(f"--split {args.split}: the data has the splits {list(datasets)}")
    spec = model_spec(cfg.model, cfg.model.encoders)  # the run's resolved encoder configs
    train = datasets["train"]
    model = rebuild_model(spec, train.tasks, state["model"])
    loaders = make_loaders(datasets, trainer_settings(cfg), cfg.seed)
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
        report = robustness(evaluator, args.levels, train.modalities)
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
