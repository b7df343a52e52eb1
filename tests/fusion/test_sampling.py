import pytest
import torch

from data.avdigits import AVDigits
from fusion.training.feature_cache import data_key
from fusion.training.sampling import EpochSampler, Views


def epoch(sampler, e):
    sampler.set_epoch(e)
    return list(sampler)


def test_the_order_is_a_function_of_seed_and_epoch_alone():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    assert epoch(a, 2) == epoch(b, 2) and sorted(epoch(a, 2)) == list(range(50))
    assert epoch(a, 1) != epoch(a, 2)
    assert epoch(EpochSampler(50, seed=4), 2) != epoch(a, 2)
    assert epoch(EpochSampler(50, shuffle=False), 7) == list(range(50))


def test_epoch_e_reads_view_e_minus_1_mod_k():
    sampler = EpochSampler(30, views=3, shuffle=False)
    assert epoch(sampler, 1) == list(range(10))
    assert epoch(sampler, 2) == list(range(10, 20))
    assert epoch(sampler, 4) == list(range(10))
    assert len(sampler) == 10
    with pytest.raises(ValueError, match="31 items cannot be split into 3 equal views"):
        EpochSampler(31, views=3)


@pytest.mark.parametrize("n", [1, 10, 11])
def test_ranks_share_one_permutation_and_take_equal_steps_in_training(n):
    ranks = [EpochSampler(n, seed=1, rank=r, world_size=4) for r in range(4)]
    parts = [epoch(s, 3) for s in ranks]
    assert len({len(p) for p in parts}) == 1 == len({len(s) for s in ranks})
    assert set().union(*parts) == set(range(n))
    evaluation = [EpochSampler(n, shuffle=False, rank=r, world_size=4, pad=False) for r in range(4)]
    shards = [epoch(s, 1) for s in evaluation]
    assert sorted(i for shard in shards for i in shard) == list(range(n))  # each read once
    assert [len(s) for s in evaluation] == [len(shard) for shard in shards]


def test_views_stack_fixed_draws_of_the_same_samples():
    draws = [AVDigits("train", max_samples=6, augment=False, view=v) for v in range(2)]
    views = Views(draws)
    assert len(views) == 12 and views.num_views == 2 and views.deterministic
    assert views.num_classes == 10 and views.task == "digit"
    assert torch.equal(views[7]["image"], draws[1][1]["image"])
    assert views[7]["label"] == views[1]["label"]
    assert not torch.equal(views[7]["image"], views[1]["image"])  # another draw
    assert data_key(views) != data_key(Views(draws[:1] * 2))
    with pytest.raises(ValueError, match="same samples, got lengths"):
        Views([draws[0], AVDigits("train", max_samples=5, augment=False)])


def test_a_fixed_item_is_the_same_at_every_access_in_any_order():
    dataset = AVDigits("val", max_samples=10)
    later = dataset[7]
    for i in range(10):
        dataset[i]
    again = dataset[7]
    assert torch.equal(later["image"], again["image"]) and torch.equal(
        later["audio"], again["audio"]
    )
    with pytest.raises(IndexError):
        dataset[10]


@pytest.mark.parametrize(("samples", "batches"), [(25, [24]), (26, [24, 2]), (24, [24])])
def test_a_training_epoch_never_ends_in_a_batch_of_one(samples, batches):
    from fusion.training.loaders import make_loader
    from fusion.training.settings import TrainerConfig

    items = [{"x": torch.full((2,), float(i)), "label": i % 2} for i in range(samples)]
    loader = make_loader(items, "train", TrainerConfig(batch_size=24), seed=0)
    assert [len(batch) for batch in loader] == batches
    evaluation = make_loader(items, "val", TrainerConfig(batch_size=24), seed=0)
    assert sum(len(batch) for batch in evaluation) == samples  # evaluation reads every sample


def test_a_train_split_of_one_sample_is_refused():
    from fusion.training.loaders import make_loader
    from fusion.training.settings import ConfigError, TrainerConfig

    with pytest.raises(
        ConfigError,
        match=r"the train split holds 1 sample \(per process\); training needs at least 2",
    ):
        make_loader([{"x": torch.zeros(2), "label": 0}], "train", TrainerConfig(), seed=0)
