"""Tell what a pickle file is without unpickling it (which can run any code).

`torch.load(weights_only=True)` refuses files written by `pickle.dump` and files naming code
alike, with advice to load unsafely. The weights loader and the checkpoint loader both say
instead what such a file is, read from its opcodes (`pickletools.genops`), nothing run.
"""

from __future__ import annotations

import pickle
import pickletools
from pathlib import Path

# How a pickle begins (PROTO), and how torch.save's legacy format (torch < 1.6: a pickle, not
# a zip archive; see `fusion.training.checkpoint.TORCH_SAVE_STARTS`) begins: its magic number.
PICKLE_START = b"\x80"
LEGACY_TORCH_SAVE_START = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
# The modules whose callables pickle.dump of tensors or arrays names (to rebuild them, their
# storages and their containers); a pickle naming any other one names code.
TENSOR_PICKLE_MODULES = ("torch", "collections", "_codecs", "numpy")
PREVIEW = 5


def plain_pickle(path: Path) -> str | None:
    """What `path` is, if `pickle.dump` wrote it rather than `torch.save` ("a plain pickle
    ... ; it is not loaded ..."), or None.

    Such a file begins like a pickle of protocol 2 or later (pickle.dump's default is 4 or
    5), but neither as torch.save's zip archive nor as its legacy format, and weights_only
    loading cannot read it. A safetensors file (whose header size may begin with 0x80) is
    never one.
    """
    if path.suffix.lower() == ".safetensors":
        return None
    with open(path, "rb") as handle:
        start = handle.read(len(LEGACY_TORCH_SAVE_START))
    protocol = start[1] if len(start) > 1 else -1  # PROTO's argument
    if not start.startswith(PICKLE_START) or not 2 <= protocol <= pickle.HIGHEST_PROTOCOL:
        return None
    if start == LEGACY_TORCH_SAVE_START:
        return None
    code = pickled_code(path)
    if code:
        return (
            f"a plain pickle (written by pickle.dump, not torch.save) that names code "
            f"({preview(code)}); it is not loaded, since unpickling it would run that code: "
            "expected tensors; save the state_dict alone, with "
            "torch.save(model.state_dict(), path) or safetensors"
        )
    return (
        "a plain pickle (written by pickle.dump), not a torch.save file; it is not loaded, "
        "since unpickling an arbitrary pickle can run code: load it where you trust it and "
        "re-save the tensors with torch.save(state_dict, path) or "
        "safetensors.torch.save_file(state_dict, path)"
    )


def pickled_code(path: Path) -> list[str]:
    """The globals a pickle names outside the modules that rebuild tensors and arrays."""
    return [n for n in pickled_globals(path) if n.split(".")[0] not in TENSOR_PICKLE_MODULES]


def pickled_globals(path: Path) -> list[str]:
    """The `module.name` of each global a pickle names, in order, read from its opcodes
    (nothing is run); a truncated pickle gives those before the cut."""
    names: list[str] = []
    strings: list[str] = []  # the strings pushed so far, the last ones on top
    memo: dict[int, str | None] = {}
    top: str | None = None  # the string the last opcode pushed, if it pushed one
    with open(path, "rb") as handle:
        try:
            for opcode, arg, _ in pickletools.genops(handle):
                op = opcode.name
                if op in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):  # the stack stays
                    memo[len(memo) if op == "MEMOIZE" else arg] = top
                    continue
                top = None
                if isinstance(arg, str) and ("UNICODE" in op or "STRING" in op):
                    top = arg
                elif op in ("GET", "BINGET", "LONG_BINGET"):
                    top = memo.get(arg)
                elif op in ("GLOBAL", "INST"):
                    names.append(arg.replace(" ", "."))
                elif op == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                if top is not None:
                    strings.append(top)
        except Exception:  # a truncated or damaged pickle: what was read so far
            pass
    return list(dict.fromkeys(names))


def preview(items: list[str]) -> str:
    """The first few `items`, and how many more there are."""
    shown = ", ".join(items[:PREVIEW])
    return shown + (f" and {len(items) - PREVIEW} more" if len(items) > PREVIEW else "")
