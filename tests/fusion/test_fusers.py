import pytest
import torch

from fusion.fusers import ConcatFuser, GatedFuser

DIMS = {
    2: {"image": 6, "audio": 4},
    3: {"image": 6, "audio": 4, "text": 5},
}
FUSERS = [
    (ConcatFuser, {}),
    (ConcatFuser, {"proj_dim": 7}),
    (GatedFuser, {"dim": 8}),
]


def features(dims, batch=5):
    return {m: torch.randn(batch, d, requires_grad=True) for m, d in dims.items()}


@pytest.mark.parametrize("n_modalities", [2, 3])
@pytest.mark.parametrize(("cls", "kwargs"), FUSERS)
def test_output_shape(cls, kwargs, n_modalities):
    fuser = cls(DIMS[n_modalities], **kwargs)
    out = fuser(features(DIMS[n_modalities]))
    assert out.shape == (5, fuser.out_dim)


@pytest.mark.parametrize("n_modalities", [2, 3])
@pytest.mark.parametrize(("cls", "kwargs"), FUSERS)
def test_every_parameter_gets_a_gradient(cls, kwargs, n_modalities):
    fuser = cls(DIMS[n_modalities], **kwargs)
    feats = features(DIMS[n_modalities])
    fuser(feats).pow(2).sum().backward()
    for name, param in fuser.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for modality, x in feats.items():
        assert x.grad.abs().sum() > 0, modality


@pytest.mark.parametrize("n_modalities", [2, 3])
@pytest.mark.parametrize(("cls", "kwargs"), FUSERS)
def test_absent_modality_has_no_influence(cls, kwargs, n_modalities):
    dims = DIMS[n_modalities]
    fuser = cls(dims, **kwargs).eval()
    feats = features(dims)
    present = {m: torch.ones(5, dtype=torch.bool) for m in dims}
    present["audio"] = torch.tensor([True, False, True, False, True])
    altered = dict(feats, audio=feats["audio"] + 100 * torch.randn(5, dims["audio"]))
    out, out_altered = fuser(feats, present), fuser(altered, present)
    absent = ~present["audio"]
    assert torch.allclose(out[absent], out_altered[absent])
    assert not torch.allclose(out[~absent], out_altered[~absent])


def test_gated_weights_renormalize_over_present_modalities():
    dims = DIMS[2]
    fuser = GatedFuser(dims, dim=8).eval()
    feats = features(dims, batch=3)
    only_image = {
        "image": torch.ones(3, dtype=torch.bool),
        "audio": torch.zeros(3, dtype=torch.bool),
    }
    expected = torch.tanh(fuser.proj["image"](feats["image"]))
    assert torch.allclose(fuser(feats, only_image), expected, atol=1e-6)


def test_all_absent_gives_finite_output():
    fuser = GatedFuser(DIMS[2], dim=8)
    none = {m: torch.zeros(2, dtype=torch.bool) for m in DIMS[2]}
    out = fuser(features(DIMS[2], batch=2), none)
    assert torch.isfinite(out).all()


def test_wrong_feature_size_names_the_modality():
    fuser = ConcatFuser(DIMS[2])
    with pytest.raises(ValueError, match=r"modality 'audio': fuser expects features \[batch, 4\]"):
        fuser({"image": torch.randn(2, 6), "audio": torch.randn(2, 3)})
    with pytest.raises(KeyError, match="fuser expects modality 'audio'"):
        fuser({"image": torch.randn(2, 6)})
