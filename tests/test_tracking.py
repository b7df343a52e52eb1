import json

import pytest

from fusion.tracking import Tracker


def test_metrics_and_summary_land_in_run_dir(tmp_path):
    tracker = Tracker(tmp_path, mode="disabled", config={"a": 1})
    tracker.log({"val/accuracy": 0.5})
    tracker.log({"val/accuracy": 0.75})
    tracker.update_summary({"test/accuracy": 0.7})
    tracker.update_summary({"test/loss": float("nan")})
    tracker.finish()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["val/accuracy"] for line in lines] == [0.5, 0.75]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {"test/accuracy": 0.7, "test/loss": "nan"}


def test_offline_wandb_writes_a_local_run(tmp_path):
    tracker = Tracker(tmp_path, mode="offline", project="fusion-test", config={"seed": 0})
    tracker.log({"loss": 1.0})
    tracker.update_summary({"test/accuracy": 0.9})
    tracker.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_unknown_mode_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"logger\.mode must be one of"):
        Tracker(tmp_path, mode="cloud")


def test_confusion_matrix_names_its_classes(tmp_path):
    tracker = Tracker(tmp_path, mode="disabled")
    path = tracker.log_confusion_matrix(
        "confusion_test", [0, 2, 2, 1], [0, 2, 1, 1], ["-1", "0", "1"]
    )
    saved = json.loads(path.read_text())
    assert saved["classes"] == ["-1", "0", "1"]
    assert saved["matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
