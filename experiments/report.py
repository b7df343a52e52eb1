"""Aggregate finished runs into a Markdown table.

    python -m experiments.report outputs/multiruns/<sweep>          # one row per configuration
    python -m experiments.report outputs/multiruns/<sweep> --metric test/fused/accuracy
    python -m experiments.report outputs/multiruns/<sweep> --pivot data.task   # a column per task

Every `summary.json` under the given directory is one run; runs are grouped by the values
they were launched with (Hydra's overrides, read from each run's `.hydra/overrides.yaml`),
seeds aside, and each group gets the mean and standard deviation of the metric over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

IGNORED_OVERRIDES = ("seed", "logger.", "paths.", "hydra.")


def load_runs(root: Path) -> list[tuple[dict[str, str], dict]]:
    """(overrides without seeds, summary) for every run under `root`."""
    runs = []
    for summary_path in sorted(root.rglob("summary.json")):
        overrides_path = summary_path.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.is_file() else []
        config = dict(o.split("=", 1) for o in overrides if "=" in o)
        config = {k: v for k, v in config.items() if not k.startswith(IGNORED_OVERRIDES)}
        runs.append((config, json.loads(summary_path.read_text())))
    return runs


def cell(scores: list[float]) -> str:
    """Mean, with the standard deviation over seeds and the run count when there are several."""
    if not scores:
        return "-"
    if len(scores) == 1:
        return f"{scores[0]:.2%}"
    return f"{statistics.mean(scores):.2%} ± {statistics.stdev(scores):.2%} (n={len(scores)})"


def table(runs: list[tuple[dict[str, str], dict]], metric: str, pivot: str | None = None) -> str:
    """One row per configuration; with `pivot`, that override's values become the columns."""
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    keys = sorted({k for config, _ in runs for k in config} - {pivot})
    columns: list[str] = []
    for config, summary in runs:
        if metric not in summary:
            raise KeyError(f"a run has no '{metric}'; it has {sorted(summary)}")
        column = config.get(pivot, "") if pivot else metric
        if column not in columns:
            columns.append(column)
        groups[tuple(config.get(k, "") for k in keys)][column].append(float(summary[metric]))
    headers = [f"{pivot}={c}" for c in columns] if pivot else columns
    lines = [
        "| " + " | ".join([*keys, *headers]) + " |",
        "|" + "---|" * len(keys) + "---:|" * len(columns),
    ]
    for values, by_column in sorted(groups.items()):
        lines.append("| " + " | ".join([*values, *(cell(by_column[c]) for c in columns)]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a sweep or runs directory")
    parser.add_argument("--metric", default="test/fused/accuracy")
    parser.add_argument("--pivot", help="an override whose values become columns, e.g. data.task")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"report: {args.root} is not a directory", file=sys.stderr)
        return 2
    runs = load_runs(args.root)
    if not runs:
        print(f"report: no summary.json under {args.root}", file=sys.stderr)
        return 2
    print(table(runs, args.metric, args.pivot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
