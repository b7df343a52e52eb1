"""Resuming a run under another config is refused naming every changed key, except the
keys that may change on resume; stage-2 epochs may grow, with the schedule stretched."""

import logging
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.schema import ConfigError, validate
from experiments.train import check_resume
from fusion.training import fit, load_checkpoint, save_checkpoint
from fusion.training.feature_cache import data_key
from tests.fusion.test_training import model_with_bn, separable_batches

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config(*overrides):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return validate(compose("train", overrides=list(overrides)))


def stopped_run(tmp_path, *overrides, stored=True):
    """A run directory as a stopped run leaves it (epoch 1 of 10), its config stored."""
    run_dir = tmp_path / "stopped"
    cfg = OmegaConf.to_container(config(*overrides), resolve=True)
    state = {"epoch": 1, "epochs": 10, "model": {}, "optimizer": {}, "rng": {}}
    save_checkpoint(
        run_dir / "checkpoints" / "fuse_state.pt", state | ({"config": cfg} if stored else {})
    )
    return run_dir


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["trainer.fuse.lr=0.5"], ["trainer.fuse.lr: 0.001 -> 0.5"]),
        (["seed=3"], ["seed: 0 -> 3"]),
        (["trainer.batch_size=32"], ["trainer.batch_size: 64 -> 32"]),
        (["trainer.precision=bf16"], ["trainer.precision: '32' -> 'bf16'"]),
        (["trainer.fuse.weight_decay=0.1"], ["trainer.fuse.weight_decay: 0.0001 -> 0.1"]),
        (["data.max_samples=10"], ["data.max_samples: None -> 10"]),
        (
            ["model/fusion=concat"],
            [
                "model.fusion._target_: 'fusion.fusers.GatedFuser' -> 'fusion.fusers.ConcatFuser'",
                "model.fusion.dim: 256 -> '<absent>'",
                "model.fusion.proj_dim: '<absent>' -> None",
            ],
        ),
        (
            ["trainer.fuse.lr=0.5", "seed=3", "logger.mode=disabled"],
            ["seed: 0 -> 3", "trainer.fuse.lr: 0.001 -> 0.5"],
        ),
    ],
)
def test_a_changed_config_is_refused_naming_every_key_with_both_values(tmp_path, overrides, named):
    run_dir = stopped_run(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_resume(config(f"trainer.resume={run_dir}", *overrides))
    message = str(err.value)
    state = run_dir / "checkpoints" / "fuse_state.pt"
    head, rest = message.split(" (stored -> this run): ")
    assert (
        head
        == f"config key 'trainer.resume': {state} was trained with another config; the keys that differ"
    )
    assert rest.split(". Resume with")[0] == "; ".join(named)  # each key once, nothing safe
    assert "a resumed run may change only logger, paths, tags, trainer.resume, " in rest


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["logger.mode=disabled", "logger.log_every_n_steps=1"],
        ["tags=[again]"],
        ["trainer.stop_after_epochs=1"],
        ["trainer.num_workers=2", "trainer.persistent_workers=true"],
        ["trainer.nonfinite=skip"],
        ["trainer.fuse.epochs=15"],  # epochs to add
        ["paths.output_dir=elsewhere"],
    ],
)
def test_keys_safe_to_change_are_accepted(tmp_path, overrides):
    run_dir = stopped_run(tmp_path)
    assert check_resume(config(f"trainer.resume={run_dir}", *overrides)) == run_dir


def test_fewer_epochs_are_refused_naming_both_counts(tmp_path):
    run_dir = stopped_run(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_resume(config(f"trainer.resume={run_dir}", "trainer.fuse.epochs=5"))
    assert str(err.value) == (
        f"config key 'trainer.fuse.epochs': {run_dir / 'checkpoints' / 'fuse_state.pt'} was "
        "written for trainer.fuse.epochs=10, this run asks for 5; on resume it can only be "
        "raised (epochs to add)"
    )


def test_a_state_without_a_config_is_checked_against_the_runs_config_yaml(tmp_path):
    run_dir = stopped_run(tmp_path, stored=False)
    state = run_dir / "checkpoints" / "fuse_state.pt"
    with pytest.raises(ConfigError) as err:
        check_resume(config(f"trainer.resume={run_dir}"))
    assert str(err.value) == (
        f"config key 'trainer.resume': {state} holds no config and {run_dir / 'config.yaml'} "
        "does not exist; nothing to check this run against"
    )
    OmegaConf.save(config(), run_dir / "config.yaml", resolve=True)
    with pytest.raises(ConfigError, match=r"trainer\.fuse\.lr: 0\.001 -> 0\.5"):
        check_resume(config(f"trainer.resume={state}", "trainer.fuse.lr=0.5"))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04 truncated"])
def test_an_unreadable_state_is_named_as_the_resume_setting(tmp_path, content):
    state = tmp_path / "stopped" / "checkpoints" / "fuse_state.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        check_resume(config(f"trainer.resume={tmp_path / 'stopped'}"))
    assert str(err.value).startswith("config key 'trainer.resume': ") and str(state) in str(
        err.value
    )


def test_raised_epochs_follow_the_longer_cosine_from_the_resume_point(tmp_path, caplog):
    """Stopped after 2 of 3 epochs, resumed for 5: epochs 3-5 use the 5-epoch curve."""

    def run(epochs, **kwargs):
        torch.manual_seed(0)
        fit(
            model_with_bn(), separable_batches(2), separable_batches(1), epochs=epochs,
            lr=1e-2, weight_decay=0.0, device=torch.device("cpu"), desc="fuse", **kwargs,
        )  # fmt: skip

    run(3, state_path=tmp_path / "short.pt", stop_after=2, state_extra={"config": {"a": 1}})
    short = load_checkpoint(tmp_path / "short.pt")
    assert short["config"] == {"a": 1}  # what a resumed run is checked against
    with caplog.at_level(logging.WARNING, logger="fusion"):
        run(5, state_path=tmp_path / "resumed.pt", resume=short)
    run(5, state_path=tmp_path / "straight.pt")
    expected = 1e-2 * (1 + math.cos(math.pi * 2 / 5)) / 2
    assert (
        "stage 'fuse': epochs raised from 3 to 5 on resume after epoch 2; the cosine "
        "learning-rate schedule is stretched to 5 epochs: the rate jumps from 0.0025 to "
        f"{expected:g}" in caplog.text
    )
    resumed, straight = (load_checkpoint(tmp_path / f"{n}.pt") for n in ("resumed", "straight"))
    assert resumed["epoch"] == straight["epoch"] == 5 and resumed["epochs"] == 5
    for got, want in zip(
        resumed["optimizer"]["param_groups"], straight["optimizer"]["param_groups"], strict=True
    ):
        assert got["lr"] == pytest.approx(want["lr"], abs=1e-12)
    with pytest.raises(ValueError, match=r"planned for 5 epochs; epochs can only be raised"):
        run(4, resume=resumed)


def test_a_split_whose_content_changed_is_refused(tmp_path, avdigits_val):
    run_dir = stopped_run(tmp_path)
    state_path = run_dir / "checkpoints" / "fuse_state.pt"
    state = load_checkpoint(state_path)
    state["data_keys"] = {"train": "the files trained on", "val": data_key(avdigits_val)}
    save_checkpoint(state_path, state)
    resumed = config(f"trainer.resume={run_dir}")
    with pytest.raises(ConfigError) as err:
        check_resume(resumed, {"train": avdigits_val, "val": avdigits_val})
    assert str(err.value) == (
        f"config key 'trainer.resume': the data changed since {state_path} was written (split "
        "'train' changed; the val split is unchanged; the config may be the same): a resumed "
        "run must train and select on the data it started with. Restore that data, or start "
        "a new run"
    )
    state["data_keys"]["train"] = data_key(avdigits_val)
    save_checkpoint(state_path, state)
    assert check_resume(resumed, {"train": avdigits_val, "val": avdigits_val}) == run_dir


def test_a_finished_run_is_not_resumed_again(tmp_path):
    run_dir = stopped_run(tmp_path)
    path = run_dir / "checkpoints" / "fuse_state.pt"
    save_checkpoint(path, load_checkpoint(path) | {"epoch": 10})
    with pytest.raises(ConfigError) as err:
        check_resume(config(f"trainer.resume={run_dir}", "trainer.fuse.epochs=10"))
    assert str(err.value) == (
        f"config key 'trainer.resume': {path} finished all 10 epochs of stage 2 already; "
        "nothing to resume. To train it further, raise trainer.fuse.epochs above 10"
    )
