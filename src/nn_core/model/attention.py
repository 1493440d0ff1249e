"""Multi-query causal self-attention with RoPE (and NTK-aware scaling).

Shape legend: B batch, S new positions, T key positions (T = start + S),
H hidden, nH query heads, nKV key/value heads, A = nH / nKV query heads per kv
head, D head dim, Q = nH*D, KV = nKV*D, N = B*S, R = nH + 2 nKV projected heads.

Query head h uses kv head h % nKV (SPEC.md). Writing h = a*nKV + j puts the A
query heads that share kv head j side by side, so one batched product per kv
head computes all their scores.

Two choices keep the work in few, large, contiguous NumPy calls:
  * RoPE is ``x * cos + (x @ P) * sin`` with P the pair-swap permutation, applied
    to the whole q|k|v projection at once with tables that leave v unrotated
    (cos 1, sin 0) and carry the 1/sqrt(D) score scale on the q heads.
  * Scores are kept transposed, keys along rows: S^T [B, nKV, T, S*A]. The
    softmax then reduces over axis -2, which NumPy vectorizes across columns,
    instead of over short rows.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

# ---------------------------------------------------------------------------- RoPE


class Rope(NamedTuple):
    """Rotation tables for positions 0..max_len-1, one row per projected head."""

    cos: np.ndarray  # [max_len, R, D]  cos(t f_i) at columns 2i, 2i+1 (q heads x 1/sqrt(D); v: 1)
    sin: np.ndarray  # [max_len, R, D]  -sin at 2i, +sin at 2i+1 (q heads x 1/sqrt(D); v: 0)
    swap: np.ndarray  # [D, D]  pair swap: (x @ swap)[2i] = x[2i+1], (x @ swap)[2i+1] = x[2i]


def rope_frequencies(theta: float, head_dim: int) -> np.ndarray:
    """RoPE: f_i = 1 / base^(2i / head_dim), i = 0 .. D/2-1 (base already NTK-scaled)."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def ntk_rope_base(base: float, alpha: float, head_dim: int) -> float:
    """NTK-aware RoPE: base' = base * alpha^(head_dim / (head_dim - 2)) when alpha > 1."""
    return base if alpha == 1 else base * alpha ** (head_dim / (head_dim - 2))


def rope_tables(theta: float, head_dim: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and signed sin [max_len, D] in float64, for the pair layout of SPEC.md."""
    angles = np.arange(max_len, dtype=np.float64)[:, None] * rope_frequencies(theta, head_dim)
    cos = np.repeat(np.cos(angles), 2, axis=1)  # [max_len, D]
    sin = np.repeat(np.sin(angles), 2, axis=1)
    sin[:, 0::2] *= -1  # the sign pattern of the rotation's first row
    return cos, sin


def pair_swap(head_dim: int, dtype: np.dtype) -> np.ndarray:
    """The permutation matrix P with (x @ P) = (x1, x0, x3, x2, ...)."""
    swap = np.zeros((head_dim, head_dim), dtype=dtype)
    idx = np.arange(head_dim)
    swap[idx ^ 1, idx] = 1
    return swap


def build_rope(
    theta: float, head_dim: int, max_len: int, n_heads: int, n_kv_heads: int, dtype: np.dtype
) -> Rope:
    """Tables for the q|k|v projection: nH scaled query heads, nKV key heads, nKV value heads."""
    cos, sin = rope_tables(theta, head_dim, max_len)
    scale = 1.0 / np.sqrt(head_dim)  # Attention: scores = q k^T / sqrt(head_dim), folded into q
    rows = [(cos * scale, sin * scale)] * n_heads + [(cos, sin)] * n_kv_heads
    rows += [(np.ones_like(cos), np.zeros_like(sin))] * n_kv_heads  # v is not rotated
    c = np.stack([r[0] for r in rows], axis=1).astype(dtype)  # [max_len, R, D]
    s = np.stack([r[1] for r in rows], axis=1).astype(dtype)
    return Rope(c, s, pair_swap(head_dim, dtype))


def rope_rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, swap: np.ndarray) -> np.ndarray:
    """RoPE: pairs (x[2i], x[2i+1]) -> [x0 cos - x1 sin, x0 sin + x1 cos].

    x [..., S, heads, D]; cos, sin broadcast against it (rows of a Rope table).
    Computed as x * cos + (x @ P) * sin with the signed sin table.
    """
    d = x.shape[-1]
    out = (x.reshape(-1, d) @ swap).reshape(x.shape)
    out *= sin
    out += x * cos
    return out


def rope_unrotate(dy: np.ndarray, cos: np.ndarray, sin: np.ndarray, swap: np.ndarray) -> np.ndarray:
    """RoPE backward: the inverse rotation R(-t) = R(t)^T, i.e. dx = dy * cos + (dy * sin) @ P^T."""
    d = dy.shape[-1]
    out = ((dy * sin).reshape(-1, d) @ swap.T).reshape(dy.shape)
    out += dy * cos
    return out


# ---------------------------------------------------------------------------- masks


@lru_cache(maxsize=64)
def causal_mask_t(s: int, t: int, dtype: np.dtype) -> np.ndarray:
    """Additive causal mask, transposed: [T, S, 1]; key u is visible to query row i
    (at position t - s + i) when u <= t - s + i."""
    rows = np.arange(t - s, t)[None, :]  # query positions
    mask = np.where(np.arange(t)[:, None] <= rows, 0.0, -np.inf).astype(dtype)
    mask.flags.writeable = False  # shared between calls and threads
    return mask[:, :, None]


# ---------------------------------------------------------------------------- attention


class AttentionCache(NamedTuple):
    x: np.ndarray  # [N, H] normalized input
    q: np.ndarray  # [B, nKV, S*A, D] rotated, 1/sqrt(D)-scaled queries, grouped by kv head
    k: np.ndarray  # [B, nKV, T, D] rotated keys
    v: np.ndarray  # [B, nKV, T, D]
    p_t: np.ndarray  # [B, nKV, T, S*A] attention probabilities, transposed
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

    x [N, H] (N = B*S); w_qkv [Q + 2KV, H] (Wq, Wk, Wv stacked); w_o [H, Q]; ``rope``
    built for (n_heads, n_kv_heads). With ``kv``, the new keys/values are written at
    positions start..start+S-1 and the queries attend over all T = start + S positions.
    """
    n = x.shape[0]
    s = n // batch
    d = rope.swap.shape[0]
    a = n_heads // n_kv_heads
    qkv = (x @ w_qkv.T).reshape(batch, s, -1, d)  # [B, S, R, D]
    qkv = rope_rotate(qkv, rope.cos[start : start + s], rope.sin[start : start + s], rope.swap)
    q = qkv[:, :, :n_heads]  # [B, S, nH, D] rotated, scaled by 1/sqrt(D)
    k = qkv[:, :, n_heads : n_heads + n_kv_heads]  # [B, S, nKV, D] rotated
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
    scores_t = kg @ qg.transpose(0, 1, 3, 2)  # S^T = k q^T   [B, nKV, T, S*A]
    if s > 1:
        scores5 = scores_t.reshape(batch, n_kv_heads, t, s, a)
        scores5 += causal_mask_t(s, t, scores_t.dtype)  # [T, S, 1] over B, nKV, A
    # Softmax over keys (axis -2); every query sees its own position: no all -inf column.
    scores_t -= scores_t.max(axis=2, keepdims=True)
    p_t = np.exp(scores_t, out=scores_t)
    p_t /= p_t.sum(axis=2, keepdims=True)
    og = p_t.transpose(0, 1, 3, 2) @ vg  # out = softmax(scores) v   [B, nKV, S*A, D]
    o = og.reshape(batch, n_kv_heads, s, a, d).transpose(0, 2, 3, 1, 4).reshape(n, -1)  # [N, Q]
    out = o @ w_o.T  # [N, H]
    return out, AttentionCache(x, qg, kg, vg, p_t, o, start)


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
    """Attention backward (SPEC.md section 7), in the transposed layout:
    dP = do v^T; dv = P^T do; dS = softmax backward of dP; dq = dS k / sqrt(D);
    dk = dS^T q / sqrt(D); kv gradients summed over the query heads sharing them
    (the grouped products do that sum); then RoPE's backward R(-t) on dq, dk.
    The 1/sqrt(D) rides on the scaled q and on the q rows of the RoPE tables.
    """
    x, qg, kg, vg, p_t, o, start = cache
    n = x.shape[0]
    batch, n_kv, sa, d = qg.shape
    s = n // batch
    a = n_heads // n_kv_heads
    dw_o += dout.T @ o  # [H, Q]
    do = dout @ w_o  # [N, Q]
    dog = do.reshape(batch, s, a, n_kv, d).transpose(0, 3, 1, 2, 4).reshape(batch, n_kv, sa, d)
    dp_t = vg @ dog.transpose(0, 1, 3, 2)  # dP^T = v do^T   [B, nKV, T, S*A]
    dvg = p_t @ dog  # dv = P^T do   [B, nKV, T, D]
    # Softmax backward: dS = P . (dP - sum_j P_j dP_j), sums over keys (axis -2 here)
    ds_t = dp_t
    ds_t -= (p_t * dp_t).sum(axis=2, keepdims=True)
    ds_t *= p_t
    dqg = ds_t.transpose(0, 1, 3, 2) @ kg  # dq = dS k   [B, nKV, S*A, D]
    dkg = ds_t @ qg  # dk = dS^T q   [B, nKV, T, D]
    dqkv = np.empty((batch, s, n_heads + 2 * n_kv_heads, d), dtype=x.dtype)  # [B, S, R, D]
    dqkv[:, :, :n_heads] = (
        dqg.reshape(batch, n_kv, s, a, d).transpose(0, 2, 3, 1, 4).reshape(batch, s, n_heads, d)
    )
    dqkv[:, :, n_heads : n_heads + n_kv] = dkg.transpose(0, 2, 1, 3)
    dqkv[:, :, n_heads + n_kv :] = dvg.transpose(0, 2, 1, 3)
    # RoPE backward (inverse rotation); v rows pass through (cos 1, sin 0)
    dqkv = rope_unrotate(dqkv, rope.cos[start : start + s], rope.sin[start : start + s], rope.swap)
    dqkv2 = dqkv.reshape(n, -1)  # [N, Q + 2KV]
    dw_qkv += dqkv2.T @ x  # [Q + 2KV, H]
    return dqkv2 @ w_qkv  # [N, H]
