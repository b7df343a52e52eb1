"""The README's own-data reader example runs as written: the class, its config, the command."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- the test suite runs this block: tests/test_readme.py -->"


def readme_block(after: str, language: str) -> str:
    text = (ROOT / "README.md").read_text()
    tail = text[text.index(after) :]
    return re.search(rf"```{language}\n(.*?)```", tail, re.DOTALL).group(1)


def test_the_readers_example_trains_through_the_entry_point(tmp_path):
    (tmp_path / "sensors.py").write_text(readme_block(MARKER, "python"))
    configs = tmp_path / "my_configs" / "data"
    configs.mkdir(parents=True)
    (configs / "sensors.yaml").write_text(readme_block(MARKER, "yaml"))
    command = readme_block(MARKER, "bash").strip()
    assert (
        command == "PYTHONPATH=. python -m experiments.train --config-dir my_configs data=sensors"
    )
    tiny = [
        "logger.mode=disabled", f"paths.output_dir={tmp_path / 'outputs'}",
        f"hydra.run.dir={tmp_path / 'run'}", "trainer.batch_size=10",
        "trainer.pretrain.epochs=1", "trainer.fuse.epochs=1",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config-dir", "my_configs", "data=sensors",
         *tiny],
        cwd=tmp_path, env={"PYTHONPATH": ".", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| accel only | activity |" in result.stdout
    assert "| meta only | activity |" in result.stdout
    assert "| fused (GatedFuser) | activity |" in result.stdout


def test_the_surgery_example_runs_as_written():
    block = readme_block(
        "<!-- the test suite runs this block: tests/test_readme.py (surgery)", "python"
    )
    namespace: dict = {}
    exec(compile(block, "README.md (surgery)", "exec"), namespace)
    assert type(namespace["model"].classifier[2]).__name__ == "Identity"
    lrs = sorted(g["lr"] for g in namespace["groups"])
    assert lrs[-1] == 1e-3 and lrs[0] < 1e-4  # new layers at lr, backbone at 0.1 x layer decay
