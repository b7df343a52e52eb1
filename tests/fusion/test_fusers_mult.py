"""MulT (Tsai et al., 2019) and MBT attention bottlenecks (Nagrani et al., 2021) against
their papers' equations, computed here from the modules' own weights.

The shared contract (shapes, masks whatever they hold, argument checks) is in test_fusers.py,
which runs on configs/model/fusion/mult.yaml and mbt.yaml.
"""

import math

import pytest
import torch
from einops import einsum, rearrange

from fusion.fusers.bottleneck import BottleneckFuser
from fusion.fusers.mult import MulTFuser, sinusoidal_positions

DIMS = {
    2: {"image": 6, "audio": 4},
    3: {"image": 6, "audio": 4, "text": 5},
}
TOKENS = {"image": 4, "audio": 3, "text": 2}  # a different length per modality
BATCH = 4
SMALL = {"dim": 8, "heads": 2, "dropout": 0.0}
FUSERS = [
    pytest.param(MulTFuser, {**SMALL, "cross_layers": 2, "self_layers": 1}, id="mult-last"),
    pytest.param(MulTFuser, {**SMALL, "readout": "mean", "out_dim": 7}, id="mult-mean-proj"),
    pytest.param(BottleneckFuser, {**SMALL, "num_layers": 3, "fusion_layers": 2}, id="mbt"),
]


def features(dims, tokens=True, batch=BATCH, requires_grad=False):
    return {
        m: torch.randn(batch, *([TOKENS[m]] if tokens else []), d, requires_grad=requires_grad)
        for m, d in dims.items()
    }


def capture(module, store, key):
    """Record the positional inputs, keyword inputs and output of every call of `module`."""

    def hook(_module, args, kwargs, output):
        store.setdefault(key, []).append((args, kwargs, output))

    return module.register_forward_hook(hook, with_kwargs=True)


def layer_norm(x, norm):
    mean = x.mean(dim=-1, keepdim=True)
    variance = x.var(dim=-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(variance + norm.eps) * norm.weight + norm.bias


def attention(query, keys, allowed, mha):
    """Multi-head scaled dot-product attention (Vaswani et al., 2017) from `mha`'s weights:
    `query` [B, Tq, d] attends to `keys` [B, Tk, d] where `allowed` [B, Tk] is True."""
    heads = mha.num_heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q, k, v = (
        rearrange(x @ w.T + b, "b t (h e) -> b h t e", h=heads)
        for x, w, b in ((query, w_q, b_q), (keys, w_k, b_k), (keys, w_v, b_v))
    )
    scores = einsum(q, k, "b h q e, b h k e -> b h q k") / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    out = einsum(scores.softmax(dim=-1), v, "b h q k, b h k e -> b h q e")
    return rearrange(out, "b h t e -> b t (h e)") @ mha.out_proj.weight.T + mha.out_proj.bias


def crossmodal_block(block, target, source_keys, allowed):
    """MulT eq. (5)-(6), pre-norm: Zhat = Z + CM(LN(Z), LN(Z_source^[0])); Z + FF(LN(Zhat))."""
    attended = attention(
        layer_norm(target, block.norm_query),
        layer_norm(source_keys, block.norm_context),
        allowed,
        block.attention,
    )
    z = target + attended
    first, second = block.ff[0], block.ff[3]
    hidden = torch.nn.functional.gelu(layer_norm(z, block.norm_ff) @ first.weight.T + first.bias)
    return z + hidden @ second.weight.T + second.bias


# --- MulT -----------------------------------------------------------------------------------


def test_sinusoidal_positions_are_those_of_vaswani_et_al():
    table = sinusoidal_positions(3, 4)
    expected = torch.tensor(
        [
            [0.0, 1.0, 0.0, 1.0],
            [math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)],
            [math.sin(2), math.cos(2), math.sin(0.02), math.cos(0.02)],
        ]
    )
    torch.testing.assert_close(table, expected)
    assert sinusoidal_positions(2, 5)[1, 4] == pytest.approx(math.sin(1 / 10000**0.8))


@pytest.mark.parametrize(("n_modalities", "pairs"), [(2, 2), (3, 6)])
def test_mult_has_one_crossmodal_transformer_per_ordered_pair(n_modalities, pairs):
    dims = DIMS[n_modalities]
    fuser = MulTFuser(dims, cross_layers=3, **SMALL)
    found = [(s, t) for t, sources in fuser.crossmodal.items() for s in sources]
    assert len(found) == pairs == n_modalities * (n_modalities - 1)
    assert set(found) == {(s, t) for s in dims for t in dims if s != t}
    assert all(len(cm.blocks) == 3 for t in fuser.crossmodal.values() for cm in t.values())
    # Per target, the M - 1 crossmodal outputs side by side; the M readouts side by side.
    assert fuser.out_dim == n_modalities * (n_modalities - 1) * 8
    assert len(fuser.self_attention) == n_modalities


def test_mult_crossmodal_blocks_are_the_papers_attention_of_target_over_source():
    """For image -> audio: audio's tokens query image's layer-0 tokens in every block, padded
    image tokens are never attended to, and a sample without image attends to the null key."""
    dims = DIMS[3]
    torch.manual_seed(0)
    fuser = MulTFuser(dims, **{**SMALL, "cross_layers": 2}).eval()
    cm = fuser.crossmodal["audio"]["image"]
    calls = {}
    handles = [capture(block, calls, i) for i, block in enumerate(cm.blocks)]
    handles.append(capture(cm, calls, "cm"))
    feats = features(dims)
    image_real = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]]).bool()
    fuser(feats, {"image": image_real})
    for handle in handles:
        handle.remove()

    z_audio = fuser.proj["audio"](feats["audio"]) + sinusoidal_positions(3, 8)
    zeroed = torch.where(image_real[..., None], feats["image"], 0.0)  # padding never projected
    z_image = fuser.proj["image"](zeroed) + sinusoidal_positions(4, 8)
    keys = torch.cat([cm.null.expand(BATCH, 1, 8), z_image], dim=1)
    allowed = torch.cat([~image_real.any(dim=1, keepdim=True), image_real], dim=1)
    assert allowed[2].tolist() == [True, False, False, False, False]  # the null key alone

    target = z_audio
    for i, block in enumerate(cm.blocks):
        (query, context, padding), _, output = calls[i][0]
        torch.testing.assert_close(query, target)
        torch.testing.assert_close(context, keys)  # Z_image^[0] in every block
        assert torch.equal(padding, ~allowed)
        target = crossmodal_block(block, target, keys, allowed)
        torch.testing.assert_close(output, target, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(calls["cm"][0][2], layer_norm(target, cm.norm))


def test_mult_self_attention_reads_the_crossmodal_outputs_side_by_side():
    dims = DIMS[3]
    fuser = MulTFuser(dims, **SMALL).eval()
    calls = {}
    handles = [capture(fuser.self_attention["audio"], calls, "self")]
    handles += [capture(cm, calls, s) for s, cm in fuser.crossmodal["audio"].items()]
    fuser(features(dims))
    for handle in handles:
        handle.remove()
    assert list(fuser.crossmodal["audio"]) == ["image", "text"]
    crossed = calls["self"][0][0][0]
    assert crossed.shape == (BATCH, TOKENS["audio"], 16)
    assert torch.equal(crossed, torch.cat([calls["image"][0][2], calls["text"][0][2]], dim=-1))


@pytest.mark.parametrize("readout", ["last", "mean"])
def test_mult_readout_of_each_target(readout):
    """ "last": the last real token (not the last position); "mean": the mean over real
    tokens; an absent target: zeros. Targets are concatenated in modality order."""
    dims = DIMS[2]
    fuser = MulTFuser(dims, readout=readout, **SMALL).eval()
    calls = {}
    handles = [capture(fuser.self_attention[m], calls, m) for m in dims]
    image_real = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]]).bool()
    out = fuser(features(dims), {"image": image_real})
    for handle in handles:
        handle.remove()
    image, audio = calls["image"][0][2], calls["audio"][0][2]
    if readout == "last":
        expected_image = torch.stack([image[0, 1], image[1, 3], image[2, 2], torch.zeros(8)])
        expected_audio = audio[:, -1]
    else:
        expected_image = torch.stack(
            [image[0, :2].mean(0), image[1].mean(0), image[2, [0, 2]].mean(0), torch.zeros(8)]
        )
        expected_audio = audio.mean(dim=1)
    torch.testing.assert_close(out, torch.cat([expected_image, expected_audio], dim=1))


def test_mult_out_dim_projects_the_concatenated_readouts():
    dims = DIMS[3]
    fuser = MulTFuser(dims, out_dim=7, **SMALL).eval()
    unprojected = MulTFuser(dims, **SMALL).eval()
    unprojected.load_state_dict(fuser.state_dict(), strict=False)
    feats = features(dims)
    assert fuser.out_dim == 7 and fuser.project.in_features == 3 * 2 * 8
    torch.testing.assert_close(fuser(feats), fuser.project(unprojected(feats)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"readout": "first"}, r"^readout must be one of \['last', 'mean'\], got 'first'$"),
        ({"dim": 10, "heads": 4}, r"dim \(10\) must be divisible by heads \(4\)"),
        ({"cross_layers": 0}, r"^cross_layers must be a positive integer, got 0$"),
        ({"self_layers": 1.5}, r"^self_layers must be a positive integer, got 1.5$"),
        ({"out_dim": 0}, r"^out_dim must be a positive integer or None, got 0$"),
    ],
)
def test_mult_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MulTFuser(DIMS[2], **kwargs)


# --- MBT ------------------------------------------------------------------------------------


def mbt_calls(fuser, feats, present=None):
    """The output, and every layer's (args, kwargs, output) per (modality, layer index)."""
    calls = {}
    handles = [
        capture(layer, calls, (m, i))
        for m, layers in fuser.layers.items()
        for i, layer in enumerate(layers)
    ]
    out = fuser(feats, present)
    for handle in handles:
        handle.remove()
    return out, {key: value[0] for key, value in calls.items()}


def test_mbt_modalities_do_not_interact_before_the_fusion_layers():
    dims = DIMS[2]
    torch.manual_seed(0)
    fuser = BottleneckFuser(dims, num_layers=4, fusion_layers=2, **SMALL).eval()
    feats = features(dims)
    _, before = mbt_calls(fuser, feats)
    _, after = mbt_calls(fuser, dict(feats, audio=feats["audio"] + 1.0))
    # Layers 0 and 1 are unimodal, and layer 2 reads the learned bottleneck: image's stream is
    # exactly what it was. Layer 3 reads the bottleneck that audio's copy went into.
    for i in (0, 1, 2):
        assert before["image", i][2].shape == (BATCH, 1 + TOKENS["image"] + 4 * (i == 2), 8)
        assert torch.equal(before["image", i][2], after["image", i][2]), i
    assert not torch.allclose(before["image", 3][2], after["image", 3][2])


def test_mbt_early_fusion_reads_the_bottleneck_from_the_first_layer():
    """fusion_layers = num_layers is the paper's L_f = 0: no unimodal layer."""
    dims = DIMS[2]
    torch.manual_seed(0)
    fuser = BottleneckFuser(dims, num_layers=2, fusion_layers=2, bottlenecks=3, **SMALL).eval()
    feats = features(dims)
    _, before = mbt_calls(fuser, feats)
    _, after = mbt_calls(fuser, dict(feats, audio=feats["audio"] + 1.0))
    for i in (0, 1):
        (joint,), _, _ = before["image", i]
        assert joint.shape == (BATCH, 1 + TOKENS["image"] + 3, 8)
    # layer 0 reads the learned bottleneck; layer 1 reads the mean audio's copy went into
    assert torch.equal(before["image", 0][2], after["image", 0][2])
    assert not torch.allclose(before["image", 1][2], after["image", 1][2])


def test_mbt_fusion_layers_see_only_their_own_tokens_and_the_bottleneck_mean():
    """Eq. (8)-(9): modality m's layer l >= L_f reads [z_m^l || z_fsn^l] with m's own padding
    mask, and z_fsn^{l+1} is the mean of the modalities' updated copies over the present ones."""
    dims = DIMS[3]
    torch.manual_seed(0)
    fuser = BottleneckFuser(dims, num_layers=3, fusion_layers=2, bottlenecks=2, **SMALL).eval()
    feats = features(dims)
    present = {
        "image": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).bool(),
        "text": torch.tensor([True, False, True, False]),
    }
    _, calls = mbt_calls(fuser, feats, present)
    real = {
        "image": present["image"],
        "audio": torch.ones(BATCH, 3, dtype=torch.bool),
        "text": present["text"][:, None].expand(BATCH, 2),
    }
    # the bottleneck each fusion layer reads: learned at L_f, then the mean of copies
    copies = {m: calls[m, 1][2][:, -2:] for m in dims}
    mean_all = (copies["image"] + copies["audio"] + copies["text"]) / 3
    mean_without_text = (copies["image"] + copies["audio"]) / 2
    second = torch.stack([mean_all[0], mean_without_text[1], mean_all[2], mean_without_text[3]])
    first = fuser.bottleneck.expand(BATCH, 2, 8)
    for m in dims:
        length = 1 + TOKENS[m]
        own_keys = torch.cat([torch.ones(BATCH, 1, dtype=torch.bool), real[m]], dim=1)
        (unimodal,), kwargs, _ = calls[m, 0]
        assert unimodal.shape == (BATCH, length, 8)
        assert torch.equal(kwargs["src_key_padding_mask"], ~own_keys)
        for i, bottleneck in ((1, first), (2, second)):
            (joint,), kwargs, _ = calls[m, i]
            assert joint.shape == (BATCH, length + 2, 8)  # no other modality's token
            assert torch.equal(joint[:, :length], calls[m, i - 1][2][:, :length])
            torch.testing.assert_close(joint[:, length:], bottleneck)
            keys = torch.cat([own_keys, torch.ones(BATCH, 2, dtype=torch.bool)], dim=1)
            assert torch.equal(kwargs["src_key_padding_mask"], ~keys)
    # no parameter is shared between the modalities' streams
    ids = [{id(p) for p in fuser.layers[m].parameters()} for m in dims]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_mbt_bottleneck_mean_renormalizes_over_present_modalities():
    copies = torch.tensor([1.0, 2.0, 6.0])[None, :, None, None].expand(4, 3, 1, 2)
    here = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [0, 0, 0]]).bool()
    previous = torch.full((4, 1, 2), -5.0)
    mean = BottleneckFuser.bottleneck_mean(copies, here, previous)
    assert mean[:, 0, 0].tolist() == [3.0, 3.5, 2.0, -5.0]  # none present: kept as it was


def test_mbt_readout_is_the_mean_of_present_modalities_cls_outputs():
    dims = DIMS[3]
    fuser = BottleneckFuser(dims, num_layers=2, fusion_layers=1, **SMALL).eval()
    present = {"audio": torch.tensor([True, False, True, False])}
    out, calls = mbt_calls(fuser, features(dims), present)
    assert fuser.out_dim == 8
    cls = {m: fuser.norm[m](calls[m, 1][2][:, 0]) for m in dims}
    full = (cls["image"] + cls["audio"] + cls["text"]) / 3
    partial = (cls["image"] + cls["text"]) / 2
    torch.testing.assert_close(out, torch.stack([full[0], partial[1], full[2], partial[3]]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_layers": 2, "fusion_layers": 3}, r"fusion_layers \(3\) must be at most num_layers"),
        ({"fusion_layers": 0}, r"^fusion_layers must be a positive integer, got 0$"),
        ({"bottlenecks": 0}, r"^bottlenecks must be a positive integer, got 0$"),
        ({"dim": 10, "heads": 4}, r"dim \(10\) must be divisible by heads \(4\)"),
    ],
)
def test_mbt_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BottleneckFuser(DIMS[2], **kwargs)


def test_mbt_rejects_too_many_tokens_naming_the_modality():
    fuser = BottleneckFuser(DIMS[2], max_tokens=3, **SMALL)
    with pytest.raises(ValueError, match=r"modality 'image' has 4 tokens, more than max_tokens=3"):
        fuser(features(DIMS[2]))


# --- both -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MulTFuser, BottleneckFuser])
def test_a_single_modality_is_refused(cls):
    with pytest.raises(
        ValueError, match=r"needs at least 2 modalities in in_dims, got \['image'\]"
    ):
        cls({"image": 6})


@pytest.mark.parametrize("n_modalities", [2, 3])
@pytest.mark.parametrize(("cls", "kwargs"), FUSERS)
def test_every_parameter_gets_a_gradient(cls, kwargs, n_modalities):
    """With each modality absent from one sample, so the null keys take part too."""
    dims = DIMS[n_modalities]
    fuser = cls(dims, **kwargs)
    feats = features(dims, requires_grad=True)
    present = {m: torch.arange(BATCH) != i for i, m in enumerate(dims)}
    out = fuser(feats, present)
    assert out.shape == (BATCH, fuser.out_dim)
    out.pow(2).sum().backward()
    for name, param in fuser.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for m, x in feats.items():
        assert x.grad.abs().sum() > 0, m


@pytest.mark.parametrize("padded", ["image", "audio"])
@pytest.mark.parametrize(("cls", "kwargs"), FUSERS)
def test_padding_is_the_same_as_truncation(cls, kwargs, padded):
    """Padded tokens are really left out (the mask reaches attention and readout)."""
    dims = DIMS[3]
    fuser = cls(dims, **kwargs).eval()
    feats = features(dims)
    lengths = [TOKENS[padded], 2, 1, 2]
    present = {padded: torch.arange(TOKENS[padded]) < torch.tensor(lengths)[:, None]}
    out = fuser(feats, present)
    for b, length in enumerate(lengths):
        alone = {m: x[b : b + 1] for m, x in feats.items()}
        alone[padded] = alone[padded][:, :length]
        torch.testing.assert_close(out[b], fuser(alone)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("no_grad", [False, True], ids=["grad", "no_grad"])
@pytest.mark.parametrize(("cls", "kwargs"), FUSERS)
def test_absent_modality_has_no_influence_on_any_kernel(cls, kwargs, no_grad):
    """Also under no_grad, where PyTorch's inference fast paths kick in; every modality
    absent from one sample gives a finite output too."""
    dims = DIMS[3]
    fuser = cls(dims, **kwargs).eval()
    feats = features(dims)
    present = {
        "image": torch.tensor([True, False, True, False]),
        "audio": torch.tensor([True, True, False, False]),
        "text": torch.tensor([True, True, True, False]),
    }
    altered = {
        m: torch.where(present[m][:, None, None], x, torch.full_like(x, float("nan")))
        for m, x in feats.items()
    }
    with torch.set_grad_enabled(not no_grad):
        out, out_altered = fuser(feats, present), fuser(altered, present)
        changed = fuser(dict(feats, image=feats["image"] + 1.0), present)
    assert torch.isfinite(out_altered).all()
    torch.testing.assert_close(out, out_altered, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out[0], changed[0]) and not torch.allclose(out[2], changed[2])
