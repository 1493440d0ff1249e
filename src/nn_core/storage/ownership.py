"""Who owns an output path, and one writer per run directory.

nn-core writes only into a path that is absent, an empty directory, or holds what the
writing function would itself write, and replaces that only through the atomic protocol
of ``nn_core.storage.checkpoint`` (new contents complete beside it, then a rename). Every other
target is refused with an ``OutputError`` naming the path; an nn-core directory of another
kind is replaced only with ``overwrite=True`` (CLI: ``--force``), and a directory that is
not recognisably nn-core's is never deleted, not even then.

Kinds of path (``classify``):

    absent    nothing there
    empty     an empty directory
    model     an nn-core model directory: state.json with "library": "nn-core" and
              "kind": "model", and nothing but model.safetensors and state.json
    training  an nn-core training checkpoint: the same with "kind": "training"
              (model.safetensors, optimizer.safetensors, state.json)
    run       an nn-core run directory: it holds the marker file ``.nn-core-run``,
              written when the directory is created (it is also the writers' lock file,
              see ``RunLock``); runs written before the marker existed are recognised by
              a run.json of ``nn-core train`` or by step checkpoints of nn-core. Entries
              nn-core does not write there are listed in ``Ownership.foreign``: such a
              run directory still takes new checkpoints, but is never replaced or deleted
    weights   an nn-core weights file (``export``): safetensors whose metadata says
              "format": "nn-core-weights"
    foreign   anything else: a directory holding other files, a plain file where a
              directory goes, a symbolic link, a device

Who checks what:

    a directory written whole (save_model, Trainer.save, import)  check_dir_output
    a file written whole (export)                                 check_file_output
    step checkpoints written into a run directory (Trainer)       run_dir_writer
    any other output file (bench --out, train --out's parent)      check_writable_file

Parent directories are never created: an output's parent must exist and be writable (the
one exception, the CLI's default ``runs/``, is made by ``nn-core train`` itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..errors import InUseError, OutputError
from .names import (
    LATEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    PLOTS_DIR,
    RUN_MARKER,
    STATE_FILE,
    STEP_DIR_RE,
    WEIGHTS_FORMAT,
)

try:  # POSIX advisory locks; where missing (Windows) only threads of one process are excluded
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms CI runs
    fcntl = None  # type: ignore[assignment]

PathLike = str | os.PathLike[str]

ABSENT, EMPTY, MODEL, TRAINING, RUN, WEIGHTS, FOREIGN = (
    "absent",
    "empty",
    "model",
    "training",
    "run",
    "weights",
    "foreign",
)
# the files nn-core itself writes into a run directory (besides step_XXXXXX checkpoints)
RUN_FILES = frozenset(
    {
        RUN_MARKER,
        "run.json",
        "tokenizer.json",
        "tokenizer_config.json",  # BOS / EOS of a tokenizers-library tokenizer
        LATEST_FILE,
        "metrics.jsonl",
        "loss_curve.png",
        "summary.json",
        "sample.txt",
    }
)
CHECKPOINT_FILES = {
    # a model directory may carry its tokenizer (nn-core import of a Hugging Face model)
    MODEL: frozenset({MODEL_FILE, STATE_FILE, "tokenizer.json", "tokenizer_config.json"}),
    TRAINING: frozenset({MODEL_FILE, OPTIMIZER_FILE, STATE_FILE}),
}
WHAT = {  # how messages name each kind
    MODEL: "an nn-core model directory",
    TRAINING: "an nn-core training checkpoint",
    RUN: "an nn-core run directory",
    WEIGHTS: "an nn-core weights file",
}
# temp entries of an interrupted atomic save: .NAME.tmp-XXXX (mkstemp/mkdtemp) and
# .NAME.old-XXXX (the previous version moved aside while being replaced)
_TEMP_RE = re.compile(r"^\..+\.(?:tmp|old)-[A-Za-z0-9_]+$")
_SMALL_JSON = 64 << 20  # state.json / run.json larger than this is not ours


@dataclass(frozen=True)
class Ownership:
    """What ``classify`` found at a path."""

    path: Path
    kind: str  # ABSENT, EMPTY, MODEL, TRAINING, RUN, WEIGHTS or FOREIGN
    detail: str = ""  # FOREIGN: what is there, for messages
    foreign: tuple[str, ...] = ()  # RUN: entries nn-core did not write
    has_checkpoints: bool = False  # RUN: holds a step checkpoint or a latest pointer


def _read_small_json(path: Path) -> object:
    """The parsed JSON of a small regular file, or None if it is anything else."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _SMALL_JSON:
            return None
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def checkpoint_kind(path: Path) -> str | None:
    """MODEL or TRAINING if ``path/state.json`` is an nn-core state file, else None (the
    marker only; ``nn_core.storage.checkpoint`` verifies checkpoints when it reads them)."""
    state = _read_small_json(path / STATE_FILE)
    if isinstance(state, dict) and state.get("library") == "nn-core":
        kind = state.get("kind")
        if kind in (MODEL, TRAINING):
            return str(kind)
    return None


def _is_run_json(path: Path) -> bool:
    """run.json of ``nn-core train``: "library": "nn-core", or (runs before that field) a
    command line starting with nn-core."""
    doc = _read_small_json(path)
    if not isinstance(doc, dict):
        return False
    command = doc.get("command")
    return doc.get("library") == "nn-core" or (
        isinstance(command, list) and command[:1] == ["nn-core"]
    )


def is_weights_file(path: Path) -> bool:
    """True if ``path`` is a safetensors file whose metadata says it is nn-core's export."""

    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return False
            (size,) = struct.unpack("<Q", head)
            if size > 100 << 20:  # safetensors' own header limit
                return False
            header = json.loads(f.read(size).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and meta.get("format") == WEIGHTS_FORMAT


def _names(entries: list[str], limit: int = 3) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def classify(path: PathLike) -> Ownership:
    """What is at ``path``, from nn-core's point of view (see the module docstring)."""
    p = Path(path)
    if p.is_symlink():
        return Ownership(p, FOREIGN, "a symbolic link")
    if not os.path.lexists(p):
        return Ownership(p, ABSENT)
    if p.is_file():
        if is_weights_file(p):
            return Ownership(p, WEIGHTS)
        return Ownership(p, FOREIGN, "a file")
    if not p.is_dir():
        return Ownership(p, FOREIGN, "neither a regular file nor a directory")
    try:
        entries = sorted(os.listdir(p))
    except OSError as exc:
        return Ownership(p, FOREIGN, f"a directory nn-core cannot list ({exc.strerror})")
    if not entries:
        return Ownership(p, EMPTY)
    kind = checkpoint_kind(p)
    if kind is not None:
        extra = [e for e in entries if e not in CHECKPOINT_FILES[kind]]
        if extra:
            return Ownership(p, FOREIGN, f"{WHAT[kind]} with other files in it ({_names(extra)})")
        return Ownership(p, kind)
    foreign: list[str] = []
    evidence = has_checkpoints = False
    for name in entries:
        entry = p / name
        if not os.path.lexists(entry):
            continue  # removed while listing
        plain_file = entry.is_file() and not entry.is_symlink()
        if name == RUN_MARKER and plain_file:
            evidence = True
        elif name == "run.json" and plain_file and _is_run_json(entry):
            evidence = True
        elif name in RUN_FILES and name != "run.json" and plain_file:
            has_checkpoints = has_checkpoints or name == LATEST_FILE
        elif name == PLOTS_DIR and is_plots_dir(entry):
            pass  # the run's plots
        elif STEP_DIR_RE.match(name) and not entry.is_symlink() and _is_training(entry):
            evidence = has_checkpoints = True
        elif _TEMP_RE.match(name) and not entry.is_symlink():
            pass  # an interrupted save's temp or moved-aside entry
        else:
            foreign.append(name)
    if evidence:
        return Ownership(p, RUN, foreign=tuple(foreign), has_checkpoints=has_checkpoints)
    return Ownership(p, FOREIGN, f"a directory holding {_names(entries)}")


def is_plots_dir(path: Path) -> bool:
    """A run's plots/ as nn-core writes it: a real directory holding only PNG files (and
    temp entries of an interrupted atomic write)."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        entries = os.listdir(path)
    except OSError:
        return False
    for name in entries:
        entry = path / name
        if entry.is_symlink() or not entry.is_file():
            return False
        if not (name.endswith(".png") or _TEMP_RE.match(name)):
            return False
    return True


def _is_training(path: Path) -> bool:
    return classify(path).kind == TRAINING


# ---- checks before writing -------------------------------------------------------------


def check_not_cwd(path: PathLike) -> None:
    """Refuse the current directory and its ancestors as an output directory."""
    p = Path(path)
    resolved, cwd = p.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(
            f"{p} is the current directory or one of its parents; give the name of a new directory"
        )


def check_parent(path: PathLike) -> None:
    """The parent directory of ``path`` must exist and be writable (never created here)."""
    p = Path(path)
    parent = p.absolute().parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise OutputError(
            f"cannot write {p}: its parent directory {parent} {what} (nn-core does not create it)"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {p}: its parent directory {parent} is not writable")


def check_writable_file(path: PathLike) -> None:
    """``path`` can be written as a file: not a directory, its parent exists and is
    writable, an existing file is writable. Call before long work."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{p} is a directory; give a file name")
    check_parent(p)
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputError(f"cannot write {p}: permission denied")


def check_dir_output(
    path: PathLike, writes: str, *, overwrite: bool = False, force: str = "overwrite=True"
) -> Ownership:
    """May a directory of kind ``writes`` (MODEL or TRAINING) be written whole at ``path``?

    Yes if it is absent, empty or of kind ``writes``; an nn-core directory of another kind
    only with ``overwrite``; never a foreign one. Returns what is there; raises
    OutputError (naming ``force``, the option that replaces) otherwise.
    """
    p = Path(path)
    check_not_cwd(p)
    check_parent(p)
    with locked_if_run(p):  # a run being written is neither judged nor replaced
        info = classify(p)
    if info.kind in (ABSENT, EMPTY, writes):
        return info
    if info.kind in (MODEL, TRAINING) or (info.kind == RUN and not info.foreign):
        if overwrite:
            return info
        raise OutputError(
            f"{p} holds {WHAT[info.kind]}; refusing to replace it with {WHAT[writes]} "
            f"({force} replaces it)"
        )
    raise refuse_foreign(info, force)


def refuse_foreign(info: Ownership, force: str | None) -> OutputError:
    """The error for a directory nn-core does not own (even ``force`` does not replace it)."""
    never = "" if force is None else f", not even with {force}"
    if info.kind == WEIGHTS or info.detail == "a file":
        return OutputError(
            f"{info.path} is a file, where a directory is needed; refusing to replace it "
            f"(files are never replaced by directories{never}); give a new or empty directory"
        )
    if info.kind == RUN:
        detail = f"{WHAT[RUN]} with files nn-core did not write ({_names(list(info.foreign))})"
    else:
        detail = info.detail
    return OutputError(
        f"{info.path} is {detail}; refusing to write there (nn-core never deletes what it "
        f"did not write{never}); give a new or empty directory"
    )


def check_file_output(
    path: PathLike, *, overwrite: bool = False, force: str = "overwrite=True"
) -> Ownership:
    """May a file be written at ``path``? Yes if absent or an nn-core weights file; any
    other file only with ``overwrite``; never a directory. The parent must exist."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        raise OutputError(f"{p} is a directory; give a file name, e.g. model.safetensors")
    check_writable_file(p)
    info = classify(p)
    if info.kind in (ABSENT, WEIGHTS) or overwrite:
        return info
    raise OutputError(
        f"{p} already exists and is not an nn-core weights file; refusing to overwrite it "
        f"({force} replaces it)"
    )


# ---- replacing a directory -------------------------------------------------------------


def move_aside(path: Path) -> Path:
    """Rename directory ``path`` to ``.<name>.old-XXXX/<name>`` beside it (one rename, so a
    crash leaves it whole there); returns the ``.old-`` directory to delete afterwards."""
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    try:
        os.rename(path, old / path.name)
    except BaseException:
        os.rmdir(old)
        raise
    return old


def delete_moved(old: Path) -> None:
    """Delete what ``move_aside`` moved (it was checked to be nn-core's before)."""
    shutil.rmtree(old, ignore_errors=True)


# ---- one writer per run directory ------------------------------------------------------


def _marker_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace")
    except OSError:
        return "unknown"
    found = re.search(r"pid (\d+)", text)
    return found.group(1) if found else "unknown"


class RunLock:
    """The exclusive lock of one run directory: ``flock`` on its ``.nn-core-run`` file.

    The lock belongs to the open file, so it dies with the process (``kill -9`` never
    leaves a stale lock); the file stays as the directory's marker and holds the pid of
    the newest writer. Taking it again in the same thread nests (the CLI holds it for
    the whole of ``nn-core train``, the Trainer takes it for each write); another thread
    or process gets ``InUseError`` at once, naming the directory and the holder's pid.
    """

    # (st_dev, st_ino) of the directory -> [fd, depth, thread id]; by inode, not by path,
    # so a directory renamed aside while locked is not confused with its replacement
    _held: ClassVar[dict[tuple[int, int], list[int]]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, run_dir: PathLike) -> None:
        self.dir = Path(run_dir)
        self._key: tuple[int, int] | None = None

    def acquire(self) -> RunLock:
        st = os.stat(self.dir)
        self._key = (st.st_dev, st.st_ino)
        with RunLock._guard:
            held = RunLock._held.get(self._key)
            if held is not None:
                if held[2] != threading.get_ident():
                    raise InUseError(
                        f"{self.dir} is being written by another thread of this process "
                        f"(pid {os.getpid()}); one writer per run directory"
                    )
                held[1] += 1
                return self
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(self.dir / RUN_MARKER, flags, 0o666)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise InUseError(
                            f"{self.dir} is being written by another process (pid "
                            f"{_marker_pid(fd)}); one writer per run directory: wait for it "
                            "to finish or give another --out"
                        ) from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"nn-core run directory; writer pid {os.getpid()}\n".encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            RunLock._held[self._key] = [fd, 1, threading.get_ident()]
        return self

    def release(self) -> None:
        with RunLock._guard:
            held = None if self._key is None else RunLock._held.get(self._key)
            if held is None or self._key is None:
                return
            held[1] -= 1
            if held[1] == 0:
                del RunLock._held[self._key]
                os.close(held[0])  # closing the last descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def locked_if_run(path: PathLike) -> Iterator[None]:
    """Hold the lock of ``path`` for the block if it is a (marked) run directory, so what
    is classified or replaced there is not being written meanwhile; InUseError if another
    writer holds it."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink() and (p / RUN_MARKER).is_file():
        with RunLock(p):
            yield
    else:
        yield


@contextlib.contextmanager
def run_dir_writer(run_dir: PathLike) -> Iterator[Path]:
    """Write into run directory ``run_dir`` for the duration of the block, as its only writer.

    Absent: created (its parent must exist); empty: adopted; an nn-core run directory:
    continued. Anything else (a checkpoint, a foreign directory) is refused with
    OutputError. The directory's lock (``RunLock``) is held for the whole block; another
    writer gets InUseError.
    """
    p = Path(run_dir)
    if not os.path.lexists(p):
        check_parent(p)
        with contextlib.suppress(FileExistsError):
            p.mkdir()
    with locked_if_run(p):  # classified while no other writer changes it
        info = classify(p)
        if info.kind not in (EMPTY, RUN):
            if info.kind in (MODEL, TRAINING):
                raise OutputError(
                    f"{p} is {WHAT[info.kind]}, not a run directory; give a new, empty or "
                    "run directory for step checkpoints"
                )
            raise refuse_foreign(info, None)
        with RunLock(p):
            yield p
