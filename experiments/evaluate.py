"""Evaluate a finished run's fused model, and how it holds up without or with noisy modalities.

    python -m experiments.evaluate outputs/runs/<run>                       # the test split
    python -m experiments.evaluate outputs/runs/<run> --split val
    python -m experiments.evaluate outputs/runs/<run> --robustness --levels 0 0.5 1 2
    python -m experiments.evaluate outputs/runs/<run> --robustness --perturbations noise blur
    python -m experiments.evaluate outputs/runs/<run> --emap --contributions
    python -m experiments.evaluate outputs/runs/<run> --emap --emap-samples 500
    python -m experiments.evaluate outputs/runs/<run> --trust-target mypkg.MyEncoder

The model is rebuilt from the run's resolved `config.yaml` and loaded from
`checkpoints/best.pt`, nothing is trained. `best.pt` holds the fuser and head; encoders that
stayed frozen through stage 2 are read from the stage-1 checkpoints it names (by path, and
by the digest of their weights, which must match), looked for under their file names in
`--pretrained-dir` first, then at the recorded path, then in the run's `paths.pretrained_dir`. Writes
`eval_<split>.json` under `--out` (default `<run>/eval`), with the keys `summary.json` uses.

A run directory is data, perhaps someone else's: before anything is built, every `_target_`
in `config.yaml` must be one the project's own `configs/` tree names, a
`torchvision.transforms.v2` transform, or one trusted with `--trust-target` (Hydra's
`_args_`, `_recursive_` and `_convert_` are refused), and `config.yaml` must match the
config stored in `best.pt` (but for settings that do not change what is scored, such as
`logger.*`): an edited `config.yaml` would score something else than what was trained.

`--robustness` (after MultiBench) takes each modality in turn and measures accuracy when it
is dropped (its `present` mask cleared), when Gaussian noise is added to its input (std =
level x that input's std on the split), and under each perturbation of its kind at the levels
in [0, 1] (`fusion.analysis.perturbations`: occlusion, blur, contrast, salt and pepper for
images; noise at an SNR, time shift, clipping for audio; typos, word dropout for text; column
dropout for tables); `--perturbations` names the ones to run (default: all that fit). Every
perturbation draws from a generator seeded with the run's seed, the same draw for every
level, so the curves differ only by the level. Each curve gets its relative robustness (its
mean score over the levels in [0, 1]; `fusion.analysis.robustness`). Writes
`robustness_<split>.json` and `robustness_<split>.png` next to the evaluation.

`--emap` (Hessel & Lee, EMNLP 2020) scores the model next to its empirical multimodally-
additive projection, the best model without cross-modal interactions on the split: a large
gap says the model uses interactions (`fusion.analysis.interaction`). It runs the fuser and
head N^M times (N samples, M modalities); `--emap-samples K` projects a random subset of K
samples, drawn with the run's seed. `--contributions` gives each modality's Shapley value of
the main score, with only some modalities present (`fusion.analysis.contributions`). They
write `emap_<split>.json` and `.png`, `contributions_<split>.json` and `.png`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from experiments.builders import (
    CONFIG_DIR,
    build_datasets,
    model_spec,
    task_settings,
    trainer_settings,
    unwritable,
)
from experiments.schema import RUN_MECHANICS, ConfigError, config_differences, validate
from fusion.analysis.contributions import contributions, contributions_table, plot_contributions
from fusion.analysis.interaction import emap, emap_table, plot_emap
from fusion.analysis.perturbations import NAMES as PERTURBATIONS
from fusion.analysis.robustness import (
    Evaluator,
    asked_perturbations,
    metrics_table,
    modality_kinds,
    plot_robustness,
    robustness,
    robustness_table,
)
from fusion.data import DataFileError, reader_message
from fusion.model import MultimodalModel
from fusion.tasks import objectives_for
from fusion.training import load_checkpoint
from fusion.training.checkpoint import CheckpointError
from fusion.training.feature_cache import data_key
from fusion.training.loaders import make_loaders
from fusion.training.optim import resolve
from fusion.training.recipe import FUSE_STATE, ModelSpec, build_model, stage1_encoders
from fusion.training.settings import DEVICE, DEVICES, resolve_device
from fusion.weights import load_weights, uninitialized

DEFAULT_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0, 2.0)
TRANSFORMS = "torchvision.transforms.v2"
# Hydra keys that would call a target another way than the project's configs do.
REFUSED_KEYS = ("_args_", "_recursive_", "_convert_")
DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


class EvaluateError(Exception):
    """Something evaluation needs is missing; the message names it and says how to get it."""


def mappings(node: Any, key: str = "") -> Iterator[tuple[str, dict]]:
    """Every mapping in a plain config, at any depth and inside lists, with its dotted key."""
    if isinstance(node, dict):
        yield key, node
        for name, value in node.items():
            yield from mappings(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from mappings(value, f"{key}[{index}]")


@functools.cache
def project_targets() -> frozenset[str]:
    """Every `_target_` the project's own `configs/` tree names: its builders."""
    targets = set()
    for path in CONFIG_DIR.rglob("*.yaml"):
        config = OmegaConf.to_container(OmegaConf.load(path))
        targets.update(node["_target_"] for _, node in mappings(config) if "_target_" in node)
    return frozenset(targets)


def is_transform(target: str) -> bool:
    """Whether `target` names a `torchvision.transforms.v2` transform class (augmentation)."""
    module, _, name = target.rpartition(".")
    if module != TRANSFORMS:
        return False
    from torchvision.transforms import v2

    candidate = getattr(v2, name, None)
    return isinstance(candidate, type) and issubclass(candidate, v2.Transform)


def is_optim(target: str) -> bool:
    """Whether `target` names a `torch.optim` optimizer or scheduler class (a stage's
    settings, which `fusion.training.optim` resolves by attribute lookup, never imports)."""
    for kind in ("optimizer", "scheduler"):
        try:
            resolve({"_target_": target}, kind)
        except ValueError:
            continue
        return True
    return False


def check_targets(config: dict[str, Any], trusted: Collection[str], source: Path) -> None:
    """Refuse, before anything is imported or built, a config from `source` that would
    instantiate anything but the project's builders, transforms and `trusted` targets."""
    for key, node in mappings(config):
        where = f"{source}: config key '{key}." if key else f"{source}: config key '"
        refused = [k for k in REFUSED_KEYS if k in node]
        if refused:
            raise EvaluateError(
                f"{where}{refused[0]}': evaluate refuses Hydra's {', '.join(REFUSED_KEYS)} in a "
                "run's config (the project's configs never use them; its builders take "
                "named arguments)"
            )
        if "_partial_" in node and not isinstance(node["_partial_"], bool):
            raise EvaluateError(
                f"{where}_partial_': expected true or false, found {node['_partial_']!r}"
            )
        if "_target_" not in node:
            continue
        target = node["_target_"]
        if not isinstance(target, str):
            raise EvaluateError(
                f"{where}_target_': expected a dotted name, found a {type(target).__name__}"
            )
        if target not in (*project_targets(), *trusted) and not (
            is_transform(target) or is_optim(target)
        ):
            raise EvaluateError(
                f"{where}_target_' names '{target}', which evaluate does not build: a run "
                f"directory is data, so only the project's own builders (the _target_ values "
                f"under configs/) and {TRANSFORMS} transforms are built from it. If you trust "
                f"'{target}' (your own component), pass --trust-target {target}"
            )


def read_config(path: Path) -> dict[str, Any]:
    """A run's `config.yaml` as a plain mapping, interpolations resolved (so what is checked
    is what is built)."""
    try:
        loaded = OmegaConf.load(path)
        config = OmegaConf.to_container(loaded, resolve=True)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        reason = str(err).splitlines()[0]
        raise EvaluateError(
            f"{path} is not valid YAML ({reason}): expected the run's config, as "
            "`python -m experiments.train` writes it"
        ) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise EvaluateError(
            f"{path}: config key '{key}' cannot be resolved: {str(err).splitlines()[0]}"
        ) from None
    if not isinstance(config, dict) or not config:
        found = f"a {type(config).__name__}" if config else "nothing"
        raise EvaluateError(
            f"{path}: expected a mapping of the config groups (data, model, trainer, ...), "
            f"found {found}"
        )
    return config


def check_stored_config(stored: Any, config: dict[str, Any], best: Path, source: Path) -> None:
    """Refuse a `config.yaml` that differs from the config `best.pt` was trained with (but in
    `RUN_MECHANICS` settings): the model would be rebuilt and scored as something else."""
    if not isinstance(stored, dict):
        raise EvaluateError(
            f"{best}: expected the run's config (a mapping) under 'config', found a "
            f"{type(stored).__name__}"
        )
    try:
        stored = OmegaConf.to_container(OmegaConf.create(stored), resolve=True)
    except OmegaConfBaseException as err:
        raise EvaluateError(
            f"{best}: the stored config cannot be resolved: {str(err).splitlines()[0]}"
        ) from None
    differences = config_differences(stored, config, ignore=RUN_MECHANICS)
    if differences:
        raise EvaluateError(
            f"{source} differs from the config stored in {best}, which trained the model, "
            f"at {len(differences)} key(s) (stored -> config.yaml):\n  "
            + "\n  ".join(differences)
            + "\nevaluating would score another model or data than the run's; restore "
            "config.yaml, or train a run with the new settings"
        )


def load_run(run_dir: Path, trusted: Collection[str] = ()) -> tuple[DictConfig, dict[str, Any]]:
    """The run's checked config and its best checkpoint, or a message on how to make them."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        runs = sorted(p.parent.name for p in run_dir.glob("*/config.yaml"))
        inside = (
            f"; the runs inside it: {runs[:5]}{' ...' if len(runs) > 5 else ''}" if runs else ""
        )
        raise EvaluateError(
            f"{config} not found: `python -m experiments.train` writes it when a run starts; "
            f"pass the directory of a training run{inside}"
        )
    best = run_dir / "checkpoints" / "best.pt"
    if best.is_dir():
        raise EvaluateError(f"{best}: expected the run's best checkpoint, a file; found a folder")
    if not best.is_file():
        if (run_dir / "summary.json").is_file():
            how = (
                "the run finished (its summary.json is there), but its best checkpoint is gone: "
                "it cannot be evaluated again; train it again to get one"
            )
        elif (run_dir / "checkpoints" / FUSE_STATE).is_file():
            how = (
                "this run stopped before stage 2 finished; finish it with `python -m "
                f"experiments.train <the run's overrides> trainer.resume={run_dir}` "
                "and evaluate the new run"
            )
        else:
            how = "`python -m experiments.train` writes it when stage 2 finishes"
        raise EvaluateError(f"{best} not found: {how}")
    resolved = read_config(config)
    check_targets(resolved, trusted, config)
    state = load_checkpoint(best, required=("model", "config"))
    check_stored_config(state["config"], resolved, best, config)
    # through the schema, so a run from before a setting existed gets its default
    return validate(OmegaConf.create(resolved)), state


def rebuild_model(
    spec: ModelSpec,
    tasks: Any,
    state: dict[str, Any],
    prefer: Sequence[Path] = (),
    fallback: Sequence[Path] = (),
) -> MultimodalModel:
    """The stage-2 model as the recipe wires it, with every weight from `best.pt`'s `state`
    and the stage-1 checkpoints it names (`stage1_encoders`: looked for in `prefer`, at the
    recorded path, then in `fallback`). Built without initialising weights: the strict
    load refuses any it does not fill."""
    try:
        stage1 = stage1_encoders(state.get("encoders", {}), prefer, fallback)
    except CheckpointError as err:
        raise EvaluateError(
            f"{err}. Put them back, pass --pretrained-dir DIR (a folder holding them under "
            "these names), or train the run's config again to rebuild them (on CPU the same "
            "seed gives the same weights)"
        ) from None
    weights = {**stage1, **state["model"]}
    with uninitialized():
        encoders = {modality: build() for modality, build in spec.encoders.items()}
        model = build_model(spec, encoders, tasks)
    load_weights(model, weights)
    return model


def data_changed(state: dict[str, Any], split: str, dataset: Any) -> str | None:
    """Why the split evaluated now is not the one the run evaluated (its files or items
    changed since), said and kept in the result; None when it is the same, or when the
    checkpoint holds no key for it (the train split, or a run from before keys were kept)."""
    stored = state.get("data_keys", {}).get(split)
    if stored is None or stored == data_key(dataset):
        return None
    message = (
        f"the {split} split's content differs from the one the run evaluated (its files or "
        "items changed since training); these metrics are for the data as it is now"
    )
    return message


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
        help="perturbation levels (with --robustness): noise std as multiples of each input's "
        "std, the other perturbations' strength in [0, 1] (they skip levels above 1; default: "
        f"{' '.join(map(str, DEFAULT_LEVELS))})",
    )
    parser.add_argument(
        "--perturbations",
        nargs="+",
        choices=PERTURBATIONS,
        metavar="NAME",
        help="with --robustness: the perturbations to run, each on the modalities whose kind it "
        f"fits (default: all that fit; {', '.join(PERTURBATIONS)})",
    )
    parser.add_argument(
        "--emap",
        action="store_true",
        help="score the model's additive projection (EMAP): does it use cross-modal interactions?",
    )
    parser.add_argument(
        "--emap-samples",
        type=int,
        metavar="K",
        help="with --emap: project a random subset of K samples (seeded by the run's seed; "
        "default: every sample that has all modalities)",
    )
    parser.add_argument(
        "--contributions",
        action="store_true",
        help="each modality's Shapley value of the score, from runs with only some present",
    )
    parser.add_argument("--out", type=Path, help="output directory (default: <run_dir>/eval)")
    parser.add_argument(
        "--pretrained-dir",
        type=Path,
        help="a folder holding the run's stage-1 checkpoints (under their file names), looked "
        "in first; then the path the run recorded, then the run's paths.pretrained_dir",
    )
    parser.add_argument("--device", default="auto", help=DEVICES)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace results an earlier evaluation left in --out (refused without it)",
    )
    parser.add_argument(
        "--trust-target",
        action="append",
        default=[],
        metavar="TARGET",
        help="a _target_ of your own that the run's config may build (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.levels is not None and not args.robustness:
        parser.error("argument --levels: it sets the noise of --robustness, which is not given")
    if args.perturbations is not None and not args.robustness:
        parser.error(
            "argument --perturbations: it chooses those of --robustness, which is not given"
        )
    if args.emap_samples is not None and not args.emap:
        parser.error("argument --emap-samples: it sets the samples of --emap, which is not given")
    if args.emap_samples is not None and args.emap_samples < 2:
        parser.error(f"argument --emap-samples: expected an integer >= 2, got {args.emap_samples}")
    args.levels = list(DEFAULT_LEVELS) if args.levels is None else args.levels
    if any(not math.isfinite(lv) or lv < 0 for lv in args.levels):
        parser.error(f"argument --levels: expected finite values >= 0, got {args.levels}")
    args.levels = sorted(set(args.levels))
    if not args.run_dir.is_dir():
        found = "is a file" if args.run_dir.exists() else "does not exist"
        parser.error(
            f"argument run_dir: expected a training run's directory, {args.run_dir} {found}"
        )
    for target in args.trust_target:
        parse_trusted(parser, target)
    if args.pretrained_dir is not None and not args.pretrained_dir.is_dir():
        found = "is a file" if args.pretrained_dir.exists() else "does not exist"
        parser.error(
            f"argument --pretrained-dir: expected a folder of stage-1 checkpoints, "
            f"{args.pretrained_dir} {found}"
        )
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: expected a directory, {args.out} is a file")
    analyses = {
        "robustness": args.robustness,
        "emap": args.emap,
        "contributions": args.contributions,
    }
    held = [p.name for p in output_files(args.out, args.split, **analyses) if p.exists()]
    if args.out is not None and held and not args.overwrite:
        parser.error(
            f"argument --out: {args.out} already holds {', '.join(held)}, which this evaluation "
            "would overwrite; nothing was written. Choose another folder, or pass --overwrite "
            "to replace them"
        )
    args.device = parse_device(parser, args.device)
    return args


def output_files(
    out: Path | None,
    split: str,
    robustness: bool,
    emap: bool = False,
    contributions: bool = False,
) -> list[Path]:
    """What an evaluation writes into `out` (none without one: the run's own eval/ folder,
    where a new evaluation replaces the last)."""
    if out is None:
        return []
    names = [f"eval_{split}.json"]
    for analysis, wanted in (
        ("robustness", robustness),
        ("emap", emap),
        ("contributions", contributions),
    ):
        names += [f"{analysis}_{split}.json", f"{analysis}_{split}.png"] * wanted
    return [out / name for name in names]


def parse_trusted(parser: argparse.ArgumentParser, target: str) -> None:
    """A `--trust-target` must name something importable: a typo would otherwise pass
    silently and the config's target be refused with advice to trust it."""
    if not DOTTED_NAME.fullmatch(target):
        parser.error(
            f"argument --trust-target: expected a dotted name (module.Name), got '{target}'"
        )
    try:
        get_method(target)
    except (ImportError, ValueError) as err:
        reason = " ".join(str(err).splitlines()[1:]) or str(err)
        parser.error(f"argument --trust-target: cannot import '{target}': {reason}")


def parse_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """`--device` as a torch device, or an error naming `--device` (not `trainer.device`)."""
    if not DEVICE.fullmatch(name):
        hint = "; did you mean 'cuda'?" if name.lower() == "gpu" else ""
        parser.error(f"argument --device: expected {DEVICES}, got '{name}'{hint}")
    try:
        return resolve_device(name)
    except ConfigError as err:
        reason = str(err).split(": ", 1)[-1]
        parser.error(f"argument --device: {reason}; --device auto uses what this machine has")


def run(args: argparse.Namespace) -> None:
    cfg, state = load_run(args.run_dir, args.trust_target)
    out = args.out or args.run_dir / "eval"
    problem = unwritable(out)
    if problem:
        option = "--out" if args.out else "run_dir (its eval/ folder; or pass --out)"
        raise EvaluateError(f"{option}: expected a folder this user can write to, found {problem}")
    datasets = build_datasets(cfg.data)
    if args.split not in datasets:
        raise EvaluateError(f"--split {args.split}: the data has the splits {list(datasets)}")
    spec = model_spec(cfg.model, cfg.model.encoders)  # the run's resolved encoder configs
    train = datasets["train"]
    prefer = [args.pretrained_dir] if args.pretrained_dir else []
    model = rebuild_model(spec, train.tasks, state, prefer, [Path(cfg.paths.pretrained_dir)])
    loaders = make_loaders(datasets, trainer_settings(cfg), cfg.seed)
    changed = data_changed(state, args.split, datasets[args.split])
    try:
        objectives = objectives_for(train.tasks, task_settings(cfg))
    except ValueError as err:
        raise EvaluateError(f"{args.run_dir / 'config.yaml'}: {ConfigError.keyed(err)}") from None
    if args.robustness:
        kinds = modality_kinds(model.modalities, train.modalities)
        try:
            asked_perturbations(args.perturbations, kinds, args.levels)
        except ValueError as err:
            raise EvaluateError(f"--perturbations: {err}") from None
    evaluator = Evaluator(
        model, loaders, args.split, cfg.seed, args.device, cfg.trainer.precision, objectives
    )
    metrics = evaluator()
    print(metrics_table(args.split, metrics))
    if changed:
        print(f"evaluate: warning: {changed}", file=sys.stderr)
    write_json(
        out / f"eval_{args.split}.json",
        {
            "run_dir": str(args.run_dir),
            "split": args.split,
            "fuser": type(model.fuser).__name__,
            "head": type(model.head).__name__,
            **metrics.as_dict(f"{args.split}/fused"),
            **({"data_changed": changed} if changed else {}),
        },
    )
    if args.robustness:
        report = robustness(evaluator, args.levels, train.modalities, args.perturbations)
        print(robustness_table(report))
        write_json(out / f"robustness_{args.split}.json", report)
        plot_robustness(report, out / f"robustness_{args.split}.png")
    if args.emap:
        try:
            report = emap(evaluator, args.emap_samples)
        except ValueError as err:
            raise EvaluateError(f"--emap: {err}") from None
        print(f"\n{emap_table(report)}")
        write_json(out / f"emap_{args.split}.json", report)
        plot_emap(report, out / f"emap_{args.split}.png")
    if args.contributions:
        try:
            report = contributions(evaluator)
        except ValueError as err:
            raise EvaluateError(f"--contributions: {err}") from None
        print(f"\n{contributions_table(report)}")
        write_json(out / f"contributions_{args.split}.json", report)
        plot_contributions(report, out / f"contributions_{args.split}.png")
    print(f"written to {out}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (EvaluateError, ConfigError, CheckpointError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    except DataFileError as err:
        print(f"evaluate: data error: {reader_message(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
