from pathlib import Path

import pytest
import torch
import torchaudio
import torchvision
from safetensors.torch import save_file
from torch import nn

from fusion.training import load_checkpoint, save_checkpoint
from fusion.weights import (
    IncompleteLoadError,
    WeightsUnavailableError,
    load_weights,
    uninitialized,
)


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )


@pytest.fixture
def trained() -> nn.Sequential:
    """A net whose BatchNorm statistics moved, so buffers must load too."""
    net = small_net()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, 8, 8) * 3 + 1)
    return net.eval()


def assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def test_load_with_prefix_reports_what_loaded():
    source = nn.Sequential(nn.Linear(3, 4))
    target = nn.Sequential(nn.Linear(3, 4))
    state = {f"encoders.x.{k}": v for k, v in source.state_dict().items()}
    report = load_weights(target, state, prefix="encoders.x.")
    assert sorted(report.loaded) == ["0.bias", "0.weight"] and report.complete
    assert torch.equal(target[0].weight, source[0].weight)
    assert load_weights(target, source.state_dict(), prefix=None).prefix == ""  # None: no sub-tree


def test_incomplete_load_fails_loudly_and_leaves_the_module_untouched():
    target = nn.Sequential(nn.Linear(3, 4))
    before = target[0].weight.clone()
    with pytest.raises(IncompleteLoadError, match=r"1 missing: 0\.bias"):
        load_weights(target, {"0.weight": torch.zeros(4, 3)})
    with pytest.raises(ValueError, match=r"0\.weight: checkpoint \(4, 2\) vs model \(4, 3\)"):
        load_weights(target, {"0.weight": torch.zeros(4, 2), "0.bias": torch.zeros(4)})
    assert torch.equal(target[0].weight, before)


def test_strict_error_shows_the_first_keys_and_the_count():
    target = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])
    with pytest.raises(IncompleteLoadError, match=r"12 missing: 0\.weight, .* and 7 more") as err:
        load_weights(target, {"unrelated": torch.zeros(1)})
    assert err.value.report.unexpected == ["unrelated"]


def test_unexpected_keys_fail_a_strict_load_as_torch_does_and_leave_the_module_untouched(
    tmp_path, caplog
):
    """A resnet34 checkpoint holds all of resnet18's keys and 96 more: not a resnet18's."""
    path = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    target = torchvision.models.resnet18()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(IncompleteLoadError) as err:
        load_weights(target, path)
    assert str(err.value).startswith(
        "incomplete load (96 keys of the source do not fit the module, e.g. "
        "'layer1.2.conv1.weight', 'layer1.2.bn1.weight', 'layer1.2.bn1.bias' and 93 more: a "
        "checkpoint of a larger or different model? Pass strict=False to load what fits (with "
        "a warning), or ignore_unexpected=[globs] for parts left out on purpose):\n"
        f"ResNet <- {path} [state_dict]: loaded 122/122 tensors\n  96 unexpected: "
    )
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    report = load_weights(target, path, strict=False)
    assert report.complete and not report.exact and len(report.unexpected) == 96
    assert [r.getMessage().splitlines()[0] for r in caplog.records] == [
        f"load with unexpected keys left out (strict=False): ResNet <- {path} [state_dict]: "
        "loaded 122/122 tensors"
    ]


def test_keys_left_out_on_purpose_are_ignored_not_unexpected():
    source = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    target = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(IncompleteLoadError, match=r"\(2 keys of the source do not fit the module"):
        load_weights(target, source.state_dict())
    report = load_weights(target, source.state_dict(), ignore_unexpected=["1.*"])
    assert report.exact and report.ignored == ["1.weight", "1.bias"] and report.unexpected == []
    assert "ignored 2: 1.weight, 1.bias" in report.summary()
    one = {**source.state_dict(), "extra": torch.zeros(1)}
    with pytest.raises(
        IncompleteLoadError,
        match=r"\(1 key of the source does not fit the module, e\.g\. 'extra': a checkpoint",
    ):
        load_weights(target, one, ignore_unexpected=["1.*"])
    with pytest.raises(
        TypeError, match=r"ignore_unexpected must be a list of glob patterns, got '1\.\*'"
    ):
        load_weights(target, source.state_dict(), ignore_unexpected="1.*")


def test_a_load_that_fits_nothing_fails_even_without_strict():
    target = nn.Sequential(nn.Linear(3, 4))
    before = target[0].weight.clone()
    with pytest.raises(IncompleteLoadError) as err:
        load_weights(target, {"fc.weight": torch.zeros(4, 3)}, strict=False)
    assert str(err.value).startswith(
        "incomplete load (no key fits the module: check the source, prefix and key_map):\n"
        "Sequential <- mapping [state_dict]: loaded 0/2 tensors"
    )
    assert torch.equal(target[0].weight, before)


def test_non_strict_loads_what_fits_and_reports_the_rest(trained, caplog):
    target = small_net()
    state = dict(trained.state_dict())
    state["4.weight"] = torch.zeros(3, 144)
    state["extra.weight"] = torch.zeros(1)
    del state["4.bias"]
    report = load_weights(target, state, strict=False)
    assert report.mismatched == {"4.weight": ((3, 144), (5, 144))}
    assert report.missing == ["4.bias"] and report.unexpected == ["extra.weight"]
    assert not report.complete and len(report.loaded) == 7
    assert [r.getMessage().splitlines()[0] for r in caplog.records] == [
        "partial load (strict=False): Sequential <- mapping [state_dict]: loaded 7/9 tensors"
    ]
    assert torch.equal(target[0].weight, trained[0].weight)
    assert not torch.equal(target[4].weight[:3], state["4.weight"])
    text = str(report)
    assert (
        "loaded 7/9 tensors" in text and "4.weight: checkpoint (3, 144) vs model (5, 144)" in text
    )


def write_plain(state, tmp_path, suffix=".pt"):
    torch.save(state, tmp_path / f"w{suffix}")
    return tmp_path / f"w{suffix}"


def write_safetensors(state, tmp_path):
    save_file(state, tmp_path / "w.safetensors")
    return str(tmp_path / "w.safetensors")


def write_lightning(state, tmp_path, attribute="model."):
    """The layout of a Lightning 2.x .ckpt, built without Lightning installed."""
    opt = torch.optim.Adam([nn.Parameter(torch.ones(2))])
    opt.zero_grad()
    opt.param_groups[0]["params"][0].sum().backward()
    opt.step()
    ckpt = {
        "epoch": 4,
        "global_step": 250,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {**prefixed(state, attribute), "criterion.pos_weight": torch.ones(1)},
        "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": 4}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val/acc'}": {"best_model_score": torch.ones(())}
        },
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [{"step_size": 10, "gamma": 0.1, "last_epoch": 4}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 1e-3, "name": "small"},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    return tmp_path / "last.ckpt"


def write_timm_ema(state, tmp_path):
    """timm's train.py layout; the EMA weights are the ones timm's loader prefers."""
    raw = {k: torch.zeros_like(v) for k, v in state.items()}
    ckpt = {"epoch": 3, "arch": "small", "state_dict": raw, "state_dict_ema": state, "version": 2}
    return write_plain(ckpt, tmp_path, ".pth.tar")


def write_trainer(state, tmp_path):
    return save_checkpoint(tmp_path / "stage1.pt", {"model": state, "fingerprint": "x", "best": 1})


SOURCES = {  # name: (write(state, tmp_path) -> source, format, entry, stripped)
    "mapping": (lambda s, p: s, "state_dict", None, []),
    "pt": (write_plain, "state_dict", None, []),
    "pth": (lambda s, p: write_plain(s, p, ".pth"), "state_dict", None, []),
    "bin": (lambda s, p: str(write_plain(s, p, ".bin")), "state_dict", None, []),
    "safetensors": (write_safetensors, "safetensors", None, []),
    "lightning": (write_lightning, "lightning", "state_dict", ["model."]),
    "lightning-attribute": (
        lambda s, p: write_lightning(s, p, "net."),
        "lightning",
        "state_dict",
        ["net."],
    ),
    "lightning-compiled": (
        lambda s, p: write_lightning(s, p, "model._orig_mod."),
        "lightning",
        "state_dict",
        ["model.", "_orig_mod."],
    ),
    "timm": (lambda s, p: write_plain({"state_dict": s, "arch": "x"}, p), "timm", "state_dict", []),
    "timm-ema": (write_timm_ema, "timm", "state_dict_ema", []),
    "timm-model": (lambda s, p: write_plain({"model": s}, p), "trainer", "model", []),
    "trainer": (write_trainer, "trainer", "model", []),
    "ddp": (lambda s, p: write_plain(prefixed(s, "module."), p), "state_dict", None, ["module."]),
    "compiled": (lambda s, p: prefixed(s, "_orig_mod."), "state_dict", None, ["_orig_mod."]),
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_every_source_reproduces_the_outputs_exactly(kind, trained, tmp_path):
    write, fmt, entry, stripped = SOURCES[kind]
    fresh = small_net()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert not torch.equal(fresh.eval()(x), trained(x))
    report = load_weights(fresh, write(dict(trained.state_dict()), tmp_path))
    assert (report.format, report.entry, report.stripped) == (fmt, entry, stripped)
    assert report.complete and len(report.loaded) == 9
    assert fresh[1].num_batches_tracked.item() == 3
    assert_same_outputs(trained, fresh, x)


def test_trainer_checkpoint_sub_tree_as_train_py_loads_it(trained, tmp_path):
    model_state = {**prefixed(trained.state_dict(), "encoders.image."), "head.w": torch.ones(2)}
    path = write_trainer(model_state, tmp_path)
    encoder = small_net()
    report = load_weights(encoder, load_checkpoint(path)["model"], prefix="encoders.image.")
    assert report.complete and report.unexpected == [] and report.prefix == "encoders.image."
    assert_same_outputs(trained, encoder, torch.randn(2, 3, 8, 8))
    lightning = write_lightning(model_state, tmp_path)  # the same sub-tree behind "model."
    report = load_weights(small_net(), lightning, prefix="encoders.image.")
    assert report.stripped == ["model."] and report.complete


def test_wrong_prefix_names_the_prefixes_there_are(trained):
    state = prefixed(trained.state_dict(), "encoders.image.")
    with pytest.raises(ValueError, match=r"'encoders\.img\.'; keys start with encoders\.image\."):
        load_weights(small_net(), state, prefix="encoders.img.")


def test_keys_that_really_start_with_model_are_not_stripped():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Linear(2, 2)

    source = Wrapper()
    target = Wrapper()
    report = load_weights(target, source.state_dict())
    assert report.stripped == [] and report.complete
    assert torch.equal(target.model.weight, source.model.weight)


def test_key_map_renames_with_regexes(trained):
    state = {k.replace("0.", "stem.conv.", 1): v for k, v in trained.state_dict().items()}
    target = small_net()
    report = load_weights(target, state, key_map={r"^stem\.conv\.": "0."})
    assert report.renamed == 2 and report.complete and "key_map renamed 2" in report.summary()
    assert_same_outputs(trained, target, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"maps both '0\.weight' and '0\.bias' to 'w'"):
        load_weights(target, trained.state_dict(), key_map={r"^0\.(weight|bias)$": "w"})


def test_bad_files_are_named(tmp_path):
    target = small_net()
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_weights(target, tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match=r"no/such/dir"):
        load_weights(target, "no/such/dir")
    for name in ("corrupt.pt", "corrupt.safetensors"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
        with pytest.raises(ValueError, match=rf"{name} is not a weights file: "):
            load_weights(target, tmp_path / name)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.ckpt is corrupt or truncated"):
        load_weights(target, tmp_path / "empty.ckpt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt holds a list, not a state dict"):
        load_weights(target, tmp_path / "list.pt")
    torch.save({"epoch": 1, "weights": [torch.ones(1)]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"odd\.pt holds no state dict.*keys are epoch, weights"):
        load_weights(target, tmp_path / "odd.pt")


def test_non_finite_parameters_are_refused_and_the_module_is_left_untouched(tmp_path):
    target = small_net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = small_net().state_dict()
    state["0.weight"][0, 0, 0, :2] = float("nan")
    state["4.bias"][:] = float("inf")
    state["4.bias"][0] = float("nan")
    with pytest.raises(ValueError) as err:
        load_weights(target, state)
    assert str(err.value) == (
        "Sequential <- mapping: expected finite values in the 6 tensors that would load into "
        "its parameters, found NaN or Inf in 2: 0.weight (2 NaN of 108 values), "
        "4.bias (1 NaN, 4 Inf of 5 values); nothing was loaded (a diverged or damaged "
        "checkpoint?)"
    )
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())

    layers = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
    torch.save(
        {k: torch.full_like(v, float("nan")) for k, v in layers.state_dict().items()},
        tmp_path / "diverged.pt",
    )
    with pytest.raises(ValueError) as err:
        load_weights(layers, tmp_path / "diverged.pt")
    assert str(err.value) == (
        f"Sequential <- {tmp_path / 'diverged.pt'}: expected finite values in the 8 tensors "
        "that would load into its parameters, found NaN or Inf in 8: 0.weight (4 NaN of 4 "
        "values), 0.bias (2 NaN of 2 values), 1.weight (4 NaN of 4 values), 1.bias (2 NaN of "
        "2 values), 2.weight (4 NaN of 4 values) and 3 more; nothing was loaded (a diverged "
        "or damaged checkpoint?)"
    )


def test_inf_in_a_buffer_loads(trained):
    """A buffer may hold Inf (an attention mask does): only parameters must be finite."""
    target = small_net()
    target.register_buffer("mask", torch.zeros(3))
    state = trained.state_dict() | {"mask": torch.tensor([0.0, float("-inf"), float("-inf")])}
    assert load_weights(target, state).complete
    assert torch.equal(target.mask, state["mask"])


def test_unsupported_sources_are_named():
    with pytest.raises(TypeError, match=r"from a builtins\.int"):
        load_weights(small_net(), 3)
    with pytest.raises(TypeError, match=r"SquimObjectiveBundle.*bundle\.get_model"):
        load_weights(small_net(), torchaudio.pipelines.SQUIM_OBJECTIVE)


def test_unknown_weight_names_suggest_close_matches():
    with pytest.raises(ValueError, match=r"close matches: \['ResNet18_Weights\.IMAGENET1K_V1'"):
        load_weights(small_net(), "resnet18_weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match=r"'torchaudio\.pipelines\.WAV2VEC2_BASE'"):
        load_weights(small_net(), "torchaudio.pipelines.WAV2VEC_BASE")


def test_torchvision_weights_load_offline_from_the_hub_cache(torch_home):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    original = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(original.state_dict(), torch_home / Path(weights.url).name)
    fresh = torchvision.models.resnet18(num_classes=10)
    for source in (weights, "ResNet18_Weights.DEFAULT"):  # the member, and a name as in a config
        report = load_weights(fresh, source)
        assert report.format == "torchvision" and report.source == str(weights)
    assert_same_outputs(original, fresh, torch.randn(1, 3, 32, 32))


def test_missing_torchvision_weights_say_where_to_put_the_file(torch_home, monkeypatch, capsys):
    """Nothing is downloaded at run time: the error comes before any network access."""
    tried = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: tried.append(a))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: tried.append(a))
    with pytest.raises(WeightsUnavailableError, match="TORCH_HOME") as err:
        load_weights(small_net(), "ResNet18_Weights.IMAGENET1K_V1")
    assert tried == [] and "Downloading" not in capsys.readouterr().err
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    path = torch_home / "resnet18-f37072fd.pth"
    assert err.value.path == path and err.value.url == url
    assert str(err.value).startswith(
        "weights ResNet18_Weights.IMAGENET1K_V1 are not in the torch hub cache, and nothing is "
        f"downloaded at run time. Download {url} (on a machine with network access) and place "
        f'it at\n  {path}\nfor instance with: python -c "import torch; '
        f"torch.hub.download_url_to_file('{url}', '{path}')\"\n"
    )


@pytest.mark.parametrize(
    "bundle", [torchaudio.pipelines.WAV2VEC2_BASE, "torchaudio.pipelines.WAV2VEC2_BASE"]
)
def test_torchaudio_bundle_loads_offline_from_the_hub_cache(bundle, trained, torch_home):
    # A stand-in for the 360 MB file: the cache lookup is what is tested, not wav2vec2 itself.
    torch.save(trained.state_dict(), torch_home / "wav2vec2_fairseq_base_ls960.pth")
    fresh = small_net()
    report = load_weights(fresh, bundle)
    assert report.format == "torchaudio" and "wav2vec2_fairseq_base_ls960.pth" in report.source
    assert_same_outputs(trained, fresh, torch.randn(2, 3, 8, 8))


def test_missing_torchaudio_weights_say_where_to_put_the_file(torch_home):
    with pytest.raises(WeightsUnavailableError) as err:
        load_weights(small_net(), torchaudio.pipelines.WAV2VEC2_BASE)
    assert err.value.path == torch_home / "wav2vec2_fairseq_base_ls960.pth"
    assert err.value.url == "https://download.pytorch.org/torchaudio/models/" + err.value.path.name


def test_corrupt_cached_file_is_named(torch_home):
    (torch_home / "resnet18-f37072fd.pth").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"resnet18-f37072fd\.pth are corrupt or trunc.*replace"):
        load_weights(small_net(), torchvision.models.ResNet18_Weights.IMAGENET1K_V1)


def test_checkpoint_round_trip_and_errors(tmp_path):
    path = save_checkpoint(tmp_path / "a" / "ckpt.pt", {"model": {"w": torch.ones(2)}, "epoch": 3})
    assert load_checkpoint(path, required=("model",))["epoch"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temporary file left
    with pytest.raises(ValueError, match=r"lacks \['optimizer'\]"):
        load_checkpoint(path, required=("optimizer",))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(tmp_path / "corrupt.pt")


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"v": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"v": Unpicklable()})
    assert load_checkpoint(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_lightning_modules_other_attributes_are_ignored_its_models_extra_keys_are_not():
    source = nn.Sequential(nn.Linear(3, 4))
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    checkpoint = {"global_step": 1, "state_dict": {**state, "criterion.pos_weight": torch.ones(1)}}
    report = load_weights(nn.Sequential(nn.Linear(3, 4)), checkpoint)
    assert report.exact and report.ignored == ["criterion.pos_weight"]
    checkpoint["state_dict"]["model.1.weight"] = torch.ones(2, 4)  # the model's, not in ours
    with pytest.raises(
        IncompleteLoadError,
        match=r"\(1 key of the source does not fit the module, e\.g\. '1\.weight'",
    ):
        load_weights(nn.Sequential(nn.Linear(3, 4)), checkpoint)


def test_uninitialized_draws_nothing_and_a_strict_load_fills_every_weight():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    before = torch.random.get_rng_state()
    with uninitialized():
        built = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
        torchvision.models.resnet18()
    assert torch.equal(torch.random.get_rng_state(), before)  # no Kaiming draws
    load_weights(built, reference.state_dict())
    for (name, value), (_, expected) in zip(
        built.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(value, expected), name
    with uninitialized(), pytest.raises(IncompleteLoadError, match=r"missing"):
        load_weights(nn.Linear(4, 3), {"weight": torch.ones(3, 4)})  # no bias: refused


def test_initialisation_is_back_after_uninitialized_even_when_the_build_fails():
    with pytest.raises(RuntimeError), uninitialized():
        raise RuntimeError("a failing build")
    torch.manual_seed(0)
    first = nn.Linear(8, 8).weight.clone()
    torch.manual_seed(0)
    with uninitialized():
        nn.Linear(8, 8)
    second = nn.Linear(8, 8).weight  # drawn from the seed as if nothing had been built
    assert torch.equal(first, second)
    torch.manual_seed(0)  # torch's Linear init: Kaiming-uniform, a = sqrt(5): U(+-1/sqrt(8))
    assert torch.equal(first, torch.empty(8, 8).uniform_(-(8**-0.5), 8**-0.5))
