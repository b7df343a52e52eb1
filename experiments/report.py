"""Aggregate finished runs into a Markdown table, plots and a JSON file.

    python -m experiments.report outputs/multiruns/<sweep>          # one row per configuration
    python -m experiments.report outputs/multiruns/<sweep> --metric test/fused/f1_macro
    python -m experiments.report outputs/multiruns/<sweep> --pivot data.task   # a column per task
    python -m experiments.report outputs/multiruns/<sweep> --plots figures/fusers

Every run directory under the given directory (one with Hydra's `.hydra/overrides.yaml` or a
`summary.json`) is one run; runs are grouped by the values they were launched with, seeds and
settings that do not change the result aside (`NOT_CONFIGURATION`: logging, paths, resuming,
stopping early), and each group gets the mean and standard deviation of the metric over seeds.
Each cell says how many runs it averages (`n=2 of 3` when a launched run has no result) and is
marked `*` when it has fewer than another; runs without a `summary.json` are listed under the
table with what their files tell (stopped early, resumed by another run, crashed or killed).
A file that cannot be read as expected fails naming it, what was expected and what was found.

The table and its notes go to stdout. The plots directory (default `<root>/report`) gets,
named after the metric (`<metric>-by-<pivot>` with `--pivot`): `<metric>.md` (the table),
`<metric>.json` (per configuration: mean, std, n, launched, per-seed values, and the mean
learning curve with how many runs it averages; the incomplete runs) and a bar chart
`<metric>.png`; and `learning_curves.png` (the matching validation metric, such as
`fuse/val/accuracy` or `fuse/val/mae`, per `fuse/epoch`, read from each run's
`metrics.jsonl`). The best mean of each column is bold and the best bar orange: the lowest
for losses and errors, the highest otherwise (`fusion.tasks.lower_is_better`). Their paths go to stderr, so stdout stays the table alone.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from experiments.schema import FAILURE, RUN_MECHANICS
from fusion.tasks import is_fraction as is_fraction_metric
from fusion.tasks import lower_is_better
from fusion.training.checkpoint import load_checkpoint

# Launch settings that do not change what a run computes: runs differing only in these are
# seeds of one configuration (a resumed run is the run it continues).
NOT_CONFIGURATION = ("seed", "hydra", *RUN_MECHANICS)
CURVE_X = "fuse/epoch"
DEFAULT_MAIN = "accuracy"  # the main score of runs whose summary.json names none
LINESTYLES = ("-", "--", ":", "-.")
FUSE_STATE = Path("checkpoints") / "fuse_state.pt"


class ReportError(ValueError):
    """Input the report cannot use; the message says what is wrong and what there is instead."""


@dataclass
class Run:
    """One launched run: where it lives, what it was launched with, its seed and final numbers
    (`summary` is None when it has no summary.json; `status` then says why, as far as known)."""

    dir: Path
    config: dict[str, str]
    seed: str | None
    summary: dict[str, Any] | None
    status: str = ""
    resumed_by: Path | None = None

    @property
    def counts(self) -> bool:
        """Whether the run counts as launched: a stopped run that another continued does not
        (the two are one run)."""
        return self.summary is not None or self.resumed_by is None


def note(message: str) -> None:
    """Tell the user about input the report works around, without mixing it into the table."""
    print(f"report: {message}", file=sys.stderr)


def read_text(path: Path) -> str:
    """A file's text, or a ReportError naming it (unreadable, or not text)."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: expected a readable text file, found {err}") from None


def read_json(path: Path) -> Any:
    """A JSON file's value; corrupt JSON is a ReportError with the path and the position."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: expected JSON, found corrupt JSON ({err})") from None


def read_yaml(path: Path, expected: type, default: Any) -> Any:
    """A YAML file's value of the `expected` type (`default` for an empty or absent file)."""
    if not path.is_file():
        return default
    try:
        value = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = f"{getattr(err, 'problem', None) or type(err).__name__}{where}"
        raise ReportError(f"{path}: expected YAML, found corrupt YAML ({reason})") from None
    if value is None:
        return default
    if not isinstance(value, expected):
        raise ReportError(
            f"{path}: expected a YAML {expected.__name__}, found {type(value).__name__}"
        )
    return value


def read_overrides(path: Path) -> dict[str, str]:
    """Hydra's `overrides.yaml`: a list of `key=value` strings (a `~key` deletion is kept)."""
    overrides = read_yaml(path, list, [])
    launched = {}
    for i, item in enumerate(overrides):
        if not isinstance(item, str):
            raise ReportError(
                f"{path}: expected a list of 'key=value' strings, found "
                f"{type(item).__name__} {item!r} at item {i}"
            )
        key, _, value = item.partition("=")
        launched[key.lstrip("+")] = value if "=" in item else "(deleted)"
    return launched


def read_summary(path: Path) -> dict[str, Any]:
    """A run's `summary.json`: a JSON object of its final numbers."""
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise ReportError(f"{path}: expected a JSON object, found {type(summary).__name__}")
    return summary


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """`metrics.jsonl`, one JSON object a line. Only a last line cut short (no newline at the
    end: the run was killed while writing it) is skipped; anything else corrupt fails."""
    text = read_text(path)
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                note(f"{path}: line {number} was cut short (a killed run); skipped")
                break
            raise ReportError(
                f"{path}: line {number}: expected a JSON object, found corrupt JSON ({err})"
            ) from None
        if not isinstance(record, dict):
            raise ReportError(
                f"{path}: line {number}: expected a JSON object, found {type(record).__name__}"
            )
        records.append(record)
    return records


def number(value: Any, where: str, metric: str | None = None, main: str = DEFAULT_MAIN) -> float:
    """A finite real number from a run's files, or a ReportError saying where and what; for
    a `metric` shown as a percentage, one in its `fraction_range` (93.0 is a percent, which
    averaged with fractions would give nonsense)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ReportError(f"{where}: expected a finite number, found {value!r}")
    span = fraction_range(metric, main) if metric is not None else None
    if span is not None and not span[0] <= value <= span[1]:
        low, high = span
        raise ReportError(f"{where}: expected a fraction in [{low:g}, {high:g}], found {value!r}")
    return float(value)


def is_configuration(key: str) -> bool:
    """Whether a launch setting is part of the configuration (see NOT_CONFIGURATION)."""
    return not any(key == skip or key.startswith(f"{skip}.") for skip in NOT_CONFIGURATION)


def run_seed(overrides: dict[str, str], config: dict[str, Any]) -> str | None:
    """The seed from the command line, else from the composed config (a sweep over one seed)."""
    if "seed" in overrides:
        return overrides["seed"]
    seed = config.get("seed")
    return None if seed is None else str(seed)


def setting(config: dict[str, Any], dotted: str) -> Any:
    """A value of the composed config by dotted key, None when absent."""
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def last_fuse_epoch(run_dir: Path) -> int | None:
    """The last stage-2 epoch a run logged, from its metrics.jsonl (None when it logged none)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    epochs = [r[CURVE_X] for r in read_metrics(path) if isinstance(r.get(CURVE_X), int)]
    return max(epochs, default=None)


def why_incomplete(run_dir: Path, overrides: dict[str, str], config: dict[str, Any]) -> str:
    """Why a run has no summary.json, as far as its files tell: failed (the error the run
    wrote in `FAILURE`: not worth resuming), stopped early on purpose
    (`trainer.stop_after_epochs`, a stage-2 state is left), or crashed, killed or still running
    (in stage 2 when a stage-2 state exists, before that when none does)."""
    failure = run_dir / FAILURE
    if failure.is_file():
        return f"failed: {read_text(failure).strip()}"
    if not (run_dir / FUSE_STATE).is_file():
        return f"crashed, killed or still running before a stage-2 epoch ended (no {FUSE_STATE})"
    finished = finished_epochs(run_dir / FUSE_STATE)
    if finished is not None:
        best = run_dir / "checkpoints" / "best.pt"
        recompute = (
            f"`python -m experiments.evaluate {run_dir}` recomputes its test metrics from "
            f"{best} (into {run_dir / 'eval' / 'eval_test.json'}; it writes no summary.json)"
            if best.is_file()
            else f"{best} is gone too, so nothing can recompute its metrics: train it again"
        )
        return (
            f"finished stage 2 ({finished}; {FUSE_STATE} says so), but its summary.json is "
            f"missing (deleted, or the run died during the final evaluation); {recompute}"
        )
    epoch, epochs = last_fuse_epoch(run_dir), setting(config, "trainer.fuse.epochs")
    progress = f" after stage-2 epoch {epoch}" if epoch is not None else ""
    progress += f" of {epochs}" if epoch is not None and isinstance(epochs, int) else ""
    stop = overrides.get("trainer.stop_after_epochs", setting(config, "trainer.stop_after_epochs"))
    resume = f"; continue with trainer.resume={run_dir}"
    if stop not in (None, "null"):
        return f"stopped early{progress} (trainer.stop_after_epochs={stop}){resume}"
    return f"crashed, killed or still running in stage 2{progress} ({FUSE_STATE} exists){resume}"


def finished_epochs(path: Path) -> str | None:
    """How a stage-2 state says its run finished every epoch ("all 3 epochs", or "stopped
    early after epoch 2" by early stopping), which `trainer.resume` refuses; None when it
    has epochs left or cannot be read."""
    try:
        state = load_checkpoint(path, required=("epoch", "epochs"))
    except (OSError, ValueError):
        return None
    if state.get("stopped_early"):
        return f"stopped early after epoch {state['epoch']}"
    return f"all {state['epoch']} epochs" if state["epoch"] >= state["epochs"] else None


def resumed_dir(value: str) -> Path:
    """The run directory a `trainer.resume` value names (it may name the state file)."""
    path = Path(value).expanduser()
    if path.name == FUSE_STATE.name:
        path = path.parent.parent
    return path.resolve()


def read_run(run_dir: Path) -> tuple[Run, dict[str, str]]:
    """One run directory: the run, and the overrides it was launched with."""
    hydra_dir = run_dir / ".hydra"
    launched = read_overrides(hydra_dir / "overrides.yaml")
    composed = read_yaml(hydra_dir / "config.yaml", dict, {})
    config = {k: v for k, v in launched.items() if is_configuration(k)}
    seed = run_seed(launched, composed)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        return Run(run_dir, config, seed, read_summary(summary_path)), launched
    return Run(run_dir, config, seed, None, why_incomplete(run_dir, launched, composed)), launched


def run_dirs(root: Path) -> list[Path]:
    """Every run directory under `root`: one with a summary.json or with Hydra's overrides."""
    summaries = {p.parent for p in root.rglob("summary.json")}
    launched = {p.parent.parent for p in root.rglob("overrides.yaml") if p.parent.name == ".hydra"}
    return sorted(summaries | launched)


def load_runs(root: Path) -> list[Run]:
    """Every run under `root`, finished or not, with its overrides (seeds and settings that are
    not part of a configuration aside) as its configuration. A stopped run that another run
    under `root` resumed is marked as such: the two are one run."""
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory")
    read = [read_run(d) for d in run_dirs(root)]
    resumed_by = {
        resumed_dir(launched["trainer.resume"]): run.dir
        for run, launched in read
        if launched.get("trainer.resume") not in (None, "", "null")
    }
    runs = [run for run, _ in read]
    for run in runs:
        if run.summary is None and (successor := resumed_by.get(run.dir.resolve())):
            run.status, run.resumed_by = f"stopped early; resumed by {successor}", successor
    runs = without_repeats(runs)
    if not any(run.summary is not None for run in runs):
        listed = "".join(f"\n  {run.dir}: {run.status}" for run in runs)
        raise ReportError(f"no summary.json under {root}" + (f"; runs:{listed}" if runs else ""))
    return runs


def without_repeats(runs: list[Run]) -> list[Run]:
    """The runs, each finished (configuration, seed) once: a run directory copied, or a
    job run twice, would otherwise count as another seed. Each repeat left out is said."""
    first: dict[tuple, Run] = {}
    kept = []
    for run in runs:
        key = (tuple(sorted(run.config.items())), run.seed)
        if run.summary is not None and run.seed is not None:
            if key in first:
                note(
                    f"{run.dir} repeats the configuration and seed of {first[key].dir} (a copy, "
                    "or a job run twice?): counted once"
                )
                continue
            first[key] = run
        kept.append(run)
    return kept


def finished(runs: list[Run]) -> list[Run]:
    """The runs with a summary.json."""
    return [run for run in runs if run.summary is not None]


def check_metric(runs: list[Run], metric: str) -> None:
    """Fail with the metrics a run does have, so a typo or a wrong prefix is easy to fix; a
    value that is not a finite number, or a percentage where a fraction belongs, fails naming
    its summary.json."""
    done = finished(runs)
    lacking = [run for run in done if metric not in run.summary]
    if lacking:
        summary = lacking[0].summary
        have = sorted(k for k, v in summary.items() if isinstance(v, int | float))
        raise ReportError(
            f"{len(lacking)} of {len(done)} runs have no '{metric}' (e.g. {lacking[0].dir}); "
            f"its summary.json has: {', '.join(have)}"
        )
    for run in done:
        where = f"{run.dir / 'summary.json'}: '{metric}'"
        number(run.summary[metric], where, metric, run_main(run))


def run_main(run: Run) -> str:
    """The main score a finished run names in its summary.json (accuracy for older runs)."""
    main = (run.summary or {}).get("metric", DEFAULT_MAIN)
    return main if isinstance(main, str) else DEFAULT_MAIN


def default_metric(runs: list[Run]) -> str:
    """`test/fused/<main score>` of the finished runs; a ReportError when their main scores
    differ (a sweep over tasks of other kinds), which --metric must then choose between."""
    mains = sorted({run_main(run) for run in finished(runs)} or {DEFAULT_MAIN})
    if len(mains) > 1:
        raise ReportError(
            f"the runs score different main metrics {mains} (tasks of other kinds); choose one "
            f"with --metric, e.g. --metric test/fused/{mains[0]}"
        )
    return f"test/fused/{mains[0]}"


def curve_metric(metric: str, runs: list[Run]) -> str:
    """The validation metric per stage-2 epoch that goes with `metric`: `fuse/val/mae` for
    `test/fused/mae`, the runs' main score for a gain or another model's metric."""
    match = re.fullmatch(r"(?:test|val)/fused/(.+)", metric)
    if match and "gain" not in match[1]:
        return f"fuse/val/{match[1]}"
    return f"fuse/val/{shared_main(runs)}"


def shared_main(runs: list[Run]) -> str:
    """The main score every finished run names (accuracy when they differ or none has)."""
    mains = {run_main(run) for run in finished(runs)}
    return mains.pop() if len(mains) == 1 else DEFAULT_MAIN


def check_pivot(runs: list[Run], pivot: str | None) -> None:
    """Fail when no run sets `pivot`, listing the overrides that can be pivoted."""
    if pivot and not any(pivot in run.config for run in runs):
        keys = sorted({k for run in runs for k in run.config})
        raise ReportError(f"no run sets '{pivot}'; the runs set: {', '.join(keys)}")


def config_keys(runs: list[Run]) -> list[str]:
    """Every override any run sets, in a stable order, so configurations line up as rows."""
    return sorted({k for run in runs for k in run.config})


def fraction_range(metric: str, main: str = DEFAULT_MAIN) -> tuple[float, float] | None:
    """The range of a metric shown as a percentage: an accuracy or F1 is a fraction in
    [0, 1], a gain of such a main score (fused minus the best unimodal one) one in [-1, 1];
    None for losses, errors and other values, shown as numbers."""
    if "gain" in metric.rsplit("/", 1)[-1]:
        return (-1.0, 1.0) if is_fraction_metric(main) else None
    return (0.0, 1.0) if is_fraction_metric(metric) else None


def is_fraction(metric: str, main: str = DEFAULT_MAIN) -> bool:
    """Accuracies, F1 and their gains read as percentages; losses and errors as numbers."""
    return fraction_range(metric, main) is not None


def direction(metric: str) -> str:
    """'lower' for losses and errors (torchmetrics' direction), else 'higher'."""
    return "lower" if lower_is_better(metric) else "higher"


def cell(
    scores: list[float],
    launched: int,
    percent: bool = True,
    fewer: bool = False,
    best: bool = False,
) -> str:
    """Mean ± std over seeds and the run count (`n=2 of 3` when a launched run has no result;
    `*` when fewer runs than elsewhere in the table), bold when `best`, or `-` when nothing
    was launched."""
    if not launched:
        return "-"
    fmt = ".2%" if percent else ".4f"
    if not scores:
        value = "-"
    elif len(scores) == 1:
        value = f"{scores[0]:{fmt}}"
    else:
        value = f"{statistics.mean(scores):{fmt}} ± {statistics.stdev(scores):{fmt}}"
    if best:
        value = f"**{value}**"
    count = f"n={len(scores)}" + (f" of {launched}" if launched > len(scores) else "")
    return f"{value} ({count})" + ("*" if fewer else "")


def best_of(means: dict[Any, float], metric: str) -> Any:
    """The key of the best mean: the lowest for losses and errors, else the highest; None
    when there are fewer than two to compare."""
    if len(means) < 2:
        return None
    pick = min if lower_is_better(metric) else max
    return pick(means, key=means.__getitem__)


@dataclass
class Cell:
    """A configuration's results in one column: the finished runs' values, the runs launched."""

    runs: list[Run]
    scores: list[float]
    launched: int = 0


def cells(runs: list[Run], metric: str, keys: list[str], pivot: str | None) -> dict:
    """{configuration values: {column: Cell}}; a run stopped and resumed counts once."""
    grid: dict[tuple[str, ...], dict[str, Cell]] = defaultdict(dict)
    for run in runs:
        column = run.config.get(pivot, "") if pivot else metric
        entry = grid[tuple(run.config.get(k, "") for k in keys)].setdefault(column, Cell([], []))
        entry.launched += run.counts
        if run.summary is not None:
            entry.runs.append(run)
            entry.scores.append(float(run.summary[metric]))
    return {values: grid[values] for values in sorted(grid)}


def most_runs(grid: dict) -> int:
    """The largest number of finished runs in one cell: cells with fewer are marked."""
    return max(len(c.scores) for row in grid.values() for c in row.values())


def incomplete_lines(runs: list[Run]) -> list[str]:
    """Markdown list of the runs without a summary.json, each with what its files tell."""
    lines = []
    for run in runs:
        if run.summary is None:
            launched = ", ".join(f"{k}={v}" for k, v in run.config.items())
            seed = f"seed={run.seed}" if run.seed is not None else "seed unknown"
            lines.append(f"- {run.dir} ({', '.join(filter(None, [launched, seed]))}): {run.status}")
    return lines


def table(
    runs: list[Run],
    metric: str,
    pivot: str | None = None,
    unstarted: Sequence[str] = (),
    main: str = DEFAULT_MAIN,
) -> str:
    """One row per configuration; with `pivot`, that override's values become the columns.
    Every cell says how many runs it averages, and the best mean of each column is bold
    (the lowest for losses and errors); notes under the table list the runs without a
    result, so a crashed or stopped seed is never averaged away without a word."""
    keys = [k for k in config_keys(runs) if k != pivot]
    grid = cells(runs, metric, keys, pivot)
    columns = list(dict.fromkeys(run.config.get(pivot, "") if pivot else metric for run in runs))
    headers = [f"{pivot}={c}" for c in columns] if pivot else columns
    most = most_runs(grid)
    lines = [
        "| " + " | ".join([*keys, *headers]) + " |",
        "|" + "---|" * len(keys) + "---:|" * len(columns),
    ]
    best = {
        column: best_of(
            {v: statistics.mean(r[column].scores) for v, r in grid.items()
             if column in r and r[column].scores},
            metric,
        )
        for column in columns
    }  # fmt: skip
    marked = False
    for values, row in grid.items():
        texts = []
        for column in columns:
            entry = row.get(column, Cell([], []))
            fewer = bool(entry.launched) and len(entry.scores) < most
            marked |= fewer
            percent = is_fraction(metric, main)
            texts.append(cell(entry.scores, entry.launched, percent, fewer, best[column] == values))
        lines.append("| " + " | ".join([*values, *texts]) + " |")
    if any(b is not None for b in best.values()):
        lines += ["", f"Bold: the best mean of its column ({direction(metric)} is better)."]
    if marked:
        lines += ["", f"\\* fewer finished runs than the most in one cell ({most})."]
    if incomplete := incomplete_lines(runs):
        lines += ["", "Runs without a summary.json (not averaged):", "", *incomplete]
    if unstarted:
        lines += ["", "Sweeps with jobs that never started:", "", *(f"- {u}" for u in unstarted)]
    return "\n".join(lines)


def unstarted_jobs(root: Path) -> list[str]:
    """Each sweep under `root` whose `multirun.yaml` plans more jobs than it has folders:
    Hydra stops a multirun at the first job that fails, so the rest were never run."""
    lines = []
    for plan in sorted(root.rglob("multirun.yaml")):
        task = read_yaml(plan, dict, {}).get("hydra", {}).get("overrides", {}).get("task", [])
        try:
            parsed = OverridesParser.create().parse_overrides([str(line) for line in task])
        except OverrideParseException:
            continue
        planned = math.prod(
            len(list(o.sweep_string_iterator())) for o in parsed if o.is_sweep_override()
        )
        started = sum((job / ".hydra").is_dir() for job in plan.parent.iterdir())
        if started < planned:
            lines.append(
                f"{plan.parent}: {planned - started} of {planned} planned jobs never started "
                "(Hydra stops a multirun at the first job that fails)"
            )
    return lines


def read_curve(run_dir: Path, y: str) -> dict[int, float]:
    """Validation metric `y` per stage-2 epoch; a resumed run logs epochs again, the last
    counts."""
    path = run_dir / "metrics.jsonl"
    curve = {}
    for record in read_metrics(path):
        if CURVE_X in record and y in record:
            epoch = number(record[CURVE_X], f"{path}: '{CURVE_X}'")
            curve[int(epoch)] = number(record[y], f"{path}: '{y}'", y)
    return curve


def run_curve(run: Run, y: str) -> dict[int, float]:
    """The run's curve, or none (said on stderr) when it has no metrics.jsonl or no stage 2."""
    if not (run.dir / "metrics.jsonl").is_file():
        note(f"{run.dir} has no metrics.jsonl; no learning curve for it")
        return {}
    curve = read_curve(run.dir, y)
    if not curve:
        note(f"{run.dir}/metrics.jsonl has no '{y}' per '{CURVE_X}'; no learning curve")
    return curve


def mean_curve(curves: list[dict[int, float]]) -> dict[int, float]:
    """Mean over seeds at every epoch some seed reached (over fewer seeds where runs stopped)."""
    epochs = sorted({epoch for curve in curves for epoch in curve})
    return {e: statistics.mean(curve[e] for curve in curves if e in curve) for e in epochs}


def aggregate(
    runs: list[Run], metric: str, curve: str = "fuse/val/accuracy", main: str = DEFAULT_MAIN
) -> dict[str, Any]:
    """The numbers behind the plots, per configuration keyed by the overrides that launch it;
    `n` runs finished of `launched`, every run without a result under `incomplete`, the
    metric's direction and the best configuration by it, and the mean learning curve of
    `curve` (a validation metric per stage-2 epoch)."""
    keys = config_keys(runs)
    grid = cells(runs, metric, keys, None)
    most = most_runs(grid)
    configurations = {}
    for values, row in grid.items():
        entry = row[metric]
        config = {k: v for k, v in zip(keys, values, strict=True) if v}
        curves = [c for c in (run_curve(run, curve) for run in entry.runs) if c]
        scores = entry.scores
        configurations[" ".join(f"{k}={v}" for k, v in config.items())] = {
            "config": config,
            "mean": statistics.mean(scores) if scores else None,
            "std": statistics.stdev(scores) if len(scores) > 1 else None,
            "n": len(scores),
            "launched": entry.launched,
            "fewer_runs": len(scores) < most,
            "runs": [
                {"seed": run.seed, "value": score, "dir": str(run.dir)}
                for run, score in zip(entry.runs, scores, strict=True)
            ],
            "learning_curve": {str(e): acc for e, acc in mean_curve(curves).items()},
            "learning_curve_runs": len(curves),
        }
    incomplete = [
        {"dir": str(run.dir), "config": run.config, "seed": run.seed, "status": run.status}
        for run in runs
        if run.summary is None
    ]
    means = {k: e["mean"] for k, e in configurations.items() if e["mean"] is not None}
    return {
        "metric": metric,
        "lower_is_better": lower_is_better(metric),
        "percent": is_fraction(metric, main),
        "best": best_of(means, metric),
        "curve": curve,
        "keys": keys,
        "configurations": configurations,
        "incomplete": incomplete,
    }


def label(config: dict[str, str], keys: list[str]) -> str:
    """A configuration's values in `keys` order, the key names go on the axis or legend title."""
    return ", ".join(config.get(k, "-") for k in keys) or "(defaults)"


def new_figure(width: float, height: float) -> Figure:
    """A figure on an Agg canvas without pyplot: no display, no global state, nothing kept alive."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def bar_chart(report: dict[str, Any], path: Path) -> None:
    """The metric per configuration, top to bottom in table order, std over seeds as error bars."""
    entries = list(report["configurations"].values())
    figure = new_figure(9, 1.2 + 0.32 * len(entries))
    ax = figure.add_subplot()
    rows = range(len(entries))
    means = [math.nan if e["mean"] is None else e["mean"] for e in entries]
    best = report["configurations"].get(report["best"])
    colors = ["tab:orange" if e is best else "tab:blue" for e in entries]
    ax.barh(rows, means, color=colors, alpha=0.8)
    spread = [(i, e) for i, e in enumerate(entries) if e["std"] is not None]
    if spread:
        ax.errorbar(
            [e["mean"] for _, e in spread],
            [i for i, _ in spread],
            xerr=[e["std"] for _, e in spread],
            fmt="none",
            ecolor="black",
            capsize=3,
        )
    for i, e in enumerate(entries):
        scores = [r["value"] for r in e["runs"]]
        text = cell(scores, e["launched"], report["percent"], e["fewer_runs"], e is best)
        ax.text(1.01, i, text, transform=ax.get_yaxis_transform(), va="center", fontsize=8)
    ax.set_yticks(rows, [label(e["config"], report["keys"]) for e in entries], fontsize=8)
    ax.invert_yaxis()
    ax.set_ylabel(", ".join(report["keys"]))
    ax.set_xlabel(report["metric"])
    if report["percent"]:
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(axis="x", alpha=0.3)
    better = "lower" if report["lower_is_better"] else "higher"
    ax.set_title(f"{report['metric']}: mean ± std over seeds ({better} is better; best in orange)")
    figure.savefig(path, dpi=120)


def curves_chart(report: dict[str, Any], path: Path) -> bool:
    """One mean curve per configuration; False (nothing written) when no run has a curve."""
    entries = [e for e in report["configurations"].values() if e["learning_curve"]]
    if not entries:
        return False
    figure = new_figure(10, 5.5)
    ax = figure.add_subplot()
    for i, e in enumerate(entries):
        epochs = [int(epoch) for epoch in e["learning_curve"]]
        ax.plot(
            epochs,
            list(e["learning_curve"].values()),
            color=f"C{i % 10}",
            linestyle=LINESTYLES[i // 10 % len(LINESTYLES)],
            marker="o",
            markersize=3,
            label=f"{label(e['config'], report['keys'])} (n={e['learning_curve_runs']})",
        )
    ax.legend(
        title=", ".join(report["keys"]),
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=7,
        title_fontsize=8,
        ncols=1 if len(entries) <= 16 else 2,
    )
    ax.set_xlabel(CURVE_X)
    ax.set_ylabel(report["curve"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if is_fraction_metric(report["curve"]):
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.set_title(f"{report['curve']} per stage-2 epoch, mean over seeds")
    figure.savefig(path, dpi=120)
    return True


def slug(metric: str) -> str:
    """A file name for a metric: `test/fused/accuracy` -> `test-fused-accuracy`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", metric).strip("-")


def report_files(out_dir: Path, metric: str, pivot: str | None) -> list[Path]:
    """The table, JSON and bar chart a report writes, named after the metric (and the
    pivot), then the learning curves."""
    name = slug(metric) + (f"-by-{slug(pivot)}" if pivot else "")
    return [out_dir / f"{name}.{ext}" for ext in ("md", "json", "png")] + [
        out_dir / "learning_curves.png"
    ]


def write_report(
    report: dict[str, Any], table_text: str, out_dir: Path, pivot: str | None = None
) -> list[Path]:
    """Write the table, the JSON and the bar chart into `out_dir`, named after the metric
    (and the pivot), so reports over other metrics sit beside them; then the learning
    curves. Returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = report_files(out_dir, report["metric"], pivot)[:3]
    paths[0].write_text(table_text + "\n")
    paths[1].write_text(json.dumps(report, indent=2) + "\n")
    bar_chart(report, paths[2])
    curves_path = out_dir / "learning_curves.png"
    if curves_chart(report, curves_path):
        paths.append(curves_path)
    else:
        note(f"no run has '{report['curve']}' per '{CURVE_X}'; {curves_path.name} not written")
    return paths


def push_to_wandb(report: dict[str, Any], images: list[Path], mode: str, project: str) -> str:
    """Log the aggregated table (and the plots) as a W&B run of its own, `job_type=report`."""
    import wandb

    columns = [*report["keys"], "mean", "std", "n", "launched"]
    rows = [
        [
            *(entry["config"].get(k, "") for k in report["keys"]),
            entry["mean"],
            entry["std"],
            entry["n"],
            entry["launched"],
        ]
        for entry in report["configurations"].values()
    ]
    try:
        run = wandb.init(
            project=project,
            job_type="report",
            mode=mode,
            dir=str(images[0].parent) if images else None,
            config={"metric": report["metric"]},
            settings=wandb.Settings(silent=True),
        )
    except (wandb.errors.UsageError, wandb.errors.CommError) as err:
        raise ReportError(
            f"--wandb {mode}: W&B could not start the run ({str(err).splitlines()[0]}); log in "
            "with `wandb login` (or set WANDB_API_KEY), or use --wandb offline; the table and "
            "plots are written"
        ) from None
    run.log(
        {
            "report/table": wandb.Table(columns=columns, data=rows),
            **{f"report/{p.stem}": wandb.Image(str(p)) for p in images if p.suffix == ".png"},
        }
    )
    where = run.url if mode == "online" else str(Path(run.dir).parent)
    run.finish()
    return where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a sweep or runs directory")
    parser.add_argument(
        "--metric",
        help="a key of the runs' summary.json (default: test/fused/<their main score>, e.g. "
        "test/fused/accuracy or test/fused/mae)",
    )
    parser.add_argument("--pivot", help="an override whose values become columns, e.g. data.task")
    parser.add_argument(
        "--plots",
        type=Path,
        metavar="DIR",
        help="where the table, its JSON and the plots go (default: <root>/report)",
    )
    parser.add_argument(
        "--wandb",
        choices=("online", "offline"),
        help="also log the table and plots as a W&B run (online needs an account)",
    )
    parser.add_argument("--project", default="fusion", help="W&B project for --wandb")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files an earlier report left in --plots DIR (refused without it)",
    )
    args = parser.parse_args(argv)
    if args.plots is not None and args.plots.exists() and not args.plots.is_dir():
        parser.error(f"argument --plots: expected a directory, {args.plots} is a file")
    try:
        runs = load_runs(args.root)
        metric = args.metric or default_metric(runs)
    except ReportError as error:
        note(str(error))
        return 2
    planned = report_files(args.plots, metric, args.pivot) if args.plots else []
    held = [path.name for path in planned if path.exists()]
    if held and not args.overwrite:
        parser.error(
            f"argument --plots: {args.plots} already holds {', '.join(held)}, which this report "
            "would overwrite; nothing was written. Choose another folder, or pass --overwrite "
            "to replace them"
        )
    try:
        if args.plots is not None:
            args.plots.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"argument --plots: cannot create {args.plots}: {err.strerror}")
    try:
        check_metric(runs, metric)
        check_pivot(runs, args.pivot)
        unstarted = unstarted_jobs(args.root)
        main = shared_main(runs)
        table_text = table(runs, metric, args.pivot, unstarted, main)
        curve = curve_metric(metric, runs)
        report = aggregate(runs, metric, curve, main) | {"unstarted": unstarted}
    except ReportError as error:
        note(str(error))
        return 2
    print(table_text)
    paths = write_report(report, table_text, args.plots or args.root / "report", args.pivot)
    print("wrote:", *paths, sep="\n  ", file=sys.stderr)
    if args.wandb:
        try:
            note(f"W&B report run: {push_to_wandb(report, paths, args.wandb, args.project)}")
        except ReportError as error:
            note(str(error))
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
