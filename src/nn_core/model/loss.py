"""Cross-entropy over the vocabulary (SPEC.md section 3).

Shapes: N tokens, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class CECache(NamedTuple):
    probs: np.ndarray  # [N, V] softmax(logits)
    targets: np.ndarray  # [N] int


def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray) -> tuple[float, CECache]:
    """Cross-entropy: L = -(1/N) sum_i log softmax(logits_i)[target_i].

    Numerically stable: log softmax = z - log sum exp z with z = logits - max.
    """
    n = logits.shape[0]  # logits [N, V], targets [N]
    z = logits - np.max(logits, axis=1, keepdims=True)  # [N, V]
    e = np.exp(z)
    sum_e = np.sum(e, axis=1)  # [N]
    log_probs_target = z[np.arange(n), targets] - np.log(sum_e)  # [N]
    loss = -float(np.mean(log_probs_target, dtype=np.float64))
    e /= sum_e[:, None]  # probs [N, V]
    return loss, CECache(e, targets)


def cross_entropy_backward(cache: CECache) -> np.ndarray:
    """CE gradient: dL/dlogits = (softmax(logits) - one_hot(target)) / N."""
    probs, targets = cache
    n = probs.shape[0]
    dlogits = probs  # reuse the buffer: the cache is consumed by its backward
    dlogits[np.arange(n), targets] -= 1
    dlogits *= 1.0 / n
    return dlogits
