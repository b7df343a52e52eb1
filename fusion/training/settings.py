"""The recipe's settings as plain dataclasses: what `trainer.*` in a config holds.

The library takes these objects, never a Hydra config; `experiments/schema.py` uses the
same classes as the typed schema, so a config key and a field are one name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fusion.tasks import Objective
from fusion.training.distributed import BACKENDS
from fusion.training.loop import NONFINITE
from fusion.training.monitor import Monitor, default_monitor
from fusion.training.optim import check_rates, resolve, takes_weight_decay
from fusion.training.precision import PRECISIONS, Precision


class ConfigError(ValueError):
    """A setting that cannot work; the message names its key (`trainer.batch_size`, ...)."""

    @classmethod
    def keyed(cls, err: ValueError, prefix: str = "") -> ConfigError:
        """From a library error worded `<key>: <reason>`: `config key '<prefix><key>': <reason>`."""
        key, _, reason = str(err).partition(": ")
        return cls(f"config key '{prefix}{key}': {reason}")


@dataclass
class UnfreezeConfig:
    """Gradual unfreezing of the encoders' backbones in stage 2 (`fusion.surgery`)."""

    start_epoch: int = 1
    every: int = 1
    stages_per_step: int = 1


@dataclass
class EarlyStoppingConfig:
    """Stop a stage once `monitor` has not improved by more than `min_delta` for `patience`
    epochs (`fusion.training.monitor.Monitor`)."""

    patience: int = 3
    min_delta: float = 0.0


@dataclass
class StageConfig:
    """One training stage: epochs, AdamW with cosine decay, parameter groups, how each step
    is taken (accumulation, clipping) and which epoch is kept (`monitor`)."""

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lr_mult: dict[str, float] | None = None
    weight_decay_for: dict[str, float] | None = None
    layer_decay: float | None = None
    accumulate: int = 1
    clip_grad_norm: float | None = None
    monitor: str | None = None  # None: the tasks' main score (see default_monitor)
    early_stopping: EarlyStoppingConfig | None = None
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    warmup_epochs: int = 0

    def monitor_for(self, objectives: Mapping[str, Objective] | None = None) -> Monitor:
        """The stage's `Monitor` for a model predicting these tasks: its metric (by default
        their main score), with early stopping's patience if set."""
        metric = self.monitor or default_monitor(objectives)
        stopping = self.early_stopping
        if stopping is None:
            return Monitor(metric)
        return Monitor(metric, stopping.patience, stopping.min_delta)


@dataclass
class PretrainConfig(StageConfig):
    """Stage 1: each encoder with a linear head on its own modality."""

    epochs: int = 12
    lr: float = 2e-3
    reuse: bool = True


@dataclass
class AuxiliaryConfig:
    """Losses beside the task loss in stage 2 (`fusion.auxiliary`), on each modality's
    features: a unimodal head per modality (weight `unimodal`), and InfoNCE between
    `pairs` (weight `contrastive`, with its projections and temperature)."""

    unimodal: float = 0.0
    contrastive: float = 0.0
    pairs: list[list[str]] = field(default_factory=list)
    projection_dim: int = 64
    temperature: float = 0.07


@dataclass
class OGMGEConfig:
    """OGM-GE gradient modulation in stage 2 (`fusion.imbalance.OGMGE`)."""

    alpha: float = 0.5
    noise: bool = True
    start_epoch: int = 1
    end_epoch: int | None = None


@dataclass
class GradientBlendingConfig:
    """Gradient-Blending weights of the fused and unimodal losses in stage 2
    (`fusion.imbalance.GradientBlending`), re-estimated every `every` epochs."""

    every: int = 1


@dataclass
class FuseConfig(StageConfig):
    """Stage 2: encoders frozen (or thawed gradually), fuser and head trained."""

    unfreeze: UnfreezeConfig | None = None
    views: int | None = 10
    auxiliary: AuxiliaryConfig | None = None
    ogm_ge: OGMGEConfig | None = None
    gradient_blending: GradientBlendingConfig | None = None


@dataclass
class AlignConfig:
    """Contrastive alignment before stage 1 (`fusion.training.align`): the encoders of
    `pairs` are trained together with InfoNCE, then stage 1 trains only a linear probe on
    each aligned (frozen) encoder."""

    pairs: list[list[str]] = field(default_factory=list)
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    projection_dim: int = 64
    temperature: float = 0.07


@dataclass
class FeatureCacheConfig:
    enabled: bool = True
    dtype: str = "float32"


@dataclass
class TrainerConfig:
    """Devices, precision, loaders, the feature cache and both stages."""

    device: str = "auto"
    strategy: str = "single"
    backend: str = "auto"
    find_unused_parameters: bool = False
    precision: str = "32"
    channels_last: bool = False
    compile: bool = False
    batch_size: int = 64
    num_workers: int | None = None
    pin_memory: bool | None = None
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    feature_cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    align: AlignConfig | None = None
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    resume: str | None = None
    stop_after_epochs: int | None = None
    nonfinite: str = "stop"  # a NaN/Inf training loss: stop the stage, or skip the step


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
MAX_WORKERS = 8  # data loading workers per training process that `num_workers: null` chooses
DEVICES = "auto, cpu, cuda, cuda:N (N a GPU index) or mps"


def check_align(align: AlignConfig, fail: Callable[[str, str], None]) -> None:
    """The alignment stage's numbers (its pairs are checked against the data's modalities)."""
    if not align.pairs:
        fail("align.pairs", "expected at least one pair of modalities, e.g. [[image, audio]]")
    for key in ("epochs", "projection_dim"):
        if getattr(align, key) < 1:
            fail(f"align.{key}", f"expected >= 1, got {getattr(align, key)}")
    for key, low in (("lr", 0.0), ("temperature", 0.0)):
        value = getattr(align, key)
        if not low < value < math.inf:
            fail(f"align.{key}", f"expected a finite number > 0, got {value}")
    if not 0 <= align.weight_decay < math.inf:
        fail("align.weight_decay", f"expected a finite number >= 0, got {align.weight_decay}")


def check_auxiliary(fuse: FuseConfig, fail: Callable[[str, str], None]) -> None:
    """Stage 2's auxiliary losses, OGM-GE and Gradient-Blending settings (pairs are checked
    against the data's modalities, OGM-GE against the tasks). They reach the fused model
    only through its encoders, so without `unfreeze` (encoders frozen throughout) they
    would change nothing, and are refused."""
    for key in ("auxiliary", "ogm_ge", "gradient_blending"):
        if getattr(fuse, key) is not None and fuse.unfreeze is None:
            fail(
                f"fuse.{key}",
                "the encoders stay frozen in stage 2 (trainer.fuse.unfreeze is null), and "
                f"{key} acts on the fused model only through them, so it would change "
                "nothing; thaw the encoders, e.g. trainer.fuse.unfreeze={start_epoch: 1}",
            )
    thaw = fuse.unfreeze.start_epoch if fuse.unfreeze is not None else 1
    if fuse.ogm_ge is not None:
        ogm = fuse.ogm_ge
        if fuse.unfreeze is not None and ogm.start_epoch < thaw:
            fail(
                "fuse.ogm_ge.start_epoch",
                f"the encoders thaw at epoch {thaw} (trainer.fuse.unfreeze.start_epoch), and "
                f"OGM-GE acts only on them; start it there: trainer.fuse.ogm_ge.start_epoch={thaw}",
            )
        if not 0 < ogm.alpha < math.inf:
            fail("fuse.ogm_ge.alpha", f"expected a finite number > 0, got {ogm.alpha}")
        if not 1 <= ogm.start_epoch <= fuse.epochs:
            fail(
                "fuse.ogm_ge.start_epoch",
                f"expected 1 to {fuse.epochs} (the stage's epochs), got {ogm.start_epoch}",
            )
        if ogm.end_epoch is not None and not ogm.start_epoch <= ogm.end_epoch:
            fail(
                "fuse.ogm_ge.end_epoch",
                f"expected null or >= start_epoch ({ogm.start_epoch}), got {ogm.end_epoch}",
            )
    if fuse.gradient_blending is not None:
        every = fuse.gradient_blending.every
        if every < 1:
            fail("fuse.gradient_blending.every", f"expected >= 1 (epochs), got {every}")
        if 2 * every >= fuse.epochs:
            most = (fuse.epochs - 1) // 2
            fix = (
                f"lower every (at most {most}) or raise trainer.fuse.epochs"
                if most >= 1
                else "raise trainer.fuse.epochs to 3 or more (every: 1)"
            )
            fail(
                "fuse.gradient_blending.every",
                f"the first weights are estimated after epoch {2 * every} (losses at epochs "
                f"{every} and {2 * every}) and used from the next, but the stage has "
                f"{fuse.epochs} epochs: {fix}",
            )
        if fuse.auxiliary is not None and fuse.auxiliary.unimodal:
            fail(
                "fuse.auxiliary.unimodal",
                "Gradient-Blending estimates the unimodal losses' weights (and the task "
                "loss's); leave unimodal out (0)",
            )
    aux = fuse.auxiliary
    if aux is None:
        return
    for key in ("unimodal", "contrastive"):
        value = getattr(aux, key)
        if not 0 <= value < math.inf:
            fail(f"fuse.auxiliary.{key}", f"expected a finite weight >= 0, got {value}")
    if not aux.unimodal and not aux.contrastive and fuse.gradient_blending is None:
        fail("fuse.auxiliary", "every weight is 0 (unimodal, contrastive): nothing to add")
    if aux.contrastive and not aux.pairs:
        fail(
            "fuse.auxiliary.pairs",
            "expected pairs of modalities, e.g. [[image, audio]]",
        )
    if aux.pairs and not aux.contrastive:
        fail("fuse.auxiliary.contrastive", "pairs are set but their weight is 0")
    if aux.projection_dim < 1:
        fail("fuse.auxiliary.projection_dim", f"expected >= 1, got {aux.projection_dim}")
    if not 0 < aux.temperature < math.inf:
        fail("fuse.auxiliary.temperature", f"expected a finite number > 0, got {aux.temperature}")


def check_trainer(trainer: TrainerConfig) -> None:
    """Raise `ConfigError` naming the first `trainer.*` setting that cannot work, so that it
    fails before anything is built rather than in stage 2 or when saving."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"config key 'trainer.{key}': {message}")

    check_guards(trainer)
    for stage in ("pretrain", "fuse"):
        check_stage(stage, getattr(trainer, stage), fail)
    if trainer.align is not None:
        check_align(trainer.align, fail)
    if trainer.fuse.unfreeze is not None:  # before what depends on when the encoders thaw
        for key, value in dataclasses.asdict(trainer.fuse.unfreeze).items():
            if value < 1:
                fail(f"fuse.unfreeze.{key}", f"expected >= 1, got {value}")
        if trainer.fuse.unfreeze.start_epoch > trainer.fuse.epochs:
            fail(
                "fuse.unfreeze.start_epoch",
                f"expected 1 to {trainer.fuse.epochs} (the stage's epochs): the encoders would "
                f"never thaw, got {trainer.fuse.unfreeze.start_epoch}",
            )
    check_auxiliary(trainer.fuse, fail)
    if not DEVICE.fullmatch(trainer.device):
        gpu = "gpu" in trainer.device
        hint = f"; did you mean '{trainer.device.replace('gpu', 'cuda')}'?" if gpu else ""
        fail("device", f"expected {DEVICES}, got '{trainer.device}'{hint}")
    if trainer.batch_size < 1:
        fail("batch_size", f"expected >= 1, got {trainer.batch_size}")
    if trainer.precision not in PRECISIONS:
        fail("precision", f"expected one of {PRECISIONS}, got '{trainer.precision}'")
    if trainer.feature_cache.dtype not in ("float32", "float16"):
        fail(
            "feature_cache.dtype",
            f"expected float32 or float16, got '{trainer.feature_cache.dtype}'",
        )
    if trainer.strategy not in ("single", "ddp"):
        fail("strategy", f"expected single or ddp, got '{trainer.strategy}'")
    if trainer.backend not in BACKENDS:
        fail("backend", f"expected one of {BACKENDS}, got '{trainer.backend}'")
    if trainer.fuse.views is not None and trainer.fuse.views < 1:
        fail("fuse.views", f"expected null or >= 1, got {trainer.fuse.views}")
    if trainer.num_workers is not None and trainer.num_workers < 0:
        fail("num_workers", f"expected null (chosen) or >= 0, got {trainer.num_workers}")
    if trainer.prefetch_factor is not None and trainer.prefetch_factor < 1:
        fail("prefetch_factor", f"expected null or >= 1, got {trainer.prefetch_factor}")
    for key in ("persistent_workers", "prefetch_factor"):
        if getattr(trainer, key) and worker_count(trainer.num_workers) == 0:
            given = (
                "trainer.num_workers=0"
                if trainer.num_workers == 0
                else "trainer.num_workers=null gives none here (no CUDA: data is read in the "
                "training process); set trainer.num_workers"
            )
            fail(key, f"needs worker processes, but {given}")
    if trainer.stop_after_epochs is not None and trainer.stop_after_epochs < 1:
        fail(
            "stop_after_epochs",
            f"expected null (train every epoch) or >= 1, got {trainer.stop_after_epochs}",
        )
    if trainer.resume is not None and not trainer.resume.strip():
        fail("resume", "expected null or a run directory (or its fuse_state.pt), got ''")


def check_stage(name: str, stage: StageConfig, fail: Callable[[str, str], None]) -> None:
    """One stage's epochs, learning rates and weight decays: an lr of 0 trains nothing and a
    negative decay grows the weights, so both are refused rather than run."""
    if stage.epochs < 1:
        fail(f"{name}.epochs", f"expected >= 1, got {stage.epochs}")
    if not 0 < stage.lr < math.inf:
        fail(f"{name}.lr", f"expected a finite number > 0, got {stage.lr}")
    if not 0 <= stage.weight_decay < math.inf:
        fail(f"{name}.weight_decay", f"expected a finite number >= 0, got {stage.weight_decay}")
    for key in ("lr_mult", "weight_decay_for"):
        for pattern, value in (getattr(stage, key) or {}).items():
            if not 0 <= value < math.inf:
                fail(f"{name}.{key}.{pattern}", f"expected a finite number >= 0, got {value}")
    if stage.layer_decay is not None and not 0 < stage.layer_decay <= 1:
        fail(f"{name}.layer_decay", f"expected null or in (0, 1], got {stage.layer_decay}")
    if stage.accumulate < 1:
        fail(
            f"{name}.accumulate",
            f"expected >= 1 (batches per optimizer step), got {stage.accumulate}",
        )
    if stage.clip_grad_norm is not None and not 0 < stage.clip_grad_norm < math.inf:
        fail(
            f"{name}.clip_grad_norm",
            f"expected null or a finite number > 0, got {stage.clip_grad_norm}",
        )
    for kind in ("optimizer", "scheduler"):
        spec = getattr(stage, kind)
        if spec is not None:
            try:
                resolve(spec, kind)
            except ValueError as err:
                key, _, message = str(err).partition(": ")
                fail(f"{name}.{kind}.{key}", message)
    if stage.optimizer is not None and not takes_weight_decay(stage.optimizer):
        decays = [stage.weight_decay, *(stage.weight_decay_for or {}).values()]
        if any(decays):
            fail(
                f"{name}.weight_decay",
                f"{stage.optimizer['_target_']} takes no weight decay, so it would be ignored; "
                "set it (and weight_decay_for) to 0",
            )
    if not 0 <= stage.warmup_epochs < stage.epochs:
        fail(
            f"{name}.warmup_epochs",
            f"expected 0 to {stage.epochs - 1} (fewer than the stage's epochs), "
            f"got {stage.warmup_epochs}",
        )
    try:
        check_rates(
            stage.optimizer, stage.scheduler, stage.lr, stage.weight_decay, stage.epochs,
            stage.warmup_epochs,
        )  # fmt: skip
    except ValueError as err:
        key, _, message = str(err).partition(": ")
        fail(f"{name}.{key}", message)
    if stage.early_stopping is not None:
        if stage.early_stopping.patience < 1:
            fail(
                f"{name}.early_stopping.patience",
                f"expected >= 1 (epochs), got {stage.early_stopping.patience}",
            )
        if not 0 <= stage.early_stopping.min_delta < math.inf:
            fail(
                f"{name}.early_stopping.min_delta",
                f"expected a finite number >= 0, got {stage.early_stopping.min_delta}",
            )


def check_guards(trainer: TrainerConfig) -> None:
    """Raise `ConfigError` for a policy on non-finite training that does not exist."""
    if trainer.nonfinite not in NONFINITE:
        raise ConfigError(
            f"config key 'trainer.nonfinite': expected one of {NONFINITE}, "
            f"got '{trainer.nonfinite}'"
        )


def resolve_device(name: str) -> torch.device:
    """`trainer.device`: auto picks CUDA when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"config key 'trainer.device': '{name}' requested but CUDA is unavailable"
        )
    return torch.device(name)


def worker_count(num_workers: int | None) -> int:
    """`trainer.num_workers`; null chooses: none without CUDA (on CPU the training process
    uses every core, and a worker would take one from it), else the cores this process may
    use, shared among the processes of this machine (`LOCAL_WORLD_SIZE`, set by torchrun)
    and one left to each training process, at most 8 per process."""
    if num_workers is not None:
        return num_workers
    if not torch.cuda.is_available():
        return 0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(MAX_WORKERS, len(os.sched_getaffinity(0)) // local - 1))


def resolve_precision(name: str, device: torch.device) -> Precision:
    try:
        return Precision.on(name, device)
    except ValueError as err:
        raise ConfigError(f"config key 'trainer.precision': {err}") from None
