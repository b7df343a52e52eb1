import json

from experiments.report import main


def fake_run(root, name, overrides, accuracy):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "summary.json").write_text(json.dumps({"test/fused/accuracy": accuracy}))


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


def test_report_errors_name_the_problem(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err
