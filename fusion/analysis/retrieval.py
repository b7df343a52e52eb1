"""Cross-modal retrieval over a whole split: recall@K and the median rank, both directions.

Each query of one modality ranks every item of the other by cosine similarity. An item is
relevant to a query when it is its pair (the same row), or, given `labels`, when it has the
query's label (e.g. the same digit): a query's rank is that of its first relevant item
(1 = the top). Recall@K is the share of queries whose rank is at most K, as in image-text
retrieval benchmarks (e.g. Karpathy & Fei-Fei, CVPR 2015; CLIP, ICML 2021); its chance
level with labels is about the share of relevant items.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

RECALL_AT = (1, 5, 10)


def ranks(
    queries: torch.Tensor, items: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Each query's rank (1-based) of its first relevant item: queries [N, D], items [N, D]
    (row i pairs with row i), labels [N] or None. Ties count against the query: an
    irrelevant item as similar as the first relevant one ranks before it."""
    if queries.dim() != 2 or queries.shape != items.shape:
        raise ValueError(
            f"expected queries and items of one shape [N, dim], got {list(queries.shape)} and "
            f"{list(items.shape)}"
        )
    if labels is not None and labels.shape != (len(queries),):
        raise ValueError(f"expected labels of shape [{len(queries)}], got {list(labels.shape)}")
    similarity = nn.functional.normalize(queries, dim=1) @ nn.functional.normalize(items, dim=1).T
    if labels is None:
        relevant = torch.eye(len(queries), dtype=torch.bool, device=queries.device)
    else:
        relevant = labels[:, None] == labels[None, :]
    best_relevant = similarity.masked_fill(~relevant, -torch.inf).max(dim=1, keepdim=True).values
    return 1 + ((similarity >= best_relevant) & ~relevant).sum(dim=1)


def retrieval_metrics(
    a: torch.Tensor,
    b: torch.Tensor,
    names: tuple[str, str] = ("a", "b"),
    labels: torch.Tensor | None = None,
    recall_at: Sequence[int] = RECALL_AT,
) -> dict[str, float]:
    """Recall@K and median rank from `a` to `b` and from `b` to `a`, keyed
    `"<a>_to_<b>/R@K"` and `"<a>_to_<b>/median_rank"` (of an even count of queries, the
    lower middle rank, as `torch.median` gives)."""
    out = {}
    for (source, target), (queries, items) in (
        (names, (a, b)),
        (names[::-1], (b, a)),
    ):
        found = ranks(queries, items, labels).float()
        for k in recall_at:
            out[f"{source}_to_{target}/R@{k}"] = float((found <= k).float().mean())
        out[f"{source}_to_{target}/median_rank"] = float(found.median())
    return out
