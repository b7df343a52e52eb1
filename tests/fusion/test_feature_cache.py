import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fusion.batch import collate
from fusion.encoders.base import Encoder
from fusion.fusers import GatedFuser
from fusion.heads import ClassificationHead
from fusion.model import MultimodalModel
from fusion.training import evaluate, feature_cache, fit
from fusion.training.checkpoint import load_checkpoint, save_checkpoint
from fusion.training.feature_cache import (
    EncodedDataset,
    FeatureCache,
    data_key,
    encoder_key,
    file_digest,
    keep_batch,
)

CPU = torch.device("cpu")


class Pairs(Dataset):
    """Fixed two-modality items whose label is readable from either modality."""

    deterministic = True

    def __init__(self, n=90, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.a = nn.functional.one_hot(self.y, 3).float() + 0.3 * torch.randn(n, 3, generator=g)
        self.b = torch.randn(n, 4, generator=g)
        self.b[:, 0] += self.y.float()
        self.missing_b = torch.rand(n, generator=g) < 0.2

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"a": self.a[i], "b": None if self.missing_b[i] else self.b[i], "label": self.y[i]}


def build_model(freeze=("a", "b")):
    torch.manual_seed(0)
    encoders = {
        "a": Encoder(
            nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU()), input_shape=(3,)
        ),
        "b": Encoder(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU()), input_shape=(4,)),
    }
    for m in freeze:
        encoders[m].freeze()
    return MultimodalModel.build(encoders, GatedFuser, ClassificationHead, num_classes=3)


def loader(dataset, shuffle, collate_fn=collate):
    generator = torch.Generator().manual_seed(0)
    return DataLoader(
        dataset, batch_size=16, shuffle=shuffle, collate_fn=collate_fn, generator=generator
    )


def encoded(cache, model, dataset, modalities=("a", "b")):
    keys = {m: encoder_key(model.encoders[m]) for m in modalities}
    return cache.encode(model, dataset, modalities, CPU, keys=keys, batch_size=32)


def train(model, train_loader, val_loader):
    torch.manual_seed(1)
    return fit(
        model, train_loader, val_loader, epochs=3, lr=1e-2, weight_decay=0.0, device=CPU
    ).best  # fmt: skip


@pytest.mark.parametrize("cached", [("a", "b"), ("a",)])
def test_training_on_cached_features_equals_training_on_inputs(tmp_path, cached):
    train_set, val_set = Pairs(), Pairs(40, seed=1)
    trainable = tuple(m for m in "ab" if m not in cached)
    plain = build_model(freeze=cached)
    best_plain = train(plain, loader(train_set, True), loader(val_set, False))

    model = build_model(freeze=cached)
    cache = FeatureCache(tmp_path)
    train_cached = encoded(cache, model, train_set, cached)
    val_cached = encoded(cache, model, val_set, cached)
    assert isinstance(train_cached.features["a"], np.memmap)
    assert train_cached.live == list(trainable)
    best_cached = train(
        model, loader(train_cached, True, keep_batch), loader(val_cached, False, keep_batch)
    )
    assert best_cached.keys() == best_plain.keys()
    for key, value in best_plain.items():
        assert best_cached[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for (name, p), q in zip(plain.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_cached_batches_carry_masks_labels_and_the_encoded_mark(tmp_path):
    dataset = Pairs(20)
    model = build_model()
    batch = encoded(FeatureCache(tmp_path), model, dataset).__getitems__([3, 0, 7])
    raw = collate([dataset[i] for i in (3, 0, 7)])
    assert batch.encoded == {"a", "b"}
    assert torch.equal(batch.present["b"], raw.present["b"])
    assert torch.equal(batch.targets, raw.targets)
    with torch.no_grad():
        torch.testing.assert_close(batch.inputs["a"], model.encoders["a"](raw.inputs["a"]))


def test_a_second_run_reads_the_cache_without_running_the_encoder(tmp_path):
    dataset = Pairs(30)
    model = build_model()
    first = encoded(FeatureCache(tmp_path), model, dataset)
    calls = []
    model.encoders["a"].register_forward_hook(lambda *_: calls.append(1))
    second = encoded(FeatureCache(tmp_path), model, dataset)
    assert calls == []
    assert second.features["a"].filename == first.features["a"].filename


def test_new_weights_config_or_data_give_new_features(tmp_path):
    cache = FeatureCache(tmp_path)
    model = build_model()
    base = encoded(cache, model, Pairs(30)).features["a"].filename
    assert encoded(cache, model, Pairs(30, seed=5)).features["a"].filename != base
    keys = {"a": encoder_key(model.encoders["a"], config={"layer": "other"})}
    assert cache.encode(model, Pairs(30), ["a"], CPU, keys=keys).features["a"].filename != base
    with torch.no_grad():
        model.encoders["a"].backbone[0].weight.add_(1.0)
    changed = encoded(cache, model, Pairs(30))
    assert changed.features["a"].filename != base
    assert not np.allclose(changed.features["a"], np.load(base))


def test_a_partially_written_file_is_never_used(tmp_path):
    cache = FeatureCache(tmp_path)
    model = build_model()
    good = encoded(cache, model, Pairs(30)).features["a"]
    path, expected = good.filename, np.array(good)
    del good
    with open(path, "r+b") as f:  # a file cut short, as by a crash without the rename
        f.truncate(200)
    rebuilt = encoded(cache, model, Pairs(30)).features["a"]
    np.testing.assert_array_equal(rebuilt, expected)


def written_as(path, features):
    """`features` saved at `path` as if the encoder had written them: with their digest
    recorded, so that only the checks after the digest's can refuse them."""
    np.save(path, features)
    masks = Path(str(path).rsplit("-", 1)[0] + "-mask.pt")
    save_checkpoint(masks, {**load_checkpoint(masks), "digest": file_digest(path)})


def test_non_finite_features_of_present_samples_are_rebuilt(tmp_path, caplog):
    cache, model = FeatureCache(tmp_path), build_model()
    data = Pairs(30)
    first = encoded(cache, model, data).features["b"]
    path, expected = first.filename, np.array(first)
    del first
    absent, present = (
        int(np.flatnonzero(data.missing_b)[0]),
        int(np.flatnonzero(~data.missing_b)[0]),
    )
    damaged = expected.copy()
    damaged[absent] = np.nan  # an absent sample's slot may hold anything: kept
    written_as(path, damaged)
    with caplog.at_level(logging.WARNING, logger="fusion"):
        kept = encoded(cache, model, data).features["b"]
    assert np.isnan(kept[absent]).all() and "rebuilding" not in caplog.text
    del kept
    damaged[present, 0] = np.inf
    written_as(path, damaged)
    with caplog.at_level(logging.WARNING, logger="fusion"):
        rebuilt = np.array(encoded(cache, model, data).features["b"])
    assert (
        f"feature cache: {path} holds NaN or infinite features for 1 samples that have the "
        f"modality (the first: sample {present}); expected finite features; rebuilding it"
    ) in caplog.text
    np.testing.assert_array_equal(rebuilt, expected)


def test_a_crash_while_encoding_leaves_no_cache_behind(tmp_path):
    model = build_model()
    calls = []

    def fail_on_second_batch(*_):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")

    hook = model.encoders["b"].register_forward_hook(fail_on_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        encoded(FeatureCache(tmp_path), model, Pairs(80))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    hook.remove()
    assert len(encoded(FeatureCache(tmp_path), model, Pairs(80))) == 80


def test_float16_storage_halves_the_file_and_stays_close(tmp_path):
    model = build_model()
    full = encoded(FeatureCache(tmp_path / "32"), model, Pairs(30))
    half = encoded(FeatureCache(tmp_path / "16", dtype="float16"), model, Pairs(30))
    assert half.features["a"].dtype == np.float16
    assert half.features["a"].nbytes * 2 == full.features["a"].nbytes
    np.testing.assert_allclose(half.features["a"], full.features["a"], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="dtype must be one of"):
        FeatureCache(tmp_path, dtype="int8")


def test_refuses_augmented_data_and_trainable_encoders(tmp_path):
    class Augmented(Pairs):
        deterministic = False

    model = build_model(freeze=("a",))
    with pytest.raises(ValueError, match="Augmented is not deterministic"):
        encoded(FeatureCache(tmp_path), model, Augmented(10), ["a"])
    with pytest.raises(ValueError, match="modality 'b': only a frozen encoder"):
        encoded(FeatureCache(tmp_path), model, Pairs(10), ["b"])


def test_data_key_hashes_items_unless_the_dataset_has_a_fingerprint():
    assert data_key(Pairs(20)) == data_key(Pairs(20))
    changed = Pairs(20)
    changed.a[5, 0] += 1e-3
    assert data_key(changed) != data_key(Pairs(20))

    class Declared(Pairs):
        def fingerprint(self):
            return "files v1"

    assert data_key(Declared(20)) == data_key(Declared(20, seed=3))  # trusted as declared


def test_encoded_dataset_rejects_features_of_the_wrong_shape(tmp_path):
    model = build_model()
    dataset = EncodedDataset(
        Pairs(10), {"a": np.zeros((10, 5), np.float32), "b": np.zeros((10, 8), np.float32)},
        {"present": {}, "targets": torch.zeros(10, dtype=torch.long), "condition": None,
         "modality_targets": None},
    )  # fmt: skip
    batch = dataset.__getitems__([0, 1])
    with pytest.raises(ValueError, match=r"modality 'a': cached features have shape \[2, 5\]"):
        evaluate(model, [batch], CPU)


def test_pickled_for_a_worker_the_cache_sends_file_names_not_features(tmp_path):
    import pickle

    dataset = encoded(FeatureCache(tmp_path), build_model(), Pairs(3000))
    payload = pickle.dumps(dataset.__getstate__()["features"])
    assert len(payload) < 1000  # 3000 x 8 float32 per modality would be 96 kB each
    copy = pickle.loads(pickle.dumps(dataset))
    assert isinstance(copy.features["a"], np.memmap)
    batch, original = copy.__getitems__([5, 9]), dataset.__getitems__([5, 9])
    assert torch.equal(batch.inputs["b"], original.inputs["b"])


def test_the_encoded_dataset_answers_for_the_original(tmp_path):
    from fusion.training.sampling import Views

    class Described(Pairs):
        num_classes = 3

    views = Views([Described(12, seed=0), Described(12, seed=1)])
    cached = encoded(FeatureCache(tmp_path), build_model(), views)
    assert cached.num_views == 2 and cached.num_classes == 3 and len(cached) == 24


def test_an_encoder_waiting_to_be_thawed_is_not_frozen():
    from fusion.freezing import set_trainable
    from fusion.training.feature_cache import is_frozen

    encoder = Encoder(nn.Linear(3, 4), input_shape=(3,))
    set_trainable(encoder, False)  # gradual unfreezing starts here, and thaws it later
    assert not is_frozen(encoder.eval())
    assert is_frozen(encoder.freeze().train())
    assert is_frozen(nn.Linear(3, 4).requires_grad_(False).eval())


def test_corrupt_labels_or_features_are_rebuilt_not_fatal(tmp_path):
    cache, model = FeatureCache(tmp_path), build_model()
    first = encoded(cache, model, Pairs(30))
    expected = first.__getitems__([0, 4])
    labels = next(tmp_path.rglob("labels.pt"))
    labels.write_bytes(b"not a checkpoint")
    Path(first.features["b"].filename).write_bytes(b"\x93NUMPY garbage")
    del first
    again = encoded(cache, model, Pairs(30)).__getitems__([0, 4])
    assert torch.equal(again.targets, expected.targets)
    assert torch.equal(again.inputs["b"], expected.inputs["b"])


@pytest.mark.parametrize("change", ["copied over", "edited"])
def test_a_features_file_whose_content_changed_is_rebuilt_loudly(tmp_path, caplog, change):
    """Same shape and dtype, other bytes: only the digest recorded at writing tells."""
    cache, model, data = FeatureCache(tmp_path), build_model(), Pairs(30)
    first = encoded(cache, model, data).features
    a, b = Path(first["a"].filename), Path(first["b"].filename)
    expected = np.array(first["a"])
    recorded = load_checkpoint(Path(str(a).rsplit("-", 1)[0] + "-mask.pt"))["digest"]
    assert recorded == file_digest(a) and recorded.startswith("sha256:")
    del first
    if change == "copied over":  # another modality's features, padded to a's shape
        np.save(a, np.resize(np.load(b), expected.shape).astype(np.float32))
    else:
        np.save(a, expected * 1000 + 7)
    found = file_digest(a)
    with caplog.at_level(logging.WARNING, logger="fusion"):
        rebuilt = np.array(encoded(cache, model, data).features["a"])
    assert (
        f"feature cache: {a} does not hold the features written there: its content changed "
        f"since (copied over from another file, or edited; expected {recorded}, found {found}); "
        "rebuilding it"
    ) in caplog.text
    np.testing.assert_array_equal(rebuilt, expected)
    assert file_digest(a) == recorded


def test_a_cache_written_before_digests_is_rebuilt_once(tmp_path, caplog):
    cache, model, data = FeatureCache(tmp_path), build_model(), Pairs(30)
    path = Path(encoded(cache, model, data).features["a"].filename)
    masks = Path(str(path).rsplit("-", 1)[0] + "-mask.pt")
    save_checkpoint(masks, {"mask": load_checkpoint(masks)["mask"]})  # as an older version wrote
    calls = []
    hook = model.encoders["a"].register_forward_hook(lambda *_: calls.append(1))
    with caplog.at_level(logging.INFO, logger="fusion"):
        encoded(cache, model, data)
    assert calls and f"feature cache: {masks} records no digest of its features" in caplog.text
    calls.clear()
    encoded(cache, model, data)
    assert calls == []  # the digest is recorded now
    hook.remove()


def test_a_features_file_is_hashed_again_only_when_its_size_or_time_changed(
    tmp_path, monkeypatch, caplog
):
    cache, model, data = FeatureCache(tmp_path), build_model(), Pairs(30)
    first = encoded(cache, model, data).features
    paths = {m: Path(first[m].filename) for m in ("a", "b")}
    expected = np.array(first["a"])
    del first
    masks = {m: Path(str(p).rsplit("-", 1)[0] + "-mask.pt") for m, p in paths.items()}
    hashed = []
    monkeypatch.setattr(
        feature_cache, "file_digest", lambda p: hashed.append(Path(p)) or file_digest(p)
    )

    def written_a_second_ago(path: Path) -> None:  # clear of the clock tick of any record
        older = path.stat().st_mtime_ns - 10**9
        os.utime(path, ns=(older, older))

    for path in paths.values():
        written_a_second_ago(path)
    encoded(cache, model, data)
    assert hashed == [paths["a"], paths["b"]]  # checked once, then recorded
    assert load_checkpoint(masks["a"])["checked"] == [
        paths["a"].stat().st_size,
        paths["a"].stat().st_mtime_ns,
    ]
    hashed.clear()
    encoded(cache, model, data)
    assert hashed == []  # unchanged since checked: not read
    checked = paths["b"].stat().st_mtime_ns
    os.utime(masks["b"], ns=(checked, checked))  # recorded in the file's own tick: racy
    encoded(cache, model, data)
    assert hashed == [paths["b"]]
    hashed.clear()
    np.save(paths["a"], expected * 1000 + 7)  # same size, a new time
    with caplog.at_level(logging.WARNING, logger="fusion"):
        rebuilt = np.array(encoded(cache, model, data).features["a"])
    assert hashed == [paths["a"]] and "its content changed since" in caplog.text
    np.testing.assert_array_equal(rebuilt, expected)
