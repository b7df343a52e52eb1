"""The recipe's pieces: stage-1 targets, content-keyed caches, summaries and tables."""

import shutil

import numpy as np
import pytest
import torch

from data.avdigits import SPEECH_ASSET, AVDigits
from fusion.data import Task
from fusion.tasks import Objective
from fusion.training.loop import EpochMetrics
from fusion.training.recipe import (
    Row,
    Stage1,
    build_model,
    fused_state,
    optimizer_groups,
    pretrain_key,
    results_table,
    run_summary,
    stage1_target,
    unimodal_model,
    with_file_contents,
)
from fusion.training.settings import ConfigError, TrainerConfig

ENCODER = {"_target_": "fusion.encoders.build_vision_encoder", "name": "resnet18"}


def splits(**settings):
    return {s: AVDigits(s, max_samples=8, **settings) for s in ("train", "val")}


def key(datasets, modality="image", config=ENCODER, trainer=None, seed=0):
    target = stage1_target(datasets["train"], modality)
    return pretrain_key(config, datasets, target, trainer or TrainerConfig(), seed)


def test_stage1_target_is_what_each_modality_shows():
    digit, same, multi = (
        AVDigits("val", max_samples=4, task=t) for t in ("digit", "same", "multitask")
    )
    assert stage1_target(digit, "image") == ("digit", {"digit": digit.tasks["digit"]})
    assert stage1_target(same, "image")[0] == "written"
    assert stage1_target(same, "audio")[0] == "spoken"
    assert list(stage1_target(multi, "audio")[1]) == ["spoken"]


def test_stage1_key_follows_content_target_recipe_and_precision(tmp_path):
    base = key(splits())
    assert key(splits()) == base  # nothing changed
    copy = tmp_path / "speech.npz"
    shutil.copy(SPEECH_ASSET, copy)
    assert key(splits(speech_path=copy)) == base  # same bytes under another name
    with np.load(SPEECH_ASSET) as npz:
        arrays = dict(npz)
    arrays["waveforms"][1000] += 1  # one sample of one clip
    edited = tmp_path / "edited.npz"
    np.savez(edited, **arrays)
    assert key(splits(speech_path=edited)) != base
    assert key(splits(task="same")) != base  # relabelled data
    assert key(splits(), trainer=TrainerConfig(precision="bf16")) != base
    assert key(splits(), seed=1) != base
    reuse_off = TrainerConfig()
    reuse_off.pretrain.reuse = False
    assert key(splits(), trainer=reuse_off) == base  # reusing or not shapes nothing


def test_stage1_key_follows_the_content_of_a_weights_file(tmp_path):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"first")
    config = {**ENCODER, "weights_file": str(weights)}
    first = key(splits(), config=config)
    weights.write_bytes(b"other")
    assert key(splits(), config=config) != first
    assert with_file_contents({"a": [str(weights), "x"]})["a"][0]["file"] == str(weights)


def metrics(val, test, main="accuracy", **tasks):
    scores = {f"{task}/accuracy": value for task, value in tasks.items()}
    return {
        split: EpochMetrics(loss=1.0, scores={main: value, **scores}, main=main)
        for split, value in (("val", val), ("test", test))
    }


def objectives(*names, kind="multiclass"):
    task = Task("regression") if kind == "regression" else Task(kind, ("a", "b"))
    return {name: Objective(task) for name in names}


def test_fusion_gain_is_reported_for_each_task_a_unimodal_model_shares():
    image = Row("image only", "digit", metrics(0.6, 0.7), objectives("digit"))
    audio = Row("audio only", "digit", metrics(0.8, 0.75), objectives("digit"))
    fused = Row("fused (GatedFuser)", "digit", metrics(0.9, 0.9), objectives("digit"))
    summary = run_summary([image, audio, fused], fused)
    assert summary["test/fusion_gain"] == pytest.approx(0.15)
    assert summary["val/fusion_gain"] == pytest.approx(0.1)
    assert summary["test/image_only/accuracy"] == 0.7 and summary["test/fused/accuracy"] == 0.9

    written = Row("image only", "written", metrics(0.6, 0.7), objectives("written"))
    spoken = Row("audio only", "spoken", metrics(0.8, 0.75), objectives("spoken"))
    multi = Row(
        "fused (X)", "written, spoken, same", metrics(0.9, 0.8, written=0.85, spoken=0.7,
        same=0.8), objectives("written", "spoken", "same"),
    )  # fmt: skip
    summary = run_summary([written, spoken, multi], multi)
    assert summary["test/written/fusion_gain"] == pytest.approx(0.15)
    assert summary["test/spoken/fusion_gain"] == pytest.approx(-0.05)
    assert "test/same/fusion_gain" not in summary and "test/fusion_gain" not in summary

    same = Row("fused (X)", "same", metrics(0.9, 0.8), objectives("same"))
    assert not [k for k in run_summary([written, spoken, same], same) if "gain" in k]


def test_fusion_gain_of_an_error_metric_is_positive_when_the_fused_error_is_lower():
    def row(name, mae):
        return Row(
            name, "score", metrics(mae, mae, main="mae"), objectives("score", kind="regression")
        )

    rows = [row("image only", 0.5), row("audio only", 0.4), row("fused (X)", 0.3)]
    assert run_summary(rows, rows[-1])["test/fusion_gain"] == pytest.approx(0.1)
    worse = row("fused (X)", 0.45)
    assert run_summary([*rows[:2], worse], worse)["test/fusion_gain"] == pytest.approx(-0.05)
    assert results_table(rows).splitlines()[2] == "| image only | score | 0.5000 | 0.5000 |"


def test_results_table_names_each_rows_metric_when_they_differ():
    rows = [
        Row("image only", "digit", metrics(0.5, 0.25), objectives("digit")),
        Row(
            "fused (X)",
            "score",
            metrics(0.3, 0.2, main="mae"),
            objectives("score", kind="regression"),
        ),
    ]
    assert results_table(rows).splitlines() == [
        "| model | target | metric | val | test |",
        "|---|---|---|---:|---:|",
        "| image only | digit | accuracy | 50.00% | 25.00% |",
        "| fused (X) | score | mae | 0.3000 | 0.2000 |",
    ]


def test_results_table_labels_rows_with_the_datas_tasks():
    rows = [
        Row("photo only", "species", metrics(0.5, 0.25), objectives("species")),
        Row("fused (ConcatFuser)", "species", metrics(0.75, 1.0), objectives("species")),
    ]
    assert results_table(rows).splitlines() == [
        "| model | target | val accuracy | test accuracy |",
        "|---|---|---:|---:|",
        "| photo only | species | 50.00% | 25.00% |",
        "| fused (ConcatFuser) | species | 75.00% | 100.00% |",
    ]


def recipe_for(tmp_path, *overrides):
    """The recipe the entry point would run for `overrides` on 8 items per split."""
    from experiments.builders import compose_config, encoder_configs, model_spec, trainer_settings
    from fusion.tracking import NullTracker
    from fusion.training.recipe import Outputs, Recipe

    cfg = compose_config("logger.mode=disabled", "data.max_samples=8", *overrides)
    datasets = {s: AVDigits(s, max_samples=8) for s in ("train", "val")}
    cfg.model.encoders = encoder_configs(cfg.model, datasets["train"].modalities)
    outputs = Outputs(tmp_path, tmp_path / "pretrained", tmp_path / "features")
    spec = model_spec(cfg.model, cfg.model.encoders)
    return Recipe(
        datasets, spec, trainer_settings(cfg), 0, outputs, NullTracker(), torch.device("cpu")
    )


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.fuse.lr_mult={fuser.nope.*: 0.1}", "trainer.fuse.lr_mult"),
        ("trainer.fuse.weight_decay_for={head.*.bias.x: 0.1}", "trainer.fuse.weight_decay_for"),
        ("trainer.pretrain.lr_mult={encoders.text.*: 0.5}", "trainer.pretrain.lr_mult"),
        ("trainer.pretrain.weight_decay_for={fuser.*: 0.1}", "trainer.pretrain.weight_decay_for"),
    ],
)
def test_a_glob_matching_no_parameter_of_its_stage_is_named_before_training(
    tmp_path, override, key
):
    pattern = override.split("{")[1].split(":")[0]
    with pytest.raises(ConfigError, match=rf"config key '{key}': pattern '{pattern}' matches no"):
        recipe_for(tmp_path, override).check_encoders()
    assert not (tmp_path / "pretrained").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.fuse.monitor=val/acc", "config key 'trainer.fuse.monitor': expected one of ['val/loss', 'val/accuracy', 'val/f1_macro'], got 'val/acc'"),
        ("trainer.pretrain.monitor=val/digit/accuracy", "config key 'trainer.pretrain.monitor': expected one of ['val/loss', 'val/accuracy', 'val/f1_macro'], got 'val/digit/accuracy'"),
    ],
)  # fmt: skip
def test_a_monitored_metric_no_epoch_computes_is_named_before_training(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        recipe_for(tmp_path, override).check_encoders()
    assert str(err.value).startswith(message)
    assert not (tmp_path / "pretrained").exists()
    recipe_for(tmp_path, "trainer.fuse.monitor=val/loss").check_encoders()


def test_a_stage1_glob_for_one_modality_applies_to_that_modalitys_model_only(tmp_path):
    recipe = recipe_for(tmp_path, "trainer.pretrain.lr_mult={encoders.image.*: 0.5}")
    recipe.check_encoders()  # matches the image model: accepted for the stage
    tasks = recipe.tasks
    image = unimodal_model(recipe.spec.encoders["image"](), "image", tasks)
    audio = unimodal_model(recipe.spec.encoders["audio"](), "audio", tasks)
    image_lrs = {g["lr"] for g in optimizer_groups(image, recipe.trainer.pretrain)}
    audio_lrs = {g["lr"] for g in optimizer_groups(audio, recipe.trainer.pretrain)}
    lr = recipe.trainer.pretrain.lr
    assert image_lrs == {lr * 0.5, lr} and audio_lrs == {lr}


@pytest.mark.parametrize(
    ("overrides", "extra"),
    [
        (["trainer.fuse.ogm_ge={alpha: 0.5}"], 0),  # a modulation alone adds no parameters
        (["trainer.fuse.auxiliary={unimodal: 0.5}", "trainer.fuse.ogm_ge={}"], 4),
        (["trainer.fuse.gradient_blending={}"], 4),
    ],
)
def test_stage2_trains_the_model_and_whatever_auxiliary_heads_it_has(tmp_path, overrides, extra):
    """The stage-2 wrapper's optimizer groups: the model's, then the auxiliary heads' (a
    weight and a bias per modality)."""
    recipe = recipe_for(tmp_path, "trainer.fuse.unfreeze={start_epoch: 1}", *overrides)
    recipe.check_encoders()
    encoders = {m: build() for m, build in recipe.spec.encoders.items()}
    model = build_model(recipe.spec, encoders, recipe.tasks)
    trained = recipe.with_auxiliary(model)
    groups = optimizer_groups(trained, recipe.trainer.fuse)
    counted = sum(len(g["params"]) for g in groups)
    assert counted == len(list(model.parameters())) + extra
    assert (trained.modulation is not None) == any("ogm_ge" in o for o in overrides)


def test_best_pt_state_names_frozen_encoders_and_keeps_everything_else(tmp_path):
    recipe = recipe_for(tmp_path)
    encoders = {m: build() for m, build in recipe.spec.encoders.items()}
    model = build_model(recipe.spec, encoders, recipe.tasks)
    image = Stage1(tmp_path / "pretrained" / "image-0123.pt", "0123", "f" * 20, model)
    state = fused_state(model, {"image": image})
    full = model.state_dict()
    assert sorted(state["model"]) == sorted(k for k in full if not k.startswith("encoders.image."))
    assert [k for k in state["model"] if k.startswith("encoders.audio.")]  # not referenced: kept
    assert state["encoders"] == {
        "image": {"path": str(image.path.resolve()), "key": "0123", "weights": "f" * 20}
    }
    everything = fused_state(model, {})
    assert list(everything["model"]) == list(full) and everything["encoders"] == {}
