"""The training loop: readable top to bottom, one concern per function."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from data.collate import Batch
from fusion.surgery import param_groups


def set_seed(seed: int) -> None:
    """Seed every generator a run touches, so the same seed gives the same metrics on CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class EpochMetrics:
    loss: float
    accuracy: float


def _step_metrics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
    correct = int((logits.argmax(dim=1) == targets).sum())
    return loss, correct


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device) -> EpochMetrics:
    """Mean loss and accuracy of `model` over `batches`."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in batches:
        batch = batch.to(device)
        logits = model(batch.inputs, batch.present, batch.condition)
        loss, hits = _step_metrics(logits, batch.targets)
        total_loss += loss.item()
        correct += hits
        count += len(batch)
    if count == 0:
        raise ValueError("evaluate received no batches")
    return EpochMetrics(loss=total_loss / count, accuracy=correct / count)


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    desc: str = "train",
) -> EpochMetrics:
    model.train()
    total_loss, correct, count = 0.0, 0, 0
    for batch in tqdm(batches, desc=desc, leave=False, disable=None):
        batch = batch.to(device)
        logits = model(batch.inputs, batch.present, batch.condition)
        loss, hits = _step_metrics(logits, batch.targets)
        optimizer.zero_grad(set_to_none=True)
        (loss / len(batch)).backward()
        optimizer.step()
        total_loss += loss.item()
        correct += hits
        count += len(batch)
    return EpochMetrics(loss=total_loss / count, accuracy=correct / count)


def fit(
    model: nn.Module,
    train_batches: Iterable[Batch],
    val_batches: Iterable[Batch],
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    device: torch.device,
    groups: list[dict] | None = None,
    before_epoch: Callable[[int], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    desc: str = "fit",
) -> dict[str, float]:
    """Train with AdamW and cosine decay; keep the weights of the best validation epoch.

    `groups` are optimizer parameter groups (`fusion.surgery.param_groups`; by default all
    parameters, with no weight decay on norms and biases). They may include frozen
    parameters: those get no gradient and stay untouched until `before_epoch` (a gradual
    unfreezing schedule, say) makes them trainable. Returns the best epoch's metrics; the
    model ends holding that epoch's weights, which is what gets evaluated on test.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    groups = groups if groups is not None else param_groups(model, lr, weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    best: dict[str, float] = {}
    best_state = None
    for epoch in tqdm(range(1, epochs + 1), desc=desc, disable=None):
        if before_epoch is not None:
            before_epoch(epoch)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"{desc}: the model has no trainable parameters at epoch {epoch}")
        train = train_epoch(model, train_batches, optimizer, device, desc=f"{desc} epoch {epoch}")
        scheduler.step()
        val = evaluate(model, val_batches, device)
        metrics = {
            "epoch": epoch,
            "train/loss": train.loss,
            "train/accuracy": train.accuracy,
            "val/loss": val.loss,
            "val/accuracy": val.accuracy,
        }
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if not best or val.accuracy > best["val/accuracy"]:
            best = metrics
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return best
