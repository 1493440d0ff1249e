"""The model core: config, tensors, parameters, layers, attention, MoE, the transformer, loss.

It imports nothing from the rest of nn-core but ``nn_core.errors``.
"""

from .attention import KVCache
from .config import Config
from .transformer import LossState, LossTerms, MoETransformer

__all__ = ["Config", "KVCache", "LossState", "LossTerms", "MoETransformer"]
