"""AV-MNIST reader on a tiny copy of MultiBench's layout (image/, audio/, *_labels.npy)."""

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from data.avmnist import AVMNIST
from fusion.batch import Collate
from fusion.data import check_dataset

TRAIN, TEST = 12, 5


def write_avmnist(root: Path, train: int = TRAIN, test: int = TEST) -> Path:
    """MultiBench's files: flat float images [N, 784], spectrograms [N, 112, 112], labels."""
    rng = np.random.default_rng(0)
    for part, n in (("train", train), ("test", test)):
        (root / "image").mkdir(parents=True, exist_ok=True)
        (root / "audio").mkdir(exist_ok=True)
        np.save(root / "image" / f"{part}_data.npy", rng.uniform(0, 255, (n, 784)).astype("f4"))
        np.save(root / "audio" / f"{part}_data.npy", rng.uniform(0, 255, (n, 112, 112)))
        np.save(root / f"{part}_labels.npy", np.arange(n) % 10)
    return root


@pytest.fixture
def root(tmp_path) -> Path:
    return write_avmnist(tmp_path / "avmnist")


def test_val_is_carved_from_the_end_of_train(root):
    splits = {s: AVMNIST(s, root=root, val_size=4) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 8, "val": 4, "test": 5}
    images = np.load(root / "image" / "train_data.npy")
    audio = np.load(root / "audio" / "train_data.npy")
    item = splits["val"][0]  # row 8 of the training files
    assert item["label"] == 8
    assert torch.equal(item["image"], torch.from_numpy(images[8].reshape(1, 28, 28) / 255))
    assert torch.allclose(item["audio"], torch.from_numpy(audio[8][None] / 255).float())
    assert splits["test"][4]["label"] == 4
    assert AVMNIST.__init__.__kwdefaults__["val_size"] == 5000  # MultiBench's 55,000 / 5,000


def test_items_modalities_and_task(root):
    dataset = AVMNIST("train", root=root, val_size=4)
    check_dataset(dataset)
    item = dataset[0]
    assert item["image"].shape == (1, 28, 28) and item["audio"].shape == (1, 112, 112)
    assert item["image"].dtype == item["audio"].dtype == torch.float32
    assert item["image"].min() >= 0 and item["image"].max() <= 1
    assert dataset.tasks["digit"].classes == tuple("0123456789")
    image, audio = dataset.modalities["image"], dataset.modalities["audio"]
    assert image.kind == audio.kind == "image"
    assert audio.info["shape"] == [1, 112, 112] and audio.info["image_size"] == [112, 112]
    assert image.info["in_channels"] == audio.info["in_channels"] == 1
    train_pixels = np.load(root / "audio" / "train_data.npy")[:8] / 255  # the train split
    assert audio.info["mean"] == pytest.approx([train_pixels.mean()])
    assert audio.info["std"] == pytest.approx([train_pixels.std()])
    batch = Collate.for_dataset(dataset)([dataset[0], dataset[1]])
    assert batch.inputs["audio"].shape == (2, 1, 112, 112)


def test_normalize_off_keeps_raw_values_and_stats(root):
    dataset = AVMNIST("test", root=root, val_size=4, normalize=False, max_samples=2)
    assert len(dataset) == 2
    raw = np.load(root / "image" / "test_data.npy")[1].reshape(1, 28, 28)
    assert torch.equal(dataset[1]["image"], torch.from_numpy(raw))
    assert dataset.modalities["image"].info["mean"][0] > 1


def test_unflattened_layouts_are_read(root):
    images = np.load(root / "image" / "train_data.npy")
    np.save(root / "image" / "train_data.npy", images.reshape(TRAIN, 1, 28, 28))
    audio = np.load(root / "audio" / "train_data.npy")
    np.save(root / "audio" / "train_data.npy", audio.reshape(TRAIN, 112 * 112))
    dataset = AVMNIST("train", root=root, val_size=4)
    assert dataset[3]["image"].shape == (1, 28, 28) and dataset[3]["audio"].shape == (1, 112, 112)


def test_missing_file_is_named_with_its_path(root):
    (root / "audio" / "test_data.npy").unlink()
    with pytest.raises(
        FileNotFoundError, match=re.escape(str((root / "audio" / "test_data.npy").resolve()))
    ):
        AVMNIST("test", root=root)


def test_sample_counts_must_agree(root):
    np.save(root / "train_labels.npy", np.arange(TRAIN - 1) % 10)
    with pytest.raises(
        ValueError,
        match=r"train_labels\.npy has 11 samples \(shape \[11\]\) but "
        r".*image/train_data\.npy has 12 \(shape \[12, 28, 28\]\)",
    ):
        AVMNIST("train", root=root, val_size=4)


def test_wrong_picture_shape_names_file_and_shapes(root):
    np.save(root / "audio" / "test_data.npy", np.zeros((TEST, 64, 64)))
    with pytest.raises(
        ValueError,
        match=r"audio/test_data\.npy holds an array of shape \[5, 64, 64\]; expected \[N, 12544\]",
    ):
        AVMNIST("test", root=root, val_size=4)


def test_bad_labels_and_val_size(root):
    with pytest.raises(
        ValueError, match=r"val_size=12 leaves no training samples: .*train_labels\.npy has 12"
    ):
        AVMNIST("val", root=root, val_size=12)
    np.save(root / "test_labels.npy", np.array([0, 1, 2, 3, 10]))
    with pytest.raises(ValueError, match=r"test_labels\.npy holds labels outside the digits 0-9"):
        AVMNIST("test", root=root, val_size=4)


def test_fingerprint_follows_file_bytes_and_settings(root):
    first = AVMNIST("train", root=root, val_size=4).fingerprint()
    assert AVMNIST("train", root=root, val_size=4).fingerprint() == first
    assert AVMNIST("train", root=root, val_size=3).fingerprint() != first
    assert AVMNIST("val", root=root, val_size=4).fingerprint() != first
    test = AVMNIST("test", root=root, val_size=4).fingerprint()
    labels = np.load(root / "train_labels.npy")
    labels[0] = 9
    np.save(root / "train_labels.npy", labels)
    stat = os.stat(root / "train_labels.npy")
    os.utime(root / "train_labels.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert AVMNIST("train", root=root, val_size=4).fingerprint() != first
    assert AVMNIST("test", root=root, val_size=4).fingerprint() == test  # reads other files


def test_pickles_without_the_arrays(root):
    dataset = AVMNIST("train", root=root, val_size=4)
    blob = pickle.dumps(dataset)
    assert len(blob) < 20_000  # paths and row ranges, not 12 spectrograms
    copy = pickle.loads(blob)
    assert torch.equal(copy[5]["audio"], dataset[5]["audio"])


BAD_ARGUMENTS = {
    "val_size zero": ({"val_size": 0}, "data.val_size: expected an integer >= 1, found 0"),
    "val_size fractional": (
        {"val_size": 2.5},
        "data.val_size: expected an integer >= 1, found 2.5",
    ),
    "max_samples negative": (
        {"max_samples": -3},
        "data.max_samples: expected an integer >= 1, found -3",
    ),
    "normalize a string": (
        {"normalize": "yes"},
        "data.normalize: expected true or false, found 'yes'",
    ),
}


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS)
def test_bad_arguments_are_named_with_what_was_expected_and_found(root, kwargs, message):
    with pytest.raises(ValueError) as error:
        AVMNIST("train", root=root, **kwargs)
    assert str(error.value) == message


def test_integer_pixels_are_scaled_to_unit_range(root):
    pixels = np.random.default_rng(1).integers(0, 256, (TRAIN, 784), dtype=np.uint8)
    np.save(root / "image" / "train_data.npy", pixels)
    dataset = AVMNIST("train", root=root, val_size=4)
    expected = torch.from_numpy(pixels[3].reshape(1, 28, 28) / 255.0).float()
    assert torch.allclose(dataset[3]["image"], expected)
    assert 0.3 < dataset.modalities["image"].info["mean"][0] < 0.7  # statistics on [0, 1] too


@pytest.mark.parametrize(
    ("pixels", "normalize", "message"),
    [
        (
            np.zeros((TRAIN, 784), np.uint8),
            False,
            "data.normalize: false would use the uint8 pixels of {path} (0-255) unscaled; "
            "expected true for integer pixels (they are divided by 255), found false",
        ),
        (
            np.full((TRAIN, 784), 0.5, np.float32),
            True,
            "data.normalize: true would divide {path}'s float32 pixels, already in [0, 1] "
            "(max 0.5 sampled), by 255 again; set data.normalize=false",
        ),
        (
            np.full((TRAIN, 784), 1000.0, np.float32),
            True,
            "data.normalize: true divides by 255, but {path} holds values up to 1000 (sampled); "
            "expected pixel values 0-255",
        ),
    ],
    ids=["int unscaled", "floats scaled twice", "beyond 255"],
)
def test_pixels_on_another_scale_than_the_setting_are_refused(root, pixels, normalize, message):
    path = root / "image" / "train_data.npy"
    np.save(path, pixels)
    with pytest.raises(ValueError) as error:
        AVMNIST("train", root=root, val_size=4, normalize=normalize)
    assert str(error.value) == message.format(path=path)
