"""Main job: pretrain one encoder per modality, then freeze them and train the fusion.

    python -m experiments.train                              # the default experiment
    python -m experiments.train model/fusion=concat          # another fuser
    python -m experiments.train trainer.fuse.epochs=20 seed=1

Stage 1 trains each encoder with a linear head on its own modality and saves it under
`paths.pretrained_dir`, keyed by a fingerprint of everything that shaped it, so a later run
with the same settings reuses it. Stage 2 loads those checkpoints into fresh encoders,
freezes them, trains the fuser and head, and evaluates every model on the test split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from data.avdigits import DRAW_VERSION, SPLITS
from fusion.batch import Batch, collate
from experiments.schema import ConfigError, register_resolvers, validate
from fusion.encoders.base import Encoder
from fusion.fusers import ConcatFuser
from fusion.heads import ClassificationHead
from fusion.model import MultimodalModel
from fusion.surgery import GradualUnfreezing, param_groups, set_trainable
from fusion.tracking import NullTracker, Tracker
from fusion.training import (
    EpochMetrics,
    Precision,
    evaluate,
    fit,
    load_checkpoint,
    predict,
    save_checkpoint,
    set_seed,
)
from fusion.training.distributed import (
    SINGLE,
    Distributed,
    init_distributed,
    launched_processes,
    local_device,
)
from fusion.training.feature_cache import (
    FeatureCache,
    encoder_key,
    is_deterministic,
    is_frozen,
    keep_batch,
)
from fusion.training.sampling import EpochSampler, Views
from fusion.weights import load_weights

log = logging.getLogger("fusion")
register_resolvers()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"config key 'trainer.device': '{name}' requested but CUDA is unavailable"
        )
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> Precision:
    try:
        return Precision.on(name, device)
    except ValueError as err:
        raise ConfigError(f"config key 'trainer.precision': {err}") from None


def reseed(seed: int, loaders: dict[str, DataLoader], distributed: Distributed = SINGLE) -> None:
    """Start a stage from the seed alone: its result must not depend on what ran before it
    (a stage-1 encoder trained now or reused from the cache draws different numbers).
    Each process draws its own numbers (augmentation, dropout): the seed plus its rank."""
    set_seed(seed + distributed.rank)
    loaders["train"].generator.manual_seed(seed + distributed.rank)


def per_process_batch(cfg: DictConfig, distributed: Distributed) -> int:
    """`trainer.batch_size` is the global batch, split evenly over the processes, so that a
    recipe (batch size, learning rate) means the same on one process or many."""
    batch, world = cfg.trainer.batch_size, distributed.world_size
    if batch % world:
        raise ConfigError(
            f"config key 'trainer.batch_size': the global batch of {batch} cannot be split "
            f"evenly over {world} processes"
        )
    return batch // world


def make_loader(
    cfg: DictConfig,
    dataset: Dataset,
    split: str,
    collate_fn: Callable = collate,
    distributed: Distributed = SINGLE,
) -> DataLoader:
    """Batches of one split (this process's share of them), with the trainer's worker and
    memory settings.

    The train split is shuffled per epoch by an `EpochSampler` (which also picks the epoch's
    view when `dataset` is a `Views`); the others are read in order.
    """
    trainer = cfg.trainer
    workers = trainer.num_workers
    pin = trainer.pin_memory if trainer.pin_memory is not None else torch.cuda.is_available()
    sampler = EpochSampler(
        len(dataset),
        views=getattr(dataset, "num_views", 1),
        shuffle=split == "train",
        seed=cfg.seed,
        rank=distributed.rank,
        world_size=distributed.world_size,
        pad=split == "train",
    )
    return DataLoader(
        dataset,
        batch_size=per_process_batch(cfg, distributed),
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=trainer.persistent_workers and workers > 0,
        prefetch_factor=trainer.prefetch_factor if workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def make_loaders(cfg: DictConfig, distributed: Distributed = SINGLE) -> dict[str, DataLoader]:
    """Every split as the data config gives it (the train split augmented by default)."""
    return {
        split: make_loader(cfg, instantiate(cfg.data, split=split), split, distributed=distributed)
        for split in SPLITS
    }


def encoder_keys(cfg: DictConfig, model: MultimodalModel, modalities: list[str]) -> dict[str, str]:
    """Feature-cache keys: each encoder's weights and structure, its config, the precision."""
    return {
        m: encoder_key(
            model.encoders[m],
            OmegaConf.to_container(cfg.model.encoders[m], resolve=True),
            autocast=str(cfg.trainer.precision),
        )
        for m in modalities
    }


def cached_loaders(
    cfg: DictConfig,
    model: MultimodalModel,
    datasets: Mapping[str, Dataset],
    device: torch.device,
    distributed: Distributed = SINGLE,
) -> dict[str, DataLoader]:
    """Loaders that read frozen encoders' features from the cache where a split allows it.

    A split is cached when its items are fixed and `trainer.feature_cache.enabled`; the
    model's frozen encoders are then skipped (their features come from disk) and any
    trainable ones still run. Other splits are read and encoded as usual. With several
    processes, rank 0 encodes and the others read what it wrote.
    """
    settings = cfg.trainer.feature_cache
    frozen = [m for m, encoder in model.encoders.items() if is_frozen(encoder)]
    if not settings.enabled or not frozen:
        return {
            split: make_loader(cfg, dataset, split, distributed=distributed)
            for split, dataset in datasets.items()
        }
    cache = FeatureCache(cfg.paths.feature_cache_dir, dtype=settings.dtype)
    keys = encoder_keys(cfg, model, frozen)
    precision = Precision.on(cfg.trainer.precision, device)
    loaders = {}
    for split, dataset in datasets.items():
        if not is_deterministic(dataset):
            log.info("feature cache: the %s split is augmented, encoding it live", split)
            loaders[split] = make_loader(cfg, dataset, split, distributed=distributed)
            continue
        with distributed.main_first():
            encoded = cache.encode(
                model,
                dataset,
                frozen,
                device,
                keys=keys,
                batch_size=cfg.trainer.batch_size,
                autocast=precision.autocast,
            )
        loaders[split] = make_loader(cfg, encoded, split, keep_batch, distributed)
    return loaders


def fuse_datasets(cfg: DictConfig, loaders: Mapping[str, DataLoader]) -> dict[str, Dataset]:
    """Stage 2's data. With `trainer.fuse.views=K`, the train split is K fixed draws, epoch e
    reading draw (e - 1) mod K: fixed items, so frozen features can be cached. With null it
    is redrawn at every access, as in stage 1."""
    datasets = {split: loader.dataset for split, loader in loaders.items()}
    views = cfg.trainer.fuse.views
    if views is None:
        return datasets
    try:
        draws = [instantiate(cfg.data, split="train", augment=False, view=v) for v in range(views)]
    except InstantiationException as err:
        if "'view'" not in str(err) and "'augment'" not in str(err):
            raise
        raise ConfigError(
            f"config key 'trainer.fuse.views': {cfg.data._target_} takes no `augment` and `view` "
            "arguments to draw fixed views; set trainer.fuse.views=null"
        ) from None
    datasets["train"] = Views(draws)
    return datasets


def build_encoder(cfg: DictConfig, modality: str) -> Encoder:
    return instantiate(cfg.model.encoders[modality])


def unimodal_model(encoder: Encoder, modality: str, num_classes: int) -> MultimodalModel:
    """Stage-1 model: the encoder and a linear classifier on its features."""
    return MultimodalModel.build(
        {modality: encoder}, fuser=ConcatFuser, head=ClassificationHead, num_classes=num_classes
    )


def fingerprint(cfg: DictConfig, modality: str) -> str:
    """Hash of everything that shapes a stage-1 encoder: its config, the data, the recipe."""
    parts = {
        "encoder": OmegaConf.to_container(cfg.model.encoders[modality], resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "pretrain": OmegaConf.to_container(cfg.trainer.pretrain, resolve=True),
        "batch_size": cfg.trainer.batch_size,
        "seed": cfg.seed,
        "draws": DRAW_VERSION,
    }
    # An encoder learns its own modality's digits, whatever task the fusion stage asks for.
    for key in ("speech_path", "task", "same_prob"):
        parts["data"].pop(key, None)
    parts["pretrain"].pop("reuse", None)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def modality_targets(modality: str):
    """Stage-1 labels: the modality's own target when the data gives one, else the label."""

    def targets(batch: Batch) -> torch.Tensor | dict[str, torch.Tensor]:
        if batch.modality_targets is not None and modality in batch.modality_targets:
            return batch.modality_targets[modality]
        return batch.targets

    return targets


def pretrain_encoder(
    cfg: DictConfig,
    modality: str,
    loaders: dict[str, DataLoader],
    device: torch.device,
    tracker: Tracker,
    distributed: Distributed = SINGLE,
) -> tuple[Path, MultimodalModel]:
    """Stage 1 for one modality; returns the checkpoint and the trained unimodal model."""
    key = fingerprint(cfg, modality)
    path = Path(cfg.paths.pretrained_dir) / f"{modality}-{key}.pt"
    dataset = loaders["train"].dataset
    num_classes = getattr(dataset, "modality_classes", None) or dataset.num_classes
    model = unimodal_model(build_encoder(cfg, modality), modality, num_classes)
    model.to(device)
    state = None
    if cfg.trainer.pretrain.reuse and path.is_file():
        state = load_checkpoint(path, required=("model", "fingerprint"))
        if state["fingerprint"] != key:
            log.info("stage 1 [%s]: %s has another fingerprint, retraining", modality, path)
            state = None
    if distributed.gather(state is not None)[0]:  # every process follows rank 0's choice
        load_weights(model, state["model"])
        log.info("stage 1 [%s]: reusing %s", modality, path)
        return path, model
    reseed(cfg.seed, loaders, distributed)
    summary = model.summary()
    tracker.log_text(f"model_summary_{modality}", summary)
    log.info("stage 1 [%s]: training encoder\n%s", modality, summary)
    pre = cfg.trainer.pretrain
    accelerate(model, cfg.trainer)
    best = fit(
        model,
        loaders["train"],
        loaders["val"],
        epochs=pre.epochs,
        lr=pre.lr,
        weight_decay=pre.weight_decay,
        groups=optimizer_groups(model, pre),
        targets=modality_targets(modality),
        device=device,
        on_epoch=lambda _, m: tracker.log({f"pretrain/{modality}/{k}": v for k, v in m.items()}),
        on_step=step_logger(tracker, f"pretrain/{modality}", cfg.logger.log_every_n_steps),
        precision=Precision.on(cfg.trainer.precision, device),
        distributed=distributed,
        find_unused_parameters=cfg.trainer.find_unused_parameters,
        desc=f"pretrain {modality}",
    ).best
    if distributed.is_main:
        state = {"model": model.cpu().state_dict(), "fingerprint": key, "best": best}
        save_checkpoint(path, state)
        model.to(device)
    distributed.barrier()  # the checkpoint exists for every process from here on
    return path, model


def accelerate(model: MultimodalModel, trainer: DictConfig) -> None:
    """Channels-last memory for convolutions and `torch.compile`, as the trainer asks.

    Both keep parameter names (compiling in place adds no `_orig_mod.` prefix), so
    checkpoints load the same with or without them.
    """
    if trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    if trainer.compile:
        model.compile()


def optimizer_groups(model: MultimodalModel, stage: DictConfig) -> list[dict]:
    """Parameter groups for one stage: lr multipliers, L2 per part, layer-wise decay."""
    return param_groups(
        model,
        lr=stage.lr,
        weight_decay=stage.weight_decay,
        lr_mult=stage.lr_mult,
        weight_decay_for=stage.weight_decay_for,
        layer_decay=stage.layer_decay,
        decay_roots=[f"encoders.{m}.backbone" for m in model.encoders],
    )


def unfreeze_schedule(model: MultimodalModel, unfreeze: DictConfig | None):
    """A `before_epoch` hook thawing each encoder's backbone stages, last ones first."""
    if unfreeze is None:
        return None
    schedules = [
        GradualUnfreezing(encoder.backbone, **unfreeze) for encoder in model.encoders.values()
    ]

    def step(epoch: int) -> None:
        for modality, schedule in zip(model.encoders, schedules, strict=True):
            thawed = schedule.step(epoch)
            log.info("epoch %d: %s backbone stages trainable: %s", epoch, modality, thawed)

    return step


def build_fused(
    cfg: DictConfig, encoders: dict[str, Encoder], num_classes: int | dict[str, int]
) -> MultimodalModel:
    """Encoders, the configured fuser and head, and modality dropout, wired together."""
    return MultimodalModel.build(
        encoders,
        fuser=instantiate(cfg.model.fusion),
        head=instantiate(cfg.model.head),
        num_classes=num_classes,
        modality_dropout=cfg.model.modality_dropout,
    )


def task_classes(cfg: DictConfig, dataset) -> int | dict[str, int]:
    """The output sizes stage 2 needs: from the config if set, else what the data asks."""
    return cfg.model.num_classes or dataset.num_classes


def fused_model(
    cfg: DictConfig,
    checkpoints: dict[str, Path],
    num_classes: int | dict[str, int],
    device: torch.device,
) -> MultimodalModel:
    """Stage-2 model: fresh encoders loaded from the stage-1 checkpoints and frozen.

    With `trainer.fuse.unfreeze`, the encoders start frozen parameter by parameter instead,
    so that the schedule can thaw their backbones' stages (frozen batch norms keep their
    statistics until their stage thaws).
    """
    encoders = {}
    for modality, path in checkpoints.items():
        encoder = build_encoder(cfg, modality)
        state = load_checkpoint(path, required=("model",))
        report = load_weights(encoder, state["model"], prefix=f"encoders.{modality}.")
        log.info("stage 2 [%s]: %s", modality, report)
        if cfg.trainer.fuse.unfreeze is None:
            encoder.freeze()
        else:
            set_trainable(encoder, False)
        encoders[modality] = encoder
    return build_fused(cfg, encoders, num_classes).to(device)


FUSE_STATE = "fuse_state.pt"


def step_logger(tracker: Tracker, prefix: str, every: int):
    """An `on_step` hook logging the training loss every `every` steps."""
    step = 0

    def log_step(loss: float) -> None:
        nonlocal step
        step += 1
        if step % every == 0:
            tracker.log({f"{prefix}/step": step, f"{prefix}/train/step_loss": loss})

    return log_step


def resume_state(cfg: DictConfig) -> dict | None:
    """The stage-2 state to continue from: `trainer.resume` is a run directory or a file."""
    if cfg.trainer.resume is None:
        return None
    path = Path(cfg.trainer.resume)
    if path.is_dir():
        path = path / "checkpoints" / FUSE_STATE
    if not path.is_file():
        raise ConfigError(f"config key 'trainer.resume': no stage-2 state at {path}")
    state = load_checkpoint(path, required=("epoch", "epochs", "model", "optimizer", "rng"))
    if state["epochs"] != cfg.trainer.fuse.epochs:
        raise ConfigError(
            f"config key 'trainer.resume': {path} was written for trainer.fuse.epochs="
            f"{state['epochs']}, this run asks for {cfg.trainer.fuse.epochs}"
        )
    log.info("stage 2: resuming from %s after epoch %d", path, state["epoch"])
    return state


def results_table(rows: dict[str, tuple[str, dict[str, EpochMetrics]]]) -> str:
    lines = ["| model | target | val accuracy | test accuracy |", "|---|---|---:|---:|"]
    for name, (target, metrics) in rows.items():
        lines.append(
            f"| {name} | {target} | {metrics['val'].accuracy:.2%} | {metrics['test'].accuracy:.2%} |"
        )
    return "\n".join(lines)


def run_summary(
    rows: dict[str, tuple[str, dict[str, EpochMetrics]]], fused: str, comparable: bool
) -> dict[str, Any]:
    """Flat `split/model/metric` entries; the fusion gain when all rows share one target."""
    summary: dict[str, Any] = {}
    for name, (_, metrics) in rows.items():
        slug = name.split(" (")[0].replace(" ", "_")
        for split, m in metrics.items():
            summary.update(m.as_dict(f"{split}/{slug}"))
    if comparable:
        best_single = max(m["test"].accuracy for n, (_, m) in rows.items() if n != fused)
        summary["test/fusion_gain"] = rows[fused][1]["test"].accuracy - best_single
    return summary


def eval_datasets(loaders: Mapping[str, DataLoader]) -> dict[str, Dataset]:
    return {split: loaders[split].dataset for split in ("val", "test")}


def evaluate_splits(model: MultimodalModel, loaders, device, **kwargs) -> dict[str, EpochMetrics]:
    return {split: evaluate(model, loaders[split], device, **kwargs) for split in ("val", "test")}


def run(
    cfg: DictConfig,
    run_dir: Path,
    group: str | None = None,
    tags: Sequence[str] = (),
    distributed: Distributed = SINGLE,
) -> dict[str, Any]:
    """Both stages and the final evaluation; returns the summary written to `summary.json`.

    `group` and `tags` label the W&B run (a multirun's sweep, the values it overrides).
    With `distributed`, every process trains on its share of each batch and rank 0 alone
    writes files, logs and prints.
    """
    device = local_device(resolve_device(cfg.trainer.device), distributed)
    precision = resolve_precision(cfg.trainer.precision, device)
    set_seed(cfg.seed)
    loaders = make_loaders(cfg, distributed)
    dataset = loaders["train"].dataset
    task = getattr(dataset, "task", "label")
    if distributed.is_main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        tracker = Tracker(
            run_dir,
            mode=cfg.logger.mode,
            project=cfg.logger.project,
            group=cfg.logger.group or group,
            name=run_dir.name,
            tags=[*cfg.tags, *tags],
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    else:
        tracker = NullTracker()
    try:
        rows: dict[str, tuple[str, dict[str, EpochMetrics]]] = {}
        checkpoints = {}
        for modality in cfg.model.encoders:
            checkpoints[modality], unimodal = pretrain_encoder(
                cfg, modality, loaders, device, tracker, distributed
            )
            unimodal.encoders[modality].freeze()  # only evaluated from here on: cacheable
            evaluation = cached_loaders(cfg, unimodal, eval_datasets(loaders), device, distributed)
            metrics = evaluate_splits(
                unimodal,
                evaluation,
                device,
                targets=modality_targets(modality),
                precision=precision,
                distributed=distributed,
            )
            rows[f"{modality} only"] = (f"{modality}'s digit", metrics)

        reseed(cfg.seed, loaders, distributed)
        num_classes = task_classes(cfg, dataset)
        model = fused_model(cfg, checkpoints, num_classes, device)
        fuser_name = type(model.fuser).__name__
        summary_text = model.summary()
        tracker.log_text("model_summary", summary_text)
        log.info("stage 2: training %s with frozen encoders\n%s", fuser_name, summary_text)
        fuse = cfg.trainer.fuse
        fuse_loaders = cached_loaders(cfg, model, fuse_datasets(cfg, loaders), device, distributed)
        loss_weights = getattr(model.head, "loss_weights", None)
        tracker.watch(model, cfg.logger.watch)
        accelerate(model, cfg.trainer)
        result = fit(
            model,
            fuse_loaders["train"],
            fuse_loaders["val"],
            epochs=fuse.epochs,
            lr=fuse.lr,
            weight_decay=fuse.weight_decay,
            groups=optimizer_groups(model, fuse),
            loss_weights=loss_weights,
            before_epoch=unfreeze_schedule(model, fuse.unfreeze),
            device=device,
            on_epoch=lambda _, m: tracker.log({f"fuse/{k}": v for k, v in m.items()}),
            on_step=step_logger(tracker, "fuse", cfg.logger.log_every_n_steps),
            state_path=run_dir / "checkpoints" / FUSE_STATE,
            resume=resume_state(cfg),
            stop_after=cfg.trainer.stop_after_epochs,
            generators=[fuse_loaders["train"].generator],
            precision=precision,
            distributed=distributed,
            find_unused_parameters=cfg.trainer.find_unused_parameters,
            desc="fuse",
        )
        if not result.finished:
            if distributed.is_main:
                print(
                    f"stopped after epoch {result.epochs_done} of {fuse.epochs}; continue with "
                    f"python -m experiments.train ... trainer.resume={run_dir}"
                )
            return {}
        if distributed.is_main:
            best_path = save_checkpoint(
                run_dir / "checkpoints" / "best.pt",
                {"model": model.state_dict(), "config": OmegaConf.to_container(cfg), **result.best},
            )
            tracker.log_artifact(best_path, f"model-{run_dir.name}")
        predictions = predict(
            model, fuse_loaders["test"], device, precision=precision, distributed=distributed
        )
        for name, (true, pred) in predictions.items():
            classes = num_classes[name] if isinstance(num_classes, Mapping) else num_classes
            tracker.log_confusion_matrix(
                f"confusion_test{'_' + name if name else ''}", true, pred, classes
            )
        fused = f"fused ({fuser_name})"
        rows[fused] = (
            task,
            evaluate_splits(
                model,
                fuse_loaders,
                device,
                loss_weights=loss_weights,
                precision=precision,
                distributed=distributed,
            ),
        )
        summary = run_summary(rows, fused, comparable=task == "digit")
        summary.update(fuser=fuser_name, head=type(model.head).__name__, task=task)
        summary["checkpoints"] = {m: str(p) for m, p in checkpoints.items()}
        tracker.update_summary(summary)
    finally:
        wandb_line = tracker.finish()
    if not distributed.is_main:
        return summary
    print(results_table(rows))
    if wandb_line:
        print(wandb_line)
    print(f"run directory: {run_dir}  |  fused test accuracy: {summary['test/fused/accuracy']:.2%}")
    return summary


def override_tags(hydra_cfg: DictConfig) -> list[str]:
    """The command line's overrides as W&B tags (W&B caps a tag at 64 characters)."""
    skip = ("hydra.", "logger.", "paths.", "trainer.resume")
    return [o[:64] for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith(skip)]


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
    per_process_batch(cfg, distributed)
    return distributed


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        cfg = validate(cfg)
        distributed = join_processes(cfg)
        hydra_cfg = HydraConfig.get()
        sweep = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
        run(cfg, Path(hydra_cfg.runtime.output_dir), sweep, override_tags(hydra_cfg), distributed)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
