"""The two-stage transfer-learning recipe, for any dataset on `fusion.data`'s contract.

Stage 1 trains each modality's encoder with a linear head on that modality alone and saves
it under `pretrained_dir`, keyed by a hash of everything that shaped it (the encoder's
settings and the files they name, the data's content, the stage-1 target, the recipe,
the seed and the precision), so a later run with the same inputs reuses it and any change
retrains it. Stage 2 loads those encoders, freezes them, trains the fuser and head (on
cached features where it can), and every model is evaluated on every split but train.

Everything here takes plain objects (datasets, builders, `TrainerConfig`); the entry
points in `experiments/` turn configs into those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from fusion.auxiliary import AuxiliaryLosses, AuxiliaryTraining
from fusion.batch import Batch, Collate
from fusion.contrastive import check_pairs, pair_name
from fusion.data import Task, file_digest, fingerprint, output_sizes
from fusion.encoders.base import Encoder
from fusion.freezing import GradualUnfreezing, set_trainable
from fusion.fusers import ConcatFuser
from fusion.heads import ClassificationHead, MultiTaskHead
from fusion.imbalance import OGMGE, GradientBlending
from fusion.model import FuserFactory, HeadFactory, MultimodalModel
from fusion.surgery import param_groups
from fusion.tasks import (
    CLASSIFICATION,
    Objective,
    format_score,
    lower_is_better,
    main_metric,
    objectives_for,
)
from fusion.timing import Stopwatch
from fusion.tracking import Tracker
from fusion.training.align import AlignmentModel, evaluate_alignment, fit_alignment
from fusion.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fusion.training.distributed import SINGLE, Distributed
from fusion.training.feature_cache import data_key
from fusion.training.loaders import (
    cached_loaders,
    fuse_datasets,
    loader_warnings,
    make_loaders,
    reseed,
)
from fusion.training.loop import EpochMetrics, evaluate, fit, predict
from fusion.training.monitor import check_monitor
from fusion.training.optim import DEFAULT_OPTIMIZER
from fusion.training.settings import (
    AuxiliaryConfig,
    ConfigError,
    StageConfig,
    TrainerConfig,
    resolve_precision,
)
from fusion.weights import load_weights, uninitialized

log = logging.getLogger("fusion")

FUSE_STATE = "fuse_state.pt"
# Part of every key of trained weights; raised when the same settings come to train other
# weights. 2: the default AdamW is fused, and the checks before stage 1 draw nothing from the
# run's random state. 3: each stage-1 model is built after reseeding (not from the state the
# previous modality left), and its checkpoint records the digest of its weights.
RECIPE_VERSION = 3


@dataclass
class ModelSpec:
    """The model's parts as builders: an encoder per modality, the fuser and head factories.

    `encoder_configs[m]` is the configuration encoder m was built from (a plain dict): it
    keys the stage-1 and feature caches, with the content of every file it names.
    """

    encoders: Mapping[str, Callable[[], Encoder]]
    encoder_configs: Mapping[str, Any]
    fuser: FuserFactory
    head: HeadFactory
    modality_dropout: Mapping[str, float] | None = None


@dataclass
class Outputs:
    """Where a run reads and writes: its own directory and the caches runs share."""

    run_dir: Path
    pretrained_dir: Path
    feature_cache_dir: Path


@dataclass
class Row:
    """One line of the results table: a model, what it predicts, its metrics per split."""

    model: str
    target: str
    metrics: dict[str, EpochMetrics]
    objectives: Mapping[str, Objective]


@dataclass
class Stage1:
    """A modality's stage-1 result: its checkpoint, the key it was trained under
    (`pretrain_key`), the digest of the weights it holds (`fingerprint` of the state, stored
    in it: it keys the encoder's cached features and `best.pt`'s reference to it without
    hashing the weights again), and the model."""

    path: Path
    key: str
    weights: str
    model: MultimodalModel


def fused_state(model: MultimodalModel, referenced: Mapping[str, Stage1]) -> dict[str, Any]:
    """What `best.pt` holds of the model: its state without the encoders in `referenced`
    (frozen through stage 2, so exactly their stage-1 weights), which it names instead,
    by checkpoint path, key and weights digest (`"encoders"`; `stage1_encoders` reads them)."""
    prefixes = tuple(f"encoders.{m}." for m in referenced)
    return {
        "model": {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)},
        "encoders": {
            m: {"path": str(s.path.resolve()), "key": s.key, "weights": s.weights}
            for m, s in referenced.items()
        },
    }


def stage1_encoders(
    references: Mapping[str, Mapping[str, str]],
    prefer: Sequence[Path] = (),
    fallback: Sequence[Path] = (),
) -> dict[str, torch.Tensor]:
    """The encoder weights a `best.pt` names (`fused_state`), as entries of the fused
    model's state (`encoders.<modality>.*`), read from the stage-1 checkpoints.

    Each checkpoint is looked for under its file name in the folders of `prefer`, then at
    its recorded path, then in the folders of `fallback`; a file that cannot be read, or
    holds another encoder than the run's, is passed over. Raises `CheckpointError` naming
    every modality left without its encoder, with each place looked in and what is there."""
    state: dict[str, torch.Tensor] = {}
    missing = []
    for modality, reference in references.items():
        recorded = Path(reference["path"])
        places = [
            *(Path(folder).resolve() / recorded.name for folder in prefer),
            recorded,
            *(Path(folder).resolve() / recorded.name for folder in fallback),
        ]
        found = {}
        for path in dict.fromkeys(places):
            entries, problem = stage1_entries(path, modality, reference)
            if entries is not None:
                state.update(entries)
                break
            found[path] = problem
        else:
            seen = "; ".join(f"{path}: {problem}" for path, problem in found.items())
            missing.append(f"modality '{modality}' ({recorded.name}): {seen}")
    if missing:
        raise CheckpointError(
            "the run's stage-1 encoders were not found (best.pt holds the fuser and head, and "
            "names the checkpoints of the frozen encoders): " + ". ".join(missing)
        )
    return state


def stage1_entries(
    path: Path, modality: str, reference: Mapping[str, str]
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """`modality`'s encoder entries in the checkpoint at `path` when it is the one
    `reference` names (same key and weights digest), else None and what is there."""
    if not path.is_file():
        return None, "a folder" if path.is_dir() else "not there"
    try:
        stored = load_checkpoint(path, required=("model",))
    except CheckpointError as err:
        return None, str(err).removeprefix(f"checkpoint {path} ")
    prefix = f"encoders.{modality}."
    entries = {k: v for k, v in stored["model"].items() if k.startswith(prefix)}
    if not entries:
        others = sorted({k.split(".")[1] for k in stored["model"] if k.startswith("encoders.")})
        return None, f"a stage-1 checkpoint of {others or 'no encoder'}, not of '{modality}'"
    key, wanted = stored.get("fingerprint"), reference.get("key")
    if wanted is not None and key != wanted:
        return None, (
            f"another stage-1 encoder of '{modality}' (key {key}, the run's {wanted}: other "
            "encoder settings, data, recipe or seed)"
        )
    weights = stored.get("weights") or fingerprint(stored["model"])
    if weights != reference["weights"]:
        return None, (
            f"the run's encoder trained again, to other weights (digest {weights}, the run's "
            f"{reference['weights']}; training on a GPU is not bit-exact)"
        )
    return entries, ""


def build_model(
    spec: ModelSpec, encoders: Mapping[str, Encoder], tasks: Mapping[str, Task]
) -> MultimodalModel:
    """Encoders, the configured fuser and head sized for `tasks`, and modality dropout."""
    return MultimodalModel.build(
        encoders,
        fuser=spec.fuser,
        head=spec.head,
        num_classes=output_sizes(tasks),
        modality_dropout=spec.modality_dropout,
    )


def stage1_target(dataset: Any, modality: str) -> tuple[str, dict[str, Task]]:
    """What stage 1 teaches `modality`'s encoder: its own target when the data declares one
    (`modality_tasks`), else the dataset's tasks."""
    own = getattr(dataset, "modality_tasks", {}) or {}
    if modality in own:
        name, task = own[modality]
        return name, {name: task}
    return ", ".join(dataset.tasks), dict(dataset.tasks)


def stage1_labels(dataset: Any, modality: str) -> Callable[[Batch], Any]:
    """The batch's labels for `modality`'s stage-1 target."""
    own = modality in (getattr(dataset, "modality_tasks", {}) or {})

    def targets(batch: Batch) -> torch.Tensor | dict[str, torch.Tensor]:
        if not own:
            return batch.targets
        if batch.modality_targets is None or modality not in batch.modality_targets:
            raise ValueError(
                f"the data declares a stage-1 target for modality '{modality}', but its items "
                "carry no modality_targets for it"
            )
        return batch.modality_targets[modality]

    return targets


def unimodal_model(encoder: Encoder, modality: str, tasks: Mapping[str, Task]) -> MultimodalModel:
    """Stage-1 model: the encoder and a linear classifier per task on its features."""
    head = ClassificationHead if len(tasks) == 1 else MultiTaskHead
    return MultimodalModel.build(
        {modality: encoder}, fuser=ConcatFuser, head=head, num_classes=output_sizes(tasks)
    )


def with_file_contents(config: Any) -> Any:
    """`config` with every string that names an existing file paired with its content hash,
    so a cache keyed on it changes when the file does, not only when its name does."""
    if isinstance(config, Mapping):
        return {k: with_file_contents(v) for k, v in config.items()}
    if isinstance(config, list | tuple):
        return [with_file_contents(v) for v in config]
    if isinstance(config, str) and os.path.isfile(config):
        return {"file": config, "sha256": file_digest(config)}
    return config


def pretrain_key(
    encoder_config: Any,
    datasets: Mapping[str, Any],
    target: tuple[str, dict[str, Task]],
    trainer: TrainerConfig,
    seed: int,
    aligned: str | None = None,
) -> str:
    """Everything that shapes a stage-1 encoder: its settings and the files they name, the
    content of the splits it trains and is selected on, its target, the recipe (and the
    default optimizer's kernel), the seed and the precision."""
    recipe = dataclasses.asdict(trainer.pretrain)
    recipe.pop("reuse")
    return fingerprint(
        "stage1",
        with_file_contents(encoder_config),
        data_key(datasets["train"]),
        data_key(datasets["val"]),
        target[0],
        {name: dataclasses.asdict(task) for name, task in target[1].items()},
        recipe,
        RECIPE_VERSION,
        DEFAULT_OPTIMIZER,
        trainer.batch_size,
        seed,
        trainer.precision,
        *([] if aligned is None else ["probe of aligned encoder", aligned]),
    )


def align_key(
    encoder_configs: Mapping[str, Any],
    datasets: Mapping[str, Any],
    trainer: TrainerConfig,
    seed: int,
) -> str:
    """What the alignment stage's encoders depend on: the aligned encoders' configs (with
    their files' contents), the train and val data, the stage's settings and the seed."""
    return fingerprint(
        "align",
        {m: with_file_contents(c) for m, c in encoder_configs.items()},
        data_key(datasets["train"]),
        data_key(datasets["val"]),
        dataclasses.asdict(trainer.align),
        RECIPE_VERSION,
        DEFAULT_OPTIMIZER,
        trainer.batch_size,
        seed,
        trainer.precision,
    )


def retrieval_labels(tasks: Mapping[str, Task]) -> Callable[[Batch], torch.Tensor | None]:
    """Retrieval by label (an item of the same class is a hit) when the data has one
    multiclass or binary task, else by pair."""
    kinds = [t.kind for t in tasks.values()]
    by_label = len(kinds) == 1 and kinds[0] in CLASSIFICATION
    return lambda batch: batch.targets if by_label else None


PATTERN_SETTINGS = ("lr_mult", "weight_decay_for")


def own_patterns(model: MultimodalModel, patterns: Mapping[str, float] | None) -> dict:
    """The globs that match a parameter of `model`: stage 1 trains one model per modality,
    and a glob for one modality's encoder (`encoders.image.*`) has nothing to match in the
    others. `check_patterns` has made sure each glob matches in some model of its stage."""
    names = [name for name, _ in model.named_parameters()]
    return {p: v for p, v in (patterns or {}).items() if fnmatch.filter(names, p)}


def check_patterns(stage_name: str, stage: StageConfig, models: Sequence[MultimodalModel]):
    """Refuse a `lr_mult` / `weight_decay_for` glob that matches no parameter of any model
    the stage trains, naming the config key, before anything trains."""
    names = [name for model in models for name, _ in model.named_parameters()]
    for setting in PATTERN_SETTINGS:
        for pattern in getattr(stage, setting) or {}:
            if not fnmatch.filter(names, pattern):
                raise ConfigError(
                    f"config key 'trainer.{stage_name}.{setting}': pattern '{pattern}' matches "
                    f"no parameter of the models stage '{stage_name}' trains; names look like "
                    f"{names[:3]} ... {names[-2:]}"
                )


def optimizer_groups(model: MultimodalModel | AuxiliaryTraining, stage: StageConfig) -> list[dict]:
    """Parameter groups for one stage: lr multipliers, L2 per part, layer-wise decay. The
    globs are on the model's parameter names; auxiliary heads (`fusion.auxiliary`) train at
    the stage's lr and weight decay."""
    if isinstance(model, AuxiliaryTraining):
        groups = optimizer_groups(model.model, stage)
        if model.auxiliary is not None:
            groups += param_groups(model.auxiliary, lr=stage.lr, weight_decay=stage.weight_decay)
        return groups
    return param_groups(
        model,
        lr=stage.lr,
        weight_decay=stage.weight_decay,
        lr_mult=own_patterns(model, stage.lr_mult),
        weight_decay_for=own_patterns(model, stage.weight_decay_for),
        layer_decay=stage.layer_decay,
        decay_roots=[f"encoders.{m}.backbone" for m in model.encoders],
    )


def accelerate(model: MultimodalModel, trainer: TrainerConfig) -> None:
    """Channels-last memory for convolutions and `torch.compile`, as the trainer asks.

    Both keep parameter names (compiling in place adds no `_orig_mod.` prefix), so
    checkpoints load the same with or without them.
    """
    if trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    if trainer.compile:
        model.compile()


def unfreeze_schedule(model: MultimodalModel, unfreeze: Any):
    """A `before_epoch` hook thawing each encoder's backbone stages, last ones first."""
    if unfreeze is None:
        return None
    settings = dataclasses.asdict(unfreeze) if dataclasses.is_dataclass(unfreeze) else unfreeze
    schedules = [
        GradualUnfreezing(encoder.backbone, **settings) for encoder in model.encoders.values()
    ]

    def step(epoch: int) -> None:
        for modality, schedule in zip(model.encoders, schedules, strict=True):
            thawed = schedule.step(epoch)
            log.info("epoch %d: %s backbone stages trainable: %s", epoch, modality, thawed)

    return step


def epoch_start(trained: Any, unfreeze: Callable[[int], None] | None):
    """Stage 2's `before_epoch` hook: the unfreezing schedule, then the epoch for OGM-GE."""
    if not isinstance(trained, AuxiliaryTraining):
        return unfreeze

    def start(epoch: int) -> None:
        if unfreeze is not None:
            unfreeze(epoch)
        trained.start_epoch(epoch)

    return start


def epoch_end(trained: Any, log_epoch: Callable[[int, dict[str, float]], None]):
    """Stage 2's `on_epoch` hook: log the epoch, then re-estimate Gradient-Blending's
    weights from it (said in the log)."""
    if not isinstance(trained, AuxiliaryTraining):
        return log_epoch

    def end(epoch: int, metrics: dict[str, float]) -> None:
        log_epoch(epoch, metrics)
        weights = trained.end_epoch(epoch, metrics)
        if weights is not None:
            shown = ", ".join(f"{name} {w:.3f}" for name, w in weights.items())
            log.info("epoch %d: Gradient-Blending weights from now on: %s", epoch, shown)

    return end


def step_logger(tracker: Tracker, prefix: str, every: int):
    """An `on_step` hook logging the training loss every `every` steps."""
    step = 0

    def log_step(loss: float) -> None:
        nonlocal step
        step += 1
        if step % every == 0:
            tracker.log({f"{prefix}/step": step, f"{prefix}/train/step_loss": loss})

    return log_step


def resume_path(resume: str) -> Path:
    """The stage-2 state `trainer.resume` names: a run directory's, or the file itself."""
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / FUSE_STATE
    if not path.is_file():
        raise ConfigError(f"config key 'trainer.resume': no stage-2 state at {path}")
    return path


def resume_state(resume: str | None, epochs: int) -> dict | None:
    """The stage-2 state to continue from: `trainer.resume` is a run directory or a file.

    `trainer.fuse.epochs` may grow on resume (epochs to add: `fit` stretches the cosine
    schedule and says so), never shrink."""
    if resume is None:
        return None
    path = resume_path(resume)
    try:
        state = load_checkpoint(path, required=("epoch", "epochs", "model", "optimizer", "rng"))
    except ValueError as err:  # corrupt, or not a stage-2 state: the setting names it
        raise ConfigError(f"config key 'trainer.resume': {err}") from None
    if epochs < state["epochs"]:
        raise ConfigError(
            f"config key 'trainer.fuse.epochs': {path} was written for trainer.fuse.epochs="
            f"{state['epochs']}, this run asks for {epochs}; on resume it can only be raised "
            "(epochs to add)"
        )
    if state.get("stopped_early"):
        raise ConfigError(
            f"config key 'trainer.resume': {path} stopped early after epoch {state['epoch']} "
            "(trainer.fuse.early_stopping: its monitored metric had stopped improving), so "
            "the run is finished; nothing to resume"
        )
    if state["epoch"] >= epochs:
        raise ConfigError(
            f"config key 'trainer.resume': {path} finished all {state['epoch']} epochs of stage "
            f"2 already; nothing to resume. To train it further, raise trainer.fuse.epochs "
            f"above {state['epoch']}"
        )
    return state


class Recipe:
    """Both stages and the evaluation of one run.

    `datasets` maps each split name to that split (see `fusion.data`): "train" trains,
    "val" selects the best epoch, and every split but "train" is evaluated. `tasks`
    (`{task name: settings}`, see `fusion.tasks.objectives_for`) sets each task's loss and
    metrics; tasks not named get their kind's defaults. With `distributed`, every process
    trains on its share of each batch and rank 0 alone writes files and logs.
    """

    def __init__(
        self,
        datasets: Mapping[str, Any],
        spec: ModelSpec,
        trainer: TrainerConfig,
        seed: int,
        outputs: Outputs,
        tracker: Tracker,
        device: torch.device,
        distributed: Distributed = SINGLE,
        log_every_n_steps: int = 10,
        watch: str | None = None,
        tasks: Mapping[str, Mapping[str, Any]] | None = None,
        stopwatch: Stopwatch | None = None,
    ) -> None:
        self.datasets, self.spec, self.trainer, self.seed = dict(datasets), spec, trainer, seed
        self.stopwatch = stopwatch or Stopwatch()  # wall time per phase (`fusion.timing`)
        self.outputs, self.tracker, self.device = outputs, tracker, device
        self.distributed = distributed
        self.log_every, self.watch = log_every_n_steps, watch
        self.train_data = self.datasets["train"]
        self.tasks: dict[str, Task] = dict(self.train_data.tasks)
        self.task_settings = dict(tasks or {})
        self.objectives = self.objectives_for(self.tasks)
        self.eval_splits = [s for s in self.datasets if s != "train"]
        self.rows: list[Row] = []  # the results table's lines, once `run` has finished
        self.aligned: str | None = None  # the alignment stage's key, once it has run
        self.align_summary: dict[str, float] = {}
        self.weights: dict[str, str] = {}  # each stage-1 encoder's weights digest, once known
        self.precision = resolve_precision(trainer.precision, device)

    def objectives_for(self, tasks: Mapping[str, Task]) -> dict[str, Objective]:
        """Each task's objective, from the run's `tasks` settings: every setting names a
        task of the data; a stage-1 target of its own takes the settings of its name."""
        settings = self.task_settings if tasks is self.tasks else {}
        if tasks is not self.tasks:
            settings = {n: v for n, v in self.task_settings.items() if n in tasks}
        try:
            return objectives_for(tasks, settings)
        except ValueError as err:
            raise ConfigError.keyed(err) from None

    def loaders(self, model: MultimodalModel, datasets: Mapping[str, Any]) -> dict[str, DataLoader]:
        return cached_loaders(
            model,
            datasets,
            self.trainer,
            self.seed,
            str(self.outputs.feature_cache_dir),
            self.spec.encoder_configs,
            self.device,
            self.distributed,
            weights=self.weights,
        )

    def fit_stage(
        self,
        model: MultimodalModel | AuxiliaryTraining,
        loaders,
        stage: StageConfig,
        objectives: Mapping[str, Objective],
        **kwargs,
    ):
        return fit(
            model,
            loaders["train"],
            loaders["val"],
            epochs=stage.epochs,
            lr=stage.lr,
            weight_decay=stage.weight_decay,
            groups=optimizer_groups(model, stage),
            device=self.device,
            precision=self.precision,
            distributed=self.distributed,
            find_unused_parameters=self.trainer.find_unused_parameters,
            nonfinite=self.trainer.nonfinite,
            monitor=stage.monitor_for(objectives),
            objectives=objectives,
            accumulate=stage.accumulate,
            clip_grad_norm=stage.clip_grad_norm,
            optimizer_spec=stage.optimizer,
            scheduler_spec=stage.scheduler,
            warmup_epochs=stage.warmup_epochs,
            **kwargs,
        )

    def evaluate(
        self, model: MultimodalModel, loaders, objectives: Mapping[str, Objective], **kwargs
    ) -> dict[str, EpochMetrics]:
        return {
            split: evaluate(
                model,
                loaders[split],
                self.device,
                precision=self.precision,
                distributed=self.distributed,
                objectives=objectives,
                **kwargs,
            )
            for split in self.eval_splits
        }

    def check_encoders(self) -> None:
        """Every encoder takes its modality's inputs, and every `lr_mult` / `weight_decay_for`
        glob matches a parameter of its stage: checked on two validation items and the
        stage models before anything trains, so an image encoder given audio or a mistyped
        glob fails now, not after stage 1.

        The models built for the check draw from a forked random state, so the run's
        numbers are the same with or without it, and their weights are left uninitialised
        (only shapes and names are looked at)."""
        val = self.datasets["val"]
        batch = Collate.for_dataset(val)([val[i] for i in range(min(2, len(val)))])
        with torch.random.fork_rng(devices=[]), uninitialized():
            encoders = {m: build() for m, build in self.spec.encoders.items()}
            stage1 = [
                unimodal_model(encoder, m, stage1_target(self.train_data, m)[1])
                for m, encoder in encoders.items()
            ]
            fused = build_model(self.spec, encoders, self.tasks)
            self.with_auxiliary(fused)
        for modality, encoder in encoders.items():
            try:
                encoder.check_input(batch.inputs[modality], modality)
            except (TypeError, ValueError) as err:
                kind = self.train_data.modalities[modality].kind
                target = (self.spec.encoder_configs.get(modality) or {}).get("_target_", "?")
                raise ConfigError(
                    f"config key 'model.encoders.{modality}': {err}. '{modality}' is a modality "
                    f"of kind '{kind}'; its encoder is {target}: is that an encoder for {kind}?"
                ) from None
        check_patterns("pretrain", self.trainer.pretrain, stage1)
        check_patterns("fuse", self.trainer.fuse, [fused])
        self.check_monitors()
        self.align_pairs()

    def with_auxiliary(self, model: MultimodalModel) -> MultimodalModel | AuxiliaryTraining:
        """`model` with stage 2's auxiliary losses, OGM-GE and Gradient-Blending
        (`trainer.fuse.auxiliary`, `.ogm_ge`, `.gradient_blending`) for training, or
        `model` itself without them."""
        fuse = self.trainer.fuse
        if fuse.auxiliary is None and fuse.ogm_ge is None and fuse.gradient_blending is None:
            return model
        settings = fuse.auxiliary or AuxiliaryConfig()
        unimodal = 1.0 if fuse.gradient_blending is not None else settings.unimodal
        auxiliary = modulation = blending = None
        try:
            if unimodal or settings.contrastive:
                auxiliary = AuxiliaryLosses(
                    {m: encoder.out_dim for m, encoder in model.encoders.items()},
                    self.objectives,
                    unimodal=unimodal,
                    contrastive=settings.contrastive,
                    pairs=settings.pairs,
                    projection_dim=settings.projection_dim,
                    temperature=settings.temperature,
                    loss_weights=getattr(model.head, "loss_weights", None),
                )
        except ValueError as err:
            raise ConfigError.keyed(err, "trainer.fuse.auxiliary.") from None
        if fuse.ogm_ge is not None:
            try:
                modulation = OGMGE(
                    model.modalities, self.objectives, **dataclasses.asdict(fuse.ogm_ge)
                )
            except ValueError as err:
                raise ConfigError(f"config key 'trainer.fuse.ogm_ge': {err}") from None
        if fuse.gradient_blending is not None:
            blending = GradientBlending(model.modalities, fuse.gradient_blending.every)
        return AuxiliaryTraining(model, auxiliary, modulation, blending).to(self.device)

    def align_pairs(self) -> list[tuple[str, str]]:
        """`trainer.align.pairs` as modality pairs of the data (none without alignment)."""
        if self.trainer.align is None:
            return []
        try:
            return check_pairs(self.trainer.align.pairs, list(self.spec.encoders))
        except ValueError as err:
            raise ConfigError.keyed(err, "trainer.align.") from None

    def align(self, loaders: dict[str, DataLoader]) -> dict[str, Encoder]:
        """The alignment stage (`trainer.align`): the pairs' encoders trained together with
        InfoNCE (or reused from a checkpoint of the same key), and their retrieval metrics
        on every evaluated split for the summary (`<split>/align/<a>_to_<b>/R@1`, ...)."""
        settings = self.trainer.align
        pairs = self.align_pairs()
        modalities = list(dict.fromkeys(m for pair in pairs for m in pair))
        configs = {m: self.spec.encoder_configs.get(m) for m in modalities}
        key = align_key(configs, self.datasets, self.trainer, self.seed)
        path = self.outputs.pretrained_dir / f"align-{key}.pt"
        model = AlignmentModel(
            {m: self.spec.encoders[m]() for m in modalities},
            pairs,
            settings.projection_dim,
            settings.temperature,
        )
        labels = retrieval_labels(self.tasks)
        state = None
        if self.trainer.pretrain.reuse and path.is_file():
            try:
                state = load_checkpoint(path, required=("model", "fingerprint"))
            except CheckpointError as err:
                log.warning("align: %s; aligning again", err)
        if state is not None and state["fingerprint"] == key:
            try:
                model.load_state_dict(state["model"])
                log.info("align: reusing %s", path)
            except RuntimeError as err:  # written by an older layout of the model
                log.warning("align: %s does not fit the model (%s); aligning again", path, err)
                state = None
        if state is None or state["fingerprint"] != key:
            reseed(self.seed, loaders, self.distributed)
            log.info("align: training %s with InfoNCE", ", ".join(map(pair_name, pairs)))
            tracker = self.tracker
            result = fit_alignment(
                model,
                loaders["train"],
                loaders["val"],
                epochs=settings.epochs,
                lr=settings.lr,
                weight_decay=settings.weight_decay,
                device=self.device,
                labels=labels,
                on_epoch=lambda _, m: tracker.log({f"align/{k}": v for k, v in m.items()}),
                distributed=self.distributed,
            )
            if self.distributed.is_main:
                save_checkpoint(path, {"model": model.cpu().state_dict(), "fingerprint": key,
                                       "best": result.best})  # fmt: skip
                model.to(self.device)
            self.distributed.barrier()
        for split in self.eval_splits:
            self.align_summary.update(
                evaluate_alignment(
                    model, loaders[split], self.device, labels, f"{split}/align", self.distributed
                )
            )
        self.aligned = key
        return {m: model.encoders[m] for m in modalities}

    def check_monitors(self) -> None:
        """Each stage's `monitor` is a metric that stage computes for every model it trains
        (stage 1: each modality's target), before anything trains."""
        stage1 = [
            self.objectives_for(stage1_target(self.train_data, m)[1]) for m in self.spec.encoders
        ]
        for name, targets in (("pretrain", stage1), ("fuse", [self.objectives])):
            for objectives in targets:
                stage = getattr(self.trainer, name)
                try:
                    check_monitor(stage.monitor_for(objectives).metric, objectives)
                except ValueError as err:
                    raise ConfigError(f"config key 'trainer.{name}.monitor': {err}") from None

    def pretrain(
        self, modality: str, loaders: dict[str, DataLoader], aligned: Encoder | None = None
    ) -> Stage1:
        """Stage 1 for one modality: its encoder trained with a linear head on its target, or
        reused from the checkpoint of the same key. An `aligned` encoder (from the alignment
        stage) stays frozen: only its linear probe trains.

        The stage starts from the seed alone, so an encoder does not depend on what ran
        before it (another modality trained now or read from its checkpoint). A reused
        encoder is built without initialising its weights, which the checkpoint replaces."""
        target = stage1_target(self.train_data, modality)
        key = pretrain_key(
            self.spec.encoder_configs.get(modality), self.datasets, target, self.trainer,
            self.seed, self.aligned if aligned is not None else None,
        )  # fmt: skip
        path = self.outputs.pretrained_dir / f"{modality}-{key}.pt"
        state = None
        if self.trainer.pretrain.reuse and path.is_file():
            try:
                state = load_checkpoint(path, required=("model", "fingerprint"))
            except CheckpointError as err:  # a damaged cache file: trained again, said aloud
                log.warning("stage 1 [%s]: %s; retraining the encoder", modality, err)
            if state is not None and state["fingerprint"] != key:
                log.info("stage 1 [%s]: %s has another fingerprint, retraining", modality, path)
                state = None
        reuse = self.distributed.gather(state is not None)[0]  # every process follows rank 0
        reseed(self.seed, loaders, self.distributed)
        with uninitialized() if reuse else contextlib.nullcontext():
            encoder = aligned if aligned is not None else self.spec.encoders[modality]()
            model = unimodal_model(encoder, modality, target[1])
        if aligned is not None:
            encoder.freeze()
        model.to(self.device)
        if reuse:
            load_weights(model, state["model"])
            log.info("stage 1 [%s]: reusing %s", modality, path)
            return Stage1(path, key, state.get("weights") or fingerprint(state["model"]), model)
        summary = model.summary()
        self.tracker.log_text(f"model_summary_{modality}", summary)
        log.info("stage 1 [%s]: training encoder on %s\n%s", modality, target[0], summary)
        accelerate(model, self.trainer)
        tracker = self.tracker
        best = self.fit_stage(
            model,
            loaders,
            self.trainer.pretrain,
            self.objectives_for(target[1]),
            targets=stage1_labels(self.train_data, modality),
            on_epoch=lambda _, m: tracker.log(
                {f"pretrain/{modality}/{k}": v for k, v in m.items()}
            ),
            on_step=step_logger(tracker, f"pretrain/{modality}", self.log_every),
            desc=f"pretrain {modality}",
        ).best
        weights = model.cpu().state_dict()
        digest = fingerprint(weights)
        if self.distributed.is_main:
            save_checkpoint(
                path, {"model": weights, "fingerprint": key, "weights": digest, "best": best}
            )
        model.to(self.device)
        self.distributed.barrier()  # the checkpoint exists for every process from here on
        return Stage1(path, key, digest, model)

    def fused_model(self, stage1: Mapping[str, Stage1]) -> MultimodalModel:
        """Stage-2 model: the stage-1 encoders, frozen, with a new fuser and head.

        With `trainer.fuse.unfreeze`, the encoders start frozen parameter by parameter
        instead, so that the schedule can thaw their backbones' stages (frozen batch norms
        keep their statistics until their stage thaws).
        """
        encoders = {}
        for modality, trained in stage1.items():
            encoder = trained.model.encoders[modality]
            if self.trainer.fuse.unfreeze is None:
                encoder.freeze()
            else:
                encoder.unfreeze()
                set_trainable(encoder, False)
            encoders[modality] = encoder
        return build_model(self.spec, encoders, self.tasks).to(self.device)

    def run(self, checkpoint_extra: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """Both stages and the evaluation; the run's summary, or None when stage 2 stopped
        early (`trainer.stop_after_epochs`) and can be resumed. `checkpoint_extra` is stored
        in `best.pt` and the resumable stage-2 state beside the weights (the entry point
        stores the run's config, which a resumed run is checked against)."""
        time = self.stopwatch.phase
        loader_warnings(self.trainer)
        loaders = make_loaders(self.datasets, self.trainer, self.seed, self.distributed)
        with time("checks"):
            self.check_encoders()
        with time("alignment"):
            aligned = self.align(loaders) if self.trainer.align is not None else {}
        stage1: dict[str, Stage1] = {}
        rows: list[Row] = []
        for modality in self.spec.encoders:
            with time("stage 1"):
                stage1[modality] = self.pretrain(modality, loaders, aligned.get(modality))
            with time("stage 1 evaluation"):
                rows.append(self.evaluate_unimodal(modality, stage1[modality]))
        reseed(self.seed, loaders, self.distributed)  # the fuser and head: from the seed alone
        with time("stage 2 setup"):
            model = self.fused_model(stage1)
        outcome = self.fuse(model, stage1, checkpoint_extra)
        if outcome is None:
            return None
        fused, details = outcome
        self.rows = [*rows, fused]
        summary = {**run_summary(self.rows, fused), **details}
        summary["checkpoints"] = {m: str(s.path) for m, s in stage1.items()}
        self.tracker.update_summary(summary)
        return summary

    def evaluate_unimodal(self, modality: str, trained: Stage1) -> Row:
        """The results-table line of a stage-1 model: its metrics on every evaluated split
        (read from the feature cache: the encoder is frozen from here on)."""
        self.weights[modality] = trained.weights
        unimodal = trained.model
        unimodal.encoders[modality].freeze()
        evaluation = self.loaders(unimodal, {s: self.datasets[s] for s in self.eval_splits})
        name, tasks = stage1_target(self.train_data, modality)
        objectives = self.objectives_for(tasks)
        metrics = self.evaluate(
            unimodal, evaluation, objectives, targets=stage1_labels(self.train_data, modality)
        )
        return Row(f"{modality} only", name, metrics, objectives)

    def fuse(
        self,
        model: MultimodalModel,
        stage1: Mapping[str, Stage1],
        checkpoint_extra: Mapping[str, Any] | None,
    ) -> tuple[Row, dict[str, Any]] | None:
        """Stage 2: train `model`'s fuser and head, keep `best.pt`, evaluate. Returns the
        fused model's line of the results table and what the summary says of it, or None
        when stopped early to be resumed."""
        time = self.stopwatch.phase
        fuse = self.trainer.fuse
        with time("stage 2 setup"):
            fuser_name = type(model.fuser).__name__
            summary_text = model.summary()
            self.tracker.log_text("model_summary", summary_text)
            encoders = "frozen" if fuse.unfreeze is None else "gradually thawed"
            log.info(
                "stage 2: training %s with %s encoders\n%s", fuser_name, encoders, summary_text
            )
            fuse_loaders = self.loaders(model, fuse_datasets(self.datasets, fuse.views))
            loss_weights = getattr(model.head, "loss_weights", None)
            self.tracker.watch(model, self.watch)
            accelerate(model, self.trainer)
            run_dir = self.outputs.run_dir
            resume = resume_state(self.trainer.resume, fuse.epochs)
            if resume is not None:
                log.info(
                    "stage 2: resuming %s after epoch %d", self.trainer.resume, resume["epoch"]
                )
            trained = self.with_auxiliary(model)
        tracker = self.tracker
        with time("stage 2 epochs"):
            result = self.fit_stage(
                trained,
                fuse_loaders,
                fuse,
                self.objectives,
                loss_weights=loss_weights,
                before_epoch=epoch_start(trained, unfreeze_schedule(model, fuse.unfreeze)),
                on_epoch=epoch_end(
                    trained, lambda _, m: tracker.log({f"fuse/{k}": v for k, v in m.items()})
                ),
                on_step=step_logger(tracker, "fuse", self.log_every),
                state_path=run_dir / "checkpoints" / FUSE_STATE,
                state_extra=checkpoint_extra,
                resume=resume,
                stop_after=self.trainer.stop_after_epochs,
                generators=[fuse_loaders["train"].generator],
                desc="fuse",
            )
        if not result.finished:
            if self.distributed.is_main:
                print(
                    f"stopped after epoch {result.epochs_done} of {fuse.epochs}; continue with "
                    f"python -m experiments.train ... trainer.resume={run_dir}"
                )
            return None
        with time("checkpoint"):
            if self.distributed.is_main:
                referenced = stage1 if fuse.unfreeze is None else {}  # thawed encoders changed
                best_path = save_checkpoint(
                    run_dir / "checkpoints" / "best.pt",
                    {**fused_state(model, referenced), **dict(checkpoint_extra or {}),
                     **result.best},
                )  # fmt: skip
                self.tracker.log_artifact(
                    best_path,
                    f"model-{run_dir.name}",
                    references=[s.path for s in referenced.values()],
                )
        with time("stage 2 evaluation"):
            self.log_confusion(model, fuse_loaders)
            metrics = self.evaluate(model, fuse_loaders, self.objectives, loss_weights=loss_weights)
        fused = Row(f"fused ({fuser_name})", ", ".join(self.tasks), metrics, self.objectives)
        details = {
            "fuser": fuser_name,
            "head": type(model.head).__name__,
            "tasks": list(self.tasks),
            "metric": main_metric(self.objectives),
            **self.align_summary,
        }
        return fused, details

    def log_confusion(self, model: MultimodalModel, loaders: Mapping[str, DataLoader]) -> None:
        """Confusion matrices on the last evaluated split (test when there is one)."""
        split = self.eval_splits[-1]
        predictions = predict(
            model, loaders[split], self.device, precision=self.precision,
            distributed=self.distributed, objectives=self.objectives,
        )  # fmt: skip
        for name, (true, pred) in predictions.items():
            task = self.tasks[name] if name else next(iter(self.tasks.values()))
            suffix = f"_{name}" if name else ""
            self.tracker.log_confusion_matrix(
                f"confusion_{split}{suffix}", true, pred, task.classes
            )


def slug(name: str) -> str:
    """A row's name as a summary key: `image only` -> `image_only`, `fused (X)` -> `fused`."""
    return name.split(" (")[0].replace(" ", "_")


def run_summary(rows: Sequence[Row], fused: Row) -> dict[str, Any]:
    """Flat `split/model/metric` entries, and the fusion gain of each task that a unimodal
    model was trained on too: how much the fused model's main score of the task beats the
    best unimodal one (fused minus best for scores, best minus fused for errors, so a
    positive gain always means fusion helped)."""
    summary: dict[str, Any] = {}
    for row in rows:
        for split, metrics in row.metrics.items():
            summary.update(metrics.as_dict(f"{split}/{slug(row.model)}"))
    for task, objective in fused.objectives.items():
        rivals = [r for r in rows if r is not fused and task in r.objectives]
        if not rivals:
            continue
        metric = objective.main_metric
        sign = -1 if lower_is_better(metric) else 1
        for split in fused.metrics:
            key = (
                f"{split}/fusion_gain"
                if len(fused.objectives) == 1
                else f"{split}/{task}/fusion_gain"
            )
            best = max(sign * task_score(r, split, task, metric) for r in rivals)
            summary[key] = sign * task_score(fused, split, task, metric) - best
    return summary


def task_score(row: Row, split: str, task: str, metric: str) -> float:
    """`row`'s `metric` of `task` on `split`."""
    metrics = row.metrics[split]
    return metrics.score(metric if len(row.objectives) == 1 else f"{task}/{metric}")


def results_table(rows: Sequence[Row]) -> str:
    """Markdown: one line per model, what it predicts, its main score on each evaluated
    split (accuracy for classification), in a column of its own when the rows' main
    scores differ (a regression fused from encoders pretrained on classes)."""
    splits = list(rows[0].metrics)
    mains = [row.metrics[splits[0]].main for row in rows]
    shared = len(set(mains)) == 1
    header = "| model | target |" + ("" if shared else " metric |")
    header += "".join(f" {s} {mains[0]} |" if shared else f" {s} |" for s in splits)
    lines = [header, "|---|---|" + ("" if shared else "---|") + "---:|" * len(splits)]
    for row, main in zip(rows, mains, strict=True):
        cells = "".join(f" {format_score(main, row.metrics[s].score())} |" for s in splits)
        lines.append(f"| {row.model} | {row.target} |{'' if shared else f' {main} |'}{cells}")
    return "\n".join(lines)
