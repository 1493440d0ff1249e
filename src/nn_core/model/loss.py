"""Cross-entropy over the vocabulary.

Shapes: N tokens, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .tensor import exp_shifted
from .workspace import Workspace, buffer


class CECache(NamedTuple):
    probs: np.ndarray  # [N, V] softmax(logits)
    targets: np.ndarray  # [N] int


def cross_entropy_forward(
    logits: np.ndarray,
    targets: np.ndarray,
    ws: Workspace | None = None,
    key: str = "",
) -> tuple[float, CECache]:
    """Cross-entropy: L = -(1/N) sum_i log softmax(logits_i)[target_i].

    Numerically stable: log softmax(z)_t = z_t - max z - log sum exp(z - max z), from the
    same parts as the softmax (``tensor.exp_shifted``); no exp can overflow.
    """
    n = logits.shape[0]  # logits [N, V], targets [N]
    e, m, s = exp_shifted(logits, 1, buffer(ws, key + "probs", logits.shape, logits.dtype))
    rows = np.arange(n)
    log_p_target = logits[rows, targets] - m[:, 0] - np.log(s[:, 0])  # [N]
    loss = -float(np.mean(log_p_target, dtype=np.float64))
    e /= s  # probs [N, V]
    return loss, CECache(e, targets)


def cross_entropy_backward(cache: CECache, scale: float = 1.0) -> np.ndarray:
    """CE gradient: dL/dlogits = (softmax(logits) - one_hot(target)) / N, times ``scale``.

    Written into the cache's probability buffer (the cache is consumed by its backward).
    """
    probs, targets = cache
    n = probs.shape[0]
    dlogits = probs
    dlogits[np.arange(n), targets] -= 1
    dlogits *= scale / n
    return dlogits
