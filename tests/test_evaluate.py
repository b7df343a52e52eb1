"""experiments.evaluate on a real (tiny) training run: reproduction, robustness, errors."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.evaluate import main
from fusion.analysis.robustness import (
    add_noise,
    drop,
    input_std,
    plot_robustness,
    robustness_table,
)
from fusion.batch import Batch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "logger.mode=disabled",
    "data.max_samples=16",
    "trainer.batch_size=16",
    "trainer.pretrain.epochs=1",
    "trainer.fuse.epochs=1",
]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """One finished run of the real entry point, shared by every test here."""
    root = tmp_path_factory.mktemp("evaluate")
    run = root / "run"
    cmd = [
        sys.executable, "-m", "experiments.train",
        f"paths.output_dir={root}", f"hydra.run.dir={run}", *TINY,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


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


def test_robustness_drops_and_noises_every_modality(evaluated):
    out, stdout = evaluated
    report = json.loads((out / "robustness.json").read_text())
    assert report["levels"] == [0.0, 1.0]  # sorted
    assert list(report["modalities"]) == ["image", "audio"]
    for m, entry in report["modalities"].items():
        assert entry["input_std"] > 0
        assert entry["noise"][0] == report["clean_accuracy"], m  # level 0 is the clean input
        assert 0.0 <= entry["noise"][1] <= 1.0
        assert 0.0 <= entry["dropped"] <= 1.0
        assert stdout.count(f"| {m} |") == 1
    assert (out / "robustness.png").read_bytes()[:4] == b"\x89PNG"


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
        "split": "val", "seed": 0, "levels": [0.0, 1.0], "clean_accuracy": 0.5,
        "modalities": {
            "image": {"input_std": 0.4, "dropped": 0.3, "noise": [0.5, 0.4]},
            "text": {"input_std": None, "dropped": 0.2, "noise": None, "note": "no noise"},
        },
    }  # fmt: skip
    table = robustness_table(report)
    assert "| image | 0.4 | 50.00% | 40.00% | 30.00% |" in table
    assert "| text | - | - | - | 20.00% |" in table and "text: no noise" in table
    plot_robustness(report, tmp_path / "robustness.png")
    assert (tmp_path / "robustness.png").stat().st_size > 0


def test_run_without_best_checkpoint_or_config_is_named(run_dir, tmp_path, capsys):
    stopped = tmp_path / "stopped"
    shutil.copytree(run_dir, stopped, ignore=shutil.ignore_patterns("best.pt", "eval"))
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
