import pytest
import torch

from fusion.heads import (
    ClassificationHead,
    ConditionalHead,
    MixtureOfExpertsHead,
    MultiTaskHead,
)
from tests.fusion.test_fusers import CONFIGS, from_config, integer_arguments


@pytest.mark.parametrize("hidden", [(), (16,), (16, 8)])
def test_head_shapes_and_gradients(hidden):
    head = ClassificationHead(12, 10, hidden=hidden, dropout=0.1)
    out = head(torch.randn(4, 12))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="activation must be one of"):
        ClassificationHead(4, 2, hidden=(3,), activation="swishy")


def test_classification_head_names_bad_sizes():
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        ClassificationHead(4, 0)
    with pytest.raises(ValueError, match="every size in hidden must be a positive integer"):
        ClassificationHead(4, 2, hidden=(3, -1))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        ClassificationHead(4, 2, dropout=1.5)


def assert_every_parameter_trains(module):
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# --- MultiTaskHead


@pytest.mark.parametrize(("shared", "hidden"), [((), ()), ((16,), (8,))])
def test_multitask_shapes_and_gradients(shared, hidden):
    head = MultiTaskHead(12, {"digit": 10, "speaker": 3}, hidden=hidden, shared=shared)
    out = head(torch.randn(4, 12))
    assert list(out) == head.tasks == ["digit", "speaker"]
    assert out["digit"].shape == (4, 10) and out["speaker"].shape == (4, 3)
    sum(logits.pow(2).sum() for logits in out.values()).backward()
    assert_every_parameter_trains(head)


def test_multitask_loss_weights_default_to_one():
    head = MultiTaskHead(4, {"a": 2, "b": 3})
    assert head.loss_weights == {"a": 1.0, "b": 1.0}
    assert MultiTaskHead(4, {"a": 2, "b": 3}, loss_weights={"b": 0.5}).loss_weights == {
        "a": 1.0,
        "b": 0.5,
    }


def test_multitask_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"loss_weights names unknown tasks \['c'\]"):
        MultiTaskHead(4, {"a": 2, "b": 3}, loss_weights={"c": 1.0})
    with pytest.raises(ValueError, match="loss_weights must be non-negative"):
        MultiTaskHead(4, {"a": 2}, loss_weights={"a": -1.0})
    with pytest.raises(ValueError, match="num_classes must map each task name"):
        MultiTaskHead(4, 3)
    with pytest.raises(ValueError, match="task names in num_classes"):
        MultiTaskHead(4, {"a.b": 3})
    with pytest.raises(ValueError, match="every size in shared"):
        MultiTaskHead(4, {"a": 3}, shared=(0,))


# --- ConditionalHead


def test_conditional_shapes_and_gradients():
    head = ConditionalHead(12, 5, num_conditions=3, hidden=(8,))
    out = head(torch.randn(6, 12), torch.tensor([0, 1, 2, 2, 1, 0]))
    assert out.shape == (6, 5)
    out.pow(2).sum().backward()
    assert_every_parameter_trains(head)


def test_absent_condition_gets_a_zero_gradient_not_none():
    """DDP without find_unused_parameters needs every parameter in every backward pass."""
    head = ConditionalHead(4, 2, num_conditions=3)
    head(torch.randn(3, 4), torch.tensor([0, 0, 2])).sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    assert all(p.grad.abs().sum() == 0 for p in head.heads[1].parameters())


def test_conditional_matches_a_per_sample_loop():
    """Not bit-exact: batched matmuls reduce in another order than one-row ones (MKL gemm vs
    gemv), about 1 ulp apart, so compare in float64 where a wrong route is off by O(1)."""
    torch.manual_seed(0)
    head = ConditionalHead(12, 5, num_conditions=3, hidden=(16,), dropout=0.5).double().eval()
    x = torch.randn(9, 12, dtype=torch.float64)
    condition = torch.tensor([2, 0, 1, 1, 2, 0, 0, 2, 1])
    expected = torch.cat([head.heads[c](x[i : i + 1]) for i, c in enumerate(condition.tolist())])
    torch.testing.assert_close(head(x, condition), expected, rtol=0, atol=1e-12)


def test_conditional_condition_errors():
    head = ConditionalHead(4, 2, num_conditions=2)
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="ConditionalHead needs a condition"):
        head(x)
    with pytest.raises(
        ValueError, match=r"condition values \[-1, 5\] are outside \[0, 2\).*2 heads"
    ):
        head(x, torch.tensor([5, 0, -1]))
    with pytest.raises(ValueError, match=r"condition must have shape \[3\]"):
        head(x, torch.tensor([[0, 1, 0]]))
    with pytest.raises(ValueError, match="condition must hold integer ids"):
        head(x, torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="one int shared by every condition"):
        ConditionalHead(4, {"a": 2}, num_conditions=2)
    with pytest.raises(ValueError, match="num_conditions must be a positive integer"):
        ConditionalHead(4, 2, num_conditions=0)


# --- MixtureOfExpertsHead


def test_moe_shapes_gradients_and_gate():
    head = MixtureOfExpertsHead(12, 5, num_experts=3, hidden=(8,), temperature=0.5)
    out = head(torch.randn(4, 12))
    assert out.shape == (4, 5)
    assert head.last_gate.shape == (4, 3) and not head.last_gate.requires_grad
    torch.testing.assert_close(head.last_gate.sum(dim=1), torch.ones(4))
    out.pow(2).sum().backward()
    assert_every_parameter_trains(head)


def test_moe_with_a_one_hot_gate_is_that_expert():
    head = MixtureOfExpertsHead(6, 3, num_experts=4, hidden=(8,)).eval()
    with torch.no_grad():
        head.gate.weight.zero_()
        head.gate.bias.copy_(torch.tensor([-torch.inf, -torch.inf, 0.0, -torch.inf]))
    x = torch.randn(5, 6)
    assert torch.equal(head(x), head.experts[2](x))
    assert torch.equal(head.last_gate, torch.tensor([0.0, 0.0, 1.0, 0.0]).expand(5, 4))


def test_moe_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        MixtureOfExpertsHead(4, 2, num_experts=0)
    with pytest.raises(ValueError, match=r"temperature must be a positive number, got 0.0"):
        MixtureOfExpertsHead(4, 2, temperature=0.0)


# --- every configured head (configs/model/head/*.yaml) -------------------------------------

HEAD_CONFIGS = sorted((CONFIGS / "head").glob("*.yaml"))


def configured_head(path, **overrides):
    cls, kwargs = from_config(path)
    num_classes = {"a": 2, "b": 3} if cls is MultiTaskHead else 3
    return cls(**{"in_dim": 8, "num_classes": num_classes, **kwargs, **overrides})


@pytest.mark.parametrize("value", [0, -3, 2.5, "8", True])
@pytest.mark.parametrize(
    ("config", "argument"),
    [
        pytest.param(path, name, id=f"{path.stem}-{name}")
        for path in HEAD_CONFIGS
        for name in integer_arguments(from_config(path)[0])
    ],
)
def test_every_size_argument_is_checked_naming_it(config, argument, value):
    with pytest.raises(ValueError, match=rf"{argument} must be a positive integer, got {value!r}$"):
        configured_head(config, **{argument: value})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.0, r"dropout must be in \[0, 1\), got 1.0"),
        ("0.2", r"dropout must be in \[0, 1\), got '0.2'"),
        (
            [0.1, 0.2],
            r"dropout has 2 rates \[0.1, 0.2\], but (hidden|shared \+ hidden) has 1 layer\(s\)",
        ),
        ([-0.5], r"dropout\[0\] must be in \[0, 1\), got -0.5"),
    ],
)
@pytest.mark.parametrize("config", HEAD_CONFIGS, ids=lambda p: p.stem)
def test_every_dropout_is_checked_naming_it(config, value, message):
    with pytest.raises(ValueError, match=message):
        configured_head(config, dropout=value)


@pytest.mark.parametrize(("argument", "value"), [("hidden", 256), ("hidden", "256")])
@pytest.mark.parametrize("config", HEAD_CONFIGS, ids=lambda p: p.stem)
def test_layer_sizes_must_be_a_list(config, argument, value):
    with pytest.raises(
        ValueError, match=rf"hidden must be a list of layer sizes, e.g. \[256\], got {value!r}"
    ):
        configured_head(config, **{argument: value})


@pytest.mark.parametrize("shape", [(4, 12), (4, 2, 8)])
@pytest.mark.parametrize("config", HEAD_CONFIGS, ids=lambda p: p.stem)
def test_fused_features_of_another_shape_are_named(config, shape):
    head = configured_head(config)
    condition = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError) as caught:
        head(torch.randn(*shape), condition)
    assert str(caught.value) == f"fused must be [batch, 8], got {list(shape)}"


def dropout_rates(module):
    return [m.p for m in module.modules() if isinstance(m, torch.nn.Dropout)]


def test_dropout_can_be_given_per_hidden_layer():
    head = ClassificationHead(8, 3, hidden=(16, 8), dropout=[0.1, 0.3])
    assert dropout_rates(head) == [0.1, 0.3]
    assert dropout_rates(ClassificationHead(8, 3, hidden=(16, 8), dropout=0.2)) == [0.2, 0.2]
    moe = MixtureOfExpertsHead(8, 3, num_experts=2, hidden=(16, 8), dropout=[0.1, 0.3])
    assert dropout_rates(moe) == [0.1, 0.3] * 2


def test_multitask_dropout_list_covers_the_trunk_then_each_branch():
    head = MultiTaskHead(8, {"a": 2, "b": 3}, shared=(16,), hidden=(8, 4), dropout=[0.1, 0.2, 0.3])
    assert dropout_rates(head.trunk) == [0.1]
    assert dropout_rates(head.heads["a"]) == dropout_rates(head.heads["b"]) == [0.2, 0.3]
    with pytest.raises(
        ValueError, match=r"dropout has 2 rates \[0.1, 0.2\], but shared \+ hidden has 3 layer\(s\)"
    ):
        MultiTaskHead(8, {"a": 2}, shared=(16,), hidden=(8, 4), dropout=[0.1, 0.2])


def test_conditional_head_takes_a_head_spec_per_condition():
    head = ConditionalHead(
        8,
        3,
        num_conditions=3,
        hidden=(16,),
        dropout=0.2,
        per_condition=[{}, {"hidden": [4, 4], "dropout": [0.0, 0.5]}, {"activation": "tanh"}],
    )
    sizes = [
        [m.out_features for m in h.modules() if isinstance(m, torch.nn.Linear)] for h in head.heads
    ]
    assert sizes == [[16, 3], [4, 4, 3], [16, 3]]
    assert [dropout_rates(h) for h in head.heads] == [[0.2], [0.0, 0.5], [0.2]]
    assert isinstance(head.heads[2].mlp[1], torch.nn.Tanh)
    out = head(torch.randn(6, 8), torch.tensor([0, 1, 2, 2, 1, 0]))
    out.pow(2).sum().backward()
    assert_every_parameter_trains(head)


@pytest.mark.parametrize(
    ("per_condition", "message"),
    [
        ([{}], r"per_condition has 1 head specs, but num_conditions is 2"),
        ({"hidden": [4]}, r"per_condition must be a list of 2 mappings .*got \{'hidden': \[4\]\}"),
        ([{}, [4]], r"per_condition\[1\] must be a mapping of head arguments .*got \[4\]"),
        (
            [{}, {"width": 4}],
            r"per_condition\[1\] has unknown keys \['width'\]; expected some of \['activation', 'dropout', 'hidden'\]",
        ),
        (
            [{"hidden": [0]}, {}],
            r"condition 0's head: every size in hidden must be a positive integer, got 0",
        ),
        (
            [{}, {"activation": "swish"}],
            r"condition 1's head: activation must be one of .*got 'swish'",
        ),
    ],
)
def test_bad_per_condition_specs_are_named(per_condition, message):
    with pytest.raises(ValueError, match=message):
        ConditionalHead(8, 3, num_conditions=2, per_condition=per_condition)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan"), "1"])
def test_moe_temperature_must_be_a_positive_number(value):
    with pytest.raises(ValueError, match=rf"temperature must be a positive number, got {value!r}"):
        MixtureOfExpertsHead(4, 2, temperature=value)


@pytest.mark.parametrize("value", [-1.0, float("nan"), "1"])
def test_loss_weights_must_be_non_negative_numbers(value):
    with pytest.raises(ValueError, match=r"loss_weights must be non-negative numbers, got \{'a': "):
        MultiTaskHead(4, {"a": 2}, loss_weights={"a": value})


def test_configured_heads_keep_working_with_one_dropout():
    for path in HEAD_CONFIGS:
        head = configured_head(path)
        out = head(torch.randn(4, 8), torch.tensor([0, 1, 0, 1]))
        assert all(o.shape[0] == 4 for o in (out.values() if isinstance(out, dict) else [out]))
