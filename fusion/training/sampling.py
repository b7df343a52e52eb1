"""Which items each epoch reads: fixed views of a split, shuffled and shared across ranks.

A split redrawn at every access (random augmentation) cannot have its features cached.
`Views` stands in for it with K fixed draws: epoch e trains on view (e - 1) mod K, so a
model still sees K different degradations of every sample, while a frozen encoder's
features for all K views are computed once. `EpochSampler` draws each epoch's order from
(seed, epoch) alone, so a resumed run and every DDP rank agree on it without sharing state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from fusion.training.feature_cache import data_key, is_deterministic


class Views(Dataset):
    """K same-length datasets stacked: item `v * N + i` is view v of sample i."""

    def __init__(self, views: Sequence[Dataset]) -> None:
        if not views:
            raise ValueError("Views needs at least one view")
        lengths = sorted({len(v) for v in views})
        if len(lengths) != 1:
            raise ValueError(f"every view must hold the same samples, got lengths {lengths}")
        self.views = list(views)
        self.samples = lengths[0]

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def deterministic(self) -> bool:
        return all(is_deterministic(v) for v in self.views)

    def fingerprint(self) -> str:
        return json.dumps([data_key(v) for v in self.views])

    def __len__(self) -> int:
        return self.samples * len(self.views)

    def __getitem__(self, index: int):
        view, sample = divmod(index, self.samples)
        return self.views[view][sample]

    def __getattr__(self, name: str):
        """Anything else (classes, task, ...) is the first view's: views differ in draws only."""
        if name == "views":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.views[0], name)


class EpochSampler(Sampler[int]):
    """The indices one rank reads in one epoch; `set_epoch(e)` before each epoch.

    With `shuffle`, the order is a permutation drawn from (`seed`, epoch). With `views` > 1
    the dataset is a `Views` and epoch e reads view (e - 1) mod `views`. With `world_size`
    > 1, rank r takes every `world_size`-th index from position r; for training (`pad`) the
    order is first extended by wrapping around so that every rank takes the same number of
    steps (DDP needs that), for evaluation each sample is read exactly once.
    """

    def __init__(
        self,
        dataset_size: int,
        *,
        views: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ) -> None:
        if views < 1 or dataset_size % views:
            raise ValueError(f"{dataset_size} items cannot be split into {views} equal views")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.samples = dataset_size // views
        self.views, self.shuffle, self.seed = views, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.samples, generator=generator)
        else:
            order = torch.arange(self.samples)
        if self.pad and self.world_size > 1:
            total = math.ceil(self.samples / self.world_size) * self.world_size
            order = order.repeat(math.ceil(total / self.samples))[:total]
        view = (self.epoch - 1) % self.views
        return order[self.rank :: self.world_size] + view * self.samples

    def __iter__(self) -> Iterator[int]:
        return iter(self._order().tolist())

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.samples / self.world_size)
        return len(range(self.rank, self.samples, self.world_size))
