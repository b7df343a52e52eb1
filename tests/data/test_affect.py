"""Affect reader on tiny pickles in MultiBench's layout (train/valid/test dicts of arrays)."""

import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from data.affect import Affect, load_affect
from fusion.batch import Collate
from fusion.data import check_dataset

STEPS, DIMS = 6, {"vision": 3, "audio": 4, "text": 5}
TRAIN_LABELS = [-2.6, -0.4, 0.0, 0.3, 2.8, -2.5, 3.4]
LENGTHS = [6, 4, 2, 5, 1, 3, 6]


def part(labels: list[float], lengths: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """One split: features zero-padded at the front to STEPS, labels [N, 1, 1]."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    out = {}
    for m, dim in DIMS.items():
        array = rng.uniform(0.5, 1.5, (n, STEPS, dim))
        for i, length in enumerate(lengths):
            array[i, : STEPS - length] = 0.0
        out[m] = array
    out["labels"] = np.array(labels, dtype=np.float64).reshape(n, 1, 1)
    out["id"] = np.array([[f"clip_{seed}_{i}"] for i in range(n)])
    return out


def write_pickle(path: Path, splits: dict) -> Path:
    with open(path, "wb") as handle:
        pickle.dump(splits, handle)
    return path


@pytest.fixture
def mosi(tmp_path) -> Path:
    train = part([*TRAIN_LABELS, 1.0], [*LENGTHS, 0], seed=1)  # the last has no text
    return write_pickle(
        tmp_path / "mosi_raw.pkl",
        {"train": train, "valid": part([1.2, -1.0], [3, 6], 2), "test": part([0.6], [2], 3)},
    )


def test_tasks_derive_targets_from_sentiment(mosi):
    def targets(**kwargs):
        dataset = Affect("train", path=mosi, **kwargs)
        return [dataset[i]["label"] for i in range(len(dataset))]

    assert targets(task="binary") == [0, 0, 0, 1, 1, 0, 1]
    assert targets(task="binary", zero_sentiment="drop") == [0, 0, 1, 1, 0, 1]
    assert targets(task="seven_class") == [0, 3, 3, 3, 6, 1, 6]  # -2.5 rounds to even
    assert targets(task="regression") == pytest.approx(TRAIN_LABELS)
    tasks = {
        t: Affect("val", path=mosi, task=t).tasks[t]
        for t in ("binary", "seven_class", "regression")
    }
    assert tasks["binary"].kind == "binary" and tasks["binary"].classes == ("negative", "positive")
    assert tasks["seven_class"].classes == ("-3", "-2", "-1", "0", "1", "2", "3")
    assert tasks["regression"].kind == "regression" and tasks["regression"].num_outputs == 1


def test_items_start_at_the_first_word(mosi, caplog):
    with caplog.at_level(logging.INFO, logger="fusion"):
        dataset = Affect("train", path=mosi)
    check_dataset(dataset)
    assert len(dataset) == 7 and "dropped 1 of 8 samples whose text is all zeros" in caplog.text
    raw = pickle.loads(mosi.read_bytes())["train"]
    for i, length in enumerate(LENGTHS):
        item = dataset[i]
        for m, dim in DIMS.items():
            assert item[m].shape == (length, dim) and item[m].dtype == torch.float32
            assert torch.equal(item[m], torch.from_numpy(raw[m][i, STEPS - length :]).float())
    info = dataset.modalities["audio"]
    assert info.kind == "features" and info.info == {"shape": [None, 4], "input_dim": 4}
    batch = Collate.for_dataset(dataset)([dataset[1], dataset[2]])
    assert batch.inputs["text"].shape == (2, 4, 5)
    assert batch.present["text"].tolist() == [[True] * 4, [True, True, False, False]]


def test_untrimmed_items_keep_the_front_padding(mosi):
    dataset = Affect("val", path=mosi, trim=False)
    assert dataset[0]["vision"].shape == (STEPS, 3)
    assert (dataset[0]["vision"][:3] == 0).all()
    assert dataset.modalities["text"].info == {"shape": [STEPS, 5], "input_dim": 5}


def test_non_finite_features_become_zero_and_are_counted(tmp_path, caplog):
    train = part([1.0, -1.0], [6, 6])
    train["audio"][0, 2, 1] = -np.inf
    train["audio"][1, 0, 0] = np.nan
    train["vision"][1, 3, 2] = np.inf
    path = write_pickle(
        tmp_path / "mosei.pkl",
        {"train": train, "valid": part([1.0], [2]), "test": part([1.0], [2])},
    )
    with caplog.at_level(logging.INFO, logger="fusion"):
        dataset = Affect("train", path=path)
    assert "[train] audio: replaced 2 non-finite values with 0" in caplog.text
    assert "[train] vision: replaced 1 non-finite values with 0" in caplog.text
    assert dataset[0]["audio"][2, 1] == 0 and dataset[1]["vision"][3, 2] == 0
    assert all(torch.isfinite(dataset[i][m]).all() for i in range(2) for m in DIMS)


@pytest.mark.parametrize(("labels", "shape"), [([0, 1, 1, 0], (4, 1)), ([-1, 1, -1, 1], (4,))])
def test_binary_labelled_files_are_detected(tmp_path, labels, shape):
    def split(values, seed):
        data = part(values, [3] * len(values), seed)
        data["labels"] = np.array(values, dtype=np.float64).reshape(-1, *shape[1:])
        return data

    path = write_pickle(
        tmp_path / "humor.pkl",
        {
            "train": split(labels, 0),
            "valid": split([1, labels[0]], 1),
            "test": split([labels[0]], 2),
        },
    )
    dataset = Affect("train", path=path)
    assert dataset.tasks["binary"].classes == ("no", "yes")
    assert [dataset[i]["label"] for i in range(4)] == [int(v > 0) for v in labels]
    with pytest.raises(ValueError, match=r"humor\.pkl has binary labels .* got task='seven_class'"):
        Affect("train", path=path, task="seven_class")
    with pytest.raises(ValueError, match="only task='binary' with zero_sentiment='negative'"):
        Affect("train", path=path, zero_sentiment="drop")


def test_several_label_values_read_the_first(tmp_path):
    train = part([0.0, 0.0], [2, 2])
    train["labels"] = np.array([[[-1.5, 1, 0]], [[2.2, 0, 1]]])  # [N, 1, K]: sentiment first
    path = write_pickle(
        tmp_path / "mosei.pkl",
        {"train": train, "valid": part([1.0], [2]), "test": part([1.0], [2])},
    )
    assert Affect("train", path=path, task="regression")[1]["label"] == pytest.approx(2.2)


def test_missing_file_is_named_with_its_path(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=re.escape(str((tmp_path / "sarcasm.pkl").resolve()))
    ):
        Affect("train", path=tmp_path / "sarcasm.pkl")


def test_layout_errors_name_the_file_and_shapes(tmp_path):
    good = {"train": part([1.0, -1.0], [2, 3]), "valid": part([1.0], [2]), "test": part([1.0], [2])}

    def fails(name, match, **changes):
        splits = {k: dict(v) for k, v in good.items()}
        for where, value in changes.items():
            key, array = where.split("__")
            splits[key][array] = value
        path = write_pickle(tmp_path / name, splits)
        with pytest.raises(ValueError, match=match):
            Affect("train", path=path)

    fails(
        "a.pkl",
        r"a\.pkl: split 'valid' has vision of shape \[2, 6, 3\] but text of shape \[1, 6, 5\]",
        valid__vision=np.ones((2, STEPS, 3)),
    )
    fails(
        "b.pkl",
        r"b\.pkl: split 'train' has labels of shape \[3, 1, 1\] for 2 samples",
        train__labels=np.ones((3, 1, 1)),
    )
    fails(
        "c.pkl",
        r"c\.pkl: audio has different feature sizes across splits: "
        r"train \[2, 6, 4\], valid \[1, 6, 7\]",
        valid__audio=np.ones((1, STEPS, 7)),
    )
    fails(
        "d.pkl",
        r"d\.pkl: split 'train' has vision \[2, 4, 3\], audio \[2, 6, 4\] and "
        r"text \[2, 6, 5\]; trim=true",
        train__vision=np.ones((2, 4, 3)),
    )
    fails(
        "e.pkl",
        r"e\.pkl: split 'test' has text of shape \[1, 30\]; expected \[samples, steps, features\]",
        test__text=np.ones((1, 30)),
    )
    path = write_pickle(tmp_path / "f.pkl", {"train": good["train"], "test": good["test"]})
    with pytest.raises(
        ValueError,
        match=r"f\.pkl should hold a dict with the splits \['train', 'valid', 'test'\]; "
        r"it holds \['test', 'train'\]",
    ):
        Affect("train", path=path)


BAD_SETTINGS = {
    "task unknown": (
        {"task": "sentiment"},
        "data.task: expected one of ['binary', 'seven_class', 'regression'], found 'sentiment'",
    ),
    "zero_sentiment unknown": (
        {"zero_sentiment": "positive"},
        "data.zero_sentiment: expected one of ['negative', 'drop'], found 'positive'",
    ),
    "drop without binary": (
        {"task": "regression", "zero_sentiment": "drop"},
        "data.zero_sentiment: 'drop' applies to task='binary' only; expected 'negative' with "
        "data.task=regression, found 'drop'",
    ),
    "trim a string": ({"trim": "false"}, "data.trim: expected true or false, found 'false'"),
    "max_samples zero": ({"max_samples": 0}, "data.max_samples: expected an integer >= 1, found 0"),
    "max_samples float": (
        {"max_samples": 1.5},
        "data.max_samples: expected an integer >= 1, found 1.5",
    ),
}


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS.values(), ids=BAD_SETTINGS)
def test_settings_are_checked_before_the_file_is_read(settings, message):
    with pytest.raises(ValueError) as error:
        Affect("train", path="never-read.pkl", **settings)
    assert str(error.value) == message


def test_fingerprint_follows_file_bytes_and_settings(mosi):
    first = Affect("train", path=mosi).fingerprint()
    assert Affect("train", path=mosi).fingerprint() == first
    assert Affect("val", path=mosi).fingerprint() != first
    assert Affect("train", path=mosi, task="seven_class").fingerprint() != first
    splits = pickle.loads(mosi.read_bytes())
    splits["train"]["labels"][0] = -2.0
    write_pickle(mosi, splits)
    stat = os.stat(mosi)
    os.utime(mosi, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert Affect("train", path=mosi).fingerprint() != first


def test_pickle_is_read_once_and_not_carried_by_the_dataset(mosi):
    assert load_affect(mosi) is load_affect(mosi)
    dataset = Affect("train", path=mosi, max_samples=3)
    assert len(dataset) == 3
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._data is None and torch.equal(copy[2]["text"], dataset[2]["text"])


class Payload:
    """What a hostile pickle would carry: a call made while it is loaded."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_a_pickle_that_names_code_is_refused_before_it_runs(tmp_path, capsys):
    path = write_pickle(tmp_path / "evil.pkl", {"train": Payload()})
    with pytest.raises(pickle.UnpicklingError, match=r"evil.pkl names builtins.print"):
        Affect("train", path=path)
    assert "this ran" not in capsys.readouterr().out
