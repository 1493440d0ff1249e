"""nn-core: a from-scratch Mixture-of-Experts transformer on NumPy.

The public API (see README.md): ``Config``, ``MoETransformer``, training with
``TrainConfig``/``Trainer``, sampling strategies and ``generate`` (in
``nn_core.generate``), the benchmark in ``nn_core.bench``.
"""

from .data.tokenizer import ByteTokenizer
from .errors import (
    CheckpointError,
    ConfigError,
    InputError,
    InUseError,
    NNCoreError,
    NonFiniteError,
    OutputError,
)
from .inference.sampling import Greedy, SamplingStrategy, Temperature, TopK, TopP, make_strategy
from .model import KVCache, LossTerms, MoETransformer
from .model.config import Config
from .storage.checkpoint import load_model, save_model
from .training.config import TrainConfig
from .training.optim import AdamW, clip_grad_norm, get_lr
from .training.trainer import Trainer
from .version import __version__

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
