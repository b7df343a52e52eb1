"""How much each modality contributes to a model's score: Shapley values over presence masks.

A coalition S of modalities is the model run with only the modalities in S present (the
others' `present` masks cleared, as a dataset without them would give; every fuser honours
the masks, and gives a finite output with none present, see `tests/fusion/test_fusers.py`).
Its value v(S) is the model's main score on the split with only S present: accuracy for a
classification, and minus the score for a lower-is-better one (the loss, MAE, RMSE), so
that a larger v is always better. A modality's Shapley value (Shapley 1953) is its gain
v(S + m) - v(S), averaged over the orders in which the modalities can be added:

    phi_m = sum over S not holding m of |S|! (M - |S| - 1)! / M! * (v(S + m) - v(S))

For two modalities a, b: phi_a = 1/2 [(v(a) - v()) + (v(ab) - v(b))]. The values add up to
v(all) - v(none) (efficiency), a modality the model ignores gets exactly 0, and modalities
the model treats alike get equal values. Exact: all 2^M coalitions are scored, for at most
`MAX_MODALITIES` modalities.

Why the split's score, and not the mean of per-sample Shapley values of each sample's
correct-class probability or loss: (1) v(all) is then the score `experiments.evaluate`
reports and v(all - m) the "dropped" score of the robustness check, so the numbers agree;
(2) it is in the units users read (points of accuracy), and (3) it exists for every metric,
including those that are not a mean over samples (F1, AUROC, Pearson). A per-sample value
averaged over samples gives, by the linearity of Shapley values, the Shapley values of the
mean of that value: that of the loss is reported too (`shapley_loss`, v = -loss), since
accuracy does not move when a modality makes right answers more confident.

Per class (each multiclass or binary task), v_c(S) is the class's recall: the share of its
samples predicted right with only S present. With accuracy as the main score (micro), the
split's Shapley values are the class's Shapley values weighted by the class's share.

A sample that lacks a modality keeps it absent in every coalition: the modality adds
nothing to that sample, and the values are those of the split as it is.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fusion.analysis.interaction import FuserHead, encode_split, format_change, score
from fusion.analysis.robustness import Evaluator
from fusion.batch import Batch
from fusion.tasks import CLASSIFICATION, format_score, is_fraction, lower_is_better
from fusion.training.loop import predict

MAX_MODALITIES = 5
"""The most modalities whose Shapley values are computed exactly (2^5 = 32 coalitions)."""


def coalitions(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """Every subset of `modalities`, smallest first, each in the modalities' order."""
    return [
        subset
        for size in range(len(modalities) + 1)
        for subset in itertools.combinations(modalities, size)
    ]


def check_count(modalities: Sequence[str]) -> None:
    """Refuse more modalities than exact Shapley values are computed for (ValueError)."""
    if len(modalities) > MAX_MODALITIES:
        raise ValueError(
            f"exact Shapley values score all 2^M coalitions of the M modalities; "
            f"{len(modalities)} modalities ({', '.join(modalities)}) would take "
            f"{2 ** len(modalities)}, and at most {MAX_MODALITIES} modalities "
            f"({2**MAX_MODALITIES} coalitions) are supported"
        )


def shapley_values(
    value: Mapping[frozenset[str], float], modalities: Sequence[str]
) -> dict[str, float]:
    """Each modality's exact Shapley value of the game `value` (v(S) for every subset S of
    `modalities`, as frozensets), in the units of v. Raises ValueError when there are more
    than `MAX_MODALITIES` modalities, or a subset's value is missing."""
    players = list(modalities)
    n = len(players)
    check_count(players)
    missing = [set(s) for s in coalitions(players) if frozenset(s) not in value]
    if missing:
        raise ValueError(f"the game has no value for the coalitions {missing}")
    out = {}
    for player in players:
        others = [p for p in players if p != player]
        total = 0.0
        for subset in coalitions(others):
            weight = math.factorial(len(subset)) * math.factorial(n - len(subset) - 1)
            gain = value[frozenset(subset) | {player}] - value[frozenset(subset)]
            total += weight / math.factorial(n) * gain
        out[player] = total
    return out


def keep_only(batch: Batch, present: Sequence[str]) -> Batch:
    """`batch` with every modality not in `present` marked absent in every sample."""
    masks = {
        m: mask if m in present else torch.zeros_like(mask) for m, mask in batch.present.items()
    }
    return dataclasses.replace(batch, present=masks)


def _recalls(true: Sequence[int], predicted: Sequence[int], classes: int) -> list[float | None]:
    """Each class's recall (None for a class without samples)."""
    hits, counts = [0] * classes, [0] * classes
    for t, p in zip(true, predicted, strict=True):
        counts[t] += 1
        hits[t] += int(t == p)
    return [h / c if c else None for h, c in zip(hits, counts, strict=True)]


def _game(
    scores: Mapping[tuple[str, ...], float | None],
    modalities: Sequence[str],
    sign: float = 1.0,
) -> dict[str, Any]:
    """The `all`, `empty`, `dropped`, `only` and `shapley` entries of one value function."""
    full = tuple(modalities)
    entry: dict[str, Any] = {
        "all": scores[full],
        "empty": scores[()],
        "dropped": {m: scores[tuple(x for x in full if x != m)] for m in modalities},
        "only": {m: scores[(m,)] for m in modalities},
    }
    if any(v is None for v in scores.values()):
        entry["shapley"] = None
    else:
        value = {frozenset(s): sign * v for s, v in scores.items() if v is not None}
        entry["shapley"] = shapley_values(value, modalities)
    return entry


@torch.no_grad()
def contributions(evaluator: Evaluator) -> dict[str, Any]:
    """Each modality's Shapley value of the model's main score on the evaluator's split,
    overall and per class, with the score of every coalition.

    Each modality is encoded once; the fuser and head then run on the split once per
    coalition (2^M), with the absent modalities' masks cleared.

    Returns the JSON report, with the keys:

    - `split`, `seed`, `modalities` (in the model's order), `samples` (the split's size);
    - `metric`: the main score's name; `lower_is_better`; `value`: what v(S) is, the score
      or minus it (`"accuracy"`, `"-mae"`);
    - `all`, `empty`: the score with every modality present, and with none (the head's
      output on the fuser's all-absent output: a constant prediction);
    - `dropped`: per modality, the score with all the others present (v(all - m));
      `only`: the score with that modality alone;
    - `shapley`: per modality, its Shapley value of v, in the score's units (points of
      accuracy as a fraction; for a lower-is-better score, how much the modality lowers
      it); they add up to v(all) - v(none);
    - `shapley_loss`: the same for v(S) = -loss (the task's mean loss per sample): how much
      the modality lowers the loss; the mean over samples of per-sample Shapley values;
    - `coalitions`: every coalition, `{"present": [modalities], "score": ..., "loss": ...}`;
    - `classes`: per multiclass or binary task, per class name, `{"samples": n, "all",
      "empty", "dropped", "only", "shapley"}` of the class's recall (a fraction; all None
      for a class without samples on the split); empty for other task kinds.

    Raises ValueError for more than `MAX_MODALITIES` modalities, or when the fuser and head
    give a non-finite loss for a coalition (their output without those modalities).
    """
    model = evaluator.model
    modalities = list(model.modalities)
    check_count(modalities)
    batches = encode_split(evaluator)
    objectives = evaluator.objectives
    scores: dict[tuple[str, ...], float] = {}
    losses: dict[tuple[str, ...], float] = {}
    predictions: dict[tuple[str, ...], dict[str, tuple[list[int], list[int]]]] = {}
    main = ""
    for subset in coalitions(modalities):
        masked = [keep_only(b, subset) for b in batches]
        metrics = score(evaluator, masked)
        if not math.isfinite(metrics.loss):
            present = ", ".join(subset) or "no modality"
            raise ValueError(
                f"with {present} present, {type(model.fuser).__name__} and "
                f"{type(model.head).__name__} give a non-finite loss ({metrics.loss}): the "
                "coalition's value is undefined, so no Shapley values can be computed"
            )
        main = metrics.main
        scores[subset], losses[subset] = metrics.score(), metrics.loss
        predictions[subset] = predict(
            FuserHead(model),
            masked,
            evaluator.device,
            precision=evaluator.precision,
            objectives=objectives,
        )
    sign = -1.0 if lower_is_better(main) else 1.0
    report: dict[str, Any] = {
        "split": evaluator.split,
        "seed": evaluator.seed,
        "modalities": modalities,
        "samples": sum(len(b) for b in batches),
        "metric": main,
        "lower_is_better": lower_is_better(main),
        "value": f"-{main}" if sign < 0 else main,
        **_game(scores, modalities, sign),
        "shapley_loss": shapley_values({frozenset(s): -v for s, v in losses.items()}, modalities),
        "coalitions": [{"present": list(s), "score": scores[s], "loss": losses[s]} for s in scores],
        "classes": {},
    }
    single = next(iter(objectives)) if objectives and len(objectives) == 1 else ""
    for task in predictions[()]:  # predict() keys a single-output model's task ""
        name = task or single
        objective = objectives[name] if objectives else None
        if objective is not None and objective.task.kind not in CLASSIFICATION:
            continue
        true, _ = predictions[()][task]
        if objective is not None:
            classes = list(objective.task.classes)
        else:  # default objectives: one class per output seen
            seen = [c for s in predictions for c in itertools.chain(*predictions[s][task])]
            classes = [str(c) for c in range(max(seen) + 1)]
        recalls = {s: _recalls(*predictions[s][task], len(classes)) for s in predictions}
        report["classes"][name] = {
            str(label): {
                "samples": true.count(i),
                **_game({s: r[i] for s, r in recalls.items()}, modalities),
            }
            for i, label in enumerate(classes)
        }
    return report


def contributions_table(report: dict[str, Any]) -> str:
    """One row per modality (Shapley values, alone, dropped), then one per class and task."""
    metric, modalities = report["metric"], report["modalities"]
    lines = [
        f"| modality | Shapley ({metric}) | Shapley (loss) | {metric} alone | "
        f"{metric} without it |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in modalities:
        lines.append(
            f"| {m} | {format_change(metric, report['shapley'][m])} | "
            f"{report['shapley_loss'][m]:+.4f} | {format_score(metric, report['only'][m])} | "
            f"{format_score(metric, report['dropped'][m])} |"
        )
    total = sum(report["shapley"].values())
    direction = (
        f"{metric} is lower-is-better, so a modality's value is how much it lowers it"
        if report["lower_is_better"]
        else "higher is better"
    )
    lines.append(
        f"\n{metric} on {report['split']} ({report['samples']} samples): all modalities "
        f"{format_score(metric, report['all'])}, none {format_score(metric, report['empty'])}; "
        f"the Shapley values (Shapley 1953) add up to the difference, "
        f"{format_change(metric, total)} ({direction}). Shapley (loss): how much each lowers "
        "the mean loss."
    )
    for task, classes in report["classes"].items():
        lines += [
            "",
            f"| {task}: class | samples | recall, all | none |"
            + "".join(f" Shapley {m} |" for m in modalities),
            "|---|---:|---:|---:|" + "---:|" * len(modalities),
        ]
        for label, entry in classes.items():
            if entry["shapley"] is None:
                lines.append(f"| {label} | 0 | - | - |" + " - |" * len(modalities))
                continue
            lines.append(
                f"| {label} | {entry['samples']} | {entry['all']:.2%} | {entry['empty']:.2%} |"
                + "".join(f" {100 * entry['shapley'][m]:+.2f} pp |" for m in modalities)
            )
    return "\n".join(lines)


def plot_contributions(report: dict[str, Any], path: Path) -> None:
    """Bars of each modality's Shapley value: overall, then per class for each
    classification task (one bar per modality in each class's group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modalities, metric = report["modalities"], report["metric"]
    scale = 100.0 if is_fraction(metric) else 1.0
    unit = " (points)" if is_fraction(metric) else ""
    tasks = list(report["classes"].items())
    widest = max((len(classes) for _, classes in tasks), default=0)
    size = (max(5.0, 0.45 * widest * len(modalities) + 1.5), 3.2 * (1 + len(tasks)))
    fig, axes = plt.subplots(1 + len(tasks), 1, figsize=size, squeeze=False)
    ax = axes[0, 0]
    values = [scale * report["shapley"][m] for m in modalities]
    bars = ax.bar(modalities, values, width=0.5, color=[f"C{i}" for i in range(len(modalities))])
    ax.bar_label(bars, labels=[f"{v:+.2f}" for v in values], fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel(f"Shapley value{unit}")
    ax.set_title(f"{report['split']} {report['value']}: each modality's Shapley value")
    ax.grid(axis="y", alpha=0.3)
    width = 0.8 / len(modalities)
    for row, (task, classes) in enumerate(tasks, start=1):
        ax = axes[row, 0]
        labels = list(classes)
        for i, m in enumerate(modalities):
            heights = [
                100.0 * e["shapley"][m] if e["shapley"] is not None else 0.0
                for e in classes.values()
            ]
            xs = [x + (i - (len(modalities) - 1) / 2) * width for x in range(len(labels))]
            ax.bar(xs, heights, width, label=m, color=f"C{i}")
        ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 6 else 0)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("Shapley value of recall (points)")
        ax.set_title(f"{task}: per class")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
