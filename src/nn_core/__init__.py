"""nn-core: a from-scratch Mixture-of-Experts transformer on NumPy."""

from .config import Config
from .errors import CheckpointError, ConfigError, InputError, NNCoreError, NonFiniteError
from .model import KVCache, LossTerms, MoETransformer

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "InputError",
    "KVCache",
    "LossTerms",
    "MoETransformer",
    "NNCoreError",
    "NonFiniteError",
]
__version__ = "0.1.0"
