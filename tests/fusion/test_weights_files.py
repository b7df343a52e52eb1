"""Weights files as users have them: Lightning checkpoints with pickled hyper-parameters,
other classifiers, and damaged files. Nothing in a file is ever run."""

import functools
import io
import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fusion.encoders import build_vision_encoder
from fusion.weights import IncompleteLoadError, load_weights

CALLS: list[str] = []


def record(what: str) -> str:
    CALLS.append(what)
    return what


class Tripwire:
    """Pickles as a call to `record`: loading it by running pickled code would show in CALLS."""

    def __reduce__(self):
        return record, ("ran code from the file",)


@pytest.fixture(autouse=True)
def no_calls():
    CALLS.clear()
    yield
    assert CALLS == []


def lightning_checkpoint(path, model: nn.Module, attribute: str = "model"):
    """A file laid out as Lightning's `trainer.save_checkpoint` writes it."""
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"{attribute}.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {
                "optimizer": functools.partial(torch.optim.AdamW, lr=1e-3),
                "head": nn.Linear(2, 2),
                "tripwire": Tripwire(),
            },
            "optimizer_states": [],
        },
        path,
    )
    return path


def test_lightning_checkpoint_with_pickled_objects_loads_its_state_dict(tmp_path):
    source = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    path = lightning_checkpoint(tmp_path / "epoch=3.ckpt", source)
    target = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    report = load_weights(target, path)
    assert report.format == "lightning" and report.complete and report.stripped == ["model."]
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    assert set(report.skipped) >= {"functools.partial", "torch.nn.modules.linear.Linear"}
    assert f"{__name__}.record" in report.skipped
    assert "skipped pickled objects" in report.summary()


def test_five_class_checkpoint_loads_strictly_into_an_encoder_without_classifier(tmp_path):
    trained = build_vision_encoder("resnet18", image_size=(32, 32)).backbone
    trained.fc = nn.Linear(512, 5)  # a 5-class model, fine-tuned elsewhere
    path = lightning_checkpoint(tmp_path / "five.ckpt", trained, attribute="net")
    encoder = build_vision_encoder("resnet18", image_size=(32, 32), weights_file=str(path)).eval()
    trained.fc = nn.Identity()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(encoder(x), trained.eval()(encoder.preprocess(x)))


def test_key_map_drops_keys_that_map_to_none(tmp_path):
    source = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5))
    target = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(IncompleteLoadError, match=r"1\.weight: checkpoint \(5, 3\) vs model"):
        load_weights(target, source.state_dict())
    report = load_weights(target, source.state_dict(), key_map={r"^1\.": None}, strict=False)
    assert report.dropped == ["1.weight", "1.bias"] and report.missing == ["1.weight", "1.bias"]
    assert "key_map dropped 2: 1.weight, 1.bias" in report.summary()
    assert torch.equal(target[0].weight, source[0].weight)


def truncated(path, model):
    torch.save(model.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def bad_zip_member(path, model):
    torch.save(model.state_dict(), path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w") as archive:  # the pickle's storages are gone
        for name, data in members.items():
            if name.endswith("data.pkl"):
                archive.writestr(name, data)


def truncated_safetensors(path, model):
    save_file(model.state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:40])


def truncated_legacy(path, model):
    """torch.save's format before torch 1.6 (a pickle, not a zip archive), cut short."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer, _use_new_zipfile_serialization=False)
    path.write_bytes(buffer.getvalue()[:60])


def empty(path, model):
    path.write_bytes(b"")


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("half.pt", truncated),
        ("storages-gone.pth", bad_zip_member),
        ("legacy-cut.pt", truncated_legacy),
        ("cut.safetensors", truncated_safetensors),
        ("empty.ckpt", empty),
    ],
)
def test_damaged_files_are_called_corrupt_naming_the_path(tmp_path, name, damage):
    model = nn.Linear(8, 8)
    path = tmp_path / name
    damage(path, model)
    with pytest.raises(ValueError) as err:
        load_weights(model, path)
    message = str(err.value)
    assert message.startswith(
        f"weights file {path} is corrupt or truncated: expected a torch checkpoint or a "
        f"safetensors file, found {path.stat().st_size} bytes that do not read as one ("
    )
    assert "weights_only" not in message


CSV = b"path,label\nimages/0001.png,cat\n"


@pytest.mark.parametrize(
    ("name", "content", "start"),
    [
        ("labels.csv", CSV, "b'path,label\\nimage'"),
        ("labels.pt", CSV, "b'path,label\\nimage'"),
        ("labels.safetensors", CSV, "b'path,label\\nimage'"),
        ("noise.bin", bytes(range(256)) * 4, repr(bytes(range(16)))),
    ],
)
def test_a_file_that_is_no_weights_file_is_named_as_such(tmp_path, name, content, start):
    model = nn.Linear(2, 2)
    before = model.weight.clone()
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_weights(model, path)
    assert str(err.value) == (
        f"weights file {path} is not a weights file: expected a torch checkpoint or a "
        f"safetensors file, found one that begins with {start}"
    )
    assert torch.equal(model.weight, before)


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (
            nn.Linear(2, 2),
            "holds a pickled torch.nn.modules.linear.Linear object, not a state dict",
        ),
        (Tripwire(), f"holds a pickled {__name__}.record object, not a state dict"),
        ([torch.ones(1)], "holds a list, not a state dict"),
    ],
)
def test_files_without_a_state_dict_say_what_they_hold(tmp_path, content, found):
    path = tmp_path / "whole.pt"
    torch.save(content, path)
    with pytest.raises(ValueError) as err:
        load_weights(nn.Linear(2, 2), path)
    assert str(err.value).startswith(f"weights file {path} {found}")


def test_legacy_torch_save_files_still_load(tmp_path):
    model = nn.Linear(2, 2)
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    assert load_weights(nn.Linear(2, 2), path).complete


class System:
    """Pickles as a call to os.system: the classic payload of a malicious pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


PLAIN_PICKLE = (
    "is a plain pickle (written by pickle.dump), not a torch.save file; it is not loaded, "
    "since unpickling an arbitrary pickle can run code: load it where you trust it and "
    "re-save the tensors with torch.save(state_dict, path) or "
    "safetensors.torch.save_file(state_dict, path)"
)
PICKLED_CODE = (
    "is a plain pickle (written by pickle.dump, not torch.save) that names code ({}); it is "
    "not loaded, since unpickling it would run that code: expected tensors; save the "
    "state_dict alone, with torch.save(model.state_dict(), path) or safetensors"
)


@pytest.mark.parametrize(
    ("content", "protocol", "message"),
    [
        pytest.param(
            lambda marker: {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)},
            pickle.DEFAULT_PROTOCOL,
            PLAIN_PICKLE,
            id="tensors",
        ),
        pytest.param(
            lambda marker: nn.Linear(2, 2).state_dict(), 2, PLAIN_PICKLE, id="tensors-protocol-2"
        ),
        pytest.param(
            lambda marker: System(marker),
            pickle.DEFAULT_PROTOCOL,
            PICKLED_CODE.format(f"{os.system.__module__}.system"),
            id="os.system",
        ),
        pytest.param(
            lambda marker: {"weight": torch.zeros(2, 2), "bias": System(marker)},
            2,
            PICKLED_CODE.format(f"{os.system.__module__}.system"),
            id="tensors-and-os.system",
        ),
        pytest.param(
            lambda marker: {"weight": Tripwire()},
            pickle.DEFAULT_PROTOCOL,
            PICKLED_CODE.format(f"{__name__}.record"),
            id="tripwire",
        ),
    ],
)
def test_plain_pickles_are_named_and_never_unpickled(tmp_path, content, protocol, message):
    marker = tmp_path / "ran"
    path = tmp_path / "weights.pkl"
    with open(path, "wb") as handle:
        pickle.dump(content(marker), handle, protocol=protocol)
    with pytest.raises(ValueError) as err:
        load_weights(nn.Linear(2, 2), path)
    assert str(err.value) == f"weights file {path} {message}"
    assert not marker.exists()


def test_a_folder_is_named_as_one(tmp_path):
    with pytest.raises(ValueError) as err:
        load_weights(nn.Linear(2, 2), tmp_path)
    assert str(err.value) == (
        f"weights file {tmp_path} is a folder: expected a weights file (a torch checkpoint or "
        "a safetensors file); it holds none"
    )
    save_file(nn.Linear(2, 2).state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(
        ValueError, match=r"is a folder: .*; weights files in it: model\.safetensors$"
    ):
        load_weights(nn.Linear(2, 2), str(tmp_path))


def test_a_file_calling_a_blocked_module_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"

    class Attack:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    path = tmp_path / "attack.pt"
    torch.save({"state_dict": {}, "payload": Attack()}, path)
    with pytest.raises(ValueError) as err:
        load_weights(nn.Linear(2, 2), path)
    assert str(err.value) == (
        f"weights file {path} holds pickled code (posix.system), which is never run: "
        "expected tensors; save the state_dict alone"
    )
    assert not marker.exists()


def test_a_bad_key_map_pattern_and_a_strict_that_is_not_a_bool_are_named():
    state = nn.Linear(2, 2).state_dict()
    with pytest.raises(
        ValueError, match=r"key_map pattern '\[' is not a valid regex: unterminated"
    ):
        load_weights(nn.Linear(2, 2), state, key_map={"[": ""})
    with pytest.raises(TypeError, match=r"strict must be True or False, got str 'no'"):
        load_weights(nn.Linear(2, 2), state, strict="no")


def test_a_timm_checkpoint_with_its_classifier_loads_strictly_into_a_pooled_encoder(tmp_path):
    """timm's num_classes=0 leaves the classifier out: its keys are ignored, others are not."""
    timm = pytest.importorskip("timm")
    from fusion.encoders.vision import build_timm_encoder

    trained = timm.create_model("resnet18", num_classes=5)
    path = tmp_path / "timm.pt"
    torch.save(trained.state_dict(), path)
    encoder = build_timm_encoder("resnet18", weights_file=str(path), image_size=32).eval()
    trained.reset_classifier(0)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(encoder(x), trained.eval()(encoder.preprocess(x)))
    torch.save({**trained.state_dict(), "neck.weight": torch.ones(1)}, path)
    with pytest.raises(
        IncompleteLoadError, match=r"1 key of the source does not fit .*'neck\.weight'"
    ):
        build_timm_encoder("resnet18", weights_file=str(path), image_size=32)


def test_googlenet_weights_with_aux_heads_load_strictly_into_a_model_without_them(torch_home):
    """The aux heads' keys are named to `load_weights` as unbuilt: ignored, not unexpected."""
    from torchvision.models import GoogLeNet_Weights, get_model

    from fusion.encoders.vision import build_backbone

    weights = GoogLeNet_Weights.IMAGENET1K_V1
    full = get_model("googlenet", aux_logits=True, init_weights=False)
    torch.save(full.state_dict(), torch_home / weights.url.rsplit("/", 1)[-1])
    model = build_backbone("googlenet", weights)
    assert torch.equal(model.fc.weight, full.fc.weight) and model.aux1 is None
