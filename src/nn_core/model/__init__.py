"""The model core: config, tensors, parameters, layers, attention, MoE, the transformer, loss.

It imports nothing from the rest of nn-core but ``nn_core.errors``.
"""

from .config import Config
from .transformer import KVCache, LossTerms, MoETransformer

__all__ = ["Config", "KVCache", "LossTerms", "MoETransformer"]
