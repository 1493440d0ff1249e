"""Checkpoints: safetensors + JSON directories, written atomically, verified on load.

No pickle anywhere: tensors go through ``safetensors.numpy`` and everything else is
JSON, so loading a checkpoint can never run code.

Layout of a training checkpoint directory (``Trainer.save``)::

    step_000100/
      model.safetensors      one tensor per parameter, the model's names
                             (embed.weight, layers.0.attn.q_proj.weight, ...)
      optimizer.safetensors  AdamW moments per parameter: "m.<name>", "v.<name>"
      state.json             format_version, kind "training", config, dtype,
                             train_config, step, optimizer {"type", "t"}, rng_state,
                             data_state, files {name: {"sha256", "bytes"}}

A model-only directory (``save_model``, for inference) holds model.safetensors and a
state.json of kind "model" (format_version, config, dtype, files). A run directory
holds step checkpoints ``step_XXXXXX`` and a ``latest`` file naming the newest one;
every loader accepts either a checkpoint directory or a run directory.

Writes are atomic: files go to a temporary directory beside the target, are fsynced,
the directory is renamed into place and the parent fsynced; ``latest`` is replaced
(temp file + rename) only afterwards. A crash at any point leaves the previous
checkpoint complete and ``latest`` pointing at it. Loading checks, in order: the
format version, file sizes (truncation), SHA-256 (any flipped byte), tensor names,
shapes and dtypes against the config.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..model.config import Config

if TYPE_CHECKING:
    from ..model.transformer import MoETransformer

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_TMP_MARK = ".tmp-"

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


def _write_tensors(path: Path, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    from safetensors.numpy import save_file

    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        str(path),
        metadata={"format": "nn-core", "format_version": str(FORMAT_VERSION)},
    )
    _fsync_file(path)
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


def _from_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__", "dtype", "shape"}:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"]).reshape(obj["shape"])
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(_to_json(obj), indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _chmod_default(path: Path, mode: int) -> None:
    """Give ``path`` the mode a plain mkdir/open would: ``mode`` less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def atomic_write_file(target: Path, write: Callable[[Path], None]) -> None:
    """``write`` fills a temp file beside ``target``; fsync, rename over it, fsync the dir.

    A crash leaves either the old file or the new one, never half a file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
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


def _atomic_write_dir(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create directory ``target`` atomically: ``fill`` writes into a temp dir beside it,
    which is fsynced and renamed into place; the parent is fsynced after the rename.

    An existing ``target`` is first renamed aside and deleted after the new one is in
    place (two renames: a crash between them leaves ``.<name>.old-*`` beside it).
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_MARK}", dir=parent))
    try:
        _chmod_default(tmp, 0o777)  # mkdtemp makes 0700; a checkpoint gets the umask's mode
        fill(tmp)
        _fsync_dir(tmp)
        _fault_point("before_rename")
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.rename(target, old / target.name)
        os.rename(tmp, target)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fault_point("after_rename")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ---- run directories: latest pointer and pruning ---------------------------------------


def update_latest(run_dir: PathLike, name: str) -> None:
    """Point ``run_dir/latest`` at checkpoint ``name`` (a temp file renamed over it)."""
    run = Path(run_dir)
    if not (run / name / STATE_FILE).is_file():
        raise CheckpointError(f"{run / name} is not a complete checkpoint; latest not updated")
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
    _fsync_dir(run)


def latest_checkpoint(run_dir: PathLike) -> Path | None:
    """The checkpoint ``run_dir/latest`` names, or None if there is no ``latest`` file."""
    run = Path(run_dir)
    pointer = run / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(f"{pointer} holds an invalid checkpoint name {name!r}")
    target = run / name
    if not target.is_dir():
        raise CheckpointError(f"{pointer} points to {name!r}, which does not exist")
    return target


def list_checkpoints(run_dir: PathLike) -> list[Path]:
    """Step checkpoint directories in ``run_dir``, oldest first (by step)."""
    run = Path(run_dir)
    found = [(int(m.group(1)), p) for p in run.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(run_dir: PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` step checkpoints (never the one ``latest`` names),
    and temp directories/files of interrupted saves; returns what was deleted.

    ``.<name>.old-*`` directories (a crash while replacing an existing checkpoint) are
    left alone: they may hold the only copy of that checkpoint."""
    run = Path(run_dir)
    if keep < 1:
        raise ConfigError(f"keep must be >= 1, got {keep}")
    protected = latest_checkpoint(run)
    removed = []
    for path in list_checkpoints(run)[:-keep]:
        if protected is None or path.name != protected.name:
            shutil.rmtree(path)
            removed.append(path)
    for path in run.iterdir():  # temp dirs / files of saves that crashed
        if path.name.startswith(".") and _TMP_MARK in path.name:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def resolve_checkpoint(path: PathLike) -> Path:
    """A checkpoint directory as given, or the one a run directory's ``latest`` names."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} is not a directory (a checkpoint is a directory)")
    if (p / STATE_FILE).exists():
        return p
    if (p / LATEST_FILE).exists():
        target = latest_checkpoint(p)
        assert target is not None
        return target
    if (p / MODEL_FILE).exists():
        raise CheckpointError(f"{p}: {STATE_FILE} is missing")
    raise CheckpointError(
        f"{p} is neither a checkpoint (no {STATE_FILE}) nor a run directory (no {LATEST_FILE})"
    )


# ---- writing ---------------------------------------------------------------------------


def _model_state(model: MoETransformer) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "library": "nn-core",
        "config": model.config.to_dict(),
        "dtype": str(np.dtype(model.dtype)),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _moment_tensors(model: MoETransformer, m: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """AdamW moments [P] -> {"m.<name>": [...], "v.<name>": [...]} in the params' layout."""
    tensors = {}
    for name, view in model.store.views(m).items():
        tensors["m." + name] = view
    for name, view in model.store.views(v).items():
        tensors["v." + name] = view
    return tensors


def save_model(model: MoETransformer, path: PathLike) -> Path:
    """Write the model's weights and config (no optimizer) to directory ``path``, atomically."""
    target = Path(path)

    def fill(tmp: Path) -> None:
        files = {MODEL_FILE: _write_tensors(tmp / MODEL_FILE, model.parameters())}
        _fault_point("model_written")
        _write_json(tmp / STATE_FILE, {**_model_state(model), "kind": "model", "files": files})
        _fault_point("state_written")

    return _atomic_write_dir(target, fill)


def save_training_checkpoint(
    path: PathLike, model: MoETransformer, m: np.ndarray, v: np.ndarray, state: dict[str, Any]
) -> Path:
    """Write a full training checkpoint to directory ``path``, atomically.

    ``m``, ``v``: AdamW moments [P] in the model's flat layout; ``state``: the JSON
    training state (train_config, step, optimizer, rng_state, data_state).
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
        _write_json(tmp / STATE_FILE, full)
        _fault_point("state_written")

    return _atomic_write_dir(target, fill)


# ---- reading ---------------------------------------------------------------------------


def read_state(path: PathLike) -> dict[str, Any]:
    """Parse and check ``state.json`` of checkpoint directory ``path`` (format version)."""
    p = Path(path) / STATE_FILE
    if not p.is_file():
        raise CheckpointError(f"{p} is missing")
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{p} is not valid JSON (truncated or corrupt): {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{p} must hold a JSON object")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format version {version!r}, this nn-core reads version "
            f"{FORMAT_VERSION}"
        )
    for key in ("config", "dtype", "files"):
        if key not in state:
            raise CheckpointError(f"{p} lacks the field {key!r}")
    return _from_json(state)


def _config_of(state: dict[str, Any], where: Path, expected: Config | None) -> Config:
    try:
        config = Config.from_dict(state["config"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{where}: invalid config in {STATE_FILE}: {exc}") from exc
    if expected is not None and config != expected:
        mine, theirs = expected.to_dict(), config.to_dict()
        diff = ", ".join(
            f"{k}: checkpoint {theirs[k]!r} vs expected {mine[k]!r}"
            for k in mine
            if mine[k] != theirs[k]
        )
        raise CheckpointError(f"{where} is a checkpoint of a different config ({diff})")
    return config


def _read_tensor_file(
    ckpt: Path, name: str, state: dict[str, Any], expected: dict[str, tuple[int, ...]], dtype: str
) -> dict[str, np.ndarray]:
    """Verify size, SHA-256, names, shapes and dtypes of tensor file ``name``; load it."""
    path = ckpt / name
    meta = state["files"].get(name) if isinstance(state["files"], dict) else None
    if not isinstance(meta, dict) or "sha256" not in meta or "bytes" not in meta:
        raise CheckpointError(f"{ckpt / STATE_FILE} has no size/SHA-256 entry for {name}")
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
    return load_verified_tensors(path, expected, dtype)


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
    if dtype not in ("float32", "float64"):
        raise CheckpointError(f"{ckpt / STATE_FILE}: dtype must be float32 or float64, got {dtype}")
    model = MoETransformer(cfg, dtype=np.dtype(dtype))
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
    ckpt = resolve_checkpoint(path)
    return _build_model(ckpt, read_state(ckpt), config)


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
    ckpt = resolve_checkpoint(path)
    state = read_state(ckpt)
    if state.get("kind") != "training":
        raise CheckpointError(
            f"{ckpt} is a {state.get('kind')!r} checkpoint, not a training checkpoint "
            "(weights only: use load_model)"
        )
    for key in ("train_config", "step", "optimizer", "rng_state", "data_state"):
        if key not in state:
            raise CheckpointError(f"{ckpt / STATE_FILE} lacks the field {key!r}")
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
