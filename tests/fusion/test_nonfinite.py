"""Non-finite training never runs on silently: it stops naming stage, epoch and step, or
skips the step when asked; a non-finite epoch is never the best one."""

import logging
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusion.training import fit, load_checkpoint
from fusion.training.distributed import Distributed
from fusion.training.loop import NonFiniteError, nonfinite_entries
from fusion.training.settings import ConfigError, TrainerConfig, check_trainer
from tests.fusion.test_training import model_with_bn, separable_batches

CPU = torch.device("cpu")
STEPS = 6  # training batches per epoch


class Spoiled:
    """Batches re-read every epoch, with `value` written into modality a's inputs at the
    given (epoch, step) pairs (1-based); `step=None` spoils every step of that epoch."""

    def __init__(self, batches, value, at):
        self.batches, self.value, self.at, self.epoch = batches, value, set(at), 0

    def __iter__(self):
        self.epoch += 1
        for step, batch in enumerate(self.batches, start=1):
            if (self.epoch, step) in self.at or (self.epoch, None) in self.at:
                a = batch.inputs["a"].clone()
                a[0, 0] = self.value
                batch = type(batch)(**{**vars(batch), "inputs": {**batch.inputs, "a": a}})
            yield batch


class Dropped:
    """The batches of `separable_batches(STEPS)` without the steps `drop[epoch]`."""

    def __init__(self, drop):
        self.drop, self.epoch = drop, 0

    def __iter__(self):
        self.epoch += 1
        drop = self.drop[self.epoch]
        return iter([b for i, b in enumerate(separable_batches(STEPS), 1) if i not in drop])


def train(train_batches, val_batches=None, epochs=2, lr=1e-2, **kwargs):
    torch.manual_seed(0)
    model = model_with_bn()
    history = []
    result = fit(
        model, train_batches, val_batches or separable_batches(2), epochs=epochs, lr=lr,
        weight_decay=0.0, device=CPU, on_epoch=lambda e, m: history.append(m), **kwargs,
    )  # fmt: skip
    return model, result, history


@pytest.mark.parametrize(
    ("value", "epoch", "step", "found"),
    [
        (float("nan"), 1, 3, "the training loss is nan at epoch 1, step 3"),
        (float("inf"), 1, 1, "the training loss is nan at epoch 1, step 1"),
        (float("-inf"), 2, 5, "the training loss is nan at epoch 2, step 5"),
        # a finite loss (batch norm normalizes it away) but overflowing statistics
        (1e38, 2, 2, "after epoch 2 the weights ['encoders.a.backbone.1.running_var'] hold"),
    ],
)
def test_a_nonfinite_input_stops_the_stage_naming_stage_epoch_and_step(
    tmp_path, value, epoch, step, found
):
    batches = Spoiled(separable_batches(STEPS), value, [(epoch, step)])
    with pytest.raises(NonFiniteError) as err:
        train(batches, epochs=3, desc="pretrain image", state_path=tmp_path / "state.pt")
    message = str(err.value)
    assert message.startswith(f"stage 'pretrain image': {found}")
    assert "check the inputs for" in message.lower()
    if epoch > 1:  # what was written before stays, and it is finite
        state = load_checkpoint(tmp_path / "state.pt")
        assert state["epoch"] == epoch - 1 and not nonfinite_entries(state["model"])
    else:
        assert not (tmp_path / "state.pt").exists()


def test_a_huge_learning_rate_stops_at_the_step_it_breaks_naming_the_rate():
    with pytest.raises(NonFiniteError) as err:
        train(separable_batches(STEPS), lr=1e20, desc="fuse")
    assert str(err.value).startswith("stage 'fuse': the training loss is nan at epoch 1, step 2")
    assert "lower the learning rate (now 1e+20)" in str(err.value)


def test_skip_mode_skips_and_counts_each_epochs_steps_leaving_the_model_untouched(caplog):
    spoiled = Spoiled(separable_batches(STEPS), float("nan"), [(1, 2), (2, 1), (2, 6)])
    with caplog.at_level(logging.WARNING, logger="fusion"):
        model, result, history = train(spoiled, nonfinite="skip", desc="fuse")
    assert [m["train/skipped_steps"] for m in history] == [1, 2]
    assert "stage 'fuse' epoch 1: skipped 1 of 6 training steps with a non-finite loss" in (
        caplog.text
    )
    assert "stage 'fuse' epoch 2: skipped 2 of 6 training steps" in caplog.text
    assert result.finished and not nonfinite_entries(model.state_dict())  # BN stats restored
    # a skipped step changes nothing: the same run without those batches ends the same
    reference, _, _ = train(Dropped({1: {2}, 2: {1, 6}}))
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_skip_mode_still_stops_when_every_step_of_an_epoch_was_skipped():
    spoiled = Spoiled(separable_batches(STEPS), float("nan"), [(2, None)])
    with pytest.raises(NonFiniteError) as err:
        train(spoiled, epochs=3, nonfinite="skip", desc="pretrain audio")
    assert str(err.value).startswith(
        "stage 'pretrain audio': every one of the 6 training steps of epoch 2 had a non-finite loss"
    )


def test_a_nonfinite_validation_epoch_is_never_the_best(caplog):
    val = Spoiled(separable_batches(2), float("nan"), [(1, 1)])
    with caplog.at_level(logging.WARNING, logger="fusion"):
        _, result, history = train(separable_batches(STEPS), val, epochs=2, desc="fuse")
    assert math.isnan(history[0]["val/loss"]) and result.best["epoch"] == 2
    assert "stage 'fuse' epoch 1: validation loss nan" in caplog.text


def test_no_finite_validation_epoch_at_all_is_an_error_not_a_model():
    val = Spoiled(separable_batches(2), float("inf"), [(1, None), (2, None)])
    with pytest.raises(NonFiniteError, match=r"stage 'fuse': no epoch had a finite validation"):
        train(separable_batches(STEPS), val, epochs=2, desc="fuse")


def test_weights_that_turn_nonfinite_are_never_kept_or_saved(tmp_path):
    """A finite loss whose step still leaves an Inf weight (an overflowing gradient does)."""
    model = model_with_bn()
    steps = []

    def spoil(loss):
        steps.append(loss)
        if len(steps) == 2 * STEPS:  # the last step of epoch 2
            with torch.no_grad():
                model.head.mlp[0].bias[0] = float("inf")

    with pytest.raises(NonFiniteError) as err:
        fit(
            model, separable_batches(STEPS), separable_batches(2), epochs=3, lr=1e-2,
            weight_decay=0.0, device=CPU, on_step=spoil, state_path=tmp_path / "state.pt",
            desc="fuse",
        )  # fmt: skip
    assert str(err.value).startswith(
        "stage 'fuse': after epoch 2 the weights ['head.mlp.0.bias'] hold NaN or Inf values"
    )
    state = load_checkpoint(tmp_path / "state.pt")
    assert state["epoch"] == 1 and not nonfinite_entries(state["best_model"])


@pytest.mark.parametrize("value", ["maybe", "STOP", ""])
def test_an_unknown_nonfinite_policy_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError) as err:
        check_trainer(TrainerConfig(nonfinite=value))
    assert str(err.value) == (
        f"config key 'trainer.nonfinite': expected one of ('stop', 'skip'), got '{value}'"
    )
    with pytest.raises(ValueError, match=rf"nonfinite must be one of .*, got '{value}'"):
        train(separable_batches(1), nonfinite=value)


def _worker(rank, port, out):
    """Rank 1 alone sees a NaN at epoch 1, step 2: both ranks must stop (or skip) there."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    try:
        for mode in ("stop", "skip"):
            at = [(1, 2)] if rank == 1 else []
            batches = Spoiled(separable_batches(3, batch=16), float("nan"), at)
            try:
                model, _, history = train(
                    batches, separable_batches(1, batch=8), epochs=1, nonfinite=mode,
                    distributed=Distributed(rank, 2), desc="fuse",
                )  # fmt: skip
                results[mode] = {"model": model.state_dict(), "skipped": history[0].get(
                    "train/skipped_steps")}  # fmt: skip
            except NonFiniteError as err:
                results[mode] = str(err)
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: 5 s on a quiet machine, 20 s on a loaded one
def test_every_ddp_rank_takes_the_same_decision(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, tmp_path), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["stop"] == (
        "stage 'fuse': the training loss is non-finite on another process at epoch 1, step 2. "
        "Check the inputs for NaN/Inf values, lower the learning rate (now 0.01), or skip "
        "such steps with nonfinite='skip' (trainer.nonfinite=skip)"
    )
    assert ranks[1]["stop"].startswith("stage 'fuse': the training loss is nan at epoch 1, step 2")
    assert ranks[0]["skip"]["skipped"] == ranks[1]["skip"]["skipped"] == 1
    for name, value in ranks[0]["skip"]["model"].items():  # still in step
        torch.testing.assert_close(ranks[1]["skip"]["model"][name], value, rtol=0, atol=0)
