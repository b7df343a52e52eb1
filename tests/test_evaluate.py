"""experiments.evaluate on a real (tiny) training run: reproduction, robustness, errors."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiments.evaluate import EvaluateError, check_targets, load_run, main, project_targets
from fusion.analysis.robustness import (
    add_noise,
    drop,
    input_std,
    plot_robustness,
    robustness_table,
)
from fusion.batch import Batch


@pytest.fixture(scope="session")
def evaluated(run_dir, tmp_path_factory) -> tuple[Path, str]:
    """The output directory and stdout of one evaluation with the robustness check (in this
    process: the module's imports are most of a subprocess's cost)."""
    out = tmp_path_factory.mktemp("eval")
    argv = [str(run_dir), "--robustness", "--levels", "1", "0", "--out", str(out)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return out, stdout.getvalue()


def test_reproduces_the_runs_test_accuracy(run_dir, evaluated):
    out, stdout = evaluated
    summary = json.loads((run_dir / "summary.json").read_text())
    result = json.loads((out / "eval_test.json").read_text())
    assert result["test/fused/accuracy"] == summary["test/fused/accuracy"]
    assert result["test/fused/loss"] == pytest.approx(summary["test/fused/loss"], rel=1e-6)
    assert result["fuser"] == summary["fuser"]
    assert f"{summary['test/fused/accuracy']:.2%}" in stdout
    assert "data_changed" not in result  # the same test split the run evaluated


def test_a_split_whose_content_changed_since_training_is_said_and_marked(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    best = run / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)
    assert sorted(state["data_keys"]) == ["test", "train", "val"]
    state["data_keys"]["test"] = "another"  # as if the test files had been edited
    torch.save(state, best)
    assert main([str(run), "--out", str(tmp_path / "eval")]) == 0
    message = (
        "the test split's content differs from the one the run evaluated (its files or items "
        "changed since training); these metrics are for the data as it is now"
    )
    assert f"evaluate: warning: {message}" in capsys.readouterr().err
    assert json.loads((tmp_path / "eval" / "eval_test.json").read_text())["data_changed"] == message


def test_robustness_drops_and_noises_every_modality(evaluated):
    out, stdout = evaluated
    report = json.loads((out / "robustness_test.json").read_text())
    assert report["levels"] == [0.0, 1.0]  # sorted
    assert list(report["modalities"]) == ["image", "audio"]
    for m, entry in report["modalities"].items():
        assert entry["input_std"] > 0
        assert entry["noise"][0] == report["clean"], m  # level 0 is the clean input
        assert 0.0 <= entry["noise"][1] <= 1.0
        assert 0.0 <= entry["dropped"] <= 1.0
        assert stdout.count(f"| {m} |") == 1
    assert (out / "robustness_test.png").read_bytes()[:4] == b"\x89PNG"


def test_robustness_runs_every_perturbation_of_each_kind(evaluated):
    """AV-Digits: images get noise, occlusion, blur, contrast and salt and pepper, audio
    noise, noise at an SNR, time shift and clipping, each at the levels 0 and 1, each with
    its relative robustness (here the mean of its two scores), in the JSON and the table."""
    out, stdout = evaluated
    report = json.loads((out / "robustness_test.json").read_text())
    assert report["relative_robustness_span"] == [0.0, 1.0]
    expected = {
        "image": ["noise", "occlusion", "blur", "contrast", "salt_pepper"],
        "audio": ["noise", "noise_snr", "time_shift", "clipping"],
    }
    for m, names in expected.items():
        entry = report["modalities"][m]
        assert entry["kind"] == m and list(entry["perturbations"]) == names
        assert entry["perturbations"]["noise"]["scores"] == entry["noise"]
        for name, curve in entry["perturbations"].items():
            assert curve["levels"] == [0.0, 1.0] and curve["scores"][0] == report["clean"]
            assert curve["relative_robustness"] == pytest.approx(sum(curve["scores"]) / 2)
            assert curve["level"] and f"| {m}/{name} | " in stdout
    assert "relative robustness: the mean accuracy over the levels in [0, 1]" in stdout


def test_perturbations_are_chosen_by_name_and_checked_against_the_runs_modalities(
    run_dir, tmp_path, capsys
):
    out = tmp_path / "eval"
    argv = [str(run_dir), "--robustness", "--levels", "0", "0.5", "2", "--out", str(out)]
    assert main([*argv, "--perturbations", "blur", "clipping"]) == 0
    report = json.loads((out / "robustness_test.json").read_text())
    image, audio = report["modalities"]["image"], report["modalities"]["audio"]
    assert list(image["perturbations"]) == ["blur"] and list(audio["perturbations"]) == ["clipping"]
    assert image["perturbations"]["blur"]["levels"] == [0.0, 0.5]  # 2 is for noise only
    assert image["noise"] is None and audio["input_std"] is None  # noise not asked
    capsys.readouterr()
    for extra, named in [
        (["--perturbations", "typos"], "evaluate: --perturbations: typos (text) fit(s) none of "
         "the model's modalities: image (image), audio (audio)\n"),
        (["--perturbations", "blur", "--levels", "2"], "evaluate: --perturbations: ['blur'] "
         "take levels in [0, 1] and the levels [2.0] hold none (only noise takes levels above 1)\n"),
    ]:  # fmt: skip
        assert main([str(run_dir), "--robustness", *extra, "--out", str(tmp_path / "x")]) == 2
        assert capsys.readouterr().err == named
        assert not list((tmp_path / "x").iterdir())  # refused before anything is evaluated
    for argv, named in [
        ([str(run_dir), "--robustness", "--perturbations", "blurr"],
         "argument --perturbations: invalid choice: 'blurr'"),
        ([str(run_dir), "--perturbations", "blur"],
         "argument --perturbations: it chooses those of --robustness, which is not given"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit):
            main(argv)
        assert named in capsys.readouterr().err


def test_noise_is_seeded_and_skips_text():
    batch = Batch(
        inputs={"image": torch.ones(4, 2), "text": ["a", "b", "c", ""]},
        present={"image": torch.tensor([1, 1, 1, 0], dtype=torch.bool), "text": torch.ones(4, dtype=torch.bool)},
        targets=torch.zeros(4, dtype=torch.long),
    )  # fmt: skip
    assert input_std([batch], "image") == 0.0 and input_std([batch], "text") is None
    first, again = (add_noise("image", 0.5, seed=3)(batch) for _ in range(2))
    assert torch.equal(first.inputs["image"], again.inputs["image"])
    assert not torch.equal(first.inputs["image"], batch.inputs["image"])
    assert first.inputs["text"] is batch.inputs["text"]
    assert not drop("text")(batch).present["text"].any()
    assert batch.present["text"].all()  # the original batch is left alone


def test_text_modality_is_reported_without_noise(tmp_path):
    report = {
        "split": "val", "seed": 0, "levels": [0.0, 1.0], "metric": "accuracy",
        "lower_is_better": False, "clean": 0.5,
        "modalities": {
            "image": {"input_std": 0.4, "dropped": 0.3, "noise": [0.5, 0.4]},
            "text": {"input_std": None, "dropped": 0.2, "noise": None, "note": "no noise"},
        },
    }  # fmt: skip
    table = robustness_table(report)
    assert "| image | 0.4 | 50.00% | 40.00% | 30.00% |" in table
    assert "| text | - | - | - | 20.00% |" in table and "text: no noise" in table
    assert "clean accuracy on val: 50.00% (higher is better)" in table
    plot_robustness(report, tmp_path / "robustness.png")
    assert (tmp_path / "robustness.png").stat().st_size > 0


def test_run_without_best_checkpoint_or_config_is_named(run_dir, tmp_path, capsys):
    stopped = tmp_path / "stopped"
    shutil.copytree(
        run_dir, stopped, ignore=shutil.ignore_patterns("best.pt", "eval", "summary.json")
    )
    assert main([str(stopped)]) == 2
    err = capsys.readouterr().err
    assert str(stopped / "checkpoints" / "best.pt") in err and "experiments.train" in err
    (stopped / "checkpoints" / "fuse_state.pt").touch()
    assert main([str(stopped)]) == 2
    assert f"trainer.resume={stopped}" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert str(tmp_path / "config.yaml") in capsys.readouterr().err


def test_a_tables_categorical_codes_are_never_noised():
    from fusion.analysis.robustness import noised_columns
    from fusion.data import Modality

    table = Modality("tabular", {"num_numeric": 2, "categorical_cardinalities": [4]})
    columns = noised_columns(table)
    batch = Batch(
        inputs={"tabular": torch.tensor([[0.5, -1.0, 3.0], [1.5, 1.0, 2.0]])},
        present={"tabular": torch.ones(2, dtype=torch.bool)},
        targets=torch.zeros(2, dtype=torch.long),
    )
    noised = add_noise("tabular", 1.0, seed=0, columns=columns)(batch).inputs["tabular"]
    assert noised[:, 2].tolist() == [3.0, 2.0]  # the codes
    assert (noised[:, :2] != batch.inputs["tabular"][:, :2]).all()
    assert input_std([batch], "tabular", columns) == pytest.approx(
        0.9354143, rel=1e-6
    )  # of 0.5, -1, 1.5, 1
    only_codes = Modality("tabular", {"num_numeric": 0, "categorical_cardinalities": [4]})
    assert input_std([batch], "tabular", noised_columns(only_codes)) is None


def edited_run(run_dir: Path, dest: Path, **settings) -> Path:
    """A copy of the run whose config.yaml has `settings` (dotted keys) set; the checkpoints
    are the run's own (linked, not copied)."""
    dest.mkdir()
    config = OmegaConf.load(run_dir / "config.yaml")
    for key, value in settings.items():
        OmegaConf.update(config, key, value, merge=False)
    OmegaConf.save(config, dest / "config.yaml")
    (dest / "checkpoints").symlink_to(run_dir / "checkpoints")
    return dest


def foreign_targets(marker: Path) -> list:
    """Configs that would write `marker` if anything in them were built."""
    save = {"_target_": "fusion.training.checkpoint.save_checkpoint", "path": str(marker)}
    torch_save = {"_target_": "torch.save", "obj": {}, "f": str(marker)}
    head = "fusion.heads.ClassificationHead"
    return [
        ("data.augment", [{**save, "state": {}}], "'data.augment[0]._target_' names "
         "'fusion.training.checkpoint.save_checkpoint'"),
        ("model.fusion", torch_save, "'model.fusion._target_' names 'torch.save'"),
        ("model.head", {"_target_": head, "_args_": [torch_save]}, "'model.head._args_'"),
        ("model.head", {"_target_": head, "_recursive_": False, "x": torch_save},
         "'model.head._recursive_'"),
        ("model.fusion", f'${{oc.decode:"{{_target_: torch.save, obj: 1, f: {marker}}}"}}',
         "'model.fusion._target_' names 'torch.save'"),
        ("model.encoders.image._target_", "builtins.exec",
         "'model.encoders.image._target_' names 'builtins.exec'"),
        ("model.fusion._partial_", "yes", "'model.fusion._partial_': expected true or false, "
         "found 'yes'"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(foreign_targets(Path("m")))))
def test_a_foreign_target_is_refused_before_anything_is_built(run_dir, tmp_path, capsys, case):
    marker = tmp_path / "marker"
    key, value, named = foreign_targets(marker)[case]
    run = edited_run(run_dir, tmp_path / "run", **{key: value})
    assert main([str(run), "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'config.yaml'}: config key {named}" in err
    assert "--trust-target" in err or "_args_" in err or "_partial_" in err
    assert not marker.exists() and not (tmp_path / "eval").exists()


def test_a_trusted_target_must_still_match_the_stored_config(run_dir, tmp_path, capsys):
    marker = tmp_path / "marker"
    target = "fusion.training.checkpoint.save_checkpoint"
    augment = [{"_target_": target, "path": str(marker), "state": {}}]
    run = edited_run(run_dir, tmp_path / "run", **{"data.augment": augment})
    assert main([str(run), "--trust-target", target]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'config.yaml'} differs from the config stored in " in err
    assert (
        f"at 1 key(s) (stored -> config.yaml):\n  data.augment: None -> [{{'_target_': '{target}'"
        in err
    )
    assert not marker.exists()


def test_an_edited_config_is_refused_naming_every_differing_key(run_dir, tmp_path, capsys):
    run = edited_run(run_dir, tmp_path / "run", **{"data.seed": 5, "data.task": "same"})
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert str(run_dir / "checkpoints" / "best.pt") in err or "checkpoints/best.pt" in err
    assert "at 2 key(s)" in err
    assert "data.seed: 0 -> 5" in err and "data.task: 'digit' -> 'same'" in err


def test_settings_that_do_not_change_the_score_may_differ(run_dir, tmp_path):
    settings = {"logger.mode": "offline", "paths.output_dir": "/elsewhere", "tags": ["x"]}
    run = edited_run(run_dir, tmp_path / "run", **settings)
    cfg, state = load_run(run)
    assert cfg.logger.mode == "offline" and list(cfg.tags) == ["x"]
    assert "model" in state


def test_the_allow_list_is_the_configs_builders_transforms_and_what_is_trusted():
    targets = project_targets()
    assert {"data.avdigits.AVDigits", "fusion.fusers.GatedFuser"} <= targets
    assert "fusion.encoders.text.minilm_path" in targets  # nested in an encoder's config
    assert "torch.load" not in targets
    flip = {"_target_": "torchvision.transforms.v2.RandomHorizontalFlip"}
    check_targets({"data": {"augment": [flip]}}, (), Path("c.yaml"))
    check_targets({"model": {"fusion": {"_target_": "mypkg.Mine"}}}, ["mypkg.Mine"], Path("c"))
    for target in ("torchvision.transforms.v2.functional.hflip", "torchvision.transforms.v2.x"):
        with pytest.raises(
            EvaluateError, match=rf"c\.yaml: config key 'a\._target_' names '{target}'"
        ):
            check_targets({"a": {"_target_": target}}, (), Path("c.yaml"))
    with pytest.raises(EvaluateError, match=r"'a\._target_': expected a dotted name, found a dict"):
        check_targets({"a": {"_target_": {"x": 1}}}, (), Path("c.yaml"))


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--device", "gpu"], "argument --device: expected auto, cpu, cuda, cuda:N (N a GPU index) or mps, got 'gpu'"),
        (["--device", "tpu"], "argument --device: expected auto, cpu, cuda, cuda:N (N a GPU index) or mps, got 'tpu'"),
        (["--device", "cuda:x"], "argument --device: expected auto, cpu, cuda, cuda:N (N a GPU index) or mps, got 'cuda:x'"),
        (["--robustness", "--levels", "-1"], "argument --levels: expected finite values >= 0, got [-1.0]"),
        (["--robustness", "--levels", "nan"], "argument --levels: expected finite values >= 0, got [nan]"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named_as_the_user_typed_them(run_dir, capsys, extra, named):
    with pytest.raises(SystemExit) as exit_info:
        main([str(run_dir), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "trainer." not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_names_the_device_argument(run_dir, capsys):
    with pytest.raises(SystemExit):
        main([str(run_dir), "--device", "cuda"])
    err = capsys.readouterr().err
    assert "argument --device: 'cuda' requested but CUDA is unavailable" in err
    assert "trainer.device" not in err


def test_a_run_dir_or_out_that_is_a_file_is_named(tmp_path, run_dir, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv, named in [
        ([str(a_file)], f"argument run_dir: expected a training run's directory, {a_file} is a file"),
        ([str(tmp_path / "no")], f"argument run_dir: expected a training run's directory, {tmp_path / 'no'} does not exist"),
        ([str(run_dir), "--out", str(a_file)], f"argument --out: expected a directory, {a_file} is a file"),
        ([str(run_dir), "--levels", "0.5"], "argument --levels: it sets the noise of --robustness, which is not given"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit):
            main(argv)
        assert named in capsys.readouterr().err


def test_a_best_checkpoint_that_is_a_folder_is_named(tmp_path, run_dir, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "best.pt").mkdir(parents=True)
    (run / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert main([str(run)]) == 2
    assert capsys.readouterr().err == (
        f"evaluate: {run / 'checkpoints' / 'best.pt'}: expected the run's best checkpoint, a "
        "file; found a folder\n"
    )


def test_a_finished_run_without_its_best_checkpoint_is_named_without_resume_advice(
    tmp_path, run_dir, capsys
):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "summary.json"):
        (run / name).write_text((run_dir / name).read_text())
    assert main([str(run)]) == 2
    assert capsys.readouterr().err == (
        f"evaluate: {run / 'checkpoints' / 'best.pt'} not found: the run finished (its "
        "summary.json is there), but its best checkpoint is gone: it cannot be evaluated "
        "again; train it again to get one\n"
    )


def test_an_out_folder_holding_results_it_would_overwrite_is_refused(tmp_path, capsys):
    """--out is a folder of the user's: an earlier robustness_test.json there is named before
    anything runs; --overwrite replaces it. The run's own eval/ folder is rewritten."""
    from experiments.evaluate import parse_args

    run, out = tmp_path / "run", tmp_path / "mine"
    run.mkdir()
    out.mkdir()
    (out / "robustness_test.json").write_text('{"mine": 1}')
    with pytest.raises(SystemExit) as caught:
        main([str(run), "--robustness", "--out", str(out)])
    assert caught.value.code == 2
    assert (
        f"argument --out: {out} already holds robustness_test.json, which this evaluation would "
        "overwrite; nothing was written. Choose another folder, or pass --overwrite to replace "
        "them"
    ) in capsys.readouterr().err
    assert (out / "robustness_test.json").read_text() == '{"mine": 1}'
    assert parse_args([str(run), "--robustness", "--out", str(out), "--overwrite"]).overwrite
    assert parse_args([str(run), "--out", str(out)]).out == out  # eval_test.json only
    (run / "eval").mkdir()
    (run / "eval" / "robustness_test.json").write_text("{}")
    assert parse_args([str(run), "--robustness"]).out is None


def test_best_pt_holds_the_fuser_and_head_and_names_the_stage1_encoders(run_dir):
    best = run_dir / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert not [k for k in state["model"] if k.startswith("encoders.")]
    assert {m: Path(r["path"]) for m, r in state["encoders"].items()} == {
        m: Path(p).resolve() for m, p in summary["checkpoints"].items()
    }
    stage1 = 0
    for reference in state["encoders"].values():
        stored = torch.load(reference["path"], weights_only=True)
        assert reference["weights"] == stored["weights"]
        stage1 += Path(reference["path"]).stat().st_size
    assert best.stat().st_size < stage1 / 5  # the frozen encoders are not copied


def moved_run(run_dir: Path, tmp_path: Path, **change: str) -> tuple[Path, dict]:
    """A copy of the run whose best.pt names its stage-1 checkpoints under new names in a
    folder of their own (`tmp_path/moved`), which the run's config does not name."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    best = run / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)
    (tmp_path / "moved").mkdir()
    for modality, reference in state["encoders"].items():
        renamed = f"moved-{modality}.pt"
        shutil.copy(reference["path"], tmp_path / "moved" / renamed)
        reference["path"] = str(tmp_path / "gone" / renamed)
        reference.update(change)
    torch.save(state, best)
    return run, state


def test_stage1_checkpoints_no_longer_where_the_run_wrote_them_are_named(run_dir, tmp_path, capsys):
    run, state = moved_run(run_dir, tmp_path)
    assert main([str(run), "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate: the run's stage-1 encoders were not found")
    for modality in state["encoders"]:  # every one missing is named, with where it was looked
        name = f"moved-{modality}.pt"
        assert (
            f"modality '{modality}' ({name}): {tmp_path / 'gone' / name}: not there; "
            f"{(run_dir.parent / 'pretrained').resolve() / name}: not there"
        ) in err
    assert "pass --pretrained-dir DIR (a folder holding them under these names)" in err
    assert main([str(run), "--out", str(tmp_path / "eval"), "--pretrained-dir",
                 str(tmp_path / "moved")]) == 0  # fmt: skip
    result = json.loads((tmp_path / "eval" / "eval_test.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["test/fused/accuracy"] == summary["test/fused/accuracy"]


def test_pretrained_dir_is_looked_in_before_a_wrong_file_at_the_recorded_path(run_dir, tmp_path):
    run, state = moved_run(run_dir, tmp_path)
    first, second = state["encoders"]
    (tmp_path / "gone").mkdir()
    for modality in (first, second):  # each recorded path holds the other modality's encoder
        other = second if modality == first else first
        shutil.copy(
            tmp_path / "moved" / f"moved-{other}.pt", tmp_path / "gone" / f"moved-{modality}.pt"
        )
    argv = [str(run), "--out", str(tmp_path / "eval"), "--pretrained-dir", str(tmp_path / "moved")]
    assert main(argv) == 0


def test_a_stage1_checkpoint_that_is_not_the_runs_is_named_for_what_it_is(
    run_dir, tmp_path, capsys
):
    run, state = moved_run(run_dir, tmp_path)
    first, second = state["encoders"]
    shutil.copy(tmp_path / "moved" / f"moved-{second}.pt", tmp_path / "moved" / f"moved-{first}.pt")
    torch.save({"model": {}}, tmp_path / "moved" / f"moved-{second}.pt")
    argv = [str(run), "--out", str(tmp_path / "eval"), "--pretrained-dir", str(tmp_path / "moved")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"moved-{first}.pt: a stage-1 checkpoint of ['{second}'], not of '{first}'" in err
    assert f"moved-{second}.pt: a stage-1 checkpoint of no encoder, not of '{second}'" in err
    assert not list((tmp_path / "eval").rglob("*.*"))  # nothing evaluated, nothing written


@pytest.mark.parametrize(
    "change, found",
    [
        ({"key": "0" * 20}, "another stage-1 encoder of '{m}' (key {key}, the run's {zeros}"),
        ({"weights": "0" * 20}, "the run's encoder trained again, to other weights"),
    ],
)
def test_another_encoder_of_the_modality_is_refused(run_dir, tmp_path, capsys, change, found):
    run, state = moved_run(run_dir, tmp_path, **change)
    argv = [str(run), "--out", str(tmp_path / "eval"), "--pretrained-dir", str(tmp_path / "moved")]
    assert main(argv) == 2
    first = next(iter(state["encoders"]))
    key = torch.load(tmp_path / "moved" / f"moved-{first}.pt", weights_only=True)["fingerprint"]
    expected = found.format(m=first, key=key, zeros="0" * 20)
    assert f"{tmp_path / 'moved' / f'moved-{first}.pt'}: {expected}" in capsys.readouterr().err


def test_a_pretrained_dir_that_is_no_folder_is_refused_at_once(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(run_dir), "--pretrained-dir", str(tmp_path / "nowhere")])
    assert (
        f"argument --pretrained-dir: expected a folder of stage-1 checkpoints, "
        f"{tmp_path / 'nowhere'} does not exist"
    ) in capsys.readouterr().err


def test_the_folder_above_runs_lists_the_runs_inside(run_dir, tmp_path, capsys):
    assert main([str(run_dir.parent), "--out", str(tmp_path / "eval")]) == 2
    assert (
        f"{run_dir.parent / 'config.yaml'} not found: `python -m experiments.train` writes it "
        f"when a run starts; pass the directory of a training run; the runs inside it: "
        f"['{run_dir.name}']"
    ) in capsys.readouterr().err
