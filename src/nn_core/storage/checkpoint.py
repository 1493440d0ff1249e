"""Checkpoints: safetensors + JSON directories, written atomically, verified on load.

No pickle anywhere: tensors are safetensors files and everything else is JSON, so
loading a checkpoint can never run code.

Layout of a training checkpoint directory (``Trainer.save``)::

    step_000100/
      model.safetensors      one tensor per parameter, the model's names
                             (embed.weight, layers.0.attn.q_proj.weight, ...)
      optimizer.safetensors  AdamW moments per parameter: "m.<name>", "v.<name>"
      state.json             format_version, library "nn-core", kind "training", config,
                             dtype, train_config, step, optimizer {"type", "t"},
                             rng_state, data_state, files {name: {"sha256", "bytes"}},
                             state_sha256

A model-only directory (``save_model``, for inference) holds model.safetensors and a
state.json of kind "model" (format_version, library, kind, config, dtype, files,
state_sha256). A run directory holds step checkpoints ``step_XXXXXX``, a ``latest`` file
naming the newest one and the marker ``.nn-core-run`` (``nn_core.storage.ownership``); every
loader accepts either a checkpoint directory or a run directory.

Writes are atomic: files go to a temporary directory beside the target, are fsynced,
the directory is renamed into place and the parent fsynced; ``latest`` is replaced
(temp file + rename) only afterwards. A crash, a full disk or any other error at any
point leaves the previous checkpoint complete and ``latest`` pointing at it. A save
replaces only what ``nn_core.storage.ownership`` allows (absent, empty, or the same kind of
nn-core directory; another nn-core kind with ``overwrite=True``; never a foreign one).

Checkpoints are byte-reproducible: the safetensors header is written here with sorted
keys, tensors laid out by name, and state.json holds no timestamp, so two identical
runs write identical files (their SHA-256s can be compared across runs).

Loading checks, in order: state.json parses (any malformed shape is a CheckpointError),
its format version (1 or 2), its own SHA-256 (``state_sha256``: of the canonical JSON of
all other fields; version 2, so state.json and the tensor files it hashes are verified as
one unit), every field's type and range (config, dtype, files; for training checkpoints
train_config, step >= 0 equal to the optimizer's t, the generator state), then for
each tensor file its size (truncation), SHA-256 (any flipped byte), tensor names,
shapes and dtypes against the config. Version-1 checkpoints (no ``state_sha256``) load
with every check but the state checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..checks import check_generator_state, is_int
from ..errors import CheckpointError, ConfigError, OutputError
from ..model.config import Config
from .names import LATEST_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, STEP_DIR_RE

if TYPE_CHECKING:
    from ..model.transformer import MoETransformer

FORMAT_VERSION = 2  # written; 2 added state_sha256 (and dropped saved_at)
READABLE_VERSIONS = (1, 2)
STATE_CHECKSUM = "state_sha256"  # state.json's own SHA-256 (of the other fields)
_TMP_MARK = ".tmp-"
_MAX_STATE_BYTES = 64 << 20  # a state.json larger than this is not one of ours
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMON_FIELDS = ("format_version", "library", "kind", "config", "dtype", "files")
_TRAINING_FIELDS = ("train_config", "step", "optimizer", "rng_state", "data_state")
_ST_DTYPES = {"float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32"}

PathLike = str | os.PathLike[str]


def _fault_point(stage: str) -> None:
    """Does nothing. Tests replace it to simulate a crash at a named stage of a save:
    "model_written", "optimizer_written", "state_written", "before_rename",
    "after_rename", "before_latest"."""


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint after ``step`` updates: step_000100."""
    return f"step_{step:06d}"


# ---- low-level file helpers ------------------------------------------------------------


def sha256_file(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX; a no-op where dirs cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_safetensors(
    path: PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file whose bytes depend only on its contents; fsync it.

    The format: an 8-byte little-endian header length, the JSON header ({name: {"dtype",
    "shape", "data_offsets"}}, "__metadata__": {str: str}), padded with spaces to a
    multiple of 8, then the raw little-endian tensor data. Here the header's keys are
    sorted at every level and the tensors laid out by (larger itemsize first, name), so
    two saves of equal tensors are byte-identical (safetensors' own writer orders the
    metadata differently from run to run). The file is created with the umask's mode.
    Reading goes through the safetensors library, which checks the layout.
    """
    arrays = {}
    for name, value in tensors.items():
        arr = np.ascontiguousarray(value)
        if str(arr.dtype) not in _ST_DTYPES:
            raise CheckpointError(f"cannot store tensor {name} of dtype {arr.dtype}")
        arrays[name] = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    order = sorted(arrays, key=lambda n: (-arrays[n].itemsize, n))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in order:
        arr = arrays[name]
        header[name] = {
            "dtype": _ST_DTYPES[str(arr.dtype.newbyteorder("="))],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    with os.fdopen(os.open(path, flags, 0o666), "wb") as f:  # 0o666 less the umask
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            f.write(arrays[name].reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())


def _write_tensors(path: Path, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    metadata = {"format": "nn-core", "format_version": str(FORMAT_VERSION)}
    write_safetensors(path, tensors, metadata)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _to_json(obj: Any) -> Any:
    """NumPy scalars/arrays -> JSON values (arrays as a tagged dict, decoded on load)."""
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(
        f"cannot store a {type(obj).__name__} in state.json (data state must be JSON-like)"
    )


_NDARRAY_KEYS = {"__ndarray__", "dtype", "shape"}


def _from_json(obj: Any, where: Path) -> Any:
    """JSON values -> Python values, tagged arrays decoded; a bad tag is a CheckpointError."""
    if isinstance(obj, dict):
        if set(obj) == _NDARRAY_KEYS:
            return _decode_array(obj, where)
        return {k: _from_json(v, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v, where) for v in obj]
    return obj


def _decode_array(obj: dict[str, Any], where: Path) -> np.ndarray:
    dtype, shape = obj["dtype"], obj["shape"]
    try:
        dt = np.dtype(dtype) if isinstance(dtype, str) else None
    except TypeError:
        dt = None
    if dt is None or dt.kind not in "biuf":
        raise CheckpointError(f"{where}: an array has dtype {dtype!r} (bool, int or float needed)")
    if not isinstance(shape, list) or not all(is_int(n) and n >= 0 for n in shape):
        raise CheckpointError(f"{where}: an array has shape {shape!r} (a list of ints >= 0)")
    try:
        return np.array(obj["__ndarray__"], dtype=dt).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"{where}: an array does not match its dtype/shape: {exc}") from None


def _canonical(state: dict[str, Any]) -> bytes:
    """The bytes ``state_sha256`` hashes: every other field as compact, sorted JSON."""
    rest = {k: v for k, v in state.items() if k != STATE_CHECKSUM}
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _write_state(path: Path, obj: dict[str, Any]) -> None:
    """state.json: the JSON of ``obj`` plus ``state_sha256``, sorted keys, fsynced."""
    doc = _to_json(obj)
    doc[STATE_CHECKSUM] = hashlib.sha256(_canonical(doc)).hexdigest()
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _chmod_default(path: Path, mode: int) -> None:
    """Give ``path`` the mode a plain mkdir/open would: ``mode`` less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def atomic_write_file(path: PathLike, write: Callable[[Path], object]) -> None:
    """``write`` fills a temp file beside ``path``; fsync, rename over it, fsync the dir.

    A crash or an error (a full disk) leaves either the old file or the new one, never
    half a file. The parent directory must exist (it is not created). Whether ``target``
    may be replaced is the caller's decision (``nn_core.storage.ownership``).
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise OutputError(f"cannot write {target}: its parent directory does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}{_TMP_MARK}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _chmod_default(tmp, 0o666)  # mkstemp makes 0600
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def _atomic_write_dir(
    target: Path, fill: Callable[[Path], None], *, writes: str, overwrite: bool
) -> Path:
    """Create directory ``target`` atomically: ``fill`` writes into a temp dir beside it,
    which is fsynced and renamed into place; the parent is fsynced after the rename.

    ``target`` must be absent, empty or of kind ``writes`` (ownership.MODEL/TRAINING); an
    nn-core directory of another kind only with ``overwrite``; never a foreign one
    (``ownership.check_dir_output``). An existing ``target`` is first renamed aside and
    deleted after the new one is in place (two renames: a crash between them leaves
    ``.<name>.old-*`` beside it). An OSError while writing (e.g. a full disk) becomes a
    one-line CheckpointError; ``target`` is then as it was.
    """
    from .ownership import check_dir_output, delete_moved, locked_if_run, move_aside

    given = target
    check_dir_output(target, writes, overwrite=overwrite)  # refuse before writing anything
    target = Path(os.path.abspath(target))  # "a/b/.." -> "a": a real name for the temps
    parent = target.parent
    what = "checkpoint" if writes == "training" else "model directory"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_MARK}", dir=parent))
    except OSError as exc:
        raise CheckpointError(f"cannot write {what} {target}: {exc.strerror or exc}") from exc
    try:
        _chmod_default(tmp, 0o777)  # mkdtemp makes 0700; a checkpoint gets the umask's mode
        fill(tmp)
        _fsync_dir(tmp)
        _fault_point("before_rename")
        with locked_if_run(target):  # a run being written is not replaced
            check_dir_output(target, writes, overwrite=overwrite)  # still so, now locked
            old = move_aside(target) if os.path.lexists(target) else None
            os.rename(tmp, target)
        _fsync_dir(parent)
        if old is not None:
            delete_moved(old)
        _fault_point("after_rename")
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _remove_tree(tmp)
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"cannot write {what} {target}: {exc.strerror or exc}; the save was abandoned "
                "and nothing was replaced (the previous checkpoints are intact)"
            ) from exc
        raise
    return given


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---- run directories: latest pointer and pruning ---------------------------------------


def update_latest(run_dir: PathLike, name: str) -> None:
    """Point ``run_dir/latest`` at checkpoint ``name`` (a temp file renamed over it)."""
    run = Path(run_dir)
    if not (run / name / STATE_FILE).is_file():
        raise CheckpointError(f"{run / name} is not a complete checkpoint; latest not updated")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{LATEST_FILE}{_TMP_MARK}", dir=run)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(name + "\n")
                f.flush()
                os.fsync(f.fileno())
            _chmod_default(Path(tmp_name), 0o666)  # mkstemp makes 0600
            _fault_point("before_latest")
            os.replace(tmp_name, run / LATEST_FILE)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
    except OSError as exc:
        raise CheckpointError(
            f"cannot update {run / LATEST_FILE}: {exc.strerror or exc}; it still names the "
            f"previous checkpoint ({name} is complete beside it)"
        ) from exc
    _fsync_dir(run)


def _read_latest(run: Path) -> str:
    """The checkpoint name ``run/latest`` holds (CheckpointError if it is not a name)."""
    pointer = run / LATEST_FILE
    try:
        raw = pointer.read_bytes()[:4097]
        name = raw.decode("utf-8").strip()
    except OSError as exc:
        raise CheckpointError(f"cannot read {pointer}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise CheckpointError(f"{pointer} is corrupt (not text)") from None
    if not name or len(raw) > 4096 or any(c in name for c in "/\\\n\x00") or name in (".", ".."):
        raise CheckpointError(f"{pointer} holds an invalid checkpoint name {name[:80]!r}")
    return name


def latest_checkpoint(run_dir: PathLike) -> Path | None:
    """The checkpoint ``run_dir/latest`` names, or None if there is no ``latest`` file."""
    run = Path(run_dir)
    if not (run / LATEST_FILE).is_file():
        return None
    name = _read_latest(run)
    target = run / name
    if not target.is_dir():
        raise CheckpointError(f"{run / LATEST_FILE} points to {name!r}, which does not exist")
    return target


def list_checkpoints(run_dir: PathLike) -> list[Path]:
    """Step checkpoint directories in ``run_dir``, oldest first (by step)."""
    run = Path(run_dir)
    found = [
        (int(m.group(1)), p)
        for p in run.iterdir()
        if (m := STEP_DIR_RE.match(p.name)) and p.is_dir() and not p.is_symlink()
    ]
    return [p for _, p in sorted(found)]


def prune_checkpoints(run_dir: PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` step checkpoints (never the one ``latest`` names,
    never a directory that is not an nn-core training checkpoint), and temp
    directories/files of interrupted saves; returns what was deleted.

    ``.<name>.old-*`` directories (a crash while replacing an existing checkpoint) are
    left alone: they may hold the only copy of that checkpoint."""
    from .ownership import TRAINING, classify

    run = Path(run_dir)
    if keep < 1:
        raise ConfigError(f"keep must be >= 1, got {keep}")
    protected = latest_checkpoint(run)
    removed = []
    for path in list_checkpoints(run)[:-keep]:
        if protected is not None and path.name == protected.name:
            continue
        if classify(path).kind == TRAINING:
            # renamed to a temp name first: a crash while deleting leaves a temp entry
            # (cleaned below, next time), never half a step_XXXXXX directory
            doomed = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TMP_MARK}", dir=run))
            os.rename(path, doomed / path.name)
            _remove_tree(doomed)
            removed.append(path)
    for path in run.iterdir():  # temp dirs / files of saves that crashed
        if path.name.startswith(".") and _TMP_MARK in path.name:
            if path.is_dir() and not path.is_symlink():
                _remove_tree(path)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _is_run_dir(p: Path) -> bool:
    return p.is_dir() and not (p / STATE_FILE).exists() and (p / LATEST_FILE).exists()


def newest_loadable(run_dir: PathLike, *, skip: str | None = None) -> Path | None:
    """The newest step checkpoint of ``run_dir`` that passes ``verify_checkpoint``."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        if ckpt.name == skip:
            continue
        try:
            verify_checkpoint(ckpt)
        except CheckpointError:
            continue
        return ckpt
    return None


def _fallback_hint(run: Path, skip: str | None) -> str:
    good = newest_loadable(run, skip=skip)
    if good is None:
        return f"{run} holds no other loadable checkpoint"
    return (
        f"the newest loadable checkpoint is {good} (load it directly; to resume from it, "
        f"point latest at it: echo {good.name} > {run / LATEST_FILE})"
    )


def resolve_checkpoint(path: PathLike) -> Path:
    """A checkpoint directory as given, or the one a run directory's ``latest`` names.

    A run directory whose ``latest`` is corrupt or dangling gives an error naming the
    newest loadable checkpoint beside it."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} is not a directory (a checkpoint is a directory)")
    if (p / STATE_FILE).exists():
        return p
    if (p / LATEST_FILE).exists():
        try:
            target = latest_checkpoint(p)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; {_fallback_hint(p, None)}") from None
        assert target is not None
        return target
    if (p / MODEL_FILE).exists():
        raise CheckpointError(f"{p}: {STATE_FILE} is missing")
    hint = f"; {_fallback_hint(p, None)}" if list_checkpoints(p) else ""
    raise CheckpointError(
        f"{p} is neither a checkpoint (no {STATE_FILE}) nor a run directory "
        f"(no {LATEST_FILE}){hint}"
    )


def _through_latest(path: PathLike, load: Callable[[Path], Any]) -> Any:
    """``load(resolve_checkpoint(path))``; if ``path`` is a run directory and its latest
    checkpoint fails verification, the error names the newest loadable one."""
    p = Path(path)
    ckpt = resolve_checkpoint(p)
    if not _is_run_dir(p):
        return load(ckpt)
    try:
        return load(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {_fallback_hint(p, ckpt.name)}") from exc


# ---- writing ---------------------------------------------------------------------------


def _model_state(model: MoETransformer) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "library": "nn-core",
        "config": model.config.to_dict(),
        "dtype": str(np.dtype(model.dtype)),
    }


def _moment_tensors(model: MoETransformer, m: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """AdamW moments [P] -> {"m.<name>": [...], "v.<name>": [...]} in the params' layout."""
    tensors = {}
    for name, view in model.store.views(m).items():
        tensors["m." + name] = view
    for name, view in model.store.views(v).items():
        tensors["v." + name] = view
    return tensors


def save_model(model: MoETransformer, path: PathLike, *, overwrite: bool = False) -> Path:
    """Write the model's weights and config (no optimizer) to directory ``path``, atomically.

    ``path`` must be absent, empty or an nn-core model directory (replaced); an nn-core
    training checkpoint or run directory is replaced only with ``overwrite=True``; any
    other directory or file is refused (OutputError), whatever ``overwrite`` says.
    """
    target = Path(path)

    def fill(tmp: Path) -> None:
        files = {MODEL_FILE: _write_tensors(tmp / MODEL_FILE, model.parameters())}
        _fault_point("model_written")
        _write_state(tmp / STATE_FILE, {**_model_state(model), "kind": "model", "files": files})
        _fault_point("state_written")

    return _atomic_write_dir(target, fill, writes="model", overwrite=overwrite)


def save_training_checkpoint(
    path: PathLike,
    model: MoETransformer,
    m: np.ndarray,
    v: np.ndarray,
    state: dict[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a full training checkpoint to directory ``path``, atomically.

    ``m``, ``v``: AdamW moments [P] in the model's flat layout; ``state``: the JSON
    training state (train_config, step, optimizer, rng_state, data_state). ``path`` must
    be absent, empty or an nn-core training checkpoint; another nn-core kind only with
    ``overwrite=True``; never a foreign directory.
    """
    target = Path(path)
    if m.shape != model.flat_params.shape or v.shape != model.flat_params.shape:
        raise CheckpointError(
            f"moments must have the shape of flat_params {model.flat_params.shape}"
        )

    def fill(tmp: Path) -> None:
        files = {MODEL_FILE: _write_tensors(tmp / MODEL_FILE, model.parameters())}
        _fault_point("model_written")
        files[OPTIMIZER_FILE] = _write_tensors(tmp / OPTIMIZER_FILE, _moment_tensors(model, m, v))
        _fault_point("optimizer_written")
        full = {**_model_state(model), **state, "kind": "training", "files": files}
        _write_state(tmp / STATE_FILE, full)
        _fault_point("state_written")

    return _atomic_write_dir(target, fill, writes="training", overwrite=overwrite)


# ---- reading ---------------------------------------------------------------------------


def _check_files(files: Any, kind: str, where: Path) -> None:
    needed = {MODEL_FILE} if kind == "model" else {MODEL_FILE, OPTIMIZER_FILE}
    if not isinstance(files, dict) or set(files) != needed:
        got = sorted(files) if isinstance(files, dict) else type(files).__name__
        raise CheckpointError(f"{where}: files must list exactly {sorted(needed)}, got {got}")
    for name, meta in files.items():
        if (
            not isinstance(meta, dict)
            or set(meta) != {"sha256", "bytes"}
            or not isinstance(meta["sha256"], str)
            or not _SHA256_RE.match(meta["sha256"])
            or not is_int(meta["bytes"])
            or meta["bytes"] < 0
        ):
            raise CheckpointError(
                f"{where}: the entry for {name} must be {{'sha256': 64 hex digits, "
                f"'bytes': int >= 0}}, got {str(meta)[:120]}"
            )


def read_state(path: PathLike) -> dict[str, Any]:
    """Parse and check ``state.json`` of checkpoint directory ``path``.

    Checks: valid JSON object (any other shape, depth or encoding is a CheckpointError),
    format version (1 or 2), ``state_sha256`` (version 2), the common fields' types and
    ranges (library, kind, config, dtype, files) and, for a training checkpoint, the
    training fields (``check_training_state``). Tagged arrays are decoded.
    """
    p = Path(path) / STATE_FILE
    if not p.is_file():
        raise CheckpointError(f"{p} is missing")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {p}: {exc.strerror or exc}") from exc
    if len(raw) > _MAX_STATE_BYTES:
        raise CheckpointError(f"{p} has {len(raw)} bytes, too large for a state file (corrupt)")
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{p} is not valid JSON (truncated or corrupt): {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{p} is nested too deeply to be a state file (corrupt)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{p} must hold a JSON object, got {type(state).__name__}")
    version = state.get("format_version")
    if not is_int(version) or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{p}: checkpoint format version {version!r}, this nn-core reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if version >= 2:
        digest = state.get(STATE_CHECKSUM)
        if not isinstance(digest, str):
            raise CheckpointError(f"{p} lacks its own SHA-256 ({STATE_CHECKSUM}); corrupt")
        try:
            actual = hashlib.sha256(_canonical(state)).hexdigest()
        except (RecursionError, ValueError):
            raise CheckpointError(f"{p} is nested too deeply to be a state file") from None
        if actual != digest:
            raise CheckpointError(
                f"{p} is corrupt: SHA-256 mismatch ({STATE_CHECKSUM} {digest[:16]}..., "
                f"content {actual[:16]}...); a field was changed after the checkpoint was written"
            )
    kind = state.get("kind")
    allowed = set(_COMMON_FIELDS) | ({STATE_CHECKSUM} if version >= 2 else {"saved_at"})
    if kind == "training":
        allowed |= set(_TRAINING_FIELDS)
    elif kind != "model":
        raise CheckpointError(f"{p}: kind must be 'model' or 'training', got {kind!r}")
    missing = [k for k in sorted(allowed - {"saved_at"}) if k not in state]
    if missing:
        raise CheckpointError(f"{p} lacks the field(s) {missing}")
    unexpected = sorted(set(state) - allowed)
    if unexpected:
        raise CheckpointError(f"{p} has unexpected field(s) {unexpected}")
    if state["library"] != "nn-core":
        raise CheckpointError(f"{p}: library must be 'nn-core', got {state['library']!r}")
    _config_of(state, p.parent, None)
    if state["dtype"] not in ("float32", "float64"):
        raise CheckpointError(f"{p}: dtype must be float32 or float64, got {state['dtype']!r}")
    _check_files(state["files"], kind, p)
    try:
        decoded = _from_json(state, p)
    except RecursionError:
        raise CheckpointError(f"{p} is nested too deeply to be a state file") from None
    if kind == "training":
        check_training_state(decoded, p)
    return decoded


def check_training_state(state: dict[str, Any], where: Path) -> None:
    """Range-check the training fields of a state.json: train_config an object (its
    fields are checked by ``Trainer.resume``, which builds the TrainConfig), step an int
    >= 0 equal to the optimizer's t, the generator state well-formed, data_state an
    object or null (its content is checked by the data source that loads it)."""
    if not isinstance(state["train_config"], dict):
        raise CheckpointError(f"{where}: train_config must be an object")
    step = state["step"]
    if not is_int(step) or step < 0:
        raise CheckpointError(f"{where}: step must be an int >= 0, got {step!r}")
    opt = state["optimizer"]
    if not isinstance(opt, dict) or set(opt) != {"type", "t"} or opt["type"] != "AdamW":
        raise CheckpointError(f"{where}: optimizer must be {{'type': 'AdamW', 't': int}}")
    if not is_int(opt["t"]) or opt["t"] != step:
        raise CheckpointError(
            f"{where}: optimizer t ({opt['t']!r}) must equal step ({step}): one AdamW update "
            "per step"
        )
    check_generator_state(state["rng_state"], f"{where}: rng_state", error=CheckpointError)
    if state["data_state"] is not None and not isinstance(state["data_state"], dict):
        raise CheckpointError(f"{where}: data_state must be an object or null")


def _config_of(state: dict[str, Any], where: Path, expected: Config | None) -> Config:
    try:
        config = Config.from_dict(state["config"])
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: invalid config in {STATE_FILE}: {exc}") from None
    if expected is not None and config != expected:
        mine, theirs = expected.to_dict(), config.to_dict()
        diff = ", ".join(
            f"{k}: checkpoint {theirs[k]!r} vs expected {mine[k]!r}"
            for k in mine
            if mine[k] != theirs[k]
        )
        raise CheckpointError(f"{where} is a checkpoint of a different config ({diff})")
    return config


def _verify_file(ckpt: Path, name: str, state: dict[str, Any]) -> Path:
    """Check size and SHA-256 of tensor file ``name`` against state.json; returns its path."""
    path = ckpt / name
    meta = state["files"][name]
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    size = path.stat().st_size
    if size < meta["bytes"]:
        raise CheckpointError(f"{path} is truncated: {size} bytes, expected {meta['bytes']}")
    if size > meta["bytes"]:
        raise CheckpointError(
            f"{path} has {size} bytes, expected {meta['bytes']} bytes (modified after saving)"
        )
    digest = sha256_file(path)
    if digest != meta["sha256"]:
        raise CheckpointError(
            f"{path} is corrupt: SHA-256 mismatch (expected {meta['sha256']}, got {digest}); "
            "a byte was changed after the checkpoint was written"
        )
    return path


def verify_checkpoint(path: PathLike) -> dict[str, Any]:
    """Every check of loading short of reading the tensors: state.json (``read_state``) and
    each file's size and SHA-256. Returns the state."""
    ckpt = Path(path)
    state = read_state(ckpt)
    for name in state["files"]:
        _verify_file(ckpt, name, state)
    return state


def _read_tensor_file(
    ckpt: Path, name: str, state: dict[str, Any], expected: dict[str, tuple[int, ...]], dtype: str
) -> dict[str, np.ndarray]:
    """Verify size, SHA-256, names, shapes and dtypes of tensor file ``name``; load it."""
    return load_verified_tensors(_verify_file(ckpt, name, state), expected, dtype)


def load_verified_tensors(
    path: Path, expected: dict[str, tuple[int, ...]], dtype: str
) -> dict[str, np.ndarray]:
    """Load safetensors file ``path``; check its names, shapes and dtypes against ``expected``."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a valid safetensors file: {exc}") from exc
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{path} is missing tensor(s) {missing}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{path} has unexpected tensor(s) {extra}")
    for key, shape in expected.items():
        arr = tensors[key]
        if arr.shape != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor {key} has shape {arr.shape}, the config needs {tuple(shape)} "
                "(a checkpoint of another config?)"
            )
        if str(arr.dtype) != dtype:
            raise CheckpointError(f"{path}: tensor {key} has dtype {arr.dtype}, expected {dtype}")
    return tensors


def _build_model(ckpt: Path, state: dict[str, Any], config: Config | None) -> MoETransformer:
    """A model of the checkpoint's config and dtype with its verified weights loaded."""
    from ..model.transformer import MoETransformer

    cfg = _config_of(state, ckpt, config)
    dtype = state["dtype"]
    need = cfg.total_params() * np.dtype(dtype).itemsize  # before allocating anything
    have = state["files"][MODEL_FILE]["bytes"]
    if need > have:
        raise CheckpointError(
            f"{ckpt}: the config in {STATE_FILE} needs {need:,} bytes of weights, "
            f"{MODEL_FILE} has {have:,} ({STATE_FILE} and the tensors disagree)"
        )
    try:
        model = MoETransformer(cfg, dtype=np.dtype(dtype))
    except (MemoryError, ValueError) as exc:  # e.g. RoPE tables of an absurd max_seq_len
        raise CheckpointError(f"{ckpt}: cannot build a model of its config: {exc}") from None
    params = model.parameters()
    tensors = _read_tensor_file(
        ckpt, MODEL_FILE, state, {k: p.shape for k, p in params.items()}, dtype
    )
    for name, view in params.items():
        np.copyto(view, tensors[name])
    return model


def load_model(path: PathLike, *, config: Config | None = None) -> MoETransformer:
    """A verified ``MoETransformer`` from a model or training checkpoint (or run directory).

    ``config``, if given, must equal the checkpoint's config (else CheckpointError).
    """
    return _through_latest(path, lambda ckpt: _build_model(ckpt, read_state(ckpt), config))


@dataclass
class TrainingCheckpoint:
    """What ``load_training_checkpoint`` verified and read."""

    path: Path  # the checkpoint directory
    model: MoETransformer  # with the saved weights
    m: np.ndarray  # [P] AdamW first moment, the model's flat layout
    v: np.ndarray  # [P] AdamW second moment
    state: dict[str, Any]  # state.json (train_config, step, optimizer, rng_state, ...)


def load_training_checkpoint(path: PathLike, *, config: Config | None = None) -> TrainingCheckpoint:
    """Verify and read a training checkpoint (``Trainer.save``) or a run's latest one."""
    return _through_latest(path, lambda ckpt: _load_training(ckpt, config))


def _load_training(ckpt: Path, config: Config | None) -> TrainingCheckpoint:
    state = read_state(ckpt)
    if state["kind"] != "training":
        raise CheckpointError(
            f"{ckpt} is a {state['kind']!r} checkpoint, not a training checkpoint "
            "(weights only: use load_model)"
        )
    model = _build_model(ckpt, state, config)
    shapes = model.store.shapes
    expected = {}
    for prefix in ("m.", "v."):
        expected.update({prefix + name: shape for name, shape in shapes.items()})
    tensors = _read_tensor_file(ckpt, OPTIMIZER_FILE, state, expected, state["dtype"])
    m = np.zeros_like(model.flat_params)
    v = np.zeros_like(model.flat_params)
    for prefix, flat in (("m.", m), ("v.", v)):
        for name, view in model.store.views(flat).items():
            np.copyto(view, tensors[prefix + name])
    return TrainingCheckpoint(ckpt, model, m, v, state)
