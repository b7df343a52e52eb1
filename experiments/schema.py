"""Typed schema for the config groups, checked before anything runs.

A typo'd key or a value of the wrong type fails here with the key's full name, instead
of minutes into training. The trainer's settings are the library's own dataclasses
(`fusion.training.settings`). The dataset and model components stay free-form: they are
`_target_` objects whose own signatures are checked when they are built.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import socket
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fusion.tasks import TaskSettings
from fusion.training.settings import ConfigError, TrainerConfig, check_trainer

__all__ = ["ConfigError", "TrainConfig", "register_resolvers", "validate"]


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
    auto_encoders: dict[str, str] = field(default_factory=dict)
    fusion: Any = None
    head: Any = None
    modality_dropout: dict[str, float] | None = None


@dataclass
class TrainConfig:
    """The whole config. `data` is free-form: a dataset's `_target_` and its own arguments,
    checked against that target's signature when it is built (see `experiments.builders`)."""

    data: Any = None
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    tags: list[str] = field(default_factory=list)
    tasks: dict[str, TaskSettings] = field(default_factory=dict)


def validate(cfg: DictConfig) -> DictConfig:
    """Merge `cfg` onto the schema; raise `ConfigError` naming the first bad key."""
    try:
        checked = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        if not key or "." not in str(key):  # an item of a nested list: OmegaConf loses the path
            key = locate(TrainConfig, cfg) or key or "?"
        reason = str(err).splitlines()[0]
        owner = getattr(err, "object_type", None)  # the schema class of the key's parent
        hint = ""
        if isinstance(err, ConfigKeyError) and dataclasses.is_dataclass(owner):
            # the settings of the key's own section first (trainer.align.epoch -> epochs)
            settings = [f.name for f in dataclasses.fields(owner)]
            hint = close_matches(key.rpartition(".")[2], settings)
        if isinstance(err, ConfigKeyError) and not hint:
            hint = unknown_key_hint(key, cfg)
        if str(key).endswith("pairs") and "ListConfig" in reason:
            reason, hint = (
                reason.rstrip("."),
                "; write a list of pairs of modalities, e.g. [[image, audio]]",
            )
        if not hint and isinstance(err, ConfigKeyError) and dataclasses.is_dataclass(owner):
            hint = f"; it takes {[f.name for f in dataclasses.fields(owner)]}"
        section = section_type(TrainConfig, str(key))
        if not hint and section is not None and "is not a subclass of" in reason:
            settings = ", ".join(f.name for f in dataclasses.fields(section))
            hint = (
                f"; it takes a mapping of its settings ({settings}): '{key}={{}}' for the "
                "defaults, or null for none"
            )
        raise ConfigError(f"config key '{key}': {reason}{hint}") from None
    if checked.logger.mode not in ("online", "offline", "disabled"):
        raise ConfigError(
            f"config key 'logger.mode': expected online, offline or disabled, "
            f"got '{checked.logger.mode}'"
        )
    if checked.logger.watch not in (None, "gradients", "parameters", "all"):
        raise ConfigError(
            "config key 'logger.watch': expected null, gradients, parameters or all, "
            f"got '{checked.logger.watch}'"
        )
    if not isinstance(checked.data, DictConfig) or "_target_" not in checked.data:
        raise ConfigError(
            "config key 'data': expected a dataset config with a _target_ (data=manifest, ...)"
        )
    if checked.logger.log_every_n_steps < 1:
        raise ConfigError(
            f"config key 'logger.log_every_n_steps': expected >= 1, "
            f"got {checked.logger.log_every_n_steps}"
        )
    check_model(checked.model)
    check_seeds(checked)
    check_paths(checked.paths)
    check_trainer(OmegaConf.to_object(checked.trainer))
    return checked


def section_type(schema: type, key: str) -> type | None:
    """The dataclass a dotted `key` of `schema` holds (`trainer.fuse.ogm_ge` -> OGMGEConfig),
    or None when it holds something else or there is no such key."""
    for name in key.split("."):
        if not dataclasses.is_dataclass(schema):
            return None
        hints = typing.get_type_hints(schema)
        if name not in hints:
            return None
        kinds = typing.get_args(hints[name]) or [hints[name]]
        schema = next((t for t in kinds if dataclasses.is_dataclass(t)), None)
    return schema


def locate(schema: type, cfg: DictConfig, prefix: str = "") -> str | None:
    """The deepest setting of `cfg` that does not merge onto `schema` on its own
    (`trainer.align.pairs`), or None: for errors OmegaConf reports without their path (an
    item of a nested list)."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name not in cfg:
            continue
        try:
            OmegaConf.merge(OmegaConf.structured(schema), {f.name: cfg[f.name]})
        except OmegaConfBaseException:
            kinds = typing.get_args(hints[f.name]) or [hints[f.name]]
            inner = next((t for t in kinds if dataclasses.is_dataclass(t)), None)
            node = cfg[f.name]
            deeper = (
                locate(inner, node, f"{prefix}{f.name}.")
                if inner and isinstance(node, DictConfig)
                else None
            )
            return deeper or f"{prefix}{f.name}"
    return None


def check_model(model: DictConfig) -> None:
    """The fuser and head are components to build, and modality dropout rates are
    probabilities; the names of the modalities are checked against the data later
    (`experiments.builders.check_before_training`)."""
    for part, group in (("fusion", "model/fusion=gated"), ("head", "model/head=mlp")):
        node = model[part]
        if not isinstance(node, DictConfig) or "_target_" not in node:
            found = OmegaConf.to_container(node) if isinstance(node, DictConfig) else node
            raise ConfigError(
                f"config key 'model.{part}': expected a component config with a _target_ "
                f"(choose one with {group}, ...), got {found!r}"
            )
    for name, rate in (model.modality_dropout or {}).items():
        if not 0 <= rate < 1:
            raise ConfigError(
                f"config key 'model.modality_dropout.{name}': expected a probability in [0, 1), "
                f"got {rate}"
            )


SEED_RANGE = (0, 2**32 - 1)  # what numpy's legacy seeding takes; torch takes more


def check_seeds(cfg: DictConfig) -> None:
    """`seed` seeds Python, numpy and torch (`fusion.training.set_seed`); `data.seed`, when
    the dataset takes one, seeds its splits and draws with numpy. Both must be integers in
    the range all of them accept."""
    seeds = {"seed": cfg.seed}
    if cfg.data.get("seed") is not None:
        seeds["data.seed"] = cfg.data.seed
    low, high = SEED_RANGE
    for key, seed in seeds.items():
        if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high:
            raise ConfigError(
                f"config key '{key}': expected an integer in [{low}, {high}], got {seed!r}"
            )


def check_paths(paths: DictConfig) -> None:
    """An empty folder name would put outputs at the file system's root (`/runs/...`) or in
    the launch folder; whether each folder is writable is probed before training
    (`experiments.builders.check_before_training`)."""
    for key, value in paths.items():
        if not value.strip():
            raise ConfigError(f"config key 'paths.{key}': expected a folder, got {value!r}")


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


# Settings of how and where a run runs, what it logs and where it writes, not what it
# computes: a resumed run may change them, and evaluation ignores them (stage-1 encoders
# and feature caches are keyed by content, not by folder).
RUN_MECHANICS = (
    "logger",
    "paths",
    "tags",
    "trainer.resume",
    "trainer.stop_after_epochs",
    "trainer.nonfinite",
    "trainer.device",
    "trainer.strategy",
    "trainer.backend",
    "trainer.find_unused_parameters",
    "trainer.compile",
    "trainer.channels_last",
    "trainer.num_workers",
    "trainer.pin_memory",
    "trainer.persistent_workers",
    "trainer.prefetch_factor",
    "trainer.feature_cache.enabled",
    "trainer.pretrain.reuse",
)


# Written in a run's directory by `experiments.train` when the run stops without a result
# (a config, data or non-finite error), read by `experiments.report`.
FAILURE = "failure.txt"


def close_matches(name: str, options: Sequence[str]) -> str:
    """ "; did you mean [...]?" for a mistyped name, or "" when nothing is close."""
    close = difflib.get_close_matches(name, list(options), n=3)
    return f"; did you mean {close}?" if close else ""


def unknown_key_hint(key: str, config: DictConfig) -> str:
    """Close matches for a dotted key the config lacks: among its siblings, else among
    every key of the config by their last part (`trainer.epochz` finds
    `trainer.fuse.epochs`)."""
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(config, parent) if parent else config
    siblings = [str(k) for k in node] if isinstance(node, DictConfig) else []
    hint = close_matches(name, [k for k in siblings if k != name])
    if hint:
        return hint
    keys = [k for k in flatten(OmegaConf.to_container(config)) if k != key]
    close = [k for k in keys if difflib.get_close_matches(name, [k.rpartition(".")[2]])]
    return f"; did you mean {close[:3]}?" if close else ""


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config (DictConfig or plain dicts and lists) as {dotted key: leaf value}."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    if isinstance(config, dict):
        if not config:
            return {prefix: {}} if prefix else {}
        flat: dict[str, Any] = {}
        for key, value in config.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: config}


def config_differences(stored: Any, current: Any, ignore: tuple[str, ...] = ()) -> list[str]:
    """Every dotted key whose value differs between two configs, as "key: stored -> current"
    ("<absent>" for a key only one side has). Keys equal to, or under, an `ignore` entry are
    skipped: settings that may change without changing what the run computes."""

    def ignored(key: str) -> bool:
        return any(key == skip or key.startswith(f"{skip}.") for skip in ignore)

    old, new = flatten(stored), flatten(current)
    absent = "<absent>"
    return [
        f"{key}: {old.get(key, absent)!r} -> {new.get(key, absent)!r}"
        for key in sorted(old.keys() | new.keys())
        if not ignored(key) and old.get(key, absent) != new.get(key, absent)
    ]
