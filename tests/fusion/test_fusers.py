import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from fusion.fusers.film import FiLMFuser
from fusion.fusers.simple import (
    AttentionFuser,
    ConcatFuser,
    GatedFuser,
    MeanFuser,
    SumFuser,
)

DIMS = {
    2: {"image": 6, "audio": 4},
    3: {"image": 6, "audio": 4, "text": 5},
}
FUSERS = [
    pytest.param(ConcatFuser, {}, id="concat"),
    pytest.param(ConcatFuser, {"proj_dim": 7}, id="concat-proj"),
    pytest.param(GatedFuser, {"dim": 8}, id="gated"),
    pytest.param(SumFuser, {"dim": 8}, id="sum"),
    pytest.param(MeanFuser, {"dim": 8}, id="mean"),
    pytest.param(AttentionFuser, {"dim": 8, "hidden": 3}, id="attention"),
    # The contract tests alter "audio": as conditioner, then as a modulated modality.
    pytest.param(FiLMFuser, {"conditioner": "audio", "dim": 8}, id="film-audio"),
    pytest.param(FiLMFuser, {"conditioner": "image", "dim": 8}, id="film-image"),
    pytest.param(FiLMFuser, {"conditioner": "audio", "dim": None}, id="film-unprojected"),
]


def features(dims, batch=5, tokens=None):
    shape = (batch,) if tokens is None else (batch, tokens)
    return {m: torch.randn(*shape, d, requires_grad=True) for m, d in dims.items()}


def only(dims, modality, batch=3):
    return {m: torch.full((batch,), m == modality) for m in dims}


@pytest.mark.parametrize("n_modalities", [2, 3])
@pytest.mark.parametrize(("cls", "kwargs"), FUSERS)
def test_output_shape(cls, kwargs, n_modalities):
    fuser = cls(DIMS[n_modalities], **kwargs)
    out = fuser(features(DIMS[n_modalities]))
    assert out.shape == (5, fuser.out_dim)


@pytest.mark.parametrize(("cls", "kwargs"), FUSERS)
def test_token_inputs_ignore_padding(cls, kwargs):
    dims = DIMS[3]
    fuser = cls(dims, **kwargs).eval()
    feats = features(dims, batch=2, tokens=4)
    present = {m: torch.ones(2, 4, dtype=torch.bool) for m in dims}
    present["audio"][:, 2:] = False  # the last two audio tokens are padding
    present["text"] = torch.tensor([True, False])  # [B] masks work for tokens too
    out = fuser(feats, present)
    assert out.shape == (2, fuser.out_dim)
    padded = feats["audio"].detach().clone()
    padded[:, 2:] += 100
    assert torch.allclose(fuser(dict(feats, audio=padded), present), out)


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


@pytest.mark.parametrize(("cls", "kwargs"), FUSERS)
def test_all_absent_gives_finite_output(cls, kwargs):
    fuser = cls(DIMS[2], **kwargs)
    none = {m: torch.zeros(2, dtype=torch.bool) for m in DIMS[2]}
    out = fuser(features(DIMS[2], batch=2), none)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("cls", "kwargs"), FUSERS)
def test_wrong_feature_size_names_the_modality(cls, kwargs):
    fuser = cls(DIMS[2], **kwargs)
    with pytest.raises(ValueError, match=r"modality 'audio': fuser expects features \[batch, 4\]"):
        fuser({"image": torch.randn(2, 6), "audio": torch.randn(2, 3)})
    with pytest.raises(KeyError, match="fuser expects modality 'audio'"):
        fuser({"image": torch.randn(2, 6)})


@pytest.mark.parametrize(("cls", "kwargs"), FUSERS)
def test_unknown_modality_in_present_is_named(cls, kwargs):
    fuser = cls(DIMS[2], **kwargs)
    with pytest.raises(KeyError, match=r"\['text'\]"):
        fuser(features(DIMS[2], batch=2), {"text": torch.ones(2, dtype=torch.bool)})


@pytest.mark.parametrize(
    ("cls", "kwargs", "argument"),
    [
        (SumFuser, {"dim": 0}, "dim"),
        (MeanFuser, {"dropout": 1.0}, "dropout"),
        (AttentionFuser, {"hidden": -1}, "hidden"),
        (AttentionFuser, {"dim": 2.5}, "dim"),
        (FiLMFuser, {"conditioner": "audio", "dim": 0}, "dim"),
        (FiLMFuser, {"conditioner": "text"}, r"conditioner.*\['image', 'audio'\].*'text'"),
    ],
)
def test_bad_constructor_argument_is_named(cls, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        cls(DIMS[2], **kwargs)


def test_gated_weights_renormalize_over_present_modalities():
    dims = DIMS[2]
    fuser = GatedFuser(dims, dim=8).eval()
    feats = features(dims, batch=3)
    expected = torch.tanh(fuser.proj["image"](feats["image"]))
    assert torch.allclose(fuser(feats, only(dims, "image")), expected, atol=1e-6)


def test_sum_and_mean_pool_over_present_modalities():
    dims = DIMS[3]
    sum_fuser, mean_fuser = SumFuser(dims, dim=8), MeanFuser(dims, dim=8)
    mean_fuser.load_state_dict(sum_fuser.state_dict())
    feats = features(dims, batch=3)
    projected = {m: sum_fuser.proj[m](x) for m, x in feats.items()}
    present = {m: torch.ones(3, dtype=torch.bool) for m in dims}
    present["text"] = torch.tensor([True, False, False])
    present["audio"] = torch.tensor([True, True, False])
    summed = sum_fuser(feats, present)
    assert torch.allclose(summed[0], sum(p[0] for p in projected.values()), atol=1e-6)
    assert torch.allclose(summed[1], projected["image"][1] + projected["audio"][1], atol=1e-6)
    assert torch.allclose(summed[2], projected["image"][2], atol=1e-6)
    means = mean_fuser(feats, present)
    assert torch.allclose(means, summed / torch.tensor([[3.0], [2.0], [1.0]]), atol=1e-6)
    none = {m: torch.zeros(3, dtype=torch.bool) for m in dims}
    assert torch.equal(mean_fuser(feats, none), torch.zeros(3, 8))


def test_attention_weights_renormalize_over_present_modalities():
    dims = DIMS[3]
    fuser = AttentionFuser(dims, dim=8, hidden=4).eval()
    feats = features(dims, batch=3)
    fuser(feats)
    assert fuser.last_weights.shape == (3, 3) and not fuser.last_weights.requires_grad
    assert torch.allclose(fuser.last_weights.sum(dim=1), torch.ones(3))
    out = fuser(feats, only(dims, "audio"))
    assert torch.equal(fuser.last_weights, torch.tensor([[0.0, 1.0, 0.0]] * 3))
    assert torch.allclose(out, fuser.proj["audio"](feats["audio"]), atol=1e-6)
    out = fuser(feats, {m: torch.zeros(3, dtype=torch.bool) for m in dims})
    assert torch.equal(fuser.last_weights, torch.zeros(3, 3))
    assert torch.equal(out, torch.zeros(3, 8))


def test_film_is_the_identity_without_a_conditioner():
    dims = DIMS[3]
    fuser = FiLMFuser(dims, conditioner="audio", dim=8)
    assert fuser.out_dim == 16
    feats = features(dims, batch=3)
    unmodulated = torch.cat([fuser.proj[m](feats[m]) for m in ("image", "text")], dim=1)
    present = {"audio": torch.zeros(3, dtype=torch.bool)}
    assert torch.allclose(fuser(feats, present), unmodulated, atol=1e-6)
    # gamma = 1 + linear(c) with a zero bias: a zero conditioner leaves features as they are.
    assert torch.allclose(fuser(dict(feats, audio=torch.zeros(3, 4))), unmodulated, atol=1e-6)


def test_film_drops_an_absent_modulated_modality_and_keeps_sizes_unprojected():
    dims = DIMS[3]
    fuser = FiLMFuser(dims, conditioner="audio", dim=None)
    assert fuser.out_dim == dims["image"] + dims["text"]
    out = fuser(features(dims, batch=3), {"text": torch.zeros(3, dtype=torch.bool)})
    assert torch.equal(out[:, dims["image"] :], torch.zeros(3, dims["text"]))
    assert out[:, : dims["image"]].abs().sum() > 0


def test_film_needs_two_modalities():
    with pytest.raises(ValueError, match="at least two modalities"):
        FiLMFuser({"audio": 4}, conditioner="audio")


# --- every configured fuser (configs/model/fusion/*.yaml) ---------------------------------

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
FUSION_CONFIGS = sorted((CONFIGS / "fusion").glob("*.yaml"))
POISONS = [float("nan"), float("inf"), float("-inf"), 1e30]


def from_config(path: Path) -> tuple[type, dict]:
    """The class a component config builds, and its configured arguments."""
    config = OmegaConf.to_container(OmegaConf.load(path))
    cls = get_class(config.pop("_target_"))
    config.pop("_partial_", None)
    return cls, config


def configured_fuser(path: Path, dims: dict[str, int], **overrides):
    cls, kwargs = from_config(path)
    needs = {"num_classes": 3} if getattr(cls, "produces_logits", False) else {}
    return cls(dims, **{**kwargs, **needs, **overrides})


def integer_arguments(cls: type, skip: tuple[str, ...] = ()) -> list[str]:
    """Constructor arguments annotated as an int (or int | None): sizes and counts."""
    annotations = ("int", "int | None")
    return [
        name
        for name, p in inspect.signature(cls).parameters.items()
        if p.annotation in annotations and name not in skip
    ]


def masked_inputs(dims: dict[str, int], tokens: bool, batch: int = 4, steps: int = 3):
    """Features and masks where every modality has masked slots: whole samples absent and,
    for tokens, padded steps (a [B, T] mask) or an absent sample under a [B] mask."""
    shape = (batch, steps) if tokens else (batch,)
    feats = {m: torch.randn(*shape, d) for m, d in dims.items()}
    present = {m: torch.ones(*shape, dtype=torch.bool) for m in dims}
    for i, m in enumerate(dims):
        present[m][(i + 1) % batch] = False  # a different absent sample per modality
    if tokens:
        present["image"][:, -1] = False  # padding after two real steps
        present["audio"] = present["audio"].all(dim=1)  # a [B] mask on token inputs
    return feats, present


def expand(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return mask.reshape(*mask.shape, *[1] * (x.dim() - mask.dim())).expand_as(x)


@pytest.mark.parametrize("tokens", [False, True], ids=["vectors", "tokens"])
@pytest.mark.parametrize("n_modalities", [2, 3])
@pytest.mark.parametrize("config", FUSION_CONFIGS, ids=lambda p: p.stem)
def test_every_configured_fuser_gives_out_dim_and_trains_every_parameter(
    config, n_modalities, tokens
):
    """Shapes for 2 and 3 modalities, vectors and tokens, and a nonzero gradient for every
    parameter and every input (some samples lack a modality, so null tokens train too)."""
    dims = DIMS[n_modalities]
    torch.manual_seed(0)
    fuser = configured_fuser(config, dims).eval()
    feats, present = masked_inputs(dims, tokens)
    feats = {m: x.requires_grad_() for m, x in feats.items()}
    out = fuser(feats, present)
    assert out.shape == (4, fuser.out_dim)
    # Not out.pow(2).sum(): an L2-normalized output has a constant norm.
    (out * torch.randn_like(out)).sum().backward()
    for name, param in fuser.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for m, x in feats.items():
        assert x.grad.abs().sum() > 0, m


@pytest.mark.parametrize("tokens", [False, True], ids=["vectors", "tokens"])
@pytest.mark.parametrize("n_modalities", [2, 3])
@pytest.mark.parametrize("config", FUSION_CONFIGS, ids=lambda p: p.stem)
def test_masked_values_have_no_influence_whatever_they_hold(config, n_modalities, tokens):
    """NaN, +-Inf or 1e30 in an absent sample or a padded token: the same output as zeros
    there, and finite gradients that are exactly zero at the masked positions."""
    dims = DIMS[n_modalities]
    torch.manual_seed(0)
    fuser = configured_fuser(config, dims).eval()
    feats, present = masked_inputs(dims, tokens)
    zeroed = {m: x.masked_fill(~expand(present[m], x), 0.0) for m, x in feats.items()}
    expected = fuser(zeroed, present)
    assert torch.isfinite(expected).all()
    for value in POISONS:
        fuser.zero_grad()
        poisoned = {
            m: x.masked_fill(~expand(present[m], x), value).requires_grad_()
            for m, x in feats.items()
        }
        out = fuser(poisoned, present)
        torch.testing.assert_close(out, expected, rtol=0, atol=0, msg=f"value {value}")
        out.pow(2).sum().backward()
        for m, x in poisoned.items():
            assert torch.isfinite(x.grad).all(), (value, m)
            assert not x.grad[~expand(present[m], x)].any(), (value, m)
        for name, param in fuser.named_parameters():
            assert param.grad is None or torch.isfinite(param.grad).all(), (value, name)


@pytest.mark.parametrize("value", [0, -3, 2.5, "8", True])
@pytest.mark.parametrize(
    ("config", "argument"),
    [
        pytest.param(path, name, id=f"{path.stem}-{name}")
        for path in FUSION_CONFIGS
        for name in integer_arguments(from_config(path)[0])
    ],
)
def test_every_size_argument_is_checked_naming_it(config, argument, value):
    with pytest.raises(
        ValueError, match=rf"^{argument} must be a positive integer.*, got {value!r}$"
    ):
        configured_fuser(config, DIMS[2], **{argument: value})


@pytest.mark.parametrize("value", [-0.1, 1.0, "0.1", None])
@pytest.mark.parametrize(
    "config",
    [p for p in FUSION_CONFIGS if "dropout" in from_config(p)[1]],
    ids=lambda p: p.stem,
)
def test_every_dropout_is_checked_naming_it(config, value):
    with pytest.raises(ValueError, match=rf"^dropout must be in \[0, 1\), got {value!r}$"):
        configured_fuser(config, DIMS[2], dropout=value)


@pytest.mark.parametrize("value", [0, -4, 2.5, "6"])
def test_in_dims_are_checked_naming_the_modality(value):
    for config in FUSION_CONFIGS:
        with pytest.raises(ValueError, match=rf"in_dims\['audio'\] must be .*, got {value!r}"):
            configured_fuser(config, {"image": 6, "audio": value})


@pytest.mark.parametrize(
    ("in_dims", "message"),
    [
        ([4, 5], r"^in_dims must be a dict \{modality: feature size\}, got list \[4, 5\]$"),
        ((4,), r"^in_dims must be a dict \{modality: feature size\}, got tuple \(4,\)$"),
        (4, r"^in_dims must be a dict \{modality: feature size\}, got int 4$"),
        ({0: 4, "audio": 5}, r"keyed by modality names \(strings\), got keys \[0\]$"),
    ],
    ids=["list", "tuple", "int", "int-key"],
)
def test_in_dims_that_is_not_a_dict_is_named(in_dims, message):
    for config in FUSION_CONFIGS:
        with pytest.raises(ValueError, match=message):
            configured_fuser(config, in_dims)


def test_features_of_another_dtype_are_fine_under_autocast():
    fuser = configured_fuser(CONFIGS / "fusion" / "gated.yaml", DIMS[2])
    feats = {m: x.bfloat16() for m, x in features(DIMS[2], batch=2).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fuser(feats).shape == (2, fuser.out_dim)


def test_a_fuser_in_float64_takes_float64_features():
    fuser = configured_fuser(CONFIGS / "fusion" / "gated.yaml", DIMS[2]).double()
    feats = {m: x.double() for m, x in features(DIMS[2], batch=2).items()}
    assert fuser(feats).dtype == torch.float64


def bad_batch(case: str, dims: dict[str, int]):
    """Features and masks that break the contract in one way (see the parametrize ids)."""
    feats = {m: torch.randn(3, d) for m, d in dims.items()}
    present = {m: torch.ones(3, dtype=torch.bool) for m in dims}
    if case == "float-mask":
        present["audio"] = torch.tensor([1.0, 0.5, 0.0])
    elif case == "int-mask":
        present["audio"] = torch.tensor([1, 2, 0])
    elif case == "batch-sizes":
        feats["audio"] = torch.randn(2, dims["audio"])
    elif case == "integer-features":
        feats["audio"] = torch.ones(3, dims["audio"], dtype=torch.long)
    elif case == "mask-shape":
        present["audio"] = torch.ones(2, dtype=torch.bool)
    elif case == "float64-features":
        feats["audio"] = feats["audio"].double()
    return feats, present


BAD_BATCHES = {
    "float-mask": r"modality 'audio': present mask must be a bool tensor, got torch.float32",
    "int-mask": r"modality 'audio': present mask must be a bool tensor, got torch.int64",
    "batch-sizes": r"modality 'audio' has a batch of 2 samples, modality 'image' has 3",
    "integer-features": r"modality 'audio': fuser expects floating-point features, got torch.int64",
    "mask-shape": r"modality 'audio': present mask has shape \[2\], expected \[3\] or \[3, 1\]",
    # with parameters: theirs; without (concat): the first modality's
    "float64-features": r"modality 'audio': fuser expects torch.float32 features \((the dtype "
    r"of its parameters|those of modality 'image')\), got torch.float64; convert them with "
    r"x.to\(torch.float32\)",
}


@pytest.mark.parametrize("config", FUSION_CONFIGS, ids=lambda p: p.stem)
def test_features_of_a_modality_the_fuser_does_not_fuse_are_named(config):
    fuser = configured_fuser(config, DIMS[2])
    feats, present = bad_batch("none", DIMS[2])
    with pytest.raises(KeyError, match=r"features names modalities \['text'\] that this fuser"):
        fuser({**feats, "text": torch.randn(3, 5)}, present)


@pytest.mark.parametrize("case", BAD_BATCHES)
@pytest.mark.parametrize("config", FUSION_CONFIGS, ids=lambda p: p.stem)
def test_bad_features_and_masks_are_named(config, case):
    fuser = configured_fuser(config, DIMS[2])
    with pytest.raises(ValueError, match=BAD_BATCHES[case]):
        fuser(*bad_batch(case, DIMS[2]))
