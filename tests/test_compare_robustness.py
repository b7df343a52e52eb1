import json

import pytest

from experiments.compare_robustness import main
from fusion.analysis.robustness import relative_robustness

LEVELS = [0.0, 0.5, 1.0]


def robustness_report(clean: float, scores: list[float]) -> dict:
    curve = {
        "levels": LEVELS,
        "scores": scores,
        "relative_robustness": relative_robustness(LEVELS, scores),
        "level": "sigma",
    }
    return {
        "metric": "accuracy",
        "split": "test",
        "lower_is_better": False,
        "clean": clean,
        "modalities": {"image": {"noise": None, "perturbations": {"blur": curve}}},
    }


def sweep_run(root, name, overrides, clean, scores, evaluated=True):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "summary.json").write_text(json.dumps({"test/fused/accuracy": clean}))
    if evaluated:
        (run / "eval").mkdir()
        (run / "eval" / "robustness_test.json").write_text(
            json.dumps(robustness_report(clean, scores))
        )


@pytest.fixture
def sweep(tmp_path):
    """Two seeds of late and gated fusion. Relative robustness is the trapezoid mean:
    late 0.8 -> [0.8, 0.7, 0.6] (0.7) and 0.7 -> [0.7, 0.6, 0.5] (0.6); gated
    0.9 -> [0.9, 0.7, 0.5] (0.7) and 0.9 -> [0.9, 0.8, 0.7] (0.8)."""
    root = tmp_path / "sweep"
    curves = {
        ("late", 0): (0.8, [0.8, 0.7, 0.6]),
        ("late", 1): (0.7, [0.7, 0.6, 0.5]),
        ("gated", 0): (0.9, [0.9, 0.7, 0.5]),
        ("gated", 1): (0.9, [0.9, 0.8, 0.7]),
    }
    for i, ((fuser, seed), (clean, scores)) in enumerate(curves.items()):
        sweep_run(root, str(i), [f"model/fusion={fuser}", f"seed={seed}"], clean, scores)
    return root


def test_effective_robustness_is_compared_per_seed_then_averaged(sweep, capsys):
    """Against late fusion, gated's ER is (RR - clean) - (RR_late - clean_late): seed 0
    (0.7 - 0.9) - (0.7 - 0.8) = -0.1, seed 1 (0.8 - 0.9) - (0.6 - 0.7) = 0.0."""
    assert main([str(sweep), "--reference", "late"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| model/fusion | modality/perturbation | clean |")
    # seed 0's areas are equal, so only seed 1 normalizes (gated 1, late 0)
    assert (
        "| gated | image/blur | 90.00% ± 0.00% | 75.00% ± 7.07% | 1.00 (n=1) | "
        "-5.00 pts ± 7.07 pts |" in table
    )
    assert (
        "| late | image/blur | 75.00% ± 7.07% | 65.00% ± 7.07% | 0.00 (n=1) | "
        "+0.00 pts ± 0.00 pts |" in table
    )
    assert "mean ± std over seeds 0, 1; effective robustness against configuration 'late'" in table
    result = json.loads((sweep / "report" / "robustness.json").read_text())
    gated = result["runs"]["gated"]["image"]["blur"]
    assert gated["effective_robustness"]["values"] == pytest.approx([-0.1, 0.0])
    assert gated["relative_robustness_normalized"]["values"] == [None, 1.0]
    assert result["seeds"] == ["0", "1"] and result["reference"] == "late"
    assert (sweep / "report" / "robustness.md").read_text() == table


def test_a_seed_missing_a_configuration_is_said_and_left_out(sweep, capsys):
    sweep_run(sweep, "4", ["model/fusion=late", "seed=2"], 0.5, [0.5, 0.5, 0.5])
    assert main([str(sweep), "--reference", "late", "--out", str(sweep / "cmp")]) == 0
    captured = capsys.readouterr()
    assert "seed 2 has no run of gated: left out" in captured.err
    assert "over seeds 0, 1;" in captured.out


def test_runs_without_a_robustness_report_are_named_with_the_command(sweep, capsys):
    sweep_run(sweep, "4", ["model/fusion=sum", "seed=0"], 0.5, [], evaluated=False)
    assert main([str(sweep), "--reference", "late"]) == 2
    err = capsys.readouterr().err
    assert "1 of 5 finished runs have no eval/robustness_test.json" in err
    assert "python -m experiments.evaluate <run> --robustness --split test` on each" in err
    assert str(sweep / "4") in err
    assert not (sweep / "report").exists()


def test_bad_reference_and_too_few_configurations_are_refused(sweep, capsys):
    assert main([str(sweep), "--reference", "concat"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compare_robustness: --reference concat is none of the configurations")
    assert "gated; late (named by model/fusion; give one as shown, or as key=value" in err
    assert main([str(sweep)]) == 2
    assert "seed 0: a line of relative robustness on clean score needs 3 configurations" in (
        capsys.readouterr().err
    )
    assert main([str(sweep), "--pivot", "model/fusion"]) == 2
    assert "comparing robustness takes 2 configurations or more, got 1" in (capsys.readouterr().err)


def test_configurations_are_named_by_the_settings_that_differ(tmp_path, capsys):
    """Settings every run shares (the epochs) do not name configurations; a reference may
    be given as key=value, and one seed shows values without a spread."""
    root = tmp_path / "sweep"
    for i, (fuser, dropout, clean, scores) in enumerate(
        [
            ("late", "0.0", 0.8, [0.8, 0.7, 0.6]),
            ("gated", "0.0", 0.9, [0.9, 0.7, 0.5]),
            ("gated", "0.3", 0.9, [0.9, 0.8, 0.7]),
        ]
    ):
        overrides = [f"model/fusion={fuser}", f"model.dropout={dropout}", "trainer.fuse.epochs=3"]
        sweep_run(root, str(i), [*overrides, "seed=0"], clean, scores)
    assert main([str(root), "--reference", "model/fusion=late"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| model.dropout, model/fusion | modality/perturbation |")
    # (0.8 - 0.9) - (0.7 - 0.8) = 0 for gated with dropout 0.3
    assert "| 0.3, gated | image/blur | 90.00% | 80.00% | 1.00 | +0.00 pts |" in table
    assert "accuracy on test (higher is better), seed 0;" in table
    assert main([str(root), "--reference", "model/fusion=gated"]) == 2
    assert "matches 2 configurations (0.0, gated, 0.3, gated)" in capsys.readouterr().err


def test_pivot_compares_within_each_value_and_an_earlier_output_is_kept(tmp_path, capsys):
    root = tmp_path / "sweep"
    for i, (task, fuser, clean, scores) in enumerate(
        [
            ("digit", "late", 0.8, [0.8, 0.7, 0.6]),
            ("digit", "gated", 0.9, [0.9, 0.8, 0.7]),
            ("same", "late", 0.5, [0.5, 0.5, 0.5]),
            ("same", "gated", 0.8, [0.8, 0.6, 0.4]),
        ]
    ):
        overrides = [f"data.task={task}", f"model/fusion={fuser}", "seed=0"]
        sweep_run(root, str(i), overrides, clean, scores)
    assert main([str(root), "--pivot", "data.task", "--reference", "late"]) == 0
    table = capsys.readouterr().out
    assert "**data.task=digit**" in table and "**data.task=same**" in table
    # digit: (0.8 - 0.9) - (0.7 - 0.8) = 0; same: (0.6 - 0.8) - (0.5 - 0.5) = -0.2
    result = json.loads((root / "report" / "robustness-by-data.task.json").read_text())
    effective = {
        task: result[task]["runs"]["gated"]["image"]["blur"]["effective_robustness"]["mean"]
        for task in ("digit", "same")
    }
    assert effective == pytest.approx({"digit": 0.0, "same": -0.2})
    # the sweep's own report folder is rewritten; files in a folder given with --out are kept
    assert main([str(root), "--pivot", "data.task", "--reference", "late"]) == 0
    out = ["--out", str(root / "report")]
    with pytest.raises(SystemExit):
        main([str(root), "--pivot", "data.task", "--reference", "late", *out])
    assert "pass --overwrite to replace them" in capsys.readouterr().err
    assert (
        main([str(root), "--pivot", "data.task", "--reference", "late", *out, "--overwrite"]) == 0
    )


def test_a_report_that_is_not_a_robustness_report_is_named(sweep, capsys):
    (sweep / "1" / "eval" / "robustness_test.json").write_text('{"metric": "accuracy"}')
    assert main([str(sweep), "--reference", "late"]) == 2
    err = capsys.readouterr().err
    assert f"{sweep / '1' / 'eval' / 'robustness_test.json'}: expected a robustness report" in err
    assert "found one without split, lower_is_better, clean, modalities" in err
