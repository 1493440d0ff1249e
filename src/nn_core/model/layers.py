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


# ---------------------------------------------------------------------------- SwiGLU experts


class SwiGLUCache(NamedTuple):
    x: np.ndarray  # [C, H] input rows, grouped by expert
    bounds: list[tuple[int, int, int]]  # (expert, first row, end row) of each non-empty expert
    g: np.ndarray  # [C, F] G = x Wg^T
    u: np.ndarray  # [C, F] U = x Wu^T
    sig: np.ndarray  # [C, F] sigma(G)
    h: np.ndarray  # [C, F] h = s(G) . U


def expert_bounds(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of each expert that received rows; empty ones skipped."""
    bounds, end = [], 0
    for e, c in enumerate(counts):
        if c:
            bounds.append((e, end, end + c))
            end += c
    return bounds


def swiglu_forward(
    x: np.ndarray,
    w_gate: np.ndarray,
    w_up: np.ndarray,
    w_down: np.ndarray,
    counts: list[int] | None = None,
) -> tuple[np.ndarray, SwiGLUCache]:
    """SwiGLU expert: out = Down(SiLU(Gate(x)) * Up(x)).

    One expert: x [C, H]; w_gate, w_up [F, H]; w_down [H, F] -> out [C, H].
    Stacked experts: w_gate, w_up [E, F, H]; w_down [E, H, F]; ``counts`` [E] rows of
    each expert, x grouped by expert. Each expert is one product per weight, and the
    element-wise SiLU . U runs once over all rows.
    """
    if counts is None:  # a single expert
        w_gate, w_up, w_down, counts = w_gate[None], w_up[None], w_down[None], [x.shape[0]]
    bounds = expert_bounds(counts)
    rows, f = x.shape[0], w_gate.shape[1]
    g = np.empty((rows, f), dtype=x.dtype)  # [C, F]
    u = np.empty((rows, f), dtype=x.dtype)  # [C, F]
    for e, lo, hi in bounds:
        np.matmul(x[lo:hi], w_gate[e].T, out=g[lo:hi])  # G = x Wg^T
        np.matmul(x[lo:hi], w_up[e].T, out=u[lo:hi])  # U = x Wu^T
    sig = sigmoid(g)  # [C, F]
    h = g * sig  # SiLU: silu(G) = G sigma(G)
    h *= u  # h = s(G) . U
    out = np.empty_like(x)  # [C, H]
    for e, lo, hi in bounds:
        np.matmul(h[lo:hi], w_down[e].T, out=out[lo:hi])  # Down(h)
    return out, SwiGLUCache(x, bounds, g, u, sig, h)


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
    """SwiGLU backward (SPEC.md section 7), per expert for the products:
    dh = dout Wd; dWd += dout^T h; dG = dh . U . s'(G); dU = dh . s(G);
    dx = dG Wg + dU Wu; dWg += dG^T x; dWu += dU^T x,
    with the SiLU derivative s'(x) = sigma(x) (1 + x (1 - sigma(x))).
    """
    x, bounds, g, u, sig, h = cache
    if w_gate.ndim == 2:  # a single expert
        w_gate, w_up, w_down = w_gate[None], w_up[None], w_down[None]
        dw_gate, dw_up, dw_down = dw_gate[None], dw_up[None], dw_down[None]
    dh = np.empty_like(h)  # [C, F]
    for e, lo, hi in bounds:
        np.matmul(dout[lo:hi], w_down[e], out=dh[lo:hi])  # dh = dout Wd
        dw_down[e] += dout[lo:hi].T @ h[lo:hi]  # dWd += dout^T h   [H, F]
    du = g * sig  # s(G)
    du *= dh  # dU = dh . s(G)
    dg = 1 - sig
    dg *= g
    dg += 1
    dg *= sig  # s'(G) = sigma(G) (1 + G (1 - sigma(G)))
    dg *= u
    dg *= dh  # dG = dh . U . s'(G)
    dx = np.empty_like(x)  # [C, H]
    for e, lo, hi in bounds:
        dw_gate[e] += dg[lo:hi].T @ x[lo:hi]  # dWg += dG^T x   [F, H]
        dw_up[e] += du[lo:hi].T @ x[lo:hi]  # dWu += dU^T x   [F, H]
        np.matmul(dg[lo:hi], w_gate[e], out=dx[lo:hi])  # dx = dG Wg + dU Wu
        dx[lo:hi] += du[lo:hi] @ w_up[e]
    return dx
