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
from fusion.contrastive import InfoNCE
from fusion.encoders.base import Encoder
from fusion.fusers.transformer import masked_mean
from fusion.model import zero_masked
from fusion.surgery import param_groups
from fusion.training.optim import build_optimizer, build_schedule

log = logging.getLogger("fusion")


def pair_name(pair: Sequence[str]) -> str:
    return f"{pair[0]}_{pair[1]}"


def check_pairs(pairs: object, modalities: Sequence[str]) -> list[tuple[str, str]]:
    """`pairs` as a list of distinct modality pairs of `modalities`; ValueError naming the
    pair otherwise."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError(
            f"pairs: expected a list of modality pairs, e.g. [[image, audio]], got {pairs!r}"
        )
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"pairs[{i}]: expected two modality names, got {pair!r}")
        a, b = (str(m) for m in pair)
        unknown = [m for m in (a, b) if m not in modalities]
        if unknown:
            raise ValueError(
                f"pairs[{i}]: the data has no modality {unknown[0]!r}; it has {list(modalities)}"
            )
        if a == b:
            raise ValueError(f"pairs[{i}]: a modality is aligned with another, got [{a}, {b}]")
        if (a, b) in out or (b, a) in out:
            raise ValueError(f"pairs[{i}]: [{a}, {b}] is listed twice")
        out.append((a, b))
    return out


class AlignmentModel(nn.Module):
    """Encoders, a linear projection of each to `projection_dim`, and an InfoNCE loss (with
    its own learned temperature) per pair of modalities.

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
        self.pairs = check_pairs(pairs, list(encoders))
        used = list(dict.fromkeys(m for pair in self.pairs for m in pair))
        self.encoders = nn.ModuleDict({m: encoders[m] for m in used})
        self.projections = nn.ModuleDict(
            {m: nn.Linear(encoders[m].out_dim, projection_dim) for m in used}
        )
        self.losses = nn.ModuleDict({pair_name(p): InfoNCE(temperature) for p in self.pairs})

    def embed(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each aligned modality's projected embedding `[B, projection_dim]` and whether the
        sample has it `[B]`."""
        out = {}
        for m, encoder in self.encoders.items():
            mask = batch.present.get(m)
            features = encoder.encode(zero_masked(batch.inputs[m], mask), mask)
            if features.dim() == 3:
                tokens = encoder.output_mask(batch.inputs[m], mask)
                features, present = masked_mean(features, tokens), tokens.any(dim=1)
            else:
                present = (
                    mask if mask is not None else features.new_ones(len(features), dtype=torch.bool)
                )
                present = present if present.dim() == 1 else present.any(dim=1)
            out[m] = (self.projections[m](features), present)
        return out

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss(self.embed(batch))

    def loss(self, embedded: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The mean of the pairs' InfoNCE over `embed`'s output."""
        losses = []
        for a, b in self.pairs:
            (ea, pa), (eb, pb) = embedded[a], embedded[b]
            both = pa & pb
            if both.sum() >= 2:
                losses.append(self.losses[pair_name((a, b))](ea[both], eb[both]))
        if not losses:
            return torch.zeros((), device=next(self.parameters()).device, requires_grad=True)
        return torch.stack(losses).mean()


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
) -> dict[str, float]:
    """Mean InfoNCE over `batches` and, per pair, retrieval over the whole split (recall@1,
    5, 10 and median rank, both directions; by `labels` when they give class indices).
    Keys: `<prefix>/loss`, `<prefix>/<a>_to_<b>/R@1`, ..."""
    model.eval()
    total, count = 0.0, 0
    kept: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        batch = batch.to(device)
        embedded = model.embed(batch)
        total += float(model.loss(embedded)) * len(batch)
        count += len(batch)
        y = labels(batch)
        for a, b in model.pairs:
            both = embedded[a][1] & embedded[b][1]
            kept.setdefault(f"{a}|{b}|a", []).append(embedded[a][0][both].cpu())
            kept.setdefault(f"{a}|{b}|b", []).append(embedded[b][0][both].cpu())
            if y is not None:
                kept.setdefault(f"{a}|{b}|y", []).append(y[both].cpu())
    if count == 0:
        raise ValueError("no batches to evaluate the alignment on")
    out = {f"{prefix}/loss": total / count}
    for a, b in model.pairs:
        ea, eb = torch.cat(kept[f"{a}|{b}|a"]), torch.cat(kept[f"{a}|{b}|b"])
        y = torch.cat(kept[f"{a}|{b}|y"]) if f"{a}|{b}|y" in kept else None
        if len(ea) < 2:
            raise ValueError(f"fewer than 2 samples have both {a} and {b}: nothing to retrieve")
        found = retrieval_metrics(ea, eb, (a, b), y)
        out.update({f"{prefix}/{k}": v for k, v in found.items()})
    return out


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
) -> AlignResult:
    """Train `model` with AdamW and cosine decay (no decay on norms, biases and the
    temperatures' log scale); keep the epoch with the lowest validation loss.

    Raises `fusion.training.loop.NonFiniteError` naming the epoch and step when the loss is
    not finite, and ValueError for `epochs` < 1."""
    from fusion.training.loop import NonFiniteError  # the loop imports the data contract

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    model.to(device)
    optimizer = build_optimizer(None, param_groups(model, lr, weight_decay), lr, weight_decay)
    schedule = build_schedule(optimizer, None, epochs)
    best: dict[str, float] = {}
    best_state = None
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        total, count = 0.0, 0
        for step, batch in enumerate(train_batches, start=1):
            batch = batch.to(device)
            loss = model(batch)
            if not torch.isfinite(loss):
                raise NonFiniteError(
                    f"stage '{desc}': the InfoNCE loss is {loss.item()} at epoch {epoch}, step "
                    f"{step}; check the inputs for NaN/Inf values or lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            count += len(batch)
        schedule.step()
        metrics = {"epoch": epoch, "train/loss": total / max(count, 1)}
        metrics.update(evaluate_alignment(model, val_batches, device, labels))
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
