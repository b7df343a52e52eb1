"""Contrastive alignment of encoders (CLIP-style), as a training stage before the probe or
the fusion: each encoder gets a linear projection, and every configured pair of modalities
is pulled together by the symmetric InfoNCE loss (`fusion.contrastive.InfoNCE`) on the
samples that have both. Validation scores the loss and cross-modal retrieval over the whole
split (`fusion.analysis.retrieval`): by pair, or by label when the data has one
classification task (an image retrieves a clip of the same digit).

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision"
(CLIP, ICML 2021): projections to a shared space, L2-normalized, a learned temperature.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fusion.analysis.retrieval import retrieval_metrics
from fusion.batch import Batch
from fusion.contrastive import ContrastivePairs, pair_name
from fusion.encoders.base import Encoder
from fusion.model import zero_masked
from fusion.surgery import param_groups
from fusion.training.distributed import SINGLE, Distributed
from fusion.training.loop import NonFiniteError, data_parallel, finite_on_every_process
from fusion.training.optim import build_optimizer, build_schedule

log = logging.getLogger("fusion")


class AlignmentModel(nn.Module):
    """Encoders, and a linear projection of each to `projection_dim` with an InfoNCE loss
    (with its own learned temperature) per pair of modalities (`ContrastivePairs`).

    Token encoders are pooled by their mask's mean before the projection. `forward(batch)`
    gives the mean of the pairs' losses; each pair's loss is over the samples with both
    modalities present. Raises ValueError for a pair of unknown modalities.
    """

    def __init__(
        self,
        encoders: Mapping[str, Encoder],
        pairs: Sequence[Sequence[str]],
        projection_dim: int = 64,
        temperature: float = 0.07,
    ) -> None:
        super().__init__()
        self.contrastive = ContrastivePairs(
            {m: e.out_dim for m, e in encoders.items()}, pairs, projection_dim, temperature
        )
        self.encoders = nn.ModuleDict({m: encoders[m] for m in self.contrastive.modalities})

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return self.contrastive.pairs

    def embed(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each aligned modality's projected embedding `[B, projection_dim]` and whether the
        sample has it `[B]`."""
        features, masks = {}, {}
        for m, encoder in self.encoders.items():
            mask = batch.present.get(m)
            features[m] = encoder.encode(zero_masked(batch.inputs[m], mask), mask)
            masks[m] = encoder.output_mask(batch.inputs[m], mask)
        return self.contrastive.embed(features, masks)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.contrastive.loss(self.embed(batch))


@dataclass
class AlignResult:
    """The kept epoch's metrics (`best`: val loss and retrieval), each epoch's, and the
    number of epochs run."""

    best: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def evaluate_alignment(
    model: AlignmentModel,
    batches: Iterable[Batch],
    device: torch.device,
    labels: Callable[[Batch], torch.Tensor | None] = lambda batch: None,
    prefix: str = "val",
    distributed: Distributed = SINGLE,
) -> dict[str, float]:
    """Over the whole split: the mean over pairs of InfoNCE with every sample of the split
    as a candidate (so it does not depend on the batch size or the number of processes),
    and per pair, retrieval (recall@1, 5, 10 and median rank, both directions; by `labels`
    when they give class indices). With `distributed`, each process holds its share of the
    batches. Keys: `<prefix>/loss`, `<prefix>/<a>_to_<b>/R@1`, ...

    Raises ValueError when fewer than 2 samples of the split have both modalities of a pair.
    """
    model.eval()
    kept: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        batch = batch.to(device)
        embedded = model.embed(batch)
        y = labels(batch)
        for a, b in model.pairs:
            both = embedded[a][1] & embedded[b][1]
            kept.setdefault(f"{a}|{b}|a", []).append(embedded[a][0][both].cpu())
            kept.setdefault(f"{a}|{b}|b", []).append(embedded[b][0][both].cpu())
            if y is not None:
                kept.setdefault(f"{a}|{b}|y", []).append(y[both].cpu())
    parts = [p for p in distributed.gather({k: torch.cat(v) for k, v in kept.items()}) if p]
    if not parts:
        raise ValueError("no batches to evaluate the alignment on")
    out, losses = {}, []
    for a, b in model.pairs:
        ea, eb = (torch.cat([p[f"{a}|{b}|{side}"] for p in parts]) for side in "ab")
        y = torch.cat([p[f"{a}|{b}|y"] for p in parts]) if f"{a}|{b}|y" in parts[0] else None
        if len(ea) < 2:
            raise ValueError(f"fewer than 2 samples have both {a} and {b}: nothing to retrieve")
        info_nce = model.contrastive.losses[pair_name((a, b))]
        losses.append(float(info_nce(ea.to(device), eb.to(device), gather=False)))
        found = retrieval_metrics(ea, eb, (a, b), y)
        out.update({f"{prefix}/{k}": v for k, v in found.items()})
    return {f"{prefix}/loss": sum(losses) / len(losses), **out}


def fit_alignment(
    model: AlignmentModel,
    train_batches: Iterable[Batch],
    val_batches: Iterable[Batch],
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    device: torch.device,
    labels: Callable[[Batch], torch.Tensor | None] = lambda batch: None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    desc: str = "align",
    distributed: Distributed = SINGLE,
) -> AlignResult:
    """Train `model` with AdamW and cosine decay (no decay on norms, biases and the
    temperatures' log scale); keep the epoch with the lowest validation loss.

    With `distributed`, each process trains on its share of every batch through
    DistributedDataParallel, with the negatives of every process (`InfoNCE`): the same
    loss as one process on the whole batch. A loader's sampler with `set_epoch` is told
    each epoch.

    Raises `fusion.training.loop.NonFiniteError` naming the epoch and step when the loss is
    not finite (on any process), and ValueError for `epochs` < 1."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    model.to(device)
    step_model = data_parallel(model, device) if distributed.enabled else model
    optimizer = build_optimizer(None, param_groups(model, lr, weight_decay), lr, weight_decay)
    schedule = build_schedule(optimizer, None, epochs)
    sampler = getattr(train_batches, "sampler", None)
    best: dict[str, float] = {}
    best_state = None
    history = []
    for epoch in range(1, epochs + 1):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        total, count = 0.0, 0
        for step, batch in enumerate(train_batches, start=1):
            batch = batch.to(device)
            loss = step_model(batch)
            if not finite_on_every_process(loss, distributed):
                where = f"is {loss.item()}" if not torch.isfinite(loss) else "is not finite"
                raise NonFiniteError(
                    f"stage '{desc}': the InfoNCE loss {where} at epoch {epoch}, step {step} "
                    "(on this or another process); check the inputs for NaN/Inf values or "
                    "lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            count += len(batch)
        schedule.step()
        total, count = distributed.all_sum([total, float(count)])
        metrics = {"epoch": epoch, "train/loss": total / max(count, 1)}
        metrics.update(
            evaluate_alignment(model, val_batches, device, labels, distributed=distributed)
        )
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if math.isfinite(metrics["val/loss"]) and (
            not best or metrics["val/loss"] < best["val/loss"]
        ):
            best, best_state = metrics, copy.deepcopy(model.state_dict())
    if best_state is None:
        raise NonFiniteError(f"stage '{desc}': no epoch had a finite validation loss")
    model.load_state_dict(best_state)
    log.info("stage '%s': kept epoch %d (val loss %.4f)", desc, best["epoch"], best["val/loss"])
    return AlignResult(best, history)
