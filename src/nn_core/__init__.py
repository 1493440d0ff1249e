"""nn-core: a from-scratch Mixture-of-Experts transformer on NumPy.

The public API (see README.md): ``Config``, ``MoETransformer``, training with
``TrainConfig``/``Trainer``, sampling strategies and ``generate`` (in
``nn_core.generate``), the benchmark in ``nn_core.bench``.

The names below are imported on first use (``nn_core.Trainer`` loads the training
package then, not at ``import nn_core``): a process that only runs the model does not
load the data, storage and training code, nor what they import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointError,
    ConfigError,
    InputError,
    InUseError,
    NNCoreError,
    NonFiniteError,
    OutputError,
)
from .version import __version__

if TYPE_CHECKING:  # the same names, for type checkers and readers
    from .data.tokenizer import ByteTokenizer
    from .inference.sampling import (
        Greedy,
        SamplingStrategy,
        Temperature,
        TopK,
        TopP,
        make_strategy,
    )
    from .model import KVCache, LossTerms, MoETransformer
    from .model.config import Config
    from .storage.checkpoint import load_model, save_model
    from .training.config import TrainConfig
    from .training.optim import AdamW, clip_grad_norm, get_lr
    from .training.trainer import Trainer

# public name -> the module that defines it
_LAZY = {
    "ByteTokenizer": ".data.tokenizer",
    **dict.fromkeys(
        ["Greedy", "SamplingStrategy", "Temperature", "TopK", "TopP", "make_strategy"],
        ".inference.sampling",
    ),
    **dict.fromkeys(["KVCache", "LossTerms", "MoETransformer"], ".model"),
    "Config": ".model.config",
    **dict.fromkeys(["load_model", "save_model"], ".storage.checkpoint"),
    "TrainConfig": ".training.config",
    **dict.fromkeys(["AdamW", "clip_grad_norm", "get_lr"], ".training.optim"),
    "Trainer": ".training.trainer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nn_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "AdamW",
    "ByteTokenizer",
    "CheckpointError",
    "Config",
    "ConfigError",
    "Greedy",
    "InUseError",
    "InputError",
    "KVCache",
    "LossTerms",
    "MoETransformer",
    "NNCoreError",
    "NonFiniteError",
    "OutputError",
    "SamplingStrategy",
    "Temperature",
    "TopK",
    "TopP",
    "TrainConfig",
    "Trainer",
    "clip_grad_norm",
    "get_lr",
    "load_model",
    "make_strategy",
    "save_model",
]
