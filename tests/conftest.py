import os

# Under pytest-xdist (`make test`), every worker process gets one OpenMP thread, so workers
# and the processes tests start share the cores without spinning on each other; set before
# torch loads OpenMP. A value in the environment wins.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def avdigits_val():
    from data.avdigits import AVDigits

    return AVDigits("val", max_samples=40)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, and a download that fails at once like an offline machine's.

    Returns `$TORCH_HOME/hub/checkpoints`, where torchvision and torchaudio look for weights.
    """
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"  # nobody called set_dir

    def offline(url, *args, **kwargs):
        raise URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


TINY_RUN = [
    "logger.mode=disabled",
    "data.max_samples=16",
    "trainer.batch_size=16",
    "trainer.pretrain.epochs=1",
    "trainer.fuse.epochs=1",
]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """One finished tiny run of the real entry point (its stage-1 encoders and feature cache
    under the run's parent folder), shared by every test that reads a run directory."""
    root = tmp_path_factory.mktemp("tiny_run")
    run = root / "run"
    cmd = [
        sys.executable, "-m", "experiments.train",
        f"paths.output_dir={root}", f"hydra.run.dir={run}", *TINY_RUN,
    ]  # fmt: skip
    root_dir = Path(__file__).resolve().parents[1]
    result = subprocess.run(cmd, cwd=root_dir, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "stdout.txt").write_text(result.stdout)
    return run


@pytest.fixture(scope="session")
def stage1_dir(run_dir) -> Path:
    """The stage-1 encoders `run_dir` trained on the `TINY_RUN` data: end-to-end tests that
    are not about stage 1 pass it as `paths.pretrained_dir` and reuse them."""
    return run_dir.parent / "pretrained"
