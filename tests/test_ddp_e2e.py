"""End to end under torchrun: two CPU processes with gloo, through the real entry point."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]


def torchrun(tmp_path, *overrides, run_dir=None, stage1=None):
    """Two processes of the entry point on `TINY_RUN` data; `stage1` shares a stage-1 folder."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "experiments.train", "trainer=ddp", f"paths.output_dir={tmp_path}", *TINY_RUN,
        *([f"hydra.run.dir={run_dir}"] if run_dir else []),
        *([f"paths.pretrained_dir={stage1}"] if stage1 else []), *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes share two cores
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_ddp_with_modality_dropout_and_a_conditional_head_shares_one_run_directory(
    stage1_dir, tmp_path
):
    result = torchrun(
        tmp_path, "data.task=which", "model/head=conditional", "model/fusion=lmf",
        "model.modality_dropout={image: 0.5, audio: 0.5}", stage1=stage1_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()  # both processes, one directory
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["head"] == "ConditionalHead" and summary["fuser"] == "LowRankFuser"
    assert result.stdout.count("| fused (LowRankFuser) |") == 1  # printed by rank 0 only
    features = list((tmp_path / "features").rglob("*.npy"))
    assert len(features) == 6  # val, test and train (views) x 2 modalities, encoded once


@pytest.mark.slow
def test_a_stopped_ddp_run_resumes_to_the_uninterrupted_result(tmp_path):
    epochs = ("trainer.fuse.epochs=3", "model.modality_dropout={audio: 0.3}")
    straight = torchrun(tmp_path, *epochs, run_dir=tmp_path / "straight")
    stopped = torchrun(tmp_path, *epochs, "trainer.stop_after_epochs=1", run_dir=tmp_path / "stop")
    assert stopped.returncode == 0 and stopped.stdout.count("stopped after epoch 1 of 3") == 1
    resumed = torchrun(
        tmp_path, *epochs, f"trainer.resume={tmp_path / 'stop'}", run_dir=tmp_path / "resumed"
    )
    for result in (straight, resumed):
        assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("straight", "resumed")]  # fmt: skip
    assert summaries[0] == summaries[1]


@pytest.mark.slow  # 25 s: three DDP launches; DDP training itself is in the default suite
def test_uneven_global_batch_and_missing_strategy_are_named(stage1_dir, tmp_path):
    result = torchrun(tmp_path, "trainer.batch_size=25")
    assert result.returncode != 0
    assert "global batch of 25 cannot be split evenly over 2 processes" in result.stderr
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "experiments.train", f"paths.output_dir={tmp_path}", *TINY_RUN,
    ]  # fmt: skip
    single = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert single.returncode != 0 and "add trainer=ddp" in single.stderr
    alone = subprocess.run(
        [sys.executable, "-m", "experiments.train", "trainer=ddp", *TINY_RUN,
         f"paths.output_dir={tmp_path}", f"paths.pretrained_dir={stage1_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "the launcher started one process: training on one" in alone.stdout
