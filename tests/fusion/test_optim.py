"""A stage's optimizer and learning-rate schedule from settings: any torch.optim class as a
partial, a linear warmup before any schedule, and every bad spec named before training."""

import math

import pytest
import torch
from torch import nn

from fusion.surgery import param_groups
from fusion.training import fit
from fusion.training.optim import build_optimizer, build_schedule, resolve
from tests.fusion.test_training import model_with_bn, separable_batches

SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9}


def rates(optimizer, scheduler, epochs):
    out = []
    for _ in range(epochs):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_default_is_adamw_with_cosine_decay_over_the_stage():
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(None, param_groups(model, 0.1, 0.01), 0.1, 0.01)
    assert type(optimizer) is torch.optim.AdamW
    lrs = rates(optimizer, build_schedule(optimizer, None, 4), 4)
    assert lrs == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])


def test_default_adamw_is_fused_and_steps_as_the_per_tensor_loop_to_rounding():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(None, param_groups(models[0], 0.01, 0.1), 0.01, 0.1)
    loop = build_optimizer(
        {"_target_": "torch.optim.AdamW", "_partial_": True, "foreach": False},
        param_groups(models[1], 0.01, 0.1),
        0.01,
        0.1,
    )
    assert fused.param_groups[0]["fused"] is True and loop.param_groups[0]["fused"] is None
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(20):
        for model, optimizer in zip(models, (fused, loop), strict=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    pairs = list(zip(models[0].parameters(), models[1].parameters(), strict=True))
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in pairs)  # the kernels do round differently


def test_default_adamw_falls_back_to_the_loop_for_a_parameter_the_kernel_cannot_take():
    meta = nn.Parameter(torch.zeros(3, device="meta"))
    optimizer = build_optimizer(None, [{"params": [meta]}], 0.1, 0.0)
    assert optimizer.param_groups[0]["fused"] is None


def test_warmup_then_cosine_over_the_remaining_epochs():
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(SGD, param_groups(model, 0.1, 0.0), 0.1, 0.0)
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.9
    lrs = rates(optimizer, build_schedule(optimizer, None, 6, warmup_epochs=2), 6)
    cosine = [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert lrs == pytest.approx([0.1 / 3, 0.2 / 3, *cosine])


def test_any_scheduler_follows_the_warmup():
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(None, param_groups(model, 0.1, 0.0), 0.1, 0.0)
    step = {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 2}
    lrs = rates(optimizer, build_schedule(optimizer, step, 6, warmup_epochs=1), 6)
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.01, 0.01, 0.001])


def test_param_groups_keep_their_rates_and_decays_under_any_optimizer():
    model = model_with_bn()
    groups = param_groups(model, 0.1, 0.01, lr_mult={"encoders.a.*": 0.5})
    optimizer = build_optimizer(SGD, groups, 0.1, 0.01)
    pairs = {(g["lr"], g["weight_decay"]) for g in optimizer.param_groups}
    assert pairs == {(0.05, 0.0), (0.05, 0.01), (0.1, 0.0), (0.1, 0.01)}


def test_fit_trains_with_a_configured_optimizer_and_schedule():
    torch.manual_seed(0)
    model = model_with_bn()
    history = []
    fit(
        model, separable_batches(), separable_batches(2), epochs=4, lr=0.05, weight_decay=0.0,
        device=torch.device("cpu"), optimizer_spec=SGD, warmup_epochs=1,
        on_epoch=lambda e, m: history.append(m),
    )  # fmt: skip
    assert history[-1]["val/accuracy"] > 0.9


@pytest.mark.parametrize(
    ("spec", "kind", "message"),
    [
        ({"_target_": "torch.optim.SDG"}, "optimizer", "_target_: expected a class of torch.optim, got 'torch.optim.SDG'; did you mean ['torch.optim.SGD', 'torch.optim.ASGD']?"),
        ({"_target_": "os.system"}, "optimizer", "_target_: expected a class of torch.optim, got 'os.system'"),
        ({"_target_": "torch.optim.Optimizer"}, "optimizer", "_target_: expected a class of torch.optim, got 'torch.optim.Optimizer'"),
        ({"_target_": "torch.optim.SGD", "momentun": 0.9}, "optimizer", "momentun: torch.optim.SGD takes no such argument; it takes ['momentum', 'dampening', 'nesterov', 'maximize', 'foreach', 'differentiable', 'fused']; did you mean ['momentum']?"),
        ({"_target_": "torch.optim.SGD", "lr": 0.1}, "optimizer", "lr: supplied by trainer.<stage>.lr / weight_decay, not by the optimizer spec"),
        ({"_target_": "torch.optim.SGD", "_partial_": False}, "optimizer", "_partial_: expected true (the stage supplies params), got False"),
        ({"_target_": "torch.optim.lr_scheduler.StepLr"}, "scheduler", "_target_: expected a class of torch.optim.lr_scheduler, got 'torch.optim.lr_scheduler.StepLr'; did you mean ['torch.optim.lr_scheduler.StepLR'"),
        ({"_target_": "torch.optim.lr_scheduler.StepLR", "optimizer": None}, "scheduler", "optimizer: supplied by the stage, not by the scheduler spec"),
    ],
)  # fmt: skip
def test_a_bad_spec_is_named_by_its_key(spec, kind, message):
    with pytest.raises(ValueError) as err:
        resolve(spec, kind)
    assert str(err.value).startswith(message)


def test_an_optimizer_without_weight_decay_is_refused_when_decay_is_asked():
    model = nn.Linear(2, 2)
    rprop = {"_target_": "torch.optim.Rprop"}
    with pytest.raises(ValueError, match=r"^_target_: torch.optim.Rprop takes no weight_decay"):
        build_optimizer(rprop, param_groups(model, 0.1, 0.01), 0.1, 0.01)
    assert (
        type(build_optimizer(rprop, param_groups(model, 0.1, 0.0), 0.1, 0.0)) is torch.optim.Rprop
    )


def test_resumed_epochs_can_grow_only_under_the_stretchable_cosine(tmp_path):
    from fusion.training import load_checkpoint

    def run(epochs, **kwargs):
        torch.manual_seed(0)
        return fit(
            model_with_bn(), separable_batches(2), separable_batches(1), epochs=epochs, lr=1e-2,
            weight_decay=0.0, device=torch.device("cpu"), warmup_epochs=1, **kwargs,
        )  # fmt: skip

    run(3, state_path=tmp_path / "state.pt", stop_after=2)
    with pytest.raises(ValueError, match=r"epochs can be raised on resume \(3 -> 5\) only with"):
        run(5, resume=load_checkpoint(tmp_path / "state.pt"))
