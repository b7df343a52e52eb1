"""Does a model use cross-modal interactions? EMAP (Hessel & Lee, EMNLP 2020).

Hessel & Lee, "Does my multimodal model learn cross-modal interactions? It's harder to tell
than you might think!" (EMNLP 2020) compare a model with its *empirical multimodally-additive
projection* (EMAP): the closest function of the form g_1(x_1) + ... + g_M(x_M), computed on a
split of N samples. For two modalities t, v the paper defines it on the model's logits f:

    f_add(t_i, v_i) = 1/N sum_j f(t_i, v_j) + 1/N sum_j f(t_j, v_i) - 1/N^2 sum_{j,k} f(t_j, v_k)

If the projection scores as well as the model, the model's cross-modal interactions (what
the projection removes) do not help on that split, whatever its architecture can express.

For M modalities the paper gives no formula; this module computes the additive (first-order)
term of the functional ANOVA decomposition (Hoeffding 1948; Stone 1994) under the product of
the modalities' empirical distributions, which is the paper's formula for M = 2:

    f_add(x^(i)) = sum_m E[f | x_m = x_m^(i)] - (M - 1) E[f]

where E[f | x_m = x_m^(i)] averages f over every combination of the other modalities' values,
each drawn independently from the split's N samples (N^(M-1) terms), and E[f] averages f over
all N^M combinations. It is the least-squares additive approximation of f under that product
distribution, and equals f exactly (up to float rounding) when f is additive. Cost: N^M
evaluations of the fuser and head (per distinct `condition`, see `emap`), on features that
each modality's encoder computed once.

Also shared with `fusion.analysis.contributions`: a split encoded once (`encode_split`), the
model past its encoders as a module (`FuserHead`), and the scoring of given outputs exactly
as `fusion.training.loop.evaluate` scores a model's (`score_outputs`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusion.analysis.robustness import Evaluator
from fusion.batch import Batch
from fusion.model import MultimodalModel
from fusion.tasks import LOSS_NAME, format_score, is_fraction, lower_is_better
from fusion.training.loop import EpochMetrics, evaluate

Outputs = torch.Tensor | dict[str, torch.Tensor]

MAX_EVALUATIONS = 10**8
"""The most fuser + head evaluations `emap` runs unless told otherwise (`max_evaluations`):
10^8 rows of a small head take minutes on a CPU; more asks for a subsample (`samples`)."""
CHUNK_VALUES = 2**22
"""Feature values per chunk of fuser + head rows (16 MB in float32)."""
SINGLE = ""
"""The key of a single-output model's outputs (as `fusion.training.loop.matched` keys them)."""


class FuserHead(nn.Module):
    """The model past its encoders: `forward(features, masks, condition)` is
    `model.from_features`, so `evaluate` and `predict` score batches of features
    (`encode_split`) exactly as they score the model on the batches' inputs."""

    def __init__(self, model: MultimodalModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        inputs: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
        condition: torch.Tensor | None = None,
    ) -> Outputs:
        return self.model.from_features(inputs, present or {}, condition)


class GivenOutputs(nn.Module):
    """Hands back the outputs a batch carries as its inputs (`{SINGLE: [B, C]}`, or one
    entry per task), so outputs computed elsewhere are scored by `evaluate` as a model's."""

    def forward(
        self,
        inputs: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
        condition: torch.Tensor | None = None,
    ) -> Outputs:
        return inputs[SINGLE] if SINGLE in inputs else dict(inputs)


@torch.no_grad()
def encode_split(evaluator: Evaluator) -> list[Batch]:
    """The evaluator's split, each batch with its inputs replaced by each modality's features
    (`[B, D]` or `[B, T, D]`) and its `present` by the fuser's masks (`output_masks`; `[B]`
    or `[B, T]`, one for every modality), on the evaluator's device. The batches are those
    `Evaluator` scores, so `score(evaluator, encode_split(evaluator))` is `evaluator()`."""
    model = evaluator.model
    model.eval()
    encoded = []
    for batch in evaluator.batches():
        batch = batch.to(evaluator.device)
        with evaluator.precision.autocast():
            features = model.encode(batch.inputs, batch.encoded, batch.present)
        masks = model.output_masks(batch.inputs, batch.present, batch.encoded)
        for m, x in features.items():  # a cached modality without a mask is present
            masks.setdefault(m, torch.ones(len(x), dtype=torch.bool, device=x.device))
        encoded.append(
            dataclasses.replace(
                batch, inputs=features, present=masks, encoded=frozenset(), modality_targets=None
            )
        )
    return encoded


def score(evaluator: Evaluator, batches: Sequence[Batch]) -> EpochMetrics:
    """The evaluator's metrics of its model's fuser and head on batches of features."""
    return evaluate(
        FuserHead(evaluator.model),
        batches,
        evaluator.device,
        loss_weights=evaluator.loss_weights,
        precision=evaluator.precision,
        objectives=evaluator.objectives,
    )


def score_outputs(
    evaluator: Evaluator,
    outputs: Outputs,
    targets: torch.Tensor | dict[str, torch.Tensor],
    batch_size: int = 4096,
) -> EpochMetrics:
    """The evaluator's metrics (loss and scores) of `outputs` ([N, C], or one per task)
    against `targets` ([N] or [N, K], or one per task), as `evaluate` scores a model."""
    given = {SINGLE: outputs} if isinstance(outputs, torch.Tensor) else dict(outputs)
    n = len(next(iter(given.values())))
    batches = [
        Batch(
            inputs={k: v[start : start + batch_size] for k, v in given.items()},
            present={SINGLE: torch.ones(min(batch_size, n - start), dtype=torch.bool)},
            targets=_rows(targets, slice(start, start + batch_size)),
        )
        for start in range(0, n, batch_size)
    ]
    return evaluate(
        GivenOutputs(),
        batches,
        evaluator.device,
        loss_weights=evaluator.loss_weights,
        objectives=evaluator.objectives,
    )


def _rows(value: Any, index: slice | torch.Tensor) -> Any:
    """Rows `index` of a tensor or of each tensor of a dict."""
    if isinstance(value, dict):
        return {k: v[index] for k, v in value.items()}
    return value[index]


def _cat(values: Sequence[Any]) -> Any:
    """Tensors (or dicts of tensors) of several batches as one."""
    if isinstance(values[0], dict):
        return {k: torch.cat([v[k] for v in values]) for k in values[0]}
    return torch.cat(list(values))


def _cat_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Batches of one modality stacked along samples; token sequences (and their [B, T]
    masks) of different lengths are padded with zeros (False) to the longest."""
    if tensors[0].dim() >= 2:
        longest = max(t.shape[1] for t in tensors)
        tensors = [
            nn.functional.pad(t, [0, 0] * (t.dim() - 2) + [0, longest - t.shape[1]])
            for t in tensors
        ]
    return torch.cat(list(tensors))


@dataclasses.dataclass
class SplitFeatures:
    """A whole split's features as one tensor per modality (`encode_split`, stacked)."""

    features: dict[str, torch.Tensor]
    """Per modality: [N, D] or [N, T, D] (token sequences padded to the longest)."""
    masks: dict[str, torch.Tensor]
    """Per modality: the fuser's mask, [N] or [N, T]."""
    condition: torch.Tensor | None
    """[N] per-sample condition (conditional heads), or None."""
    targets: torch.Tensor | dict[str, torch.Tensor]

    @classmethod
    def stack(cls, batches: Sequence[Batch]) -> SplitFeatures:
        if not batches:
            raise ValueError("the split has no samples")
        modalities = list(batches[0].inputs)
        conditions = [b.condition for b in batches]
        return cls(
            features={m: _cat_padded([b.inputs[m] for b in batches]) for m in modalities},
            masks={m: _cat_padded([b.present[m] for b in batches]) for m in modalities},
            condition=None if any(c is None for c in conditions) else torch.cat(conditions),
            targets=_cat([b.targets for b in batches]),
        )

    def complete(self) -> torch.Tensor:
        """[N] bool: which samples have every modality (some real token, for sequences)."""
        present = [mask.reshape(len(mask), -1).any(dim=1) for mask in self.masks.values()]
        return torch.stack(present, dim=1).all(dim=1)


def _flatten(outputs: Outputs) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """Outputs as one [R, C_total] float64 tensor, and how to split it back."""
    given = {SINGLE: outputs} if isinstance(outputs, torch.Tensor) else outputs
    parts = [(k, v.reshape(len(v), -1)) for k, v in given.items()]
    flat = torch.cat([v for _, v in parts], dim=1).double()
    return flat, [(k, v.shape[1]) for k, v in parts]


def _unflatten(flat: torch.Tensor, layout: list[tuple[str, int]]) -> Outputs:
    sizes = [n for _, n in layout]
    parts = dict(zip([k for k, _ in layout], flat.split(sizes, dim=1), strict=True))
    return parts[SINGLE] if list(parts) == [SINGLE] else parts


@torch.no_grad()
def _outputs(
    evaluator: Evaluator,
    split: SplitFeatures,
    rows: Sequence[torch.Tensor],
    condition: torch.Tensor | None,
) -> Outputs:
    """The fuser and head on modality m's feature rows `rows[m]` (one index tensor per
    modality, all of one length) under `condition` ([R] or None)."""
    features = {m: split.features[m][i] for m, i in zip(split.features, rows, strict=True)}
    masks = {m: split.masks[m][i] for m, i in zip(split.masks, rows, strict=True)}
    with evaluator.precision.autocast():
        return evaluator.model.from_features(features, masks, condition)


def _model_outputs(
    evaluator: Evaluator, split: SplitFeatures, chunk: int
) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """The model's own outputs on `split`'s samples, flattened ([K, C_total], float64)."""
    k = len(next(iter(split.features.values())))
    parts, layout = [], []
    for start in range(0, k, chunk):
        rows = torch.arange(start, min(start + chunk, k), device=evaluator.device)
        condition = None if split.condition is None else split.condition[rows]
        out, layout = _flatten(_outputs(evaluator, split, [rows] * len(split.features), condition))
        parts.append(out)
    return torch.cat(parts), layout


def _chunk_rows(split: SplitFeatures, chunk_size: int | None) -> int:
    """Rows of fuser + head per chunk: `chunk_size`, or as many as `CHUNK_VALUES` allows."""
    if chunk_size is not None:
        return chunk_size
    per_row = sum(x[0].numel() for x in split.features.values())
    return max(1, CHUNK_VALUES // max(per_row, 1))


@torch.no_grad()
def _projection(
    evaluator: Evaluator,
    split: SplitFeatures,
    condition: torch.Tensor | None,
    chunk: int,
) -> torch.Tensor:
    """The EMAP projection [K, C_total] of every sample of `split` (its K rows), with the
    head's condition `condition` (one value, [1], or None) for every combination."""
    device = evaluator.device
    k = len(next(iter(split.features.values())))
    m = len(split.features)
    total = k**m
    sums: list[torch.Tensor] = []
    grand: torch.Tensor | float = 0.0
    for start in range(0, total, chunk):
        flat = torch.arange(start, min(start + chunk, total), device=device)
        rows = [(flat // k ** (m - 1 - p)) % k for p in range(m)]
        given = None if condition is None else condition.expand(len(flat))
        out, _ = _flatten(_outputs(evaluator, split, rows, given))
        if not sums:
            sums = [out.new_zeros(k, out.shape[1]) for _ in range(m)]
        for p in range(m):
            sums[p].index_add_(0, rows[p], out)
        grand = grand + out.sum(dim=0)
    conditional = [s / k ** (m - 1) for s in sums]  # E[f | x_m = x_m^(i)]
    return sum(conditional) - (m - 1) * grand / total


@dataclasses.dataclass
class Projection:
    """The model's outputs on the projected samples and their EMAP projection (`project`)."""

    outputs: Outputs
    """The model's outputs: [K, C] (float64), or one such tensor per task."""
    projected: Outputs
    """The EMAP projection of `outputs`, shaped alike."""
    targets: torch.Tensor | dict[str, torch.Tensor]
    """The projected samples' targets ([K] or [K, T], or one per task)."""
    samples: torch.Tensor
    """[K] the projected samples' positions in the split (in the evaluator's order)."""
    split_samples: int
    """N, the split's size."""
    left_out: int
    """Samples of the split without every modality, never projected."""
    subsampled: bool
    """Whether `samples` is a random subset of the complete samples."""
    conditions: list[int] | None
    """The distinct head conditions of the projected samples, or None without any."""
    evaluations: int
    """Rows of fuser + head run for the projection: K^M per condition."""


@torch.no_grad()
def project(
    evaluator: Evaluator,
    samples: int | None = None,
    max_evaluations: int = MAX_EVALUATIONS,
    chunk_size: int | None = None,
) -> Projection:
    """The model's outputs (logits, before any softmax) on the evaluator's split and their
    EMAP projection (see the module's docstring for what is computed for M modalities).

    Every modality is encoded once; the fuser and head then run on every combination of
    the samples' features (N^M rows for M modalities, in chunks of `chunk_size` rows, by
    default as many as `CHUNK_VALUES` feature values). Samples lacking a modality are left
    out: the projection averages over values of each modality, and an absent one has none.
    `samples=K` projects a seeded (`evaluator.seed`) random subset of K complete samples
    instead of all N, for K^M evaluations: each average then runs over K values instead of
    N, so the projection is an estimate of the full split's (its error shrinks like
    1/sqrt(K)), and both scores are those of the K samples (comparable with each other, not
    with the full split's score). A conditional head's per-sample `condition` is the
    projected sample's own: the projection is that of each condition's function f(., c),
    over every sample's modalities, once per distinct condition.

    Raises ValueError when no sample has every modality, `samples` is not an integer >= 2,
    or the evaluations would exceed `max_evaluations` (then pass `samples`).
    """
    if samples is not None and (
        isinstance(samples, bool) or not isinstance(samples, int) or samples < 2
    ):
        raise ValueError(f"samples: expected an integer >= 2, got {samples!r}")
    model = evaluator.model
    model.eval()
    split = SplitFeatures.stack(encode_split(evaluator))
    is_complete = split.complete()
    complete = is_complete.nonzero().flatten()
    if len(complete) == 0:
        raise ValueError(
            f"no sample of the {evaluator.split} split has every modality "
            f"({', '.join(model.modalities)}): EMAP needs samples with all of them"
        )
    keep = complete
    subsampled = samples is not None and samples < len(complete)
    if subsampled:
        generator = torch.Generator().manual_seed(evaluator.seed)
        chosen = torch.randperm(len(complete), generator=generator)[:samples]
        keep = complete[chosen.sort().values.to(complete.device)]
    part = SplitFeatures(
        features={m: x[keep] for m, x in split.features.items()},
        masks={m: x[keep] for m, x in split.masks.items()},
        condition=None if split.condition is None else split.condition[keep],
        targets=_rows(split.targets, keep),
    )
    k, n_modalities = len(keep), len(part.features)
    conditions = None if part.condition is None else part.condition.unique().tolist()
    evaluations = k**n_modalities * (1 if conditions is None else len(conditions))
    if evaluations > max_evaluations:
        most = math.floor(max_evaluations ** (1 / n_modalities) + 1e-9)
        raise ValueError(
            f"EMAP of {k} samples and {n_modalities} modalities runs the fuser and head "
            f"{evaluations:,} times, over the limit of {max_evaluations:,}; project a "
            f"random subset of at most {most} samples (samples=, --emap-samples)"
        )
    chunk = _chunk_rows(part, chunk_size)
    outputs, layout = _model_outputs(evaluator, part, chunk)
    if part.condition is None:
        projected = _projection(evaluator, part, None, chunk)
    else:
        projected = torch.empty_like(outputs)
        for c in part.condition.unique():
            rows = part.condition == c
            projected[rows] = _projection(evaluator, part, c.reshape(1), chunk)[rows]
    return Projection(
        outputs=_unflatten(outputs, layout),
        projected=_unflatten(projected, layout),
        targets=part.targets,
        samples=keep,
        split_samples=len(is_complete),
        left_out=len(is_complete) - len(complete),
        subsampled=subsampled,
        conditions=conditions,
        evaluations=evaluations,
    )


def emap(
    evaluator: Evaluator,
    samples: int | None = None,
    max_evaluations: int = MAX_EVALUATIONS,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """The model's scores next to its EMAP projection's on the evaluator's split (`project`,
    with the same arguments and errors), scored by the evaluator's objectives.

    Returns the JSON report, with the keys:

    - `split`, `seed`, `modalities` (in the model's order);
    - `split_samples`: the split's size; `left_out`: samples without every modality;
      `samples`: those projected (all complete ones, or `samples`); `subsampled`: whether
      a subset was drawn;
    - `conditions`: the distinct conditions ([int]) or None; `evaluations`: fuser + head
      rows run (samples^M per condition);
    - `metric`: the main score's name (`fusion.tasks.main_metric`); `lower_is_better`;
    - `model`, `emap`: `{"loss": ..., <metric>: ...}` of the model's outputs and of their
      projection on the projected samples (the task's mean loss per sample and every metric
      of its objectives, fractions in [0, 1]);
    - `gap`: per score, how much better the model does than its projection, in the score's
      units (model - EMAP, or EMAP - model for a lower-is-better score such as the loss or
      MAE): positive when the model uses cross-modal interactions that help;
    - `residual_rms`: the root mean square of (outputs - projection), over samples and
      outputs, in the outputs' units (logits); `residual_ratio`: the sum of its squares
      over that of the outputs' deviations from their mean over samples (0 for an additive
      model; it exceeds 1 when the projection varies where the model does not; None when
      the outputs are constant).
    """
    found = project(evaluator, samples, max_evaluations, chunk_size)
    model_metrics = score_outputs(evaluator, found.outputs, found.targets)
    emap_metrics = score_outputs(evaluator, found.projected, found.targets)
    model_scores = {LOSS_NAME: model_metrics.loss, **model_metrics.scores}
    emap_scores = {LOSS_NAME: emap_metrics.loss, **emap_metrics.scores}
    outputs, _ = _flatten(found.outputs)
    residual = outputs - _flatten(found.projected)[0]
    spread = float((outputs - outputs.mean(dim=0)).pow(2).sum())
    return {
        "split": evaluator.split,
        "seed": evaluator.seed,
        "modalities": list(evaluator.model.modalities),
        "split_samples": found.split_samples,
        "left_out": found.left_out,
        "samples": len(found.samples),
        "subsampled": found.subsampled,
        "conditions": found.conditions,
        "evaluations": found.evaluations,
        "metric": model_metrics.main,
        "lower_is_better": lower_is_better(model_metrics.main),
        "model": model_scores,
        "emap": emap_scores,
        "gap": {
            name: (
                emap_scores[name] - value if lower_is_better(name) else value - emap_scores[name]
            )
            for name, value in model_scores.items()
        },
        "residual_rms": float(residual.pow(2).mean().sqrt()),
        "residual_ratio": float(residual.pow(2).sum()) / spread if spread > 0 else None,
    }


def format_change(metric: str, value: float) -> str:
    """A signed difference of `metric`: percentage points for fractions, else 4 decimals."""
    return f"{100 * value:+.2f} pp" if is_fraction(metric) else f"{value:+.4f}"


def emap_table(report: dict[str, Any]) -> str:
    """The model's and its EMAP projection's scores, and the gap, one column per score."""
    names = list(report["model"])
    lines = [
        f"| {report['split']} ({report['samples']} samples) |" + "".join(f" {n} |" for n in names),
        "|---|" + "---:|" * len(names),
        "| model |" + "".join(f" {format_score(n, report['model'][n])} |" for n in names),
        "| EMAP |" + "".join(f" {format_score(n, report['emap'][n])} |" for n in names),
        "| gap |" + "".join(f" {format_change(n, report['gap'][n])} |" for n in names),
    ]
    subset = " (a seeded random subset)" if report["subsampled"] else ""
    ratio = report["residual_ratio"]
    against = "" if ratio is None else f", {ratio:.3g} x the outputs' spread (sum of squares)"
    lines.append(
        f"\nEMAP (Hessel & Lee 2020) of the model's outputs on {report['split']}: "
        f"{report['samples']} of {report['split_samples']} samples{subset}, "
        f"{report['left_out']} left out for a missing modality; {report['evaluations']:,} "
        f"evaluations of fuser + head. Outputs minus projection: RMS "
        f"{report['residual_rms']:.4g}{against}. gap: how much better the model scores than "
        "its additive projection (positive: its cross-modal interactions help)"
    )
    return "\n".join(lines)


def plot_emap(report: dict[str, Any], path: Path) -> None:
    """The model's and its projection's scores side by side, one pair of bars per score
    (the loss aside), each bar labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in report["model"] if n != LOSS_NAME] or [LOSS_NAME]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 4))
    width = 0.38
    for offset, label, key in ((-width / 2, "model", "model"), (width / 2, "EMAP", "emap")):
        values = [report[key][n] for n in names]
        bars = ax.bar([i + offset for i in range(len(names))], values, width, label=label)
        ax.bar_label(
            bars,
            labels=[format_score(n, v) for n, v in zip(names, values, strict=True)],
            fontsize=8,
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(f"{report['split']} score ({report['samples']} samples)")
    if all(is_fraction(n) for n in names):
        ax.set_ylim(0, 1.1)
    ax.set_title("model vs its additive projection (EMAP)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
