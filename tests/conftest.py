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
