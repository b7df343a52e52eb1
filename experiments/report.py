"""Aggregate finished runs into a Markdown table, plots and a JSON file.

    python -m experiments.report outputs/multiruns/<sweep>          # one row per configuration
    python -m experiments.report outputs/multiruns/<sweep> --metric test/fused/accuracy
    python -m experiments.report outputs/multiruns/<sweep> --pivot data.task   # a column per task
    python -m experiments.report outputs/multiruns/<sweep> --plots figures/fusers

Every `summary.json` under the given directory is one run; runs are grouped by the values
they were launched with (Hydra's overrides, read from each run's `.hydra/overrides.yaml`),
seeds aside, and each group gets the mean and standard deviation of the metric over seeds.

The table goes to stdout. The plots directory (default `<root>/report`) gets `table.md`,
`report.json` (per configuration: mean, std, n, per-seed values, and the mean learning curve
with how many runs it averages), a bar chart `<metric>.png` and `learning_curves.png`
(`fuse/val/accuracy` per `fuse/epoch`, read from each run's `metrics.jsonl`). Their paths go
to stderr, so stdout stays the table alone.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

IGNORED_OVERRIDES = ("seed", "logger.", "paths.", "hydra.")
CURVE_X, CURVE_Y = "fuse/epoch", "fuse/val/accuracy"
LINESTYLES = ("-", "--", ":", "-.")


class ReportError(ValueError):
    """Input the report cannot use; the message says what is wrong and what there is instead."""


@dataclass
class Run:
    """One finished run: where it lives, what it was launched with, its seed and final numbers."""

    dir: Path
    config: dict[str, str]
    seed: str | None
    summary: dict[str, Any]


def note(message: str) -> None:
    """Tell the user about input the report works around, without mixing it into the table."""
    print(f"report: {message}", file=sys.stderr)


def run_seed(overrides: dict[str, str], hydra_dir: Path) -> str | None:
    """The seed from the command line, else from the composed config (a sweep over one seed)."""
    if "seed" in overrides:
        return overrides["seed"]
    config_path = hydra_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    seed = config.get("seed") if isinstance(config, dict) else None
    return None if seed is None else str(seed)


def load_runs(root: Path) -> list[Run]:
    """Every run under `root`, with its overrides (seeds aside) as its configuration."""
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory")
    runs = []
    for summary_path in sorted(root.rglob("summary.json")):
        hydra_dir = summary_path.parent / ".hydra"
        overrides_path = hydra_dir / "overrides.yaml"
        overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.is_file() else []
        launched = dict(o.split("=", 1) for o in overrides if "=" in o)
        config = {k: v for k, v in launched.items() if not k.startswith(IGNORED_OVERRIDES)}
        summary = json.loads(summary_path.read_text())
        runs.append(Run(summary_path.parent, config, run_seed(launched, hydra_dir), summary))
    if not runs:
        raise ReportError(f"no summary.json under {root}")
    return runs


def check_metric(runs: list[Run], metric: str) -> None:
    """Fail with the metrics a run does have, so a typo or a wrong prefix is easy to fix."""
    lacking = [run for run in runs if metric not in run.summary]
    if lacking:
        summary = lacking[0].summary
        have = sorted(k for k, v in summary.items() if isinstance(v, int | float))
        raise ReportError(
            f"{len(lacking)} of {len(runs)} runs have no '{metric}' (e.g. {lacking[0].dir}); "
            f"its summary.json has: {', '.join(have)}"
        )


def check_pivot(runs: list[Run], pivot: str | None) -> None:
    """Fail when no run sets `pivot`, listing the overrides that can be pivoted."""
    if pivot and not any(pivot in run.config for run in runs):
        keys = sorted({k for run in runs for k in run.config})
        raise ReportError(f"no run sets '{pivot}'; the runs set: {', '.join(keys)}")


def config_keys(runs: list[Run]) -> list[str]:
    """Every override any run sets, in a stable order, so configurations line up as rows."""
    return sorted({k for run in runs for k in run.config})


def is_fraction(metric: str) -> bool:
    """Accuracies and gains read as percentages; losses and other values as numbers."""
    return "accuracy" in metric or "gain" in metric


def cell(scores: list[float], percent: bool = True) -> str:
    """Mean, with the standard deviation over seeds and the run count when there are several."""
    if not scores:
        return "-"
    fmt = ".2%" if percent else ".4f"
    if len(scores) == 1:
        return f"{scores[0]:{fmt}}"
    mean, std = statistics.mean(scores), statistics.stdev(scores)
    return f"{mean:{fmt}} ± {std:{fmt}} (n={len(scores)})"


def table(runs: list[Run], metric: str, pivot: str | None = None) -> str:
    """One row per configuration; with `pivot`, that override's values become the columns."""
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    keys = [k for k in config_keys(runs) if k != pivot]
    columns: list[str] = []
    for run in runs:
        column = run.config.get(pivot, "") if pivot else metric
        if column not in columns:
            columns.append(column)
        groups[tuple(run.config.get(k, "") for k in keys)][column].append(
            float(run.summary[metric])
        )
    headers = [f"{pivot}={c}" for c in columns] if pivot else columns
    lines = [
        "| " + " | ".join([*keys, *headers]) + " |",
        "|" + "---|" * len(keys) + "---:|" * len(columns),
    ]
    for values, by_column in sorted(groups.items()):
        cells = [cell(by_column[c], is_fraction(metric)) for c in columns]
        lines.append("| " + " | ".join([*values, *cells]) + " |")
    return "\n".join(lines)


def read_curve(run_dir: Path) -> dict[int, float]:
    """Validation accuracy per stage-2 epoch; a resumed run logs epochs again, the last counts."""
    curve = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a killed run can leave its last line cut
        if CURVE_X in record and CURVE_Y in record:
            curve[int(record[CURVE_X])] = float(record[CURVE_Y])
    return curve


def run_curve(run: Run) -> dict[int, float]:
    """The run's curve, or none (said on stderr) when it has no metrics.jsonl or no stage 2."""
    if not (run.dir / "metrics.jsonl").is_file():
        note(f"{run.dir} has no metrics.jsonl; no learning curve for it")
        return {}
    curve = read_curve(run.dir)
    if not curve:
        note(f"{run.dir}/metrics.jsonl has no '{CURVE_Y}' per '{CURVE_X}'; no learning curve")
    return curve


def mean_curve(curves: list[dict[int, float]]) -> dict[int, float]:
    """Mean over seeds at every epoch some seed reached (over fewer seeds where runs stopped)."""
    epochs = sorted({epoch for curve in curves for epoch in curve})
    return {e: statistics.mean(curve[e] for curve in curves if e in curve) for e in epochs}


def aggregate(runs: list[Run], metric: str) -> dict[str, Any]:
    """The numbers behind the plots, per configuration keyed by the overrides that launch it."""
    keys = config_keys(runs)
    groups: dict[tuple[str, ...], list[Run]] = defaultdict(list)
    for run in runs:
        groups[tuple(run.config.get(k, "") for k in keys)].append(run)
    configurations = {}
    for values, members in sorted(groups.items()):
        config = {k: v for k, v in zip(keys, values, strict=True) if v}
        scores = [float(run.summary[metric]) for run in members]
        curves = [c for c in map(run_curve, members) if c]
        configurations[" ".join(f"{k}={v}" for k, v in config.items())] = {
            "config": config,
            "mean": statistics.mean(scores),
            "std": statistics.stdev(scores) if len(scores) > 1 else None,
            "n": len(scores),
            "runs": [
                {"seed": run.seed, "value": score, "dir": str(run.dir)}
                for run, score in zip(members, scores, strict=True)
            ],
            "learning_curve": {str(e): acc for e, acc in mean_curve(curves).items()},
            "learning_curve_runs": len(curves),
        }
    return {"metric": metric, "keys": keys, "configurations": configurations}


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
    ax.barh(rows, [e["mean"] for e in entries], color="tab:blue", alpha=0.8)
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
        text = cell([r["value"] for r in e["runs"]], is_fraction(report["metric"]))
        ax.text(1.01, i, text, transform=ax.get_yaxis_transform(), va="center", fontsize=8)
    ax.set_yticks(rows, [label(e["config"], report["keys"]) for e in entries], fontsize=8)
    ax.invert_yaxis()
    ax.set_ylabel(", ".join(report["keys"]))
    ax.set_xlabel(report["metric"])
    if is_fraction(report["metric"]):
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"{report['metric']}: mean ± std over seeds")
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
    ax.set_ylabel(CURVE_Y)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.set_title("validation accuracy per stage-2 epoch, mean over seeds")
    figure.savefig(path, dpi=120)
    return True


def slug(metric: str) -> str:
    """A file name for a metric: `test/fused/accuracy` -> `test-fused-accuracy`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", metric).strip("-")


def write_report(report: dict[str, Any], table_text: str, out_dir: Path) -> list[Path]:
    """Write the table, the JSON and the plots into `out_dir`; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        out_dir / "table.md",
        out_dir / "report.json",
        out_dir / f"{slug(report['metric'])}.png",
    ]
    paths[0].write_text(table_text + "\n")
    paths[1].write_text(json.dumps(report, indent=2) + "\n")
    bar_chart(report, paths[2])
    curves_path = out_dir / "learning_curves.png"
    if curves_chart(report, curves_path):
        paths.append(curves_path)
    else:
        note(f"no run has '{CURVE_Y}' per '{CURVE_X}'; {curves_path.name} not written")
    return paths


def push_to_wandb(report: dict[str, Any], images: list[Path], mode: str, project: str) -> str:
    """Log the aggregated table (and the plots) as a W&B run of its own, `job_type=report`."""
    import wandb

    columns = [*report["keys"], "mean", "std", "n"]
    rows = [
        [
            *(entry["config"].get(k, "") for k in report["keys"]),
            entry["mean"],
            entry["std"],
            entry["n"],
        ]
        for entry in report["configurations"].values()
    ]
    run = wandb.init(
        project=project,
        job_type="report",
        mode=mode,
        dir=str(images[0].parent) if images else None,
        config={"metric": report["metric"]},
        settings=wandb.Settings(silent=True),
    )
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
    parser.add_argument("--metric", default="test/fused/accuracy")
    parser.add_argument("--pivot", help="an override whose values become columns, e.g. data.task")
    parser.add_argument(
        "--plots",
        type=Path,
        metavar="DIR",
        help="where plots, table.md and report.json go (default: <root>/report)",
    )
    parser.add_argument(
        "--wandb",
        choices=("online", "offline"),
        help="also log the table and plots as a W&B run (online needs an account)",
    )
    parser.add_argument("--project", default="fusion", help="W&B project for --wandb")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.root)
        check_metric(runs, args.metric)
        check_pivot(runs, args.pivot)
    except ReportError as error:
        note(str(error))
        return 2
    table_text = table(runs, args.metric, args.pivot)
    print(table_text)
    report = aggregate(runs, args.metric)
    paths = write_report(report, table_text, args.plots or args.root / "report")
    print("wrote:", *paths, sep="\n  ", file=sys.stderr)
    if args.wandb:
        note(f"W&B report run: {push_to_wandb(report, paths, args.wandb, args.project)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
