"""Load weights from any source into a module, and report exactly what matched.

One entry point, `load_weights`, takes a state dict, a checkpoint file (plain, safetensors,
Lightning, timm, our trainer's), a torchvision weights enum (or its name) or a torchaudio
wav2vec2-family bundle. Pretrained weights are read from the torch hub cache,
`$TORCH_HOME/hub/checkpoints/<file name from the url>`, and never downloaded: a file that is
not there is an error naming the url and the path to place it at.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlparse

import torch
import torchaudio.pipelines
from safetensors.torch import load_file as load_safetensors
from torch import nn
from torch.nn import init
from torchvision.models import WeightsEnum, get_model_weights, get_weight, list_models

from fusion.pickles import plain_pickle, preview
from fusion.training.checkpoint import TORCH_SAVE_STARTS

log = logging.getLogger("fusion")

WeightsSource: TypeAlias = (
    Mapping[str, Any] | str | os.PathLike[str] | WeightsEnum | torchaudio.pipelines.Wav2Vec2Bundle
)
Shape: TypeAlias = tuple[int, ...]

# Prefixes that wrappers put in front of every key: DDP, torch.compile, Lightning's usual attribute.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# Suffixes that make a string a file path rather than a weights name.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")
# Keys only a Lightning checkpoint has next to its "state_dict".
LIGHTNING_KEYS = ("pytorch-lightning_version", "global_step", "optimizer_states", "loops")
# Entries that hold the state dict in other checkpoints, in the order to prefer them: timm's
# train.py writes "state_dict" (+ "state_dict_ema"/"model_ema", preferred as timm's loader does),
# our trainer and DeiT-style files write "model".
CONTAINER_ENTRIES = (
    ("state_dict_ema", "timm"),
    ("model_ema", "timm"),
    ("state_dict", "timm"),
    ("model", "trainer"),
)
TORCHAUDIO_MODELS_URL = "https://download.pytorch.org/torchaudio/models/"
TORCHAUDIO_PREFIX = "torchaudio.pipelines."
MAX_WRAPPERS = 3  # e.g. 'model.module._orig_mod.'
# How many first bytes of a file that is no weights file its error shows.
START_SHOWN = 16
# A safetensors file begins with its header's size (8 bytes, little-endian), then the header,
# a JSON object: its byte 8 is this.
SAFETENSORS_HEADER_AT, SAFETENSORS_HEADER_START = 8, b"{"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are not in the torch hub cache; nothing is downloaded at run time."""

    def __init__(self, name: str, url: str, path: Path) -> None:
        self.url, self.path = url, path
        home = os.environ.get("TORCH_HOME", "unset, so ~/.cache/torch")
        super().__init__(
            f"weights {name} are not in the torch hub cache, and nothing is downloaded at run "
            f"time. Download {url} (on a machine with network access) and place it at\n"
            f"  {path}\n"
            f'for instance with: python -c "import torch; torch.hub.download_url_to_file('
            f"'{url}', '{path}')\"\n"
            f"(the cache directory is torch.hub.get_dir()/checkpoints = {path.parent}, which "
            f"follows $TORCH_HOME/hub; TORCH_HOME is {home})."
        )


class IncompleteLoadError(ValueError):
    """A strict load found missing, shape-mismatched or unexpected keys (or a load fitted no
    key at all); the module was left untouched."""

    def __init__(self, report: LoadReport) -> None:
        self.report = report
        if not report.loaded:
            advice = "no key fits the module: check the source, prefix and key_map"
        elif report.complete:  # only keys the module has no place for
            count = len(report.unexpected)
            keys = ", ".join(repr(k) for k in report.unexpected[:3])
            more = f" and {count - 3} more" if count > 3 else ""
            advice = (
                f"{count} {'key' if count == 1 else 'keys'} of the source "
                f"{'does' if count == 1 else 'do'} not fit the module, e.g. {keys}{more}: a "
                "checkpoint of a larger or different model? Pass strict=False to load what "
                "fits (with a warning), or ignore_unexpected=[globs] for parts left out on "
                "purpose"
            )
        else:
            advice = "pass strict=False to load what fits"
        super().__init__(f"incomplete load ({advice}):\n{report}")


@dataclass
class LoadReport:
    """What a load did: where the weights came from, what loaded, and every key that did not fit.

    `format` is the detected container ("state_dict", "safetensors", "lightning", "timm",
    "trainer", "torchvision", "torchaudio") and `entry` the checkpoint key that held the state
    dict; `skipped` the pickled objects beside it that were not rebuilt (a Lightning
    checkpoint's hyper-parameters); `stripped` the wrapper prefixes removed; `dropped` the
    keys `key_map` removed; `mismatched` maps a key to its (checkpoint shape, model shape);
    `ignored` the source's keys without a place in the module that are left out on purpose
    (named by `ignore_unexpected`, or a Lightning module's other attributes beside the one
    loaded), which `unexpected` does not hold.
    """

    target: str
    source: str
    format: str
    entry: str | None = None
    skipped: list[str] = field(default_factory=list)
    stripped: list[str] = field(default_factory=list)
    prefix: str = ""
    renamed: int = 0
    dropped: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[Shape, Shape]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every tensor of the module was loaded (the source may hold more: `exact`)."""
        return not (self.missing or self.mismatched)

    @property
    def exact(self) -> bool:
        """Complete, and every key of the source found its place (those `ignored` aside):
        what `strict=True` requires, as torch's own strict loading does."""
        return self.complete and not self.unexpected

    def summary(self) -> str:
        """Several lines for the run log; lists show their first few keys and a count."""
        entry = f"['{self.entry}']" if self.entry else ""
        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        lines = [
            f"{self.target} <- {self.source} [{self.format}{entry}]: "
            f"loaded {len(self.loaded)}/{total} tensors"
        ]
        keys = []
        if self.skipped:
            keys.append(f"skipped pickled objects {preview(self.skipped)}")
        if self.stripped:
            keys.append("stripped " + ", ".join(repr(p) for p in self.stripped))
        if self.prefix:
            keys.append(f"selected {self.prefix!r}")
        if self.renamed:
            keys.append(f"key_map renamed {self.renamed}")
        if self.dropped:
            keys.append(f"key_map dropped {len(self.dropped)}: {preview(self.dropped)}")
        if self.ignored:
            keys.append(f"ignored {len(self.ignored)}: {preview(self.ignored)}")
        if keys:
            lines.append("  keys: " + "; ".join(keys))
        mismatched = [f"{k}: checkpoint {s} vs model {t}" for k, (s, t) in self.mismatched.items()]
        for name, items in (
            ("missing", self.missing),
            ("shape-mismatched", mismatched),
            ("unexpected", self.unexpected),
        ):
            if items:
                lines.append(f"  {len(items)} {name}: {preview(items)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass
class _Weights:
    """A state dict read from a source, with what the report says about where it came from."""

    state: dict[str, torch.Tensor]
    source: str
    format: str
    entry: str | None = None
    skipped: list[str] = field(default_factory=list)


@contextmanager
def uninitialized() -> Iterator[None]:
    """Build modules without initialising their weights: for weights about to be loaded
    (a stage-1 checkpoint), or never used (a dry run that only needs shapes and names).

    Inside, `torch.nn.init`'s in-place initialisers (`kaiming_uniform_`, `zeros_`, ...),
    which every torch layer's `reset_parameters` and torchvision's models call, leave the
    tensor as it is. That skips most of a ResNet's construction time (the Kaiming draws)
    and draws no random numbers. The tensors hold whatever their memory held: load every
    weight afterwards with a strict load (`load_weights`' default), which refuses a
    missing one. Not thread-safe (it swaps module attributes for the duration).
    """
    names = [name for name in vars(init) if name.endswith("_") and not name.startswith("_")]
    kept = {name: getattr(init, name) for name in names}
    try:
        for name in names:
            setattr(init, name, _left_as_is)
        yield
    finally:
        for name, function in kept.items():
            setattr(init, name, function)


def _left_as_is(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def load_weights(
    module: nn.Module,
    source: WeightsSource,
    *,
    prefix: str | None = None,
    key_map: Mapping[str, str | None] | None = None,
    strict: bool = True,
    ignore_unexpected: Sequence[str] = (),
) -> LoadReport:
    """Load weights from `source` into `module` and report what matched.

    `source` is a state dict or a checkpoint dict holding one; a path to a .pt/.pth/.bin,
    .safetensors, Lightning .ckpt, timm or fusion-trainer checkpoint; a torchvision weights
    enum member or its name ("ResNet18_Weights.IMAGENET1K_V1"); or a torchaudio Wav2Vec2Bundle
    or its name ("torchaudio.pipelines.WAV2VEC2_BASE"). Files are read with weights_only, and
    nothing in them is executed (see `_torch_load`).
    Keys go through, in order: `key_map` (regex -> replacement, on the keys as stored; a
    replacement of None drops the keys the regex finds, e.g. `{"^fc\\.": None}`), the
    automatic stripping of wrapper prefixes (kept only when more keys fit the module), and
    the selection of the sub-tree under `prefix` (None: the whole state dict). With `strict`,
    anything missing, shape-mismatched or unexpected (a key of the source the module has no
    place for: a checkpoint of a larger or different model) raises `IncompleteLoadError`
    before the module is touched, as torch's own strict loading does: a silent partial load
    is the bug this function exists to prevent. `ignore_unexpected` names, as globs on the
    module's key names (after `prefix`), the source's keys left out on purpose (a classifier
    head removed from the module, layers not built): they are reported as `ignored` and
    never raise. A load that fits no key at all raises `IncompleteLoadError` even without
    `strict`, and any other misfit without `strict` is logged as a warning. Torchvision and
    torchaudio weights are read from the torch hub cache only; when the file is not there,
    `WeightsUnavailableError` says where to put it, and nothing is downloaded. NaN or Inf in a tensor that would
    load into a floating-point parameter raises ValueError, also before the module is touched
    (buffers may hold Inf: an attention mask does).
    """
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {type(strict).__name__} {strict!r}")
    if isinstance(ignore_unexpected, str) or not all(isinstance(p, str) for p in ignore_unexpected):
        raise TypeError(
            f"ignore_unexpected must be a list of glob patterns, got {ignore_unexpected!r}"
        )
    prefix = prefix or ""
    weights = _read(source)
    state, renamed, dropped = _apply_key_map(weights.state, key_map or {})
    target = module.state_dict()
    roots = WRAPPER_PREFIXES
    if weights.format == "lightning":  # keys start with the LightningModule's attribute names
        roots += tuple(sorted({k.split(".")[0] + "." for k in state}))
    keyed, (state, stripped) = state, _strip_wrappers(state, target, prefix, roots)
    # A Lightning checkpoint loaded by one attribute (`model.`): its other attributes' keys
    # (a loss's buffers, metrics) are the LightningModule's, never this module's.
    others = set()
    if weights.format == "lightning" and stripped:
        others = {k.removeprefix(prefix) for k in _under(keyed, prefix)}
        others = {k for k in others if not k.startswith(stripped[0])}
    state = _select(state, prefix)
    report = LoadReport(
        target=type(module).__name__,
        source=weights.source,
        format=weights.format,
        entry=weights.entry,
        skipped=weights.skipped,
        stripped=stripped,
        prefix=prefix,
        renamed=renamed,
        dropped=dropped,
    )
    for key, value in state.items():
        if key not in target:
            ignored = key in others or any(fnmatch.fnmatchcase(key, p) for p in ignore_unexpected)
            (report.ignored if ignored else report.unexpected).append(key)
        elif target[key].shape != value.shape:
            report.mismatched[key] = (tuple(value.shape), tuple(target[key].shape))
        else:
            report.loaded.append(key)
    report.missing = [k for k in target if k not in state]
    if (strict and not report.exact) or (target and not report.loaded):
        raise IncompleteLoadError(report)
    _check_finite(module, state, report)
    if not report.complete:
        log.warning("partial load (strict=False): %s", report)
    elif not report.exact:
        log.warning("load with unexpected keys left out (strict=False): %s", report)
    module.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report


def _check_finite(module: nn.Module, state: Mapping[str, torch.Tensor], report: LoadReport) -> None:
    """Refuse NaN or Inf in the tensors that would load into the module's floating-point
    parameters, naming the source, how many and the first few (by the module's names)."""
    parameters = {
        name
        for name, parameter in module.named_parameters(remove_duplicate=False)
        if parameter.is_floating_point()
    }
    checked = [key for key in report.loaded if key in parameters]
    bad = []
    for key in checked:
        value = state[key]
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            counts = {"NaN": int(torch.isnan(value).sum()), "Inf": int(torch.isinf(value).sum())}
            found = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
            bad.append(f"{key} ({found} of {value.numel()} values)")
    if bad:
        raise ValueError(
            f"{report.target} <- {report.source}: expected finite values in the {len(checked)} "
            f"tensors that would load into its parameters, found NaN or Inf in {len(bad)}: "
            f"{preview(bad)}; nothing was loaded (a diverged or damaged checkpoint?)"
        )


def _read(source: WeightsSource) -> _Weights:
    """Turn any supported source into a state dict, detecting the container format."""
    if isinstance(source, Mapping):
        return _unpack(source, "mapping")
    if isinstance(source, WeightsEnum):
        return _from_torchvision(source)
    if isinstance(source, torchaudio.pipelines.Wav2Vec2Bundle):
        return _from_torchaudio(source)
    if isinstance(source, str) and not _looks_like_path(source):
        return _read(_weights_by_name(source))
    if isinstance(source, str | os.PathLike):
        return _read_file(Path(source).expanduser())
    raise TypeError(
        f"cannot load weights from a {type(source).__module__}.{type(source).__qualname__}; "
        "expected a state-dict mapping, a checkpoint path, a torchvision weights enum member "
        "or its name, or a torchaudio Wav2Vec2Bundle (for other bundles use bundle.get_model())"
    )


def _looks_like_path(text: str) -> bool:
    """A string is a path if it exists, has a directory part or a checkpoint suffix."""
    path = Path(text)
    return path.exists() or path.name != text or path.suffix.lower() in CHECKPOINT_SUFFIXES


def _read_file(path: Path) -> _Weights:
    """Read a checkpoint file without running anything pickled in it."""
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES)
        found = f"weights files in it: {preview(inside)}" if inside else "it holds none"
        raise ValueError(
            f"weights file {path} is a folder: expected a weights file (a torch checkpoint "
            f"or a safetensors file); {found}"
        )
    try:
        if path.suffix.lower() == ".safetensors":
            return _Weights(load_safetensors(path, device="cpu"), str(path), "safetensors")
        content, skipped = _torch_load(path)
    except Exception as err:
        raise _unreadable(path, err) from err
    if isinstance(content, Skipped):
        raise ValueError(
            f"weights file {path} holds a pickled {content.name} object, not a state dict: "
            "save `model.state_dict()` instead (a pickled object is never rebuilt)"
        )
    if not isinstance(content, Mapping):
        raise ValueError(f"weights file {path} holds a {type(content).__name__}, not a state dict")
    weights = _unpack(content, str(path))
    weights.skipped = skipped
    return weights


def _unreadable(path: Path, err: Exception) -> ValueError:
    """What failed in reading `path`, in torch's words minus its advice to load unsafely; a
    file that begins neither like a torch.save file nor like a safetensors file (a CSV given
    as weights) is called no weights file, rather than a damaged one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and "documentation" not in line]
    reason = f"{type(err).__name__}: {useful[0]}" if useful else type(err).__name__
    plain = plain_pickle(path)
    if plain is not None:
        return ValueError(f"weights file {path} is {plain}")
    blocked = re.search(r"GLOBAL ([\w.]+) whose module \w+ is blocked", str(err))
    if blocked:
        return ValueError(
            f"weights file {path} holds pickled code ({blocked.group(1)}), which is never run: "
            "expected tensors; save the state_dict alone"
        )
    with open(path, "rb") as handle:
        start = handle.read(START_SHOWN)
    header = start[SAFETENSORS_HEADER_AT : SAFETENSORS_HEADER_AT + 1]
    if start and not start.startswith(TORCH_SAVE_STARTS) and header != SAFETENSORS_HEADER_START:
        return ValueError(
            f"weights file {path} is not a weights file: expected a torch checkpoint or a "
            f"safetensors file, found one that begins with {start!r}"
        )
    return ValueError(
        f"weights file {path} is corrupt or truncated: expected a torch checkpoint or a "
        f"safetensors file, found {path.stat().st_size} bytes that do not read as one ({reason})"
    )


class Skipped:
    """Stands in for a pickled object that is not rebuilt: its class or function is never
    imported or called, and its arguments and state are kept only as data."""

    name = "object"

    def __new__(cls, *args: Any, **kwargs: Any) -> Skipped:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _torch_load(path: Path) -> tuple[Any, list[str]]:
    """`torch.load(weights_only=True)`, with the file's other globals read as `Skipped`.

    A Lightning checkpoint pickles its hyper-parameters (an optimizer's `functools.partial`,
    a module), which weights_only refuses. The names of those globals are read from the pickle
    without running it, and each is given to torch's own safe-globals allow-list as a
    `Skipped` stand-in, so the state dict loads and nothing from the file runs. Returns the
    content and the names stood in for.
    """
    names = []
    if zipfile.is_zipfile(path):  # torch.save's format; an older one loads as it is, or fails
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    stand_ins = [(type(name, (Skipped,), {"name": name}), name) for name in names]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True), names


def _unpack(content: Mapping[str, Any], source: str) -> _Weights:
    """Find the state dict in a checkpoint, telling the container format apart by its keys."""
    if _is_state_dict(content):
        return _Weights(dict(content), source, "state_dict")
    if any(k in content for k in LIGHTNING_KEYS) and _is_state_dict(content.get("state_dict")):
        return _Weights(dict(content["state_dict"]), source, "lightning", "state_dict")
    for entry, fmt in CONTAINER_ENTRIES:
        if _is_state_dict(content.get(entry)):
            return _Weights(dict(content[entry]), source, fmt, entry)
    raise ValueError(
        f"{source} holds no state dict: expected tensors, or one under "
        f"{[e for e, _ in CONTAINER_ENTRIES]}; its keys are {preview(list(map(str, content)))}"
    )


def _is_state_dict(value: object) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _weights_by_name(name: str) -> WeightsEnum | torchaudio.pipelines.Wav2Vec2Bundle:
    """Resolve 'ResNet18_Weights.IMAGENET1K_V1' or 'torchaudio.pipelines.WAV2VEC2_BASE'."""
    if name.startswith(TORCHAUDIO_PREFIX):
        bundle = getattr(torchaudio.pipelines, name.removeprefix(TORCHAUDIO_PREFIX), None)
        if isinstance(bundle, torchaudio.pipelines.Wav2Vec2Bundle):
            return bundle
        raise ValueError(
            f"{name!r} is not a torchaudio Wav2Vec2Bundle; close matches: "
            f"{_close_matches(name, _torchaudio_bundle_names())}"
        )
    try:
        return get_weight(name)
    except (ValueError, KeyError) as err:
        raise ValueError(
            f"{name!r} is neither an existing file nor a torchvision weights name like "
            f"'ResNet18_Weights.IMAGENET1K_V1'; close matches: "
            f"{_close_matches(name, _torchvision_weight_names())}"
        ) from err


def _torchvision_weight_names() -> list[str]:
    return [f"{type(w).__name__}.{w.name}" for m in list_models() for w in get_model_weights(m)]


def _torchaudio_bundle_names() -> list[str]:
    return [
        TORCHAUDIO_PREFIX + name
        for name, value in vars(torchaudio.pipelines).items()
        if isinstance(value, torchaudio.pipelines.Wav2Vec2Bundle)
    ]


def _close_matches(name: str, candidates: list[str]) -> list[str]:
    """Case-insensitive, since a weights name is easily mistyped in a config in the wrong case."""
    by_lower = {c.lower(): c for c in candidates}
    return [by_lower[m] for m in difflib.get_close_matches(name.lower(), by_lower, n=3)]


def _from_torchvision(weights: WeightsEnum) -> _Weights:
    """Read torchvision weights through the hub cache, as torchvision's own builders do."""
    fetch = partial(weights.get_state_dict, map_location="cpu", weights_only=True, check_hash=True)
    state = _from_hub(str(weights), weights.url, fetch)
    return _Weights(dict(state), str(weights), "torchvision")


def _from_torchaudio(bundle: torchaudio.pipelines.Wav2Vec2Bundle) -> _Weights:
    """Read a wav2vec2-family bundle's weights through the hub cache, as bundle.get_model does.

    torchaudio downloads `_path` (relative to its models url unless it is a url) with
    torch.hub.load_state_dict_from_url; `_get_state_dict` also applies the bundle's own
    fixes (ASR bundles drop unused output rows). Neither has a public alternative.
    """
    path = bundle._path
    url = path if path.startswith("https") else TORCHAUDIO_MODELS_URL + path
    fetch = partial(bundle._get_state_dict, {"map_location": "cpu", "weights_only": True})
    name = Path(urlparse(url).path).name
    return _Weights(dict(_from_hub(name, url, fetch)), f"torchaudio bundle {name}", "torchaudio")


def _from_hub(name: str, url: str, fetch: Callable[[], Mapping[str, Any]]) -> Mapping[str, Any]:
    """Run a torch hub fetch of a file that is in the cache; a file that is not there is a
    `WeightsUnavailableError` saying where to put it, before any network access (the fetch
    would download it: nothing is downloaded at run time)."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not cached.is_file():
        raise WeightsUnavailableError(name, url, cached)
    try:
        return fetch()
    except Exception as err:
        raise ValueError(
            f"cached weights {cached} are corrupt or truncated ({type(err).__name__}: "
            f"{err}); replace the file with a complete copy of {url}"
        ) from err


def _apply_key_map(
    state: dict[str, torch.Tensor], key_map: Mapping[str, str | None]
) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """Rename keys with each regex -> replacement in turn (None: drop the key); refuse to
    merge two keys into one. Returns the new state, the number renamed and the keys dropped."""
    patterns = []
    for pattern, replacement in key_map.items():
        try:
            patterns.append((re.compile(pattern), replacement))
        except re.error as err:
            raise ValueError(f"key_map pattern {pattern!r} is not a valid regex: {err}") from None
    renamed: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    dropped = []
    for key, value in state.items():
        new: str | None = key
        for pattern, replacement in patterns:
            if replacement is not None:
                new = pattern.sub(replacement, new)
            elif pattern.search(new):
                new = None
                break
        if new is None:
            dropped.append(key)
            continue
        if new in origin:
            raise ValueError(f"key_map maps both {origin[new]!r} and {key!r} to {new!r}")
        origin[new] = key
        renamed[new] = value
    return renamed, sum(new != old for new, old in origin.items()), dropped


def _strip_wrappers(
    state: dict[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    prefix: str,
    roots: tuple[str, ...],
    depth: int = MAX_WRAPPERS,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip the chain of wrapper prefixes that makes the most keys fit the module.

    A chain is searched, not built greedily, because a first strip may fit nothing by itself
    ('model._orig_mod.' from a compiled model in Lightning). `roots` (wrappers, plus Lightning
    attribute names) are tried first, wrappers inside them. Ties keep the shorter chain, so
    keys that legitimately start with 'model.' stay.
    """
    best: tuple[dict[str, torch.Tensor], list[str]] = (state, [])
    best_rank = (_fit(state, target, prefix), 0)
    if depth == 0:
        return best
    for root in roots:
        if (shorter := _strip(state, root)) is None:
            continue
        out, chain = _strip_wrappers(shorter, target, prefix, WRAPPER_PREFIXES, depth - 1)
        rank = (_fit(out, target, prefix), -1 - len(chain))
        if rank > best_rank:
            best, best_rank = (out, [root, *chain]), rank
    return best


def _strip(state: dict[str, torch.Tensor], root: str) -> dict[str, torch.Tensor] | None:
    """`state` with `root` removed from the keys that have it; None if nothing or a clash."""
    out = {k.removeprefix(root): v for k, v in state.items()}
    return out if len(out) == len(state) and out.keys() != state.keys() else None


def _fit(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many keys under `prefix` would load: same name and same shape in the module."""
    under = _under(state, prefix)
    return sum(k in target and target[k].shape == v.shape for k, v in under.items())


def _under(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _select(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The sub-tree under `prefix`; an empty one is a wrong prefix, not an empty load."""
    under = _under(state, prefix)
    if prefix and not under:
        depth = max(prefix.count("."), 1)
        roots = sorted({".".join(k.split(".")[:depth]) + "." for k in state})
        raise ValueError(f"no key starts with prefix {prefix!r}; keys start with {preview(roots)}")
    return under
