import json

import pytest
import yaml

from experiments.report import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(root, name, overrides, accuracy, curve=None, fuse_state=False, epochs=3):
    """A run dir as train.py leaves it; `curve` (val accuracy per epoch) becomes metrics.jsonl.
    `accuracy=None`: no summary.json (the run crashed or stopped); `fuse_state`: it left a
    stage-2 state; `epochs` is the composed config's trainer.fuse.epochs."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    config = {"seed": 0, "trainer": {"fuse": {"epochs": epochs}, "stop_after_epochs": None}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if accuracy is not None:
        (run / "summary.json").write_text(json.dumps({"test/fused/accuracy": accuracy}))
    if curve is not None:
        lines = [{"pretrain/image/val/accuracy": 0.5}]
        lines += [{"fuse/epoch": e, "fuse/val/accuracy": a} for e, a in enumerate(curve, 1)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if fuse_state:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "fuse_state.pt").write_bytes(b"state")
    return run


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
    assert lines[2] == "| concat | **85.00% ± 7.07%** (n=2) |"
    assert lines[3] == "| gated | 70.00% (n=1)* |"
    assert lines[4:] == [
        "",
        "Bold: the best mean of its column (higher is better).",
        "",
        "\\* fewer finished runs than the most in one cell (2).",
    ]


def test_an_error_metric_is_best_lowest_and_is_the_default_of_regression_runs(tmp_path, capsys):
    for name, fuser, mae in (("0", "concat", 0.5), ("1", "gated", 0.3), ("2", "tfn", 0.4)):
        fake_run(tmp_path, name, [f"model/fusion={fuser}"], 0.0)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        summary.update({"metric": "mae", "test/fused/mae": mae})
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
        metrics = [{"fuse/epoch": e, "fuse/val/mae": v} for e, v in ((1, 0.9), (2, mae))]
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps(m) + "\n" for m in metrics)
        )
    assert main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| model/fusion | test/fused/mae |"
    assert lines[2:5] == [
        "| concat | 0.5000 (n=1) |",
        "| gated | **0.3000** (n=1) |",
        "| tfn | 0.4000 (n=1) |",
    ]
    assert lines[6] == "Bold: the best mean of its column (lower is better)."
    report = json.loads((tmp_path / "report" / "test-fused-mae.json").read_text())
    assert report["best"] == "model/fusion=gated" and report["lower_is_better"]
    assert report["curve"] == "fuse/val/mae" and not report["percent"]
    assert (tmp_path / "report" / "learning_curves.png").is_file()
    summary = json.loads((tmp_path / "0" / "summary.json").read_text())
    (tmp_path / "0" / "summary.json").write_text(json.dumps({**summary, "metric": "accuracy"}))
    assert main([str(tmp_path)]) == 2
    assert "different main metrics ['accuracy', 'mae']" in capsys.readouterr().err


def test_report_pivots_an_override_into_columns(tmp_path, capsys):
    fake_run(tmp_path, "0", ["model/fusion=concat", "data.task=digit"], 0.9)
    fake_run(tmp_path, "1", ["model/fusion=concat", "data.task=same"], 0.7)
    fake_run(tmp_path, "2", ["model/fusion=tfn", "data.task=same"], 0.75)
    assert main([str(tmp_path), "--pivot", "data.task"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| model/fusion | data.task=digit | data.task=same |"
    # tfn was never launched on digit: nothing is missing there
    assert lines[2:4] == [
        "| concat | 90.00% (n=1) | 70.00% (n=1) |",  # alone in its column: nothing to beat
        "| tfn | - | **75.00%** (n=1) |",
    ]
    # a report without the pivot (or over another metric) sits beside this one
    assert main([str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "report").glob("*.md")) == [
        "test-fused-accuracy-by-data.task.md",
        "test-fused-accuracy.md",
    ]


def test_report_writes_table_json_and_plots(tmp_path, capsys):
    runs = tmp_path / "sweep"
    fake_run(runs, "0", ["model/fusion=concat", "seed=0"], 0.8, curve=[0.5, 0.7])
    fake_run(runs, "1", ["model/fusion=concat", "seed=1"], 0.9, curve=[0.6, 0.8, 0.9])
    fake_run(runs, "2", ["model/fusion=concat", "seed=2"], 0.85)  # no metrics.jsonl
    fake_run(runs, "3", ["model/fusion=gated", "seed=0"], 0.7, curve=[0.4, 0.6])
    assert main([str(runs)]) == 0
    out, err = capsys.readouterr()

    report_dir = runs / "report"
    assert (report_dir / "test-fused-accuracy.md").read_text() == out
    assert f"{runs / '2'} has no metrics.jsonl" in err
    written = [
        "test-fused-accuracy.md",
        "test-fused-accuracy.json",
        "test-fused-accuracy.png",
        "learning_curves.png",
    ]
    assert err.endswith("".join(f"  {report_dir / name}\n" for name in written))
    assert_png(report_dir / "test-fused-accuracy.png")
    assert_png(report_dir / "learning_curves.png")

    report = json.loads((report_dir / "test-fused-accuracy.json").read_text())
    assert report["metric"] == "test/fused/accuracy"
    concat = report["configurations"]["model/fusion=concat"]
    assert concat["config"] == {"model/fusion": "concat"}
    assert (concat["n"], concat["launched"], concat["fewer_runs"]) == (3, 3, False)
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
    assert gated["fewer_runs"] and report["incomplete"] == []


def test_report_plots_go_where_asked_and_skip_curves_nobody_has(tmp_path, capsys):
    fake_run(tmp_path / "sweep", "0", ["model/fusion=concat"], 0.8)
    plots = tmp_path / "figures"
    assert main([str(tmp_path / "sweep"), "--plots", str(plots)]) == 0
    assert "learning_curves.png not written" in capsys.readouterr().err
    assert sorted(p.name for p in plots.iterdir()) == [
        "test-fused-accuracy.json",
        "test-fused-accuracy.md",
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
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--plots", str(tmp_path / "0" / "summary.json")])
    assert "argument --plots: expected a directory, " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--plots", str(tmp_path / "0" / "summary.json" / "plots")])
    assert "argument --plots: cannot create " in capsys.readouterr().err


def test_report_to_wandb_online_without_an_account_is_named(tmp_path, capsys, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    fake_run(tmp_path, "0", ["model/fusion=concat"], 0.8)
    assert main([str(tmp_path), "--wandb", "online"]) == 2
    err = capsys.readouterr().err
    assert "--wandb online: W&B could not start the run (" in err
    assert "use --wandb offline; the table and plots are written" in err
    assert (tmp_path / "report" / "test-fused-accuracy.json").is_file()


def test_report_can_be_pushed_to_wandb_offline(tmp_path, capsys):
    fake_run(tmp_path, "0", ["model/fusion=concat", "seed=0"], 0.8)
    fake_run(tmp_path, "1", ["model/fusion=concat", "seed=1"], 0.9)
    assert main([str(tmp_path), "--wandb", "offline"]) == 0
    assert "W&B report run:" in capsys.readouterr().err
    assert list((tmp_path / "report" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_report_refuses_a_plots_folder_holding_files_it_would_overwrite(tmp_path, capsys):
    fake_run(tmp_path / "sweep", "0", ["model/fusion=concat"], 0.8, curve=[0.5])
    plots = tmp_path / "figures"
    plots.mkdir()
    (plots / "test-fused-accuracy.md").write_text("my notes\n")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "sweep"), "--plots", str(plots)])
    assert (
        f"argument --plots: {plots} already holds test-fused-accuracy.md, which this report "
        "would overwrite; nothing was written. Choose another folder, or pass --overwrite to "
        "replace them"
    ) in capsys.readouterr().err
    assert sorted(p.name for p in plots.iterdir()) == ["test-fused-accuracy.md"]
    assert main([str(tmp_path / "sweep"), "--plots", str(plots), "--overwrite"]) == 0
    assert (plots / "test-fused-accuracy.md").read_text().startswith("| model/fusion |")
    assert main([str(tmp_path / "sweep")]) == 0  # the sweep's own report/ folder: rewritten
    assert main([str(tmp_path / "sweep")]) == 0


def test_a_finished_run_whose_summary_is_gone_is_not_sent_to_resume(tmp_path, capsys):
    """trainer.resume refuses a state that finished every epoch; the report says what is
    missing and what recomputes it (experiments.evaluate, from best.pt), or that nothing can."""
    from fusion.training.checkpoint import save_checkpoint

    sweep = tmp_path / "sweep"
    fake_run(sweep, "0", ["seed=0"], 0.8)
    for name, state in (("1", {"epoch": 3}), ("2", {"epoch": 2, "stopped_early": True})):
        run = fake_run(sweep, name, [f"seed={name}"], None, curve=[0.5, 0.6, 0.7], fuse_state=True)
        save_checkpoint(run / "checkpoints" / "fuse_state.pt", {"epochs": 3, **state})
    (sweep / "1" / "checkpoints" / "best.pt").write_bytes(b"weights")
    assert main([str(sweep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == [
        f"- {sweep / '1'} (seed=1): finished stage 2 (all 3 epochs; checkpoints/fuse_state.pt says so), but "
        "its summary.json is missing (deleted, or the run died during the final evaluation); "
        f"`python -m experiments.evaluate {sweep / '1'}` recomputes its test metrics from "
        f"{sweep / '1' / 'checkpoints' / 'best.pt'} (into {sweep / '1' / 'eval' / 'eval_test.json'}; "
        "it writes no summary.json)",
        f"- {sweep / '2'} (seed=2): finished stage 2 (stopped early after epoch 2; checkpoints/fuse_state.pt "
        "says so), but its summary.json is missing (deleted, or the run died during the final "
        f"evaluation); {sweep / '2' / 'checkpoints' / 'best.pt'} is gone too, so nothing can "
        "recompute its metrics: train it again",
    ]


def test_report_counts_and_lists_crashed_and_stopped_runs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_run(sweep, "0", ["model/fusion=concat", "seed=0"], 0.8)
    fake_run(sweep, "1", ["model/fusion=concat", "seed=1"], 0.9)
    fake_run(sweep, "2", ["model/fusion=concat", "seed=2"], None)  # died in stage 1
    fake_run(sweep, "3", ["model/fusion=gated", "seed=0"], 0.7)
    stopped = ["model/fusion=gated", "seed=1", "trainer.stop_after_epochs=1"]
    fake_run(sweep, "4", stopped, None, curve=[0.5], fuse_state=True)
    fake_run(sweep, "5", ["model/fusion=gated", "seed=2"], None, curve=[0.5, 0.6], fuse_state=True)
    fake_run(sweep, "6", ["model/fusion=sum", "seed=0"], None)  # every seed of sum crashed
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "| model/fusion | test/fused/accuracy |",
        "|---|---:|",
        "| concat | **85.00% ± 7.07%** (n=2 of 3) |",
        "| gated | 70.00% (n=1 of 3)* |",
        "| sum | - (n=0 of 1)* |",
        "",
        "Bold: the best mean of its column (higher is better).",
        "",
        "\\* fewer finished runs than the most in one cell (2).",
        "",
        "Runs without a summary.json (not averaged):",
        "",
        f"- {sweep / '2'} (model/fusion=concat, seed=2): crashed, killed or still running "
        "before a stage-2 epoch ended (no checkpoints/fuse_state.pt)",
        f"- {sweep / '4'} (model/fusion=gated, seed=1): stopped early after stage-2 epoch 1 "
        f"of 3 (trainer.stop_after_epochs=1); continue with trainer.resume={sweep / '4'}",
        f"- {sweep / '5'} (model/fusion=gated, seed=2): crashed, killed or still running in "
        "stage 2 after stage-2 epoch 2 of 3 (checkpoints/fuse_state.pt exists); continue with "
        f"trainer.resume={sweep / '5'}",
        f"- {sweep / '6'} (model/fusion=sum, seed=0): crashed, killed or still running "
        "before a stage-2 epoch ended (no checkpoints/fuse_state.pt)",
    ]
    report = json.loads((sweep / "report" / "test-fused-accuracy.json").read_text())
    counts = {k: (c["n"], c["launched"], c["mean"]) for k, c in report["configurations"].items()}
    assert counts == {
        "model/fusion=concat": (2, 3, pytest.approx(0.85)),
        "model/fusion=gated": (1, 3, 0.7),
        "model/fusion=sum": (0, 1, None),
    }
    assert [(r["dir"], r["seed"]) for r in report["incomplete"]] == [
        (str(sweep / name), seed) for name, seed in [("2", "2"), ("4", "1"), ("5", "2"), ("6", "0")]
    ]
    assert_png(sweep / "report" / "test-fused-accuracy.png")


def test_a_resumed_run_and_launch_settings_do_not_split_a_configuration(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    stopped = fake_run(
        sweep, "0", ["model/fusion=concat", "seed=0", "trainer.stop_after_epochs=1"], None,
        fuse_state=True,
    )  # fmt: skip
    resume = [f"trainer.resume={stopped}", "logger.mode=disabled", "paths.output_dir=/x"]
    fake_run(sweep, "1", ["model/fusion=concat", "seed=0", *resume], 0.8)
    fake_run(sweep, "2", ["model/fusion=concat", "seed=1", "hydra.job.chdir=false"], 0.9)
    fake_run(sweep, "3", ["model/fusion=concat", "seed=2", "tags=[a]", "trainer.pretrain.reuse=false",
                          "trainer.num_workers=2"], 1.0)  # fmt: skip
    assert main([str(sweep)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| model/fusion | test/fused/accuracy |",
        "|---|---:|",
        "| concat | 90.00% ± 10.00% (n=3) |",
        "",
        "Runs without a summary.json (not averaged):",
        "",
        f"- {stopped} (model/fusion=concat, seed=0): stopped early; resumed by {sweep / '1'}",
    ]
    report = json.loads((sweep / "report" / "test-fused-accuracy.json").read_text())
    assert list(report["configurations"]) == ["model/fusion=concat"]
    assert report["configurations"]["model/fusion=concat"]["launched"] == 3


def test_a_failed_run_is_listed_with_its_error_and_no_advice_to_resume(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_run(sweep, "0", ["trainer.fuse.lr=0.1", "seed=0"], 0.8)
    failed = fake_run(sweep, "1", ["trainer.fuse.lr=1e20", "seed=0"], None, fuse_state=True)
    error = "training stopped: stage 'fuse', epoch 1, step 3: the loss is nan"
    (failed / "failure.txt").write_text(error + "\n")
    assert main([str(sweep)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"- {failed} (trainer.fuse.lr=1e20, seed=0): failed: {error}"
    )


def test_a_copied_run_counts_once(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_run(sweep, "0", ["model/fusion=concat", "seed=0"], 0.8)
    fake_run(sweep, "1", ["model/fusion=concat", "seed=1"], 0.6)
    fake_run(sweep, "copy", ["model/fusion=concat", "seed=0"], 0.8)
    assert main([str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert "| concat | 70.00% ± 14.14% (n=2) |" in out
    assert f"{sweep / 'copy'} repeats the configuration and seed of {sweep / '0'}" in err


def test_jobs_a_stopped_sweep_never_started_are_listed(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_run(sweep, "0", ["model/fusion=concat", "seed=0"], 0.8)
    fake_run(sweep, "1", ["model/fusion=concat", "seed=1"], None)  # failed: Hydra stopped here
    task = ["model/fusion=concat,gated", "seed=0,1", "logger.mode=disabled"]
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}}}))
    assert main([str(sweep)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"- {sweep}: 2 of 4 planned jobs never started (Hydra stops a multirun at the first job "
        "that fails)"
    )
    report = json.loads((sweep / "report" / "test-fused-accuracy.json").read_text())
    assert report["unstarted"] == [
        f"{sweep}: 2 of 4 planned jobs never started (Hydra stops a multirun at the first job "
        "that fails)"
    ]


def test_a_cut_last_metrics_line_is_skipped_with_a_note(tmp_path, capsys):
    run = fake_run(tmp_path, "0", ["model/fusion=concat"], 0.8, curve=[0.5, 0.7])
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"fuse/epoch": 3, "fuse/val')  # killed while writing
    assert main([str(tmp_path)]) == 0
    assert f"{run / 'metrics.jsonl'}: line 4 was cut short" in capsys.readouterr().err
    report = json.loads((tmp_path / "report" / "test-fused-accuracy.json").read_text())
    assert report["configurations"]["model/fusion=concat"]["learning_curve"] == {"1": 0.5, "2": 0.7}


def test_no_finished_run_lists_the_runs_there_are(tmp_path, capsys):
    fake_run(tmp_path, "0", ["model/fusion=concat"], None, fuse_state=True)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no summary.json under {tmp_path}; runs:\n  {tmp_path / '0'}: crashed" in err


NOT_UTF8 = b"\xff\xfe\x00garbage"
CORRUPT_FILES = {
    "summary corrupt json": (
        "summary.json",
        '{"test/fused/accuracy": 0.8',
        "expected JSON, found corrupt JSON",
    ),
    "summary a list": ("summary.json", "[0.8]", "expected a JSON object, found list"),
    "summary not text": ("summary.json", NOT_UTF8, "expected a readable text file, found"),
    "metric a string": (
        "summary.json",
        '{"test/fused/accuracy": "0.8"}',
        "'test/fused/accuracy': expected a finite number, found '0.8'",
    ),
    "metric nan": (
        "summary.json",
        '{"test/fused/accuracy": NaN}',
        "'test/fused/accuracy': expected a finite number, found nan",
    ),
    "metric a bool": (
        "summary.json",
        '{"test/fused/accuracy": true}',
        "'test/fused/accuracy': expected a finite number, found True",
    ),
    "metric a percent": (
        "summary.json",
        '{"test/fused/accuracy": 93.0}',
        "'test/fused/accuracy': expected a fraction in [0, 1], found 93.0",
    ),
    "overrides corrupt yaml": (
        ".hydra/overrides.yaml",
        "- a=1\n- [b\n",
        "expected YAML, found corrupt YAML",
    ),
    "overrides a mapping": (
        ".hydra/overrides.yaml",
        "seed: 1\n",
        "expected a YAML list, found dict",
    ),
    "override not a string": (
        ".hydra/overrides.yaml",
        "- seed=1\n- {a: 1}\n",
        "expected a list of 'key=value' strings, found dict {'a': 1} at item 1",
    ),
    "config a list": (".hydra/config.yaml", "- 1\n", "expected a YAML dict, found list"),
    "metrics corrupt line": (
        "metrics.jsonl",
        '{"fuse/epoch": 1\n{"fuse/epoch": 2, "fuse/val/accuracy": 0.5}\n',
        "line 1: expected a JSON object, found corrupt JSON",
    ),
    "metrics line a list": (
        "metrics.jsonl",
        "[1, 2]\n",
        "line 1: expected a JSON object, found list",
    ),
    "curve value a string": (
        "metrics.jsonl",
        '{"fuse/epoch": 1, "fuse/val/accuracy": "high"}\n',
        "'fuse/val/accuracy': expected a finite number, found 'high'",
    ),
    "curve value a percent": (
        "metrics.jsonl",
        '{"fuse/epoch": 1, "fuse/val/accuracy": 93.0}\n',
        "'fuse/val/accuracy': expected a fraction in [0, 1], found 93.0",
    ),
    "curve epoch null": (
        "metrics.jsonl",
        '{"fuse/epoch": null, "fuse/val/accuracy": 0.5}\n',
        "'fuse/epoch': expected a finite number, found None",
    ),
}


@pytest.mark.parametrize(("name", "content", "message"), CORRUPT_FILES.values(), ids=CORRUPT_FILES)
def test_a_bad_file_is_named_with_what_was_expected_and_found(
    tmp_path, capsys, name, content, message
):
    run = fake_run(tmp_path / "sweep", "0", ["model/fusion=concat"], 0.8)
    path = run / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    assert main([str(tmp_path / "sweep")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"report: {path}") and message in err, err
    assert not (tmp_path / "sweep" / "report").exists()


def test_a_percent_where_a_fraction_belongs_is_refused_naming_the_file(tmp_path, capsys):
    fake_run(tmp_path, "0", ["model/fusion=concat", "seed=0"], 0.9)
    percent = fake_run(tmp_path, "1", ["model/fusion=concat", "seed=1"], 93.0)
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"report: {percent / 'summary.json'}: 'test/fused/accuracy': expected a fraction in "
        "[0, 1], found 93.0\n"
    )
    assert not (tmp_path / "report").exists()


def test_a_gain_may_be_negative_and_a_loss_above_one_but_a_gain_is_a_fraction(tmp_path, capsys):
    run = fake_run(tmp_path, "0", ["model/fusion=concat"], 0.9)
    summary = {"test/fused/accuracy": 0.9, "test/fusion_gain": -0.05, "test/fused/loss": 1.7}
    (run / "summary.json").write_text(json.dumps(summary))
    assert main([str(tmp_path), "--metric", "test/fusion_gain"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == "| concat | -5.00% (n=1) |"
    assert main([str(tmp_path), "--metric", "test/fused/loss"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == "| concat | 1.7000 (n=1) |"
    (run / "summary.json").write_text(json.dumps(summary | {"test/fusion_gain": 5.0}))
    assert main([str(tmp_path), "--metric", "test/fusion_gain"]) == 2
    assert capsys.readouterr().err == (
        f"report: {run / 'summary.json'}: 'test/fusion_gain': expected a fraction in [-1, 1], "
        "found 5.0\n"
    )
