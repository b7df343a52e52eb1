import ast
import logging
import math
import os
import re
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile
import torch
from PIL import Image
from torchvision.io import encode_jpeg, encode_png, write_file
from torchvision.transforms import v2

from data.manifest import ManifestDataset, load_audio, load_image, stratified_parts
from fusion.batch import Collate
from fusion.data import DataFileError, check_dataset
from fusion.training.checkpoint import data_changes, data_record, load_checkpoint, save_checkpoint

SPLITS = ("train", "val", "test")
# data rows (1-based): 4 lacks a photo and a caption, 5 a clip and a weight, 8 a city;
# 9 has no input at all and 10 no label (both skipped); berlin (7) is never seen in train.
ROWS = [
    (1, "img/a.png", "snd/a8k.wav", "a fluffy cat on a sofa", 4.0, "paris", "cat", "train"),
    (2, "img/b.png", "snd/b16k.wav", "a dog chasing a red ball", 20.0, "lyon", "dog", "train"),
    (3, "img/c.jpg", "snd/c44k.wav", "small cat asleep in the sun", 3.0, "paris", "cat", "train"),
    (4, None, "snd/a8k.wav", None, 25.0, "lyon", "dog", "train"),
    (5, "img/a.png", None, "a big dog by the river", None, "paris", "dog", "train"),
    (6, "img/b.png", "snd/b16k.wav", "cat at the window", 5.0, "paris", "cat", "validation"),
    (7, "img/c.jpg", "snd/c44k.wav", "dog on the porch", 30.0, "berlin", "dog", "val"),
    (8, "img/a.png", "snd/a8k.wav", "tabby with green eyes", 4.5, None, "cat", "test"),
    (9, None, None, None, None, None, "cat", "test"),
    (10, "img/b.png", "snd/b16k.wav", "nobody labelled me", 9.0, "lyon", None, "test"),
    (11, "img/b.png", "snd/b16k.wav", "a puppy with a stick", 12.0, "lyon", "dog", "test"),
]
COLUMNS = ["id", "photo", "clip", "caption", "weight_kg", "city", "label", "split"]


def sine(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.5 * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def write_media(folder) -> None:
    """PNGs (colour 10x12, grey 6x8), a colour JPEG 16x20, and WAVs at 8 kHz (0.5 s),
    16 kHz (0.3 s) and 44.1 kHz stereo (0.75 s, right channel silent)."""
    (folder / "img").mkdir()
    (folder / "snd").mkdir()
    g = torch.Generator().manual_seed(0)
    pixels = {"a.png": (3, 10, 12), "b.png": (1, 6, 8), "c.jpg": (3, 16, 20)}
    for name, shape in pixels.items():
        image = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        encoded = encode_png(image) if name.endswith("png") else encode_jpeg(image)
        write_file(str(folder / "img" / name), encoded)
    soundfile.write(folder / "snd" / "a8k.wav", sine(0.5, 8000), 8000)
    soundfile.write(folder / "snd" / "b16k.wav", sine(0.3, 16000), 16000)
    left = sine(0.75, 44100)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    soundfile.write(folder / "snd" / "c44k.wav", stereo, 44100)


@pytest.fixture
def folder(tmp_path):
    write_media(tmp_path)
    return tmp_path


@pytest.fixture
def frame():
    return pd.DataFrame(ROWS, columns=COLUMNS)


@pytest.fixture
def manifest(folder, frame):
    path = folder / "pets.csv"
    frame.to_csv(path, index=False)
    return path


def build(path, split="train", **settings):
    return ManifestDataset(split, path=path, target="label", **settings)


def same_item(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def test_columns_become_modalities_of_inferred_kinds(manifest, caplog):
    with caplog.at_level(logging.INFO, logger="fusion"):
        train = build(manifest)
    check_dataset(train)
    assert {n: m.kind for n, m in train.modalities.items()} == {
        "photo": "image",
        "clip": "audio",
        "caption": "text",
        "tabular": "tabular",
    }
    assert (
        "id=id | photo=image | clip=audio | caption=text | weight_kg=numeric | "
        "city=categorical | label=target | split=split" in caplog.text
    )
    assert train.tasks == {"label": train.tasks["label"]}
    assert train.tasks["label"].kind == "binary"
    assert train.tasks["label"].classes == ("cat", "dog")
    assert train.deterministic


def test_splits_come_from_the_split_column_with_aliases(manifest, caplog):
    with caplog.at_level(logging.WARNING, logger="fusion"):
        sizes = {s: len(build(manifest, s)) for s in SPLITS}
    assert sizes == {"train": 5, "val": 2, "test": 2}
    assert "skipped 2 rows" in caplog.text and "data rows 9, 10" in caplog.text
    assert caplog.text.count("skipped") == 1  # the table is read once for every split
    assert len(build(manifest, max_samples=3)) == 3


def test_images_are_resized_to_the_first_train_image_with_its_channels(manifest):
    train = build(manifest)
    info = train.modalities["photo"].info
    assert info["shape"] == [3, 10, 12] and info["in_channels"] == 3
    assert info["image_size"] == [10, 12]
    for i in (0, 1, 2):  # colour PNG, grey PNG (repeated), colour JPEG (resized)
        image = train[i]["photo"]
        assert image.shape == (3, 10, 12) and image.dtype == torch.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
    grey = train[1]["photo"]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])
    photos = torch.stack([train[i]["photo"] for i in (0, 1, 2, 4)])  # every train photo
    assert info["mean"] == pytest.approx(photos.mean(dim=(0, 2, 3)).tolist(), abs=1e-5)
    assert info["std"] == pytest.approx(
        photos.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-5
    )


def test_image_size_and_channels_settings(manifest):
    train = build(manifest, image_size=[4, 5], image_channels=1)
    assert train.modalities["photo"].info["shape"] == [1, 4, 5]
    assert train[0]["photo"].shape == (1, 4, 5)
    assert build(manifest, image_size=7)[2]["photo"].shape == (3, 7, 7)


def test_audio_is_resampled_mixed_and_padded_to_the_longest_train_clip(manifest, folder):
    train = build(manifest)
    info = train.modalities["clip"].info
    # the longest train clip is 0.75 s, rounded up to 0.8 s at 16 kHz
    assert info == {"shape": [12800], "sample_rate": 16000, "clip_samples": 12800}
    clip = train[0]["clip"]  # 0.5 s at 8 kHz: 8000 samples at 16 kHz, then zeros
    assert clip.shape == (12800,)
    assert clip[7990:8000].abs().max() > 0 and not clip[8000:].any()
    stereo = soundfile.read(folder / "snd" / "c44k.wav", dtype="float32")[0]
    mixed = load_audio(str(folder / "snd" / "c44k.wav"), 44100, 33075, "start")
    assert torch.allclose(mixed, torch.from_numpy(stereo.mean(axis=1)))
    centre = load_audio(str(folder / "snd" / "c44k.wav"), 44100, 1000, "center")
    assert torch.equal(centre, mixed[16037:17037])
    assert build(manifest, audio_seconds=0.25)[0]["clip"].shape == (4000,)


def test_tabular_is_standardized_and_coded_from_the_train_split(manifest):
    splits = {s: build(manifest, s) for s in SPLITS}
    info = splits["train"].modalities["tabular"].info
    assert info == {
        "shape": [2],
        "num_numeric": 1,
        "categorical_cardinalities": [3],  # unknown, lyon, paris
        "columns": ["weight_kg", "city"],
    }
    train = torch.stack([item["tabular"] for item in splits["train"]])
    weights = train[[0, 1, 2, 3], 0]  # the train rows that have a weight
    assert weights.mean() == pytest.approx(0.0, abs=1e-6)
    assert weights.std(unbiased=False) == pytest.approx(1.0, abs=1e-5)
    assert train[4, 0] == 0.0  # a missing weight is the train mean
    assert train[:, 1].tolist() == [2.0, 1.0, 2.0, 1.0, 2.0]  # paris 2, lyon 1
    assert splits["val"][1]["tabular"][1] == 0.0  # berlin was never seen in train
    assert splits["test"][0]["tabular"][1] == 0.0  # an empty city
    std = math.sqrt(np.var([4.0, 20.0, 3.0, 25.0]))
    assert splits["test"][0]["tabular"][0] == pytest.approx((4.5 - 13.0) / std)


def test_empty_cells_are_missing_modalities_and_collate_masks_them(manifest):
    train = build(manifest)
    items = list(train)
    assert items[3]["photo"] is None and items[3]["caption"] is None
    assert items[4]["clip"] is None and items[4]["caption"] == "a big dog by the river"
    assert [item["label"] for item in items] == [0, 1, 0, 1, 1]
    batch = Collate.for_dataset(train)(items)
    assert batch.present["photo"].tolist() == [True, True, True, False, True]
    assert batch.present["clip"].tolist() == [True, True, True, True, False]
    assert batch.present["caption"].tolist() == [True, True, True, False, True]
    assert batch.present["tabular"].all()
    assert batch.inputs["photo"].shape == (5, 3, 10, 12)
    assert batch.targets.tolist() == [0, 1, 0, 1, 1]


def test_items_are_the_same_across_constructions(manifest):
    first, second = build(manifest, "val"), build(manifest, "val")
    for i in range(len(first)):
        assert same_item(first[i], second[i])


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_manifests_read_like_the_csv(manifest, frame, folder, fmt):
    path = folder / f"pets.{fmt}"
    if fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    csv, other = build(manifest, "test"), build(path, "test")
    assert other.modalities == csv.modalities and other.tasks == csv.tasks
    assert len(other) == len(csv)
    for i in range(len(csv)):
        assert same_item(csv[i], other[i])


def test_parquet_without_pyarrow_names_the_extra(frame, folder, monkeypatch):
    path = folder / "pets.parquet"
    frame.to_parquet(path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"pets\.parquet needs pyarrow.*fusion\[parquet\]"):
        build(path)


def test_fingerprint_follows_the_referenced_files(manifest, folder):
    val = build(manifest, "val")
    assert val.fingerprint() == val.fingerprint() == build(manifest, "val").fingerprint()
    assert build(manifest, "test").fingerprint() != val.fingerprint()
    assert build(manifest, "val", image_size=8).fingerprint() != val.fingerprint()
    before = val.fingerprint()
    sound = folder / "snd" / "b16k.wav"
    stat = sound.stat()
    soundfile.write(sound, sine(0.3, 16000, freq=300.0), 16000)  # same size, new content
    os.utime(sound, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert val.fingerprint() != before


def test_augmentation_is_random_in_train_and_fixed_per_view(manifest):
    flip = [v2.RandomHorizontalFlip(p=0.5), v2.RandomVerticalFlip(p=0.5)]
    train = build(manifest, augment=flip)
    assert not train.deterministic
    assert build(manifest, "val", augment=flip).deterministic
    views = [train.fixed_view(v) for v in range(4)]
    assert all(view.deterministic for view in views)
    assert same_item(views[1][0], views[1][0])
    assert same_item(views[1][0], build(manifest, augment=flip).fixed_view(1)[0])
    draws = [view[0]["photo"] for view in views]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert views[0].fingerprint() != views[1].fingerprint()


def test_augment_must_be_built_transforms_that_keep_the_shape(manifest):
    with pytest.raises(TypeError, match=r"augment\[0\] is dict.*Hydra builds it"):
        build(manifest, augment=[{"_target_": "torchvision.transforms.v2.RandomHorizontalFlip"}])
    with pytest.raises(ValueError, match=r"augment changed modality 'photo'.*size=\[10, 12\]"):
        build(manifest, augment=[v2.CenterCrop(4)])  # at construction, not in the first epoch


def test_stratified_split_keeps_fractions_and_label_mix(tmp_path):
    labels = np.repeat(["a", "b", "c"], [50, 30, 20])
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"x": rng.normal(size=100), "label": rng.permutation(labels)})
    frame.to_csv(tmp_path / "table.csv", index=False)
    splits = {s: build(tmp_path / "table.csv", s) for s in SPLITS}
    assert {s: len(d) for s, d in splits.items()} == {"train": 70, "val": 15, "test": 15}
    for name, dataset in splits.items():
        counts = np.bincount([item["label"] for item in dataset], minlength=3)
        share = len(dataset) / 100
        assert np.all(np.abs(counts - share * np.array([50, 30, 20])) <= 1), (name, counts)
    parts = stratified_parts(np.repeat([0, 1], 10), (0.5, 0.25, 0.25), seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(20))
    again = stratified_parts(np.repeat([0, 1], 10), (0.5, 0.25, 0.25), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_column_overrides(manifest):
    train = build(manifest, columns={"caption": "ignore", "weight_kg": "categorical"})
    assert list(train.modalities) == ["photo", "clip", "tabular"]
    info = train.modalities["tabular"].info
    assert info["num_numeric"] == 0 and info["columns"] == ["weight_kg", "city"]
    assert info["categorical_cardinalities"] == [5, 3]  # 3, 4, 20, 25 and unknown


def test_a_path_leaving_the_folder_is_counted(folder, frame, caplog):
    sub = folder / "tables"
    sub.mkdir()
    for column in ("photo", "clip"):
        frame[column] = "../" + frame[column]
    frame.to_csv(sub / "pets.csv", index=False)
    with caplog.at_level(logging.INFO, logger="fusion"):
        build(sub / "pets.csv")
    assert "16 file paths leave its folder through '..'" in caplog.text


def test_a_missing_column_is_named_with_close_matches(manifest):
    with pytest.raises(
        ValueError, match=r"target: manifest .*pets\.csv has no column 'lable'.*\['label'\]"
    ):
        ManifestDataset(path=manifest, target="lable")
    with pytest.raises(ValueError, match=r"columns\.photos: .* no column 'photos'.*\['photo'\]"):
        build(manifest, columns={"photos": "image"})
    with pytest.raises(ValueError, match=r"split_column: .* no column 'fold'"):
        build(manifest, split_column="fold")


def test_an_unknown_kind_is_refused(manifest):
    with pytest.raises(ValueError, match=r"columns\.caption: unknown column kind 'txt'.*'text'"):
        build(manifest, columns={"caption": "txt"})


def test_missing_files_are_reported_together(manifest, folder):
    for name in ("img/c.jpg", "snd/a8k.wav", "snd/b16k.wav"):  # rows 1-4, 6-8 and 11
        (folder / name).unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"pets\.csv: 8 referenced files do not exist or are no files \(4 train, 2 val, "
        r"2 test;",
    ) as err:
        build(manifest)
    message = str(err.value)
    assert "data row 1, column 'clip' (train)" in message
    assert "data row 3, column 'photo' (train)" in message
    assert "data row 7" not in message and "and 3 more" in message


def test_a_missing_file_is_reported_by_the_split_that_lists_it(manifest, folder, frame):
    frame.loc[10, "clip"] = "snd/gone.wav"  # data row 11, in test
    frame.to_csv(manifest, index=False)
    build(manifest)  # train and val have all their files
    build(manifest, "val")
    with pytest.raises(
        FileNotFoundError,
        match=r"pets\.csv: 1 referenced files do not exist or are no files \(1 test;.*"
        r"data row 11, column 'clip' \(test\): .*gone\.wav",
    ):
        build(manifest, "test")


def test_an_undecodable_file_in_any_split_is_named_before_training(manifest, folder, frame):
    (folder / "img" / "broken.png").write_bytes(b"not a png")
    frame.loc[6, "photo"] = "img/broken.png"  # data row 7, in val: found when val is built
    frame.to_csv(manifest, index=False)
    build(manifest)
    with pytest.raises(
        DataFileError, match=r"pets\.csv, data row 7, column 'photo': cannot decode .*broken\.png"
    ):
        build(manifest, "val")
    frame.loc[6, "photo"] = "img/a.png"
    frame.loc[7, "clip"] = "img/a.png"  # data row 8, in test: an image where a clip should be
    frame.to_csv(manifest, index=False)
    with pytest.raises(DataFileError, match=r"data row 8, column 'clip': cannot decode .*a\.png"):
        build(manifest, "test", columns={"clip": "audio"})


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_an_image_whose_header_reads_but_whose_body_is_cut_is_named_before_training(
    manifest, folder, frame, suffix
):
    pixels = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=torch.Generator())
    encode = encode_png if suffix == "png" else encode_jpeg
    write_file(str(folder / "img" / f"whole.{suffix}"), encode(pixels))
    whole = (folder / "img" / f"whole.{suffix}").read_bytes()
    (folder / "img" / f"cut.{suffix}").write_bytes(whole[: len(whole) // 2])
    frame.loc[7, "photo"] = f"img/cut.{suffix}"  # data row 8, in test
    frame.to_csv(manifest, index=False)
    with pytest.raises(
        DataFileError, match=rf"data row 8, column 'photo': cannot decode .*cut\.{suffix}"
    ):
        build(manifest, "test")
    frame.loc[7, "photo"] = f"img/whole.{suffix}"
    frame.to_csv(manifest, index=False)
    build(manifest, "test")  # the whole file decodes


def test_a_manifest_that_is_not_utf8_is_named_with_its_line(tmp_path):
    rows = ["x,label", *(f"{i},{i % 2}" for i in range(6)), "7,caf\u00e9"]
    (tmp_path / "t.csv").write_bytes("\n".join(rows).encode("latin-1") + b"\n")
    with pytest.raises(ValueError) as err:
        build(tmp_path / "t.csv")
    assert str(err.value) == (
        f"manifest {tmp_path / 't.csv'}: cannot read it as CSV: file line 8 (the header is line "
        "1) holds bytes that are not UTF-8 (b'\\xe9'); save the file as UTF-8 (it may be Latin-1 "
        "or Windows-1252)"
    )


def test_a_folder_or_a_pipe_where_a_file_should_be_is_named_as_such(manifest, folder, frame):
    (folder / "img" / "sub.png").mkdir()
    os.mkfifo(folder / "img" / "pipe.png")
    frame.loc[6, "photo"] = "img/sub.png"
    frame.loc[7, "photo"] = "img/pipe.png"
    frame.to_csv(manifest, index=False)
    with pytest.raises(
        FileNotFoundError,
        match=r"2 referenced files do not exist or are no files \(1 val, 1 test; .*data row 7, "
        r"column 'photo' \(val\): .*sub\.png \(a folder\); data row 8, column 'photo' "
        r"\(test\): .*pipe\.png \(not a regular file: a device, a pipe or a socket\)",
    ):
        build(manifest, "val")


@pytest.mark.parametrize(
    ("cells", "kind"),
    [
        (["img/a.png"] * 9 + ["img/"], "image"),
        (["snd/a.wav"] * 9 + ["notes.txt"], "audio"),
        (["4.0", "20", "heavy", "3.5", "25"], "numeric"),
        (["1", "2", "1", "2"], "categorical"),  # all numbers, quoted on purpose (JSON)
        (["a.png", "b.png", "a long caption", "c.wav", "d"], "text"),
    ],
)
def test_a_majority_of_cells_decides_the_kind_and_the_odd_cell_is_named(cells, kind):
    from data.manifest import infer_kind

    assert infer_kind(pd.Series(cells, name="x", dtype=object)) == kind


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("heavy", r"data row 3, column 'weight_kg': 'heavy' is not a number, and the column is numeric"),
        ("inf", r"data row 3, column 'weight_kg': 'inf' is infinite"),
        ("-inf", r"data row 3, column 'weight_kg': '-inf' is infinite"),
        ("1e300", r"column 'weight_kg': the train values' mean or std overflows float64 \(data row 3"),
    ],
)  # fmt: skip
def test_a_cell_that_cannot_be_standardized_is_named(manifest, frame, value, message):
    frame["weight_kg"] = frame["weight_kg"].astype(object)
    frame.loc[2, "weight_kg"] = value
    frame.to_csv(manifest, index=False)
    with pytest.raises(ValueError, match=message):
        build(manifest)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("id", r"target 'id' in .* holds a different value in each of its 11 rows.*an id column\?"),
        ("split", r"target 'split' in .* holds only split names \['test', 'train', 'val', 'validation'\]"),
    ],
)  # fmt: skip
def test_a_target_that_cannot_be_a_label_is_refused(manifest, target, message):
    with pytest.raises(ValueError, match=message):
        ManifestDataset(path=manifest, target=target)


def test_a_row_with_more_cells_than_the_header_is_named_by_its_data_row(tmp_path):
    (tmp_path / "t.csv").write_text("x,label\n1,a\n2,b,extra\n3,a\n")
    with pytest.raises(
        ValueError,
        match=r"cannot read it as CSV: data row 2 \(file line 3\) has 3 cells, the header 2",
    ):
        build(tmp_path / "t.csv")


def test_bad_split_values_and_empty_splits_are_refused(manifest, frame):
    frame.loc[2, "split"] = "holdout"
    frame.to_csv(manifest, index=False)
    with pytest.raises(ValueError, match=r"data row 3, column 'split': the split is 'holdout'"):
        build(manifest)
    frame["split"] = frame["split"].replace({"test": "val"})
    frame.loc[2, "split"] = "train"
    frame.to_csv(manifest, index=False)
    with pytest.raises(ValueError, match=r"split 'test' has no rows"):
        build(manifest)


def test_targets_that_are_not_classes_are_refused(tmp_path):
    table = pd.DataFrame({"x": np.arange(30.0), "y": np.full(30, "same")})
    table.to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(ValueError, match=r"target 'y' in .*one\.csv has one class, \['same'\]"):
        ManifestDataset(path=tmp_path / "one.csv", target="y")
    table["y"] = np.linspace(0.0, 1.0, 30)
    table.to_csv(tmp_path / "float.csv", index=False)
    with pytest.raises(
        ValueError, match=r"target 'y' .* to predict the number, set data.target_kind=regression"
    ):
        ManifestDataset(path=tmp_path / "float.csv", target="y")


def test_numeric_classes_sort_as_numbers(tmp_path):
    table = pd.DataFrame({"x": np.arange(40.0), "y": np.tile([2, 10, 1, 0], 10)})
    table.to_csv(tmp_path / "t.csv", index=False)
    assert ManifestDataset(path=tmp_path / "t.csv", target="y").tasks["y"].classes == (
        "0",
        "1",
        "2",
        "10",
    )


def test_doubtful_inferences_are_said_with_the_override(tmp_path, caplog):
    from data.manifest import inference_doubt

    paths = pd.Series(["a.png", "b.png", "a long caption", "c.wav", "d"], name="scan")
    assert inference_doubt(paths, "text") == (
        "read as text although 3 of 5 cells are file paths; set data.columns={scan: image} (or "
        "audio) to have the others named"
    )
    captions = pd.Series(["a cat", "a dog", "a cat", "a dog"], name="caption")
    assert "set data.columns={caption: text}" in inference_doubt(captions, "categorical")
    assert (
        inference_doubt(pd.Series(["paris", "lyon", "paris"], name="city"), "categorical") is None
    )
    assert inference_doubt(pd.Series(["a long free text", "another"], name="n"), "text") is None


def test_a_manifest_says_the_sizes_it_chose(manifest, caplog):
    with caplog.at_level(logging.INFO, logger="fusion"):
        build(manifest)
    assert "column 'photo': images read as 3 x 10 x 12" in caplog.text
    assert (
        "column 'clip': clips read as mono at 16000 Hz, cropped or padded to 0.80 s" in caplog.text
    )


BAD_SETTINGS = {
    "seed fractional": ({"seed": 1.5}, "data.seed: expected an integer >= 0, found 1.5"),
    "seed negative": ({"seed": -1}, "data.seed: expected an integer >= 0, found -1"),
    "fractions two": (
        {"fractions": (0.7, 0.3)},
        "data.fractions: expected 3 positive numbers (train, val, test) summing to 1, "
        "found [0.7, 0.3]",
    ),
    "image_size zero": (
        {"image_size": 0},
        "data.image_size: expected [height, width] (or one int) of positive integers or null, "
        "found [0, 0]",
    ),
    "image_size fractional": (
        {"image_size": [8, 8.5]},
        "data.image_size: expected [height, width] (or one int) of positive integers or null, "
        "found [8, 8.5]",
    ),
    "image_channels 2": (
        {"image_channels": 2},
        "data.image_channels: expected one of [None, 1, 3], found 2",
    ),
    "image_channels bool": (
        {"image_channels": True},
        "data.image_channels: expected one of [None, 1, 3], found True",
    ),
    "sample rate zero": (
        {"audio_sample_rate": 0},
        "data.audio_sample_rate: expected an integer >= 1, found 0",
    ),
    "sample rate fractional": (
        {"audio_sample_rate": 8000.5},
        "data.audio_sample_rate: expected an integer >= 1, found 8000.5",
    ),
    "audio_seconds inf": (
        {"audio_seconds": float("inf")},
        "data.audio_seconds: expected a finite number > 0, found inf",
    ),
    "audio_seconds negative": (
        {"audio_seconds": -1.0},
        "data.audio_seconds: expected a finite number > 0, found -1.0",
    ),
    "audio_crop unknown": (
        {"audio_crop": "middle"},
        "data.audio_crop: expected one of ['start', 'center'], found 'middle'",
    ),
    "max_samples zero": ({"max_samples": 0}, "data.max_samples: expected an integer >= 1, found 0"),
    "view negative": ({"view": -1}, "data.view: expected an integer >= 0, found -1"),
    "check_files a string": (
        {"check_files": "no"},
        "data.check_files: expected true or false, found 'no'",
    ),
}


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS.values(), ids=BAD_SETTINGS)
def test_bad_settings_are_named_before_the_manifest_is_read(tmp_path, settings, message):
    with pytest.raises(ValueError) as error:
        build(tmp_path / "never-read.csv", **settings)
    assert str(error.value) == message


def test_deep_tiff_pixels_are_scaled_not_saturated(tmp_path):
    from PIL import Image

    sixteen = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "a.tif")
    pixels = load_image(str(tmp_path / "a.tif"), 3, (8, 8))
    assert pixels.shape == (3, 8, 8)
    assert torch.allclose(pixels[1], torch.from_numpy(sixteen / 65535.0).float())
    floats = (np.arange(64).reshape(8, 8) / 64).astype(np.float32)
    Image.fromarray(floats).save(tmp_path / "f.tif")
    assert torch.equal(load_image(str(tmp_path / "f.tif"), 1, (8, 8))[0], torch.from_numpy(floats))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (
            np.full((4, 4), 2.0, np.float32),
            "float pixels must lie in [0, 1]; found values from 2.0 to 2.0",
        ),
        (
            np.full((4, 4), np.nan, np.float32),
            "float pixels must lie in [0, 1]; found values from nan",
        ),
        (np.full((4, 4), 70000, np.int32), "32-bit integer pixels (Pillow mode 'I') have no known"),
    ],
    ids=["float above 1", "float nan", "int32"],
)
def test_deep_tiff_pixels_without_a_known_scale_are_refused(tmp_path, array, message):
    from PIL import Image

    Image.fromarray(array).save(tmp_path / "x.tif")
    with pytest.raises(ValueError) as error:
        load_image(str(tmp_path / "x.tif"), 1, (4, 4))
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x,x,label\n1,2,a\n", r"cannot read it as CSV: the header names the columns \['x'\] more than once"),
        ("x,y,label\n1,2,a\n3,b\n4,5,a\n", r"cannot read it as CSV: data row 2 has 2 cells, the header 3"),
    ],
)  # fmt: skip
def test_a_header_naming_a_column_twice_and_a_short_row_are_named(tmp_path, text, message):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(ValueError, match=message):
        build(tmp_path / "t.csv")


def test_a_column_whose_name_cannot_be_a_modality_is_named(manifest, frame):
    frame.rename(columns={"caption": "my.caption"}).to_csv(manifest, index=False)
    with pytest.raises(
        ValueError,
        match=r"column 'my.caption' \(text\) cannot be a modality: a modality name holds no '.'",
    ):
        build(manifest)


def clip_file(folder, how):
    """A WAV in /snd damaged as `how` says."""
    path = folder / "snd" / f"{how.replace(' ', '_')}.wav"
    if how == "no samples":
        soundfile.write(path, np.zeros(0, dtype=np.float32), 8000)
    elif how == "cut":
        soundfile.write(path, sine(0.5, 8000), 8000)
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif how == "nan":
        soundfile.write(path, np.full(800, np.nan, dtype=np.float32), 8000, subtype="FLOAT")
    else:  # a float file in another scale
        soundfile.write(path, 1000 * sine(0.1, 8000), 8000, subtype="FLOAT")
    return path


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("no samples", r"data row 8, column 'clip': cannot decode .*no_samples\.wav: it holds no samples \(0 frames\)"),
        ("cut", r"data row 8, column 'clip': cannot decode .*cut\.wav: it is cut short: its header says 8000 bytes of samples, the file holds 3978"),
        ("nan", r"data row 8, column 'clip': cannot decode .*nan\.wav: it holds 800 NaN or infinite samples"),
        ("loud", r"data row 8, column 'clip': cannot decode .*loud\.wav: float samples must lie in \[-1, 1\]; found a peak of 500"),
    ],
)  # fmt: skip
def test_a_damaged_clip_in_any_split_is_named_before_training(
    manifest, folder, frame, how, message
):
    frame.loc[7, "clip"] = str(clip_file(folder, how).relative_to(folder))  # data row 8, test
    frame.to_csv(manifest, index=False)
    with pytest.raises(DataFileError, match=message):
        build(manifest, "test")


def test_a_clip_damaged_after_the_check_is_named_when_read(manifest, folder, frame):
    frame.loc[7, "clip"] = "snd/later.wav"  # data row 8, test
    frame.to_csv(manifest, index=False)
    soundfile.write(folder / "snd" / "later.wav", sine(0.5, 8000), 8000)
    test = build(manifest, "test")
    clip_file(folder, "nan").replace(folder / "snd" / "later.wav")
    with pytest.raises(
        DataFileError,
        match=r"data row 8, column 'clip': cannot decode .*later\.wav: it holds 800 NaN",
    ):
        test[0]


def test_a_clip_far_longer_than_the_others_is_said(manifest, folder, frame, caplog):
    soundfile.write(folder / "snd" / "long.wav", sine(30.0, 8000), 8000)
    frame.loc[0, "clip"] = "snd/long.wav"  # data row 1, train
    frame.to_csv(manifest, index=False)
    with caplog.at_level(logging.WARNING, logger="fusion"):
        build(manifest)
    assert re.search(
        r"column 'clip': the clip of data row 1 lasts 30\.0 s, \d+ times the median train "
        r"clip \([\d.]+ s\); every clip is padded to it",
        caplog.text,
    ), caplog.text


def test_a_decompression_bomb_is_named_with_its_row(manifest, folder, frame, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # a.png's 120 pixels are over 2x this
    frame.to_csv(manifest, index=False)
    with pytest.raises(
        DataFileError,
        match=r"pets\.csv, data row 1, column 'photo': cannot decode .*: Image size \(\d+ pixels\) exceeds limit",
    ):
        build(manifest)


def test_images_of_several_shapes_are_said_and_read_at_the_most_common(manifest, frame, caplog):
    frame.loc[[1, 2], "photo"] = "img/a.png"  # train: a.png 3 x 10 x 12 four times, row 4 none
    frame.loc[0, "photo"] = "img/c.jpg"  # data row 1: 3 x 16 x 20
    frame.to_csv(manifest, index=False)
    with caplog.at_level(logging.WARNING, logger="fusion"):
        train = build(manifest)
    assert train.modalities["photo"].info["shape"] == [3, 10, 12]
    assert (
        "the train images have 2 shapes; 3 of 4 are 3 x 10 x 12 (data row 1 is 3 x 16 x 20)"
        in caplog.text
    )


def test_what_training_would_run_on_without_is_said(manifest, frame, caplog):
    frame.loc[6, "label"] = "bird"  # data row 7, val: a class no train row has
    frame.loc[[5, 6], "photo"] = None  # every val row without a photo
    frame.loc[7, "label"] = "3"  # data row 8, test
    frame.to_csv(manifest, index=False)
    with caplog.at_level(logging.WARNING, logger="fusion"):
        build(manifest)
    assert "the classes ['3', 'bird'] have no train row (data rows [7, 8])" in caplog.text
    assert "modality 'photo' is empty in every val row, so the val metrics do not measure it" in (
        caplog.text
    )


def test_a_word_among_numeric_targets_is_said(tmp_path, caplog):
    rows = ["x,label", *(f"{i},{i % 5}" for i in range(20)), "20,seven"]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="fusion"):
        build(tmp_path / "t.csv")
    assert (
        "target 'label' in t.csv: 20 of 21 values are numbers, and data row 21 holds 'seven', "
        "which makes a class of its own"
    ) in caplog.text


@pytest.mark.parametrize("spelling", ["NaN", "null"])
def test_a_target_spelled_missing_is_said(tmp_path, caplog, spelling):
    labels = ["cat", "dog"] * 10 + [spelling, spelling]
    rows = ["x,label", *(f"{i},{label}" for i, label in enumerate(labels))]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="fusion"):
        build(tmp_path / "t.csv")
    assert (
        f"target 'label' in t.csv: 2 rows (data rows 21, 22) hold '{spelling}', which is read "
        "as a class of its own; leave the cell empty where the target is missing"
    ) in caplog.text
    assert "which makes a class of its own" not in caplog.text


def test_columns_that_are_probably_not_what_they_are_read_as_are_said(tmp_path, caplog):
    labels = ["cat", "dog", "Cat", "bird"] * 6
    rows = ["id,weight,copy,x,label"]
    rows += [f'{i // 2},"{i % 7},5",{label}-ish,{i},{label}' for i, label in enumerate(labels)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="fusion"):
        build(tmp_path / "t.csv")
    for said in (
        "column 'id': named like a row id, but its values repeat (12 distinct over 24 cells), "
        "so it is read as numeric, an input; if it identifies rows (or groups of them), set "
        "data.columns={id: ignore}",
        "column 'weight': read as categorical although 24 of 24 cells are numbers written "
        "with a decimal comma ('0,5'); write them with a '.'",
        "column 'copy' has one value per class of the target 'label' in every row: the model "
        "can read the answer from it (a leak)",
        "target 'label' in t.csv: the classes ['Cat', 'cat'] differ only in case",
    ):
        assert said in caplog.text, caplog.text
    assert "column 'x' has one value per class" not in caplog.text


def test_single_row_classes_shared_files_and_stray_columns_are_said(tmp_path, caplog, folder):
    rows = ["photo,extra,label,split"]
    rows += [f"img/a.png,,{i % 3},train" for i in range(30)]
    rows += ["img/a.png,x,2.5,train", "img/b.png,,0,val", "img/b.png,,1,test"]
    (folder / "t.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="fusion"):
        build(folder / "t.csv")
    assert (
        "the classes ['2.5'] have one row each (data rows [31]): a typo or an outlier"
        in caplog.text
    )
    assert "column 'extra': a value in only 1 of 33 rows (data row 31)" in caplog.text
    assert "column 'photo': 2 val/test rows use a file a train row uses" not in caplog.text
    (folder / "t.csv").write_text("\n".join([*rows[:-1], "img/a.png,,1,test"]) + "\n")
    with caplog.at_level(logging.WARNING, logger="fusion"):
        build(folder / "t.csv")
    assert (
        "column 'photo': 1 val/test rows use a file a train row uses too (data row 33: "
        f"{folder / 'img' / 'a.png'}), so their metrics are not of unseen data"
    ) in caplog.text


def test_a_list_as_a_target_and_a_file_of_another_format_are_named(
    tmp_path, folder, manifest, frame
):
    lines = ['{"x": 1, "label": "a"}', '{"x": 2, "label": ["a", "b"]}', '{"x": 3, "label": "b"}']
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        ValueError,
        match=r"target 'label' in .*t\.jsonl, data row 2: expected one class name or code, found a list \['a', 'b'\]",
    ):
        build(tmp_path / "t.jsonl")
    (folder / "snd" / "notes.mp3").write_text("ID3 not audio")
    frame.loc[7, "clip"] = "snd/notes.mp3"
    frame.to_csv(manifest, index=False)
    with pytest.raises(
        DataFileError,
        match=r"data row 8, column 'clip': cannot decode .*notes\.mp3: libsndfile does not recognise it as audio",
    ):
        build(manifest, "test", columns={"clip": "audio"})


def test_blank_lines_count_as_data_rows_in_every_message(tmp_path, caplog):
    lines = ["x,city,label,split"]
    lines += [f"{i},{'ab'[i % 2]},{'cd'[i % 2]},{'train' if i < 7 else 'val'}" for i in range(10)]
    lines += ["", ",,,", ""]  # file lines 12-14 (data rows 11-13): a row of empty cells
    lines += ["3,a,c,test", "4,b,d,test", "5,a,c,test"]  # file lines 15-17
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="fusion"):
        test = build(tmp_path / "t.csv", "test")
    assert "skipped 1 rows without a target or without any input (data rows 12)" in caplog.text
    assert test.table.row_numbers[test.indices].tolist() == [14, 15, 16]
    lines[15] = "heavy,a,c,test"  # file line 16, data row 15
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"t\.csv, data row 15, column 'x': 'heavy' is not a"):
        build(tmp_path / "t.csv", columns={"x": "numeric"})
    lines[15] = "4,b"  # a row that leaves cells out, after the blank lines
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"data row 15 has 2 cells, the header 4"):
        build(tmp_path / "t.csv")
    records = [f'{{"x": {i}, "label": "{"cd"[i % 2]}", "split": "train"}}' for i in range(6)]
    records[2:2] = ["", '{"x": "?", "label": "c", "split": "val"}']  # a blank line 3, then 4
    records += ['{"x": 1, "label": "c", "split": "test"}']
    (tmp_path / "t.jsonl").write_text("\n".join(records) + "\n")
    with pytest.raises(ValueError, match=r"t\.jsonl, data row 4, column 'x': '\?' is not a"):
        build(tmp_path / "t.jsonl", columns={"x": "numeric"})


def test_a_column_empty_in_every_train_row_is_refused_and_can_be_dropped(manifest, frame):
    frame.loc[frame["split"] == "train", "clip"] = None
    frame.to_csv(manifest, index=False)
    with pytest.raises(ValueError) as err:
        build(manifest)
    assert str(err.value) == (
        f"manifest {manifest}: column 'clip' is empty in every one of the 5 train rows (it has "
        "values in 2 val, 2 test rows); it is modality 'clip' (audio), so its encoder cannot be "
        "trained and the fused model would ignore it. Fill it in train rows, or drop it with "
        "data.columns={clip: ignore}"
    )
    assert "clip" not in build(manifest, columns={"clip": "ignore"}).modalities
    frame = pd.DataFrame(ROWS, columns=COLUMNS)
    frame.loc[frame["split"] == "train", "weight_kg"] = None  # filled in val and test only
    frame.to_csv(manifest, index=False)
    with pytest.raises(
        ValueError,
        match=r"column 'weight_kg' is empty in every one of the 5 train rows \(it has values in "
        r"2 val, 2 test rows\); it is a numeric column of modality 'tabular', so the tabular "
        r"encoder cannot learn what it says and the fused model would ignore it\. .*"
        r"data\.columns=\{weight_kg: ignore\}",
    ):
        build(manifest, "test")
    assert build(manifest, columns={"weight_kg": "ignore"}).modalities["tabular"].info[
        "columns"
    ] == ["city"]


def test_a_constant_numeric_column_is_said(manifest, frame, caplog):
    frame["weight_kg"] = 5.0
    frame.to_csv(manifest, index=False)
    with caplog.at_level(logging.WARNING, logger="fusion"):
        build(manifest)
    assert (
        "column 'weight_kg': every one of its 5 train values is 5 (std 0), so it carries no "
        "information (every row reads as 0); if it is a constant, set "
        "data.columns={weight_kg: ignore}" in caplog.text
    )
    frame["weight_kg"] = [4.0, 5.0] * 5 + [6.0]
    frame.to_csv(manifest, index=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusion"):
        build(manifest)
    assert "std 0" not in caplog.text


def test_a_clip_far_shorter_than_the_median_is_said(manifest, folder, frame, caplog):
    soundfile.write(folder / "snd" / "tiny.wav", sine(0.00125, 8000), 8000)  # 10 samples
    frame.loc[3, "clip"] = "snd/tiny.wav"  # data row 4, train
    frame.to_csv(manifest, index=False)
    with caplog.at_level(logging.WARNING, logger="fusion"):
        build(manifest)
    assert (
        "column 'clip': the clip of data row 4 (snd/tiny.wav) lasts 1.25 ms, 1/320 of the "
        "median train clip (0.40 s); it is zero-padded, so the encoder hears mostly silence: "
        "check that file (1 train clips are under 1/4 of the median)" in caplog.text
    )
    caplog.clear()
    frame.loc[3, "clip"] = "snd/a8k.wav"
    frame.to_csv(manifest, index=False)
    with caplog.at_level(logging.WARNING, logger="fusion"):
        build(manifest, audio_seconds=1.0)
    assert "zero-padded" not in caplog.text


@pytest.mark.parametrize(
    "targets", [["[1, 2]", "[3]"], ["['cat', 'dog']", "['dog']"], ["[]", "[1]"]]
)
def test_targets_written_as_lists_are_refused(manifest, frame, targets):
    frame["label"] = [targets[i % 2] for i in range(len(frame))]
    frame.loc[9, "label"] = None
    frame.to_csv(manifest, index=False)
    with pytest.raises(ValueError) as err:
        build(manifest)
    assert str(err.value) == (
        f"target 'label' in {manifest}: 10 of its 10 values are lists (data row 1: "
        f"{targets[0]!r}); each distinct list would be a class of its own: for several labels "
        "per row, set data.target_kind=multilabel; else give one class name or code per row"
    )
    if targets[0] != "[]":  # ["[]", "[1]"] names one label only
        labels = build(manifest, target_kind="multilabel").tasks["label"]
        named = {str(n) for t in targets for n in ast.literal_eval(t)}
        assert labels.kind == "multilabel" and set(labels.classes) == named


def test_numbers_and_label_sets_as_targets(manifest, frame):
    frame["label"] = [f"{0.5 * i - 3:.2f}" for i in range(len(frame))]
    frame.to_csv(manifest, index=False)
    train = build(manifest, target_kind="regression")
    assert train.tasks["label"].kind == "regression"
    assert [train[i]["label"] for i in range(len(train))] == [
        float(v) for v in frame["label"][train.indices].tolist()
    ]
    frame["label"] = ["cat|dog", "dog", "[]", "bird | cat"] * (len(frame) // 4) + ["cat"] * (
        len(frame) % 4
    )
    frame.to_csv(manifest, index=False)
    labels = build(manifest, target_kind="multilabel")
    assert labels.tasks["label"].classes == ("bird", "cat", "dog")
    first = frame["label"][labels.indices[0]]
    expected = {"cat|dog": [0, 1, 1], "dog": [0, 0, 1], "[]": [0, 0, 0], "bird | cat": [1, 1, 0],
                "cat": [0, 1, 0]}[first]  # fmt: skip
    assert labels[0]["label"] == expected


@pytest.mark.parametrize(
    ("values", "settings", "message"),
    [
        (["1.5", "two"], {"target_kind": "regression"}, "data row 2: target_kind=regression takes one finite number per row, found 'two'"),
        (["1.5", "inf"], {"target_kind": "regression"}, "found 'inf'"),
        (["cat", "cat|cat"], {"target_kind": "multilabel"}, "names the labels ['cat']: a multilabel target needs at least two (separated by '|', or listed)"),
        (["cat", "dog", "bird"], {"target_kind": "binary"}, "target_kind=binary needs two classes, found 3: ['bird', 'cat', 'dog']"),
        (["cat", "dog"], {"target_kind": "ordinal"}, "target_kind: expected one of ['auto', 'multiclass', 'binary', 'multilabel', 'regression'], found 'ordinal'"),
        (["cat", "dog"], {"target_kind": "multilabel", "label_separator": " "}, "label_separator: expected a non-empty string such as '|' or ';', found ' '"),
    ],
)  # fmt: skip
def test_targets_that_do_not_fit_their_kind_are_named(manifest, frame, values, settings, message):
    frame["label"] = [values[i % len(values)] for i in range(len(frame))]
    frame.to_csv(manifest, index=False)
    with pytest.raises(ValueError) as err:
        build(manifest, **settings)
    assert message in str(err.value)


def test_a_bracketed_class_name_among_plain_ones_is_a_class(manifest, frame):
    frame.loc[0, "label"] = "[unsure]"  # one odd value, not a list of labels
    frame.to_csv(manifest, index=False)
    assert "[unsure]" in build(manifest).tasks["label"].classes


def test_split_fingerprints_and_row_records_name_the_changed_file(manifest, folder):
    before = {s: build(manifest, s) for s in SPLITS}
    keys = {s: d.fingerprint() for s, d in before.items()}
    records = {s: d.row_record() for s, d in before.items()}
    assert records["test"]["columns"] == ["label", "photo", "clip", "caption", "weight_kg", "city"]
    assert records["test"]["rows"].tolist() == [8, 11]
    assert records["test"]["digests"].shape == (2, 6)
    assert records["test"]["digests"].dtype == torch.int32
    image = folder / "img" / "d.png"
    write_file(str(image), encode_png(torch.zeros(3, 10, 12, dtype=torch.uint8)))
    frame = pd.DataFrame(ROWS, columns=COLUMNS)
    frame.loc[10, "photo"] = "img/d.png"  # data row 11, test
    frame.to_csv(manifest, index=False)
    after = {s: build(manifest, s) for s in SPLITS}
    assert {s: after[s].fingerprint() == keys[s] for s in SPLITS} == {
        "train": True,
        "val": True,
        "test": False,
    }
    record = after["test"].row_record()
    write_file(str(image), encode_png(torch.ones(3, 10, 12, dtype=torch.uint8)))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    changed = build(manifest, "test")
    assert changed.row_changes(record) == ("data row 11, column 'photo': img/d.png has other bytes")
    assert after["val"].row_changes(records["val"]) == (
        "its rows hold the same cells (the settings or train statistics differ)"
    )
    frame.loc[7, "caption"] = "a cat"
    frame.loc[7, "city"] = "lyon"
    frame.to_csv(manifest, index=False)
    assert build(manifest, "test").row_changes(records["test"]) == (
        "data row 8, column 'caption': holds another text ('a cat'); column 'city': holds "
        "another value (and 1 more samples)"
    )


def test_an_animated_image_is_said_to_use_its_first_frame(manifest, folder, frame, caplog):
    frames = [Image.new("RGB", (12, 10), (40 * i, 0, 0)) for i in range(3)]
    frames[0].save(folder / "img" / "anim.gif", save_all=True, append_images=frames[1:])
    frame.loc[10, "photo"] = "img/anim.gif"  # data row 11, test
    frame.to_csv(manifest, index=False)
    with caplog.at_level(logging.WARNING, logger="fusion"):
        test = build(manifest, "test")
    assert (
        "column 'photo': 1 test images are animated (data row 11: img/anim.gif has 3 frames); "
        "only the first frame of each is used" in caplog.text
    )
    assert test[1]["photo"].shape == (3, 10, 12)


def test_a_split_whose_categories_train_never_shows_is_said(manifest, frame, caplog):
    frame.loc[[7, 10], "city"] = ["rome", "oslo"]  # both test rows
    frame.to_csv(manifest, index=False)
    with caplog.at_level(logging.WARNING, logger="fusion"):
        build(manifest)
    assert (
        "column 'city': 2 of the 2 test rows hold values the train split never shows ('oslo', "
        "'rome'; data row 8), so they are coded 0, as an empty cell: do train and test draw "
        "from the same values?" in caplog.text
    )
    assert "of the 2 val rows" not in caplog.text  # berlin is one of two val rows: not most


def test_a_resume_check_names_only_the_changed_split_and_its_file(manifest, folder, tmp_path):
    datasets = {s: build(manifest, s) for s in SPLITS}
    path = save_checkpoint(tmp_path / "state.pt", {"model": {}, **data_record(datasets)})
    state = load_checkpoint(path, required=("data_keys", "data_rows"))  # weights only
    assert data_changes(state, datasets) is None
    sound = folder / "snd" / "b16k.wav"  # data rows 2 (train), 6 (val) and 11 (test)
    stat = sound.stat()
    soundfile.write(sound, sine(0.3, 16000, freq=300.0), 16000)
    os.utime(sound, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert data_changes(state, {"val": datasets["val"], "test": datasets["test"]}) == (
        "split 'val' changed: data row 6, column 'clip': snd/b16k.wav has other bytes; "
        "split 'test' changed: data row 11, column 'clip': snd/b16k.wav has other bytes"
    )
    stat = sound.stat()
    soundfile.write(sound, sine(0.3, 16000), 16000)  # back as it was
    os.utime(sound, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    image = folder / "img" / "d.png"
    write_file(str(image), encode_png(torch.zeros(3, 10, 12, dtype=torch.uint8)))
    frame = pd.DataFrame(ROWS, columns=COLUMNS)
    frame.loc[7, "photo"] = "img/d.png"  # data row 8, test
    frame.to_csv(manifest, index=False)
    now = {s: build(manifest, s) for s in SPLITS}
    assert data_changes(state, now) == (
        "split 'test' changed: data row 8, column 'photo': img/d.png has other bytes; the "
        "train and val splits are unchanged"
    )
    del state["data_rows"]  # a state written without row records still names the split
    assert data_changes(state, now) == (
        "split 'test' changed; the train and val splits are unchanged"
    )


def test_a_path_with_a_control_character_is_refused_shown_escaped(manifest, frame):
    frame.loc[2, "photo"] = "img/a.png\x00.jpg"
    frame.to_csv(manifest, index=False)
    with pytest.raises(ValueError) as err:
        build(manifest)
    assert str(err.value) == (
        f"manifest {manifest}, data row 3, column 'photo': the path 'img/a.png\\x00.jpg' holds "
        "a control character; expected a file path"
    )


def test_label_sets_under_auto_are_refused_and_a_separator_they_do_not_use_is_said(
    manifest, frame, caplog
):
    frame["label"] = ["cat|dog", "[]", "dog", "cat|bird"] * (len(frame) // 4) + ["cat"] * (
        len(frame) % 4
    )
    frame.to_csv(manifest, index=False)
    with pytest.raises(ValueError) as err:
        build(manifest)
    assert "values are lists or label sets joined by '|' (data row 1: 'cat|dog')" in str(err.value)
    assert "set data.target_kind=multilabel" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="fusion"):
        build(manifest, target_kind="multilabel", label_separator=";")
    assert (
        "label_separator is ';', which no cell holds, but 4 cells hold '|' ('cat|dog'), so each "
        "reads as one label; is the separator '|'?" in caplog.text
    )


def test_a_minority_of_label_sets_among_single_labels_is_refused(manifest, frame):
    """A few rows with several labels, the rest with one: the joined names are each a
    whole label elsewhere, so these are label sets, not class names."""
    frame["label"] = ["red", "blue", "green", "red|blue"] * (len(frame) // 4) + ["red"] * (
        len(frame) % 4
    )
    frame.to_csv(manifest, index=False)
    with pytest.raises(ValueError, match=r"2 of its 11 values are lists or label sets joined "
                       r"by '\|' \(data row 4: 'red\|blue'\).*set data.target_kind=multilabel"):  # fmt: skip
        build(manifest)
    frame["label"] = ["A|B", "C", "D", "C"] * (len(frame) // 4) + ["C"] * (len(frame) % 4)
    frame.to_csv(manifest, index=False)  # 'A|B' names no other row's label: a class name
    assert "A|B" in build(manifest).tasks["label"].classes


def test_many_whole_numbers_as_classes_suggest_a_regression(tmp_path, caplog):
    rows = [{"x": i % 7, "y": 100 + (i % 25)} for i in range(75)]
    path = tmp_path / "ages.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with caplog.at_level("WARNING", logger="fusion"):
        ManifestDataset("train", path=path, target="y")
    assert "target 'y' in ages.csv holds 25 distinct whole numbers (100 to 124), each a class " \
        "of its own with about 3.0 rows; to predict the number, set data.target_kind=regression" \
        in caplog.text  # fmt: skip


def test_a_regression_target_is_standardized_with_the_train_split(tmp_path, caplog):
    g = np.random.default_rng(0)
    x = g.normal(size=60)
    rows = {"x": x, "copy": 3 * (1000 + 400 * x) - 5, "y": 1000 + 400 * x}
    path = tmp_path / "big.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with caplog.at_level("WARNING", logger="fusion"):
        train = ManifestDataset("train", path=path, target="y", target_kind="regression")
    task = train.tasks["y"]
    values = np.array([train[i]["label"] for i in range(len(train))])
    assert task.target_center == pytest.approx((values.mean(),))
    assert task.target_scale == pytest.approx((values.std(),))
    assert (
        "column 'copy' is a linear function of the target 'y' (correlation 1.0000)" in caplog.text
    )
    assert "column 'x'" in caplog.text  # y is a linear function of x, too
    plain = ManifestDataset(
        "train", path=path, target="y", target_kind="regression", standardize_target=False
    )
    assert plain.tasks["y"].target_scale == ()
