import pytest
import torch
from torch import nn

from fusion.batch import Batch
from fusion.encoders.base import Encoder
from fusion.fusers import GatedFuser
from fusion.heads import ClassificationHead
from fusion.model import MultimodalModel
from fusion.training import evaluate, fit
from fusion.training.loop import constant_state


def separable_batches(n_batches=6, batch=32):
    """Two modalities; the label is readable from either one."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        y = torch.randint(0, 3, (batch,), generator=generator)
        a = nn.functional.one_hot(y, 3).float() + 0.1 * torch.randn(batch, 3, generator=generator)
        b = torch.randn(batch, 4, generator=generator)
        b[:, 0] += y.float()
        batches.append(
            Batch(
                inputs={"a": a, "b": b},
                present={
                    "a": torch.ones(batch, dtype=torch.bool),
                    "b": torch.ones(batch, dtype=torch.bool),
                },
                targets=y,
            )
        )
    return batches


def model_with_bn(freeze_a=False):
    enc_a = Encoder(nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU()), input_shape=(3,))
    enc_b = Encoder(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), input_shape=(4,))
    if freeze_a:
        enc_a.freeze()
    return MultimodalModel.build(
        {"a": enc_a, "b": enc_b}, fuser=GatedFuser, head=ClassificationHead, num_classes=3
    )


def test_fit_learns_and_keeps_best_epoch():
    torch.manual_seed(0)
    batches = separable_batches()
    model = model_with_bn()
    before = evaluate(model, batches, torch.device("cpu"))
    history = []
    best = fit(
        model, batches, batches, epochs=5, lr=1e-2, weight_decay=0.0,
        device=torch.device("cpu"), on_epoch=lambda e, m: history.append(m),
    ).best  # fmt: skip
    after = evaluate(model, batches, torch.device("cpu"))
    assert len(history) == 5 and after.accuracy > 0.9 > before.accuracy
    assert best["val/accuracy"] == max(m["val/accuracy"] for m in history) == after.accuracy


def test_frozen_encoder_is_untouched_by_training():
    torch.manual_seed(0)
    model = model_with_bn(freeze_a=True)
    frozen = {k: v.clone() for k, v in model.encoders["a"].state_dict().items()}
    trained = {k: v.clone() for k, v in model.encoders["b"].state_dict().items()}
    fit(
        model,
        separable_batches(),
        separable_batches(2),
        epochs=2,
        lr=1e-2,
        weight_decay=0.0,
        device=torch.device("cpu"),
    )
    for key, value in model.encoders["a"].state_dict().items():
        assert torch.equal(value, frozen[key]), key  # weights and batch-norm statistics
    assert any(not torch.equal(v, trained[k]) for k, v in model.encoders["b"].state_dict().items())


def test_resumed_fit_ends_where_an_uninterrupted_one_does(tmp_path):
    from fusion.training import load_checkpoint

    def run(**kwargs):
        torch.manual_seed(0)
        model = model_with_bn()
        result = fit(
            model, separable_batches(), separable_batches(2), epochs=4, lr=1e-2,
            weight_decay=0.01, device=torch.device("cpu"), **kwargs,
        )  # fmt: skip
        return model, result

    straight, _ = run()
    _, stopped = run(state_path=tmp_path / "state.pt", stop_after=2)
    assert not stopped.finished and stopped.epochs_done == 2
    torch.manual_seed(123)  # whatever happened in between, the state restores the generators
    resumed, result = run(resume=load_checkpoint(tmp_path / "state.pt"))
    assert result.finished
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_bf16_autocast_trains_every_parameter_and_resumes_exactly(tmp_path):
    from fusion.training import Precision, load_checkpoint

    bf16 = Precision("bf16", "cpu")
    seen = []
    model = model_with_bn()
    model.head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    before = {k: v.clone() for k, v in model.named_parameters()}
    fit(
        model, separable_batches(), separable_batches(2), epochs=2, lr=1e-2,
        weight_decay=0.0, device=torch.device("cpu"), precision=bf16,
        state_path=tmp_path / "state.pt",
    )  # fmt: skip
    assert set(seen) == {torch.bfloat16}
    assert all(not torch.equal(p, before[k]) for k, p in model.named_parameters()), "untrained"
    assert "scaler" in load_checkpoint(tmp_path / "state.pt")

    def run(**kwargs):
        torch.manual_seed(0)
        model = model_with_bn()
        fit(
            model, separable_batches(), separable_batches(2), epochs=3, lr=1e-2,
            weight_decay=0.0, device=torch.device("cpu"), precision=bf16, **kwargs,
        )  # fmt: skip
        return model

    straight = run()
    run(state_path=tmp_path / "half.pt", stop_after=1)
    resumed = run(resume=load_checkpoint(tmp_path / "half.pt"))
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_fp16_is_refused_off_the_gpu_with_the_alternative():
    import pytest

    from fusion.training import Precision

    with pytest.raises(ValueError, match=r"'fp16' needs a CUDA device.*use 'bf16'"):
        Precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        Precision("16-mixed", "cpu")
    assert not Precision("bf16", "cpu").grad_scaler().is_enabled()


def test_the_constant_state_is_frozen_parameters_and_the_buffers_of_frozen_modules():
    assert constant_state(model_with_bn()) == set()
    model = model_with_bn(freeze_a=True).eval()
    assert constant_state(model) == {
        "encoders.a.backbone.0.weight", "encoders.a.backbone.0.bias",
        "encoders.a.backbone.1.weight", "encoders.a.backbone.1.bias",
        "encoders.a.backbone.1.running_mean", "encoders.a.backbone.1.running_var",
        "encoders.a.backbone.1.num_batches_tracked",
    }  # fmt: skip
    assert not model.training  # its mode is left as it was


def test_frozen_parameters_stay_out_of_the_state_and_resume_still_matches(tmp_path):
    from fusion.training import load_checkpoint

    def run(**kwargs):
        torch.manual_seed(0)
        model = model_with_bn(freeze_a=True)
        fit(
            model, separable_batches(), separable_batches(2), epochs=3, lr=1e-2,
            weight_decay=0.0, device=torch.device("cpu"), **kwargs,
        )  # fmt: skip
        return model

    straight = run()
    run(state_path=tmp_path / "state.pt", stop_after=1)
    state = load_checkpoint(tmp_path / "state.pt")
    saved = set(state["model"]) | set(state["best_model"])
    assert not any(k.startswith("encoders.a.") for k in saved)  # frozen weights, fixed statistics
    assert "encoders.b.backbone.0.weight" in saved
    resumed = run(resume=state)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    del state["model"]["encoders.b.backbone.0.weight"]
    with pytest.raises(ValueError, match=r"missing \['encoders.b.backbone.0.weight'\]"):
        run(resume=state)
