"""End to end: the real entry point, composed by Hydra, on a tiny subset.

Tests that are not about stage 1 reuse the stage-1 encoders of the session's tiny run
(`stage1_dir`), so each pays for its own stage 2 only."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.report import main as report_main
from fusion.training.checkpoint import load_checkpoint
from tests.conftest import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]


def train(tmp_path, name, *overrides, stage1=None, output_dir=None, multirun=False):
    """Run the entry point on `TINY_RUN` data into `tmp_path/name`; `stage1` shares a
    stage-1 folder, `output_dir` every cache (default: `tmp_path`'s own)."""
    run_dir = tmp_path / name
    shared = [f"paths.pretrained_dir={stage1}"] if stage1 else []
    cmd = [
        sys.executable, "-m", "experiments.train", *(["--multirun"] if multirun else []),
        f"paths.output_dir={output_dir or tmp_path}", f"hydra.run.dir={run_dir}", *TINY_RUN,
        *shared, *overrides,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return result, run_dir


def summary_of(run_dir: Path) -> dict:
    """A run's summary.json without its checkpoint paths (which name the run directory)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("checkpoints")
    return summary


def test_main_job_end_to_end_and_checkpoint_reuse(run_dir, tmp_path):
    outputs = run_dir.parent
    first = (outputs / "stdout.txt").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"test/image_only/accuracy", "test/audio_only/accuracy"} <= set(summary)
    assert summary["fuser"] == "GatedFuser"
    assert "| fused (GatedFuser) |" in first
    printed = re.search(rf"run directory: {run_dir}  \|  fused test accuracy: ([\d.]+)%", first)
    assert float(printed[1]) == pytest.approx(100 * summary["test/fused/accuracy"], abs=0.005)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()
    checkpoints = sorted((outputs / "pretrained").glob("*.pt"))
    assert {p.name.split("-")[0] for p in checkpoints} == {"audio", "image"}

    # another fuser reuses the stage-1 encoders, since nothing that shaped them changed
    second, second_dir = train(tmp_path, "second", "model/fusion=concat", output_dir=outputs)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("reusing") == 2
    # ... and the frozen encoders' features: each split was encoded once, by the first run
    assert first.count("feature cache: encoding") == 5  # val, test per modality; train
    assert "feature cache: encoding" not in second.stdout
    assert summary_of(second_dir)["fuser"] == "ConcatFuser"
    assert sorted((outputs / "pretrained").glob("*.pt")) == checkpoints


def test_a_run_says_where_its_time_went(run_dir):
    timings = json.loads((run_dir / "timings.json").read_text())
    assert list(timings["seconds"]) == [
        "data", "checks", "tracker", "alignment", "stage 1", "stage 1 evaluation",
        "stage 2 setup", "stage 2 epochs", "checkpoint", "stage 2 evaluation",
    ]  # fmt: skip
    assert timings["total"] == pytest.approx(sum(timings["seconds"].values()))
    assert "seconds" not in json.loads((run_dir / "summary.json").read_text())


def test_same_seed_same_metrics(run_dir, tmp_path):
    """A second run from scratch (its own stage 1) gives the session run's every metric."""
    result, again = train(tmp_path, "again")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reusing" not in result.stdout
    assert summary_of(again) == summary_of(run_dir)


@pytest.mark.slow  # in-process: tests/fusion/test_feature_cache.py (cached training equals uncached)
def test_feature_cache_gives_the_uncached_result(stage1_dir, tmp_path):
    def summary(name, *overrides):
        result, run_dir = train(tmp_path, name, "model/fusion=lmf", *overrides, stage1=stage1_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout, summary_of(run_dir)

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
    assert summary_of(run_dir)["fuser"] == "GatedFuser"
    assert list((tmp_path / "features").rglob("*-float16.npy"))


def test_fp16_on_cpu_is_named(tmp_path):
    """Refused where the recipe is built, after the in-process checks `test_bad_inputs` runs."""
    result, _ = train(tmp_path, "fp16", "trainer.precision=fp16", "trainer.device=cpu")
    assert result.returncode == 2
    assert "config key 'trainer.precision': precision 'fp16' needs a CUDA device" in result.stderr


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
    assert not (tmp_path / "pretrained").exists()


def test_a_nonfinite_run_stops_with_one_line_kept_in_its_directory(tmp_path):
    two_steps = ("data.max_samples=48", "trainer.batch_size=24")  # the 2nd step's loss is nan
    result, run_dir = train(tmp_path, "nan", "trainer.pretrain.lr=1e20", *two_steps)
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
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["encoders"] == {}  # thawed: best.pt keeps the encoders' trained weights
    assert {k.split(".")[1] for k in best["model"] if k.startswith("encoders.")} == {
        "image", "audio", "text"
    }  # fmt: skip


@pytest.mark.slow
def test_every_fuser_trains_through_the_entry_point(stage1_dir, tmp_path):
    fusions = sorted(p.stem for p in (ROOT / "configs" / "model" / "fusion").glob("*.yaml"))
    result, _ = train(
        tmp_path,
        "unused",
        f"model/fusion={','.join(fusions)}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        stage1=stage1_dir,
        multirun=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fusers = {
        json.loads(p.read_text())["fuser"] for p in (tmp_path / "sweep").glob("*/summary.json")
    }
    assert len(fusers) == len(fusions)


def test_tasks_with_branching_and_conditional_heads(stage1_dir, tmp_path):
    runs = {
        "which": ("data.task=which", "model/head=conditional", "model/fusion=lmf",
                  "model.modality_dropout={image: 0.3, audio: 0.3}"),
        "multi": ("data.task=multitask", "model/head=multitask", "model/fusion=transformer",
                  "model.head.loss_weights={same: 2.0}"),
        "same": ("data.task=same", "model/fusion=late", "model.fusion.combine=probs"),
    }  # fmt: skip
    summaries = {}
    for name, overrides in runs.items():
        result, run_dir = train(tmp_path, name, *overrides, stage1=stage1_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        summaries[name] = summary_of(run_dir)
    assert {"test/fused/written/accuracy", "test/fused/same/accuracy"} <= set(summaries["multi"])
    assert "test/fused/written/accuracy" not in summaries["which"]
    assert [summaries[name]["head"] for name in runs] == [
        "ConditionalHead",
        "MultiTaskHead",
        "PassThroughHead",  # late fusion: each modality's own head predicts
    ]


def epochs_of(run_dir: Path, prefix: str = "fuse/") -> list[dict]:
    """The run's per-epoch metrics of one stage, from metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if f"{prefix}epoch" in m]


def test_regression_multilabel_and_mixed_tasks_train_with_their_losses_and_metrics(
    stage1_dir, tmp_path
):
    sum_run, sum_dir = train(
        tmp_path, "sum", "data.task=sum", "+tasks.sum.loss=huber", "+tasks.sum.huber_delta=2.0",
        "trainer.fuse.epochs=3", stage1=stage1_dir,
    )  # fmt: skip
    assert sum_run.returncode == 0, sum_run.stderr[-3000:]
    summary = summary_of(sum_dir)
    assert summary["metric"] == "mae" and summary["tasks"] == ["sum"]
    assert {"test/fused/mae", "test/fused/rmse", "test/fused/pearson"} <= set(summary)
    assert "test/fused/accuracy" not in summary and "test/image_only/accuracy" in summary
    assert f"fused test mae: {summary['test/fused/mae']:.4f}" in sum_run.stdout
    assert "| fused (GatedFuser) | sum | mae |" in sum_run.stdout  # rows differ: a metric column
    epochs = epochs_of(sum_dir)
    best = min(epochs, key=lambda m: m["fuse/val/mae"])  # lower is better: the kept epoch
    assert summary["val/fused/mae"] == pytest.approx(best["fuse/val/mae"], rel=1e-5)

    mixed, mixed_dir = train(
        tmp_path, "mixed", "data.task=mixed", "model/head=multitask",
        "+tasks.digits.pos_weight=4.0", "+tasks.written.label_smoothing=0.1",
        "trainer.fuse.monitor=val/sum/mae", stage1=stage1_dir,
    )  # fmt: skip
    assert mixed.returncode == 0, mixed.stderr[-3000:]
    summary = summary_of(mixed_dir)
    assert summary["metric"] == "loss"
    assert {"test/fused/written/f1_macro", "test/fused/sum/mae", "test/fused/digits/map",
            "test/fused/digits/f1_micro"} <= set(summary)  # fmt: skip
    assert "test/fused/accuracy" not in summary  # no mean of an accuracy and an error


def test_aligned_encoders_are_probed_then_fused_with_their_retrieval_in_the_summary(tmp_path):
    result, run_dir = train(
        tmp_path, "aligned", "trainer.align={pairs: [[image, audio]], epochs: 2}",
        "trainer.pretrain.epochs=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(run_dir)
    for split in ("val", "test"):
        for direction in ("image_to_audio", "audio_to_image"):
            assert f"{split}/align/{direction}/R@1" in summary
    assert "test/image_only/accuracy" in summary and "test/fused/accuracy" in summary
    aligned = load_checkpoint(next((tmp_path / "pretrained").glob("align-*.pt")))["model"]
    probe = load_checkpoint(next((tmp_path / "pretrained").glob("image-*.pt")))["model"]
    encoder = {k: v for k, v in aligned.items() if k.startswith("encoders.image.")}
    assert encoder and all(torch.equal(probe[k], v) for k, v in encoder.items())  # frozen
    epochs = epochs_of(run_dir, "align/")
    assert [m["align/epoch"] for m in epochs] == [1, 2]


def test_condition_out_of_range_is_named(stage1_dir, tmp_path):
    result, _ = train(
        tmp_path,
        "bad",
        "data.task=which",
        "model/head=conditional",
        "model.head.num_conditions=1",
        stage1=stage1_dir,
    )
    assert result.returncode != 0
    assert "condition" in result.stderr and "1 head" in result.stderr


@pytest.mark.slow  # in-process: tests/fusion/test_training.py (resumed fit ends where one does)
def test_stopped_and_resumed_run_matches_an_uninterrupted_one(stage1_dir, tmp_path):
    def run(name, *overrides):
        return train(tmp_path, name, "trainer.fuse.epochs=3", *overrides, stage1=stage1_dir)

    straight, straight_dir = run("straight")
    stopped, stopped_dir = run("stopped", "trainer.stop_after_epochs=1")
    assert stopped.returncode == 0 and "stopped after epoch 1 of 3" in stopped.stdout
    assert not (stopped_dir / "summary.json").exists()
    resumed, resumed_dir = run("resumed", f"trainer.resume={stopped_dir}")
    for result in (straight, resumed):
        assert result.returncode == 0, result.stderr[-3000:]
    assert summary_of(straight_dir) == summary_of(resumed_dir)
    assert (resumed_dir / "checkpoints" / "best.pt").is_file()
    bad, _ = train(
        tmp_path, "bad", "trainer.fuse.epochs=2", f"trainer.resume={stopped_dir}", stage1=stage1_dir
    )
    assert bad.returncode == 2 and "trainer.fuse.epochs=3" in bad.stderr


def test_early_stopping_accumulation_and_clipping_through_the_entry_point(stage1_dir, tmp_path):
    controls = (
        "trainer.fuse.epochs=6", "trainer.fuse.accumulate=2",
        "trainer.fuse.clip_grad_norm=1.0", "trainer.fuse.monitor=val/loss",
        "trainer.fuse.early_stopping={patience: 1, min_delta: 100.0}",  # no loss drops by 100
    )  # fmt: skip
    result, run_dir = train(tmp_path, "stop", *controls, stage1=stage1_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "stage 'fuse': stopping early after epoch 2 of 6: val/loss has not improved by more "
        "than 100 since epoch 1 (patience 1); keeping epoch"
    ) in result.stdout
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["fuse/epoch"] for r in epochs if "fuse/epoch" in r) == 2
    again, _ = train(tmp_path, "again", *controls, f"trainer.resume={run_dir}", stage1=stage1_dir)
    assert again.returncode == 2 and "stopped early after epoch 2" in again.stderr


def test_offline_wandb_run_with_confusion_matrix_artifact_and_gradients(stage1_dir, tmp_path):
    result, run_dir = train(
        tmp_path,
        "wandb",
        "logger.mode=offline",
        "logger.watch=gradients",
        "logger.log_every_n_steps=1",
        stage1=stage1_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))  # what `wandb sync` uploads
    assert (offline[0] / "files" / "model_summary.txt").is_file()  # uploaded with the run
    assert "Symlinked" not in result.stderr  # no warning about how it got there
    assert "wandb sync" in result.stdout and "fused test accuracy" in result.stdout
    confusion = json.loads((run_dir / "confusion_test.json").read_text())
    matrix = confusion["matrix"]
    assert confusion["classes"] == [str(d) for d in range(10)]
    assert len(matrix) == 10 and sum(map(sum, matrix)) == 16  # every test sample counted once
    correct = sum(matrix[i][i] for i in range(10)) / 16
    assert correct == pytest.approx(summary_of(run_dir)["test/fused/accuracy"])
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("fuse/train/step_loss" in record for record in steps)


def test_two_value_multirun_then_report(stage1_dir, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    result, _ = train(
        tmp_path,
        "unused",
        "model/fusion=concat,sum",
        f"hydra.sweep.dir={sweep}",
        stage1=stage1_dir,
        multirun=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent.name for p in sweep.glob("*/summary.json"))
    assert runs == ["0", "1"]  # one directory and one summary per run
    assert report_main([str(sweep)]) == 0
    table = capsys.readouterr().out
    assert "| concat |" in table and "| sum |" in table
    assert (sweep / "report" / "test-fused-accuracy.md").read_text() == table
    assert (sweep / "report" / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
