"""Configs into objects: the datasets, each modality's encoder, the fuser and head.

This is the one place where Hydra configs meet the library. A dataset config is checked
against its target's signature before it is built; the encoders come from the data's
modalities: one per modality, chosen by kind unless `model.encoders.<name>` says
otherwise, with every `???` setting filled from the data's description of the modality.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from fusion.data import Modality, check_dataset
from fusion.training.recipe import ModelSpec
from fusion.training.settings import ConfigError, TrainerConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ENCODER_DIR = CONFIG_DIR / "model" / "encoder"


def compose_config(*overrides: str) -> DictConfig:
    """The main job's config with `overrides`, composed and validated as the entry point
    would, for benchmarks and notebooks that need the configured data or model."""
    from hydra import compose, initialize_config_dir

    from experiments.schema import validate

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return validate(compose("train", overrides=list(overrides)))


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
    for name in settings:
        if name.startswith("_") or name in parameters:
            continue
        close = difflib.get_close_matches(name, list(parameters), n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ConfigError(
            f"config key '{key}.{name}': {target} takes no argument '{name}'{hint} "
            f"(it takes {[p for p in parameters if p not in ('self', 'split')]})"
        )


def build_split(data: DictConfig, split: str) -> Any:
    """One split of the configured dataset, checked against the dataset contract."""
    check_arguments(data._target_, data, "data")
    missing = [k for k in data if OmegaConf.is_missing(data, k)]
    if missing:
        raise ConfigError(
            f"config key 'data.{missing[0]}': {data._target_} needs it; set it on the command "
            f"line, e.g. data.{missing[0]}=..."
        )
    try:
        dataset = instantiate(data, split=split)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(
            f"config key 'data' ({data._target_}, split '{split}'): {cause}"
        ) from None
    check_dataset(dataset, f"data._target_ {data._target_}")
    return dataset


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
    unknown = sorted(set(model.encoders) - set(modalities))
    if unknown:
        raise ConfigError(
            f"config key 'model.encoders.{unknown[0]}': the data has no modality '{unknown[0]}'; "
            f"its modalities are {list(modalities)}"
        )
    return {name: encoder_config(model, name, m) for name, m in modalities.items()}


def model_spec(model: DictConfig, encoders: Mapping[str, DictConfig]) -> ModelSpec:
    """Builders for the model's parts (called once per stage, so each stage gets fresh ones)."""

    def builder(name: str):
        return lambda: instantiate(encoders[name])

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
