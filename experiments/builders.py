"""Configs into objects: the datasets, each modality's encoder, the fuser and head.

This is the one place where Hydra configs meet the library. A dataset config is checked
against its target's signature before it is built; the encoders come from the data's
modalities: one per modality, chosen by kind unless `model.encoders.<name>` says
otherwise, with every `???` setting filled from the data's description of the modality.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
)
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError
from torch import nn

from experiments.schema import close_matches, flatten, unknown_key_hint, validate
from fusion.contrastive import check_pairs
from fusion.data import Modality, Task, check_dataset, output_sizes
from fusion.imbalance import OGMGE
from fusion.model import MultimodalModel
from fusion.tasks import objectives_for
from fusion.training.recipe import ModelSpec
from fusion.training.settings import ConfigError, TrainerConfig

log = logging.getLogger("fusion")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ENCODER_DIR = CONFIG_DIR / "model" / "encoder"


def compose_config(*overrides: str) -> DictConfig:
    """The main job's config with `overrides`, composed and validated as the entry point
    would, for benchmarks and notebooks that need the configured data or model."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        try:
            cfg = compose("train", overrides=list(overrides))
        except ConfigCompositionException as err:
            raise unknown_override(err, overrides, compose) from None
        return validate(cfg)


def unknown_override(
    err: ConfigCompositionException, overrides: Sequence[str], compose: Any
) -> Exception:
    """Hydra refuses `data.augmnt=true` (a key the config lacks, given without `+`) and
    suggests adding it, or `model/fusion=gatd` listing the options; a typo is likelier, so
    name the close matches. Any other composition error is returned as it is."""
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        return ConfigError(
            f"config group '{group}': no option '{name}'{close_matches(name, err.options)}; "
            f"the options are {err.options}"
        )
    key = getattr(err.__cause__, "full_key", None)
    if not isinstance(err.__cause__, ConfigAttributeError) or not key:
        return err
    rest = [o for o in overrides if o.split("=", 1)[0] != key]
    owners = group_options_with(key)
    if owners:
        group = key.split(".")[0]
        return ConfigError(
            f"config key '{key}': the chosen {group} config has no such setting; it is a "
            f"setting of {' and '.join(f'{group}={o}' for o in owners)}: choose one with its "
            "override before the key's"
        )
    try:
        hint = unknown_key_hint(key, compose("train", overrides=rest))
    except ConfigCompositionException:
        hint = ""
    return ConfigError(
        f"config key '{key}': the config has no such setting{hint}; to add a new one, write "
        f"+{key}=..."
    )


def check_arguments(target: str, settings: Mapping[str, Any], key: str) -> None:
    """Name every setting under `key` that `target` takes no argument for, with close
    matches, before anything is built."""
    try:
        function = get_method(target)
    except Exception as err:  # Hydra wraps import errors in its own
        raise ConfigError(f"config key '{key}._target_': cannot import '{target}': {err}") from None
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    hints = type_hints(function)
    for name in settings:
        if name.startswith("_") or OmegaConf.is_missing(settings, name):
            continue
        if name not in parameters:
            raise ConfigError(
                f"config key '{key}.{name}': {target} takes no argument "
                f"'{name}'{close_matches(name, list(parameters))} "
                f"(it takes {[p for p in parameters if p not in ('self', 'split')]})"
            )
        if name in hints and not matches(settings[name], hints[name]):
            raise ConfigError(
                f"config key '{key}.{name}': {target} takes {describe(hints[name])}, "
                f"got {settings[name]!r}"
            )


def type_hints(function: Any) -> dict[str, Any]:
    """The annotations of a function or class's arguments; none when they cannot be read."""
    try:
        return typing.get_type_hints(function.__init__ if inspect.isclass(function) else function)
    except Exception:  # an annotation naming what the module cannot import: check no types
        return {}


def matches(value: Any, hint: Any) -> bool:
    """Whether a config value fits an argument's annotation. The types a config holds
    (numbers, strings, booleans, null, lists, mappings) are checked; anything else
    (callables, objects built from a nested `_target_`) is left to the target."""
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if isinstance(value, Mapping | DictConfig) and "_target_" in value:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, int | hint) and not isinstance(value, bool)
    if hint is str or origin in (Path, os.PathLike):
        return isinstance(value, str)
    if origin in (list, tuple, Sequence):
        items = [a for a in args if a is not Ellipsis]
        return isinstance(value, ListConfig | list | tuple) and all(
            matches(v, items[0] if items else Any) for v in value
        )
    if origin in (dict, Mapping):
        return isinstance(value, DictConfig | Mapping) and all(
            matches(v, args[1] if args else Any) for v in value.values()
        )
    return True


def describe(hint: Any) -> str:
    """An annotation in a config's words: `int | None` is "int or null"."""
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if hint is type(None):
        return "null"
    if origin in (Path, os.PathLike):
        return "a path"
    if origin in (list, tuple, Sequence):
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def build_split(data: DictConfig, split: str) -> Any:
    """One split of the configured dataset, checked against the dataset contract."""
    check_arguments(data._target_, data, "data")
    missing = [k for k in data if OmegaConf.is_missing(data, k)]
    if missing:
        raise ConfigError(
            f"config key 'data.{missing[0]}': {data._target_} needs it; set it on the command "
            f"line, e.g. data.{missing[0]}=..."
        )
    check_data_files(data)
    try:
        dataset = instantiate(data, split=split)
    except InstantiationException as err:
        cause = err.__cause__ or err
        nested = nested_component(data, err) or failing_augment(data, split)
        if nested is not None:
            key, reason = nested
            raise ConfigError(f"config key 'data.{key}': {reason}") from None
        key = refused_key("data", data, cause)
        raise ConfigError(
            f"config key '{key}' ({data._target_}, split '{split}'): {cause}"
        ) from None
    check_dataset(dataset, f"data._target_ {data._target_}")
    return dataset


def group_options_with(key: str) -> list[str]:
    """The options of the config group `key` starts with (`data` for `data.path`) whose
    file sets `key`: `data.path` belongs to `data=manifest`."""
    group, _, rest = key.partition(".")
    folder = CONFIG_DIR / group
    if not rest or not folder.is_dir():
        return []
    return sorted(
        path.stem
        for path in folder.glob("*.yaml")
        if rest in flatten(OmegaConf.to_container(OmegaConf.load(path)))
    )


def nested_component(settings: DictConfig, err: InstantiationException) -> tuple[str, str] | None:
    """The key and the reason when Hydra failed to build a component nested in `settings`
    (an augmentation transform): Hydra's message ends in `full_key: augment0` for
    `augment[0]`. A target that cannot be imported is named at its `_target_`, with the
    close names its module has. None when the failure was not in a nested component."""
    found = re.search(r"full_key: (\S+)", str(err))
    if found is None:
        return None
    own = settings._get_full_key(None)  # Hydra's key starts at the root config
    path = found.group(1).removeprefix(f"{own}.") if own else found.group(1)
    node: Any = settings
    parts = []
    for part in path.split("."):
        indexed = re.fullmatch(r"(.+?)(\d+)", part)
        if isinstance(node, DictConfig) and part in node:
            parts.append(part)
            node = node[part]
        elif (
            indexed
            and isinstance(node, DictConfig)
            and isinstance(node.get(indexed[1]), ListConfig)
        ):
            parts.append(f"{indexed[1]}[{indexed[2]}]")
            node = node[indexed[1]][int(indexed[2])]
        else:
            return None
    key = ".".join(parts).replace(".[", "[")
    cause = err.__cause__ or err
    target = re.match(r"Error locating target '([\w.]+)'", str(err))
    if target is None:
        return key, str(cause)
    module, _, name = target[1].rpartition(".")
    try:
        hint = close_matches(name, dir(importlib.import_module(module)))
    except ImportError:
        hint = ""
    return f"{key}._target_", f"cannot import '{target[1]}'{hint}"


def failing_augment(data: DictConfig, split: str) -> tuple[str, str] | None:
    """When building a split with `augment` failed, the transform that fails and why: the
    split is built without it and each transform is tried, in order, on its first item's
    images, so the error names `augment[i]`, its settings and the shape it was given. None
    when every transform takes them (the failure was elsewhere)."""
    augment = data.get("augment")
    if not isinstance(augment, ListConfig | DictConfig) or not augment:
        return None
    entries = list(augment) if isinstance(augment, ListConfig) else [augment]
    keys = (
        [f"augment[{i}]" for i in range(len(entries))]
        if isinstance(augment, ListConfig)
        else ["augment"]
    )
    try:
        plain = instantiate(data, split=split, augment=None)
        item = plain[0] if len(plain) else {}
        transforms = [instantiate(entry) for entry in entries]
    except Exception:  # the failure is not the transforms': the caller names it
        return None
    for name, modality in plain.modalities.items():
        image = item.get(name)
        if modality.kind != "image" or image is None:
            continue
        with torch.random.fork_rng(devices=[]):
            for key, entry, transform in zip(keys, entries, transforms, strict=True):
                shape = list(getattr(image, "shape", []))
                try:
                    image = transform(image)
                except Exception as err:
                    settings = ", ".join(f"{k}={v}" for k, v in entry.items() if k != "_target_")
                    target = str(entry.get("_target_", "?")).rpartition(".")[2]
                    return key, (
                        f"{target}({settings}) fails on the {split} split's first '{name}' "
                        f"image, of shape {shape}: {err}"
                    )
    return None


def refused_key(key: str, settings: DictConfig, err: BaseException) -> str:
    """The setting a component refused: the project's argument checks start their message
    with the argument's name ("max_samples must be ...", "data.occlusion: expected ...");
    else the component's key."""
    first = re.split(r"[ =:.[]", str(err).removeprefix(f"{key}."), maxsplit=1)[0]
    return f"{key}.{first}" if first in settings and not first.startswith("_") else key


def check_data_files(data: DictConfig) -> None:
    """A data setting named `path`, `root`, or ending in `_path`, `_root` or `_dir` names
    what the dataset reads: it must be there and readable before anything is built, and
    the error names the setting and the path as resolved from the launch folder."""
    for key in data:
        value = data[key]
        if not (key in ("path", "root") or key.endswith(("_path", "_root", "_dir"))):
            continue
        if value is None:
            continue
        folder = key == "root" or key.endswith(("_root", "_dir"))
        expected = f"a readable {'folder' if folder else 'file'}"
        path = Path(str(value)).absolute()
        if not str(value).strip():
            found = "an empty string"
        elif not path.exists():
            found = f"nothing at {path}"
        elif path.is_dir() != folder:
            found = f"a {'file' if folder else 'folder'} at {path}"
        elif not os.access(path, os.R_OK | (os.X_OK if folder else 0)):
            found = f"{path}, which this user may not read"
        else:
            continue
        raise ConfigError(f"config key 'data.{key}': expected {expected}, found {found}")


def build_datasets(data: DictConfig) -> dict[str, Any]:
    """Every split the dataset declares, train first."""
    train = build_split(data, "train")
    return {"train": train, **{s: build_split(data, s) for s in train.splits if s != "train"}}


def encoder_config(model: DictConfig, name: str, modality: Modality) -> DictConfig:
    """Modality `name`'s encoder config: `model.encoders[name]` when it has a `_target_`,
    else the kind's default (`model.auto_encoders`) with `model.encoders[name]`'s settings
    on top; then every `???` filled from the modality's `info`."""
    own = model.encoders.get(name)
    if own is not None and "_target_" in own:
        config = OmegaConf.create(OmegaConf.to_container(own))
    else:
        choice = model.auto_encoders.get(modality.kind)
        path = ENCODER_DIR / modality.kind / f"{choice}.yaml"
        if choice is None or not path.is_file():
            options = sorted(p.stem for p in (ENCODER_DIR / modality.kind).glob("*.yaml"))
            raise ConfigError(
                f"config key 'model.auto_encoders.{modality.kind}': modality '{name}' is of kind "
                f"'{modality.kind}' and needs an encoder; expected one of {options}, got {choice!r}"
            )
        config = OmegaConf.load(path)
        if own is not None:
            config = OmegaConf.merge(config, own)
    check_arguments(config._target_, config, f"model.encoders.{name}")
    for key in config:
        if OmegaConf.is_missing(config, key):
            if key not in modality.info:
                options = sorted(p.stem for p in (ENCODER_DIR / modality.kind).glob("*.yaml"))
                raise ConfigError(
                    f"config key 'model.encoders.{name}.{key}': the encoder needs it and the data "
                    f"does not describe it for '{name}', a modality of kind '{modality.kind}' "
                    f"(it gives {sorted(k for k in modality.info if k != 'shape')}). Is this an "
                    f"encoder for {modality.kind}? Those are {options} in "
                    f"configs/model/encoder/{modality.kind}/; else set "
                    f"+model.encoders.{name}.{key}=..."
                )
            config[key] = modality.info[key]
    return config


def encoder_configs(model: DictConfig, modalities: Mapping[str, Modality]) -> dict[str, DictConfig]:
    """One encoder config per modality of the data, in the data's order."""
    check_modality_names("model.encoders", model.encoders, modalities)
    return {name: encoder_config(model, name, m) for name, m in modalities.items()}


def check_modality_names(key: str, names: Any, modalities: Mapping[str, Modality]) -> None:
    """Settings keyed by modality name (`model.encoders`, `model.modality_dropout`) name only
    modalities the data has."""
    unknown = sorted(set(names or {}) - set(modalities))
    if unknown:
        raise ConfigError(
            f"config key '{key}.{unknown[0]}': the data has no modality "
            f"'{unknown[0]}'{close_matches(unknown[0], list(modalities))}; its modalities are "
            f"{list(modalities)}"
        )


def model_spec(model: DictConfig, encoders: Mapping[str, DictConfig]) -> ModelSpec:
    """Builders for the model's parts (called once per stage, so each stage gets fresh ones)."""

    def builder(name: str):
        def build() -> Any:
            try:
                return instantiate(encoders[name])
            except InstantiationException as err:  # a setting the encoder refused: name it
                cause = err.__cause__ or err
                key = refused_key(f"model.encoders.{name}", encoders[name], cause)
                raise ConfigError(f"config key '{key}': {cause}") from None

        return build

    dropout = model.modality_dropout
    return ModelSpec(
        encoders={name: builder(name) for name in encoders},
        encoder_configs={n: OmegaConf.to_container(c, resolve=True) for n, c in encoders.items()},
        fuser=instantiate(model.fusion),
        head=instantiate(model.head),
        modality_dropout=None if dropout is None else OmegaConf.to_container(dropout),
    )


def trainer_settings(cfg: DictConfig) -> TrainerConfig:
    """`cfg.trainer` (already merged onto the schema) as the library's dataclass."""
    return OmegaConf.to_object(cfg.trainer)


def task_settings(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """`cfg.tasks` as plain dicts: per task name, the `fusion.tasks.Objective` settings
    given (unset ones are left to the task kind's defaults)."""
    tasks = cfg.get("tasks")
    tasks = {} if tasks is None else OmegaConf.to_container(tasks, resolve=True)
    return {
        name: {k: v for k, v in (given or {}).items() if v is not None}
        for name, given in tasks.items()
    }


def check_task_settings(cfg: DictConfig, tasks: Mapping[str, Task]) -> None:
    """Every `tasks.<name>` setting fits a task of the data (`fusion.tasks.objectives_for`)."""
    try:
        objectives_for(tasks, task_settings(cfg))
    except ValueError as err:
        raise ConfigError.keyed(err) from None


def check_pairs_of(cfg: DictConfig, modalities: Mapping[str, Modality]) -> None:
    """`trainer.align.pairs` and `trainer.fuse.auxiliary.pairs` name pairs of the data's
    modalities."""
    for key, settings in (
        ("trainer.align", cfg.trainer.get("align")),
        ("trainer.fuse.auxiliary", cfg.trainer.fuse.get("auxiliary")),
    ):
        if settings is None or (key.endswith("auxiliary") and not settings.pairs):
            continue
        try:
            check_pairs(OmegaConf.to_container(settings.pairs), list(modalities))
        except ValueError as err:
            raise ConfigError.keyed(err, f"{key}.") from None


def check_modulation(cfg: DictConfig, tasks: Mapping[str, Task], modalities: Sequence[str]) -> None:
    """`trainer.fuse.ogm_ge` fits the data: one classification task, two or more modalities."""
    settings = cfg.trainer.fuse.get("ogm_ge")
    if settings is None:
        return
    try:
        OGMGE(list(modalities), objectives_for(tasks, task_settings(cfg)),
              **OmegaConf.to_container(settings))  # fmt: skip
    except ValueError as err:
        raise ConfigError(f"config key 'trainer.fuse.ogm_ge': {err}") from None


def check_before_training(cfg: DictConfig, datasets: Mapping[str, Any]) -> None:
    """What the config asks of the data and the file system, checked once the datasets are
    built and before the recipe runs: a setting that cannot work fails now, naming its key,
    not after stage 1 has trained or when a file is saved."""
    train = datasets["train"]
    check_task_settings(cfg, train.tasks)
    check_pairs_of(cfg, train.modalities)
    check_modulation(cfg, train.tasks, list(train.modalities))
    check_modality_names("model.modality_dropout", cfg.model.modality_dropout, train.modalities)
    check_conditions(cfg, train)
    check_head_serves_tasks(cfg, train.tasks)
    check_model_parts(cfg.model, train.modalities, train.tasks)
    check_audio_memory(cfg, train)
    check_writable(cfg.paths, cfg.trainer.feature_cache.enabled)


# A training step of the default audio encoder (log-mel ResNet-18) holds some 50 times its
# batch's clips in activations and gradients (measured); a padded batch whose clips alone
# take more than 1/ACTIVATION_FACTOR of the memory left cannot train.
ACTIVATION_FACTOR = 32
PADDING_RATIO = 4  # clips padded to more than this many times the longest train clip: said


def available_memory() -> int:
    """Bytes of memory this machine can still give (MemAvailable), else its physical size."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def longest_train_clip(train: Any, name: str) -> float | None:
    """The longest train clip of audio modality `name` in seconds, from the files' headers,
    for a dataset that lists its files (the manifest's `table.cells`); None otherwise."""
    cells = getattr(getattr(train, "table", None), "cells", {}).get(name)
    indices = getattr(train, "indices", None)
    if cells is None or indices is None:
        return None
    import soundfile

    durations = []
    for index in indices:
        if cells[index] is not None:
            try:
                durations.append(soundfile.info(cells[index]).duration)
            except (OSError, RuntimeError):  # the reader has named unreadable files already
                continue
    return max(durations, default=None)


def check_audio_memory(cfg: DictConfig, train: Any) -> None:
    """Every clip is padded to the clip length the data sets (`audio_seconds`); a length far
    beyond the clips makes batches no memory holds, which the kernel answers by killing
    the run without a word during stage 1. Refused now, naming the setting and the sizes;
    padding far beyond the longest train clip is said."""
    batch = cfg.trainer.batch_size
    setting = next(
        (f"data.{k}" for k in ("audio_seconds", "clip_seconds") if k in cfg.data), "data"
    )
    for name, modality in train.modalities.items():
        samples, rate = modality.info.get("clip_samples"), modality.info.get("sample_rate")
        if modality.kind != "audio" or not samples or not rate:
            continue
        seconds, batch_bytes, memory = samples / rate, samples * batch * 4, available_memory()
        longest = longest_train_clip(train, name)
        said = f"the longest train clip lasts {longest:.2f} s" if longest else ""
        if batch_bytes * ACTIVATION_FACTOR > memory:
            raise ConfigError(
                f"config key '{setting}': every '{name}' clip is padded to {seconds:g} s, "
                f"{samples:,} samples at {rate} Hz, so a batch of {batch} clips "
                f"(trainer.batch_size) takes {batch_bytes / 1e9:.2f} GB before the model's "
                f"activations (some {ACTIVATION_FACTOR}-50 times that while training), and "
                f"this machine has {memory / 1e9:.1f} GB available; "
                f"{said + ': ' if said else ''}set {setting} to the length the clips need, "
                "or lower trainer.batch_size"
            )
        if longest and seconds > PADDING_RATIO * longest:
            log.warning(
                "%s=%g pads every '%s' clip to %.0f times the longest train clip (%.2f s): the "
                "padding is only zeros, which cost memory and time; set it near %.1f",
                setting, seconds, name, seconds / longest, longest, longest,
            )  # fmt: skip


def describe_tasks(tasks: Mapping[str, Task]) -> str:
    """The data's tasks and their output sizes, for errors about what a head must serve."""
    return ", ".join(f"{name} ({t.kind}, {t.num_outputs} outputs)" for name, t in tasks.items())


def check_conditions(cfg: DictConfig, train: Any) -> None:
    """A dataset whose items carry a condition (AV-Digits' `which` task: read the written or
    the spoken digit) needs a head that reads it, with one branch per condition; any other
    head would learn a label it cannot see the reason for."""
    conditions = getattr(train, "num_conditions", None)
    head = cfg.model.head
    late = getattr(get_method(cfg.model.fusion._target_), "produces_logits", False)
    reads = "num_conditions" in inspect.signature(get_method(head._target_)).parameters
    task = f" (data.task={cfg.data.task})" if "task" in cfg.data else ""
    if conditions and not (reads and not late):
        fusion = cfg.model.fusion._target_
        reader = f"{fusion} (late fusion, which skips the head)" if late else head._target_
        raise ConfigError(
            f"config key 'model.head': the data{task} gives every sample one of {conditions} "
            f"conditions that decides its label, and {reader} ignores it; use "
            "model/head=conditional (one head per condition) and a fuser that feeds a head"
        )
    if reads and not conditions:
        raise ConfigError(
            f"config key 'model.head': {head._target_} routes each sample by its condition, "
            f"but the data{task} gives none; use another head "
            f"(model/head={'multitask' if len(train.tasks) > 1 else 'mlp'})"
        )
    given = head.get("num_conditions")
    if reads and not late and given != conditions:
        raise ConfigError(
            f"config key 'model.head.num_conditions': the data{task} gives {conditions} "
            f"conditions, got {given} ({given} head{'' if given == 1 else 's'}, one per condition)"
        )


def takes_several_tasks(target: str) -> bool:
    """Whether a head's `num_classes` takes one size per task (a mapping), by its annotation."""
    hint = type_hints(get_method(target)).get("num_classes")
    return hint is None or matches({"task": 1}, hint)


def head_options() -> dict[str, str]:
    """Each `model/head=` option with its head's `_target_`."""
    folder = CONFIG_DIR / "model" / "head"
    return {path.stem: OmegaConf.load(path)._target_ for path in sorted(folder.glob("*.yaml"))}


def check_head_serves_tasks(cfg: DictConfig, tasks: Mapping[str, Task]) -> None:
    """Data with several tasks needs a head with one output per task; a single-task head
    would otherwise be refused for a `num_classes` the user never set. (Late fusion skips
    the head; its own check names the fuser.)"""
    head = cfg.model.head
    late = getattr(get_method(cfg.model.fusion._target_), "produces_logits", False)
    if len(tasks) < 2 or late or takes_several_tasks(head._target_):
        return
    where = f"data.task={cfg.data.task}" if "task" in cfg.data else "the data"
    options = head_options()
    chosen = [f"the {o} head" for o, target in options.items() if target == head._target_]
    several = [f"model/head={o}" for o, target in options.items() if takes_several_tasks(target)]
    raise ConfigError(
        f"config key 'model.head': {where} has {len(tasks)} tasks ({', '.join(tasks)}); "
        f"{(chosen or ['the head'])[0]} ({head._target_}) predicts one; use "
        f"{' or '.join(several)} (one branch per task)"
    )


class StandIn(nn.Identity):
    """An encoder's place in a dry build of the fuser and head: only its size is read."""

    out_dim = 16


def check_model_parts(
    model: DictConfig, modalities: Mapping[str, Modality], tasks: Mapping[str, Task]
) -> None:
    """Build the fuser and head for the data's modalities and tasks, on stand-in encoders:
    a bad setting, or a head that cannot serve the tasks (one output for several tasks),
    fails now instead of when stage 2 builds the model. They are initialised from a forked
    random state, so the run draws the same numbers whichever fuser and head it has (stage 1
    trains the same encoders for every fuser)."""
    sizes = output_sizes(tasks)
    for part, own in (("fusion", "in_dims"), ("head", "in_dim")):
        check_arguments(model[part]._target_, model[part], f"model.{part}")
        sources = {own: "the sizes of the parts before it"}
        if model[part].get("num_classes", sizes) != sizes:
            sources["num_classes"] = f"the data's tasks: {describe_tasks(tasks)}"
        for name, source in sources.items():
            if name in model[part]:
                raise ConfigError(
                    f"config key 'model.{part}.{name}': the model sets it from {source}; "
                    f"remove it (got {model[part][name]!r})"
                )
    building = "model.fusion"

    def head(**kwargs: Any) -> nn.Module:
        nonlocal building
        building = "model.head"
        return instantiate(model.head)(**kwargs)

    try:
        with torch.random.fork_rng(devices=[]):
            MultimodalModel.build(
                {m: StandIn() for m in modalities}, instantiate(model.fusion), head, sizes
            )
    except (TypeError, ValueError) as err:
        part = model[building.removeprefix("model.")]
        raise ConfigError(
            f"config key '{refused_key(building, part, err)}' ({part._target_}): {err} "
            f"(the data's modalities: {list(modalities)}; its tasks: {describe_tasks(tasks)})"
        ) from None


def check_writable(paths: DictConfig, feature_cache: bool) -> None:
    """Probe every folder the run writes to (creating it, as the run would), so that a
    read-only or mistyped folder fails now, not when stage 1 saves its encoder."""
    keys = ["output_dir", "pretrained_dir"] + (["feature_cache_dir"] if feature_cache else [])
    for key in keys:
        problem = unwritable(Path(paths[key]))
        if problem:
            raise ConfigError(
                f"config key 'paths.{key}': expected a folder this user can write to, "
                f"found {problem}"
            )


def unwritable(folder: Path) -> str | None:
    """Why `folder` cannot be written to (after creating it, as a writer would), or None."""
    folder = folder.absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        return f"a file at {folder}" if folder.is_file() else f"{folder}: {err.strerror}"
    return None
