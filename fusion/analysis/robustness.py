"""How a trained model holds up without a modality or with a noisy one (after MultiBench).

Each modality in turn is dropped (its `present` mask cleared) and, separately, given
Gaussian noise with std = level x that input's std on the split. Noise is drawn from a
generator seeded with the run's seed, the same draw for every level, so the curves differ
only by the level. Only continuous values are noised: text is left alone (it is not a
tensor), and a table's categorical codes are too (noise on a code is not a perturbation
of the category); only its numeric columns get noise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from fusion.batch import Batch
from fusion.data import Modality
from fusion.model import MultimodalModel
from fusion.tasks import Objective, format_score, is_fraction, lower_is_better
from fusion.training.loaders import reseed
from fusion.training.loop import EpochMetrics, evaluate
from fusion.training.settings import resolve_precision

Perturbation = Callable[[Batch], Batch]


def noised_columns(modality: Modality | None) -> slice:
    """The part of a sample's last dimension that holds continuous values."""
    if modality is not None and modality.kind == "tabular":
        return slice(0, int(modality.info.get("num_numeric", 0)))
    return slice(None)


def drop(modality: str) -> Perturbation:
    """Mark `modality` missing in every sample, as a dataset without it would."""

    def apply(batch: Batch) -> Batch:
        present = {**batch.present, modality: torch.zeros_like(batch.present[modality])}
        return dataclasses.replace(batch, present=present)

    return apply


def add_noise(modality: str, std: float, seed: int, columns: slice = slice(None)) -> Perturbation:
    """Add N(0, std^2) to `modality`'s input (its `columns` of the last dimension); a fresh
    generator per call gives every level the same draw."""
    generator = torch.Generator().manual_seed(seed)

    def apply(batch: Batch) -> Batch:
        x = batch.inputs[modality].clone()
        part = x[..., columns]
        x[..., columns] = part + std * torch.randn(part.shape, generator=generator, dtype=x.dtype)
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

    def __call__(self, perturb: Perturbation | None = None) -> EpochMetrics:
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


def robustness(
    evaluator: Evaluator,
    levels: Sequence[float],
    modalities: Mapping[str, Modality] | None = None,
) -> dict[str, Any]:
    """The main score (`metric`: accuracy, or MAE for a regression, ...) per modality when
    dropped and at each noise level, with the clean score. `modalities` (the data's) says
    which columns of a table are numeric."""
    modalities = modalities or {}
    clean = evaluator()
    report: dict[str, Any] = {
        "split": evaluator.split,
        "seed": evaluator.seed,
        "levels": list(levels),
        "metric": clean.main,
        "lower_is_better": lower_is_better(clean.main),
        "clean": clean.score(),
        "modalities": {},
    }
    for m in evaluator.model.modalities:
        columns = noised_columns(modalities.get(m))
        std = input_std(evaluator.batches(), m, columns)
        entry: dict[str, Any] = {"input_std": std, "dropped": evaluator(drop(m)).score()}
        if std is None:
            entry["noise"] = None
            entry["note"] = (
                "no continuous inputs (text, or only categorical columns); no noise added"
            )
        else:
            entry["noise"] = [
                evaluator(add_noise(m, level * std, evaluator.seed, columns)).score()
                for level in levels
            ]
        report["modalities"][m] = entry
    return report


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
    """One row per modality: its input std, the score at each noise level, and when dropped."""
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
    return "\n".join(lines + notes)


def plot_robustness(report: dict[str, Any], path: Path) -> None:
    """The score against noise level, one line per modality, dashed at its dropped score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (m, entry) in enumerate(report["modalities"].items()):
        color = f"C{i}"
        if entry["noise"] is not None:
            ax.plot(report["levels"], entry["noise"], "o-", color=color, label=f"{m} noised")
        ax.axhline(entry["dropped"], color=color, linestyle="--", label=f"{m} dropped")
    ax.set_xlabel("noise std / input std")
    ax.set_ylabel(f"{report['split']} {report['metric']}")
    if is_fraction(report["metric"]):
        ax.set_ylim(-0.02, 1.02)  # keep a line at 0 or 1 visible
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
