"""Hateful Memes reader on a tiny copy of the release layout (img/*.png and *.jsonl)."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.hateful_memes import HatefulMemes
from fusion.batch import Collate
from fusion.data import check_dataset

COLOR = (255, 0, 128)


def write_png_file(path: Path, channels: int, height: int, width: int, value=COLOR) -> None:
    """A one-colour PNG: grey ("L"), RGB or RGBA, as memes come."""
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    color = value[0] if channels == 1 else tuple(value[:channels])
    Image.new(mode, (width, height), color).save(path)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def meme(id_: int, label: int | None = 0, text: str = "a caption") -> dict:
    record = {"id": id_, "img": f"img/{id_:05d}.png", "text": f"{text} {id_}"}
    if label is not None:
        record["label"] = label
    return record


@pytest.fixture
def root(tmp_path) -> Path:
    """Three RGB memes of different sizes, one RGBA, one grey; five split files."""
    (tmp_path / "img").mkdir()
    for id_, (channels, h, w) in {
        1235: (3, 20, 30),
        42953: (3, 9, 7),
        7: (4, 16, 16),
        8: (1, 12, 10),
        9: (3, 10, 10),
    }.items():
        write_png_file(tmp_path / "img" / f"{id_:05d}.png", channels, h, w, (*COLOR, 200))
    write_jsonl(tmp_path / "train.jsonl", [meme(1235, 1), meme(42953, 0), meme(7, 1)])
    write_jsonl(tmp_path / "dev_seen.jsonl", [meme(8, 0)])
    write_jsonl(tmp_path / "dev_unseen.jsonl", [meme(9, 1), meme(8, 0)])
    write_jsonl(tmp_path / "test_seen.jsonl", [meme(9, 1)])
    write_jsonl(tmp_path / "test_unseen.jsonl", [meme(7, 0)])
    return tmp_path


def test_split_files_and_items(root):
    train = HatefulMemes("train", root=root, image_size=[16, 16])
    check_dataset(train)
    assert len(train) == 3
    item = train[0]
    assert item["text"] == "a caption 1235" and item["label"] == 1
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    expected = torch.tensor(COLOR, dtype=torch.float32).view(3, 1, 1) / 255
    torch.testing.assert_close(item["image"], expected.expand(3, 16, 16))
    assert [len(HatefulMemes(s, root=root)) for s in ("val", "test")] == [1, 1]
    assert len(HatefulMemes("val", root=root, val_file="dev_unseen.jsonl")) == 2
    assert HatefulMemes("test", root=root, test_file="test_unseen.jsonl")[0]["label"] == 0


def test_rgba_and_grey_images_become_rgb(root):
    train = HatefulMemes("train", root=root, image_size=[8, 8])
    assert train[2]["image"].shape == (3, 8, 8)  # RGBA: alpha dropped
    torch.testing.assert_close(train[2]["image"][:, 0, 0], torch.tensor(COLOR) / 255)
    grey = HatefulMemes("val", root=root, image_size=[8, 8])[0]["image"]
    assert (
        grey.shape == (3, 8, 8) and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    )


def test_modalities_and_task(root):
    dataset = HatefulMemes("test", root=root)
    image, text = dataset.modalities["image"], dataset.modalities["text"]
    assert image.kind == "image" and text.kind == "text"
    assert image.info == {
        "shape": [3, 224, 224],
        "in_channels": 3,
        "image_size": [224, 224],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    assert dataset.tasks["hateful"].kind == "binary"
    assert dataset.tasks["hateful"].classes == ("not hateful", "hateful")
    batch = Collate.for_dataset(dataset)([dataset[0], dataset[0]])
    assert batch.inputs["image"].shape == (2, 3, 224, 224)
    assert batch.inputs["text"] == ["a caption 9"] * 2


def test_line_without_label_is_named(root):
    write_jsonl(root / "test_seen.jsonl", [meme(9, 1), meme(8, None)])
    with pytest.raises(ValueError, match=r"test_seen\.jsonl, line 2: no 'label'"):
        HatefulMemes("test", root=root)


def test_malformed_lines_are_named(root):
    path = root / "dev_seen.jsonl"
    path.write_text(json.dumps(meme(8)) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"dev_seen\.jsonl, line 3: not valid JSON"):
        HatefulMemes("val", root=root)
    write_jsonl(path, [meme(8, 2)])
    with pytest.raises(ValueError, match=r"dev_seen\.jsonl, line 1: label must be 0 or 1, got 2"):
        HatefulMemes("val", root=root)
    write_jsonl(path, [{"id": 8, "label": 0, "img": "img/00008.png"}])
    with pytest.raises(ValueError, match=r"dev_seen\.jsonl, line 1: no \['text'\]"):
        HatefulMemes("val", root=root)


def test_missing_files_are_named_with_their_paths(root):
    (root / "img" / "42953.png").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"1 image\(s\) named in .*train\.jsonl are missing, e\.g\. \[.*img/42953\.png",
    ):
        HatefulMemes("train", root=root)
    with pytest.raises(FileNotFoundError, match=re.escape(str((root / "dev.jsonl").resolve()))):
        HatefulMemes("val", root=root, val_file="dev.jsonl")


def test_max_samples_and_settings(root):
    assert len(HatefulMemes("train", root=root, max_samples=2)) == 2


BAD_ARGUMENTS = {
    "image_size one value": (
        {"image_size": [224]},
        "data.image_size: expected [height, width] (or one int) of positive integers, found [224]",
    ),
    "image_size fractional": (
        {"image_size": [224.5, 224]},
        "data.image_size: expected [height, width] (or one int) of positive integers, "
        "found [224.5, 224]",
    ),
    "image_size zero": (
        {"image_size": [0, 8]},
        "data.image_size: expected [height, width] (or one int) of positive integers, found [0, 8]",
    ),
    "max_samples zero": ({"max_samples": 0}, "data.max_samples: expected an integer >= 1, found 0"),
}


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS)
def test_bad_arguments_are_named_with_what_was_expected_and_found(root, kwargs, message):
    with pytest.raises(ValueError) as error:
        HatefulMemes("train", root=root, **kwargs)
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("field", "value", "found"),
    [("text", None, "NoneType None"), ("img", 42953, "int 42953"), ("text", ["a"], "list ['a']")],
    ids=["text null", "img a number", "text a list"],
)
def test_a_caption_or_image_that_is_not_a_string_is_refused(root, field, value, found):
    write_jsonl(root / "train.jsonl", [meme(1235, 1), {**meme(7, 1), field: value}])
    with pytest.raises(ValueError) as error:
        HatefulMemes("train", root=root)
    path = root / "train.jsonl"
    assert str(error.value) == f"{path}, line 2: '{field}' must be a string, found {found}"


def test_sixteen_bit_images_are_scaled_by_their_range(root):
    import numpy as np

    pixels = np.full((4, 4), 65535 // 2, np.uint16)
    Image.fromarray(pixels).save(root / "img" / "01235.png")
    image = HatefulMemes("train", root=root, image_size=[4, 4])[0]["image"]
    assert torch.allclose(image, torch.full((3, 4, 4), 32767 / 65535))


def test_fingerprint_follows_file_bytes_and_settings(root):
    first = HatefulMemes("train", root=root).fingerprint()
    assert HatefulMemes("train", root=root).fingerprint() == first
    assert HatefulMemes("train", root=root, image_size=[64, 64]).fingerprint() != first
    val = HatefulMemes("val", root=root).fingerprint()
    assert val != first
    image = root / "img" / "42953.png"
    write_png_file(image, 3, 9, 7, (0, 0, 0))
    stat = os.stat(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert HatefulMemes("train", root=root).fingerprint() != first
    assert HatefulMemes("val", root=root).fingerprint() == val
