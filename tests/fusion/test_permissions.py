"""Atomically written files honour the umask, and the temporaries of killed writers are
removed by the next writer into their folder, never those of live writers."""

import logging
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion.training.checkpoint import (
    atomic_path,
    remove_stale_temporaries,
    save_checkpoint,
    temporary_name,
    temporary_writer,
)
from fusion.training.feature_cache import FeatureCache
from tests.fusion.test_feature_cache import Pairs, build_model, encoded

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def umask(request):
    """Run the test under the umask it is parametrized with, then restore the old one."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_checkpoint(folder: Path) -> list[Path]:
    return [save_checkpoint(folder / "best.pt", {"model": {"w": torch.ones(2)}})]


def write_stage1_encoder(folder: Path) -> list[Path]:
    """As the recipe saves a stage-1 encoder: a nested folder created on the way."""
    path = folder / "pretrained" / "image-0123.pt"
    return [save_checkpoint(path, {"model": {}, "fingerprint": "0123", "best": {}})]


def write_feature_cache(folder: Path) -> list[Path]:
    encoded(FeatureCache(folder), build_model(), Pairs(20))
    return [p for p in folder.rglob("*") if p.is_file()]


def write_with_atomic_path(folder: Path) -> list[Path]:
    with atomic_path(folder / "summary.json") as tmp:
        tmp.write_text("{}")
    return [folder / "summary.json"]


WRITERS = [write_checkpoint, write_stage1_encoder, write_feature_cache, write_with_atomic_path]


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077], indirect=True)
@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__)
def test_atomically_written_files_honour_the_umask(tmp_path, umask, writer):
    written = writer(tmp_path)
    assert len(written) >= 1
    assert {p.name: oct(mode(p)) for p in written} == {p.name: oct(0o666 & ~umask) for p in written}
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temporary left


def test_a_finished_runs_files_honour_the_sessions_umask(run_dir):
    umask = os.umask(0)
    os.umask(umask)
    files = [run_dir / "checkpoints" / "best.pt", run_dir / "checkpoints" / "fuse_state.pt"]
    files += [p for p in (run_dir.parent / "pretrained").iterdir()]
    files += [p for p in (run_dir.parent / "features").rglob("*") if p.is_file()]
    assert len(files) > 6
    assert {str(p): oct(mode(p)) for p in files} == {str(p): oct(0o666 & ~umask) for p in files}


def dead_pid() -> int:
    """The id of a process that has just ended (not yet reused: pids cycle slowly)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(done.stdout)


@pytest.mark.parametrize(
    ("name", "writer"),
    [
        (".best.pt.0a1b2c3d.123@node-1.tmp", (123, "node-1")),
        (".image-ab.pt.0a1b2c3d.7@gpu01.cluster.example.org.tmp", (7, "gpu01.cluster.example.org")),
        (".we@ird.name.0a1b2c3d.42@host.tmp", (42, "host")),
        (".best.pt.abc123.tmp", None),  # tempfile.mkstemp's, whose writer is unknown
        ("best.pt", None),
        (".best.pt.0a1b2c3d.x@host.tmp", None),
    ],
)
def test_a_temporarys_name_says_its_writer(name, writer):
    assert temporary_writer(name) == writer


def test_own_temporary_names_round_trip():
    name = temporary_name("best.pt")
    assert name.startswith(".best.pt.") and name.endswith(".tmp")
    assert temporary_writer(name) == (os.getpid(), socket.gethostname())


def test_the_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path, caplog):
    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = tmp_path / temporary_name("best.pt", pid=dead_pid())
        alive = {
            "this process": tmp_path / temporary_name("best.pt"),
            "another live process": tmp_path / temporary_name("labels.pt", pid=sleeper.pid),
            "another host": tmp_path / temporary_name("best.pt", pid=dead_pid(), host="elsewhere"),
            "not ours": tmp_path / ".best.pt.abc123.tmp",
        }
        for path in [dead, *alive.values()]:
            path.write_bytes(b"x" * 1000)
        with caplog.at_level(logging.WARNING, logger="fusion"):
            save_checkpoint(tmp_path / "best.pt", {"v": 1})
        assert not dead.exists()
        assert {k: p.exists() for k, p in alive.items()} == dict.fromkeys(alive, True)
        assert [r.getMessage() for r in caplog.records] == [
            f"removed {dead} (1000 bytes), left by process {temporary_writer(dead.name)[0]}, "
            "which was killed while writing it"
        ]
        assert host in dead.name
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_killed_writers_temporary_is_removed_by_the_next_writer(tmp_path):
    script = (
        "import os, sys\n"
        "from fusion.training.checkpoint import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half a checkpoint')\n"
        "    os._exit(9)  # killed mid-write: no cleanup runs\n"
    )
    target = tmp_path / "best.pt"
    killed = subprocess.run([sys.executable, "-c", script, str(target)], cwd=ROOT, check=False)
    assert killed.returncode == 9
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and temporary_writer(left[0].name) is not None
    assert remove_stale_temporaries(tmp_path) == left
    assert list(tmp_path.iterdir()) == []
