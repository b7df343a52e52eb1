"""What stage 2 can add to the task loss, on each modality's encoder features:

- **unimodal** losses: a linear head per modality and task, trained on that modality alone
  with the task's own objective. Fused training lets the strongest modality carry the loss
  while the others' encoders learn little (Wang et al., "What Makes Training Multi-Modal
  Classification Networks Hard?", CVPR 2020); a loss per modality keeps every encoder
  learning. AutoGluon-multimodal's fusion model adds the same per-modality losses
  (`aux_loss_weight`). Gradient-Blending (`fusion.imbalance.GradientBlending`) sets their
  weights and the task loss's from each head's overfitting-to-generalization ratio.
- **contrastive** losses: CLIP's symmetric InfoNCE between pairs of modalities
  (`fusion.contrastive.ContrastivePairs`), pulling each sample's modalities together.
- **gradient modulation**: OGM-GE (`fusion.imbalance.OGMGE`) slows the encoder of the
  modality that dominates the fused prediction.

All of them reach the fused model only through its encoders, so they matter when the
encoders train (stage 2 with `unfreeze`). `AuxiliaryTraining` wraps a `MultimodalModel` for
training: given the targets it returns the outputs and the `Terms` to add; the wrapped
model's parameters, state and checkpoints are unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fusion.contrastive import CLIP_INITIAL_TEMPERATURE, ContrastivePairs, pooled
from fusion.data import TARGET_KEY
from fusion.tasks import Objective

if TYPE_CHECKING:  # the model's modules import the training loop, which imports this
    from fusion.imbalance import OGMGE, GradientBlending
    from fusion.model import MultimodalModel

TASK = "task"  # the task loss's entry in `Terms.weights`


@dataclass
class Terms:
    """What a training wrapper adds to one batch's task loss.

    `losses`: each auxiliary loss summed over the batch (as the task loss is), unweighted;
    `weights`: the weight of each, and of the task loss under "task"; `logs`: per-step
    diagnostics (OGM-GE's ratios and coefficients)."""

    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    logs: dict[str, float] = field(default_factory=dict)

    def total(self, task_loss: torch.Tensor) -> torch.Tensor:
        """The loss to train on: the weighted sum of the task loss and the others."""
        out = self.weights.get(TASK, 1.0) * task_loss
        for name, loss in self.losses.items():
            out = out + self.weights[name] * loss
        return out


class AuxiliaryLosses(nn.Module):
    """Unimodal and contrastive losses on encoder features, and their weights.

    `in_dims`: each modality's feature size; `objectives`: the tasks, by name, whose targets
    the unimodal heads predict (each head has `task.num_outputs` outputs). `unimodal` and
    `contrastive` are the weights (0 leaves a loss out; `pairs` are needed for a contrastive
    weight). `forward(features, masks, targets)` gives each loss summed over the batch, as
    the task loss is: `unimodal/<modality>` (over the samples that have it, the tasks'
    losses added with `loss_weights`) and `contrastive/<a>_<b>` (InfoNCE times the batch
    size; in evaluation, each process's pairs alone, as processes may hold different
    numbers of batches there). `weights()` gives each loss's weight and the task loss's ("task", 1 unless
    Gradient-Blending sets it); they are a buffer, so a resumed run continues with them.
    Raises ValueError for a negative or non-finite weight, nothing to compute, or a pair of
    unknown modalities.
    """

    def __init__(
        self,
        in_dims: Mapping[str, int],
        objectives: Mapping[str, Objective],
        unimodal: float = 0.0,
        contrastive: float = 0.0,
        pairs: Sequence[Sequence[str]] = (),
        projection_dim: int = 64,
        temperature: float = CLIP_INITIAL_TEMPERATURE,
        loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        for name, weight in (("unimodal", unimodal), ("contrastive", contrastive)):
            if isinstance(weight, bool) or not 0 <= weight < math.inf:
                raise ValueError(f"{name}: expected a finite weight >= 0, got {weight!r}")
        if contrastive and not pairs:
            raise ValueError("pairs: a contrastive weight needs pairs, e.g. [[image, audio]]")
        if pairs and not contrastive:
            raise ValueError("contrastive: pairs are given but their weight is 0")
        if not unimodal and not contrastive:
            raise ValueError("unimodal: every auxiliary weight is 0, so there is nothing to add")
        self.objectives = dict(objectives)
        self.loss_weights = dict(loss_weights or {})
        self.heads = nn.ModuleDict()
        if unimodal:
            self.heads = nn.ModuleDict(
                {
                    m: nn.ModuleDict(
                        {t: nn.Linear(dim, o.task.num_outputs) for t, o in self.objectives.items()}
                    )
                    for m, dim in in_dims.items()
                }
            )
        self.contrastive = (
            ContrastivePairs(in_dims, pairs, projection_dim, temperature) if pairs else None
        )
        names = [f"unimodal/{m}" for m in self.heads]
        names += [f"contrastive/{p}" for p in (self.contrastive.losses if pairs else [])]
        self.names = [TASK, *names]
        initial = (
            [1.0] + [unimodal] * len(self.heads) + [contrastive] * (len(names) - len(self.heads))
        )
        self.register_buffer("weight_values", torch.tensor(initial, dtype=torch.float64))

    def weights(self) -> dict[str, float]:
        return dict(zip(self.names, self.weight_values.tolist(), strict=True))

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Set some weights by name (`weights()`'s names); KeyError for another name."""
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise KeyError(f"no auxiliary loss {unknown}; there are {self.names}")
        for name, value in weights.items():
            self.weight_values[self.names.index(name)] = float(value)

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
        targets: torch.Tensor | Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """`features[m]`: `[B, D_m]` or tokens `[B, T, D_m]`; `masks[m]`: the encoder's
        output mask (absent: present everywhere); `targets`: the batch's, one tensor for a
        single task or a dict by task name."""
        targets = by_task(targets, self.objectives)
        losses = {}
        for m, heads in self.heads.items():
            vector, present = pooled(features[m], masks.get(m))
            total = vector.new_zeros(())
            for task, head in heads.items():
                outputs = head(vector[present])
                objective = self.objectives[task]
                y = objective.targets(outputs, targets[task][present], f"{TARGET_KEY}.{task}")
                total = total + self.loss_weights.get(task, 1.0) * objective.loss_sum(outputs, y)
            losses[f"unimodal/{m}"] = total
        if self.contrastive is not None:
            batch = len(next(iter(features.values())))
            embedded = self.contrastive.embed(features, masks)
            pairs = self.contrastive.pair_losses(embedded, gather=self.training)
            for name, (loss, _) in pairs.items():
                losses[f"contrastive/{name}"] = batch * loss
        return losses


def by_task(
    targets: torch.Tensor | Mapping[str, torch.Tensor], objectives: Mapping[str, Objective]
) -> Mapping[str, torch.Tensor]:
    """A batch's targets keyed by task name (one tensor is the single task's)."""
    if isinstance(targets, Mapping):
        return targets
    if len(objectives) != 1:
        raise ValueError(f"one target per sample, but the tasks are {list(objectives)}")
    return {next(iter(objectives)): targets}


class AuxiliaryTraining(nn.Module):
    """`model` trained with `auxiliary` losses, OGM-GE `modulation` and Gradient-Blending
    `blending` (any of them) on its encoders' features.

    `forward(inputs, present, condition, encoded, targets)`: with `targets`, `(outputs,
    Terms)` (the auxiliary losses, also in evaluation, so their validation values are
    known; the features are those the fuser gets, before modality dropout; the modulation
    in training only); without, the model's outputs alone. Checkpoints of `model`
    (`best.pt`) hold none of the auxiliary parts. Raises ValueError when a part names a
    modality the model lacks, or Gradient-Blending comes without unimodal heads.
    """

    def __init__(
        self,
        model: MultimodalModel,
        auxiliary: AuxiliaryLosses | None = None,
        modulation: OGMGE | None = None,
        blending: GradientBlending | None = None,
    ) -> None:
        super().__init__()
        if auxiliary is None and modulation is None:
            raise ValueError("AuxiliaryTraining needs auxiliary losses or a gradient modulation")
        used = set(modulation.modalities if modulation is not None else ())
        if auxiliary is not None:
            used |= set(auxiliary.heads)
            used |= set(auxiliary.contrastive.modalities if auxiliary.contrastive else ())
        unknown = sorted(used - set(model.encoders))
        if unknown:
            raise ValueError(
                f"the auxiliary losses are for modalities {unknown} the model does not have "
                f"(it has {model.modalities})"
            )
        if blending is not None:
            heads = [f"unimodal/{m}" for m in (auxiliary.heads if auxiliary else ())]
            if heads != blending.heads[1:]:
                raise ValueError(
                    f"Gradient-Blending weighs the heads {blending.heads[1:]}, the auxiliary "
                    f"losses have {heads}"
                )
            auxiliary.set_weights(blending.initial_weights())
        self.model = model
        self.auxiliary = auxiliary
        self.modulation = modulation
        self.blending = blending
        if modulation is not None:
            modulation.attach(model.encoders)

    def start_epoch(self, epoch: int) -> None:
        """Tell the gradient modulation the epoch (it is active for some), and which encoder
        parameters train now (after gradual unfreezing)."""
        if self.modulation is not None:
            self.modulation.set_epoch(epoch)
            self.modulation.attach(self.model.encoders)

    def end_epoch(self, epoch: int, metrics: Mapping[str, float]) -> dict[str, float] | None:
        """Re-estimate Gradient-Blending's weights from an epoch's metrics; the new weights,
        or None when none were set."""
        if self.blending is None:
            return None
        weights = self.blending.update(epoch, metrics)
        if weights is not None:
            self.auxiliary.set_weights(weights)
        return weights

    def forward(
        self,
        inputs: Mapping[str, Any],
        present: Mapping[str, torch.Tensor] | None = None,
        condition: torch.Tensor | None = None,
        encoded: Set[str] = frozenset(),
        targets: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    ) -> Any:
        if targets is None:
            return self.model(inputs, present, condition, encoded)
        features = self.model.encode(inputs, encoded, present)
        masks = self.model.output_masks(inputs, present, encoded)
        terms = Terms()
        if self.modulation is not None and self.training:
            with evaluating(self.model.fuser, self.model.head), torch.no_grad():
                scores = self.modulation.scores(
                    lambda m: self.model.head(self.model.fuser(features, m), condition),
                    masks,
                    targets,
                )
            features, terms.logs = self.modulation.modulate(features, scores)
        outputs = self.model.from_features(features, masks, condition)
        if self.auxiliary is not None:
            terms.losses = self.auxiliary(features, masks, targets)
            terms.weights = self.auxiliary.weights()
        return outputs, terms


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """`modules` in eval mode (no dropout, running statistics) for the block, then back."""
    modes = [[m.training for m in module.modules()] for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, kept in zip(modules, modes, strict=True):
            for m, training in zip(module.modules(), kept, strict=True):
                m.training = training


def trains_auxiliary(model: nn.Module) -> bool:
    """Whether `model` (or the module DDP wraps) takes targets and returns `Terms`."""
    return isinstance(getattr(model, "module", model), AuxiliaryTraining)
