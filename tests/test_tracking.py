import json
import logging

import pytest

from fusion.tracking import Tracker, file_artifact


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


def test_offline_wandb_writes_a_local_run_and_leaves_no_checkpoint_copy(tmp_path, monkeypatch):
    """W&B stages a mutable file's copy under its data folder and caches it; the checkpoint
    is read from the run directory instead, so a sweep leaves no copies."""
    data, cache = tmp_path / "wandb-data", tmp_path / "wandb-cache"
    monkeypatch.setenv("WANDB_DATA_DIR", str(data))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(cache))
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "best.pt"
    run_dir.mkdir()
    checkpoint.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    tracker = Tracker(run_dir, mode="offline", project="fusion-test", config={"seed": 0})
    tracker.log({"loss": 1.0})
    tracker.update_summary({"test/accuracy": 0.9})
    tracker.log_artifact(checkpoint, "model-run")
    tracker.finish()
    assert list((run_dir / "wandb").glob("offline-run-*"))
    left = [p for root in (data, cache, run_dir / "wandb") for p in root.rglob("*") if p.is_file()]
    assert left and all(p.stat().st_size < 2**19 for p in left), [
        (p, p.stat().st_size) for p in left if p.stat().st_size >= 2**19
    ]


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


@pytest.mark.parametrize(
    ("tags", "kept", "said"),
    [
        (["x" * 70], ["x" * 64], f"W&B tag '{'x' * 70}' has 70 characters, cut to W&B's 64"),
        (["ok", ""], ["ok"], "W&B tag '' dropped: W&B tags need 1 to 64 characters"),
        (["y" * 65, "z" * 64], ["y" * 64, "z" * 64], "has 65 characters, cut to W&B's 64"),
    ],
)
def test_tags_wandb_refuses_are_cut_or_dropped_with_a_warning(tmp_path, caplog, tags, kept, said):
    with caplog.at_level(logging.WARNING, logger="fusion"):
        tracker = Tracker(tmp_path, mode="offline", project="fusion-test", tags=tags)
    try:
        assert list(tracker._wandb_run.tags) == kept
    finally:
        tracker.finish()
    assert said in caplog.text


def test_a_resumed_run_continues_the_stopped_wandb_run(tmp_path, caplog):
    first = Tracker(tmp_path / "first", mode="offline", project="fusion-test")
    first.log({"loss": 1.0})
    first.finish()
    run_id = (tmp_path / "first" / "wandb_id.txt").read_text().strip()
    with caplog.at_level(logging.INFO, logger="fusion"):
        second = Tracker(
            tmp_path / "second", mode="offline", project="fusion-test",
            resume_from=tmp_path / "first",
        )  # fmt: skip
    second.finish()
    assert f"W&B: continuing run {run_id} of {tmp_path / 'first'}" in caplog.text
    assert (tmp_path / "second" / "wandb_id.txt").read_text().strip() == run_id  # for the next
    offline = list((tmp_path / "second" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].name.endswith(f"-{run_id}")


def test_resuming_a_run_without_a_wandb_id_starts_a_new_run_and_says_so(tmp_path, caplog):
    (tmp_path / "first").mkdir()  # W&B was disabled there
    with caplog.at_level(logging.WARNING, logger="fusion"):
        tracker = Tracker(
            tmp_path / "second", mode="offline", project="fusion-test",
            resume_from=tmp_path / "first",
        )  # fmt: skip
    tracker.finish()
    id_file = tmp_path / "first" / "wandb_id.txt"
    assert f"{id_file} does not exist: the resumed run starts a new W&B run" in caplog.text


@pytest.mark.parametrize("found", ["", "abc def", "../../x", "id;rm -rf"])
def test_a_stored_wandb_id_that_is_not_an_id_is_refused_naming_the_file(tmp_path, found):
    (tmp_path / "first").mkdir()
    id_file = tmp_path / "first" / "wandb_id.txt"
    id_file.write_text(found)
    with pytest.raises(ValueError) as err:
        Tracker(tmp_path / "second", mode="offline", resume_from=tmp_path / "first")
    assert str(err.value) == (
        f"{id_file}: expected a W&B run id (1 to 128 letters, digits, '_' or '-'), found {found!r}"
    )


def test_online_mode_without_an_account_is_named_before_training(tmp_path, monkeypatch):
    from fusion.training.settings import ConfigError

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(ConfigError) as caught:
        Tracker(tmp_path / "run", mode="online")
    message = str(caught.value)
    assert message.startswith("config key 'logger.mode': W&B could not start the online run (")
    assert "logger.mode=offline" in message


def test_a_checkpoint_artifact_names_the_files_it_needs_without_copying_them(tmp_path):
    checkpoint = tmp_path / "run" / "best.pt"
    stage1 = tmp_path / "pretrained" / "image-0123.pt"
    for path in (checkpoint, stage1):
        path.parent.mkdir()
        path.write_bytes(b"weights")
    artifact = file_artifact(checkpoint, "model-run", "model", references=[stage1])
    entries = {name: entry.ref for name, entry in artifact.manifest.entries.items()}
    assert entries == {"best.pt": None, "image-0123.pt": stage1.resolve().as_uri()}
