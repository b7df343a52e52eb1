"""Hydra's submitit launchers drive the real entry point: SLURM settings compose, local jobs run."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.test_train_e2e import train

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the `slurm` extra")
submitit = pytest.importorskip("submitit")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PLUGIN = "hydra_plugins.hydra_submitit_launcher.submitit_launcher"


def load(*overrides):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_defaults_follow_the_gpus():
    launcher = load("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4").hydra.launcher
    assert launcher._target_ == f"{PLUGIN}.SlurmLauncher"
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (1, 4, 4)
    assert launcher.partition is None and launcher.mem_gb is None and launcher.cpus_per_task == 8


def test_slurm_launcher_overrides_reach_the_sbatch_script(tmp_path, monkeypatch):
    cfg = load(
        "hydra/launcher=slurm",
        f"hydra.sweep.dir={tmp_path}",
        "hydra.launcher.nodes=2",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.timeout_min=90",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.mem_gb=64",
    )
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 2)
    assert (launcher.timeout_min, launcher.partition) == (90, "gpu")
    assert launcher.submitit_folder == f"{tmp_path}/.submitit/%j"

    # Run the plugin's own launch() up to the submission, on a machine without SLURM: pretend
    # srun exists and capture the executor instead of calling sbatch.
    executors = []
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    monkeypatch.setattr(
        submitit.AutoExecutor, "map_array", lambda self, *args: executors.append(self) or []
    )
    plugin = instantiate(launcher)
    plugin.config = cfg
    assert plugin.launch([["model/fusion=concat"], ["model/fusion=gated"]], 0) == []
    (executor,) = executors
    sbatch = executor._executor._make_submission_file_text("python -m experiments.train", "uid")
    for line in (
        "--nodes=2",
        "--gpus-per-node=4",
        "--ntasks-per-node=2",
        "--time=90",
        "--partition=gpu",
        "--mem=64GB",
        "--cpus-per-task=8",
    ):
        assert f"#SBATCH {line}\n" in sbatch


@pytest.mark.parametrize("name", ["submitit_slurm", "submitit_local"])
def test_plugin_launchers_are_selectable(name):
    launcher = load(f"hydra/launcher={name}").hydra.launcher
    expected = "SlurmLauncher" if name == "submitit_slurm" else "LocalLauncher"
    assert launcher._target_ == f"{PLUGIN}.{expected}"
    assert launcher.tasks_per_node == 1


@pytest.mark.slow  # 22-56 s on 2 shared CPU cores: three processes start torch, stage 1 runs twice
def test_two_jobs_through_the_submitit_local_launcher(stage1_dir, tmp_path):
    result, _ = train(
        tmp_path,
        "unused",
        "hydra/launcher=submitit_local",
        "model/fusion=concat,sum",
        stage1=stage1_dir,
        multirun=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Jobs run in processes of their own, yet share the sweep directory that the launching
    # process named (its `${run_id:}` value travels with the pickled config).
    (sweep,) = (tmp_path / "multiruns").iterdir()
    fusers = []
    for job in ("0", "1"):
        fusers.append(json.loads((sweep / job / "summary.json").read_text())["fuser"])
    assert fusers == ["ConcatFuser", "SumFuser"]
    # each job's stdout lands in submitit's folder inside the sweep, not in the launcher's
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2 and all("fused test accuracy" in p.read_text() for p in logs)


@pytest.mark.slow  # 24 s; DDP through the plain launcher is in the default suite
def test_ddp_job_with_two_tasks_through_the_submitit_local_launcher(stage1_dir, tmp_path):
    """What a SLURM job with two tasks per node does: both tasks run the entry point, take
    their ranks from submitit's environment, train together and share the job directory."""
    result, _ = train(
        tmp_path, "unused", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
        "trainer=ddp", stage1=stage1_dir, multirun=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "multiruns").iterdir()
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["fuser"] == "GatedFuser"
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2  # one per task ...
    assert ["fused test accuracy" in p.read_text() for p in logs] == [True, False]  # rank 0 reports
    everything = "".join(p.read_text() for p in logs[0].parent.glob("*_log.*"))
    assert "global_rank=1(2)" in everything
