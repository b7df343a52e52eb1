"""Per-kind perturbations against hand-computed cases, the robustness summaries against
hand-computed curves, and `robustness()` running every perturbation of each kind.

A seeded generator's first numbers are pinned where a case depends on them:
`torch.Generator().manual_seed(0)` draws 0.4963, 0.7682, 0.0885, 0.1320, 0.3074, ..."""

import math

import pytest
import torch
from torch import nn
from torchvision.transforms.v2 import functional as tvf

from fusion.analysis.perturbations import (
    NAMES,
    NEIGHBOURS,
    NOISE,
    PERTURBATIONS,
    blur,
    clipping,
    column_dropout,
    contrast,
    for_kind,
    noise_snr,
    occlusion,
    salt_and_pepper,
    snr_db,
    time_shift,
    typos,
    word_dropout,
)
from fusion.analysis.robustness import (
    compare_robustness,
    perturb,
    plot_robustness,
    relative_robustness,
    robustness,
    robustness_table,
)
from fusion.batch import Batch
from fusion.data import Modality
from fusion.encoders.base import Encoder
from fusion.fusers import ConcatFuser
from fusion.heads import ClassificationHead
from fusion.model import MultimodalModel
from tests.fusion.test_interaction import evaluator_on

SEED_0 = (0.4963, 0.7682, 0.0885, 0.1320, 0.3074)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def example(kind: str):
    """A batch's inputs of `kind`."""
    if kind == "image":
        return torch.rand(3, 3, 8, 8, generator=seeded(1))
    if kind == "audio":
        return torch.randn(3, 50, generator=seeded(1))
    if kind == "text":
        return ["The quick brown fox", "", "jumps over 2 lazy dogs!"]
    return torch.randn(3, 5, generator=seeded(1))


def test_the_seeded_draws_pinned_here_are_torchs():
    assert torch.rand(5, generator=seeded()).tolist() == pytest.approx(SEED_0, abs=1e-4)


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_level_zero_is_the_identity_and_levels_outside_0_1_are_refused(name):
    p = PERTURBATIONS[name]
    x = example(p.kind)
    out = p.apply(x, 0.0, seeded())
    if p.kind == "text":
        assert out == x and out is not x
    else:
        assert torch.equal(out, x) and out is not x
    for level in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"level must be a number in \[0, 1\]"):
            p.apply(x, level, seeded())


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_the_input_is_left_alone_and_every_level_draws_alike(name):
    """A pure function: the batch is not modified, and the generator is left in the same
    state whatever the level (so the next batch gets the same numbers at every level)."""
    p = PERTURBATIONS[name]
    x = example(p.kind)
    kept = list(x) if p.kind == "text" else x.clone()
    states = []
    for level in (0.0, 0.3, 1.0):
        generator = seeded()
        p.apply(x, level, generator)
        states.append(torch.rand(1, generator=generator).item())
    assert len(set(states)) == 1
    assert (x == kept) if p.kind == "text" else torch.equal(x, kept)


def test_the_registry_by_kind():
    assert NAMES[0] == NOISE and set(NAMES[1:]) == set(PERTURBATIONS)
    assert [p.name for p in for_kind("image")] == ["occlusion", "blur", "contrast", "salt_pepper"]
    assert [p.name for p in for_kind("audio")] == ["noise_snr", "time_shift", "clipping"]
    assert [p.name for p in for_kind("text")] == ["typos", "word_dropout"]
    assert [p.name for p in for_kind("tabular")] == ["column_dropout"]
    assert for_kind("features") == [] and for_kind(None) == []


# ----------------------------------------------------------------------------- image


def test_occlusion_blanks_the_expected_rectangle():
    """Level 0.25 of a 4 x 4 image: a 2 x 2 square, starting at row floor(0.4963 x 3) = 1
    and column floor(0.7682 x 3) = 2 (3 places it can start at each way)."""
    x = torch.ones(1, 2, 4, 4)
    out = occlusion(x, 0.25, seeded())
    expected = torch.ones(1, 2, 4, 4)
    expected[..., 1:3, 2:4] = 0
    assert torch.equal(out, expected)
    assert torch.equal(occlusion(x[:, 0], 0.25, seeded()), expected[:, 0])  # [B, H, W]
    assert not occlusion(x, 1.0, seeded()).any()
    wide = occlusion(torch.ones(1, 1, 4, 16), 0.25, seeded())  # 2 x 8 of 4 x 16
    assert int((wide == 0).sum()) == 16


def test_blur_is_a_gaussian_of_the_documented_sigma():
    """An impulse in a 21 x 21 image at level 0.5: sigma 0.5 x 21 / 10 = 1.05 pixels,
    kernel 2 ceil(3.15) + 1 = 9; the blurred impulse is the normalized 2-D Gaussian."""
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 10] = 1.0
    out = blur(x, 0.5)
    taps = torch.tensor([math.exp(-(i**2) / (2 * 1.05**2)) for i in range(-4, 5)])
    taps /= taps.sum()
    expected = torch.zeros(21, 21)
    expected[6:15, 6:15] = taps[:, None] * taps[None, :]
    assert torch.allclose(out[0, 0], expected, atol=1e-6)
    assert torch.allclose(blur(torch.full((2, 3, 8, 8), 0.3), 1.0), torch.full((2, 3, 8, 8), 0.3))
    photo = torch.rand(2, 3, 8, 8, generator=seeded())
    expected = tvf.gaussian_blur(photo, [7, 7], [0.8, 0.8])  # 2 ceil(2.4) + 1 = 7
    assert torch.allclose(blur(photo, 1.0), expected, atol=1e-6)


def test_contrast_moves_each_image_towards_its_mean_grey():
    x = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]], [[[0.2, 0.2], [0.2, 0.6]]]])  # [2, 1, 2, 2]
    half = contrast(x, 0.5)
    assert torch.allclose(half[0, 0], torch.tensor([[0.25, 0.75], [0.25, 0.75]]))
    assert torch.allclose(half[1, 0], torch.tensor([[0.25, 0.25], [0.25, 0.45]]))  # mean 0.3
    assert torch.allclose(
        contrast(x, 1.0), torch.tensor([0.5, 0.3])[:, None, None, None].expand(2, 1, 2, 2)
    )
    rgb = torch.zeros(1, 3, 2, 2)
    rgb[0, 0] = 1.0  # red: grey 0.299 (torchvision's weights)
    assert torch.allclose(contrast(rgb, 1.0), torch.full((1, 3, 2, 2), 0.2989), atol=1e-4)
    two = torch.stack([x[0, 0], x[1, 0]])[None]  # 2 channels: each its own grey
    assert torch.allclose(contrast(two, 1.0)[0, :, 0, 0], torch.tensor([0.5, 0.3]))


def test_salt_and_pepper_hits_the_share_of_pixels_asked():
    x = torch.full((1, 3, 200, 200), 0.5)
    out = salt_and_pepper(x, 0.3, seeded())
    hit = out[:, 0] != 0.5
    assert hit.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])  # per pixel
    assert set(out[:, 0][hit].unique().tolist()) == {0.0, 1.0}
    assert (out[:, 0][hit] == 1.0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    more = salt_and_pepper(x, 0.6, seeded())
    assert torch.equal(more[:, 0][hit], out[:, 0][hit])  # nested, with the same values
    assert set(salt_and_pepper(x, 1.0, seeded()).unique().tolist()) == {0.0, 1.0}


# ----------------------------------------------------------------------------- audio


def test_noise_has_the_requested_snr():
    assert (snr_db(0.2), snr_db(0.5), snr_db(0.8), snr_db(1.0)) == pytest.approx((30, 15, 0, -10))
    t = torch.arange(100_000, dtype=torch.float32)
    x = torch.stack([torch.sin(t / 7), 0.01 * torch.sin(t / 3)])
    for level in (0.2, 0.5, 0.8, 1.0):
        noise = noise_snr(x, level, seeded()) - x
        snr = 10 * torch.log10(x.pow(2).sum(1) / noise.pow(2).sum(1))
        assert snr.tolist() == pytest.approx([snr_db(level)] * 2, abs=1e-3), level
    padded = torch.cat([x[:, :60_000], torch.zeros(2, 40_000)], dim=1)
    out = noise_snr(padded, 0.5, seeded(), lengths=torch.tensor([60_000, 0]))
    assert not out[0, 60_000:].any()  # padding is left alone
    assert torch.equal(out[1], padded[1])  # a clip without real samples: all padding
    noise = out[0, :60_000] - padded[0, :60_000]
    snr = 10 * torch.log10(padded[0].pow(2).sum() / noise.pow(2).sum())
    assert snr.item() == pytest.approx(15.0, abs=1e-3)
    assert not noise_snr(torch.zeros(1, 10), 1.0, seeded()).any()  # silence stays silent


def test_time_shift_rotates_each_clip_by_the_expected_samples():
    """Level 0.4 of 10 samples: round(0.4 x 10 / 2) = 2; the coins 0.4963 (< 1/2: later)
    and 0.7682 (earlier). A clip of 6 real samples rotates by round(1.2) = 1 within them."""
    x = torch.arange(1.0, 11.0).repeat(2, 1)
    out = time_shift(x, 0.4, seeded())
    assert out[0].tolist() == [9, 10, 1, 2, 3, 4, 5, 6, 7, 8]
    assert out[1].tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 1, 2]
    padded = torch.tensor([[1.0, 2, 3, 4, 5, 6, 0, 0, 0, 0], [1.0, 2, 3, 4, 5, 6, 0, 0, 0, 0]])
    out = time_shift(padded, 0.4, seeded(), lengths=torch.tensor([6, 6]))
    assert out[0].tolist() == [6, 1, 2, 3, 4, 5, 0, 0, 0, 0]
    assert out[1].tolist() == [2, 3, 4, 5, 6, 1, 0, 0, 0, 0]
    assert time_shift(x, 1.0, seeded())[0].tolist() == [6, 7, 8, 9, 10, 1, 2, 3, 4, 5]
    assert torch.equal(time_shift(x, 0.4, seeded(), lengths=torch.tensor([0, 10]))[0], x[0])


def test_clipping_caps_at_the_expected_amplitude():
    x = torch.tensor([[-2.0, -1.0, 0.0, 0.5, 4.0], [1.0, -3.0, 0.0, 0.0, 0.0]])
    assert clipping(x, 0.25).tolist() == [[-2, -1, 0, 0.5, 3], [1, -2.25, 0, 0, 0]]
    assert clipping(x, 0.75).tolist() == [[-1, -1, 0, 0.5, 1], [0.75, -0.75, 0, 0, 0]]
    assert not clipping(x, 1.0).any()
    padded = clipping(x, 0.75, lengths=torch.tensor([2, 5]))  # peaks 2 and 3 on real samples
    assert padded[0].tolist() == [-0.5, -0.5, 0.0, 0.5, 4.0]


# ----------------------------------------------------------------------------- text


def test_keyboard_neighbours():
    assert NEIGHBOURS["q"] == "wa" and NEIGHBOURS["g"] == "fhtyvb" and NEIGHBOURS["m"] == "njk"
    assert all(key not in near and near for key, near in NEIGHBOURS.items())
    assert all(key in NEIGHBOURS[n] for key, near in NEIGHBOURS.items() for n in near)  # mutual


def test_typos_change_the_expected_characters():
    text = "Hello, World 42!"
    out = typos([text, ""], 1.0, seeded())
    assert out[1] == "" and len(out[0]) == len(text)
    for before, after in zip(text, out[0], strict=True):
        if before.lower() in NEIGHBOURS:  # every letter, to a neighbour, its case kept
            assert after.lower() in NEIGHBOURS[before.lower()]
            assert after.isupper() == before.isupper()
        else:
            assert after == before
    # level 0.4: exactly the letters whose first draw is below 0.4
    hit, _ = torch.rand(2, len(text), generator=seeded()).tolist()
    expected = [i for i, c in enumerate(text) if c.isalpha() and hit[i] < 0.4]
    some = typos([text], 0.4, seeded())[0]
    assert [i for i, (a, b) in enumerate(zip(text, some, strict=True)) if a != b] == expected
    assert 0 < len(expected) < 10
    fewer = typos([text], 0.2, seeded())[0]
    assert all(fewer[i] == some[i] for i, c in enumerate(text) if fewer[i] != c)  # nested
    long = "abcdefghij" * 1000
    changed = sum(a != b for a, b in zip(long, typos([long], 0.3, seeded())[0], strict=True))
    assert changed / len(long) == pytest.approx(0.3, abs=0.02)


def test_word_dropout_drops_the_expected_words():
    """Level 0.3 and the draws 0.4963, 0.7682, 0.0885, 0.1320, 0.3074: 'brown' and 'fox'
    go; the next text draws the following numbers."""
    texts = ["the quick  brown fox jumps", "over the"]
    out = word_dropout(texts, 0.3, seeded())
    assert out[0] == "the quick jumps"
    after = torch.rand(7, generator=seeded()).tolist()[5:]
    assert out[1] == " ".join(w for w, u in zip(["over", "the"], after, strict=True) if u >= 0.3)
    assert word_dropout(texts, 1.0, seeded()) == ["", ""]
    assert word_dropout(texts, 0.0, seeded()) == texts  # spacing kept


# ----------------------------------------------------------------------------- tabular


def test_column_dropout_zeroes_each_rows_own_cells():
    """rand(2, 5) draws [[0.4963, 0.7682, 0.0885, 0.1320, 0.3074], [0.6341, 0.4901, 0.8964,
    0.4556, 0.6323]]: level 0.3 drops row 0's columns 2 and 3 and nothing of row 1; level 0.5
    adds row 0's columns 0 and 4 and row 1's columns 1 and 3."""
    x = torch.arange(1.0, 11.0).reshape(2, 5)
    assert column_dropout(x, 0.3, seeded()).tolist() == [[1, 2, 0, 0, 5], [6, 7, 8, 9, 10]]
    assert column_dropout(x, 0.5, seeded()).tolist() == [[0, 2, 0, 0, 0], [6, 0, 8, 0, 10]]
    assert torch.equal(column_dropout(x, 0.0, seeded()), x)
    assert not column_dropout(x, 1.0, seeded()).any()


# ----------------------------------------------------------------------------- summaries


def test_relative_robustness_is_the_trapezoid_mean_over_the_levels_in_0_1():
    """0.25 (0.9 + 0.8) / 2 + 0.25 (0.8 + 0.6) / 2 + 0.5 (0.6 + 0.2) / 2 = 0.5875 over a
    width of 1; the level 2 is outside [0, 1]."""
    levels, scores = [0.0, 0.25, 0.5, 1.0, 2.0], [0.9, 0.8, 0.6, 0.2, 0.1]
    assert relative_robustness(levels, scores) == pytest.approx(0.5875)
    assert relative_robustness([0.5, 1.0], [0.6, 0.2]) == pytest.approx(0.4)  # width 0.5
    assert relative_robustness([0.0, 2.0], [0.9, 0.1]) is None  # one level in [0, 1]
    assert relative_robustness([0.0, 1.0, 0.5], [1.0, 0.0, 1.0]) == pytest.approx(0.75)


def report(clean: float, levels: list, scores: list, metric: str = "accuracy") -> dict:
    """A robustness report of one modality 'image' with one curve 'blur'."""
    return {
        "split": "test", "seed": 0, "levels": levels, "metric": metric,
        "lower_is_better": metric == "mae", "clean": clean,
        "modalities": {"image": {"kind": "image", "input_std": None, "dropped": 0.1,
                                 "noise": None, "perturbations": {"blur": {
                                     "levels": levels, "scores": scores,
                                     "relative_robustness": relative_robustness(levels, scores),
                                     "level": "sigma"}}}},
    }  # fmt: skip


def test_effective_robustness_against_a_reference_run_is_multibenchs():
    """MultiBench: the reference's curve shifted to the model's clean score, the model's
    curve minus it: [0.9, 0.7, 0.5] - ([0.8, 0.7, 0.6] + 0.1) = [0, -0.1, -0.2], mean over
    the levels (trapezoid) -0.1; equal to (RR - clean) - (RR_ref - clean_ref)."""
    levels = [0.0, 0.5, 1.0]
    reports = {
        "mine": report(0.9, levels, [0.9, 0.7, 0.5]),
        "late": report(0.8, levels, [0.8, 0.7, 0.6]),
    }
    result = compare_robustness(reports, reference="late")
    mine, late = (result["runs"][r]["image"]["blur"] for r in ("mine", "late"))
    assert mine["relative_robustness"] == pytest.approx(0.7) == late["relative_robustness"]
    assert mine["effective_robustness"] == pytest.approx(-0.1)
    assert late["effective_robustness"] == pytest.approx(0.0)
    assert mine["relative_robustness_normalized"] is None  # equal areas
    assert result["fits"] == {} and result["reference"] == "late"
    # an error: lower is better, so the sign turns; MAE rising less than the reference's
    reports = {"mine": report(0.5, levels, [0.5, 0.7, 0.9], "mae"),
               "late": report(0.6, levels, [0.6, 0.9, 1.2], "mae")}  # fmt: skip
    mine = compare_robustness(reports, reference="late")["runs"]["mine"]["image"]["blur"]
    assert mine["relative_robustness"] == pytest.approx(0.7)
    assert mine["effective_robustness"] == pytest.approx(0.1)  # -[(0.7 - 0.5) - (0.9 - 0.6)]
    assert mine["relative_robustness_normalized"] == 1.0  # the lower mean MAE


def test_effective_robustness_without_a_reference_is_against_the_least_squares_line():
    """Clean 0.6, 0.8, 1.0 and relative robustness 0.5, 0.5, 0.8: the line 0.75 x clean + 0
    expects 0.45, 0.6, 0.75, so effective robustness is 0.05, -0.1, 0.05."""
    reports = {
        name: report(clean, [0.0, 1.0], [clean, 2 * rr - clean])
        for name, clean, rr in (("a", 0.6, 0.5), ("b", 0.8, 0.5), ("c", 1.0, 0.8))
    }
    result = compare_robustness(reports)
    assert result["fits"]["image"]["blur"] == pytest.approx({"slope": 0.75, "intercept": 0.0})
    found = {r: result["runs"][r]["image"]["blur"] for r in "abc"}
    assert [found[r]["effective_robustness"] for r in "abc"] == pytest.approx([0.05, -0.1, 0.05])
    assert [found[r]["relative_robustness_normalized"] for r in "abc"] == pytest.approx([0, 0, 1])
    with pytest.raises(ValueError, match="needs 3 runs or more"):
        compare_robustness({r: reports[r] for r in "ab"})
    with pytest.raises(ValueError, match="reference 'x' is none of the runs"):
        compare_robustness(reports, reference="x")
    other = {**reports, "c": report(1.0, [0.0, 0.5], [1.0, 0.6])}
    with pytest.raises(ValueError, match=r"image/blur: run 'c' has the levels \[0.0, 0.5\]"):
        compare_robustness(other)
    mixed = {**reports, "c": report(1.0, [0.0, 1.0], [1.0, 0.6], "mae")}
    with pytest.raises(ValueError, match="the reports differ in their metric"):
        compare_robustness(mixed)


# ----------------------------------------------------------------------------- robustness()


def tiny_evaluator():
    """A model of an image [1, 4, 4] and a clip [16], on 10 samples in 2 batches."""
    torch.manual_seed(0)
    encoders = {
        "image": Encoder(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), input_shape=(1, 4, 4)),
        "audio": Encoder(nn.Linear(16, 3), input_shape=(16,)),
    }
    model = MultimodalModel.build(
        encoders, fuser=ConcatFuser, head=ClassificationHead, num_classes=2
    )
    batches = [
        Batch(
            inputs={"image": torch.rand(n, 1, 4, 4), "audio": torch.randn(n, 16)},
            present={m: torch.ones(n, dtype=torch.bool) for m in encoders},
            targets=torch.randint(0, 2, (n,)),
        )
        for n in (6, 4)
    ]
    return evaluator_on(model, batches, objectives=None)


KINDS = {"image": Modality("image"), "audio": Modality("audio")}


def test_robustness_runs_every_perturbation_of_each_kind_at_each_level(tmp_path):
    evaluator = tiny_evaluator()
    result = robustness(evaluator, [0.0, 0.5, 1.0, 2.0], KINDS)
    image, audio = result["modalities"]["image"], result["modalities"]["audio"]
    assert (image["kind"], audio["kind"]) == ("image", "audio")
    assert list(image["perturbations"]) == ["noise", "occlusion", "blur", "contrast", "salt_pepper"]
    assert list(audio["perturbations"]) == ["noise", "noise_snr", "time_shift", "clipping"]
    assert result["relative_robustness_span"] == [0.0, 1.0]
    for m, entry in result["modalities"].items():
        assert entry["noise"] == entry["perturbations"]["noise"]["scores"]
        assert entry["perturbations"]["noise"]["levels"] == [0.0, 0.5, 1.0, 2.0]
        for name, c in entry["perturbations"].items():
            if name != "noise":
                assert c["levels"] == [0.0, 0.5, 1.0], (m, name)
            assert c["scores"][0] == result["clean"], (m, name)  # level 0: the clean input
            assert c["relative_robustness"] == relative_robustness(c["levels"], c["scores"])
    assert robustness(evaluator, [0.0, 0.5, 1.0, 2.0], KINDS) == result  # seeded
    assert (
        audio["perturbations"]["clipping"]["scores"][-1]
        == evaluator(
            lambda b: Batch(
                {**b.inputs, "audio": torch.zeros_like(b.inputs["audio"])}, b.present, b.targets
            )
        ).score()
    )  # clipping at level 1 is silence
    table = robustness_table(result)
    assert table.count("| image |") == 1 and "| image/occlusion | " in table
    assert "| audio/clipping | " in table and "| - | " in table.split("| audio/clipping |")[1]
    assert "relative robustness: the mean accuracy over the levels in [0, 1]" in table
    assert "salt_pepper = share of pixels set to 0 or 1" in table
    plot_robustness(result, tmp_path / "robustness.png")
    assert (tmp_path / "robustness.png").read_bytes()[:4] == b"\x89PNG"


def test_perturbations_asked_by_name_and_the_kinds_they_fit():
    evaluator = tiny_evaluator()
    result = robustness(evaluator, [0.0, 1.0], KINDS, perturbations=["blur"])
    image, audio = result["modalities"]["image"], result["modalities"]["audio"]
    assert list(image["perturbations"]) == ["blur"] and audio["perturbations"] == {}
    assert image["noise"] is None and image["input_std"] is None
    unknown = robustness(evaluator, [0.0, 1.0], perturbations=["noise"])  # kinds unknown
    assert [list(e["perturbations"]) for e in unknown["modalities"].values()] == [["noise"]] * 2
    for asked, levels, message in [
        (["blurr"], [0.0], r"unknown perturbation\(s\) \['blurr'\]; expected some of \['noise'"),
        (["typos", "blur"], [0.0], r"typos \(text\) fit\(s\) none of the model's modalities: "
         r"image \(image\), audio \(audio\)"),
        (["blur"], [2.0], r"\['blur'\] take levels in \[0, 1\] and the levels \[2.0\] hold none"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            robustness(evaluator, levels, KINDS, perturbations=asked)


def test_perturb_edits_one_modality_and_gives_padded_audio_its_lengths():
    batch = Batch(
        inputs={
            "audio": torch.arange(1.0, 9.0).repeat(2, 1),
            "text": ["one two three", "four"],
            "image": torch.ones(2, 1, 2, 2),
        },
        present={
            "audio": torch.tensor([[True] * 8, [True] * 4 + [False] * 4]),
            "text": torch.ones(2, dtype=torch.bool),
            "image": torch.ones(2, dtype=torch.bool),
        },
        targets=torch.zeros(2, dtype=torch.long),
    )
    shifted = perturb("audio", PERTURBATIONS["time_shift"], 0.5, seed=0)(batch)
    assert shifted.inputs["audio"].tolist() == [
        [7, 8, 1, 2, 3, 4, 5, 6],  # 0.4963: later, by round(0.5 x 8 / 2) = 2
        [2, 3, 4, 1, 5, 6, 7, 8],  # 0.7682: earlier, by 1 within its 4 real samples
    ]
    assert shifted.inputs["image"] is batch.inputs["image"]
    dropped = perturb("text", PERTURBATIONS["word_dropout"], 1.0, seed=0)(batch)
    assert dropped.inputs["text"] == ["", ""] and batch.inputs["text"] == ["one two three", "four"]
