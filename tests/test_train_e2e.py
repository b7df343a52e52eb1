"""End to end: the real entry point, composed by Hydra, on a tiny subset."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "logger.mode=disabled",
    "data.max_samples=48",
    "trainer.batch_size=24",
    "trainer.pretrain.epochs=1",
    "trainer.fuse.epochs=2",
]


def train(tmp_path, name, *overrides, multirun=False):
    run_dir = tmp_path / name
    cmd = [
        sys.executable, "-m", "experiments.train", *(["--multirun"] if multirun else []),
        f"paths.output_dir={tmp_path}", f"hydra.run.dir={run_dir}", *TINY, *overrides,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return result, run_dir


def test_main_job_end_to_end_and_checkpoint_reuse(tmp_path):
    first, run_dir = train(tmp_path, "first")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("test/image_only/accuracy", "test/audio_only/accuracy", "test/fused/accuracy"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["fuser"] == "GatedFuser"
    assert "| fused (GatedFuser) |" in first.stdout and str(run_dir) in first.stdout
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()
    checkpoints = sorted((tmp_path / "pretrained").glob("*.pt"))
    assert [p.name.split("-")[0] for p in checkpoints] == ["audio", "image"]

    # another fuser reuses the stage-1 encoders, since nothing that shaped them changed
    second, run_dir = train(tmp_path, "second", "model/fusion=concat")
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("reusing") == 2
    # ... and the frozen encoders' features: each split was encoded once, by the first run
    assert first.stdout.count("feature cache: encoding") == 5  # val, test per modality; train
    assert "feature cache: encoding" not in second.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["fuser"] == "ConcatFuser"
    assert sorted((tmp_path / "pretrained").glob("*.pt")) == checkpoints


def test_same_seed_same_metrics(tmp_path):
    runs = [
        train(tmp_path / str(i), "run", "data.max_samples=24", "trainer.fuse.epochs=1")
        for i in range(2)
    ]
    for result, _ in runs:
        assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((d / "summary.json").read_text()) for _, d in runs]
    for summary in summaries:
        summary.pop("checkpoints")
    assert summaries[0] == summaries[1]


def test_feature_cache_gives_the_uncached_result(tmp_path):
    def summary(name, *overrides):
        result, run_dir = train(tmp_path, name, "model/fusion=lmf", *overrides)
        assert result.returncode == 0, result.stderr[-3000:]
        out = json.loads((run_dir / "summary.json").read_text())
        out.pop("checkpoints")
        return result.stdout, out

    cold_log, cold = summary("cold")
    warm_log, warm = summary("warm")
    plain_log, plain = summary("plain", "trainer.feature_cache.enabled=false")
    assert (
        "encoding" in cold_log and "encoding" not in warm_log and "feature cache" not in plain_log
    )
    assert warm == cold  # the cold run reads the very files it wrote
    assert plain.keys() == cold.keys()
    for key, value in plain.items():
        assert cold[key] == (value if isinstance(value, str) else pytest.approx(value, abs=1e-5))
    augmented_log, _ = summary("augmented", "trainer.fuse.views=null")
    assert "the train split is augmented, encoding it live" in augmented_log


@pytest.mark.slow
def test_bf16_channels_last_and_loader_workers(tmp_path):
    result, run_dir = train(
        tmp_path, "fast", "trainer.precision=bf16", "trainer.channels_last=true",
        "trainer.num_workers=1", "trainer.persistent_workers=true",
        "trainer.feature_cache.dtype=float16",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert 0.0 <= json.loads((run_dir / "summary.json").read_text())["test/fused/accuracy"] <= 1
    assert list((tmp_path / "features").rglob("*-float16.npy"))


def test_fp16_on_cpu_and_persistent_workers_without_workers_are_named(tmp_path):
    result, _ = train(tmp_path, "fp16", "trainer.precision=fp16", "trainer.device=cpu")
    assert result.returncode == 2
    assert "config key 'trainer.precision': precision 'fp16' needs a CUDA device" in result.stderr
    result, _ = train(tmp_path, "workers", "trainer.persistent_workers=true")
    assert result.returncode == 2 and "trainer.num_workers=0" in result.stderr


@pytest.mark.slow
def test_compiled_model_trains_and_keeps_checkpoint_names(tmp_path):
    result, run_dir = train(tmp_path, "compiled", "trainer.compile=true")
    assert result.returncode == 0, result.stderr[-3000:]
    import torch

    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert not any("_orig_mod" in key for key in state)


def test_config_typo_stops_before_training(tmp_path):
    result, _ = train(tmp_path, "typo", "trainer.epochz=3")
    assert result.returncode == 2
    assert "config error: config key 'trainer.epochz': the config has no such setting" in (
        result.stderr
    )
    result, _ = train(tmp_path, "type", "trainer.pretrain.epochs=many")
    assert result.returncode == 2
    assert "config key 'trainer.pretrain.epochs'" in result.stderr
    assert not (tmp_path / "pretrained").exists()


def test_a_nonfinite_run_stops_with_one_line_kept_in_its_directory(tmp_path):
    result, run_dir = train(tmp_path, "nan", "trainer.pretrain.lr=1e20")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(
        "training stopped: stage 'pretrain image': the training loss is nan"
    )
    assert "Traceback" not in result.stderr
    assert (run_dir / "failure.txt").read_text() == lines[-1] + "\n"
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_trimodal_experiment_with_gradual_unfreezing(tmp_path):
    result, run_dir = train(
        tmp_path,
        "tri",
        "experiment=avdigits_trimodal",
        "trainer.fuse.unfreeze={start_epoch: 2, every: 1, stages_per_step: 1}",
        "trainer.pretrain.lr_mult={encoders.*.backbone.*: 0.5}",
        "trainer.fuse.layer_decay=0.8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"test/text_only/accuracy", "test/fused/accuracy"} <= set(summary)
    assert "epoch 2: text backbone stages trainable" in result.stdout
    assert "text" in (run_dir / "model_summary.txt").read_text()


@pytest.mark.slow
def test_every_fuser_trains_through_the_entry_point(tmp_path):
    fusions = sorted(p.stem for p in (ROOT / "configs" / "model" / "fusion").glob("*.yaml"))
    result, _ = train(
        tmp_path,
        "unused",
        f"model/fusion={','.join(fusions)}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "data.max_samples=24",
        "trainer.fuse.epochs=1",
        multirun=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fusers = {
        json.loads(p.read_text())["fuser"] for p in (tmp_path / "sweep").glob("*/summary.json")
    }
    assert len(fusers) == len(fusions)


def test_tasks_with_branching_and_conditional_heads(tmp_path):
    runs = {
        "which": ("data.task=which", "model/head=conditional", "model/fusion=lmf",
                  "model.modality_dropout={image: 0.3, audio: 0.3}"),
        "multi": ("data.task=multitask", "model/head=multitask", "model/fusion=transformer",
                  "model.head.loss_weights={same: 2.0}"),
        "same": ("data.task=same", "model/fusion=late", "model.fusion.combine=probs"),
    }  # fmt: skip
    for name, overrides in runs.items():
        result, run_dir = train(tmp_path, name, "data.max_samples=24", *overrides)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert 0.0 <= summary["test/fused/accuracy"] <= 1.0
    multi = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert {"test/fused/written/accuracy", "test/fused/same/accuracy"} <= set(multi)
    assert (
        json.loads((tmp_path / "which" / "summary.json").read_text())["head"] == "ConditionalHead"
    )


def test_condition_out_of_range_is_named(tmp_path):
    result, _ = train(
        tmp_path, "bad", "data.task=which", "model/head=conditional", "model.head.num_conditions=1"
    )
    assert result.returncode != 0
    assert "condition" in result.stderr and "1 head" in result.stderr


def test_stopped_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    epochs = ("trainer.fuse.epochs=3", "data.max_samples=32")
    straight, straight_dir = train(tmp_path, "straight", *epochs)
    stopped, stopped_dir = train(tmp_path, "stopped", *epochs, "trainer.stop_after_epochs=1")
    assert stopped.returncode == 0 and "stopped after epoch 1 of 3" in stopped.stdout
    assert not (stopped_dir / "summary.json").exists()
    resumed, resumed_dir = train(tmp_path, "resumed", *epochs, f"trainer.resume={stopped_dir}")
    for result in (straight, resumed):
        assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((d / "summary.json").read_text()) for d in (straight_dir, resumed_dir)]
    assert summaries[0] == summaries[1]
    assert (resumed_dir / "checkpoints" / "best.pt").is_file()
    bad, _ = train(tmp_path, "bad", "trainer.fuse.epochs=2", f"trainer.resume={stopped_dir}")
    assert bad.returncode == 2 and "trainer.fuse.epochs=3" in bad.stderr


def test_offline_wandb_run_with_confusion_matrix_artifact_and_gradients(tmp_path):
    result, run_dir = train(
        tmp_path,
        "wandb",
        "logger.mode=offline",
        "logger.watch=gradients",
        "logger.log_every_n_steps=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))  # what `wandb sync` uploads
    assert "wandb sync" in result.stdout and "fused test accuracy" in result.stdout
    confusion = json.loads((run_dir / "confusion_test.json").read_text())
    matrix = confusion["matrix"]
    assert confusion["classes"] == [str(d) for d in range(10)]
    assert len(matrix) == 10 and sum(map(sum, matrix)) == 48  # every test sample counted once
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("fuse/train/step_loss" in record for record in steps)


def test_two_value_multirun_then_report(tmp_path):
    sweep = tmp_path / "sweep"
    result, _ = train(
        tmp_path,
        "unused",
        "model/fusion=concat,sum",
        f"hydra.sweep.dir={sweep}",
        "data.max_samples=24",
        "trainer.fuse.epochs=1",
        multirun=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent.name for p in sweep.glob("*/summary.json"))
    assert runs == ["0", "1"]  # one directory and one summary per run
    report = subprocess.run(
        [sys.executable, "-m", "experiments.report", str(sweep)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "| concat |" in report.stdout and "| sum |" in report.stdout
    assert (sweep / "report" / "test-fused-accuracy.md").read_text().strip() == report.stdout.strip()
    assert (sweep / "report" / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
