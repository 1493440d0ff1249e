"""Multi-query causal self-attention with RoPE (and NTK-aware scaling).

Shape legend: B batch, S new positions, T key positions (T = start + S),
H hidden, nH query heads, nKV key/value heads, A = nH / nKV query heads per kv
head, D head dim, Q = nH*D, KV = nKV*D, N = B*S.

Query head h uses kv head h % nKV (SPEC.md). Writing h = a*nKV + j puts the A
query heads that share kv head j side by side, so one batched product per kv
head computes all their scores: q [B, nKV, S*A, D] @ k^T [B, nKV, D, T].
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

# ---------------------------------------------------------------------------- RoPE


class Rope(NamedTuple):
    """Interleaved-pair rotation tables for positions 0..max_len-1."""

    cos: np.ndarray  # [max_len, D]  cos(t f_i) at columns 2i and 2i+1
    sin: np.ndarray  # [max_len, D]  -sin(t f_i) at column 2i, +sin(t f_i) at 2i+1


def rope_frequencies(theta: float, head_dim: int) -> np.ndarray:
    """RoPE: f_i = 1 / base^(2i / head_dim), i = 0 .. D/2-1 (base already NTK-scaled)."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def ntk_rope_base(base: float, alpha: float, head_dim: int) -> float:
    """NTK-aware RoPE: base' = base * alpha^(head_dim / (head_dim - 2)) when alpha > 1."""
    return base if alpha == 1 else base * alpha ** (head_dim / (head_dim - 2))


def build_rope(theta: float, head_dim: int, max_len: int, dtype: np.dtype) -> Rope:
    angles = np.arange(max_len, dtype=np.float64)[:, None] * rope_frequencies(theta, head_dim)
    cos = np.repeat(np.cos(angles), 2, axis=1)  # [max_len, D]
    sin = np.repeat(np.sin(angles), 2, axis=1)
    sin[:, 0::2] *= -1  # the sign pattern of the rotation's first row
    return Rope(cos.astype(dtype), sin.astype(dtype))


def _swap_pairs(x: np.ndarray) -> np.ndarray:
    """(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...) as a strided view [..., D/2, 2]."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)[..., ::-1]


def rope_rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE: pairs (x[2i], x[2i+1]) -> [x0 cos - x1 sin, x0 sin + x1 cos].

    x [B, S, heads, D]; cos, sin [S, 1, D] (the table rows of the positions).
    Passing -sin applies the inverse rotation R(-t) = R(t)^T: RoPE's backward.
    """
    half = (x.shape[-1] // 2, 2)
    out = x * cos
    out += (_swap_pairs(x) * sin.reshape(*sin.shape[:-1], *half)).reshape(x.shape)
    return out


# ---------------------------------------------------------------------------- masks


@lru_cache(maxsize=64)
def causal_mask(s: int, t: int, dtype: np.dtype) -> np.ndarray:
    """Additive causal mask [S, 1, T]: query row i (position t - s + i) sees keys <= it."""
    rows = np.arange(t - s, t)[:, None]
    mask = np.where(np.arange(t)[None, :] <= rows, 0.0, -np.inf).astype(dtype)
    mask.flags.writeable = False  # shared between calls and threads
    return mask[:, None, :]


# ---------------------------------------------------------------------------- attention


class AttentionCache(NamedTuple):
    x: np.ndarray  # [N, H] normalized input
    q: np.ndarray  # [B, nKV, S*A, D] rotated queries, grouped by kv head
    k: np.ndarray  # [B, nKV, T, D] rotated keys
    v: np.ndarray  # [B, nKV, T, D]
    p: np.ndarray  # [B, nKV, S*A, T] attention probabilities
    o: np.ndarray  # [N, Q] concatenated head outputs
    start: int  # position of the first new token


class KVLayerCache(NamedTuple):
    """Keys and values of one layer for incremental decoding."""

    k: np.ndarray  # [B, max_len, nKV, D] rotated keys
    v: np.ndarray  # [B, max_len, nKV, D]


def attention_forward(
    x: np.ndarray,
    batch: int,
    w_qkv: np.ndarray,
    w_o: np.ndarray,
    n_heads: int,
    n_kv_heads: int,
    rope: Rope,
    start: int = 0,
    kv: KVLayerCache | None = None,
) -> tuple[np.ndarray, AttentionCache]:
    """Attention: scores = q k^T / sqrt(D) + causal mask; out = softmax(scores) v; heads
    concatenated then Wo.

    x [N, H] (N = B*S); w_qkv [Q + 2KV, H] (Wq, Wk, Wv stacked); w_o [H, Q].
    With ``kv``, the new keys/values are written at positions start..start+S-1
    and the queries attend over all T = start + S cached positions.
    """
    n = x.shape[0]
    s = n // batch
    d = rope.cos.shape[1]
    a = n_heads // n_kv_heads
    qkv = (x @ w_qkv.T).reshape(batch, s, n_heads + 2 * n_kv_heads, d)  # [B, S, nH+2nKV, D]
    cos = rope.cos[start : start + s, None, :]  # [S, 1, D]
    sin = rope.sin[start : start + s, None, :]
    qk = rope_rotate(qkv[:, :, : n_heads + n_kv_heads], cos, sin)  # RoPE on q and k at once
    q = qk[:, :, :n_heads]  # [B, S, nH, D]
    k = qk[:, :, n_heads:]  # [B, S, nKV, D]
    v = qkv[:, :, n_heads + n_kv_heads :]  # [B, S, nKV, D]
    if kv is not None:
        kv.k[:, start : start + s] = k
        kv.v[:, start : start + s] = v
        k, v = kv.k[:, : start + s], kv.v[:, : start + s]  # [B, T, nKV, D]
    t = k.shape[1]
    # group query heads by kv head: h = a_i*nKV + j  ->  [B, nKV, S*A, D]
    qg = (
        q.reshape(batch, s, a, n_kv_heads, d)
        .transpose(0, 3, 1, 2, 4)
        .reshape(batch, n_kv_heads, s * a, d)
    )
    kg = k.transpose(0, 2, 1, 3)  # [B, nKV, T, D]
    vg = v.transpose(0, 2, 1, 3)  # [B, nKV, T, D]
    scores = qg @ kg.transpose(0, 1, 3, 2)  # [B, nKV, S*A, T]
    scores *= 1.0 / np.sqrt(d)
    if s > 1:
        scores5 = scores.reshape(batch, n_kv_heads, s, a, t)
        scores5 += causal_mask(s, t, scores.dtype)  # [S, 1, T] broadcast over B, nKV, A
    # Softmax along keys; every row sees its own position, so no row is all -inf.
    scores -= np.max(scores, axis=-1, keepdims=True)
    p = np.exp(scores, out=scores)
    p /= np.sum(p, axis=-1, keepdims=True)
    og = p @ vg  # [B, nKV, S*A, D]
    o = og.reshape(batch, n_kv_heads, s, a, d).transpose(0, 2, 3, 1, 4).reshape(n, -1)  # [N, Q]
    out = o @ w_o.T  # [N, H]
    return out, AttentionCache(x, qg, kg, vg, p, o, start)


def attention_backward(
    dout: np.ndarray,
    cache: AttentionCache,
    w_qkv: np.ndarray,
    w_o: np.ndarray,
    dw_qkv: np.ndarray,
    dw_o: np.ndarray,
    n_heads: int,
    n_kv_heads: int,
    rope: Rope,
) -> np.ndarray:
    """Attention backward (SPEC.md section 7):
    dP = do v^T; dv = P^T do; dS = softmax backward of dP; dq = dS k / sqrt(D);
    dk = dS^T q / sqrt(D); kv gradients summed over the query heads sharing them
    (the grouped products do that sum); then RoPE's backward R(-t) on dq, dk.
    Training only: the cache holds every position (start = 0, T = S).
    """
    x, qg, kg, vg, p, o, start = cache
    n = x.shape[0]
    batch, n_kv, sa, d = qg.shape
    s = n // batch
    a = n_heads // n_kv_heads
    dw_o += dout.T @ o  # [H, Q]
    do = dout @ w_o  # [N, Q]
    dog = do.reshape(batch, s, a, n_kv, d).transpose(0, 3, 1, 2, 4).reshape(batch, n_kv, sa, d)
    dp = dog @ vg.transpose(0, 1, 3, 2)  # dP = do v^T   [B, nKV, S*A, T]
    dvg = p.transpose(0, 1, 3, 2) @ dog  # dv = P^T do   [B, nKV, T, D]
    # Softmax backward: dS = P . (dP - sum_j P_j dP_j), with the 1/sqrt(D) of the scores
    ds = dp
    ds -= np.einsum("bjrt,bjrt->bjr", p, dp)[..., None]
    ds *= p
    ds *= 1.0 / np.sqrt(d)
    dqg = ds @ kg  # dq = dS k / sqrt(D)      [B, nKV, S*A, D]
    dkg = ds.transpose(0, 1, 3, 2) @ qg  # dk = dS^T q / sqrt(D)  [B, nKV, T, D]
    dqkv = np.empty((batch, s, n_heads + 2 * n_kv_heads, d), dtype=x.dtype)
    dqkv[:, :, :n_heads] = (
        dqg.reshape(batch, n_kv, s, a, d).transpose(0, 2, 3, 1, 4).reshape(batch, s, n_heads, d)
    )
    dqkv[:, :, n_heads : n_heads + n_kv] = dkg.transpose(0, 2, 1, 3)
    dqkv[:, :, n_heads + n_kv :] = dvg.transpose(0, 2, 1, 3)
    # RoPE backward: the inverse rotation R(-t) = R(t)^T, i.e. the tables with -sin
    cos = rope.cos[start : start + s, None, :]
    sin = rope.sin[start : start + s, None, :]
    dqkv[:, :, : n_heads + n_kv] = rope_rotate(dqkv[:, :, : n_heads + n_kv], cos, -sin)
    dqkv2 = dqkv.reshape(n, -1)  # [N, Q + 2KV]
    dw_qkv += dqkv2.T @ x  # [Q + 2KV, H]
    return dqkv2 @ w_qkv  # [N, H]
