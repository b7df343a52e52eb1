import pytest
import torch

from fusion.fusers.transformer import CrossAttentionFuser, TransformerFuser

DIMS = {
    2: {"image": 6, "audio": 4},
    3: {"image": 6, "audio": 4, "text": 5},
}
TOKENS = {"image": 3, "audio": 5, "text": 2}  # a different length per modality
BATCH = 4
FUSERS = [
    (TransformerFuser, {"dim": 8, "depth": 2, "heads": 2, "max_tokens": 8}),
    (CrossAttentionFuser, {"query": "image", "dim": 8, "heads": 2, "depth": 2}),
]
IDS = ["transformer", "cross_attention"]


def features(dims, tokens, batch=BATCH):
    """Vector features [B, D] when `tokens` is False, else token features [B, T_m, D]."""
    return {
        m: torch.randn(batch, *([TOKENS[m]] if tokens else []), d, requires_grad=True)
        for m, d in dims.items()
    }


def absent_at(batch=BATCH):
    return torch.tensor([True, False, True, False])[:batch]


@pytest.mark.parametrize("tokens", [False, True], ids=["vectors", "tokens"])
@pytest.mark.parametrize("n_modalities", [2, 3])
@pytest.mark.parametrize(("cls", "kwargs"), FUSERS, ids=IDS)
def test_output_shape(cls, kwargs, n_modalities, tokens):
    dims = DIMS[n_modalities]
    fuser = cls(dims, **kwargs)
    out = fuser(features(dims, tokens))
    assert out.shape == (BATCH, fuser.out_dim)


def test_out_dims():
    assert TransformerFuser(DIMS[2], dim=8, heads=2).out_dim == 8
    assert CrossAttentionFuser(DIMS[2], query="audio", dim=8, heads=2).out_dim == 16


@pytest.mark.parametrize("tokens", [False, True], ids=["vectors", "tokens"])
@pytest.mark.parametrize("n_modalities", [2, 3])
@pytest.mark.parametrize(("cls", "kwargs"), FUSERS, ids=IDS)
def test_every_parameter_gets_a_gradient(cls, kwargs, n_modalities, tokens):
    dims = DIMS[n_modalities]
    fuser = cls(dims, **kwargs)
    feats = features(dims, tokens)
    fuser(feats).pow(2).sum().backward()
    for name, param in fuser.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for modality, x in feats.items():
        assert x.grad.abs().sum() > 0, modality


@pytest.mark.parametrize("no_grad", [False, True], ids=["grad", "no_grad"])
@pytest.mark.parametrize("absent", ["image", "audio", "text"])
@pytest.mark.parametrize("tokens", [False, True], ids=["vectors", "tokens"])
@pytest.mark.parametrize(("cls", "kwargs"), FUSERS, ids=IDS)
def test_absent_modality_has_no_influence(cls, kwargs, tokens, absent, no_grad):
    """Also under no_grad, where PyTorch's inference fast paths kick in."""
    dims = DIMS[3]
    fuser = cls(dims, **kwargs).eval()
    feats = features(dims, tokens)
    present = {m: torch.ones(BATCH, dtype=torch.bool) for m in dims}
    present[absent] = ~absent_at()
    altered = dict(feats, **{absent: feats[absent] + 1e6 * torch.randn_like(feats[absent])})
    with torch.set_grad_enabled(not no_grad):
        out, out_altered = fuser(feats, present), fuser(altered, present)
    gone = ~present[absent]
    assert torch.isfinite(out).all()
    assert torch.allclose(out[gone], out_altered[gone], atol=1e-5)
    assert not torch.allclose(out[~gone], out_altered[~gone])


@pytest.mark.parametrize("no_grad", [False, True], ids=["grad", "no_grad"])
@pytest.mark.parametrize(("cls", "kwargs"), FUSERS, ids=IDS)
def test_padded_tokens_have_no_influence(cls, kwargs, no_grad):
    dims = DIMS[3]
    fuser = cls(dims, **kwargs).eval()
    feats = features(dims, tokens=True)
    present = {m: torch.rand(BATCH, TOKENS[m]) < 0.6 for m in dims}
    for m in dims:
        present[m][:, 0] = True  # every sample keeps one real token per modality
    altered = {
        m: torch.where(present[m].unsqueeze(-1), x, torch.full_like(x, 1e9))
        for m, x in feats.items()
    }
    with torch.set_grad_enabled(not no_grad):
        out, out_altered = fuser(feats, present), fuser(altered, present)
        changed = fuser(dict(feats, audio=feats["audio"] + 1.0), present)
    assert torch.isfinite(out_altered).all()
    assert torch.allclose(out, out_altered, atol=1e-5)
    assert not torch.allclose(out, changed)


@pytest.mark.parametrize("padded", ["image", "audio"])
@pytest.mark.parametrize(("cls", "kwargs"), FUSERS, ids=IDS)
def test_padding_is_the_same_as_truncation(cls, kwargs, padded):
    """Padded tokens are really left out, not just zeroed: the mask reaches the attention."""
    dims = DIMS[3]
    fuser = cls(dims, **kwargs).eval()
    feats = features(dims, tokens=True)
    lengths = [TOKENS[padded], 2, 1, 2]
    present = {padded: torch.arange(TOKENS[padded]) < torch.tensor(lengths)[:, None]}
    out = fuser(feats, present)
    for b, length in enumerate(lengths):
        alone = {m: x[b : b + 1] for m, x in feats.items()}
        alone[padded] = alone[padded][:, :length]
        assert torch.allclose(out[b], fuser(alone)[0], atol=1e-5), b


@pytest.mark.parametrize(("cls", "kwargs"), FUSERS, ids=IDS)
def test_every_modality_absent_gives_finite_output_independent_of_values(cls, kwargs):
    dims = DIMS[2]
    fuser = cls(dims, **kwargs).eval()
    none = {m: torch.zeros(BATCH, dtype=torch.bool) for m in dims}
    out = fuser(features(dims, tokens=True), none)
    other = fuser({m: 1e6 * x for m, x in features(dims, tokens=True).items()}, none)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, other, atol=1e-5)


def test_cross_attention_with_absent_context_is_finite_and_ignores_it():
    """Every key masked gives NaN (or, in some kernels, zero) attention; the null token
    is attended to instead, so the output and its gradients are finite and well defined."""
    dims = DIMS[3]
    fuser = CrossAttentionFuser(dims, query="image", dim=8, heads=2).eval()
    feats = features(dims, tokens=True)
    no_context = ~absent_at()
    present = {"audio": ~no_context, "text": ~no_context}  # the query, image, is always there
    out = fuser(feats, present)
    altered = {m: x if m == "image" else x + 1e6 for m, x in feats.items()}
    out_altered = fuser(altered, present)
    assert torch.isfinite(out).all() and torch.isfinite(out_altered).all()
    assert torch.allclose(out[no_context], out_altered[no_context], atol=1e-5)
    assert torch.equal(out[no_context, 8:], torch.zeros(int(no_context.sum()), 8))
    out.pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fuser.parameters())
    with torch.no_grad():
        fuser.null_context.add_(1.0)
    assert not torch.allclose(fuser(feats, present)[no_context], out[no_context])


def test_cross_attention_absent_query_zeroes_its_half():
    dims = DIMS[2]
    fuser = CrossAttentionFuser(dims, query="image", dim=8, heads=2).eval()
    present = {"image": torch.zeros(BATCH, dtype=torch.bool)}
    out = fuser(features(dims, tokens=True), present)
    assert torch.equal(out[:, :8], torch.zeros(BATCH, 8))
    assert out[:, 8:].abs().sum() > 0


def test_transformer_rejects_too_many_tokens_naming_the_modality():
    fuser = TransformerFuser(DIMS[2], dim=8, heads=2, max_tokens=4)
    feats = features(DIMS[2], tokens=True)  # audio has 5 tokens
    with pytest.raises(ValueError, match=r"modality 'audio' has 5 tokens, more than max_tokens=4"):
        fuser(feats)


@pytest.mark.parametrize(("cls", "kwargs"), FUSERS, ids=IDS)
def test_bad_features_and_present_are_named(cls, kwargs):
    fuser = cls(DIMS[2], **kwargs)
    with pytest.raises(ValueError, match=r"modality 'audio': fuser expects features \[batch, 4\]"):
        fuser({"image": torch.randn(2, 6), "audio": torch.randn(2, 3)})
    with pytest.raises(KeyError, match="fuser expects modality 'audio'"):
        fuser({"image": torch.randn(2, 6)})
    with pytest.raises(KeyError, match=r"\['text'\]"):
        fuser(features(DIMS[2], tokens=False), {"text": torch.ones(BATCH, dtype=torch.bool)})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 10, "heads": 4}, r"dim \(10\) must be divisible by heads \(4\)"),
        ({"heads": 0}, "heads must be a positive integer"),
        ({"depth": 0}, "depth must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
@pytest.mark.parametrize(("cls", "base"), FUSERS, ids=IDS)
def test_bad_constructor_args_are_named(cls, base, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(DIMS[2], **{**base, **kwargs})


def test_transformer_rejects_bad_max_tokens():
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        TransformerFuser(DIMS[2], max_tokens=0)


def test_cross_attention_rejects_unknown_query_and_single_modality():
    with pytest.raises(
        ValueError, match=r"query must be one of the modalities \['image', 'audio'\]"
    ):
        CrossAttentionFuser(DIMS[2], query="text")
    with pytest.raises(ValueError, match="needs at least 2 modalities"):
        CrossAttentionFuser({"image": 6}, query="image")
