"""How a trained model holds up without a modality or with a perturbed one (after MultiBench).

Each modality in turn is dropped (its `present` mask cleared) and, separately, perturbed at
each level, one perturbation at a time:

- "noise": Gaussian noise with std = level x that input's std on the split, for every kind
  but text. Only continuous values are noised: text is not a tensor, and a table's
  categorical codes are left alone (noise on a code is not a perturbation of the category);
  only its numeric columns get noise. Any level >= 0.
- the perturbations of the modality's kind (`fusion.analysis.perturbations`: occlusion, blur,
  contrast, salt and pepper for images; noise at an SNR, time shift, clipping for audio;
  typos and word dropout for text; column dropout for tables), at the levels in [0, 1].

Every perturbation draws from a generator seeded with the run's seed, the same draw for
every level, so the curves differ only by the level (and level 0 is the clean score).

Summaries (MultiBench, Liang et al. 2021; `eval_scripts/robustness.py` in
pliang279/MultiBench):

- relative robustness: the area under the score-against-level curve. MultiBench sums
  trapezoids over its levels 0, 0.1, 0.2, ... (steps of 0.1), then min-max normalizes the
  areas over the models it compares (negated first for an error). One run has no others to
  normalize against, so here it is the area over the levels in [0, 1] divided by the width
  they span: the curve's mean score, in the metric's units (lower is better for an error
  such as MAE). `compare_robustness` adds the normalized value over several runs.
- effective robustness: how much better the curve holds than expected from the clean
  score. MultiBench's code takes a reference model's curve (late fusion), shifted to start at
  the model's clean score, and sums the model's curve minus it over the levels; the notion
  is Taori et al.'s (NeurIPS 2020), whose expectation is a linear fit over models. Both
  need other models than the run's, so `compare_robustness` computes it over several runs'
  `robustness.json`: against a named reference run (MultiBench's code; as a mean over the
  levels like relative robustness, not a sum), or against the least-squares line of
  relative robustness on clean score over the runs (Taori et al.). It is signed so that a
  positive value is more robust than expected, for lower-is-better metrics too.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from fusion.analysis.perturbations import NAMES, NOISE, PERTURBATIONS, Perturbation, for_kind
from fusion.batch import Batch
from fusion.data import Modality
from fusion.model import MultimodalModel
from fusion.tasks import Objective, format_score, is_fraction, lower_is_better
from fusion.training.loaders import reseed
from fusion.training.loop import EpochMetrics, evaluate
from fusion.training.settings import resolve_precision

BatchEdit = Callable[[Batch], Batch]
"""What the evaluator applies to each batch: a modality dropped, or its inputs perturbed."""

SPAN = (0.0, 1.0)
"""The levels relative robustness is taken over (MultiBench's range)."""
NOISE_LEVEL = "noise std / the input's std on the split"
NO_NOISE = "no continuous inputs (text, or only categorical columns); no noise added"


def noised_columns(modality: Modality | None) -> slice:
    """The part of a sample's last dimension that holds continuous values."""
    if modality is not None and modality.kind == "tabular":
        return slice(0, int(modality.info.get("num_numeric", 0)))
    return slice(None)


def drop(modality: str) -> BatchEdit:
    """Mark `modality` missing in every sample, as a dataset without it would."""

    def apply(batch: Batch) -> Batch:
        present = {**batch.present, modality: torch.zeros_like(batch.present[modality])}
        return dataclasses.replace(batch, present=present)

    return apply


def add_noise(modality: str, std: float, seed: int, columns: slice = slice(None)) -> BatchEdit:
    """Add N(0, std^2) to `modality`'s input (its `columns` of the last dimension); a fresh
    generator per call gives every level the same draw."""
    generator = torch.Generator().manual_seed(seed)

    def apply(batch: Batch) -> Batch:
        x = batch.inputs[modality].clone()
        part = x[..., columns]
        x[..., columns] = part + std * torch.randn(part.shape, generator=generator, dtype=x.dtype)
        return dataclasses.replace(batch, inputs={**batch.inputs, modality: x})

    return apply


def perturb(modality: str, perturbation: Perturbation, level: float, seed: int) -> BatchEdit:
    """Apply `perturbation` at `level` to `modality`'s inputs; a fresh generator per call
    gives every level the same draw. Padded audio gets its clips' lengths from the mask."""
    generator = torch.Generator().manual_seed(seed)

    def apply(batch: Batch) -> Batch:
        present = batch.present[modality]
        lengths = {}
        if perturbation.takes_lengths and present.dim() == 2:
            lengths["lengths"] = present.sum(dim=1)
        x = perturbation.apply(batch.inputs[modality], level, generator, **lengths)
        return dataclasses.replace(batch, inputs={**batch.inputs, modality: x})

    return apply


def input_std(
    batches: Iterable[Batch], modality: str, columns: slice = slice(None)
) -> float | None:
    """The modality's input std over the samples that have it; None for non-tensor inputs
    or when `columns` is empty (a table without numeric columns)."""
    count, total, squares = 0, 0.0, 0.0
    for batch in batches:
        x = batch.inputs[modality]
        if not isinstance(x, torch.Tensor):
            return None
        x = x[batch.present[modality]][..., columns].double()  # real samples (or positions)
        count += x.numel()
        total += float(x.sum())
        squares += float(x.pow(2).sum())
    if count == 0:
        return None
    mean = total / count
    return math.sqrt(max(squares / count - mean**2, 0.0))


class Evaluator:
    """One model on one split: every pass starts from the run's seed, so passes differ only
    by their perturbation (an augmented split's draws come from the global generator)."""

    def __init__(
        self,
        model: MultimodalModel,
        loaders: Mapping[str, DataLoader],
        split: str,
        seed: int,
        device: torch.device,
        precision: str = "32",
        objectives: Mapping[str, Objective] | None = None,
    ) -> None:
        self.model, self.loaders, self.split = model.to(device), loaders, split
        self.seed, self.device, self.objectives = seed, device, objectives
        self.precision = resolve_precision(precision, device)
        self.loss_weights = getattr(model.head, "loss_weights", None)

    def batches(self) -> DataLoader:
        reseed(self.seed, self.loaders)
        return self.loaders[self.split]

    def __call__(self, perturb: BatchEdit | None = None) -> EpochMetrics:
        batches = self.batches()
        if perturb is not None:
            batches = map(perturb, batches)
        return evaluate(
            self.model,
            batches,
            self.device,
            loss_weights=self.loss_weights,
            precision=self.precision,
            objectives=self.objectives,
        )


def modality_kinds(
    names: Sequence[str], modalities: Mapping[str, Modality] | None
) -> dict[str, str | None]:
    """Each of the model's modalities' kind, from the data's `modalities` (None: unknown)."""
    modalities = modalities or {}
    return {m: modalities[m].kind if m in modalities else None for m in names}


def asked_perturbations(
    perturbations: Collection[str] | None,
    kinds: Mapping[str, str | None],
    levels: Sequence[float],
) -> set[str] | None:
    """The perturbations asked by name, checked: each known, each fitting a modality of the
    model, and levels in [0, 1] for those that take no others. None: every one that fits."""
    if perturbations is None:
        return None
    asked = list(dict.fromkeys(perturbations))
    unknown = [name for name in asked if name not in NAMES]
    if unknown:
        raise ValueError(f"unknown perturbation(s) {unknown}; expected some of {list(NAMES)}")

    def fits(name: str, kind: str | None) -> bool:
        return kind != "text" if name == NOISE else PERTURBATIONS[name].kind == kind

    unfit = [name for name in asked if not any(fits(name, kind) for kind in kinds.values())]
    if unfit:
        wants = ", ".join(
            f"{n} (any kind but text)" if n == NOISE else f"{n} ({PERTURBATIONS[n].kind})"
            for n in unfit
        )
        have = ", ".join(f"{m} ({kind or 'kind unknown'})" for m, kind in kinds.items())
        raise ValueError(f"{wants} fit(s) none of the model's modalities: {have}")
    bounded = [name for name in asked if name != NOISE]
    if bounded and not any(level <= SPAN[1] for level in levels):
        raise ValueError(
            f"{bounded} take levels in [0, 1] and the levels {list(levels)} hold none (only "
            f"{NOISE} takes levels above 1)"
        )
    return set(asked)


def relative_robustness(
    levels: Sequence[float], scores: Sequence[float], span: tuple[float, float] = SPAN
) -> float | None:
    """The area under the score-against-level curve over the levels in `span` (trapezoid
    rule), divided by the width those levels cover: the curve's mean score, in the metric's
    units. None when fewer than two distinct levels fall in `span`."""
    points = sorted(
        (lv, s) for lv, s in zip(levels, scores, strict=True) if span[0] <= lv <= span[1]
    )
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return None
    area = sum((b - a) * (sa + sb) / 2 for (a, sa), (b, sb) in itertools.pairwise(points))
    return area / (points[-1][0] - points[0][0])


def curve(levels: Sequence[float], scores: list[float], level: str) -> dict[str, Any]:
    """One perturbation's curve in a report, with its relative robustness."""
    return {
        "levels": list(levels),
        "scores": scores,
        "relative_robustness": relative_robustness(levels, scores),
        "level": level,
    }


def curves_of(report: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A modality's curves by perturbation; a report from before per-kind perturbations holds
    Gaussian noise only."""
    if "perturbations" in entry:
        return entry["perturbations"]
    if entry.get("noise") is None:
        return {}
    return {NOISE: curve(report["levels"], entry["noise"], NOISE_LEVEL)}


def robustness(
    evaluator: Evaluator,
    levels: Sequence[float],
    modalities: Mapping[str, Modality] | None = None,
    perturbations: Collection[str] | None = None,
) -> dict[str, Any]:
    """The main score (`metric`: accuracy, or MAE for a regression, ...) per modality when
    dropped and under each perturbation at each level, with the clean score and each curve's
    relative robustness. `modalities` (the data's) give each modality's kind, which chooses
    its perturbations, and say which columns of a table are numeric. `perturbations`: the
    names (`fusion.analysis.perturbations.NAMES`) to evaluate, each on the modalities it
    fits; None: every one that fits. Noise takes every level, the others those in [0, 1]."""
    modalities = modalities or {}
    kinds = modality_kinds(evaluator.model.modalities, modalities)
    asked = asked_perturbations(perturbations, kinds, levels)
    bounded_levels = [level for level in levels if level <= SPAN[1]]
    clean = evaluator()
    report: dict[str, Any] = {
        "split": evaluator.split,
        "seed": evaluator.seed,
        "levels": list(levels),
        "metric": clean.main,
        "lower_is_better": lower_is_better(clean.main),
        "clean": clean.score(),
        "relative_robustness_span": list(SPAN),
        "modalities": {},
    }
    for m, kind in kinds.items():
        entry: dict[str, Any] = {
            "kind": kind,
            "input_std": None,
            "dropped": evaluator(drop(m)).score(),
            "noise": None,
        }
        curves: dict[str, dict[str, Any]] = {}
        if asked is None or NOISE in asked:
            columns = noised_columns(modalities.get(m))
            std = entry["input_std"] = input_std(evaluator.batches(), m, columns)
            if std is None:
                entry["note"] = NO_NOISE
            else:
                entry["noise"] = [
                    evaluator(add_noise(m, level * std, evaluator.seed, columns)).score()
                    for level in levels
                ]
                curves[NOISE] = curve(levels, entry["noise"], NOISE_LEVEL)
        for p in for_kind(kind):
            if (asked is None or p.name in asked) and bounded_levels:
                scores = [
                    evaluator(perturb(m, p, level, evaluator.seed)).score()
                    for level in bounded_levels
                ]
                curves[p.name] = curve(bounded_levels, scores, p.level)
        entry["perturbations"] = curves
        report["modalities"][m] = entry
    return report


def compare_robustness(
    reports: Mapping[str, Mapping[str, Any]], reference: str | None = None
) -> dict[str, Any]:
    """Several runs' robustness reports (`robustness.json`, by run name) side by side: for
    each modality and perturbation every run has (over the same levels), each run's clean
    score, relative robustness, relative robustness min-max normalized over the runs
    (MultiBench's reported value: 1 for the most robust run, 0 for the least; None when all
    are equal) and effective robustness. Effective robustness is measured against
    `reference` (a run's name), as MultiBench's code does with late fusion:

        ER = s x [(RR - clean) - (RR_ref - clean_ref)]

    or, without one, against the least-squares line RR ~ a x clean + b over the runs
    (Taori et al. 2020; 3 runs or more, not all with one clean score):

        ER = s x [RR - (a x clean + b)]

    with s = -1 for a lower-is-better metric, +1 otherwise: a positive ER is a curve that
    holds better than its clean score predicts."""
    names = list(reports)
    if len(names) < 2:
        raise ValueError(f"comparing robustness takes 2 runs' reports or more, got {len(names)}")
    for key in ("metric", "split", "lower_is_better"):
        values = {name: report[key] for name, report in reports.items()}
        if len(set(values.values())) > 1:
            raise ValueError(
                f"the reports differ in their {key} ({values}); compare runs scored alike"
            )
    cleans = {name: report["clean"] for name, report in reports.items()}
    if reference is not None and reference not in reports:
        raise ValueError(f"reference '{reference}' is none of the runs {names}")
    if reference is None and (len(names) < 3 or len(set(cleans.values())) < 2):
        raise ValueError(
            f"a line of relative robustness on clean score needs 3 runs or more with different "
            f"clean scores (got {cleans}); name a reference run instead"
        )
    first = reports[names[0]]
    sign = -1.0 if first["lower_is_better"] else 1.0
    result: dict[str, Any] = {
        "metric": first["metric"],
        "split": first["split"],
        "lower_is_better": first["lower_is_better"],
        "reference": reference,
        "runs": {name: {} for name in names},
        "fits": {},
    }
    for m, entry in first["modalities"].items():
        for p, first_curve in curves_of(first, entry).items():
            found = {}
            for name, report in reports.items():
                other = curves_of(report, report["modalities"].get(m, {})).get(p)
                if other is None:
                    break
                if other["levels"] != first_curve["levels"]:
                    raise ValueError(
                        f"{m}/{p}: run '{name}' has the levels {other['levels']}, run "
                        f"'{names[0]}' {first_curve['levels']}; relative robustness compares "
                        "curves over the same levels"
                    )
                found[name] = relative_robustness(other["levels"], other["scores"])
            if len(found) < len(names) or None in found.values():
                continue  # not every run has it, or not over two levels in [0, 1]
            if reference is None:
                slope, intercept = line(list(cleans.values()), list(found.values()))
                result["fits"].setdefault(m, {})[p] = {"slope": slope, "intercept": intercept}
                expected = {name: slope * cleans[name] + intercept for name in names}
            else:
                shift = found[reference] - cleans[reference]
                expected = {name: cleans[name] + shift for name in names}
            oriented = {name: sign * rr for name, rr in found.items()}
            low, high = min(oriented.values()), max(oriented.values())
            for name, rr in found.items():
                result["runs"][name].setdefault(m, {})[p] = {
                    "clean": cleans[name],
                    "relative_robustness": rr,
                    "relative_robustness_normalized": (
                        (oriented[name] - low) / (high - low) if high > low else None
                    ),
                    "effective_robustness": sign * (rr - expected[name]),
                }
    return result


def line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """The least-squares line y ~ slope x + intercept."""
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    var = sum((a - mean_x) ** 2 for a in x)
    slope = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y, strict=True)) / var
    return slope, mean_y - slope * mean_x


def metrics_table(split: str, metrics: EpochMetrics) -> str:
    """One row: the loss and every metric (fractions as percentages)."""
    names = list(metrics.scores)
    lines = [
        "| split | loss |" + "".join(f" {n} |" for n in names),
        "|---|---:|" + "---:|" * len(names),
        f"| {split} | {metrics.loss:.4f} |"
        + "".join(f" {format_score(n, metrics.scores[n])} |" for n in names),
    ]
    return "\n".join(lines)


def robustness_table(report: dict[str, Any]) -> str:
    """One row per modality: its input std, the score at each noise level, and when dropped;
    then, for a report with per-kind perturbations, one row per modality and perturbation:
    the score at each level and the curve's relative robustness."""
    levels, metric = report["levels"], report["metric"]
    lines = [
        "| modality | input std |" + "".join(f" noise x{lv:g} |" for lv in levels) + " dropped |",
        "|---|---:|" + "---:|" * (len(levels) + 1),
    ]
    for m, entry in report["modalities"].items():
        noise = entry["noise"] or ["-"] * len(levels)
        std = "-" if entry["input_std"] is None else f"{entry['input_std']:.3g}"
        cells = [format_score(metric, a) if isinstance(a, float) else a for a in noise]
        dropped = format_score(metric, entry["dropped"])
        lines.append(f"| {m} | {std} | " + " | ".join(cells) + f" | {dropped} |")
    notes = [f"{m}: {e['note']}" for m, e in report["modalities"].items() if "note" in e]
    direction = "lower" if report["lower_is_better"] else "higher"
    clean = format_score(metric, report["clean"])
    lines.append(f"\nclean {metric} on {report['split']}: {clean} ({direction} is better)")
    lines += notes
    if any("perturbations" in e for e in report["modalities"].values()):
        lines += ["", perturbations_table(report)]
    return "\n".join(lines)


def perturbations_table(report: dict[str, Any]) -> str:
    """One row per modality and perturbation: the score at each level, and the relative
    robustness (the mean score over the levels in [0, 1]); what each level means below."""
    metric = report["metric"]
    rows = [
        (m, name, c)
        for m, entry in report["modalities"].items()
        for name, c in curves_of(report, entry).items()
    ]
    levels = sorted({lv for _, _, c in rows for lv in c["levels"]})
    lines = [
        "| modality/perturbation |"
        + "".join(f" {lv:g} |" for lv in levels)
        + " relative robustness |",
        "|---|" + "---:|" * (len(levels) + 1),
    ]
    for m, name, c in rows:
        by_level = dict(zip(c["levels"], c["scores"], strict=True))
        cells = [format_score(metric, by_level[lv]) if lv in by_level else "-" for lv in levels]
        rr = c["relative_robustness"]
        rr = "-" if rr is None else format_score(metric, rr)
        lines.append(f"| {m}/{name} | " + " | ".join(cells) + f" | {rr} |")
    low, high = report.get("relative_robustness_span", SPAN)
    meanings = {name: c["level"] for _, name, c in rows}
    lines.append(
        f"\nrelative robustness: the mean {metric} over the levels in [{low:g}, {high:g}] "
        "(trapezoid rule)\nlevels: "
        + "; ".join(f"{name} = {meaning}" for name, meaning in meanings.items())
    )
    return "\n".join(lines)


def plot_robustness(report: dict[str, Any], path: Path) -> None:
    """One subplot per modality: the score against the level, one line per perturbation,
    dashed at the score with the modality dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = list(report["modalities"].items())
    fig, axes = plt.subplots(
        1, len(entries), figsize=(4.5 * len(entries), 4), squeeze=False, sharey=True
    )
    for ax, (m, entry) in zip(axes[0], entries, strict=True):
        for i, (name, c) in enumerate(curves_of(report, entry).items()):
            ax.plot(c["levels"], c["scores"], "o-", color=f"C{i}", label=name)
        ax.axhline(entry["dropped"], color="black", linestyle="--", label="dropped")
        ax.set_title(f"{m} ({entry['kind']})" if entry.get("kind") else m)
        ax.set_xlabel("level (noise: std / input std)")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{report['split']} {report['metric']}")
    if is_fraction(report["metric"]):
        axes[0][0].set_ylim(-0.02, 1.02)  # keep a line at 0 or 1 visible
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def difference(metric: str, value: float) -> str:
    """A signed difference of scores: points of a percentage for fractions."""
    return f"{100 * value:+.2f} pts" if is_fraction(metric) else f"{value:+.4f}"
