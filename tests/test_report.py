import json

import pytest

from experiments.report import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(root, name, overrides, accuracy, curve=None):
    """A run dir as train.py leaves it; `curve` (val accuracy per epoch) becomes metrics.jsonl."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "summary.json").write_text(json.dumps({"test/fused/accuracy": accuracy}))
    if curve is not None:
        lines = [{"pretrain/image/val/accuracy": 0.5}]
        lines += [{"fuse/epoch": e, "fuse/val/accuracy": a} for e, a in enumerate(curve, 1)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000  # an empty or failed figure is a few hundred bytes


def test_report_groups_runs_over_seeds(tmp_path, capsys):
    fake_run(tmp_path, "0", ["model/fusion=concat", "seed=0"], 0.8)
    fake_run(tmp_path, "1", ["model/fusion=concat", "seed=1"], 0.9)
    fake_run(tmp_path, "2", ["model/fusion=gated", "seed=0", "logger.mode=disabled"], 0.7)
    assert main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| model/fusion | test/fused/accuracy |"
    assert lines[2] == "| concat | 85.00% ± 7.07% (n=2) |"
    assert lines[3] == "| gated | 70.00% |"


def test_report_pivots_an_override_into_columns(tmp_path, capsys):
    fake_run(tmp_path, "0", ["model/fusion=concat", "data.task=digit"], 0.9)
    fake_run(tmp_path, "1", ["model/fusion=concat", "data.task=same"], 0.7)
    fake_run(tmp_path, "2", ["model/fusion=tfn", "data.task=same"], 0.75)
    assert main([str(tmp_path), "--pivot", "data.task"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| model/fusion | data.task=digit | data.task=same |"
    assert lines[2:] == ["| concat | 90.00% | 70.00% |", "| tfn | - | 75.00% |"]


def test_report_writes_table_json_and_plots(tmp_path, capsys):
    runs = tmp_path / "sweep"
    fake_run(runs, "0", ["model/fusion=concat", "seed=0"], 0.8, curve=[0.5, 0.7])
    fake_run(runs, "1", ["model/fusion=concat", "seed=1"], 0.9, curve=[0.6, 0.8, 0.9])
    fake_run(runs, "2", ["model/fusion=concat", "seed=2"], 0.85)  # no metrics.jsonl
    fake_run(runs, "3", ["model/fusion=gated", "seed=0"], 0.7, curve=[0.4, 0.6])
    assert main([str(runs)]) == 0
    out, err = capsys.readouterr()

    report_dir = runs / "report"
    assert (report_dir / "table.md").read_text() == out
    assert f"{runs / '2'} has no metrics.jsonl" in err
    written = ["table.md", "report.json", "test-fused-accuracy.png", "learning_curves.png"]
    assert err.endswith("".join(f"  {report_dir / name}\n" for name in written))
    assert_png(report_dir / "test-fused-accuracy.png")
    assert_png(report_dir / "learning_curves.png")

    report = json.loads((report_dir / "report.json").read_text())
    assert report["metric"] == "test/fused/accuracy"
    concat = report["configurations"]["model/fusion=concat"]
    assert concat["config"] == {"model/fusion": "concat"}
    assert concat["n"] == 3
    assert concat["mean"] == pytest.approx(0.85)
    assert concat["std"] == pytest.approx(0.05)
    assert [(r["seed"], r["value"]) for r in concat["runs"]] == [
        ("0", 0.8),
        ("1", 0.9),
        ("2", 0.85),
    ]
    # seeds averaged epoch by epoch; epoch 3 only has seed 1, the run without a curve is left out
    assert concat["learning_curve"] == pytest.approx({"1": 0.55, "2": 0.75, "3": 0.9})
    assert concat["learning_curve_runs"] == 2
    gated = report["configurations"]["model/fusion=gated"]
    assert (gated["n"], gated["std"], gated["learning_curve"]) == (1, None, {"1": 0.4, "2": 0.6})


def test_report_plots_go_where_asked_and_skip_curves_nobody_has(tmp_path, capsys):
    fake_run(tmp_path / "sweep", "0", ["model/fusion=concat"], 0.8)
    plots = tmp_path / "figures"
    assert main([str(tmp_path / "sweep"), "--plots", str(plots)]) == 0
    assert "learning_curves.png not written" in capsys.readouterr().err
    assert sorted(p.name for p in plots.iterdir()) == [
        "report.json",
        "table.md",
        "test-fused-accuracy.png",
    ]
    assert not (tmp_path / "sweep" / "report").exists()


def test_report_errors_name_the_problem(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err

    fake_run(tmp_path, "0", ["model/fusion=concat"], 0.8)
    assert main([str(tmp_path), "--metric", "test/fused/acc"]) == 2
    err = capsys.readouterr().err
    assert "1 of 1 runs have no 'test/fused/acc'" in err
    assert "has: test/fused/accuracy" in err
    assert main([str(tmp_path), "--pivot", "data.task"]) == 2
    assert "no run sets 'data.task'; the runs set: model/fusion" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_report_can_be_pushed_to_wandb_offline(tmp_path, capsys):
    fake_run(tmp_path, "0", ["model/fusion=concat", "seed=0"], 0.8)
    fake_run(tmp_path, "1", ["model/fusion=concat", "seed=1"], 0.9)
    assert main([str(tmp_path), "--wandb", "offline"]) == 0
    assert "W&B report run:" in capsys.readouterr().err
    assert list((tmp_path / "report" / "wandb").glob("offline-run-*/run-*.wandb"))
