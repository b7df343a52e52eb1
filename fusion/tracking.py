"""Experiment tracking: W&B when wanted, and always the run directory.

Every metric goes to `metrics.jsonl` and the final numbers to `summary.json` in the run
directory, so results can be aggregated without W&B or an account. W&B runs `offline` by
default (sync later with `wandb sync`), `online` when asked, or `disabled`. The W&B run's
id is kept in the run directory (`wandb_id.txt`), so that a resumed run continues it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fusion.training.settings import ConfigError

WANDB_MODES = ("online", "offline", "disabled")
WANDB_ID_FILE = "wandb_id.txt"
WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
MAX_TAG = 64  # W&B refuses longer tags, and the run with them

log = logging.getLogger("fusion")


def wandb_tags(tags: Sequence[str]) -> list[str]:
    """`tags` as W&B takes them (1 to 64 characters, else the run fails at start-up): a
    longer one is cut and an empty one dropped, each with a warning."""
    out = []
    for tag in map(str, tags):
        if not tag:
            log.warning("W&B tag '' dropped: W&B tags need 1 to %d characters", MAX_TAG)
            continue
        if len(tag) > MAX_TAG:
            log.warning(
                "W&B tag '%s' has %d characters, cut to W&B's %d: '%s'",
                tag, len(tag), MAX_TAG, tag[:MAX_TAG],
            )  # fmt: skip
        out.append(tag[:MAX_TAG])
    return out


def file_artifact(path: Path, name: str, kind: str, references: Sequence[Path] = ()) -> Any:
    """A W&B artifact of one file that W&B neither copies into its staging folder nor into
    its cache (`policy="immutable"`, `skip_cache`): it is read from `path` when uploaded,
    live or at `wandb sync`, so nothing is left behind per run. The file must not change
    until then; the run directory's checkpoints do not.

    `references` are files the artifact names without uploading them (`file://` references,
    not read: `checksum=False`), such as the stage-1 checkpoints a `best.pt` is built on."""
    import wandb

    artifact = wandb.Artifact(name, type=kind)
    artifact.add_file(str(path), policy="immutable", skip_cache=True)
    for reference in references:
        artifact.add_reference(Path(reference).resolve().as_uri(), checksum=False)
    return artifact


def resumed_wandb_id(run_dir: Path) -> str | None:
    """The W&B run id stored in a run directory being resumed; None (said in a warning)
    when it has none, e.g. W&B was disabled there. The file is data: only an id is taken."""
    path = Path(run_dir) / WANDB_ID_FILE
    if not path.is_file():
        log.warning("%s does not exist: the resumed run starts a new W&B run", path)
        return None
    found = path.read_text().strip()
    if not WANDB_ID.fullmatch(found):
        raise ValueError(
            f"{path}: expected a W&B run id (1 to 128 letters, digits, '_' or '-'), "
            f"found {found[:80]!r}"
        )
    return found


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Tracker:
    """Logs metrics and a final summary to the run directory and, unless disabled, to W&B."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        mode: str = "offline",
        project: str = "fusion",
        name: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        resume_from: str | Path | None = None,
    ) -> None:
        """`resume_from`: the directory of the run being resumed, whose W&B run (if it had
        one) this one continues instead of starting another."""
        if mode not in WANDB_MODES:
            raise ValueError(f"logger.mode must be one of {WANDB_MODES}, got '{mode}'")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self._summary: dict[str, Any] = {}
        self._wandb_run = None
        self.wandb_dir: Path | None = None
        self.mode = mode
        if mode != "disabled":
            import wandb

            run_id = resumed_wandb_id(Path(resume_from)) if resume_from is not None else None
            try:
                self._wandb_run = wandb.init(
                    mode=mode,
                    project=project,
                    name=name,
                    group=group,
                    tags=wandb_tags(tags),
                    config=dict(config or {}),
                    dir=str(self.run_dir),
                    reinit="finish_previous",
                    id=run_id,
                    resume="allow" if run_id else None,
                    settings=wandb.Settings(silent=True),
                )
            except (wandb.errors.UsageError, wandb.errors.CommError) as err:
                reason = str(err).splitlines()[0]
                raise ConfigError(
                    f"config key 'logger.mode': W&B could not start the {mode} run ({reason}); "
                    "log in with `wandb login` (or set WANDB_API_KEY), or log offline with "
                    "logger.mode=offline and `wandb sync` the run later"
                ) from None
            self.wandb_dir = Path(self._wandb_run.dir).parent
            (self.run_dir / WANDB_ID_FILE).write_text(self._wandb_run.id + "\n")
            if run_id:
                log.info("W&B: continuing run %s of %s", run_id, resume_from)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        record = {k: _jsonable(v) for k, v in metrics.items()}
        if step is not None:
            record["step"] = step
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(dict(metrics), step=step)

    def log_text(self, name: str, text: str) -> Path:
        """Save `text` as `<name>.txt` in the run directory, and in the W&B run's files
        folder, which W&B uploads with the run (a copy: a text file is small, and
        `wandb.save` would link it, saying so in a warning every time)."""
        path = self.run_dir / f"{name}.txt"
        path.write_text(text + "\n")
        if self._wandb_run is not None:
            (Path(self._wandb_run.dir) / path.name).write_text(text + "\n")
        return path

    def log_confusion_matrix(
        self,
        name: str,
        targets: Sequence[int],
        predictions: Sequence[int],
        class_names: Sequence[str],
    ) -> Path:
        """Save the confusion matrix (rows: true class, columns: predicted, both in the order
        of `class_names`) as JSON, and to W&B."""
        size = len(class_names)
        matrix = [[0] * size for _ in range(size)]
        for t, p in zip(targets, predictions, strict=True):
            matrix[int(t)][int(p)] += 1
        path = self.run_dir / f"{name.replace('/', '_')}.json"
        payload = {
            "rows": "true class",
            "columns": "predicted",
            "classes": list(class_names),
            "matrix": matrix,
        }
        path.write_text(json.dumps(payload))
        if self._wandb_run is not None:
            import wandb

            plot = wandb.plot.confusion_matrix(
                y_true=[int(t) for t in targets],
                preds=[int(p) for p in predictions],
                class_names=list(class_names),
            )
            self._wandb_run.log({name: plot})
        return path

    def log_artifact(
        self, path: Path, name: str, kind: str = "model", references: Sequence[Path] = ()
    ) -> None:
        """Attach a file (the best checkpoint) to the W&B run as a versioned artifact, with
        the files it needs (`references`: its stage-1 checkpoints) named by path."""
        if self._wandb_run is not None:
            self._wandb_run.log_artifact(file_artifact(path, name, kind, references))

    def watch(self, model: Any, log: str | None, log_freq: int = 100) -> None:
        """W&B gradient (and parameter) histograms: `log` is "gradients", "parameters", "all"."""
        if self._wandb_run is not None and log is not None:
            self._wandb_run.watch(model, log=log, log_freq=log_freq)

    def update_summary(self, metrics: Mapping[str, Any]) -> None:
        """Merge `metrics` into `summary.json` (rewritten whole each time) and the W&B summary."""
        self._summary.update({k: _jsonable(v) for k, v in metrics.items()})
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self._summary, indent=2) + "\n")
        tmp.replace(self.summary_path)
        if self._wandb_run is not None:
            self._wandb_run.summary.update(dict(metrics))

    def finish(self, exit_code: int = 0) -> str | None:
        """Close the W&B run (marked failed with a non-zero `exit_code`); return a line
        telling the user where it went, if anywhere."""
        if self._wandb_run is None:
            return None
        url = self._wandb_run.url if self.mode == "online" else None
        self._wandb_run.finish(exit_code=exit_code)
        self._wandb_run = None
        if url is None:
            return f"W&B offline run saved; upload it with: wandb sync {self.wandb_dir}"
        return f"W&B run: {url}"


class NullTracker:
    """The tracker of every process but rank 0 in distributed training: it records nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
