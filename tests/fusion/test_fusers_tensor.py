import pytest
import torch
from einops import einsum, rearrange

from fusion.fusers.tensor import BilinearFuser, LowRankFuser, TensorFuser

DIMS = {
    2: {"image": 6, "audio": 4},
    3: {"image": 6, "audio": 4, "text": 5},
}
FUSERS = [
    (TensorFuser, {"dim_per_modality": 3, "out_dim": 7}),
    (TensorFuser, {"dim_per_modality": None, "out_dim": None}),
    (LowRankFuser, {"out_dim": 7, "rank": 3}),
    (BilinearFuser, {"out_dim": 7}),
    (BilinearFuser, {"out_dim": 7, "rank": 3}),
]


def features(dims, batch=5):
    return {m: torch.randn(batch, d, requires_grad=True) for m, d in dims.items()}


@pytest.mark.parametrize("n_modalities", [2, 3])
@pytest.mark.parametrize(("cls", "kwargs"), FUSERS)
def test_output_shape(cls, kwargs, n_modalities):
    dims = DIMS[n_modalities]
    fuser = cls(dims, **kwargs)
    assert fuser(features(dims)).shape == (5, fuser.out_dim)
    tokens = {m: torch.randn(5, 3, d) for m, d in dims.items()}
    real = {m: torch.rand(5, 3) > 0.3 for m in dims}
    assert fuser(tokens, real).shape == (5, fuser.out_dim)


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


def test_every_low_rank_factor_is_a_parameter():
    fuser = LowRankFuser(DIMS[3], out_dim=7, rank=3)
    names = {name for name, _ in fuser.named_parameters()}
    assert names == {"factors.0", "factors.1", "factors.2", "fusion_weights", "bias"}


@pytest.mark.parametrize("absent_modality", ["image", "audio", "text"])
@pytest.mark.parametrize(("cls", "kwargs"), FUSERS)
def test_absent_modality_has_no_influence(cls, kwargs, absent_modality):
    dims = DIMS[3]
    fuser = cls(dims, **kwargs).eval()
    feats = features(dims)
    present = {m: torch.ones(5, dtype=torch.bool) for m in dims}
    present[absent_modality] = torch.tensor([True, False, True, False, True])
    noise = 100 * torch.randn(5, dims[absent_modality])
    altered = dict(feats, **{absent_modality: feats[absent_modality] + noise})
    out, out_altered = fuser(feats, present), fuser(altered, present)
    absent = ~present[absent_modality]
    assert torch.allclose(out[absent], out_altered[absent])
    assert not torch.allclose(out[~absent], out_altered[~absent])


@pytest.mark.parametrize(("cls", "kwargs"), FUSERS)
def test_bad_inputs_name_the_modality(cls, kwargs):
    fuser = cls(DIMS[2], **kwargs)
    with pytest.raises(ValueError, match=r"modality 'audio': fuser expects features \[batch, 4\]"):
        fuser({"image": torch.randn(2, 6), "audio": torch.randn(2, 3)})
    with pytest.raises(KeyError, match="'text'"):
        fuser(features(DIMS[2], batch=2), {"text": torch.ones(2, dtype=torch.bool)})


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (TensorFuser, {"dim_per_modality": 0}, "dim_per_modality"),
        (TensorFuser, {"out_dim": -1}, "out_dim"),
        (TensorFuser, {"dropout": 1.0}, "dropout"),
        (LowRankFuser, {"rank": 0}, "rank"),
        (LowRankFuser, {"out_dim": 2.5}, "out_dim"),
        (BilinearFuser, {"rank": 0}, "rank"),
        (BilinearFuser, {"out_dim": 0}, "out_dim"),
    ],
)
def test_bad_arguments_are_named(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(DIMS[2], **kwargs)


def test_bilinear_needs_two_modalities():
    with pytest.raises(ValueError, match="in_dims"):
        BilinearFuser({"image": 6})


def test_explosive_tensor_size_is_refused():
    with pytest.raises(ValueError, match="dim_per_modality"):
        TensorFuser({"a": 2000, "b": 2000}, dim_per_modality=None)
    with pytest.raises(ValueError, match="dim_per_modality"):
        TensorFuser({m: 8 for m in "abcdefg"}, dim_per_modality=8)


def test_tensor_fusion_by_hand():
    fuser = TensorFuser({"a": 1, "b": 1}, dim_per_modality=None, out_dim=None)
    feats = {"a": torch.tensor([[2.0], [2.0]]), "b": torch.tensor([[3.0], [3.0]])}
    present = {"b": torch.tensor([True, False])}
    # [a, 1] outer [b, 1], flattened; an absent b is [0, 1].
    expected = torch.tensor([[6.0, 2.0, 3.0, 1.0], [0.0, 2.0, 0.0, 1.0]])
    assert torch.equal(fuser(feats, present), expected)


def test_tensor_fusion_is_the_outer_product_of_extended_vectors():
    fuser = TensorFuser({"a": 2, "b": 1, "c": 2}, dim_per_modality=None, out_dim=None)
    feats = features(fuser.in_dims, batch=3)
    a, b, c = (torch.cat([feats[m], torch.ones(3, 1)], dim=1) for m in "abc")
    expected = rearrange(einsum(a, b, c, "n i, n j, n k -> n i j k"), "n i j k -> n (i j k)")
    assert fuser.out_dim == 3 * 2 * 3
    assert torch.allclose(fuser(feats), expected)


def test_low_rank_fusion_by_hand():
    fuser = LowRankFuser({"a": 1, "b": 1}, out_dim=1, rank=1)
    with torch.no_grad():
        fuser.factors[0].copy_(torch.tensor([2.0, 5.0]).view(1, 2, 1))  # a * 2 + 5
        fuser.factors[1].copy_(torch.tensor([3.0, 7.0]).view(1, 2, 1))  # b * 3 + 7
        fuser.fusion_weights.fill_(0.5)
        fuser.bias.fill_(1.0)
    feats = {"a": torch.tensor([[1.0], [1.0]]), "b": torch.tensor([[2.0], [2.0]])}
    present = {"b": torch.tensor([True, False])}
    expected = torch.tensor([[0.5 * (2 + 5) * (6 + 7) + 1], [0.5 * (2 + 5) * 7 + 1]])
    assert torch.allclose(fuser(feats, present), expected)


def test_low_rank_fusion_equals_tensor_fusion_with_the_factored_weight():
    dims = {"a": 3, "b": 2, "c": 4}
    lmf = LowRankFuser(dims, out_dim=5, rank=3)
    tfn = TensorFuser(dims, dim_per_modality=None, out_dim=None)
    f_a, f_b, f_c = lmf.factors
    weight = einsum(
        lmf.fusion_weights, f_a, f_b, f_c, "r, r i o, r j o, r k o -> i j k o"
    )  # sum over r of the outer product of the factors
    feats = features(dims, batch=4)
    present = {"b": torch.tensor([True, False, True, True])}
    expected = tfn(feats, present) @ rearrange(weight, "i j k o -> (i j k) o") + lmf.bias
    assert torch.allclose(lmf(feats, present), expected, atol=1e-5)


def test_low_rank_fusion_outputs_are_order_one():
    fuser = LowRankFuser({"image": 512, "audio": 512})
    feats = {m: torch.randn(64, 512) for m in fuser.in_dims}
    absent_audio = {"audio": torch.zeros(64, dtype=torch.bool)}
    for present in (None, absent_audio):
        assert 0.2 < fuser(feats, present).std() < 5


def explicit_bilinear(weight, x, y):
    out = torch.zeros(x.shape[0], weight.shape[0])
    for k in range(weight.shape[0]):
        for i in range(x.shape[1]):
            for j in range(y.shape[1]):
                out[:, k] += x[:, i] * weight[k, i, j] * y[:, j]
    return out


@pytest.mark.parametrize("rank", [None, 2])
def test_bilinear_is_the_explicit_double_sum(rank):
    dims = {"image": 3, "audio": 2, "text": 2}
    fuser = BilinearFuser(dims, out_dim=4, rank=rank)
    if rank is None:
        weight = fuser.weight
    else:
        weight = einsum(
            fuser.out_factor,
            fuser.context_factor,
            fuser.rest_factor,
            "r k, r i, r j -> k i j",
        )
    feats = features(dims, batch=3)
    x, y = feats["image"], torch.cat([feats["audio"], feats["text"]], dim=1)
    expected = (
        explicit_bilinear(weight, x, y)
        + x @ fuser.context_linear.weight.T
        + y @ fuser.rest_linear.weight.T
        + fuser.rest_linear.bias
    )
    assert torch.allclose(fuser(feats), expected, atol=1e-5)
