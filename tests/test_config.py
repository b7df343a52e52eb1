"""The real Hydra configs compose, validate, and reject bad keys by name."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from experiments.schema import ConfigError, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FUSIONS = sorted(p.stem for p in (CONFIGS / "model" / "fusion").glob("*.yaml"))
HEADS = sorted(p.stem for p in (CONFIGS / "model" / "head").glob("*.yaml"))


def load(*overrides):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_default_config_validates():
    cfg = validate(load())
    assert cfg.trainer.batch_size == 64 and set(cfg.model.encoders) == {"image", "audio"}


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
    assert override_tags(hydra_cfg) == ["model/fusion=lmf", "seed=1", ("+x=" + "y" * 80)[:64]]


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


class SplitOnly:
    """A dataset that knows splits but not fixed views."""

    def __init__(self, split):
        self.split = split


def test_views_need_a_dataset_that_draws_them():
    from omegaconf import OmegaConf

    from experiments.schema import ConfigError
    from experiments.train import fuse_datasets

    cfg = OmegaConf.create(
        {"data": {"_target_": f"{__name__}.SplitOnly"}, "trainer": {"fuse": {"views": 2}}}
    )
    with pytest.raises(ConfigError, match=r"'trainer.fuse.views': .*SplitOnly takes no"):
        fuse_datasets(cfg, {})
    cfg.trainer.fuse.views = None
    assert fuse_datasets(cfg, {}) == {}
