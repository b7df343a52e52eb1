import math
from pathlib import Path

import pytest
import torch

from fusion.fusers.pooling import BlockFuser, MFBFuser, MFHFuser, MLBFuser, MutanFuser
from tests.fusion.test_fusers import configured_fuser, from_config

DIMS = {
    2: {"image": 6, "audio": 4},
    3: {"image": 6, "audio": 4, "text": 5},
    4: {"image": 6, "audio": 4, "text": 5, "depth": 3},
}
SMALL = [
    pytest.param(MLBFuser, {"mm_dim": 8, "out_dim": 5}, id="mlb"),
    pytest.param(MLBFuser, {"mm_dim": 8, "out_dim": None}, id="mlb-no-out"),
    pytest.param(MFBFuser, {"mm_dim": 4, "factor": 3}, id="mfb"),
    pytest.param(MFBFuser, {"mm_dim": 4, "factor": 3, "out_dim": 5}, id="mfb-out"),
    pytest.param(MFHFuser, {"mm_dim": 4, "factor": 3, "order": 3}, id="mfh"),
    pytest.param(MutanFuser, {"proj_dim": 5, "mm_dim": 4, "rank": 3, "out_dim": 5}, id="mutan"),
    pytest.param(BlockFuser, {"mm_dim": 7, "chunks": 3, "rank": 2, "out_dim": 5}, id="block"),
]
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model" / "fusion"
POOLING_CONFIGS = [CONFIGS / f"{name}.yaml" for name in ("mlb", "mfb", "mfh", "mutan", "block")]


def features(dims, batch=4):
    return {m: torch.randn(batch, d) for m, d in dims.items()}


def set_weights(layer, weight, bias=0.0):
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=torch.float32).view_as(layer.weight))
        layer.bias.copy_(torch.as_tensor(bias, dtype=torch.float32).expand_as(layer.bias))


def randomize_biases(fuser):
    """Default Linear biases are small; larger ones make the references check them too."""
    with torch.no_grad():
        for name, param in fuser.named_parameters():
            if name.endswith("bias"):
                param.normal_()


def affine(layer, x):
    """The layer's map written out: x @ W^T + b."""
    return x @ layer.weight.T + layer.bias


def power_l2_reference(z):
    """The papers' normalization written out: sign(z) * |z|^0.5, then z / ||z||_2."""
    z = torch.sign(z) * z.abs() ** 0.5
    return z / z.pow(2).sum(dim=-1, keepdim=True) ** 0.5


# --- the papers' equations, by hand (two modalities, weights set, values pinned) ----------


def test_mlb_by_hand():
    fuser = MLBFuser({"a": 1, "b": 1}, mm_dim=2, out_dim=1).eval()
    set_weights(fuser.proj["a"], [math.atanh(0.5), math.atanh(-0.25)])  # tanh -> [0.5, -0.25]
    set_weights(fuser.proj["b"], [math.atanh(0.8), math.atanh(0.4)])  # tanh -> [0.8, 0.4]
    set_weights(fuser.out, [1.0, 2.0], bias=0.5)
    nan = float("nan")
    feats = {"a": torch.tensor([[1.0], [1.0], [nan], [nan]]), "b": torch.tensor([[1.0], [nan]] * 2)}
    present = {"a": torch.tensor([True, True, False, False]), "b": torch.tensor([True, False] * 2)}
    # P^T (tanh(Ux) * tanh(Vy)) + b: [0.4, -0.1] -> 0.4 - 0.2 + 0.5; an absent factor is 1.
    expected = torch.tensor([[0.7], [0.5 - 0.5 + 0.5], [0.8 + 0.8 + 0.5], [1.0 + 2.0 + 0.5]])
    torch.testing.assert_close(fuser(feats, present), expected)


def test_mfb_by_hand():
    fuser = MFBFuser({"a": 1, "b": 1}, mm_dim=2, factor=2, dropout=0.0)
    set_weights(fuser.proj["a"], [1.0, 2.0, 3.0, 4.0])
    set_weights(fuser.proj["b"], [-1.0, -1.0, 1.0, 1.0])
    feats = {"a": torch.tensor([[1.0], [1.0]]), "b": torch.tensor([[2.0], [float("nan")]])}
    present = {"b": torch.tensor([True, False])}
    # [1, 2, 3, 4] * [-2, -2, 2, 2] = [-2, -4, 6, 8]; windows of 2: [-6, 14]; signed sqrt
    # [-sqrt(6), sqrt(14)]; L2 norm sqrt(20). Without b: [1, 2, 3, 4] -> [3, 7] -> / sqrt(10).
    expected = torch.tensor([[-(0.3**0.5), 0.7**0.5], [0.3**0.5, 0.7**0.5]])
    torch.testing.assert_close(fuser(feats, present), expected)


def test_mfh_by_hand():
    fuser = MFHFuser({"a": 1, "b": 1}, mm_dim=2, factor=2, order=2, dropout=0.0)
    set_weights(fuser.blocks[0]["a"], [1.0, 2.0, 3.0, 4.0])
    set_weights(fuser.blocks[0]["b"], [1.0, 1.0, -1.0, 1.0])
    set_weights(fuser.blocks[1]["a"], [1.0, 1.0, 1.0, 1.0])
    set_weights(fuser.blocks[1]["b"], [2.0, 1.0, 1.0, 1.0])
    feats = {"a": torch.tensor([[1.0], [1.0]]), "b": torch.tensor([[1.0], [float("inf")]])}
    present = {"b": torch.tensor([True, False])}
    # Block 1: e1 = [1, 2, -3, 4] -> [3, 1] -> [sqrt(3), 1] / 2.
    # Block 2: e2 = e1 * [1, 1, 1, 1] * [2, 1, 1, 1] = [2, 2, -3, 4] -> [4, 1] -> [2, 1] / sqrt(5).
    # Without b: e1 = e2 = [1, 2, 3, 4] -> [3, 7] -> [sqrt(3), sqrt(7)] / sqrt(10), twice.
    expected = torch.tensor(
        [
            [3**0.5 / 2, 0.5, 2 / 5**0.5, 1 / 5**0.5],
            [0.3**0.5, 0.7**0.5, 0.3**0.5, 0.7**0.5],
        ]
    )
    torch.testing.assert_close(fuser(feats, present), expected)


def test_mutan_by_hand():
    fuser = MutanFuser({"a": 1, "b": 1}, proj_dim=1, mm_dim=2, rank=2, out_dim=2, dropout=0.0)
    set_weights(fuser.proj["a"], [math.atanh(0.5)])  # x~ = 0.5
    set_weights(fuser.proj["b"], [math.atanh(-0.5)])  # y~ = -0.5
    set_weights(fuser.core["a"], [1.0, 2.0, 3.0, 4.0])  # rank 0: [0.5, 1], rank 1: [1.5, 2]
    set_weights(fuser.core["b"], [2.0, 2.0, 2.0, -2.0])  # rank 0: [-1, -1], rank 1: [-1, 1]
    set_weights(fuser.out, [[1.0, 0.0], [1.0, 1.0]], bias=torch.tensor([0.0, 0.5]))
    feats = {"a": torch.tensor([[1.0], [1.0]]), "b": torch.tensor([[1.0], [float("nan")]])}
    present = {"b": torch.tensor([True, False])}
    # z = [0.5, 1] * [-1, -1] + [1.5, 2] * [-1, 1] = [-2, 1]; W_o z + b = [-2, -0.5].
    # Without b: z = [0.5, 1] + [1.5, 2] = [2, 3] -> [2, 5.5].
    expected = torch.tensor([[-2.0, -0.5], [2.0, 5.5]])
    torch.testing.assert_close(fuser(feats, present), expected)


def test_block_by_hand():
    fuser = BlockFuser({"a": 1, "b": 1}, mm_dim=4, chunks=2, rank=2, out_dim=4, dropout=0.0)
    set_weights(fuser.proj["a"], [1.0, 1.0, 1.0, 1.0])  # x~ = [1, 1 | 1, 1]
    set_weights(fuser.proj["b"], [1.0, 1.0, 1.0, 1.0])
    # Rows 0-1: the chunk's rank-0 factor, rows 2-3: its rank-1 factor.
    set_weights(fuser.cores["a"][0], [[1, 0], [0, 2], [1, 0], [0, 0]])  # [1, 2], [1, 0]
    set_weights(fuser.cores["b"][0], [[2, 1], [0, -2], [1, 0], [0, 0]])  # [3, -2], [1, 0]
    set_weights(fuser.cores["a"][1], [[1, 1], [0, 1], [0, 0], [0, 0]])  # [2, 1], [0, 0]
    set_weights(fuser.cores["b"][1], [[0, 2], [1, 1], [1, 1], [1, 1]])  # [2, 2], [2, 2]
    set_weights(fuser.out, torch.eye(4))
    feats = {"a": torch.tensor([[1.0], [1.0]]), "b": torch.tensor([[1.0], [float("-inf")]])}
    present = {"b": torch.tensor([True, False])}
    # Chunk 0: [1, 2] * [3, -2] + [1, 0] * [1, 0] = [4, -4] -> [2, -2] / sqrt(8).
    # Chunk 1: [2, 1] * [2, 2] + [0, 0] * [2, 2] = [4, 2] -> [2, sqrt(2)] / sqrt(6).
    # Without b: chunk 0 [1, 2] + [1, 0] = [2, 2]; chunk 1 [2, 1] + [0, 0] = [2, 1].
    expected = torch.tensor(
        [
            [0.5**0.5, -(0.5**0.5), 2 / 6**0.5, 2**0.5 / 6**0.5],
            [0.5**0.5, 0.5**0.5, 2**0.5 / 3**0.5, 1 / 3**0.5],
        ]
    )
    torch.testing.assert_close(fuser(feats, present), expected)


# --- the equations against the fusers with random weights, N modalities ------------------


def test_mlb_is_the_product_of_tanh_projections_for_three_modalities():
    dims = DIMS[3]
    fuser = MLBFuser(dims, mm_dim=6, out_dim=5).eval()
    randomize_biases(fuser)
    feats = features(dims)
    joint = math.prod(torch.tanh(affine(fuser.proj[m], feats[m])) for m in dims)
    torch.testing.assert_close(fuser(feats), affine(fuser.out, joint))


def test_mfb_sums_windows_then_power_and_l2_normalizes():
    dims, o, k = DIMS[3], 4, 3
    fuser = MFBFuser(dims, mm_dim=o, factor=k).eval()
    randomize_biases(fuser)
    feats = features(dims)
    expanded = math.prod(affine(fuser.proj[m], feats[m]) for m in dims)  # [B, o * k]
    pooled = torch.stack([sum(expanded[:, j * k + i] for i in range(k)) for j in range(o)], 1)
    out = fuser(feats)
    torch.testing.assert_close(out, power_l2_reference(pooled))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))


def test_mfh_cascade_multiplies_in_the_previous_blocks_product():
    dims, o, k, p = DIMS[2], 3, 2, 3
    fuser = MFHFuser(dims, mm_dim=o, factor=k, order=p).eval()
    randomize_biases(fuser)
    feats = features(dims)
    expanded, blocks = torch.ones(4, o * k), []
    for i in range(p):
        expanded = expanded * math.prod(affine(fuser.blocks[i][m], feats[m]) for m in dims)
        pooled = torch.stack([expanded[:, j * k : (j + 1) * k].sum(1) for j in range(o)], 1)
        blocks.append(power_l2_reference(pooled))
    out = fuser(feats)
    assert fuser.out_dim == p * o
    torch.testing.assert_close(out, torch.cat(blocks, dim=1))
    # Each block is normalized on its own.
    torch.testing.assert_close(out.view(4, p, o).norm(dim=2), torch.ones(4, p))


def test_mfh_of_order_one_is_mfb():
    dims = DIMS[3]
    mfh = MFHFuser(dims, mm_dim=4, factor=3, order=1).eval()
    mfb = MFBFuser(dims, mm_dim=4, factor=3).eval()
    mfb.proj.load_state_dict(mfh.blocks[0].state_dict())
    feats = features(dims)
    torch.testing.assert_close(mfh(feats), mfb(feats))


def test_mutan_is_a_tucker_product_with_a_rank_constrained_core():
    dims, t, o, r = DIMS[2], 4, 3, 2
    fuser = MutanFuser(dims, proj_dim=t, mm_dim=o, rank=r, out_dim=5).eval()
    randomize_biases(fuser)
    feats = features(dims)
    # Factor matrices x~ = tanh(W_x x), extended with a 1 for the core layers' biases.
    x, y = (torch.tanh(affine(fuser.proj[m], feats[m])) for m in dims)
    x, y = (torch.cat([v, torch.ones(4, 1)], dim=1) for v in (x, y))
    # Core T[i, j, k] = sum_r M_r[i, k] N_r[j, k]: M_r is rank r's [t + 1, o] block of weights.
    m, n = (
        torch.cat([fuser.core[mod].weight, fuser.core[mod].bias[:, None]], 1).T.reshape(t + 1, r, o)
        for mod in dims
    )
    core = torch.einsum("irk,jrk->ijk", m, n)
    assert all(torch.linalg.matrix_rank(core[:, :, k]) <= r for k in range(o))
    z = torch.einsum("bi,bj,ijk->bk", x, y, core)
    torch.testing.assert_close(fuser(feats), affine(fuser.out, z))


def test_mutan_for_three_modalities_sums_rank_terms_of_three_factors():
    dims, o, r = DIMS[3], 3, 4
    fuser = MutanFuser(dims, proj_dim=5, mm_dim=o, rank=r, out_dim=2).eval()
    randomize_biases(fuser)
    feats = features(dims)
    tucker = {m: torch.tanh(affine(fuser.proj[m], feats[m])) for m in dims}
    z = sum(
        math.prod(affine(fuser.core[m], tucker[m])[:, rank * o : (rank + 1) * o] for m in dims)
        for rank in range(r)
    )
    torch.testing.assert_close(fuser(feats), affine(fuser.out, z))


def test_block_is_a_superdiagonal_sum_of_small_low_rank_cores():
    dims, r = DIMS[3], 2
    fuser = BlockFuser(dims, mm_dim=7, chunks=3, rank=r, out_dim=4).eval()
    assert fuser.sizes == [3, 2, 2]  # uneven: the larger chunks first
    randomize_biases(fuser)
    feats = features(dims)
    projected = {m: affine(fuser.proj[m], feats[m]) for m in dims}
    blocks, start = [], 0
    for c, size in enumerate(fuser.sizes):
        chunk = {m: projected[m][:, start : start + size] for m in dims}  # only chunk c
        z = sum(
            math.prod(
                affine(fuser.cores[m][c], chunk[m])[:, i * size : (i + 1) * size] for m in dims
            )
            for i in range(r)
        )
        blocks.append(power_l2_reference(z))
        start += size
    torch.testing.assert_close(fuser(feats), affine(fuser.out, torch.cat(blocks, dim=1)))


def test_block_normalizes_each_chunk():
    dims = DIMS[2]
    fuser = BlockFuser(dims, mm_dim=6, chunks=2, rank=3, out_dim=6).eval()
    set_weights(fuser.out, torch.eye(6))
    out = fuser(features(dims))
    torch.testing.assert_close(out.view(4, 2, 3).norm(dim=2), torch.ones(4, 2))


def test_an_exactly_zero_pooled_vector_has_finite_gradients():
    """sqrt has an infinite slope at 0; the power normalization must not turn it into NaN."""
    dims = DIMS[2]
    for fuser in (MFBFuser(dims, mm_dim=3, factor=2), BlockFuser(dims, mm_dim=4, chunks=2)):
        with torch.no_grad():
            for param in fuser.parameters():
                param.zero_()
        fuser.eval()
        feats = {m: x.requires_grad_() for m, x in features(dims).items()}
        out = fuser(feats)
        assert torch.isfinite(out).all()
        (out * torch.randn_like(out)).sum().backward()
        for name, param in fuser.named_parameters():
            assert torch.isfinite(param.grad).all(), name
        assert all(torch.isfinite(x.grad).all() for x in feats.values())


@pytest.mark.parametrize("n_modalities", [2, 3, 4])
@pytest.mark.parametrize(("cls", "kwargs"), SMALL)
def test_every_modality_enters_the_product(cls, kwargs, n_modalities):
    dims = DIMS[n_modalities]
    fuser = cls(dims, **kwargs).eval()
    feats = features(dims)
    out = fuser(feats)
    assert out.shape == (4, fuser.out_dim)
    for m in dims:
        assert not torch.allclose(fuser(dict(feats, **{m: torch.randn(4, dims[m])})), out), m


# --- missing modalities: the multiplicative identity --------------------------------------


@pytest.mark.parametrize(("cls", "kwargs"), SMALL)
def test_an_absent_modality_leaves_the_product_of_the_others(cls, kwargs):
    """With 'text' absent, a three-modality fuser gives what the same fuser built for the two
    others (same weights) gives: the absent factor is 1, not a zero or a learned stand-in."""
    dims = DIMS[3]
    fuser = cls(dims, **kwargs).eval()
    randomize_biases(fuser)
    pair = cls({m: d for m, d in dims.items() if m != "text"}, **kwargs).eval()
    pair.load_state_dict(
        {k: v for k, v in fuser.state_dict().items() if "text" not in k.split(".")}
    )
    feats = features(dims)
    feats["text"][1] = float("nan")
    present = {"text": torch.tensor([True, False, True, False])}
    out = fuser(feats, present)
    reduced = pair({m: x for m, x in feats.items() if m != "text"})
    torch.testing.assert_close(out[~present["text"]], reduced[~present["text"]])
    assert not torch.allclose(out[present["text"]], reduced[present["text"]])


def test_with_every_modality_absent_the_output_is_the_product_of_ones():
    dims = DIMS[3]
    none = {m: torch.zeros(4, dtype=torch.bool) for m in dims}
    feats = features(dims)
    mlb = MLBFuser(dims, mm_dim=6, out_dim=5).eval()
    torch.testing.assert_close(mlb(feats, none), affine(mlb.out, torch.ones(4, 6)))
    mutan = MutanFuser(dims, proj_dim=5, mm_dim=3, rank=4, out_dim=2).eval()
    # z = sum over the 4 rank terms of 1 * 1 * 1.
    torch.testing.assert_close(mutan(feats, none), affine(mutan.out, torch.full((4, 3), 4.0)))
    # MFB, MFH: each window sums k ones, then normalization: 1 / sqrt(o) everywhere.
    mfb = MFBFuser(dims, mm_dim=4, factor=3).eval()
    torch.testing.assert_close(mfb(feats, none), torch.full((4, 4), 0.5))
    mfh = MFHFuser(dims, mm_dim=4, factor=3, order=2).eval()
    torch.testing.assert_close(mfh(feats, none), torch.full((4, 8), 0.5))
    # BLOCK: each chunk sums `rank` ones, normalized: 1 / sqrt(size), then W_o.
    block = BlockFuser(dims, mm_dim=8, chunks=2, rank=3, out_dim=2).eval()
    torch.testing.assert_close(block(feats, none), affine(block.out, torch.full((4, 8), 0.5)))


@pytest.mark.parametrize(("cls", "kwargs"), SMALL)
def test_tokens_are_averaged_over_real_ones(cls, kwargs):
    dims = DIMS[2]
    fuser = cls(dims, **kwargs).eval()
    tokens = {m: torch.randn(3, 4, d) for m, d in dims.items()}
    real = {
        "image": torch.ones(3, 4, dtype=torch.bool),
        "audio": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool),
    }
    means = {
        m: (x * real[m][..., None]).sum(1) / real[m].sum(1, keepdim=True).clamp(min=1)
        for m, x in tokens.items()
    }
    present = {m: r.any(dim=1) for m, r in real.items()}
    torch.testing.assert_close(fuser(tokens, real), fuser(means, present))


# --- the configured fusers (configs/model/fusion/{mlb,mfb,mfh,mutan,block}.yaml) ----------


def test_configured_sizes_are_those_in_the_config_headers():
    dims = {"image": 512, "audio": 512}
    counts, outs = {}, {}
    for config in POOLING_CONFIGS:
        fuser = configured_fuser(config, dims)
        counts[config.stem] = sum(p.numel() for p in fuser.parameters())
        outs[config.stem] = fuser.out_dim
    assert counts == {
        "mlb": 295_552,
        "mfb": 656_640,
        "mfh": 656_640,
        "mutan": 478_080,
        "block": 464_512,
    }
    assert set(outs.values()) == {128}
    assert all(from_config(c)[0].__module__ == "fusion.fusers.pooling" for c in POOLING_CONFIGS)


# --- arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (MLBFuser, {"mm_dim": 0}, r"^mm_dim must be a positive integer, got 0$"),
        (MLBFuser, {"out_dim": 2.5}, r"^out_dim must be a positive integer or None, got 2.5$"),
        (MFBFuser, {"factor": -1}, r"^factor must be a positive integer, got -1$"),
        (MFHFuser, {"order": 0}, r"^order must be a positive integer, got 0$"),
        (MFHFuser, {"order": True}, r"^order must be a positive integer, got True$"),
        (MutanFuser, {"rank": "10"}, r"^rank must be a positive integer, got '10'$"),
        (MutanFuser, {"out_dim": None}, r"^out_dim must be a positive integer, got None$"),
        (BlockFuser, {"chunks": 0}, r"^chunks must be a positive integer, got 0$"),
        (BlockFuser, {"mm_dim": 8, "chunks": 9}, r"^chunks must be at most mm_dim \(8\).*got 9$"),
        (MLBFuser, {"dropout": 1.0}, r"^dropout must be in \[0, 1\), got 1.0$"),
        (MFBFuser, {"dropout": -0.1}, r"^dropout must be in \[0, 1\), got -0.1$"),
        (MFHFuser, {"dropout": "0.1"}, r"^dropout must be in \[0, 1\), got '0.1'$"),
        (MutanFuser, {"dropout": 1.5}, r"^dropout must be in \[0, 1\), got 1.5$"),
        (BlockFuser, {"dropout": None}, r"^dropout must be in \[0, 1\), got None$"),
    ],
)
def test_bad_arguments_are_named(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(DIMS[2], **kwargs)


@pytest.mark.parametrize(
    ("cls", "method"),
    [(MLBFuser, "MLB"), (MFBFuser, "MFB"), (MFHFuser, "MFH"), (MutanFuser, "MUTAN"),
     (BlockFuser, "BLOCK")],
)  # fmt: skip
def test_one_modality_is_refused_naming_the_method_and_the_count(cls, method):
    with pytest.raises(
        ValueError, match=rf"^{method} .* at least two in in_dims, got 1: \['image'\]$"
    ):
        cls({"image": 6})
