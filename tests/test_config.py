"""The real Hydra configs compose, validate, and reject bad keys by name."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from experiments.builders import build_split, encoder_configs
from experiments.schema import ConfigError, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FUSIONS = sorted(p.stem for p in (CONFIGS / "model" / "fusion").glob("*.yaml"))
HEADS = sorted(p.stem for p in (CONFIGS / "model" / "head").glob("*.yaml"))


def load(*overrides):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_default_config_validates():
    cfg = validate(load())
    assert cfg.trainer.batch_size == 64 and dict(cfg.model.encoders) == {}
    assert cfg.data._target_ == "data.avdigits.AVDigits"


def test_encoders_come_from_the_data_and_are_sized_by_it(avdigits_val):
    cfg = validate(load())
    configs = encoder_configs(cfg.model, avdigits_val.modalities)
    assert list(configs) == ["image", "audio"]  # the data's order
    image, audio = configs["image"], configs["audio"]
    assert image.name == "resnet18" and image.in_channels == 1 and list(image.image_size) == [8, 8]
    assert list(image.mean) == [0.3] and list(image.std) == [0.4]
    assert audio.sample_rate == 8000 and audio.clip_samples == 8000
    encoder = instantiate(image)
    assert encoder.input_shape == (1, 8, 8) and encoder.out_dim == 512


def test_an_encoder_is_chosen_per_modality_name(avdigits_val):
    cfg = validate(
        load("+model/encoder/audio@model.encoders.audio=mfcc_cnn", "+model.encoders.image.post=[]")
    )
    configs = encoder_configs(cfg.model, avdigits_val.modalities)
    assert configs["audio"].front_end == "mfcc" and configs["audio"].sample_rate == 8000
    assert configs["image"].name == "resnet18" and list(configs["image"].post) == []


def test_an_encoder_for_a_modality_the_data_lacks_is_named(avdigits_val):
    cfg = validate(load("+model/encoder/image@model.encoders.photo=resnet50"))
    with pytest.raises(ConfigError, match=r"'model.encoders.photo': the data has no modality"):
        encoder_configs(cfg.model, avdigits_val.modalities)


def test_a_size_the_data_does_not_give_is_named():
    from fusion.data import Modality

    cfg = validate(load())
    with pytest.raises(ConfigError, match=r"'model.encoders.scan.in_channels': the encoder needs"):
        encoder_configs(cfg.model, {"scan": Modality("image", {"image_size": [8, 8]})})


def test_unknown_data_setting_is_named_with_close_matches():
    cfg = validate(load("+data.max_sample=3"))
    with pytest.raises(ConfigError, match=r"'data.max_sample'.*did you mean \['max_samples'\]"):
        build_split(cfg.data, "val")


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_config_builds_a_fuser(fusion):
    cfg = validate(load(f"model/fusion={fusion}"))
    factory = instantiate(cfg.model.fusion)
    extra = {"num_classes": 10} if getattr(factory.func, "produces_logits", False) else {}
    fuser = factory(in_dims={"image": 8, "audio": 4}, **extra)
    assert fuser.out_dim > 0


@pytest.mark.parametrize("head", HEADS)
def test_every_head_config_builds_a_head(head):
    cfg = validate(load(f"model/head={head}"))
    num_classes = {"written": 10, "same": 2} if head == "multitask" else 10
    assert instantiate(cfg.model.head)(in_dim=8, num_classes=num_classes) is not None


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"'trainer.batch_size'.*'abc'"):
        validate(load("trainer.batch_size=abc"))


def test_unknown_added_key_is_named():
    with pytest.raises(ConfigError, match=r"'trainer.epochz'"):
        validate(load("+trainer.epochz=3"))


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"'logger.mode'"):
        validate(load("logger.mode=cloud"))
    with pytest.raises(ConfigError, match=r"'trainer.fuse.epochs': expected >= 1"):
        validate(load("trainer.fuse.epochs=0"))


def test_overrides_become_wandb_tags():
    from omegaconf import OmegaConf

    from experiments.train import override_tags

    hydra_cfg = OmegaConf.create(
        {
            "overrides": {
                "task": ["model/fusion=lmf", "seed=1", "logger.mode=offline", "+x=" + "y" * 80]
            }
        }
    )
    # kept whole: the tracker cuts every tag to W&B's 64 characters (tests/test_tracking.py)
    assert override_tags(hydra_cfg) == ["model/fusion=lmf", "seed=1", "+x=" + "y" * 80]


@pytest.mark.parametrize(
    ("preset", "runs"),
    [("ablation_fusion", 36), ("ablation_freezing", 6), ("ablation_modality_dropout", 12)],
)
def test_ablation_presets_expand_to_valid_runs(preset, runs):
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    choices = [[f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    combos = list(itertools.product(*choices))
    assert len(combos) == runs
    for combo in combos[:: max(1, runs // 6)]:
        validate(load(f"experiment={preset}", *combo))


def test_debug_makes_a_run_tiny():
    cfg = validate(load("debug=default"))
    assert cfg.data.max_samples == 32 and cfg.trainer.fuse.epochs == 1
    assert cfg.logger.mode == "disabled"


class Augmented:
    """A split that is redrawn at every access and cannot draw fixed views."""

    deterministic = False


def test_views_need_a_dataset_that_draws_them():
    from fusion.training.loaders import fuse_datasets

    datasets = {"train": Augmented()}
    with pytest.raises(ConfigError, match=r"'trainer.fuse.views': .*Augmented is augmented"):
        fuse_datasets(datasets, views=2)
    assert fuse_datasets(datasets, views=None) == datasets


def test_a_fixed_train_split_is_not_drawn_as_views(avdigits_val):
    from fusion.training.loaders import fuse_datasets

    assert fuse_datasets({"train": avdigits_val}, views=10)["train"] is avdigits_val
