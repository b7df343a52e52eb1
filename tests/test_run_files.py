"""Every file read from a run directory or a cache fails naming its path, what was expected
and what was found; a damaged cache file is rebuilt with a warning; a full disk while
writing the feature cache is an OSError naming the file and the space needed."""

import errno
import functools
import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from experiments.builders import build_datasets, model_spec, trainer_settings
from experiments.evaluate import main
from experiments.schema import validate
from fusion.data import fingerprint
from fusion.tracking import NullTracker
from fusion.training import feature_cache
from fusion.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fusion.training.feature_cache import FeatureCache, npy_size
from fusion.training.loaders import make_loaders
from fusion.training.recipe import Outputs, Recipe, resume_state
from tests.fusion.test_feature_cache import Pairs, build_model, encoded

FUSE_KEYS = ("epoch", "epochs", "model", "optimizer", "rng")
CORRUPT = "could not be read: it is corrupt or truncated (expected a file written by torch.save"


def damage(path: Path, how: str) -> str:
    """Damage the checkpoint at `path` as `how` says; the message fragment it must cause."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
        return f"{CORRUPT}, found {len(data) // 2} bytes"
    if how == "empty":
        path.write_bytes(b"")
        return f"{CORRUPT}, found 0 bytes"
    if how == "garbage":
        path.write_bytes(b"not a checkpoint")
        return (
            "could not be read: it is not a checkpoint (expected a file written by torch.save, "
            "a zip archive or a pickle; found one that begins with b'not ')"
        )
    if how == "a CSV file":
        path.write_text("label,x\n1,2\n")
        return "could not be read: it is not a checkpoint (expected a file written by torch.save"
    if how == "overwritten header":
        path.write_bytes(data[:200] + b"x" * 50 + data[250:])
        return CORRUPT
    if how == "python objects":
        torch.save({"model": functools.partial(print, "hi")}, path)
        return "expected tensors and plain values only, found the Python object functools.partial"
    if how == "a plain pickle naming code":
        with open(path, "wb") as handle:
            pickle.dump({"model": functools.partial(print, "hi")}, handle)
        return (
            "could not be read: it is a plain pickle (written by pickle.dump, not torch.save) "
            "that names code (functools.partial, builtins.print); it is not loaded"
        )
    if how == "a plain pickle of tensors":
        with open(path, "wb") as handle:
            pickle.dump({"model": torch.ones(1)}, handle)
        return "could not be read: it is a plain pickle (written by pickle.dump), not a torch.save"
    if how == "a list":
        torch.save([torch.ones(1)], path)
        return "expected a dict of entries, found a list"
    if how == "a directory":
        path.unlink()
        path.mkdir()
        return "expected a file, found a directory"
    if how == "lacking entries":
        torch.save({"model": {}}, path)
        return (
            f"lacks {list(FUSE_KEYS[:2] + FUSE_KEYS[3:])}: expected the entries {list(FUSE_KEYS)}"
        )
    raise AssertionError(how)


DAMAGES = [
    "truncated",
    "empty",
    "garbage",
    "a CSV file",
    "overwritten header",
    "python objects",
    "a plain pickle naming code",
    "a plain pickle of tensors",
    "a list",
    "a directory",
    "lacking entries",
]


def a_checkpoint(path: Path) -> Path:
    state = {key: {"w": torch.randn(64, 64)} for key in FUSE_KEYS}
    return save_checkpoint(path, state)


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_checkpoint_is_named_with_what_was_expected_and_found(tmp_path, how):
    path = a_checkpoint(tmp_path / "fuse_state.pt")
    fragment = damage(path, how)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path, required=FUSE_KEYS)
    message = str(caught.value)
    assert message.startswith(f"checkpoint {path}")
    assert fragment in message
    assert "weights_only=False" not in message


@pytest.mark.parametrize("how", ["truncated", "a CSV file", "python objects", "lacking entries"])
def test_resuming_from_a_damaged_stage2_state_names_the_file(tmp_path, how):
    path = a_checkpoint(tmp_path / "checkpoints" / "fuse_state.pt")
    fragment = damage(path, how)
    with pytest.raises(ValueError) as caught:  # ConfigError naming trainer.resume, or the file's
        resume_state(str(tmp_path), epochs=3)
    assert f"checkpoint {path}" in str(caught.value) and fragment in str(caught.value)


def run_copy(run_dir: Path, dest: Path) -> Path:
    """The run's config.yaml and a copy of its small files; checkpoints/best.pt to be made."""
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", dest / "config.yaml")
    return dest


@pytest.mark.parametrize("how", ["truncated", "garbage", "python objects", "a list"])
def test_evaluate_names_a_damaged_best_checkpoint(run_dir, tmp_path, capsys, how):
    run = run_copy(run_dir, tmp_path / "run")
    best = a_checkpoint(run / "checkpoints" / "best.pt")
    fragment = damage(best, how)
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert f"evaluate: checkpoint {best}" in err and fragment in err


def test_evaluate_names_a_best_checkpoint_without_its_config(run_dir, tmp_path, capsys):
    run = run_copy(run_dir, tmp_path / "run")
    best = save_checkpoint(run / "checkpoints" / "best.pt", {"model": {}})
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {best} lacks ['config']: expected the entries ['model', 'config']" in err


CONFIGS = {
    "not YAML": (b"data: [1", "is not valid YAML (while parsing a flow sequence)"),
    "binary": (b"\x00\x01\x02", "is not valid YAML (unacceptable character #x0000"),
    "a list": (b"- data\n- model\n", "expected a mapping of the config groups "),
    "empty": (b"", "expected a mapping of the config groups (data, model, trainer, ...), found "),
    "dangling interpolation": (b"data: ${nowhere}\n", "config key 'data' cannot be resolved"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_evaluate_names_a_config_yaml_it_cannot_use(run_dir, tmp_path, capsys, case):
    run = run_copy(run_dir, tmp_path / "run")
    (run / "checkpoints" / "best.pt").symlink_to(run_dir / "checkpoints" / "best.pt")
    content, fragment = CONFIGS[case]
    (run / "config.yaml").write_bytes(content)
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert f"evaluate: {run / 'config.yaml'}" in err and fragment in err
    if case in ("a list", "empty"):
        assert err.rstrip().endswith("found a list" if case == "a list" else "found nothing")


def test_evaluate_names_a_missing_config_yaml(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert main([str(run)]) == 2
    assert f"{run / 'config.yaml'} not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run_parts(run_dir):
    """The finished tiny run's config, datasets, trainer settings and model spec, built once."""
    cfg = validate(OmegaConf.load(run_dir / "config.yaml"))
    spec = model_spec(cfg.model, cfg.model.encoders)
    return cfg, build_datasets(cfg.data), trainer_settings(cfg), spec


@pytest.mark.parametrize("how", ["truncated", "garbage", "lacking entries"])
def test_a_damaged_stage1_encoder_is_retrained_with_a_warning(
    tiny_run_parts, run_dir, tmp_path, caplog, how
):
    cfg, datasets, trainer, spec = tiny_run_parts
    pretrained = tmp_path / "pretrained"
    shutil.copytree(Path(cfg.paths.pretrained_dir), pretrained)
    # the run's own encoder: other tests add stage-1 encoders of other settings to the folder
    summary = json.loads((run_dir / "summary.json").read_text())
    path = pretrained / Path(summary["checkpoints"]["image"]).name
    good = load_checkpoint(path)
    damage(path, how)
    outputs = Outputs(tmp_path / "run", pretrained, tmp_path / "features")
    recipe = Recipe(datasets, spec, trainer, cfg.seed, outputs, NullTracker(), torch.device("cpu"))
    loaders = make_loaders(datasets, trainer, cfg.seed)
    with caplog.at_level(logging.WARNING, logger="fusion"):
        assert recipe.pretrain("image", loaders).path == path
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"stage 1 [image]: checkpoint {path}" in w and "retraining" in w for w in warnings)
    retrained = load_checkpoint(path, required=("model", "fingerprint"))
    assert retrained["fingerprint"] == good["fingerprint"]


def stage1_recipe(parts, root: Path) -> tuple[Recipe, dict]:
    """A recipe of the tiny run's settings writing its stage-1 encoders under `root`."""
    cfg, datasets, trainer, spec = parts
    outputs = Outputs(root / "run", root / "pretrained", root / "features")
    recipe = Recipe(datasets, spec, trainer, cfg.seed, outputs, NullTracker(), torch.device("cpu"))
    return recipe, make_loaders(datasets, trainer, cfg.seed)


def test_a_stage1_encoder_does_not_depend_on_whether_the_one_before_was_reused(
    tiny_run_parts, tmp_path, caplog
):
    """Each stage-1 model is built from the seed alone: the second modality's encoder is
    the same whether the first was trained just before or read from its checkpoint."""
    fresh, loaders = stage1_recipe(tiny_run_parts, tmp_path / "fresh")
    first, second = fresh.spec.encoders
    trained = {m: fresh.pretrain(m, loaders) for m in (first, second)}
    again, loaders = stage1_recipe(tiny_run_parts, tmp_path / "again")
    (tmp_path / "again" / "pretrained").mkdir(parents=True)
    shutil.copy(trained[first].path, tmp_path / "again" / "pretrained")
    with caplog.at_level(logging.INFO, logger="fusion"):
        reused = again.pretrain(first, loaders)
    assert f"stage 1 [{first}]: reusing {reused.path}" in caplog.text
    retrained = again.pretrain(second, loaders)
    assert retrained.path.name == trained[second].path.name
    assert retrained.weights == trained[second].weights
    stored = load_checkpoint(retrained.path)
    assert stored["weights"] == fingerprint(stored["model"])  # the digest is of what it holds


def feature_files(root: Path) -> dict[str, Path]:
    return {
        "labels": next(root.rglob("labels.pt")),
        "features": next(root.rglob("a-*-float32.npy")),
        "mask": next(root.rglob("a-*-mask.pt")),
    }


@pytest.mark.parametrize(
    ("kind", "content", "fragment"),
    [
        ("labels", b"not a checkpoint", "is not a checkpoint"),
        ("mask", b"", "is corrupt or truncated"),
        ("features", b"\x93NUMPY garbage", "is corrupt or truncated"),
        ("features", "wrong shape", "expected features of shape [30, 8] and dtype float32, found [30, 2]"),
        ("mask", "wrong shape", "expected a mask of shape [30], found [3]"),
    ],
)  # fmt: skip
def test_a_damaged_feature_cache_file_is_rebuilt_with_a_warning(
    tmp_path, caplog, kind, content, fragment
):
    cache, model = FeatureCache(tmp_path), build_model()
    first = encoded(cache, model, Pairs(30))
    expected = first.__getitems__([0, 4])
    del first
    path = feature_files(tmp_path)[kind]
    if content != "wrong shape":
        path.write_bytes(content)
    elif kind == "features":
        np.save(path, np.zeros((30, 2), dtype=np.float32))
    else:
        torch.save({"mask": torch.ones(3, dtype=torch.bool)}, path)
    with caplog.at_level(logging.WARNING, logger="fusion"):
        again = encoded(cache, model, Pairs(30)).__getitems__([0, 4])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and fragment in warnings[0]
    assert warnings[0].endswith("; rebuilding it")
    assert torch.equal(again.inputs["a"], expected.inputs["a"])
    assert torch.equal(again.targets, expected.targets)


def test_too_little_free_space_for_the_feature_cache_is_named_before_writing(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1000))
    with pytest.raises(OSError) as caught:
        encoded(FeatureCache(tmp_path), build_model(), Pairs(30))
    needed = 2 * npy_size((30, 8), np.dtype(np.float32))
    assert caught.value.errno == errno.ENOSPC
    message = str(caught.value)
    assert f"needs {needed} bytes of free space, 1000 are free" in message
    assert "a-" in message and "b-" in message and "-float32.npy" in message
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_disk_filling_up_while_writing_features_is_an_oserror_naming_the_file(
    tmp_path, monkeypatch
):
    class FullDisk:
        """A file on a disk that fills up after the first write (the header)."""

        def __init__(self, path, *args, **kwargs):
            self.file, self.writes = open(path, *args, **kwargs), 0  # noqa: SIM115

        def write(self, data):
            self.writes += 1
            if self.writes > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *_):
            self.file.close()

    monkeypatch.setattr(feature_cache, "open", FullDisk, raising=False)
    with pytest.raises(OSError) as caught:
        encoded(FeatureCache(tmp_path), build_model(), Pairs(30))
    assert caught.value.errno == errno.ENOSPC
    message = str(caught.value)
    assert "feature cache: writing " in message and "-float32.npy failed (No space left" in message
    assert "more bytes at least" in message and "are free on its disk" in message
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
