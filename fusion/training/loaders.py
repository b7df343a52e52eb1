"""Data loaders for the recipe: per-process batches, epoch sampling, fixed views, cached features.

Datasets follow `fusion.data`'s contract. A split whose items are fixed and whose encoders
are frozen is read from the feature cache; an augmented train split is replaced in stage 2
by `trainer.fuse.views` fixed draws (`fixed_view`), so it can be cached too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fusion.batch import Collate
from fusion.model import MultimodalModel
from fusion.training.distributed import SINGLE, Distributed
from fusion.training.feature_cache import (
    FeatureCache,
    encoder_key,
    is_deterministic,
    is_frozen,
    keep_batch,
)
from fusion.training.loop import set_seed
from fusion.training.precision import Precision
from fusion.training.sampling import EpochSampler, Views
from fusion.training.settings import ConfigError, TrainerConfig, worker_count

log = logging.getLogger("fusion")


def per_process_batch(batch_size: int, distributed: Distributed = SINGLE) -> int:
    """`trainer.batch_size` is the global batch, split evenly over the processes, so that a
    recipe (batch size, learning rate) means the same on one process or many."""
    world = distributed.world_size
    if batch_size % world:
        raise ConfigError(
            f"config key 'trainer.batch_size': the global batch of {batch_size} cannot be split "
            f"evenly over {world} processes"
        )
    return batch_size // world


def make_loader(
    dataset: Dataset,
    split: str,
    trainer: TrainerConfig,
    seed: int,
    collate_fn: Callable | None = None,
    distributed: Distributed = SINGLE,
) -> DataLoader:
    """Batches of one split (this process's share of them), with the trainer's worker and
    memory settings.

    The train split is shuffled per epoch by an `EpochSampler` (which also picks the epoch's
    view when `dataset` is a `Views`); the others are read in order. By default items are
    collated with the placeholders the dataset's modalities declare.
    """
    workers = worker_count(trainer.num_workers)
    pin = trainer.pin_memory is not False and torch.cuda.is_available()  # see loader_warnings
    sampler = EpochSampler(
        len(dataset),
        views=getattr(dataset, "num_views", 1),
        shuffle=split == "train",
        seed=seed,
        rank=distributed.rank,
        world_size=distributed.world_size,
        pad=split == "train",
    )
    batch_size = per_process_batch(trainer.batch_size, distributed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=split == "train" and drops_a_single(len(sampler), batch_size),
        collate_fn=collate_fn or Collate.for_dataset(dataset),
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=trainer.persistent_workers and workers > 0,
        prefetch_factor=trainer.prefetch_factor if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def drops_a_single(samples: int, batch_size: int) -> bool:
    """Whether a training epoch of `samples` leaves its last batch one sample, which batch
    norm cannot train on ("expected more than 1 value per channel"); that sample, a
    different one each shuffled epoch, is then left out, and this is said."""
    if samples < 2:
        raise ConfigError(
            f"config key 'data': the train split holds {samples} sample{'s' * (samples != 1)} "
            "(per process); training needs at least 2"
        )
    if samples % batch_size != 1:
        return False
    log.info(
        "the train split's last batch would hold 1 of its %d samples, which batch norm cannot "
        "train on: each epoch leaves one sample out (another each epoch)", samples,
    )  # fmt: skip
    return True


def loader_warnings(trainer: TrainerConfig) -> None:
    """Say the loader settings that cannot do what they ask here: pinned memory without
    CUDA (ignored), and more worker processes than this process has cores."""
    if trainer.pin_memory and not torch.cuda.is_available():
        log.warning("trainer.pin_memory=true: there is no CUDA device to pin memory for; ignored")
    workers, cores = worker_count(trainer.num_workers), len(os.sched_getaffinity(0))
    if workers > cores:
        log.warning(
            "trainer.num_workers=%d: more loader processes than the %d cores this process may "
            "use; they share those cores, so beyond that count they mostly cost memory and "
            "start-up time (every epoch, without trainer.persistent_workers)", workers, cores,
        )  # fmt: skip


def make_loaders(
    datasets: Mapping[str, Dataset],
    trainer: TrainerConfig,
    seed: int,
    distributed: Distributed = SINGLE,
) -> dict[str, DataLoader]:
    return {
        split: make_loader(dataset, split, trainer, seed, distributed=distributed)
        for split, dataset in datasets.items()
    }


def reseed(seed: int, loaders: Mapping[str, DataLoader], distributed: Distributed = SINGLE) -> None:
    """Start a stage from the seed alone: its result must not depend on what ran before it
    (a stage-1 encoder trained now or reused from the cache draws different numbers).
    Each process draws its own numbers (augmentation, dropout): the seed plus its rank."""
    set_seed(seed + distributed.rank)
    loaders["train"].generator.manual_seed(seed + distributed.rank)


def fuse_datasets(datasets: Mapping[str, Dataset], views: int | None) -> dict[str, Dataset]:
    """Stage 2's data. An augmented train split becomes `views` fixed draws, epoch e reading
    draw (e - 1) mod `views`, so that frozen features can be cached; with `views=None` it is
    redrawn at every access. A fixed train split is used as it is (cached once)."""
    datasets = dict(datasets)
    train = datasets["train"]
    if views is None:
        return datasets
    if is_deterministic(train):
        log.info("stage 2: the train split is fixed, so it is encoded once; views are unused")
        return datasets
    draw = getattr(train, "fixed_view", None)
    if draw is None:
        raise ConfigError(
            f"config key 'trainer.fuse.views': the train split of {type(train).__name__} is "
            "augmented but has no fixed_view(v) to draw fixed views from; set "
            "trainer.fuse.views=null to encode it live every epoch"
        )
    datasets["train"] = Views([draw(v) for v in range(views)])
    return datasets


def cached_loaders(
    model: MultimodalModel,
    datasets: Mapping[str, Dataset],
    trainer: TrainerConfig,
    seed: int,
    cache_dir: str,
    encoder_configs: Mapping[str, Any],
    device: torch.device,
    distributed: Distributed = SINGLE,
    weights: Mapping[str, str] | None = None,
) -> dict[str, DataLoader]:
    """Loaders that read frozen encoders' features from the cache where a split allows it.

    A split is cached when its items are fixed and `trainer.feature_cache.enabled`; the
    model's frozen encoders are then skipped (their features come from disk) and any
    trainable ones still run. Other splits are read and encoded as usual. With several
    processes, rank 0 encodes and the others read what it wrote. `encoder_configs[m]` is
    part of modality m's cache key (settings no module attribute shows). `weights[m]`, when
    given, is the digest of the weights encoder m holds (a stage-1 checkpoint's), which keys
    its features instead of hashing its weights again (`encoder_key`).
    """
    settings = trainer.feature_cache
    frozen = [m for m, encoder in model.encoders.items() if is_frozen(encoder)]
    if not settings.enabled or not frozen:
        return make_loaders(datasets, trainer, seed, distributed)
    cache = FeatureCache(cache_dir, dtype=settings.dtype)
    keys = {
        m: encoder_key(
            model.encoders[m],
            encoder_configs.get(m),
            autocast=trainer.precision,
            weights=(weights or {}).get(m),
        )
        for m in frozen
    }
    precision = Precision.on(trainer.precision, device)
    loaders = {}
    for split, dataset in datasets.items():
        if not is_deterministic(dataset):
            log.info("feature cache: the %s split is augmented, encoding it live", split)
            loaders[split] = make_loader(dataset, split, trainer, seed, distributed=distributed)
            continue
        with distributed.main_first():
            encoded = cache.encode(
                model,
                dataset,
                frozen,
                device,
                keys=keys,
                batch_size=trainer.batch_size,
                collate_fn=Collate.for_dataset(dataset),
                autocast=precision.autocast,
                num_workers=worker_count(trainer.num_workers),
                split=split,
            )
        loaders[split] = make_loader(encoded, split, trainer, seed, keep_batch, distributed)
    return loaders
