"""Typed schema for the config groups, checked before anything runs.

A typo'd key or a value of the wrong type fails here with the key's full name, instead
of minutes into training. Model components stay free-form: they are `_target_` objects
whose own signatures are checked when Hydra instantiates them.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fusion.training.distributed import BACKENDS
from fusion.training.precision import PRECISIONS


class ConfigError(ValueError):
    """A config that does not fit the schema; the message names the key."""


@dataclass
class DataConfig:
    _target_: str = "data.avdigits.AVDigits"
    seed: int = 0
    fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    clip_seconds: float = 1.0
    occlusion: list[float] = field(default_factory=lambda: [0.1, 0.5])
    image_noise_std: float = 0.3
    audio_snr_db: list[float] = field(default_factory=lambda: [-10.0, 0.0])
    augment: bool | None = None
    text_accuracy: float | None = None
    task: str = "digit"
    same_prob: float = 0.5
    max_samples: int | None = None
    speech_path: str | None = None


@dataclass
class UnfreezeConfig:
    start_epoch: int = 1
    every: int = 1
    stages_per_step: int = 1


@dataclass
class StageConfig:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lr_mult: dict[str, float] | None = None
    weight_decay_for: dict[str, float] | None = None
    layer_decay: float | None = None


@dataclass
class PretrainConfig(StageConfig):
    epochs: int = 12
    lr: float = 2e-3
    reuse: bool = True


@dataclass
class FuseConfig(StageConfig):
    unfreeze: UnfreezeConfig | None = None
    views: int | None = 10


@dataclass
class FeatureCacheConfig:
    enabled: bool = True
    dtype: str = "float32"


@dataclass
class TrainerConfig:
    device: str = "auto"
    strategy: str = "single"
    backend: str = "auto"
    find_unused_parameters: bool = False
    precision: str = "32"
    channels_last: bool = False
    compile: bool = False
    batch_size: int = 64
    num_workers: int = 0
    pin_memory: bool | None = None
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    feature_cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    resume: str | None = None
    stop_after_epochs: int | None = None


@dataclass
class LoggerConfig:
    mode: str = "offline"
    project: str = "fusion"
    group: str | None = None
    watch: str | None = None
    log_every_n_steps: int = 10


@dataclass
class PathsConfig:
    output_dir: str = "outputs"
    pretrained_dir: str = "outputs/pretrained"
    feature_cache_dir: str = "outputs/features"


@dataclass
class ModelConfig:
    encoders: dict[str, Any] = field(default_factory=dict)
    fusion: Any = None
    head: Any = None
    num_classes: Any = None
    modality_dropout: dict[str, float] | None = None


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task_name: str = "avdigits"
    seed: int = 0
    tags: list[str] = field(default_factory=list)


def validate(cfg: DictConfig) -> DictConfig:
    """Merge `cfg` onto the schema; raise `ConfigError` naming the first bad key."""
    try:
        checked = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0]
        raise ConfigError(f"config key '{key}': {reason}") from None
    if checked.logger.mode not in ("online", "offline", "disabled"):
        raise ConfigError(
            f"config key 'logger.mode': expected online, offline or disabled, "
            f"got '{checked.logger.mode}'"
        )
    for group, section in (
        ("trainer.pretrain", checked.trainer.pretrain),
        ("trainer.fuse", checked.trainer.fuse),
    ):
        if section.epochs < 1:
            raise ConfigError(f"config key '{group}.epochs': expected >= 1, got {section.epochs}")
    if checked.logger.watch not in (None, "gradients", "parameters", "all"):
        raise ConfigError(
            "config key 'logger.watch': expected null, gradients, parameters or all, "
            f"got '{checked.logger.watch}'"
        )
    if checked.trainer.batch_size < 1:
        raise ConfigError(
            f"config key 'trainer.batch_size': expected >= 1, got {checked.trainer.batch_size}"
        )
    trainer = checked.trainer
    if trainer.precision not in PRECISIONS:
        raise ConfigError(
            f"config key 'trainer.precision': expected one of {PRECISIONS}, got '{trainer.precision}'"
        )
    if trainer.feature_cache.dtype not in ("float32", "float16"):
        raise ConfigError(
            "config key 'trainer.feature_cache.dtype': expected float32 or float16, "
            f"got '{trainer.feature_cache.dtype}'"
        )
    if trainer.strategy not in ("single", "ddp"):
        raise ConfigError(
            f"config key 'trainer.strategy': expected single or ddp, got '{trainer.strategy}'"
        )
    if trainer.backend not in BACKENDS:
        raise ConfigError(
            f"config key 'trainer.backend': expected one of {BACKENDS}, got '{trainer.backend}'"
        )
    if trainer.fuse.views is not None and trainer.fuse.views < 1:
        raise ConfigError(
            f"config key 'trainer.fuse.views': expected null or >= 1, got {trainer.fuse.views}"
        )
    if trainer.num_workers < 0:
        raise ConfigError(
            f"config key 'trainer.num_workers': expected >= 0, got {trainer.num_workers}"
        )
    for key in ("persistent_workers", "prefetch_factor"):
        if trainer[key] and trainer.num_workers == 0:
            raise ConfigError(
                f"config key 'trainer.{key}': needs worker processes, but trainer.num_workers=0"
            )
    if not checked.model.encoders:
        raise ConfigError("config key 'model.encoders': expected at least one encoder")
    return checked


def run_id() -> str:
    """A run directory's name: start time, host and process id, unique across jobs.

    The processes of one distributed run share one directory: under `torchrun` they take
    rank 0's name from the launcher's store; under submitit the launcher names it.
    """
    own = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{socket.gethostname()}-{os.getpid()}"
    if (
        int(os.environ.get("WORLD_SIZE", 1)) > 1
        and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    ):
        from torch.distributed import TCPStore

        store = TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(minutes=5),
        )
        key = f"fusion/run_id/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
        if int(os.environ["RANK"]) == 0:
            store.set(key, own)
        return store.get(key).decode()
    return own


def register_resolvers() -> None:
    """`${run_id:}`: see `run_id`; resolved once per process."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)
