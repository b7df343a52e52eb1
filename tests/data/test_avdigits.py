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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "dev"}, "split must be one of"),
        ({"occlusion": (0.8, 0.2)}, "occlusion must be"),
        ({"audio_snr_db": (0.0,)}, "audio_snr_db must be"),
        ({"fractions": (0.5, 0.5, 0.5)}, "fractions must be"),
        ({"clip_seconds": 0.3}, "clip_seconds=0.3 is shorter"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AVDigits(**kwargs)


def test_missing_asset_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make speech"):
        AVDigits("val", speech_path=tmp_path / "nope.npz")


def test_asset_with_missing_arrays_is_rejected(tmp_path):
    bad = tmp_path / "bad.npz"
    with np.load(SPEECH_ASSET) as npz:
        np.savez(bad, **{k: npz[k] for k in npz.files if k != "offsets"})
    with pytest.raises(ValueError, match=r"lacks arrays \['offsets'\]"):
        load_speech_clips(bad)


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
    with pytest.raises(ValueError, match="text_accuracy must be in"):
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
    with pytest.raises(ValueError, match="task must be one of"):
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
