"""Compare the robustness of a sweep's configurations: relative and effective robustness.

    python -m experiments.compare_robustness outputs/multiruns/<sweep> --reference late
    python -m experiments.compare_robustness outputs/multiruns/<sweep> --pivot data.task

Reads `eval/robustness_<split>.json` (`--split`, default test) of every finished run under
the directory (written by `python -m experiments.evaluate <run> --robustness`) and groups the runs into configurations
as `experiments.report` does (their overrides, seeds aside). For each seed, the
configurations' curves are compared with `fusion.analysis.robustness.compare_robustness`:
effective robustness against the configuration named by `--reference` (MultiBench: late
fusion), or, without one, against the least-squares line of relative robustness on clean
score over the configurations (Taori et al. 2020; 3 configurations or more). Each
configuration then gets, per modality and perturbation, the mean and standard deviation over
seeds of its clean score, relative robustness, normalized relative robustness (1 the most
robust configuration of that seed, 0 the least) and effective robustness. With `--pivot`,
configurations are compared within each value of that override (each task on its own).

Configurations are named by the overrides that differ between the runs (`late`, or
`late, 0.3` for two), the table's header names those overrides, and `--reference` takes a
name as shown or `key=value` settings (`model/fusion=late`).

The table goes to stdout; `robustness[-by-<pivot>].md` and `.json` go to `<dir>/report`
(rewritten each time), or to `--out DIR`, where files an earlier comparison left are kept
unless `--overwrite`. A finished run without the report is named; seeds missing a
configuration are left out of the comparison and said.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from experiments.report import (
    ReportError,
    Run,
    check_pivot,
    config_keys,
    finished,
    label,
    load_runs,
    read_json,
    slug,
)
from fusion.analysis.robustness import compare_robustness, difference
from fusion.tasks import format_score


def note(message: str) -> None:
    """Tell the user about input the comparison works around, apart from the table."""
    print(f"compare_robustness: {message}", file=sys.stderr)


def varying_keys(runs: list[Run], pivot: str | None) -> list[str]:
    """The overrides that name a configuration: those whose value differs between runs
    (a setting every run shares says nothing about which is which), the pivot aside."""
    keys = [key for key in config_keys(runs) if key != pivot]
    return [key for key in keys if len({run.config.get(key, "-") for run in runs}) > 1]


def reference_label(reference: str, keys: list[str], names: set[str]) -> str:
    """The configuration `reference` names: a label as the table shows it (`late`), or
    `key=value` settings joined by commas (`model/fusion=late`); a ReportError listing the
    configurations when it names none."""
    if reference in names:
        return reference
    settings = dict(part.split("=", 1) for part in reference.split(",") if "=" in part)
    if settings and set(settings) <= set(keys):
        wanted = label(settings, keys)
        matches = [
            name
            for name in names
            if all(
                value == settings[key]
                for key, value in zip(keys, name.split(", "), strict=True)
                if key in settings
            )
        ]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ReportError(
                f"--reference {reference} matches {len(matches)} configurations "
                f"({', '.join(sorted(matches))}); give every setting of one ({wanted})"
            )
    raise ReportError(
        f"--reference {reference} is none of the configurations: "
        + "; ".join(sorted(names))
        + f" (named by {', '.join(keys) or 'no setting'}; give one as shown, or as "
        "key=value, e.g. model/fusion=late)"
    )


REPORT_KEYS = ("metric", "split", "lower_is_better", "clean", "modalities")
FIELDS = (
    "clean",
    "relative_robustness",
    "relative_robustness_normalized",
    "effective_robustness",
)


def report_path(split: str) -> Path:
    """Where `experiments.evaluate --robustness` writes a run's report on `split`."""
    return Path("eval") / f"robustness_{split}.json"


def reports_by_group(
    runs: list[Run], pivot: str | None, split: str = "test"
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """{pivot value: {seed: {configuration label: robustness report}}} of the finished runs;
    a ReportError naming the runs that have no report on `split`."""
    done = finished(runs)
    path = report_path(split)
    lacking = [run.dir for run in done if not (run.dir / path).is_file()]
    if lacking:
        listed = "".join(f"\n  {path}" for path in lacking[:10])
        more = f"\n  and {len(lacking) - 10} more" if len(lacking) > 10 else ""
        raise ReportError(
            f"{len(lacking)} of {len(done)} finished runs have no {path}; run "
            f"`python -m experiments.evaluate <run> --robustness --split {split}` on each:"
            f"{listed}{more}"
        )
    keys = varying_keys(done, pivot)
    groups: dict[str, dict[str, dict[str, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for run in done:
        group = run.config.get(pivot, "-") if pivot else ""
        groups[group][run.seed or "-"][label(run.config, keys)] = read_report(run.dir / path)
    return groups


def read_report(path: Path) -> dict[str, Any]:
    """A robustness report as `experiments.evaluate --robustness` writes it; a ReportError
    naming the file and what it lacks otherwise."""
    report = read_json(path)
    missing = [k for k in REPORT_KEYS if not isinstance(report, dict) or k not in report]
    if missing:
        raise ReportError(
            f"{path}: expected a robustness report of experiments.evaluate --robustness, "
            f"found one without {', '.join(missing)}"
        )
    return report


def complete_seeds(
    by_seed: dict[str, dict[str, dict[str, Any]]], group: str
) -> dict[str, dict[str, dict[str, Any]]]:
    """The seeds every configuration has; the others are said and left out."""
    names = sorted({name for reports in by_seed.values() for name in reports})
    kept = {}
    for seed, reports in sorted(by_seed.items()):
        missing = [name for name in names if name not in reports]
        if missing:
            where = f" ({group})" if group else ""
            note(f"seed {seed}{where} has no run of {', '.join(missing)}: left out")
        else:
            kept[seed] = reports
    if not kept:
        raise ReportError(
            f"no seed{f' of {group}' if group else ''} has a run of every configuration "
            f"({', '.join(names)}), so none can be compared"
        )
    return kept


def summarize(values: list[float | None]) -> dict[str, Any]:
    """Mean, standard deviation (0 for one value) and count of the values that are numbers."""
    numbers = [v for v in values if v is not None]
    if not numbers:
        return {"mean": None, "std": None, "n": 0, "values": values}
    std = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
    return {"mean": statistics.fmean(numbers), "std": std, "n": len(numbers), "values": values}


def compare_group(
    by_seed: dict[str, dict[str, dict[str, Any]]], reference: str | None
) -> dict[str, Any]:
    """Compare the configurations seed by seed, then summarize each over the seeds."""
    per_seed = {}
    for seed, reports in by_seed.items():
        if len(reports) < 2:
            raise ReportError(
                f"seed {seed}: comparing robustness takes 2 configurations or more, got "
                f"{len(reports)} ({', '.join(reports)})"
            )
        try:
            per_seed[seed] = compare_robustness(reports, reference)
        except ValueError as error:
            message = str(error).replace("3 runs or more", "3 configurations or more")
            raise ReportError(f"seed {seed}: {message}") from None
    first = next(iter(per_seed.values()))
    runs: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for name, by_modality in first["runs"].items():
        for m, by_perturbation in by_modality.items():
            for p in by_perturbation:
                found = [r["runs"][name].get(m, {}).get(p) for r in per_seed.values()]
                if None in found:
                    continue  # a curve some seed's reports do not all have
                runs.setdefault(name, {}).setdefault(m, {})[p] = {
                    field: summarize([entry[field] for entry in found]) for field in FIELDS
                }
    return {
        "metric": first["metric"],
        "split": first["split"],
        "lower_is_better": first["lower_is_better"],
        "reference": reference,
        "seeds": list(per_seed),
        "runs": runs,
    }


def mean_std(metric: str, summary: dict[str, Any], signed: bool = False) -> str:
    """`mean ± std` in the metric's units (points for signed differences of fractions); the
    value alone for one seed, which has no spread."""
    if summary["mean"] is None:
        return "-"
    if summary["n"] == 1:
        return (
            difference(metric, summary["mean"]) if signed else format_score(metric, summary["mean"])
        )
    if signed:
        return f"{difference(metric, summary['mean'])} ± {difference(metric, summary['std'])[1:]}"
    return f"{format_score(metric, summary['mean'])} ± {format_score(metric, summary['std'])}"


def normalized_cell(summary: dict[str, Any], seeds: int) -> str:
    """Normalized relative robustness over the seeds where the configurations' areas differ
    (equal areas have none), with how many those are when not all."""
    if summary["mean"] is None:
        return "-"
    if summary["n"] == 1:
        return f"{summary['mean']:.2f}" + (" (n=1)" if seeds > 1 else "")
    count = f" (n={summary['n']})" if summary["n"] < seeds else ""
    return f"{summary['mean']:.2f} ± {summary['std']:.2f}{count}"


def group_table(result: dict[str, Any], keys: list[str], pivot: str | None, group: str) -> str:
    """One row per configuration (named by the values of `keys`), modality and
    perturbation."""
    metric = result["metric"]
    against = (
        f"configuration '{result['reference']}'"
        if result["reference"]
        else "the line of relative robustness on clean score over the configurations"
    )
    title = f"**{pivot}={group}**\n\n" if pivot else ""
    lines = [
        f"| {', '.join(keys) or 'configuration'} | modality/perturbation | clean | "
        "relative robustness | normalized | effective |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, by_modality in sorted(result["runs"].items()):
        for m, by_perturbation in by_modality.items():
            for p, s in by_perturbation.items():
                normalized = s["relative_robustness_normalized"]
                lines.append(
                    f"| {name} | {m}/{p} | {mean_std(metric, s['clean'])} | "
                    f"{mean_std(metric, s['relative_robustness'])} | "
                    + f"{normalized_cell(normalized, len(result['seeds']))} | "
                    + f"{mean_std(metric, s['effective_robustness'], signed=True)} |"
                )
    direction = "lower" if result["lower_is_better"] else "higher"
    seeds = result["seeds"]
    over = f"mean ± std over seeds {', '.join(seeds)}" if len(seeds) > 1 else f"seed {seeds[0]}"
    lines.append(
        f"\n{metric} on {result['split']} ({direction} is better), {over}; effective robustness against {against}, positive: "
        "more robust than expected"
    )
    return title + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a sweep or runs directory")
    parser.add_argument(
        "--reference",
        help="the configuration effective robustness is measured against, as the table's "
        "first column names it (e.g. late) or as key=value (model/fusion=late); default: the "
        "least-squares line over them",
    )
    parser.add_argument("--pivot", help="compare within each value of this override")
    parser.add_argument(
        "--split", default="test", help="the split the runs were evaluated on (default: test)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where the table and JSON go (default: <root>/report, rewritten each time)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace files an earlier one left in --out DIR"
    )
    args = parser.parse_args(argv)
    out = args.out or args.root / "report"
    name = "robustness" + (f"-by-{slug(args.pivot)}" if args.pivot else "")
    paths = [out / f"{name}.md", out / f"{name}.json"]
    held = [path.name for path in paths if path.exists()]
    if args.out is not None and held and not args.overwrite:  # the sweep's own is rewritten
        parser.error(
            f"argument --out: {out} already holds {', '.join(held)}; nothing was written. "
            "Choose another folder, or pass --overwrite to replace them"
        )
    try:
        runs = load_runs(args.root)
        check_pivot(runs, args.pivot)
        results, tables = {}, []
        keys = varying_keys(finished(runs), args.pivot)
        for group, by_seed in sorted(reports_by_group(runs, args.pivot, args.split).items()):
            names = {n for reports in by_seed.values() for n in reports}
            reference = args.reference
            if reference is not None:
                reference = reference_label(reference, keys, names)
            results[group] = compare_group(complete_seeds(by_seed, group), reference)
            tables.append(group_table(results[group], keys, args.pivot, group))
    except ReportError as error:
        note(str(error))
        return 2
    text = "\n\n".join(tables)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    paths[0].write_text(text + "\n")
    paths[1].write_text(json.dumps(results if args.pivot else results[""], indent=2) + "\n")
    print("wrote:", *paths, sep="\n  ", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
