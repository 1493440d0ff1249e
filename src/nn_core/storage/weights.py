"""Weights other frameworks can load: one .safetensors file, nn-core's names, config inside.

    export_weights(checkpoint, out_file)        checkpoint / model / run dir -> FILE.safetensors
    import_weights(file, out_dir, config=None)  FILE.safetensors -> nn-core model directory
    load_weights(file, config=None)             FILE.safetensors -> verified MoETransformer

The file holds one C-contiguous tensor per parameter under the documented names
(``embed.weight``, ``layers.{i}.attn.q_proj.weight``, ..., ``lm_head.weight``), in
the model dtype, and string metadata in the safetensors header::

    format          "nn-core-weights"
    format_version  "1"
    nn_core_config  Config.to_dict() as JSON (what TorchMoE and Config.from_dict take)
    dtype           "float32" or "float64"
    nn_core_version the nn-core version that wrote it

Shapes (legend: V vocab, H hidden, Q = nH*D, KV = nKV*D, E experts, F ffn): Linear
weights are [out_features, in_features], PyTorch's nn.Linear layout, so a state dict
moves 1:1; embed [V, H]; q_proj [Q, H]; k_proj, v_proj [KV, H]; o_proj [H, Q]; router
[E, H]; gate_proj, up_proj [E, F, H]; down_proj [E, H, F]; norm gains [H]; lm_head [V, H].

Import accepts such a file, or any safetensors file holding exactly the parameters of
a Config given in its metadata (``nn_core_config``, or ``config``) or passed as
``config=``. It runs the checks of checkpoint loading (``nn_core.storage.checkpoint``, same
CheckpointError messages: a valid safetensors file, no missing or unexpected tensor,
every shape and dtype as the config needs) plus one more: every value finite.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..model.config import Config
from .checkpoint import (
    atomic_write_file,
    load_model,
    load_verified_tensors,
    save_model,
    write_safetensors,
)
from .names import WEIGHTS_FORMAT, WEIGHTS_FORMAT_VERSION

if TYPE_CHECKING:
    from ..model.transformer import MoETransformer

CONFIG_KEY = "nn_core_config"
_CONFIG_KEYS = (CONFIG_KEY, "config")  # where import looks for the config, in order
_SAFETENSORS_DTYPES = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16"}

PathLike = str | os.PathLike[str]

__all__ = [
    "CONFIG_KEY",
    "WEIGHTS_FORMAT",
    "WEIGHTS_FORMAT_VERSION",
    "export_weights",
    "import_weights",
    "load_weights",
    "read_weights_metadata",
    "weights_metadata",
]


# ---- export ----------------------------------------------------------------------------


def weights_metadata(model: MoETransformer) -> dict[str, str]:
    """The safetensors header metadata of an exported file (strings only)."""
    from ..version import __version__

    return {
        "format": WEIGHTS_FORMAT,
        "format_version": str(WEIGHTS_FORMAT_VERSION),
        CONFIG_KEY: json.dumps(model.config.to_dict(), sort_keys=True),
        "dtype": str(np.dtype(model.dtype)),
        "nn_core_version": __version__,
    }


def export_weights(checkpoint: PathLike, out_file: PathLike, *, overwrite: bool = False) -> Path:
    """Write the weights of a checkpoint as one .safetensors file; returns its path.

    ``checkpoint``: a model directory (``save_model``), a training checkpoint
    or a run directory (its ``latest``); it is verified as ``load_model`` does. The file
    is written atomically (temp file + rename), byte-reproducibly (sorted header), with
    the umask's mode. ``out_file``'s directory must exist; an existing nn-core weights
    file is replaced, any other existing file only with ``overwrite=True`` (else
    OutputError), a directory never.
    """
    from .ownership import check_file_output

    out = Path(out_file)
    check_file_output(out, overwrite=overwrite)  # before the (long) load
    model = load_model(checkpoint)
    check_file_output(out, overwrite=overwrite)  # still so after it
    tensors = model.parameters()
    atomic_write_file(out, lambda tmp: write_safetensors(tmp, tensors, weights_metadata(model)))
    return out


# ---- import ----------------------------------------------------------------------------


def read_weights_metadata(file: PathLike) -> dict[str, str]:
    """The header metadata of a safetensors file ({} if it has none); CheckpointError if the
    file is missing or not a valid safetensors file."""
    from safetensors import safe_open

    path = Path(file)
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing" if not path.exists() else f"{path} is not a file"
        )
    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a valid safetensors file: {exc}") from exc


def _file_dtype(path: Path, meta: dict[str, str]) -> str:
    """The dtype the parameters must have: metadata "dtype", else that of embed.weight."""
    from safetensors import safe_open

    if "dtype" in meta:
        dtype = meta["dtype"]
    else:
        with safe_open(str(path), framework="numpy") as f:
            if "embed.weight" not in f.keys():
                return "float32"  # the tensor check reports embed.weight missing
            code = f.get_slice("embed.weight").get_dtype()
        dtype = _SAFETENSORS_DTYPES.get(code, code)
    if dtype not in ("float32", "float64"):
        raise CheckpointError(f"{path}: dtype must be float32 or float64, got {dtype}")
    return dtype


def _config_diff(mine: Config, theirs: Config) -> str:
    a, b = mine.to_dict(), theirs.to_dict()
    return ", ".join(f"{k}: file {b[k]!r} vs expected {a[k]!r}" for k in a if a[k] != b[k])


def _file_config(path: Path, meta: dict[str, str], config: Config | None) -> Config:
    """The config in the file's metadata (checked against ``config`` if given), or ``config``."""
    if config is not None and not isinstance(config, Config):
        raise ConfigError(f"config must be an nn_core.Config or None, got {type(config).__name__}")
    key = next((k for k in _CONFIG_KEYS if k in meta), None)
    if key is None:
        if config is None:
            raise CheckpointError(
                f"{path} has no model config: its safetensors metadata lacks {CONFIG_KEY!r}; "
                "pass the config explicitly (config=..., nn-core import --config NAME|FILE)"
            )
        return config
    try:
        found = Config.from_dict(json.loads(meta[key]))
    except (json.JSONDecodeError, ConfigError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: invalid config in metadata {key!r}: {exc}") from exc
    if config is not None and found != config:
        raise CheckpointError(
            f"{path} holds weights of a different config ({_config_diff(config, found)})"
        )
    return found


def load_weights(file: PathLike, *, config: Config | None = None) -> MoETransformer:
    """A verified ``MoETransformer`` from a weights file (``export_weights`` or compatible).

    Checks, in order: the file is valid safetensors; format version (if it says it is an
    nn-core file); a config (metadata or ``config=``; both given must agree); the dtype
    (float32/float64); tensor names (none missing, none extra), shapes and dtypes; all
    values finite. Each failure is a CheckpointError naming the file and the tensor.
    """
    from ..model.transformer import MoETransformer

    path = Path(file)
    meta = read_weights_metadata(path)
    if meta.get("format") == WEIGHTS_FORMAT and meta.get("format_version") != str(
        WEIGHTS_FORMAT_VERSION
    ):
        raise CheckpointError(
            f"{path}: weights format version {meta.get('format_version')!r}, this nn-core reads "
            f"version {WEIGHTS_FORMAT_VERSION}"
        )
    cfg = _file_config(path, meta, config)
    dtype = _file_dtype(path, meta)
    model = MoETransformer(cfg, dtype=np.dtype(dtype))
    params = model.parameters()
    expected = {name: p.shape for name, p in params.items()}
    # checkpoint.py's verification (names, shapes, dtypes) -- it starts with a size and
    # SHA-256 check against state.json, which a bare file lacks: measured here, it passes.
    tensors = load_verified_tensors(path, expected, dtype)
    for name, view in params.items():
        arr = tensors[name]
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise CheckpointError(
                f"{path}: tensor {name} holds {bad} non-finite value(s) (NaN or Inf)"
            )
        np.copyto(view, arr)
    return model


def import_weights(
    file: PathLike, out_dir: PathLike, *, config: Config | None = None, overwrite: bool = False
) -> Path:
    """Verify a weights file (``load_weights``) and write it as an nn-core model directory
    (``checkpoint.save_model``: atomic, SHA-256 recorded), loadable with
    ``nn_core.load_model``; returns the directory.

    ``out_dir`` must be absent, empty or an nn-core model directory (replaced); another
    nn-core directory (a run, a training checkpoint) only with ``overwrite=True``; any
    other path never (OutputError). Checked before the weights are read.
    """
    from .ownership import MODEL, check_dir_output

    check_dir_output(out_dir, MODEL, overwrite=overwrite)
    return save_model(load_weights(file, config=config), out_dir, overwrite=overwrite)
