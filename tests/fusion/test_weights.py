import pytest
import torch
from torch import nn

from fusion.training import load_checkpoint, save_checkpoint
from fusion.weights import load_weights


def test_load_with_prefix_reports_what_loaded():
    source = nn.Sequential(nn.Linear(3, 4))
    target = nn.Sequential(nn.Linear(3, 4))
    state = {f"encoders.x.{k}": v for k, v in source.state_dict().items()}
    report = load_weights(target, state, prefix="encoders.x.")
    assert sorted(report.loaded) == ["0.bias", "0.weight"] and report.complete
    assert torch.equal(target[0].weight, source[0].weight)


def test_incomplete_load_fails_loudly():
    target = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"missing \['0.bias'\]"):
        load_weights(target, {"0.weight": torch.zeros(4, 3)})
    with pytest.raises(ValueError, match=r"checkpoint \(4, 2\) vs model \(4, 3\)"):
        load_weights(target, {"0.weight": torch.zeros(4, 2), "0.bias": torch.zeros(4)})


def test_checkpoint_round_trip_and_errors(tmp_path):
    path = save_checkpoint(tmp_path / "a" / "ckpt.pt", {"model": {"w": torch.ones(2)}, "epoch": 3})
    assert load_checkpoint(path, required=("model",))["epoch"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temporary file left
    with pytest.raises(ValueError, match=r"lacks \['optimizer'\]"):
        load_checkpoint(path, required=("optimizer",))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(tmp_path / "corrupt.pt")


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"v": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"v": Unpicklable()})
    assert load_checkpoint(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
