"""Sequence encoders: feature sequences [B, T, D] with padding masks that padding cannot pass."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fusion.encoders.base import apply_freeze
from fusion.encoders.sequence import build_sequence_encoder

CONFIGS = Path(__file__).resolve().parents[2] / "configs/model/encoder/features"
KINDS = ["gru", "transformer"]
LENGTHS = [6, 3, 1, 4]


def padded(lengths: list[int], dim: int = 5, fill: float = float("nan")):
    """Random sequences padded with `fill` to the longest, and their [B, T] mask."""
    steps = max(lengths)
    mask = torch.arange(steps) < torch.tensor(lengths).unsqueeze(1)
    x = torch.randn(len(lengths), steps, dim).masked_fill(~mask.unsqueeze(-1), fill)
    return x, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("pooling", "shape"), [("last", (4, 8)), ("mean", (4, 8)), ("none", (4, 7, 8))]
)
def test_output_shapes(kind, pooling, shape):
    enc = build_sequence_encoder(5, kind=kind, hidden=8, pooling=pooling, max_length=7)
    x, mask = padded(LENGTHS)
    assert enc(x, mask).shape == shape
    assert enc.out_dim == 8 and enc.takes_mask


def test_bidirectional_gru_doubles_the_width():
    enc = build_sequence_encoder(5, hidden=8, bidirectional=True, layers=2)
    assert enc.out_shape == (16,)
    assert enc(*padded(LENGTHS)).shape == (4, 16)


@pytest.mark.parametrize("kind", KINDS)
def test_max_length_cuts_and_pads_token_output(kind):
    enc = build_sequence_encoder(5, kind=kind, hidden=8, pooling="none", max_length=5)
    assert enc.out_shape == (5, 8) and enc.input_shape == (5, 5)
    for lengths in ([7, 2], [3, 1]):
        x, mask = padded(lengths)
        out = enc(x, mask)
        expected = (torch.arange(5) < torch.tensor(lengths).clamp(max=5).unsqueeze(1)).float()
        assert out.shape == (2, 5, 8)
        assert torch.equal(enc.output_mask(x, mask), expected.bool())
        assert torch.equal(out.abs().sum(-1) > 0, expected.bool())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_every_parameter_gets_a_gradient(kind, pooling):
    enc = build_sequence_encoder(
        5,
        kind=kind,
        hidden=8,
        layers=2,
        pooling=pooling,
        dropout=0.1,
        post=[{"type": "linear", "dim": 4}],
    )
    enc(*padded(LENGTHS)).pow(2).sum().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pooling", ["last", "mean", "none"])
def test_padding_has_no_influence(kind, pooling):
    tokens = pooling == "none"
    enc = build_sequence_encoder(
        5,
        kind=kind,
        hidden=8,
        layers=2,
        pooling=pooling,
        bidirectional=kind == "gru",
        max_length=6 if tokens else None,
    ).eval()
    x, mask = padded(LENGTHS, fill=float("nan"))
    with torch.no_grad():
        out = enc(x, mask)
        assert torch.isfinite(out).all()
        # any other padding values give the same output, bit for bit
        assert torch.equal(enc(x.masked_fill(~mask.unsqueeze(-1), 1e6), mask), out)
        # and each sequence alone, unpadded, gives its row
        for i, length in enumerate(LENGTHS):
            alone = enc(x[i : i + 1, :length])
            if tokens:  # padded to max_length inside: compare the real steps
                alone, row = alone[:, :length], out[i : i + 1, :length]
            else:
                row = out[i : i + 1]
            torch.testing.assert_close(alone, row, rtol=0, atol=1e-6)
    if tokens:
        assert (out[~mask] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_sample_masks_and_absent_samples(kind):
    enc = build_sequence_encoder(5, kind=kind, hidden=8, pooling="mean").eval()
    x = torch.randn(3, 4, 5)
    present = torch.tensor([True, False, True])
    with torch.no_grad():
        out = enc(x, present)
        assert torch.equal(out[[0, 2]], enc(x[[0, 2]]))
    assert torch.equal(out[1], torch.zeros(8))
    assert torch.equal(enc.output_mask(x, present), present)
    assert torch.equal(enc.output_mask(x, None), torch.ones(3, dtype=torch.bool))


def test_token_output_mask_is_the_step_mask():
    enc = build_sequence_encoder(5, hidden=8, pooling="none", max_length=6)
    x, mask = padded(LENGTHS)
    assert torch.equal(enc.output_mask(x, mask), mask)
    assert torch.equal(enc.output_mask(x, mask.any(1)), torch.ones(4, 6, dtype=torch.bool))


def test_transformer_ignores_masked_steps_anywhere():
    enc = build_sequence_encoder(5, kind="transformer", hidden=8, pooling="mean").eval()
    x = torch.randn(1, 5, 5)
    mask = torch.tensor([[True, False, True, True, False]])
    with torch.no_grad():
        noisy = x.clone()
        noisy[~mask] = float("nan")
        assert torch.equal(enc(noisy, mask), enc(x.masked_fill(~mask.unsqueeze(-1), 3.0), mask))


def test_gru_needs_real_steps_first():
    enc = build_sequence_encoder(5, hidden=8)
    with pytest.raises(ValueError, match="real steps of each sequence first"):
        enc(torch.randn(1, 3, 5), torch.tensor([[False, True, True]]))


def test_check_input_accepts_any_length_and_names_the_modality():
    enc = build_sequence_encoder(5, hidden=8)
    enc.check_input(torch.zeros(2, 50, 5), "audio")
    with pytest.raises(
        ValueError, match=r"modality 'audio'.*\[batch, steps, 5\], got \[2, 50, 4\]"
    ):
        enc.check_input(torch.zeros(2, 50, 4), "audio")
    with pytest.raises(TypeError, match="modality 'audio': expected a tensor"):
        enc.check_input(["text"], "audio")
    with pytest.raises(ValueError, match=r"mask must be \[2, 3\] or \[2\].*got \[2, 4\]"):
        enc(torch.zeros(2, 3, 5), torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "lstm"}, "kind must be one of"),
        ({"pooling": "max"}, "pooling must be one of"),
        ({"kind": "transformer", "bidirectional": True}, "bidirectional applies to kind='gru'"),
        ({"kind": "transformer", "hidden": 10, "heads": 4}, r"hidden \(10\) must be divisible"),
        ({"max_length": 0}, "max_length must be a positive integer or None"),
        ({"pooling": "none"}, "pooling='none' .* needs max_length"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_settings_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_sequence_encoder(5, **kwargs)


def test_freeze_all_backbone_and_patterns():
    enc = build_sequence_encoder(5, hidden=8, dropout=0.5, freeze="all").train()
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    x = torch.randn(2, 4, 5)
    assert torch.equal(enc(x), enc(x))  # frozen means eval: no dropout

    enc = build_sequence_encoder(
        5, hidden=8, post=[{"type": "linear", "dim": 3}], freeze="backbone"
    )
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"post.0.weight", "post.0.bias"}

    enc = apply_freeze(build_sequence_encoder(5, hidden=8, layers=2), ["backbone.network.rnn.*_l0"])
    frozen = {n for n, p in enc.named_parameters() if not p.requires_grad}
    assert frozen == {
        f"backbone.network.rnn.{w}_l0" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    }


@pytest.mark.parametrize(("name", "out_dim"), [("gru", 128), ("transformer", 128)])
def test_configs_take_input_dim_from_the_data(name, out_dim):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    assert OmegaConf.is_missing(cfg, "input_dim")
    cfg.input_dim = 74
    enc = instantiate(cfg).eval()
    x, mask = padded([7, 2], dim=74)
    assert enc(x, mask).shape == (2, out_dim)
