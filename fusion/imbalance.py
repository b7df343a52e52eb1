"""Remedies for modality imbalance: when one modality carries the fused loss, the others'
encoders stop learning (Wang et al. 2020; Peng et al. 2022). Both act on the encoders, so
they apply while the encoders train (stage 2 with `unfreeze`); `fusion.auxiliary`'s
`AuxiliaryTraining` runs them.

- `OGMGE`: on-the-fly gradient modulation with generalization enhancement (Peng et al.,
  "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022).
- `GradientBlending`: loss weights of the fused and the unimodal heads from their
  overfitting-to-generalization ratios (Wang et al., "What Makes Training Multi-Modal
  Classification Networks Hard?", CVPR 2020), estimated online during training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from fusion.auxiliary import TASK, by_task
from fusion.contrastive import distributed_world
from fusion.tasks import CLASSIFICATION, Objective


class _ScaleGradient(torch.autograd.Function):
    """The identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x`, through which the gradient flows back times `scale`: every parameter before it
    gets `scale` times its gradient."""
    return x if scale == 1.0 else _ScaleGradient.apply(x, scale)


class OGMGE:
    """OGM-GE for a model with one classification task (Peng et al., CVPR 2022, eq. 10).

    At each training step, each modality's score is the mean over the batch (of the samples
    that have it) of the probability the model gives the true class with only that modality
    present (its `present` masks cleared for the others; the paper reads the same from its
    concatenation's per-modality half of the output layer). The ratio of a modality is its
    score over the mean score of the others (for two modalities, the paper's ratio). A
    modality whose ratio is above 1 dominates: its encoder's gradients are multiplied by
    k = 1 - tanh(alpha * ratio), others by 1. With `noise` (GE), every encoder parameter's
    gradient then gets Gaussian noise of that gradient's standard deviation (as the
    authors' code adds it). Active from `start_epoch` to `end_epoch` (None: the last);
    `set_epoch` tells it the epoch. Scores are over every process's samples under DDP.

    Raises ValueError for fewer than 2 modalities, a task that is not multiclass or binary,
    `alpha` not a finite number > 0, or epochs out of order.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        objectives: Mapping[str, Objective],
        alpha: float = 0.5,
        noise: bool = True,
        start_epoch: int = 1,
        end_epoch: int | None = None,
    ) -> None:
        if len(modalities) < 2:
            raise ValueError(f"OGM-GE balances 2 or more modalities, got {list(modalities)}")
        kinds = {name: o.task.kind for name, o in objectives.items()}
        if len(kinds) != 1 or next(iter(kinds.values())) not in CLASSIFICATION:
            raise ValueError(
                f"OGM-GE scores one classification task (multiclass or binary), got {kinds}"
            )
        if isinstance(alpha, bool) or not 0 < alpha < math.inf:
            raise ValueError(f"alpha: expected a finite number > 0, got {alpha!r}")
        if start_epoch < 1 or (end_epoch is not None and end_epoch < start_epoch):
            raise ValueError(
                f"start_epoch / end_epoch: expected 1 <= start_epoch <= end_epoch, got "
                f"{start_epoch} / {end_epoch}"
            )
        self.modalities = list(modalities)
        self.objectives = dict(objectives)
        self.alpha, self.noise = float(alpha), bool(noise)
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.epoch = 1
        self._noisy = False  # whether the backward pass under way adds GE's noise
        self._hooked: set[int] = set()  # parameters whose gradients get GE's noise

    @property
    def active(self) -> bool:
        return self.start_epoch <= self.epoch and (
            self.end_epoch is None or self.epoch <= self.end_epoch
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def attach(self, encoders: Mapping[str, nn.Module]) -> None:
        """Add GE's noise to the gradients of `encoders`' trainable parameters (while
        active). Call again when more become trainable (gradual unfreezing): each parameter
        gets its hook once."""
        for modality in self.modalities:
            for parameter in encoders[modality].parameters():
                if parameter.requires_grad and id(parameter) not in self._hooked:
                    self._hooked.add(id(parameter))
                    parameter.register_hook(self._add_noise)

    def _add_noise(self, grad: torch.Tensor) -> torch.Tensor:
        if not self._noisy or grad.numel() < 2:
            return grad
        return grad + torch.randn_like(grad) * grad.std()

    def scores(
        self,
        predict: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        masks: Mapping[str, torch.Tensor],
        targets: torch.Tensor | Mapping[str, torch.Tensor],
    ) -> dict[str, float]:
        """Each modality's score: `predict(masks)` gives the logits `[B, C]` for the given
        presence masks; the score is the mean true-class probability with only that
        modality present, over the samples that have it (on every process)."""
        y = next(iter(by_task(targets, self.objectives).values()))
        batch = len(y)
        sums = []
        for m in self.modalities:
            only = {u: (mask if u == m else torch.zeros_like(mask)) for u, mask in masks.items()}
            for u in self.modalities:  # a modality without a mask is present everywhere
                if u not in only:
                    only[u] = torch.full((batch,), u == m, dtype=torch.bool, device=y.device)
            probs = predict(only).float().softmax(dim=1)
            true = probs[torch.arange(batch, device=y.device), y]
            has = only[m] if only[m].dim() == 1 else only[m].any(dim=1)
            sums += [true[has].sum(), has.sum().to(true.dtype)]
        totals = torch.stack(sums).double()
        if distributed_world() > 1:
            dist.all_reduce(totals)
        totals = totals.tolist()
        return {
            m: totals[2 * i] / max(totals[2 * i + 1], 1.0) for i, m in enumerate(self.modalities)
        }

    def coefficients(
        self, scores: Mapping[str, float]
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Each modality's ratio (its score over the others' mean score) and coefficient
        (1 - tanh(alpha * ratio) above a ratio of 1, else 1; 1 for all while inactive)."""
        ratios, coefficients = {}, {}
        for m in self.modalities:
            others = [scores[u] for u in self.modalities if u != m]
            mean = sum(others) / len(others)
            ratios[m] = scores[m] / mean if mean > 0 else math.inf
            dominant = ratios[m] > 1 and self.active
            coefficients[m] = 1 - math.tanh(self.alpha * ratios[m]) if dominant else 1.0
        return ratios, coefficients

    def modulate(
        self, features: Mapping[str, torch.Tensor], scores: Mapping[str, float]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """`features` through which each modality's gradient flows back times its
        coefficient, and the step's ratios and coefficients (`ogm/ratio/<m>`, ...)."""
        ratios, coefficients = self.coefficients(scores)
        self._noisy = self.noise and self.active
        out = {
            m: scale_gradient(x, coefficients[m]) if m in coefficients else x
            for m, x in features.items()
        }
        logs = {f"ogm/ratio/{m}": r for m, r in ratios.items()}
        logs.update({f"ogm/coefficient/{m}": k for m, k in coefficients.items()})
        return out, logs


class GradientBlending(nn.Module):
    """Online Gradient-Blending (Wang et al., CVPR 2020, sec. 3.3 and Alg. 1) of the fused
    head's loss ("task") and the unimodal heads' (`unimodal/<m>`, `fusion.auxiliary`).

    Every `every` epochs, from each head's mean training and validation losses at the last
    estimate (N) and now (N + n): overfitting O = L_val - L_train, the generalization gained
    dG = L_val(N) - L_val(N + n), the overfitting gained dO = O(N + n) - O(N), and the head's
    weight w = dG / dO^2 (0 when it generalized no better), normalized over the heads to sum
    to 1; until the first estimate every head weighs the same (`initial_weights`). The last
    estimate's losses are a buffer, so a resumed run continues from them.
    """

    def __init__(self, modalities: Sequence[str], every: int = 1) -> None:
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected an integer >= 1 (epochs), got {every!r}")
        if not modalities:
            raise ValueError("Gradient-Blending weighs unimodal heads; there are none")
        self.every = every
        self.heads = [TASK, *(f"unimodal/{m}" for m in modalities)]
        self.register_buffer("previous", torch.zeros(len(self.heads), 2, dtype=torch.float64))
        self.register_buffer("previous_epoch", torch.zeros((), dtype=torch.long))

    def initial_weights(self) -> dict[str, float]:
        return {head: 1 / len(self.heads) for head in self.heads}

    def losses(self, metrics: Mapping[str, float]) -> torch.Tensor:
        """Each head's (train, val) mean loss from an epoch's metrics."""
        rows = []
        for head in self.heads:
            key = "loss" if head == TASK else f"aux/{head}"
            rows.append([metrics[f"train/{key}"], metrics[f"val/{key}"]])
        return torch.tensor(rows, dtype=torch.float64)

    def update(self, epoch: int, metrics: Mapping[str, float]) -> dict[str, float] | None:
        """After `epoch` (its metrics, with `train/` and `val/` losses of every head): the
        new weights when an estimate is due and some head generalized better, else None."""
        if epoch - int(self.previous_epoch) < self.every:
            return None
        now = self.losses(metrics)
        before, first = self.previous.clone(), int(self.previous_epoch) == 0
        self.previous.copy_(now)
        self.previous_epoch.fill_(epoch)
        if first:
            return None
        gained = before[:, 1] - now[:, 1]
        overfit = (now[:, 1] - now[:, 0]) - (before[:, 1] - before[:, 0])
        raw = gained.clamp(min=0) / overfit.square().clamp(min=1e-12)
        if not torch.isfinite(raw).all() or raw.sum() <= 0:
            return None
        return dict(zip(self.heads, (raw / raw.sum()).tolist(), strict=True))
