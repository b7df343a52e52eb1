"""The training loop: readable top to bottom, one concern per function."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.autonotebook import tqdm  # not tqdm.auto: it calls iter() twice per loop

from fusion.auxiliary import Terms, trains_auxiliary
from fusion.batch import Batch
from fusion.data import TARGET_KEY, Task
from fusion.surgery import param_groups
from fusion.tasks import CLASSIFICATION, LOSS_NAME, Objective, main_metric
from fusion.training.checkpoint import save_checkpoint
from fusion.training.distributed import SINGLE, Distributed
from fusion.training.monitor import Monitor, default_monitor
from fusion.training.optim import build_optimizer, build_schedule
from fusion.training.precision import FLOAT32, Precision

Outputs = torch.Tensor | dict[str, torch.Tensor]
TargetFn = Callable[[Batch], torch.Tensor | dict[str, torch.Tensor]]
NONFINITE = ("stop", "skip")

log = logging.getLogger("fusion")


class NonFiniteError(RuntimeError):
    """A stage met a NaN or infinite loss or weights: training stops rather than running on
    to save and score a broken model. The message names the stage, epoch and step."""


def set_seed(seed: int) -> None:
    """Seed every generator a run touches, so the same seed gives the same metrics on CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_targets(batch: Batch) -> torch.Tensor | dict[str, torch.Tensor]:
    return batch.targets


@dataclass
class EpochMetrics:
    """Mean loss and the metrics of one pass over a split.

    `scores` are keyed like the summary without its split prefix: a single task's metrics
    by name (`accuracy`, `mae`), several tasks' as `<task>/<metric>` plus, when every task
    computes an accuracy, their mean as `accuracy`. `main` names the main score
    (`fusion.tasks.main_metric`; `loss` when there is none).
    """

    loss: float
    scores: dict[str, float] = field(default_factory=dict)
    main: str = LOSS_NAME
    skipped: int = 0  # training steps skipped for a non-finite loss

    def as_dict(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/{LOSS_NAME}": self.loss}
        out.update({f"{prefix}/{name}": value for name, value in self.scores.items()})
        return out

    def score(self, name: str | None = None) -> float:
        """The score `name` (default: the main one); ValueError lists those computed."""
        name = name or self.main
        if name == LOSS_NAME:
            return self.loss
        if name not in self.scores:
            raise ValueError(f"no metric '{name}' was computed; there are {sorted(self.scores)}")
        return self.scores[name]

    @property
    def accuracy(self) -> float:
        return self.score("accuracy")


def default_objectives(outputs: dict[str, torch.Tensor]) -> dict[str, Objective]:
    """Without declared tasks, each output is a multiclass task of as many classes as it
    has logits (cross-entropy, accuracy and macro-F1)."""
    return {
        task: Objective(Task("multiclass", tuple(map(str, range(logits.shape[1])))))
        for task, logits in outputs.items()
    }


def matched(
    outputs: Outputs,
    targets: torch.Tensor | dict[str, torch.Tensor],
    objectives: Mapping[str, Objective] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Objective]]:
    """Outputs, targets and objectives keyed alike: by task name, or "" for a single-output
    model. A branching head's dict of outputs is matched to the batch's dict of targets."""
    if not isinstance(outputs, dict):
        if isinstance(targets, dict):
            raise ValueError(f"the head gives one output but the labels have tasks {list(targets)}")
        outputs, targets = {"": outputs}, {"": targets}
        if objectives is not None:
            if len(objectives) != 1:
                raise ValueError(f"the head gives one output but the tasks are {list(objectives)}")
            objectives = {"": next(iter(objectives.values()))}
    elif not isinstance(targets, dict) or set(outputs) - set(targets):
        have = list(targets) if isinstance(targets, dict) else "a single label"
        raise ValueError(f"the head predicts tasks {list(outputs)} but the labels have {have}")
    if objectives is None:
        objectives = default_objectives(outputs)
    elif set(outputs) - set(objectives):
        raise ValueError(
            f"the head predicts tasks {list(outputs)} but the objectives are for {list(objectives)}"
        )
    return outputs, targets, dict(objectives)


Scored = dict[str, tuple[Objective, torch.Tensor, torch.Tensor]]
"""Per task ("" for a single-output model): its objective, predictions and targets."""


def batch_loss(
    outputs: Outputs,
    targets: torch.Tensor | dict[str, torch.Tensor],
    objectives: Mapping[str, Objective] | None = None,
    loss_weights: Mapping[str, float] | None = None,
) -> tuple[torch.Tensor, Scored]:
    """The loss summed over the batch (weighted per task), each task's by its objective
    (`fusion.tasks`), and what each task's metrics take."""
    outputs, targets, objectives = matched(outputs, targets, objectives)
    loss = torch.zeros(())
    scored: Scored = {}
    for task, out in outputs.items():
        objective = objectives[task]
        where = f"{TARGET_KEY}.{task}" if task else TARGET_KEY
        y = objective.targets(out, targets[task], where)
        loss = loss + (loss_weights or {}).get(task, 1.0) * objective.loss_sum(out, y)
        scored[task] = (objective, objective.predictions(out).detach(), objective.metric_targets(y))
    return loss, scored


class _Tally:
    """The running loss and each task's torchmetrics over one pass of one process."""

    def __init__(self, distributed: Distributed = SINGLE) -> None:
        self.distributed = distributed
        self.loss, self.count = 0.0, 0
        self.auxiliary: dict[str, float] = {}  # auxiliary losses (fusion.auxiliary), summed
        self.per_step: dict[str, float] = {}  # their weights and diagnostics, summed over steps
        self.steps = 0
        self.objectives: dict[str, Objective] = {}
        self.metrics: dict[str, dict[str, Any]] = {}

    def add(self, loss: torch.Tensor, scored: Scored, n: int, terms: Terms | None = None) -> None:
        self.loss += loss.item()
        self.count += n
        if terms is not None:
            for name, value in terms.losses.items():
                self.auxiliary[name] = self.auxiliary.get(name, 0.0) + value.item()
            steps = {**{f"weight/{k}": v for k, v in terms.weights.items()}, **terms.logs}
            for name, value in steps.items():
                self.per_step[name] = self.per_step.get(name, 0.0) + value
            self.steps += 1
        for task, (objective, preds, y) in scored.items():
            if task not in self.metrics:
                self.objectives[task] = objective
                built = objective.build_metrics(sync=self.distributed.enabled)
                self.metrics[task] = {n: m.to(preds.device) for n, m in built.items()}
            for metric in self.metrics[task].values():
                metric.update(preds, y)

    def result(self) -> EpochMetrics:
        """The pass's metrics over the samples of every process (all of them take part)."""
        loss, count, steps, *sums = self.distributed.all_sum(
            [self.loss, float(self.count), float(self.steps), *self.auxiliary.values(),
             *self.per_step.values()]
        )  # fmt: skip
        auxiliary, per_step = sums[: len(self.auxiliary)], sums[len(self.auxiliary) :]
        if count == 0:
            raise ValueError("no batches to compute metrics over")
        scores = {
            (f"{task}/{name}" if task else name): _value(metric.compute())
            for task, metrics in self.metrics.items()
            for name, metric in metrics.items()
        }
        scores.update(
            {
                f"aux/{name}": total / count
                for name, total in zip(self.auxiliary, auxiliary, strict=True)
            }
        )
        scores.update(
            {
                f"aux/{name}": total / steps
                for name, total in zip(self.per_step, per_step, strict=True)
            }
        )
        objectives = self.objectives
        main = main_metric(objectives) if objectives else LOSS_NAME
        if len(objectives) > 1 and main == "accuracy":
            scores = {
                "accuracy": sum(scores[f"{t}/accuracy"] for t in objectives) / len(objectives),
                **scores,
            }
        return EpochMetrics(loss=loss / count, scores=scores, main=main)


def _value(value: torch.Tensor) -> float:
    """A metric's value as a float: the mean over outputs for a per-output metric (Pearson
    of several regression targets)."""
    return float(value.float().mean())


def forward(model: nn.Module, batch: Batch, targets: Any = None) -> Any:
    """The model's outputs for `batch`; given `targets`, a model that trains auxiliary
    losses (`fusion.auxiliary`) returns `(outputs, losses)`."""
    kwargs: dict[str, Any] = {"encoded": batch.encoded} if batch.encoded else {}
    if targets is not None:
        kwargs["targets"] = targets
    return model(batch.inputs, batch.present, batch.condition, **kwargs)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    device: torch.device,
    targets: TargetFn = batch_targets,
    loss_weights: Mapping[str, float] | None = None,
    precision: Precision = FLOAT32,
    distributed: Distributed = SINGLE,
    objectives: Mapping[str, Objective] | None = None,
) -> EpochMetrics:
    """Mean loss and the tasks' metrics of `model` over `batches` (each process's share of
    them; the metrics are computed over all of them). `objectives` (by task name) give each
    task's loss and metrics; None: every output is a multiclass task. A model with
    auxiliary losses (`fusion.auxiliary`) scores each as `aux/<name>` (mean per sample)."""
    model.eval()
    tally = _Tally(distributed)
    auxiliary = trains_auxiliary(model)
    for batch in batches:
        batch = batch.to(device)
        y = targets(batch)
        with precision.autocast():
            outputs = forward(model, batch, y if auxiliary else None)
        terms = None
        if auxiliary:
            outputs, terms = outputs
            terms.weights, terms.logs = {}, {}  # training's, not scored here
        loss, scored = batch_loss(outputs, y, objectives, loss_weights)
        tally.add(loss, scored, len(batch), terms)
    return tally.result()


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[Batch],
    device: torch.device,
    targets: TargetFn = batch_targets,
    precision: Precision = FLOAT32,
    distributed: Distributed = SINGLE,
    objectives: Mapping[str, Objective] | None = None,
) -> dict[str, tuple[list[int], list[int]]]:
    """(true, predicted) classes of each multiclass or binary task ("" for a single-task
    model), for confusion matrices; gathered from every process."""
    model.eval()
    out: dict[str, tuple[list[int], list[int]]] = {}
    for batch in batches:
        batch = batch.to(device)
        with precision.autocast():
            outputs = forward(model, batch)
        outputs, labels, tasks = matched(outputs, targets(batch), objectives)
        for task, logits in outputs.items():
            if tasks[task].task.kind not in CLASSIFICATION:
                continue
            true, pred = out.setdefault(task, ([], []))
            true += labels[task].tolist()
            pred += logits.argmax(dim=1).tolist()
    merged: dict[str, tuple[list[int], list[int]]] = {}
    for part in distributed.gather(out):
        for task, (true, pred) in part.items():
            merged.setdefault(task, ([], []))
            merged[task][0].extend(true)
            merged[task][1].extend(pred)
    return merged


def finite_on_every_process(loss: torch.Tensor, distributed: Distributed = SINGLE) -> bool:
    """Whether `loss` is finite on every process. All processes must take the same
    decision: DDP hangs when one skips a backward pass that the others run."""
    bad = 0.0 if torch.isfinite(loss).item() else 1.0
    return distributed.all_sum([bad])[0] == 0


def nonfinite_loss_error(
    desc: str, epoch: int, step: int, loss: torch.Tensor, optimizer: torch.optim.Optimizer
) -> NonFiniteError:
    value = loss.item()
    where = f"is {value}" if not math.isfinite(value) else "is non-finite on another process"
    lr = max(group["lr"] for group in optimizer.param_groups)
    return NonFiniteError(
        f"stage '{desc}': the training loss {where} at epoch {epoch}, step {step}. Check the "
        f"inputs for NaN/Inf values, lower the learning rate (now {lr:g}), or skip such steps "
        "with nonfinite='skip' (trainer.nonfinite=skip)"
    )


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    targets: TargetFn = batch_targets,
    loss_weights: Mapping[str, float] | None = None,
    desc: str = "train",
    on_step: Callable[[float], None] | None = None,
    precision: Precision = FLOAT32,
    scaler: torch.amp.GradScaler | None = None,
    distributed: Distributed = SINGLE,
    epoch: int = 1,
    nonfinite: str = "stop",
    accumulate: int = 1,
    clip_grad_norm: float | None = None,
    objectives: Mapping[str, Objective] | None = None,
) -> EpochMetrics:
    """One pass over `batches`; `scaler` scales fp16 losses (it passes others through).
    `objectives` as in `evaluate`. A model with auxiliary losses (`fusion.auxiliary`)
    trains on their weighted sum with the task loss; the metrics' `loss` is the task loss,
    each auxiliary loss's mean per sample is the score `aux/<name>`, and each weight and
    diagnostic's mean over the steps `aux/weight/<name>`, `aux/ogm/...`.

    The optimizer steps once per `accumulate` batches (and once for the batches left at
    the end) on the mean gradient over their samples, as one batch of them all would give
    (batch norm aside, which sees each batch); `clip_grad_norm` then caps the gradients'
    total 2-norm (`torch.nn.utils.clip_grad_norm_`). A step whose loss is NaN or infinite
    (on any process) raises `NonFiniteError`, or with `nonfinite="skip"` is skipped: no
    backward pass, and the buffers its forward pass changed (batch-norm statistics) are
    restored. An epoch with every step skipped raises, since nothing trained.
    """
    model.train()
    tally = _Tally(distributed)
    auxiliary = trains_auxiliary(model)
    scaler = scaler or precision.grad_scaler()
    step = skipped = pending = 0  # pending: samples whose gradients await the next step
    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(
        tqdm(batches, desc=f"{desc} {epoch}", leave=False, disable=None), start=1
    ):
        batch = batch.to(device)
        buffers = [b.clone() for b in model.buffers()] if nonfinite == "skip" else []
        y = targets(batch)
        with precision.autocast():
            outputs = forward(model, batch, y if auxiliary else None)
        terms = None
        if auxiliary:
            outputs, terms = outputs
        task_loss, scored = batch_loss(outputs, y, objectives, loss_weights)
        loss = task_loss if terms is None else terms.total(task_loss)
        if not finite_on_every_process(loss, distributed):
            if nonfinite != "skip":
                raise nonfinite_loss_error(desc, epoch, step, loss, optimizer)
            with torch.no_grad():
                for buffer, saved in zip(model.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
            skipped += 1
            continue
        last_of_group = step % accumulate == 0
        if accumulate == 1:  # the mean loss: bit for bit what a run without accumulation does
            scaler.scale(loss / len(batch)).backward()
        else:  # the summed loss; the gradients are divided by the group's samples at the step
            with contextlib.nullcontext() if last_of_group else no_sync(model):
                scaler.scale(loss).backward()
        pending += len(batch)
        if last_of_group:
            optimizer_step(
                model, optimizer, scaler, pending if accumulate > 1 else 1, clip_grad_norm
            )
            pending = 0
        tally.add(task_loss.detach(), scored, len(batch), terms)
        if on_step is not None:
            on_step(task_loss.item() / len(batch))
    if pending:
        optimizer_step(model, optimizer, scaler, pending, clip_grad_norm)
    if skipped and skipped == step:
        raise NonFiniteError(
            f"stage '{desc}': every one of the {step} training steps of epoch {epoch} had a "
            "non-finite loss, so nothing trained. Check the inputs for NaN/Inf values or "
            "lower the learning rate"
        )
    if skipped:
        log.warning(
            "stage '%s' epoch %d: skipped %d of %d training steps with a non-finite loss",
            desc, epoch, skipped, step,
        )  # fmt: skip
    metrics = tally.result()
    metrics.skipped = skipped
    return metrics


def no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's `no_sync` (gradients accumulate locally until the step's backward pass), or
    nothing for a plain module."""
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    samples: int,
    clip_grad_norm: float | None,
) -> None:
    """Divide the accumulated gradients by `samples`, clip them, step and clear them."""
    if samples != 1 or clip_grad_norm is not None:
        scaler.unscale_(optimizer)  # clip and divide true gradients (fp16 scales them)
        params = [p for p in model.parameters() if p.grad is not None]
        if samples != 1:
            for p in params:
                p.grad.div_(samples)
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(params, clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def nonfinite_entries(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors in `state` that hold a NaN or an infinity."""
    return [
        name
        for name, value in state.items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def check_finite_weights(
    model: nn.Module, desc: str, epoch: int, constant: set[str] = frozenset()
) -> None:
    """Stop when training left NaN or infinite weights (a finite loss with an overflowing
    gradient does): such a model must not be scored, kept as best or trained on. The
    `constant` parameters (never trained) are not looked at."""
    bad = nonfinite_entries(changing_state(model, constant))
    if bad:
        raise NonFiniteError(
            f"stage '{desc}': after epoch {epoch} the weights {bad[:3]}"
            f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} hold NaN or Inf values. "
            "Lower the learning rate or check the inputs for extreme values"
        )


@dataclass
class FitResult:
    """The best validation epoch's metrics, and whether the stage is done (every epoch has
    run, or it stopped early) or can be resumed."""

    best: dict[str, float]
    epochs_done: int
    finished: bool
    stopped_early: bool = False


def rng_state(generators: Sequence[torch.Generator] = ()) -> dict:
    """Every random state a run draws from, so that a resumed run draws the same numbers.

    Only tensors and plain Python values, so checkpoints load with `weights_only=True`.
    """
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: dict, generators: Sequence[torch.Generator] = ()) -> None:
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    for generator, saved in zip(generators, state["generators"], strict=True):
        generator.set_state(saved)


def stretch_schedule(
    scheduler: torch.optim.lr_scheduler.LRScheduler, planned: int, epochs: int, desc: str
) -> None:
    """Continue a cosine schedule planned over `planned` epochs as if it had been planned
    over `epochs` from the start: the learning rate jumps to that curve's value now and
    follows it from here (epochs to add). Shortening a schedule is refused."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
        raise ValueError(
            f"stage '{desc}': epochs can be raised on resume ({planned} -> {epochs}) only "
            "with the default cosine schedule and no warmup, which can be stretched; this "
            f"stage uses {type(scheduler).__name__}"
        )
    if epochs < planned:
        raise ValueError(
            f"stage '{desc}': the resumed state was planned for {planned} epochs; epochs can "
            f"only be raised (epochs to add), got {epochs}"
        )
    done = scheduler.last_epoch
    scheduler.T_max = epochs
    cosine = (1 + math.cos(math.pi * done / epochs)) / 2
    before = max(g["lr"] for g in scheduler.optimizer.param_groups)
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * cosine
    log.warning(
        "stage '%s': epochs raised from %d to %d on resume after epoch %d; the cosine "
        "learning-rate schedule is stretched to %d epochs: the rate jumps from %g to %g and "
        "then follows the %d-epoch curve (epochs up to %d followed the %d-epoch one)",
        desc, planned, epochs, done, epochs, before,
        max(g["lr"] for g in scheduler.optimizer.param_groups), epochs, done, planned,
    )  # fmt: skip


def constant_state(model: nn.Module) -> set[str]:
    """The entries of `model`'s state that training cannot change: frozen parameters, and
    the buffers of modules that stay in eval mode under `train()` (a frozen encoder's batch
    norms keep their statistics)."""
    mode = model.training
    model.train()
    try:
        constant = {name for name, p in model.named_parameters() if not p.requires_grad}
        for prefix, module in model.named_modules():
            if not module.training:
                dot = f"{prefix}." if prefix else ""
                constant |= {dot + name for name, _ in module.named_buffers(recurse=False)}
    finally:
        model.train(mode)
    return constant


def changing_state(model: nn.Module, constant: set[str]) -> dict[str, torch.Tensor]:
    """The model's state without the `constant` entries (parameters that never train)."""
    return {k: v for k, v in model.state_dict().items() if k not in constant}


def load_changing_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], constant: set[str]
) -> None:
    """Load a `changing_state`; anything else missing is an error, as in a strict load."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - constant)
    if missing or unexpected:
        raise ValueError(
            f"the saved state does not fit the model: missing {missing}, unexpected {unexpected}"
        )


def data_parallel(
    model: nn.Module, device: torch.device, find_unused_parameters: bool = False
) -> nn.Module:
    """`model` wrapped for synchronous data-parallel steps; parameters stay shared with it."""
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def fit(
    model: nn.Module,
    train_batches: Iterable[Batch],
    val_batches: Iterable[Batch],
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    device: torch.device,
    groups: list[dict] | None = None,
    targets: TargetFn = batch_targets,
    loss_weights: Mapping[str, float] | None = None,
    before_epoch: Callable[[int], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    on_step: Callable[[float], None] | None = None,
    state_path: Path | None = None,
    resume: dict | None = None,
    stop_after: int | None = None,
    generators: Sequence[torch.Generator] = (),
    precision: Precision = FLOAT32,
    distributed: Distributed = SINGLE,
    find_unused_parameters: bool = False,
    desc: str = "fit",
    nonfinite: str = "stop",
    state_extra: Mapping[str, Any] | None = None,
    monitor: Monitor | None = None,
    accumulate: int = 1,
    clip_grad_norm: float | None = None,
    optimizer_spec: Mapping[str, Any] | None = None,
    scheduler_spec: Mapping[str, Any] | None = None,
    warmup_epochs: int = 0,
    objectives: Mapping[str, Objective] | None = None,
) -> FitResult:
    """Train with AdamW and cosine decay (or `optimizer_spec`, `scheduler_spec` and a linear
    warmup, see `fusion.training.optim`); keep the weights of the best validation epoch.

    `groups` are optimizer parameter groups (`fusion.surgery.param_groups`; by default all
    parameters, with no weight decay on norms and biases). They may include frozen
    parameters: those get no gradient and stay untouched until `before_epoch` (a gradual
    unfreezing schedule, say) makes them trainable. `targets` picks the labels from a batch
    (by default `batch.targets`), `objectives` give each task's loss and metrics (see
    `evaluate`), and `loss_weights` weighs a branching head's tasks.
    `on_step` gets each training step's mean loss; `on_epoch` each epoch's metrics. A
    loader's sampler with `set_epoch` (shuffling or sharding per epoch) is told each epoch.

    Resumable: after every epoch the whole state (model, optimizer, scheduler, best epoch,
    random states including `generators`, such as a data loader's) is written atomically
    to `state_path`; `resume` continues from such a state and ends exactly where an
    uninterrupted run would (on CPU). `stop_after` ends this call after that many epochs,
    e.g. to fit a cluster's time slot, leaving a state to resume from.
    A `resume` state planned for fewer epochs is continued to `epochs` (epochs to add),
    with the cosine schedule stretched (see `stretch_schedule`). `state_extra` entries
    (the run's config, say) are stored in each state beside the weights.
    `precision` picks float32 or mixed precision (with fp16's gradient scaler saved in
    the state). When every epoch has run, the model holds the best epoch's weights: the
    best by `monitor` (default: the highest validation accuracy), which also stops the
    stage early when it has a patience (`FitResult.stopped_early`). `accumulate` and
    `clip_grad_norm` shape each optimizer step (see `train_epoch`).

    Never runs on silently with a broken model: a NaN or infinite training loss raises
    `NonFiniteError` naming `desc`, the epoch and the step (with `nonfinite="skip"`, such
    steps are skipped and counted instead, see `train_epoch`), and so do non-finite
    weights after an epoch. An epoch whose validation loss or monitored metric is not
    finite is never the best one; if no epoch is, `NonFiniteError` says so.

    With `distributed` (one of several processes, each given its share of the batches),
    training steps go through DistributedDataParallel, which averages gradients; metrics
    are summed over processes, rank 0 alone writes the state, and each process's random
    state is kept in it. Modules here use every parameter in every step (a branch with
    no samples runs on an empty batch), so `find_unused_parameters` is only for models
    that do not.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got '{nonfinite}'")
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    if clip_grad_norm is not None and not 0 < clip_grad_norm < math.inf:
        raise ValueError(
            f"clip_grad_norm must be None or a finite number > 0, got {clip_grad_norm}"
        )
    monitor = monitor or Monitor(default_monitor(objectives))
    groups = groups if groups is not None else param_groups(model, lr, weight_decay)
    optimizer = build_optimizer(optimizer_spec, groups, lr, weight_decay)
    scheduler = build_schedule(optimizer, scheduler_spec, epochs, warmup_epochs)
    scaler = precision.grad_scaler()
    best: dict[str, float] = {}
    best_state = None
    improved_at, reference = 0, None  # the last epoch that improved by more than min_delta
    # Without a schedule that thaws them, frozen parameters (and the statistics of frozen
    # batch norms) never change: the states below leave them out (they come from where the
    # model was built from, e.g. stage-1 checkpoints), which keeps a per-epoch state small
    # next to large frozen encoders, and the per-epoch checks short.
    constant = set() if before_epoch is not None else constant_state(model)
    start = 1
    if resume is not None:
        load_changing_state(model, resume["model"], constant)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume["epochs"] != epochs:
            stretch_schedule(scheduler, resume["epochs"], epochs, desc)
        scaler.load_state_dict(resume.get("scaler", {}))
        best, best_state = resume["best"], resume["best_model"]
        improved_at, reference = resume.get("improved", (0, None))
        rng = resume["rng"]
        if distributed.enabled and len(resume.get("rank_rng", [])) == distributed.world_size:
            rng = resume["rank_rng"][distributed.rank]
        set_rng_state(rng, generators)
        start = resume["epoch"] + 1
    sampler = getattr(train_batches, "sampler", None)
    step_model, trainable = model, None
    for epoch in tqdm(range(start, epochs + 1), desc=desc, disable=None):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if before_epoch is not None:
            before_epoch(epoch)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"{desc}: the model has no trainable parameters at epoch {epoch}")
        if distributed.enabled and trainable != (
            now := [p.requires_grad for p in model.parameters()]
        ):
            # DDP syncs the parameters that were trainable when it was built: rebuild it
            # whenever that set changes (gradual unfreezing).
            step_model, trainable = data_parallel(model, device, find_unused_parameters), now
        lr = max(group["lr"] for group in optimizer.param_groups)  # this epoch's (scheduled)
        train = train_epoch(
            step_model,
            train_batches,
            optimizer,
            device,
            targets,
            loss_weights,
            desc,
            on_step,
            precision,
            scaler,
            distributed,
            epoch,
            nonfinite,
            accumulate,
            clip_grad_norm,
            objectives,
        )
        scheduler.step()
        distributed.broadcast_buffers(model)
        check_finite_weights(model, desc, epoch, constant)
        val = evaluate(
            model, val_batches, device, targets, loss_weights, precision, distributed, objectives
        )
        metrics = {"epoch": epoch, **train.as_dict("train"), "train/lr": lr, **val.as_dict("val")}
        if nonfinite == "skip":
            metrics["train/skipped_steps"] = train.skipped
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        value = monitor.value(metrics)
        if not (math.isfinite(val.loss) and math.isfinite(value)):
            log.warning(
                "stage '%s' epoch %d: validation loss %s, %s %s; not a candidate for best",
                desc, epoch, val.loss, monitor.metric, value,
            )  # fmt: skip
        else:
            if monitor.better(value, best.get(monitor.metric)):
                best = metrics
                best_state = copy.deepcopy(changing_state(model, constant))
            if monitor.better(value, reference, monitor.min_delta):
                improved_at, reference = epoch, value
        stop_early = (
            monitor.should_stop(epoch, improved_at) and epoch < epochs and best_state is not None
        )
        rank_rng = distributed.gather(rng_state(generators))
        if state_path is not None and distributed.is_main:
            save_checkpoint(
                state_path,
                {
                    "epoch": epoch,
                    "epochs": epochs,
                    "model": changing_state(model, constant),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "best": best,
                    "best_model": best_state,
                    "rng": rank_rng[0],
                    "rank_rng": rank_rng,
                    "improved": (improved_at, reference),
                    "stopped_early": stop_early,
                    **dict(state_extra or {}),
                },
            )
        if stop_early:
            log.info(
                "stage '%s': stopping early after epoch %d of %d: %s has not improved by more "
                "than %g since epoch %d (patience %d); keeping epoch %d", desc, epoch, epochs,
                monitor.metric, monitor.min_delta, improved_at, monitor.patience, best["epoch"],
            )  # fmt: skip
            load_changing_state(model, best_state, constant)
            return FitResult(best, epoch, finished=True, stopped_early=True)
        if stop_after is not None and epoch - start + 1 >= stop_after and epoch < epochs:
            return FitResult(best, epoch, finished=False)
    if best_state is None:
        raise NonFiniteError(
            f"stage '{desc}': no epoch had a finite validation loss and {monitor.metric}, so there is "
            "no model to keep. Check the validation data for NaN/Inf values"
        )
    load_changing_state(model, best_state, constant)
    log.info(
        "stage '%s': kept epoch %d of %d (%s %.6g)",
        desc, best["epoch"], epochs, monitor.metric, best[monitor.metric],
    )  # fmt: skip
    return FitResult(best, epochs, finished=True)
