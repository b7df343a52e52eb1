"""experiments.evaluate --emap and --contributions on the shared tiny finished run."""

import contextlib
import functools
import io
import json
from pathlib import Path

import pytest

import experiments.evaluate
from experiments.evaluate import main, parse_args
from fusion.analysis.interaction import emap


@pytest.fixture(scope="session")
def diagnosed(run_dir, tmp_path_factory) -> tuple[Path, str]:
    """The output directory and stdout of one evaluation with both diagnostics and the
    robustness check (whose dropped scores the contributions must repeat)."""
    out = tmp_path_factory.mktemp("diagnostics")
    argv = [str(run_dir), "--emap", "--contributions", "--robustness", "--levels", "0"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*argv, "--out", str(out)]) == 0
    return out, stdout.getvalue()


def test_emap_scores_the_model_as_the_evaluation_does_next_to_its_projection(diagnosed):
    out, stdout = diagnosed
    evaluation = json.loads((out / "eval_test.json").read_text())
    report = json.loads((out / "emap_test.json").read_text())
    assert report["modalities"] == ["image", "audio"] and report["split"] == "test"
    assert report["left_out"] == 0 and not report["subsampled"]  # AV-Digits has every modality
    assert report["samples"] == report["split_samples"]
    assert report["evaluations"] == report["samples"] ** 2 and report["conditions"] is None
    assert report["model"]["accuracy"] == evaluation["test/fused/accuracy"]
    assert report["model"]["loss"] == pytest.approx(evaluation["test/fused/loss"], rel=1e-5)
    for name, model in report["model"].items():
        better = report["emap"][name] - model if name == "loss" else model - report["emap"][name]
        assert report["gap"][name] == pytest.approx(better, abs=1e-12), name
    assert report["metric"] == "accuracy" and report["lower_is_better"] is False
    assert "| model |" in stdout and "| EMAP |" in stdout and "| gap |" in stdout
    assert (out / "emap_test.png").read_bytes()[:4] == b"\x89PNG"


def test_contributions_add_up_and_repeat_the_evaluation_and_robustness_scores(diagnosed):
    out, stdout = diagnosed
    evaluation = json.loads((out / "eval_test.json").read_text())
    robustness = json.loads((out / "robustness_test.json").read_text())
    report = json.loads((out / "contributions_test.json").read_text())
    assert report["all"] == evaluation["test/fused/accuracy"] == robustness["clean"]
    assert report["dropped"] == {m: e["dropped"] for m, e in robustness["modalities"].items()}
    total = sum(report["shapley"].values())
    assert total == pytest.approx(report["all"] - report["empty"], abs=1e-9)
    loss = {tuple(c["present"]): c["loss"] for c in report["coalitions"]}
    assert sum(report["shapley_loss"].values()) == pytest.approx(
        loss[()] - loss[("image", "audio")], abs=1e-9
    )
    assert [c["present"] for c in report["coalitions"]] == [
        [], ["image"], ["audio"], ["image", "audio"]
    ]  # fmt: skip
    classes = report["classes"]["digit"]
    assert list(classes) == [str(d) for d in range(10)]
    assert sum(e["samples"] for e in classes.values()) == report["samples"]
    assert stdout.count("| image |") == 2  # in the robustness table and this one
    assert (out / "contributions_test.png").read_bytes()[:4] == b"\x89PNG"


def test_the_subsample_reaches_emap_and_its_refusal_is_named_with_the_flag(
    run_dir, tmp_path, monkeypatch, capsys
):
    """--emap-samples 3 projects 3 samples (3^2 evaluations; the subsample itself is tested
    in tests/fusion/test_interaction.py); a ValueError of the library is named after the flag
    and nothing is written for it."""
    limited = functools.partial(emap, max_evaluations=5)
    monkeypatch.setattr(experiments.evaluate, "emap", limited)
    out = tmp_path / "eval"
    argv = [str(run_dir), "--emap", "--emap-samples", "3", "--out", str(out)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "evaluate: --emap: EMAP of 3 samples and 2 modalities runs the fuser and head 9 "
        "times, over the limit of 5; project a random subset of at most 2 samples (samples=, "
        "--emap-samples)\n"
    )
    assert (out / "eval_test.json").is_file() and not (out / "emap_test.json").exists()


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--emap-samples", "5"], "argument --emap-samples: it sets the samples of --emap, which is not given"),
        (["--emap", "--emap-samples", "1"], "argument --emap-samples: expected an integer >= 2, got 1"),
        (["--emap", "--emap-samples", "x"], "argument --emap-samples: invalid int value: 'x'"),
    ],
)  # fmt: skip
def test_bad_diagnostic_arguments_are_named(run_dir, capsys, extra, named):
    with pytest.raises(SystemExit) as caught:
        main([str(run_dir), *extra])
    assert caught.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "held"), [("--emap", "emap_test.png"), ("--contributions", "contributions_test.json")]
)
def test_diagnostics_do_not_overwrite_an_out_folders_results(tmp_path, capsys, flag, held):
    run, out = tmp_path / "run", tmp_path / "mine"
    run.mkdir()
    out.mkdir()
    (out / held).write_text("mine")
    with pytest.raises(SystemExit) as caught:
        main([str(run), flag, "--out", str(out)])
    assert caught.value.code == 2
    assert f"argument --out: {out} already holds {held}, which this evaluation would" in (
        capsys.readouterr().err
    )
    assert (out / held).read_text() == "mine"
    assert parse_args([str(run), flag, "--out", str(out), "--overwrite"]).overwrite
    assert parse_args([str(run), "--out", str(out)]).out == out  # not asked: not in the way
    assert parse_args([str(run), flag, "--split", "val", "--out", str(out)]).out == out
