import pytest
import torch
import torch.nn.functional as F

from fusion.fusers.late import LateFusion

DIMS = {
    2: {"image": 6, "audio": 4},
    3: {"image": 6, "audio": 4, "text": 5},
}
COMBINES = ["logits", "probs", "learned"]


def features(dims, batch=5):
    return {m: torch.randn(batch, d, requires_grad=True) for m, d in dims.items()}


def audio_missing(dims, batch=5):
    present = {m: torch.ones(batch, dtype=torch.bool) for m in dims}
    present["audio"] = torch.tensor([True, False, True, False, True])[:batch]
    return present


@pytest.mark.parametrize("n_modalities", [2, 3])
@pytest.mark.parametrize("combine", COMBINES)
def test_output_shape(combine, n_modalities):
    fuser = LateFusion(DIMS[n_modalities], num_classes=7, combine=combine, hidden=(8,))
    assert fuser.out_dim == 7 and fuser.produces_logits
    assert fuser(features(DIMS[n_modalities])).shape == (5, 7)


@pytest.mark.parametrize("combine", COMBINES)
def test_token_inputs_are_averaged_over_real_tokens(combine):
    dims = DIMS[2]
    fuser = LateFusion(dims, num_classes=3, combine=combine)
    tokens = {m: torch.randn(2, 4, d) for m, d in dims.items()}
    present = {
        "image": torch.ones(2, 4, dtype=torch.bool),
        "audio": torch.tensor([[1, 1, 0, 0]] * 2).bool(),
    }
    means = {"image": tokens["image"].mean(1), "audio": tokens["audio"][:, :2].mean(1)}
    torch.testing.assert_close(fuser(tokens, present), fuser(means))


@pytest.mark.parametrize("n_modalities", [2, 3])
@pytest.mark.parametrize("combine", COMBINES)
def test_every_parameter_gets_a_gradient(combine, n_modalities):
    dims = DIMS[n_modalities]
    fuser = LateFusion(dims, num_classes=3, combine=combine, hidden=(8,))
    feats = features(dims)
    fuser(feats, audio_missing(dims)).pow(2).sum().backward()
    for name, param in fuser.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for modality, x in feats.items():
        assert x.grad.abs().sum() > 0, modality


@pytest.mark.parametrize("combine", COMBINES)
def test_absent_modality_has_no_influence(combine):
    dims = DIMS[3]
    fuser = LateFusion(dims, num_classes=3, combine=combine).eval()
    feats, present = features(dims), audio_missing(dims)
    altered = dict(feats, audio=feats["audio"] + 100 * torch.randn(5, dims["audio"]))
    out, out_altered = fuser(feats, present), fuser(altered, present)
    absent = ~present["audio"]
    assert torch.equal(out[absent], out_altered[absent])
    assert not torch.allclose(out[~absent], out_altered[~absent])


def test_combinations_over_the_present_modalities():
    dims = DIMS[2]
    feats = features(dims, batch=3)
    only_image = {
        "image": torch.ones(3, dtype=torch.bool),
        "audio": torch.zeros(3, dtype=torch.bool),
    }
    for combine in ("logits", "learned"):
        fuser = LateFusion(dims, num_classes=4, combine=combine)
        image_logits = fuser.classifiers["image"](feats["image"])
        torch.testing.assert_close(fuser(feats, only_image), image_logits)
    fuser = LateFusion(dims, num_classes=4, combine="probs")
    image_logits = fuser.classifiers["image"](feats["image"])
    torch.testing.assert_close(fuser(feats, only_image), image_logits.log_softmax(-1))


def test_logits_are_averaged():
    dims = DIMS[3]
    fuser = LateFusion(dims, num_classes=4)
    feats = features(dims)
    expected = torch.stack([fuser.classifiers[m](x) for m, x in feats.items()]).mean(0)
    torch.testing.assert_close(fuser(feats), expected)


def test_probs_give_the_nll_of_the_averaged_probabilities():
    dims = DIMS[2]
    fuser = LateFusion(dims, num_classes=4, combine="probs")
    feats, y = features(dims), torch.tensor([0, 1, 2, 3, 0])
    out = fuser(feats)
    probs = torch.stack([fuser.classifiers[m](x).softmax(-1) for m, x in feats.items()]).mean(0)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(5))
    torch.testing.assert_close(F.cross_entropy(out, y), F.nll_loss(probs.log(), y))


def test_learned_weights_renormalize_over_present_modalities():
    dims = DIMS[3]
    fuser = LateFusion(dims, num_classes=4, combine="learned")
    with torch.no_grad():
        fuser.modality_scores.copy_(torch.tensor([0.0, 5.0, 1.0]))
    feats, present = features(dims), audio_missing(dims)
    logits = {m: fuser.classifiers[m](x) for m, x in feats.items()}
    w = torch.tensor([1.0, torch.e]) / (1.0 + torch.e)  # image and text, audio dropped
    expected = w[0] * logits["image"] + w[1] * logits["text"]
    absent = ~present["audio"]
    torch.testing.assert_close(fuser(feats, present)[absent], expected[absent])


@pytest.mark.parametrize("combine", COMBINES)
def test_all_absent_gives_finite_zeros_and_gradients(combine):
    dims = DIMS[2]
    fuser = LateFusion(dims, num_classes=3, combine=combine)
    none = {m: torch.zeros(2, dtype=torch.bool) for m in dims}
    out = fuser(features(dims, batch=2), none)
    assert torch.equal(out, torch.zeros(2, 3))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fuser.parameters())


def test_errors():
    fuser = LateFusion(DIMS[2], num_classes=3)
    with pytest.raises(KeyError, match=r"present names modalities \['text'\]"):
        fuser(features(DIMS[2]), {"text": torch.ones(5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="combine must be one of"):
        LateFusion(DIMS[2], num_classes=3, combine="vote")
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        LateFusion(DIMS[2], num_classes=0)
