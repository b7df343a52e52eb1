"""Main job: pretrain one encoder per modality, then freeze them and train the fusion.

    python -m experiments.train                              # the built-in AV-Digits
    python -m experiments.train model/fusion=concat          # another fuser
    python -m experiments.train data=manifest data.path=pets.csv data.target=label

The recipe itself is `fusion.training.recipe`; this entry point composes the config, builds
the datasets, the encoders (one per modality of the data) and the tracker, and runs it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.types import RunMode
from omegaconf import MISSING, DictConfig, OmegaConf

from experiments.builders import (
    build_datasets,
    check_before_training,
    check_writable,
    compose_config,
    encoder_configs,
    model_spec,
    task_settings,
    trainer_settings,
    unwritable,
)
from experiments.schema import (
    FAILURE,
    RUN_MECHANICS,
    ConfigError,
    TrainConfig,
    config_differences,
    register_resolvers,
    validate,
)
from fusion.data import DataFileError, reader_message
from fusion.tasks import format_score
from fusion.timing import Stopwatch
from fusion.tracking import NullTracker, Tracker
from fusion.training import set_seed
from fusion.training.checkpoint import data_changes, data_record
from fusion.training.distributed import (
    SINGLE,
    Distributed,
    init_distributed,
    launched_processes,
    local_device,
)
from fusion.training.loaders import per_process_batch
from fusion.training.loop import NonFiniteError
from fusion.training.recipe import (
    ModelSpec,
    Outputs,
    Recipe,
    results_table,
    resume_path,
    resume_state,
)
from fusion.training.settings import resolve_device

log = logging.getLogger("fusion")
register_resolvers()

# What a resumed run may change: how it runs (`RUN_MECHANICS`), and trainer.fuse.epochs,
# which may grow (epochs to add, see `resume_state`).
RESUME_SAFE = (*RUN_MECHANICS, "trainer.fuse.epochs")


def run(
    cfg: DictConfig,
    run_dir: Path,
    group: str | None = None,
    tags: Sequence[str] = (),
    distributed: Distributed = SINGLE,
) -> dict[str, Any] | None:
    """Both stages and the final evaluation; returns the summary written to `summary.json`
    (None when stage 2 stopped early to be resumed). The wall time of each phase goes to
    `timings.json` (`fusion.timing`), whether the run finishes or fails.

    `group` and `tags` label the W&B run (a multirun's sweep, the values it overrides).
    With `distributed`, every process trains on its share of each batch and rank 0 alone
    writes files, logs and prints.
    """
    stopwatch = Stopwatch()
    trainer = trainer_settings(cfg)
    device = local_device(resolve_device(trainer.device), distributed)
    set_seed(cfg.seed)
    with stopwatch.phase("data"):
        datasets = build_datasets(cfg.data)
    with stopwatch.phase("checks"):
        spec, resumed_dir = prepare(cfg, datasets)
    tracker = NullTracker()
    if distributed.is_main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        with stopwatch.phase("tracker"):
            tracker = Tracker(
                run_dir,
                mode=cfg.logger.mode,
                project=cfg.logger.project,
                group=cfg.logger.group or group,
                name=run_dir.name,
                tags=[*cfg.tags, *tags],
                config=OmegaConf.to_container(cfg, resolve=True),
                resume_from=resumed_dir,
            )
    recipe = Recipe(
        datasets,
        spec,
        trainer,
        cfg.seed,
        Outputs(run_dir, Path(cfg.paths.pretrained_dir), Path(cfg.paths.feature_cache_dir)),
        tracker,
        device,
        distributed,
        log_every_n_steps=cfg.logger.log_every_n_steps,
        watch=cfg.logger.watch,
        tasks=task_settings(cfg),
        stopwatch=stopwatch,
    )
    failed = True
    try:
        summary = recipe.run(checkpoint_extra=checkpoint_record(cfg, datasets))
        failed = False
    finally:
        with stopwatch.phase("tracker"):
            wandb_line = tracker.finish(exit_code=int(failed))
        if distributed.is_main:
            stopwatch.write(run_dir)
    if summary is None or not distributed.is_main:
        return summary
    print(results_table(recipe.rows))
    if wandb_line:
        print(wandb_line)
    print(f"run directory: {run_dir}  |  fused {summary_score(summary)}")
    return summary


def prepare(cfg: DictConfig, datasets: dict[str, Any]) -> tuple[ModelSpec, Path | None]:
    """What a job checks once its datasets are built, before the recipe (`ConfigError`):
    the config against the data (`check_before_training`), the encoder configs filled from
    the data's modalities (into `cfg.model.encoders`) and a resumed run's config and data.
    Returns the model's builders and the resumed run's directory (None when not resuming)."""
    check_before_training(cfg, datasets)
    cfg.model.encoders = encoder_configs(cfg.model, datasets["train"].modalities)
    resumed_dir = check_resume(cfg, datasets)
    return model_spec(cfg.model, cfg.model.encoders), resumed_dir


def check_job(cfg: DictConfig, datasets: dict[str, Any]) -> None:
    """Everything a job refuses before it trains, without training: `prepare`, then the
    recipe's own check (every encoder built on CPU and given two validation items, the
    stage models' parameter globs, the monitored metrics). A multirun runs it for every
    job before the first starts."""
    spec, _ = prepare(cfg, datasets)
    trainer = trainer_settings(cfg)
    paths = cfg.paths
    outputs = Outputs(
        Path(paths.output_dir), Path(paths.pretrained_dir), Path(paths.feature_cache_dir)
    )
    device = resolve_device(trainer.device)
    Recipe(
        datasets, spec, trainer, cfg.seed, outputs, NullTracker(), device, tasks=task_settings(cfg)
    ).check_encoders()


def checkpoint_record(cfg: DictConfig, datasets: dict[str, Any]) -> dict[str, Any]:
    """What `best.pt` and the resumable state keep beside the weights so that
    `experiments.evaluate` can check it scores what the run scored, and a resumed run that
    it trains on what the run trained on: the config, each split's content key and, for
    the manifest, a digest per cell (`fusion.training.checkpoint.data_record`)."""
    return {"config": OmegaConf.to_container(cfg, resolve=True), **data_record(datasets)}


def summary_score(summary: dict[str, Any]) -> str:
    """The fused model's main score on the last evaluated split, for the closing line:
    `test accuracy: 93.75%`, `test mae: 0.4120`."""
    metric = summary["metric"]
    split = "test" if f"test/fused/{metric}" in summary else "val"
    return f"{split} {metric}: {format_score(metric, summary[f'{split}/fused/{metric}'])}"


def check_resume(
    cfg: DictConfig, datasets: dict[str, Any] | None = None, also_ignore: tuple[str, ...] = ()
) -> Path | None:
    """With `trainer.resume`, the resumed run's directory, after refusing (`ConfigError`)
    every change of a key outside `RESUME_SAFE`, and with `datasets`, every split whose
    content changed: the resumed state was trained under its stored config on its stored
    data, so a change would be ignored or mixed in while this run's config.yaml records it.

    The stored config is the copy inside `fuse_state.pt` (loaded as data, weights only);
    a state written before it held one is compared with its run's `config.yaml`. Keys
    under `also_ignore` are left out (before the data has filled `model.encoders`)."""
    if cfg.trainer.resume is None:
        return None
    path = resume_path(cfg.trainer.resume)
    run_dir = path.parent.parent
    state = resume_state(cfg.trainer.resume, cfg.trainer.fuse.epochs)
    changed = None if datasets is None else data_changes(state, datasets)
    if changed:
        raise ConfigError(
            f"config key 'trainer.resume': the data changed since {path} was written "
            f"({changed}; the config may be the same): a resumed run must train and select on "
            "the data it started with. Restore that data, or start a new run"
        )
    stored = state.get("config")
    if stored is None:
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(
                f"config key 'trainer.resume': {path} holds no config and "
                f"{run_dir / 'config.yaml'} does not exist; nothing to check this run against"
            )
        stored = OmegaConf.load(run_dir / "config.yaml")
    differences = config_differences(stored, cfg, ignore=(*RESUME_SAFE, *also_ignore))
    if differences:
        raise ConfigError(
            f"config key 'trainer.resume': {path} was trained with another config; the keys "
            f"that differ (stored -> this run): {'; '.join(differences)}. Resume with the "
            "stored values or start a new run; a resumed run may change only "
            f"{', '.join(RESUME_SAFE)} (trainer.fuse.epochs: raise only)"
        )
    return run_dir


def override_tags(hydra_cfg: DictConfig) -> list[str]:
    """The command line's overrides as W&B tags (the tracker cuts long ones to W&B's 64
    characters, as it does the config's `tags`)."""
    skip = ("hydra.", "logger.", "paths.", "trainer.resume")
    return [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith(skip)]


def join_processes(cfg: DictConfig) -> Distributed:
    """With `trainer.strategy=ddp`, join the processes the launcher started (torchrun, SLURM);
    quiet every process but rank 0."""
    if cfg.trainer.strategy != "ddp":
        if launched_processes() > 1:
            raise ConfigError(
                f"config key 'trainer.strategy': {launched_processes()} processes were "
                "launched, but the strategy is 'single'; add trainer=ddp"
            )
        return SINGLE
    try:
        distributed = init_distributed(cfg.trainer.backend, resolve_device(cfg.trainer.device))
    except ValueError as err:
        raise ConfigError(f"config key 'trainer.backend': {err}") from None
    if not distributed.enabled:
        log.warning(
            "trainer=ddp, but the launcher started one process: training on one; start N "
            "with `torchrun --nproc-per-node=N -m experiments.train trainer=ddp ...`"
        )
    if not distributed.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    per_process_batch(cfg.trainer.batch_size, distributed)
    return distributed


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    distributed = SINGLE
    try:
        cfg = validate(cfg)
        distributed = join_processes(cfg)
        hydra_cfg = HydraConfig.get()
        sweep = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
        run(cfg, Path(hydra_cfg.runtime.output_dir), sweep, override_tags(hydra_cfg), distributed)
    except ConfigError as err:
        stop(f"config error: {err}", 2, distributed)
    except DataFileError as err:
        stop(f"data error: {reader_message(err)}", 1, distributed)
    except NonFiniteError as err:  # raised on every process alike
        stop(f"training stopped: {err}", 1, distributed)
    except Exception as err:  # unforeseen: the traceback follows, the cause stays on record
        keep_failure(f"crashed: {type(err).__name__}: {err}".splitlines()[0], distributed)
        raise


def stop(message: str, code: int, distributed: Distributed) -> None:
    """End the run with one line on stderr (said once), kept in the run directory."""
    if distributed.is_main:
        print(message, file=sys.stderr)
    keep_failure(message, distributed)
    sys.exit(code)


def keep_failure(message: str, distributed: Distributed) -> None:
    """Write why the run ends without a result to its directory's `FAILURE` file, where
    `experiments.report` reads it (rank 0 alone)."""
    if distributed.is_main:
        with contextlib.suppress(OSError, ValueError):  # ValueError: no Hydra run (a test)
            (Path(HydraConfig.get().runtime.output_dir) / FAILURE).write_text(message + "\n")


def check_command_line(argv: Sequence[str]) -> None:
    """Check what the command line asks for before Hydra starts (`ConfigError`): overrides
    that cannot be parsed or flags after them, a run directory that already holds a run
    (Hydra would write over it), deleting a setting the schema would silently default, and
    the config each job composes, with close matches for a mistyped key or option. In a
    multirun, every value of every swept key is checked (each with the others' first
    values) as its job will run (`check_job`: its datasets, built once per data config, and
    its model), so a bad value fails before the first job trains. Left to Hydra: other
    config names, help, and its own errors."""
    args, unread = get_args_parser().parse_known_args(list(argv))
    if unread:
        raise ConfigError(
            f"command line: cannot read {unread}; flags (-m, --multirun, --cfg) go before the "
            "overrides: python -m experiments.train -m key=a,b"
        )
    if args.config_name not in (None, "train") or args.config_path or args.config_dir:
        return
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return
    parsed = parse_overrides(args.overrides)
    check_run_directory(parsed, args.multirun)
    parsed = [o for o in parsed if not o.is_hydra_override()]
    check_deletions(parsed)
    check_repeated(parsed)
    swept = [o for o in parsed if o.is_sweep_override()]
    if swept and not args.multirun:
        return
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in swept]
    firsts = [values[0] for values in choices]
    jobs = [fixed + firsts] + [
        fixed + firsts[:i] + [value] + firsts[i + 1 :]
        for i, values in enumerate(choices)
        for value in values[1:]
    ]
    composed = []
    for overrides in jobs:
        with named_job(overrides[len(fixed) :] if swept else None):
            try:
                cfg = compose_config(*overrides)
            except ConfigCompositionException:
                return  # Hydra says it in its own words
            check_writable(cfg.paths, cfg.trainer.feature_cache.enabled)  # Hydra writes there
            check_resume(cfg, also_ignore=("model.encoders",))  # filled from the data later
        composed.append((overrides[len(fixed) :], cfg))
    if len(composed) < 2:
        return  # a single job checks itself before it trains
    # Every job as it will run, data and model included; one data config's datasets at a
    # time (jobs grouped by it), so each is built once and let go before the next.
    by_data: dict[str, list] = {}
    for job, cfg in composed:
        by_data.setdefault(OmegaConf.to_yaml(cfg.data), []).append((job, cfg))
    for group in by_data.values():
        datasets = None
        for job, cfg in group:
            with named_job(job):
                datasets = datasets or build_datasets(cfg.data)
                check_job(cfg, datasets)


@contextlib.contextmanager
def named_job(job: Sequence[str] | None):
    """Name a multirun job's own overrides after a `ConfigError` or `DataFileError` raised
    while checking it (None: a single run, named by its config alone)."""
    try:
        yield
    except (ConfigError, DataFileError) as err:
        if job is None:
            raise
        raise type(err)(f"{err} (multirun job {' '.join(job)})") from None


def parse_overrides(lines: Sequence[str]) -> list[Override]:
    """The overrides, one by one, so that one Hydra cannot parse is named."""
    parsed = []
    for line in lines:
        try:
            parsed += OverridesParser.create().parse_overrides([line])
        except OverrideParseException as err:
            hint = parse_hint(line)
            raise ConfigError(
                f"override '{line}': Hydra cannot parse it ({str(err).splitlines()[0]}); {hint}"
            ) from None
    return parsed


def parse_hint(line: str) -> str:
    """What to change in an override Hydra cannot parse."""
    if "=" not in line and not line.startswith("~"):
        return "give it a value: key=value"
    key, _, value = line.partition("=")
    if value.lstrip().startswith(("{", "[")):
        return "in a dict, write keys without quotes: 'trainer.fuse.lr_mult={head.*: 0.1}'"
    quoted = f"{key}='{value}'" if "'" not in value else f'{key}="{value}"'
    shell = f'"{quoted}"' if '"' not in quoted else f"'{quoted}'"
    return (
        "quote a value that holds characters of Hydra's syntax (; , = : $ quotes, spaces): "
        f"{quoted}, in a shell around the whole override: {shell}"
    )


def check_run_directory(parsed: Sequence[Override], multirun: bool) -> None:
    """Refuse a `hydra.run.dir` (`hydra.sweep.dir`) that is not empty: Hydra would write over
    what it holds (a finished run, whose results a report would then credit to the new
    run's settings; the user's data); or one this user cannot create and write to."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [o for o in parsed if o.key_or_group == key and not o.is_sweep_override()]
    if not given or launched_processes() > 1:  # DDP's processes share one directory
        return
    folder = Path(str(given[-1].value()))
    held = sorted(folder.iterdir()) if folder.is_dir() else []
    if held:
        raise ConfigError(
            f"config key '{key}': {folder} is not empty (it holds {held[0]}); a "
            f"{'sweep' if multirun else 'run'} there would write over what it holds. Choose a "
            "new or empty folder (to continue a run, start a new one with "
            "trainer.resume=<its folder>)"
        )
    problem = unwritable(folder)
    if problem:
        raise ConfigError(
            f"config key '{key}': expected a folder this user can write to, found {problem}"
        )


def check_repeated(parsed: Sequence[Override]) -> None:
    """Say when a key is given twice with different values: Hydra takes the last, which is
    what a script that appends your overrides to its own wants, but a typo'd repeat would
    otherwise pass without a word."""
    seen: dict[str, str] = {}
    for override in parsed:
        key, line = override.key_or_group, override.input_line
        if key in seen and seen[key] != line:
            print(f"warning: {key} is given twice ('{seen[key]}', then '{line}'); the last is used",
                  file=sys.stderr)  # fmt: skip
        seen[key] = line


def check_deletions(parsed: Sequence[Override]) -> None:
    """Refuse `~key` for a setting the schema defines: the run would silently take the
    schema's default instead of what the config had."""
    schema = OmegaConf.structured(TrainConfig)
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() and OmegaConf.select(schema, key, default=MISSING) is not MISSING:
            raise ConfigError(
                f"override '~{key}': {key} has a default in the schema "
                f"({OmegaConf.select(schema, key)!r}) that would be used without a word; set "
                f"the value you want instead ({key}=...)"
            )


if __name__ == "__main__":
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    except DataFileError as err:
        print(f"data error: {reader_message(err)}", file=sys.stderr)
        sys.exit(1)
    main()
