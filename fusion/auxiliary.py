"""Auxiliary losses beside the task loss while the fused model trains, on each modality's
encoder features:

- **unimodal**: a linear head per modality and task, trained on that modality alone with
  the task's own objective. Fused training lets the strongest modality carry the loss while
  the others' encoders learn little (Wang et al., "What Makes Training Multi-Modal
  Classification Networks Hard?", CVPR 2020); a loss per modality keeps every encoder
  learning. AutoGluon-multimodal's fusion model adds the same per-modality losses
  (`aux_loss_weight`).
- **contrastive**: CLIP's symmetric InfoNCE between pairs of modalities
  (`fusion.contrastive.ContrastivePairs`), pulling each sample's modalities together.

Both change the fused model only through its encoders, so they matter when the encoders
train (stage 2 with `unfreeze`). `AuxiliaryTraining` wraps a `MultimodalModel` for
training: given the targets it returns the outputs and these losses; the wrapped model's
parameters, state and checkpoints are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Set
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fusion.contrastive import CLIP_INITIAL_TEMPERATURE, ContrastivePairs, pooled
from fusion.data import TARGET_KEY
from fusion.tasks import Objective

if TYPE_CHECKING:  # the model's modules import the training loop, which imports this
    from fusion.model import MultimodalModel


class AuxiliaryLosses(nn.Module):
    """Unimodal and contrastive losses on encoder features, each with its weight.

    `in_dims`: each modality's feature size; `objectives`: the tasks, by name, whose targets
    the unimodal heads predict (each head has `task.num_outputs` outputs). `unimodal` and
    `contrastive` are the weights (0 leaves a loss out; `pairs` are needed for a contrastive
    weight). `forward(features, masks, targets)` gives each weighted loss summed over the
    batch, as the task loss is: `unimodal/<modality>` (over the samples that have it, the
    tasks' losses added with `loss_weights`) and `contrastive/<a>_<b>` (InfoNCE, times the
    batch size). Raises ValueError for a negative or non-finite weight, nothing to compute,
    or a pair of unknown modalities.
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
        self.unimodal_weight, self.contrastive_weight = float(unimodal), float(contrastive)
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

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
        targets: torch.Tensor | Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """`features[m]`: `[B, D_m]` or tokens `[B, T, D_m]`; `masks[m]`: the encoder's
        output mask (absent: present everywhere); `targets`: the batch's, one tensor for a
        single task or a dict by task name."""
        if not isinstance(targets, Mapping):
            if len(self.objectives) != 1:
                raise ValueError(
                    f"one target per sample, but the auxiliary heads predict tasks "
                    f"{list(self.objectives)}"
                )
            targets = {next(iter(self.objectives)): targets}
        losses = {}
        for m, heads in self.heads.items():
            vector, present = pooled(features[m], masks.get(m))
            total = vector.new_zeros(())
            for task, head in heads.items():
                outputs = head(vector[present])
                objective = self.objectives[task]
                y = objective.targets(outputs, targets[task][present], f"{TARGET_KEY}.{task}")
                total = total + self.loss_weights.get(task, 1.0) * objective.loss_sum(outputs, y)
            losses[f"unimodal/{m}"] = self.unimodal_weight * total
        if self.contrastive is not None:
            batch = len(next(iter(features.values())))
            embedded = self.contrastive.embed(features, masks)
            for name, (loss, _) in self.contrastive.pair_losses(embedded).items():
                losses[f"contrastive/{name}"] = self.contrastive_weight * batch * loss
        return losses


class AuxiliaryTraining(nn.Module):
    """`model` with `auxiliary` losses on its encoders' features, for training.

    `forward(inputs, present, condition, encoded, targets)`: in training mode with
    `targets`, `(outputs, losses)` (`AuxiliaryLosses`; the features are those the fuser
    gets, before modality dropout); otherwise the model's outputs alone, so evaluation is
    the model's. Checkpoints of `model` (`best.pt`) hold none of the auxiliary parts.
    """

    def __init__(self, model: MultimodalModel, auxiliary: AuxiliaryLosses) -> None:
        super().__init__()
        unknown = sorted(set(auxiliary.heads) - set(model.encoders))
        if auxiliary.contrastive is not None:
            unknown += sorted(set(auxiliary.contrastive.modalities) - set(model.encoders))
        if unknown:
            raise ValueError(
                f"the auxiliary losses are for modalities {unknown} the model does not have "
                f"(it has {model.modalities})"
            )
        self.model = model
        self.auxiliary = auxiliary

    def forward(
        self,
        inputs: Mapping[str, Any],
        present: Mapping[str, torch.Tensor] | None = None,
        condition: torch.Tensor | None = None,
        encoded: Set[str] = frozenset(),
        targets: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    ) -> Any:
        if targets is None or not self.training:
            return self.model(inputs, present, condition, encoded)
        features = self.model.encode(inputs, encoded, present)
        masks = self.model.output_masks(inputs, present, encoded)
        outputs = self.model.from_features(features, masks, condition)
        return outputs, self.auxiliary(features, masks, targets)


def trains_auxiliary(model: nn.Module) -> bool:
    """Whether `model` (or the module DDP wraps) takes targets and returns auxiliary losses."""
    return isinstance(getattr(model, "module", model), AuxiliaryTraining)
