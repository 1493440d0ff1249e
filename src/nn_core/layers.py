"""Embedding, RMSNorm, Linear and the SwiGLU expert: forward/backward pairs.

Shape legend: N tokens (rows), H hidden, F ffn, V vocab, C rows routed to one expert.
Each ``*_forward`` returns ``(out, cache)``; each ``*_backward`` takes the
upstream gradient and that cache, ADDS parameter gradients into the given
buffers (``+=``) and returns the gradient of its input.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .tensor import sigmoid

# ---------------------------------------------------------------------------- Embedding


def embedding_forward(ids: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Embedding: out = W[token_id, :].   ids [N] int, W [V, H] -> [N, H]."""
    return weight[ids]


def embedding_backward(dout: np.ndarray, ids: np.ndarray, dweight: np.ndarray) -> None:
    """dW[ids] += dout; repeated ids accumulate (np.add.at, not fancy assignment)."""
    np.add.at(dweight, ids, dout)


# ---------------------------------------------------------------------------- RMSNorm


class RMSNormCache(NamedTuple):
    x: np.ndarray  # [N, H] input
    r: np.ndarray  # [N, 1] 1 / sqrt(mean(x^2) + eps)


def rmsnorm_forward(
    x: np.ndarray, gain: np.ndarray, eps: float = 1e-6
) -> tuple[np.ndarray, RMSNormCache]:
    """RMSNorm: y = x * 1/sqrt(mean(x^2) + eps) * gamma.   x [N, H], gamma [H]."""
    ms = np.einsum("nh,nh->n", x, x)[:, None] * (1.0 / x.shape[-1])  # [N, 1] mean(x^2)
    r = 1.0 / np.sqrt(ms + eps)  # [N, 1]
    y = x * r
    y *= gain
    return y, RMSNormCache(x, r)


def rmsnorm_backward(
    dy: np.ndarray, cache: RMSNormCache, gain: np.ndarray, dgain: np.ndarray
) -> np.ndarray:
    """RMSNorm backward, per row with r = (mean(x^2) + eps)^(-1/2):
    a = dy . g;  dx = r . a - x . r^3 . (sum_j a_j x_j) / H;  dg = sum over rows of dy . x . r.
    """
    x, r = cache
    xn = x * r  # [N, H] normalized input
    dgain += np.einsum("nh,nh->h", dy, xn)
    a = dy * gain  # [N, H]
    # x . r^3 . sum(a x) / H  ==  xn . r . mean(a . xn)
    proj = np.einsum("nh,nh->n", a, xn)[:, None] * (1.0 / x.shape[-1])  # [N, 1]
    a -= xn * proj
    a *= r
    return a


# ---------------------------------------------------------------------------- Linear


def linear_forward(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Linear: Y = X @ W^T, W stored [out_features, in_features], no bias."""
    return x @ weight.T


def linear_backward(
    dy: np.ndarray, x: np.ndarray, weight: np.ndarray, dweight: np.ndarray
) -> np.ndarray:
    """dW += dY^T X;  dX = dY W."""
    dweight += dy.T @ x
    return dy @ weight


# ---------------------------------------------------------------------------- SwiGLU expert


class SwiGLUCache(NamedTuple):
    x: np.ndarray  # [C, H] input rows
    g: np.ndarray  # [C, F] G = x Wg^T
    u: np.ndarray  # [C, F] U = x Wu^T
    sig: np.ndarray  # [C, F] sigma(G)
    h: np.ndarray  # [C, F] h = s(G) . U


def swiglu_forward(
    x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray
) -> tuple[np.ndarray, SwiGLUCache]:
    """SwiGLU expert: out = Down(SiLU(Gate(x)) * Up(x)).

    x [C, H]; w_gate, w_up [F, H]; w_down [H, F] -> out [C, H].
    """
    g = x @ w_gate.T  # [C, F]
    u = x @ w_up.T  # [C, F]
    sig = sigmoid(g)  # [C, F]
    h = g * sig  # SiLU: silu(G) = G sigma(G)
    h *= u  # h = s(G) . U
    out = h @ w_down.T  # [C, H]
    return out, SwiGLUCache(x, g, u, sig, h)


def swiglu_backward(
    dout: np.ndarray,
    cache: SwiGLUCache,
    w_gate: np.ndarray,
    w_up: np.ndarray,
    w_down: np.ndarray,
    dw_gate: np.ndarray,
    dw_up: np.ndarray,
    dw_down: np.ndarray,
) -> np.ndarray:
    """SwiGLU backward (SPEC.md section 7):
    dh = dout Wd; dWd += dout^T h; dG = dh . U . s'(G); dU = dh . s(G);
    dx = dG Wg + dU Wu; dWg += dG^T x; dWu += dU^T x,
    with the SiLU derivative s'(x) = sigma(x) (1 + x (1 - sigma(x))).
    """
    x, g, u, sig, h = cache
    dh = dout @ w_down  # [C, F]
    dw_down += dout.T @ h  # [H, F]
    silu_g = g * sig  # s(G)
    du = dh * silu_g  # dU = dh . s(G)
    dsilu = sig * (1 + g * (1 - sig))  # s'(G)
    dg = dh * u
    dg *= dsilu  # dG = dh . U . s'(G)
    dw_gate += dg.T @ x  # [F, H]
    dw_up += du.T @ x  # [F, H]
    return dg @ w_gate + du @ w_up  # [C, H]
