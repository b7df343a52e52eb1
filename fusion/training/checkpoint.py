"""Checkpoints written atomically, with metadata to tell whether one still matches.

Files are written under a temporary name beside their final one and renamed when complete.
The temporary is created like any `open()` would create a file, so it honours the umask
(a group can share the caches), and its name says which process on which host writes it,
so the temporaries of a killed writer are recognised and removed by the next writer into
that folder, while those of live writers are left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import secrets
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from fusion.pickles import plain_pickle

log = logging.getLogger("fusion")

TEMPORARY_SUFFIX = ".tmp"
TORCH_SAVE_STARTS = (b"PK\x03\x04", b"\x80")  # a zip archive (torch >= 1.6), a pickle


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupt, holding more than data, or lacking an
    entry. The message names the file, what was expected and what was found."""


def temporary_name(name: str, pid: int | None = None, host: str | None = None) -> str:
    """A hidden temporary name for a file `name`, saying which process on which host writes
    it: `.<name>.<random>.<pid>@<host>.tmp` (a host name never holds an `@`)."""
    pid = os.getpid() if pid is None else pid
    host = socket.gethostname() if host is None else host
    return f".{name}.{secrets.token_hex(4)}.{pid}@{host}{TEMPORARY_SUFFIX}"


def temporary_writer(name: str) -> tuple[int, str] | None:
    """The (pid, host) of a `temporary_name`, or None for any other file name."""
    match = re.fullmatch(r"\..+\.[0-9a-f]{8}\.(\d+)@([^@/]+)\.tmp", name)
    return None if match is None else (int(match.group(1)), match.group(2))


def process_exists(pid: int) -> bool:
    """Whether a process `pid` runs on this host (one of another user counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries in `folder` whose writer, a process on this host, is gone (a
    killed write); keep those of live processes and of other hosts. Returns the removed."""
    host = socket.gethostname()
    removed = []
    for path in folder.glob(f".*{TEMPORARY_SUFFIX}"):
        writer = temporary_writer(path.name)
        if writer is None or writer[1] != host or process_exists(writer[0]):
            continue
        with contextlib.suppress(FileNotFoundError):  # another writer removed it first
            size = path.stat().st_size
            path.unlink()
            log.warning(
                "removed %s (%d bytes), left by process %d, which was killed while writing it",
                path,
                size,
                writer[0],
            )
            removed.append(path)
    return removed


def create_temporary(path: Path) -> Path:
    """Create an empty, new temporary file beside `path`, with the permissions `open()` gives
    (0o666 less the umask), unlike `tempfile.mkstemp`'s 0o600."""
    while True:
        tmp = path.with_name(temporary_name(path.name))
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # the same random part twice: draw again
            continue
        return tmp


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed to `path` only if the block succeeds, so a
    crash never leaves half a file under the final name (see the module's docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = create_temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def unreadable(path: Path, err: Exception) -> CheckpointError:
    """Why `torch.load` failed on `path`, said without pointing at `weights_only=False`:
    a file holding pickled Python objects, or a corrupt or truncated one."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    if isinstance(err, pickle.UnpicklingError) and found:
        return CheckpointError(
            f"checkpoint {path} could not be read: expected tensors and plain values only, "
            f"found the Python object {found.group(1)}; it is not loaded, since loading it "
            "would run code. Save the weights alone (a state_dict) instead"
        )
    with open(path, "rb") as handle:
        start = handle.read(4)
    if start and not start.startswith(TORCH_SAVE_STARTS):
        return CheckpointError(
            f"checkpoint {path} could not be read: it is not a checkpoint (expected a file "
            f"written by torch.save, a zip archive or a pickle; found one that begins with "
            f"{start!r})"
        )
    detail = type(err).__name__
    first = str(err).split(". ")[0].splitlines()[0] if str(err) else ""
    if first and not isinstance(err, pickle.UnpicklingError):  # that one says weights_only
        detail += f": {first}"
    return CheckpointError(
        f"checkpoint {path} could not be read: it is corrupt or truncated (expected a file "
        f"written by torch.save, found {path.stat().st_size} bytes that torch.load cannot "
        f"read, {detail}); write it again"
    )


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint on CPU, running no pickled code, and check it is a dict holding the
    `required` entries; anything else is a `CheckpointError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path}: expected a file, found a directory")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb"):  # a file we may not read fails here, as what it is (permissions)
        pass
    plain = plain_pickle(path)  # told before torch.load, which warns about its protocol
    if plain is not None:
        raise CheckpointError(f"checkpoint {path} could not be read: it is {plain}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # whatever torch.load trips on in a damaged file
        raise unreadable(path, err) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path}: expected a dict of entries, found a {type(state).__name__}"
        )
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {missing}: expected the entries {list(required)}, "
            f"found {sorted(state)}"
        )
    return state


def data_record(datasets: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint keeps of the data it was trained on, to refuse a resume on other
    data with `data_changes`: each split's content key (`data_keys`) and, from datasets that
    offer `row_record()` (the manifest), a short digest of each cell (`data_rows`: 4 bytes
    a cell, so 1e5 rows of 4 columns add 1.6 MB), which names the row and file that
    changed."""
    from fusion.training.feature_cache import data_key  # it imports this module

    record: dict[str, Any] = {"data_keys": {s: data_key(d) for s, d in datasets.items()}}
    rows = {
        s: d.row_record() for s, d in datasets.items() if callable(getattr(d, "row_record", None))
    }
    if rows:
        record["data_rows"] = rows
    return record


def data_changes(state: Mapping[str, Any], datasets: Mapping[str, Any]) -> str | None:
    """How `datasets` differ from the data a checkpoint `state` (with a `data_record`) was
    trained on: each changed split named, with the first changed data row, column and file
    when the state holds row records, and the unchanged splits; None when nothing changed
    (or the state holds no keys). For example "split 'test' changed: data row 81, column
    'image': images/test_0.png has other bytes; the train and val splits are unchanged"."""
    from fusion.training.feature_cache import data_key  # it imports this module

    keys = state.get("data_keys", {})
    compared = [s for s in keys if s in datasets]
    changed = [s for s in compared if data_key(datasets[s]) != keys[s]]
    if not changed:
        return None
    said = []
    for split in changed:
        stored = state.get("data_rows", {}).get(split)
        how = getattr(datasets[split], "row_changes", None)
        detail = f": {how(stored)}" if stored is not None and callable(how) else ""
        said.append(f"split '{split}' changed{detail}")
    same = [s for s in compared if s not in changed]
    if same:
        names = " and ".join([", ".join(same[:-1]), same[-1]] if len(same) > 1 else same)
        said.append(f"the {names} split{'s are' if len(same) > 1 else ' is'} unchanged")
    return "; ".join(said)
