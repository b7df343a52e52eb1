"""Tabular encoders: numeric columns and categorical codes in one float tensor, an MLP on top."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from fusion.checks import dropout_rate
from fusion.encoders.base import Encoder
from fusion.heads import ACTIVATIONS


def default_embedding_dim(cardinality: int) -> int:
    """fast.ai's rule of thumb: half the categories, capped at 50."""
    return min(50, (cardinality + 1) // 2)


class TabularColumns(nn.Module):
    """[B, num_numeric + n_categorical] -> standardized numerics and category embeddings, concatenated.

    The table arrives as one float tensor (the batch format every modality shares), so
    the categorical columns are float codes; they are checked and cast to long here.
    """

    def __init__(
        self,
        num_numeric: int,
        cardinalities: Sequence[int],
        embedding_dims: Sequence[int],
        normalize_numeric: bool = True,
    ) -> None:
        super().__init__()
        self.num_numeric = num_numeric
        self.cardinalities = tuple(cardinalities)
        self.numeric_norm = (
            nn.BatchNorm1d(num_numeric) if normalize_numeric and num_numeric else nn.Identity()
        )
        self.embeddings = nn.ModuleList(
            nn.Embedding(card, dim) for card, dim in zip(cardinalities, embedding_dims, strict=True)
        )
        self.out_dim = num_numeric + sum(embedding_dims)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The categorical columns as long codes, or a ValueError naming the first bad one.

        The check costs one device sync per batch; an out-of-range code would otherwise be
        a CUDA device-side assert that names nothing.
        """
        values = x[:, self.num_numeric :]
        limits = torch.tensor(self.cardinalities, device=x.device, dtype=values.dtype)
        bad = (values < 0) | (values >= limits) | (values != values.round())  # NaN counts as bad
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"tabular column {self.num_numeric + col} (categorical column {col}) holds code "
                f"{values[row, col].item():g} in row {row}; codes must be integers in "
                f"[0, {self.cardinalities[col]}) for its cardinality {self.cardinalities[col]}"
            )
        return values.long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.num_numeric + len(self.cardinalities)
        if x.dim() != 2 or x.shape[1] != width:
            raise ValueError(
                f"expected a table [batch, {width}] ({self.num_numeric} numeric + "
                f"{len(self.cardinalities)} categorical columns), got {list(x.shape)}"
            )
        codes = self.codes(x)
        parts = [self.numeric_norm(x[:, : self.num_numeric].float())]
        parts += [emb(codes[:, i]) for i, emb in enumerate(self.embeddings)]
        return torch.cat(parts, dim=1)


def build_tabular_encoder(
    num_numeric: int,
    categorical_cardinalities: Sequence[int] = (),
    embedding_dim: int | None = None,
    hidden: Sequence[int] = (64,),
    dropout: float = 0.0,
    activation: str = "relu",
    normalize_numeric: bool = True,
) -> Encoder:
    """An MLP over numeric columns and embedded categorical columns.

    The input is one float tensor whose last `len(categorical_cardinalities)` columns hold
    integer category codes. Each categorical column gets an embedding of `embedding_dim`
    (default: `default_embedding_dim(cardinality)`); numeric columns go through a
    BatchNorm1d when `normalize_numeric`, so raw, unscaled values train well. `hidden=()`
    leaves out the MLP and returns the concatenated columns.
    """
    cards = [int(c) for c in categorical_cardinalities]
    if num_numeric < 0:
        raise ValueError(f"num_numeric must be >= 0, got {num_numeric}")
    if num_numeric + len(cards) == 0:
        raise ValueError("a table needs at least one numeric or categorical column")
    if any(c < 1 for c in cards):
        raise ValueError(f"categorical cardinalities must be >= 1, got {cards}")
    if embedding_dim is not None and embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1 or None, got {embedding_dim}")
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden sizes must be >= 1, got {list(hidden)}")
    dropout_rate(dropout)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got '{activation}'")
    dims = [embedding_dim or default_embedding_dim(c) for c in cards]
    columns = TabularColumns(num_numeric, cards, dims, normalize_numeric)
    layers: list[nn.Module] = []
    width = columns.out_dim
    for size in hidden:
        layers += [nn.Linear(width, size), ACTIVATIONS[activation](), nn.Dropout(dropout)]
        width = size
    backbone = nn.Sequential(OrderedDict(columns=columns, mlp=nn.Sequential(*layers)))
    return Encoder(backbone, input_shape=(num_numeric + len(cards),))
