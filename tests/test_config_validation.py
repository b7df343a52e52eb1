"""The whole config is checked before anything trains: what the checks accept, how they
read a component's signature, and that the entry point runs them before the recipe."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import pytest
import torch
from omegaconf import OmegaConf

from experiments.builders import (
    build_datasets,
    check_before_training,
    check_data_files,
    check_writable,
    compose_config,
    describe,
    matches,
    refused_key,
)
from experiments.schema import ConfigError


@pytest.mark.parametrize(
    "overrides",
    [
        ("seed=4294967295", "data.seed=0"),
        ("trainer.device=cuda:1",),
        ("trainer.device=mps",),
        ("trainer.stop_after_epochs=1", "trainer.fuse.layer_decay=1.0"),
        ("trainer.fuse.lr_mult={backbone:0.0}", "trainer.fuse.weight_decay=0"),
        ("model.modality_dropout={image:0.0,audio:0.99}",),
        ("+model.head.num_classes=10",),
        ("data.task=which", "model/head=conditional"),
        ("data.task=multitask", "model/head=multitask", "model/fusion=tfn"),
        ("data.task=same", "model/fusion=late"),
    ],
)
def test_settings_at_the_edges_pass(overrides, tmp_path):
    """Every check has a boundary; the values on the accepted side of it still run."""
    cfg = compose_config(f"paths.output_dir={tmp_path}", "data.max_samples=20", *overrides)
    check_before_training(cfg, build_datasets(cfg.data))


@pytest.mark.parametrize("fusion", ["concat", "gated", "transformer"])
def test_checks_draw_nothing_from_the_runs_random_state(fusion, tmp_path):
    """The checks build the fuser and head (initialising their weights) before stage 1
    trains; from the run's own random state, stage 1 would draw other training samples for
    every fuser, and a sweep's cached encoders would depend on which job trained them."""
    cfg = compose_config(
        f"paths.output_dir={tmp_path}", "data.max_samples=20", f"model/fusion={fusion}"
    )
    datasets = build_datasets(cfg.data)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    check_before_training(cfg, datasets)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    ("value", "hint", "fits"),
    [
        (3, int, True),
        (True, int, False),
        (3, float, True),
        (False, float, False),
        ("3", float, False),
        (None, int | None, True),
        ("abc", int | None, False),
        ([1, 2], Sequence[int], True),
        ([1, "x"], Sequence[int], False),
        ("ab", Sequence[str], False),
        ("ab", bool | str | Sequence[str] | None, True),
        ({"a": 1.0}, Mapping[str, float], True),
        ({"a": "x"}, Mapping[str, float], False),
        ("/x", str | os.PathLike, True),
        ("cls", Literal["mean", "cls"], True),
        ("max", Literal["mean", "cls"], False),
        ({"_target_": "torch.nn.ReLU"}, int, True),
        ([8, 8], tuple[int, int] | list[int], True),
        (OmegaConf.create([0.1, 0.5]), Sequence[float], True),
    ],
)
def test_a_setting_is_checked_against_its_arguments_annotation(value, hint, fits):
    assert matches(value, hint) is fits


def test_annotations_are_said_in_a_configs_words():
    assert describe(int | None) == "int or null"
    assert describe(Sequence[float]) == "a list of float"
    assert describe(Literal["mean", "cls"]) == "one of ['mean', 'cls']"


@pytest.mark.parametrize(
    ("message", "key"),
    [
        ("max_samples must be a positive integer, got 0", "data.max_samples"),
        ("data.occlusion: expected [min, max], found [0.5, 0.1]", "data.occlusion"),
        ("clip_seconds=0.1 is shorter than the longest clip", "data.clip_seconds"),
        ("columns.x: unknown column kind 'imag'", "data.columns"),
        ("no 'val' speaker says digit 3", "data"),
        ("_target_ broke", "data"),
    ],
)
def test_a_readers_error_is_pinned_to_the_setting_it_names(message, key):
    settings = OmegaConf.create(
        {"_target_": "x", "max_samples": 0, "occlusion": [0.5, 0.1], "clip_seconds": 0.1,
         "columns": {"x": "imag"}}
    )  # fmt: skip
    assert refused_key("data", settings, ValueError(message)) == key


def test_input_files_are_named_by_their_key(tmp_path):
    (tmp_path / "a.csv").write_text("x\n")
    check_data_files(OmegaConf.create({"path": str(tmp_path / "a.csv"), "root": str(tmp_path)}))
    with pytest.raises(ConfigError) as caught:
        check_data_files(OmegaConf.create({"root": str(tmp_path / "a.csv")}))
    assert str(caught.value) == (
        f"config key 'data.root': expected a readable folder, found a file at {tmp_path / 'a.csv'}"
    )
    with pytest.raises(ConfigError, match=r"^config key 'data.cache_dir': expected a readable "):
        check_data_files(OmegaConf.create({"cache_dir": str(tmp_path / "gone")}))


def test_only_the_folders_a_run_writes_are_probed(tmp_path):
    (tmp_path / "file").write_text("")
    paths = OmegaConf.create(
        {"output_dir": str(tmp_path / "out"), "pretrained_dir": str(tmp_path / "pre"),
         "feature_cache_dir": str(tmp_path / "file")}
    )  # fmt: skip
    check_writable(paths, feature_cache=False)
    assert (tmp_path / "pre").is_dir() and not any((tmp_path / "pre").iterdir())
    with pytest.raises(ConfigError) as caught:
        check_writable(paths, feature_cache=True)
    assert str(caught.value) == (
        "config key 'paths.feature_cache_dir': expected a folder this user can write to, "
        f"found a file at {tmp_path / 'file'}"
    )


def test_a_mistyped_override_without_plus_gets_close_matches():
    with pytest.raises(ConfigError) as caught:
        compose_config("data.augmnt=true")
    assert str(caught.value) == (
        "config key 'data.augmnt': the config has no such setting; did you mean ['augment']?; "
        "to add a new one, write +data.augmnt=..."
    )


def test_a_mistyped_group_option_gets_close_matches():
    with pytest.raises(
        ConfigError,
        match=r"config group 'model/fusion': no option 'gatd'; did you mean \['gated'\]\?; "
        r"the options are \['attention', ",
    ):
        compose_config("model/fusion=gatd")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.epochz=3", "config key 'trainer.epochz': the config has no such setting; did you mean ['trainer.pretrain.epochs', 'trainer.fuse.epochs']?"),
        ("+trainer.fuse.lrr=3", "config key 'trainer.fuse.lrr': Key 'lrr' not in 'FuseConfig'; did you mean ['lr']?"),
        ("data.path=x.csv", "config key 'data.path': the chosen data config has no such setting; it is a setting of data=affect and data=manifest: choose one with its override before the key's"),
    ],
)  # fmt: skip
def test_a_mistyped_nested_key_gets_close_matches_anywhere_in_the_config(override, message):
    with pytest.raises(ConfigError) as caught:
        compose_config(override)
    assert str(caught.value).startswith(message)


def test_the_entry_point_checks_before_the_recipe_runs(monkeypatch, tmp_path):
    """The pre-training check sits between building the datasets and the recipe."""
    import experiments.train as train

    def recipe(*args, **kwargs):
        raise AssertionError("the recipe was built before the config was checked")

    monkeypatch.setattr(train, "Recipe", recipe)
    cfg = compose_config(
        f"paths.output_dir={tmp_path}", "data.max_samples=20", "model.modality_dropout={imgae:0.3}"
    )
    with pytest.raises(ConfigError, match=r"^config key 'model.modality_dropout.imgae': .*'image'"):
        train.run(cfg, Path(tmp_path))
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["trainer.epochz=3"], "config key 'trainer.epochz': the config has no such setting; did you mean"),
        (["model/fusion=gatd"], "config group 'model/fusion': no option 'gatd'; did you mean ['gated']?"),
        (["-m", "trainer.fuse.lr=0.1,-1", "seed=1,2"], "config key 'trainer.fuse.lr': expected a finite number > 0, got -1.0 (multirun job trainer.fuse.lr=-1 seed=1)"),
        (["--multirun", "seed=0,-5"], "config key 'seed': expected an integer in [0, 4294967295], got -5 (multirun job seed=-5)"),
        (["-m", "data.task=digit,whch"], "config key 'data.task' (data.avdigits.AVDigits, split 'train'): data.task: expected one of ['digit', 'same', 'which', 'multitask', 'sum', 'digits', 'mixed'], found 'whch' (multirun job data.task=whch)"),
        (["-m", "debug=default", "model.modality_dropout={image: 0.3},{imag: 0.3}"], "config key 'model.modality_dropout.imag': the data has no modality 'imag'; did you mean ['image']?; its modalities are ['image', 'audio'] (multirun job model.modality_dropout={imag:0.3})"),
        (["-m", "debug=default", "model/head=moe", "model.head.num_experts=2,0"], "config key 'model.head.num_experts' (fusion.heads.MixtureOfExpertsHead): num_experts must be a positive integer, got 0"),
        (["-m", "debug=default", "model/fusion=film", "model.fusion.conditioner=audio,video"], "config key 'model.fusion.conditioner' (fusion.fusers.FiLMFuser): conditioner must be one of the modalities ['image', 'audio'], got 'video'"),
        (["-m", "debug=default", "+model.encoders.image.freeze=backbone,[backbone.conv9.*]"], "config key 'model.encoders.image.freeze': freeze: pattern 'backbone.conv9.*' matches no parameter of Encoder"),
        (["~trainer.fuse.lr"], "override '~trainer.fuse.lr': trainer.fuse.lr has a default in the schema (0.001) that would be used without a word"),
        (['trainer.fuse.lr_mult={"head.*": 0.1}'], "override 'trainer.fuse.lr_mult={\"head.*\": 0.1}': Hydra cannot parse it (no viable alternative"),
        (["trainer.fuse.lr"], "override 'trainer.fuse.lr': Hydra cannot parse it (Error parsing override 'trainer.fuse.lr'); give it a value: key=value"),
        (["data.label_separator=;"], "override 'data.label_separator=;': Hydra cannot parse it (LexerNoViableAltException: data.label_separator=;); quote a value that holds characters of Hydra's syntax (; , = : $ quotes, spaces): data.label_separator=';', in a shell around the whole override: \"data.label_separator=';'\""),
        (["seed=1", "-m", "trainer.fuse.lr=0.1,0.2"], "command line: cannot read ['trainer.fuse.lr=0.1,0.2']; flags (-m, --multirun, --cfg) go before the overrides"),
    ],
)  # fmt: skip
def test_the_command_line_is_checked_before_hydra_starts_every_multirun_value_included(
    argv, message
):
    from experiments.train import check_command_line

    with pytest.raises(ConfigError) as caught:
        check_command_line(argv)
    assert str(caught.value).startswith(message)


def test_a_multirun_checks_every_job_with_its_data_and_model_before_the_first_starts(
    monkeypatch, tmp_path
):
    """Checks that need the data or the built model (modality names, head and fuser
    settings, encoder builders) run for every job before Hydra launches any, naming the
    job's overrides; each distinct data config's datasets are built once."""
    import experiments.train as train

    built, checked = [], []
    build, check = train.build_datasets, train.check_job
    monkeypatch.setattr(train, "build_datasets", lambda d: built.append(d.task) or build(d))
    monkeypatch.setattr(train, "check_job", lambda c, d: checked.append(c.seed) or check(c, d))
    out = f"paths.output_dir={tmp_path}"
    train.check_command_line(["-m", "debug=default", "data.task=digit,same", "seed=0,1", out])
    assert built == ["digit", "same"]
    assert sorted(checked) == [0, 0, 1]  # every value of every swept key
    with pytest.raises(ConfigError) as caught:
        train.check_command_line(
            ["-m", "debug=default", "model/fusion=film", "model.fusion.conditioner=audio,video",
             "seed=0,1", out]
        )  # fmt: skip
    assert str(caught.value).endswith("(multirun job model.fusion.conditioner=video seed=0)")


def test_an_output_folder_that_is_a_file_is_named_before_hydra_makes_the_run_directory(
    tmp_path,
):
    from experiments.train import check_command_line

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError) as caught:
        check_command_line([f"paths.output_dir={tmp_path / 'a_file'}"])
    assert str(caught.value) == (
        "config key 'paths.output_dir': expected a folder this user can write to, found a file "
        f"at {tmp_path / 'a_file'}"
    )


@pytest.mark.parametrize(
    ("multirun", "written", "key"),
    [(False, "config.yaml", "hydra.run.dir"), (False, ".hydra/overrides.yaml", "hydra.run.dir"),
     (False, "manifest.csv", "hydra.run.dir"), (True, "0/summary.json", "hydra.sweep.dir")],
)  # fmt: skip
def test_a_run_directory_that_is_not_empty_is_refused_before_hydra_writes_over_it(
    tmp_path, multirun, written, key
):
    from experiments.train import check_command_line

    (tmp_path / "old" / written).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "old" / written).write_text("{}")
    argv = ["-m"] * multirun + [f"{key}={tmp_path / 'old'}", f"paths.output_dir={tmp_path}"]
    with pytest.raises(ConfigError) as caught:
        check_command_line(argv)
    assert str(caught.value).startswith(
        f"config key '{key}': {tmp_path / 'old'} is not empty (it holds "
        f"{tmp_path / 'old' / written.split('/')[0]}); a {'sweep' if multirun else 'run'} there "
        "would write over what it holds"
    )
    check_command_line(
        [f"{key.replace('sweep', 'run')}={tmp_path / 'new'}", f"paths.output_dir={tmp_path}"]
    )
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(
        ConfigError,
        match=f"config key '{key}': expected a folder this user can write to, found a file at",
    ):
        check_command_line(["-m"] * multirun + [f"{key}={tmp_path / 'a_file'}"])


def test_a_key_given_twice_is_said_and_the_last_is_used(tmp_path, capsys):
    from experiments.train import check_command_line

    check_command_line(
        [f"paths.output_dir={tmp_path}", "trainer.fuse.epochs=1", "trainer.fuse.epochs=3"]
    )
    assert capsys.readouterr().err == (
        "warning: trainer.fuse.epochs is given twice ('trainer.fuse.epochs=1', then "
        "'trainer.fuse.epochs=3'); the last is used\n"
    )


def test_a_valid_multirun_and_what_hydra_reports_itself_pass_the_command_line_check(tmp_path):
    from experiments.train import check_command_line

    out = f"paths.output_dir={tmp_path}"
    check_command_line(
        ["-m", "model/fusion=concat,gated", "seed=0,1", "hydra.job.chdir=false", out]
    )
    check_command_line(["seed=0,1"])  # a sweep without -m: Hydra says it in its own words
    check_command_line(["--help"])


def test_a_readers_error_from_a_dataloader_worker_is_said_without_the_traceback():
    from fusion.data import DataFileError, reader_message

    own = "pets.csv, data row 7, column 'photo': cannot decode img/b.png: corrupt"
    wrapped = DataFileError(
        "Caught DataFileError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        f'call last):\n  File "x.py", line 1, in f\nfusion.data.DataFileError: {own}\n'
    )
    assert reader_message(wrapped) == own
    assert reader_message(DataFileError(own)) == own
