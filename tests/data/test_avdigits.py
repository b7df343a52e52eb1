import numpy as np
import pytest
import torch

from data.avdigits import SPEECH_ASSET, AVDigits, load_speech_clips, stratified_split


def test_items_are_dicts_of_modalities(avdigits_val):
    item = avdigits_val[0]
    assert set(item) == {"image", "audio", "label", "modality_targets"}
    assert item["modality_targets"] == {"image": item["label"], "audio": item["label"]}
    assert item["image"].shape == (1, 8, 8)
    assert item["audio"].shape == (avdigits_val.clip_samples,)
    assert 0 <= item["label"] <= 9


def test_speech_asset_is_complete():
    speech = load_speech_clips()
    assert speech.sample_rate == 8000
    per_speaker = {(s, d) for s, d in zip(speech.speakers, speech.digits, strict=True)}
    assert len(per_speaker) == len(speech.speaker_names) * 10


def test_splits_partition_images_and_speakers():
    splits = {s: AVDigits(s, augment=False) for s in ("train", "val", "test")}
    assert sum(len(d) for d in splits.values()) == 1797
    speakers = [set(d.speakers) for d in splits.values()]
    assert not (speakers[0] & speakers[1] or speakers[0] & speakers[2] or speakers[1] & speakers[2])
    # every digit is present in each split, in about the same proportion
    for d in splits.values():
        counts = torch.bincount(d.labels, minlength=10)
        assert counts.min() > 0.8 * counts.float().mean()


def test_clips_say_the_labelled_digit():
    speech = load_speech_clips()
    dataset = AVDigits("test", max_samples=50)
    for pool, digit in zip(dataset.clip_pool, range(10), strict=True):
        assert set(speech.digits[pool.numpy()]) == {digit}
        assert set(speech.speakers[pool.numpy()]) <= set(dataset.speakers)


def test_eval_splits_are_fixed_and_train_is_redrawn():
    a, b = AVDigits("val", max_samples=10), AVDigits("val", max_samples=10)
    assert torch.equal(a[3]["audio"], b[3]["audio"]) and torch.equal(a[3]["image"], b[3]["image"])
    train = AVDigits("train", max_samples=10)
    first, second = train[0], train[0]
    assert first["label"] == second["label"]
    assert not torch.equal(first["image"], second["image"])
    torch.manual_seed(5)
    x = train[1]["audio"]
    torch.manual_seed(5)
    assert torch.equal(x, train[1]["audio"])


def test_degradation_strength_follows_config():
    clean = AVDigits("val", max_samples=30, occlusion=(0.0, 0.0), image_noise_std=0.0)
    noisy = AVDigits("val", max_samples=30, image_noise_std=0.5)
    clean_images = torch.stack([item["image"] for item in clean])
    noisy_images = torch.stack([item["image"] for item in noisy])
    assert torch.allclose(clean_images, clean.clean_images)
    assert (noisy_images - noisy.clean_images).std() > 0.4


def test_stratified_split_is_a_partition():
    labels = np.repeat(np.arange(3), 10)
    parts = stratified_split(labels, (0.5, 0.3, 0.2), np.random.default_rng(0))
    joined = np.sort(np.concatenate(parts))
    assert np.array_equal(joined, np.arange(30))
    assert [len(p) for p in parts] == [15, 9, 6]


INF, NAN = float("inf"), float("nan")
BAD_ARGUMENTS = {
    "occlusion reversed": (
        {"occlusion": (0.8, 0.2)},
        "data.occlusion: expected [min, max] with 0 <= min <= max <= 1, found [0.8, 0.2]",
    ),
    "occlusion a number": (
        {"occlusion": 0.3},
        "data.occlusion: expected [min, max] with 0 <= min <= max <= 1, found 0.3",
    ),
    "snr one value": (
        {"audio_snr_db": (0.0,)},
        "data.audio_snr_db: expected [min, max] with -60 <= min <= max <= 60, found [0.0]",
    ),
    "snr nan": (
        {"audio_snr_db": (-10.0, NAN)},
        "data.audio_snr_db: expected [min, max] with -60 <= min <= max <= 60, found [-10.0, nan]",
    ),
    "fractions sum": (
        {"fractions": (0.5, 0.5, 0.5)},
        "data.fractions: expected 3 positive numbers (train, val, test) summing to 1, "
        "found [0.5, 0.5, 0.5]",
    ),
    "clip too short": (
        {"clip_seconds": 0.3},
        f"data.clip_seconds: expected at least the longest clip in {SPEECH_ASSET} (0.84 s), "
        "found 0.3",
    ),
    "clip inf": (
        {"clip_seconds": INF},
        "data.clip_seconds: expected a finite number > 0, found inf",
    ),
    "noise inf": (
        {"image_noise_std": INF},
        "data.image_noise_std: expected a finite number >= 0, found inf",
    ),
    "noise negative": (
        {"image_noise_std": -0.1},
        "data.image_noise_std: expected a finite number >= 0, found -0.1",
    ),
    "noise nan": (
        {"image_noise_std": NAN},
        "data.image_noise_std: expected a finite number >= 0, found nan",
    ),
    "same_prob above 1": (
        {"same_prob": 1.5},
        "data.same_prob: expected a finite number in [0, 1], found 1.5",
    ),
    "text_accuracy negative": (
        {"text_accuracy": -0.1},
        "data.text_accuracy: expected a finite number in [0, 1], found -0.1",
    ),
    "text_accuracy bool": (
        {"text_accuracy": True},
        "data.text_accuracy: expected a finite number in [0, 1], found True",
    ),
    "seed negative": ({"seed": -1}, "data.seed: expected an integer >= 0, found -1"),
    "seed fractional": ({"seed": 1.5}, "data.seed: expected an integer >= 0, found 1.5"),
    "max_samples zero": ({"max_samples": 0}, "data.max_samples: expected an integer >= 1, found 0"),
    "max_samples float": (
        {"max_samples": 2.5},
        "data.max_samples: expected an integer >= 1, found 2.5",
    ),
    "view negative": ({"view": -1}, "data.view: expected an integer >= 0, found -1"),
    "augment a string": (
        {"augment": "false"},
        "data.augment: expected true or false or null, found 'false'",
    ),
    "task unknown": (
        {"task": "parity"},
        "data.task: expected one of ['digit', 'same', 'which', 'multitask', 'sum', 'digits', 'mixed'], found 'parity'",
    ),
}


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS)
def test_bad_arguments_are_named_with_what_was_expected_and_found(kwargs, message):
    with pytest.raises(ValueError) as error:
        AVDigits("val", **kwargs)
    assert str(error.value) == message


def test_augment_redraws_the_train_split_only():
    for augment in (None, True):
        val = AVDigits("val", max_samples=4, augment=augment)
        assert val.deterministic and not val.augment
        first, again = val[2], val[2]
        assert torch.equal(first["image"], again["image"])
        assert torch.equal(first["audio"], again["audio"])
        train = AVDigits("train", max_samples=4, augment=augment)
        assert not train.deterministic
        assert not torch.equal(train[0]["image"], train[0]["image"])
    fixed = AVDigits("val", max_samples=4)
    assert torch.equal(AVDigits("val", max_samples=4, augment=True)[1]["image"], fixed[1]["image"])


def test_missing_asset_names_its_path_and_key(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        AVDigits("val", speech_path=tmp_path / "nope.npz")
    message = str(error.value)
    assert message.startswith(f"data.speech_path: AV-Digits speech asset not found at {tmp_path}")
    assert "make speech" in message


def speech_arrays() -> dict[str, np.ndarray]:
    with np.load(SPEECH_ASSET) as npz:
        return {k: npz[k] for k in npz.files}


def write_asset(path, arrays):
    np.savez(path, **arrays)
    return path


def test_float_waveforms_are_used_as_they_are(tmp_path):
    arrays = speech_arrays()
    arrays["waveforms"] = arrays["waveforms"].astype(np.float32) / 32768.0
    floats = load_speech_clips(write_asset(tmp_path / "float.npz", arrays))
    pcm = load_speech_clips()
    assert all(np.array_equal(a, b) for a, b in zip(floats.clips, pcm.clips, strict=True))
    assert 0.5 < max(float(np.abs(c).max()) for c in pcm.clips) <= 1.0  # int16 scaled once


def changed(**arrays):
    return lambda original: {**original, **{k: v(original) for k, v in arrays.items()}}


BAD_ASSETS = {
    "lacks offsets": (
        lambda a: {k: v for k, v in a.items() if k != "offsets"},
        "lacks arrays ['offsets']; it has ['digits', 'sample_rate', 'speaker_names', "
        "'speakers', 'waveforms']",
    ),
    "int32 waveforms": (
        changed(waveforms=lambda a: a["waveforms"].astype(np.int32)),
        "'waveforms' has dtype int32; expected int16 PCM (scaled by 1/32768) or float16/32/64 "
        "samples in [-1, 1] (used as they are)",
    ),
    "nan waveforms": (
        changed(waveforms=lambda a: np.full(len(a["waveforms"]), np.nan, np.float32)),
        "'waveforms' holds non-finite (NaN or infinite) samples",
    ),
    "2-d waveforms": (
        changed(waveforms=lambda a: a["waveforms"].reshape(2, -1)),
        "'waveforms' must be 1-D (all clips end to end), found shape [2, 835200]",
    ),
    "offsets short": (
        changed(offsets=lambda a: a["offsets"][:-1]),
        "'offsets' has 480 entries, expected 481 (one more than the number of clips)",
    ),
    "offsets past the end": (
        changed(offsets=lambda a: a["offsets"] * 2),
        "'offsets' must lie in [0, 1670401), found values from 0 to 3340800",
    ),
    "offsets not rising": (
        changed(offsets=lambda a: a["offsets"][[0, 2, 1, *range(3, 481)]]),
        "'offsets' must rise from 0 to len(waveforms)=1670400, one clip after another; "
        "found [0, 8680, 5000] ... [1666640, 1670400]",
    ),
    "digit 10": (
        changed(digits=lambda a: a["digits"] + 1),
        "'digits' must lie in [0, 10), found values from 1 to 10",
    ),
    "float speakers": (
        changed(speakers=lambda a: a["speakers"].astype(np.float64)),
        "'speakers' must be 1-D integers, found float64 of shape [480]",
    ),
    "sample rate 0": (
        changed(sample_rate=lambda a: np.array(0)),
        "'sample_rate' must be one positive integer (Hz), found array(0)",
    ),
}


@pytest.mark.parametrize(("change", "message"), BAD_ASSETS.values(), ids=BAD_ASSETS)
def test_a_bad_asset_is_named_with_what_was_expected_and_found(tmp_path, change, message):
    path = write_asset(tmp_path / "speech.npz", change(speech_arrays()))
    with pytest.raises(ValueError) as error:
        AVDigits("val", speech_path=path)
    assert str(error.value) == f"data.speech_path: {path}: {message}"


CORRUPT = {
    "not a zip": (lambda path: path.write_bytes(b"not numpy at all"), "corrupt file"),
    "truncated": (
        lambda path: path.write_bytes(SPEECH_ASSET.read_bytes()[:5000]),
        "corrupt file",
    ),
    "a single array": (lambda path: path.write_bytes(npy_bytes()), "a single int16 array"),
    "pickled objects": (
        lambda path: np.savez(path, **{**speech_arrays(), "digits": np.array([{}], object)}),
        "corrupt file (Object arrays cannot be loaded when allow_pickle=False)",
    ),
}


def npy_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.zeros(4, np.int16))
    return buffer.getvalue()


@pytest.mark.parametrize(("write", "found"), CORRUPT.values(), ids=CORRUPT)
def test_a_corrupt_asset_is_called_corrupt(tmp_path, write, found):
    path = tmp_path / "speech.npz"
    write(path)
    with pytest.raises(ValueError) as error:
        load_speech_clips(path)
    expected = (
        "expected an .npz archive of the arrays ['waveforms', 'offsets', 'digits', "
        "'speakers', 'speaker_names', 'sample_rate'], found "
    )
    assert str(error.value).startswith(f"data.speech_path: {path.resolve()}: {expected}")
    assert found in str(error.value)


def test_text_modality_guesses_the_digit_at_the_asked_rate():
    dataset = AVDigits("test", text_accuracy=0.6)
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    right = 0
    for item in dataset:
        named = [d for d in range(10) if words[d] in item["text"] or str(d) in item["text"]]
        assert len(named) == 1, item["text"]
        right += named[0] == item["label"]
    assert 0.5 < right / len(dataset) < 0.7
    assert "text" not in AVDigits("test", max_samples=2)[0]
    with pytest.raises(
        ValueError, match=r"data\.text_accuracy: expected a finite number in \[0, 1\], found 1\.5"
    ):
        AVDigits("test", text_accuracy=1.5)


def test_interaction_and_conditional_tasks():
    same = AVDigits("test", task="same")
    labels = [item["label"] for item in same]
    for item in same:
        targets = item["modality_targets"]
        assert item["label"] == int(targets["image"] == targets["audio"])
    assert 0.4 < sum(labels) / len(labels) < 0.6 and same.num_classes == 2

    which = AVDigits("test", task="which", max_samples=200)
    assert which.num_conditions == 2
    for item in which:
        asked = "audio" if item["condition"] else "image"
        assert item["label"] == item["modality_targets"][asked]

    multi = AVDigits("val", task="multitask", max_samples=5)
    assert set(multi[0]["label"]) == set(multi.num_classes) == {"written", "spoken", "same"}
    with pytest.raises(ValueError, match=r"data\.task: expected one of .*found .parity."):
        AVDigits("val", task="parity")


def test_collate_stacks_dict_labels_and_conditions():
    from fusion.batch import collate

    batch = collate([AVDigits("val", task="multitask", max_samples=4)[i] for i in range(4)])
    assert set(batch.targets) == {"written", "spoken", "same"}
    assert batch.modality_targets["audio"].shape == (4,)
    batch = collate([AVDigits("val", task="which", max_samples=4)[i] for i in range(4)])
    assert batch.condition.shape == (4,) and batch.targets.shape == (4,)


def test_fingerprint_follows_settings_and_determinism_follows_augmentation(avdigits_val):
    from fusion.training.feature_cache import data_key

    same = AVDigits("val", max_samples=40)
    assert avdigits_val.deterministic and not AVDigits("train", max_samples=8).deterministic
    assert AVDigits("train", max_samples=8, augment=False).deterministic
    assert data_key(same) == data_key(avdigits_val)
    assert data_key(AVDigits("val", max_samples=40, image_noise_std=0.2)) != data_key(same)
    assert data_key(AVDigits("val", max_samples=40, seed=1)) != data_key(same)
    assert data_key(AVDigits("test", max_samples=40)) != data_key(same)


def test_digit_scans_are_scikit_learns():
    from sklearn.datasets import load_digits

    from data.avdigits import digit_scans

    images, labels = digit_scans()
    reference = load_digits()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(labels, reference.target)
