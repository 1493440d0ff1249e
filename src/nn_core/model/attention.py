"""Multi-query causal self-attention with RoPE, its backward, and the KV cache.

Shape legend: B batch, S new positions, T key positions (T = start + S), H hidden,
nH query heads, nKV key/value heads, A = nH / nKV query heads per kv head, D head dim,
Q = nH*D, KV = nKV*D, N = B*S, R = nH + 2 nKV projected heads.

Query head h uses kv head h % nKV. Writing h = a*nKV + j puts the A query heads that
share kv head j side by side, so one batched product per kv head computes all their
scores: queries are kept grouped as [B, nKV, S*A, D] (for nKV = 1 that is the
projection's own layout: no copy).

Choices that keep the work in few, large, contiguous NumPy calls:
  * RoPE is ``x * cos + swap(x) * sin`` with swap exchanging the two entries of each pair
    (a reversed view, no copy) and a signed sin table; the 1/sqrt(D) score scale rides
    on the query tables. RoPE writes the rotated queries and keys straight into their
    grouped layout (the keys into the KV cache when there is one).
  * Scores are kept transposed, keys along rows: S^T [B, nKV, T, S*A]. The softmax then
    reduces over axis 2, which NumPy vectorizes across the S*A columns, instead of
    over short rows.

The same ``attention_forward`` serves training (no cache), prefill and one-token
decoding (with a ``KVCache``: the new keys and values are appended, the queries attend
over every cached position).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

from .layers import linear_backward, linear_forward
from .tensor import softmax, softmax_backward
from .workspace import Workspace, buffer

# ---------------------------------------------------------------------------- RoPE


class Rope(NamedTuple):
    """Rotation tables for positions 0..max_len-1 ([max_len, D]; signed sin: -sin at
    column 2i, +sin at 2i+1)."""

    cos_q: np.ndarray  # cos(t f_i) / sqrt(D): the query tables carry the score scale
    sin_q: np.ndarray
    cos_k: np.ndarray  # cos(t f_i)
    sin_k: np.ndarray


def rope_frequencies(theta: float, head_dim: int) -> np.ndarray:
    """RoPE: f_i = 1 / base^(2i / head_dim), i = 0 .. D/2-1 (base already NTK-scaled)."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def rope_tables(theta: float, head_dim: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and signed sin [max_len, D] in float64: angle t f_i at columns 2i and 2i+1."""
    angles = np.arange(max_len, dtype=np.float64)[:, None] * rope_frequencies(theta, head_dim)
    cos = np.repeat(np.cos(angles), 2, axis=1)  # [max_len, D]
    sin = np.repeat(np.sin(angles), 2, axis=1)
    sin[:, 0::2] *= -1  # the sign pattern of the rotation's first row
    return cos, sin


def build_rope(theta: float, head_dim: int, max_len: int, dtype: np.dtype) -> Rope:
    """The query tables (scaled by 1/sqrt(D)) and key tables in the model dtype."""
    cos, sin = rope_tables(theta, head_dim, max_len)
    scale = 1.0 / np.sqrt(head_dim)  # Attention: scores = q k^T / sqrt(head_dim), folded into q
    return Rope(*(t.astype(dtype) for t in (cos * scale, sin * scale, cos, sin)))


def _pairs(x: np.ndarray) -> np.ndarray:
    """[..., D] -> [..., D/2, 2] (a view)."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)


def rope_rotate(
    x: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    out: np.ndarray | None = None,
    tmp: np.ndarray | None = None,
) -> np.ndarray:
    """RoPE: pairs (x[2i], x[2i+1]) -> [x0 cos - x1 sin, x0 sin + x1 cos].

    x [..., D]; cos, sin (signed) broadcast against it. Computed as x * cos + swap(x) * sin
    with swap(x) = (x1, x0, x3, x2, ...) a reversed view of the pairs. ``out`` may be a
    strided view (the grouped query layout, the KV cache); ``tmp`` a scratch array of
    x's shape.
    """
    out = np.multiply(x, cos, out=out)
    swapped = _pairs(x)[..., ::-1]
    tmp = np.multiply(
        swapped, _pairs(np.broadcast_to(sin, x.shape)), out=None if tmp is None else _pairs(tmp)
    )
    _pairs(out)[...] += tmp
    return out


def rope_unrotate(
    dy: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    out: np.ndarray | None = None,
    tmp: np.ndarray | None = None,
) -> np.ndarray:
    """RoPE backward: the inverse rotation R(-t) = R(t)^T, i.e. dx = dy * cos + swap(dy * sin)."""
    out = np.multiply(dy, cos, out=out)
    tmp = np.multiply(dy, sin, out=tmp)
    _pairs(out)[...] += _pairs(tmp)[..., ::-1]
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


# ---------------------------------------------------------------------------- KV cache


class KVCache:
    """Per-layer rotated keys and values for incremental decoding.

    ``k[layer]``, ``v[layer]``: [B, nKV, max_len, D]; positions 0 .. length-1 are filled.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: np.dtype,
    ):
        shape = (batch_size, n_kv_heads, max_len, head_dim)  # [B, nKV, T_max, D]
        self.k = [np.zeros(shape, dtype) for _ in range(n_layers)]
        self.v = [np.zeros(shape, dtype) for _ in range(n_layers)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0  # positions filled so far


class KVLayer(NamedTuple):
    """One layer's slice of a KV cache, as attention_forward takes it."""

    k: np.ndarray  # [B, nKV, T_max, D]
    v: np.ndarray  # [B, nKV, T_max, D]


# ---------------------------------------------------------------------------- attention


class AttentionCache(NamedTuple):
    x: np.ndarray  # [N, H] normalized input
    q: np.ndarray  # [B, nKV, S*A, D] rotated, 1/sqrt(D)-scaled queries, grouped by kv head
    k: np.ndarray  # [B, nKV, T, D] rotated keys
    v: np.ndarray  # [B, nKV, T, D]
    p_t: np.ndarray  # [B, nKV, T, S*A] attention probabilities, transposed
    o: np.ndarray  # [N, Q] concatenated head outputs
    start: int  # position of the first new token


def _grouped(x: np.ndarray, batch: int, s: int, a: int, n_kv: int) -> np.ndarray:
    """Heads of a [B, S, nH, D] array as [B, S, A, nKV, D] (h = a*nKV + j; a view)."""
    return x.reshape(batch, s, a, n_kv, x.shape[-1])


def _group_view(g: np.ndarray, s: int, a: int) -> np.ndarray:
    """A grouped [B, nKV, S*A, D] array seen as [B, S, A, nKV, D] (a view)."""
    batch, n_kv, _, d = g.shape
    return g.reshape(batch, n_kv, s, a, d).transpose(0, 2, 3, 1, 4)


def attention_forward(
    x: np.ndarray,
    batch: int,
    w_qkv: np.ndarray,
    w_o: np.ndarray,
    n_heads: int,
    n_kv_heads: int,
    rope: Rope,
    start: int = 0,
    kv: KVLayer | None = None,
    ws: Workspace | None = None,
    key: str = "",
) -> tuple[np.ndarray, AttentionCache]:
    """Attention: scores = q k^T / sqrt(D) + causal mask; out = softmax(scores) v; heads
    concatenated then Wo.

    x [N, H] (N = B*S); w_qkv [Q + 2KV, H] (Wq, Wk, Wv stacked); w_o [H, Q]. With ``kv``,
    the new keys/values are written at positions start..start+S-1 and the queries attend
    over all T = start + S positions. -> (out [N, H], cache)
    """
    n = x.shape[0]
    s = n // batch
    d = rope.cos_k.shape[1]
    a = n_heads // n_kv_heads
    t = start + s
    dt = x.dtype
    qkv = linear_forward(x, w_qkv, ws, key + "qkv.")  # [N, Q + 2KV]
    qkv4 = qkv.reshape(batch, s, n_heads + 2 * n_kv_heads, d)  # [B, S, R, D]
    q_in, k_in = qkv4[:, :, :n_heads], qkv4[:, :, n_heads : n_heads + n_kv_heads]
    v_in = qkv4[:, :, n_heads + n_kv_heads :]  # [B, S, nKV, D]
    positions = slice(start, t)
    # RoPE on q (scaled by 1/sqrt(D)) straight into the grouped layout [B, nKV, S*A, D]
    qg = buffer(ws, key + "q", (batch, n_kv_heads, s * a, d), dt)
    c, sn = rope.cos_q[positions, None, None], rope.sin_q[positions, None, None]  # [S, 1, 1, D]
    rope_rotate(_grouped(q_in, batch, s, a, n_kv_heads), c, sn, out=_group_view(qg, s, a))
    # RoPE on k, into the cache (or a buffer); v as it is
    if kv is None:
        kg = buffer(ws, key + "k", (batch, n_kv_heads, s, d), dt)  # [B, nKV, T, D]
        k_out = kg.transpose(0, 2, 1, 3)
        vg = v_in.transpose(0, 2, 1, 3)  # [B, nKV, T, D] (a view of the projection)
    else:
        k_out = kv.k[:, :, positions].transpose(0, 2, 1, 3)  # [B, S, nKV, D] view of the cache
        np.copyto(kv.v[:, :, positions], v_in.transpose(0, 2, 1, 3))
        kg, vg = kv.k[:, :, :t], kv.v[:, :, :t]  # [B, nKV, T, D]
    c, sn = rope.cos_k[positions, None], rope.sin_k[positions, None]  # [S, 1, D]
    rope_rotate(k_in, c, sn, out=k_out)
    # scores, transposed: S^T = k q^T   [B, nKV, T, S*A]
    tws = ws if kv is None else None  # T-dependent buffers: per call when T grows
    scores_t = buffer(tws, key + "p_t", (batch, n_kv_heads, t, s * a), dt)
    np.matmul(kg, qg.transpose(0, 1, 3, 2), out=scores_t)
    if s > 1:
        scores5 = scores_t.reshape(batch, n_kv_heads, t, s, a)
        scores5 += causal_mask_t(s, t, dt)  # [T, S, 1] over B, nKV, A
    # Softmax over keys (axis 2); every query sees its own position: no all -inf column
    p_t = softmax(scores_t, axis=2, out=scores_t, may_be_masked=False)
    og = buffer(ws, key + "og", (batch, n_kv_heads, s * a, d), dt)
    np.matmul(p_t.transpose(0, 1, 3, 2), vg, out=og)  # out = softmax(scores) v
    if n_kv_heads == 1:
        o = og.reshape(n, n_heads * d)  # [N, Q] heads concatenated (a view)
    else:
        o = buffer(ws, key + "o", (n, n_heads * d), dt)
        np.copyto(
            _grouped(o.reshape(batch, s, n_heads, d), batch, s, a, n_kv_heads),
            _group_view(og, s, a),
        )
    out = linear_forward(o, w_o, ws, key + "o_proj.")  # [N, H]
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
    ws: Workspace | None = None,
    key: str = "",
) -> np.ndarray:
    """Attention backward, in the transposed layout:
    dP = do v^T; dv = P^T do; dS = softmax backward of dP; dq = dS k / sqrt(D);
    dk = dS^T q / sqrt(D); kv gradients summed over the query heads sharing them
    (the grouped products do that sum); then RoPE's backward R(-t) on dq, dk.
    The 1/sqrt(D) rides on the scaled q and on the query RoPE tables.
    """
    x, qg, kg, vg, p_t, o, start = cache
    n = x.shape[0]
    batch, n_kv, sa, d = qg.shape
    s = n // batch
    a = n_heads // n_kv_heads
    dt = x.dtype
    do = linear_backward(dout, o, w_o, dw_o, ws, key + "o_proj.")  # [N, Q]
    if n_kv_heads == 1:
        dog = do.reshape(batch, 1, sa, d)
    else:
        dog = buffer(ws, key + "dog", qg.shape, dt)
        np.copyto(
            _group_view(dog, s, a), _grouped(do.reshape(batch, s, n_heads, d), batch, s, a, n_kv)
        )
    dp_t = buffer(ws, key + "dp_t", p_t.shape, dt)
    np.matmul(vg, dog.transpose(0, 1, 3, 2), out=dp_t)  # dP^T = v do^T   [B, nKV, T, S*A]
    dvg = buffer(ws, key + "dv", vg.shape, dt)
    np.matmul(p_t, dog, out=dvg)  # dv = P^T do   [B, nKV, T, D]
    # Softmax backward: dS = P . (dP - sum_j P_j dP_j), sums over keys (axis 2 here)
    ds_t = softmax_backward(dp_t, p_t, axis=2, out=dp_t)
    dqg = buffer(ws, key + "dq", qg.shape, dt)
    np.matmul(ds_t.transpose(0, 1, 3, 2), kg, out=dqg)  # dq = dS k   [B, nKV, S*A, D]
    dkg = buffer(ws, key + "dk", kg.shape, dt)
    np.matmul(ds_t, qg, out=dkg)  # dk = dS^T q   [B, nKV, T, D]
    # RoPE backward (inverse rotation) into the q|k|v gradient; v passes through
    dqkv = buffer(ws, key + "dqkv", (batch, s, n_heads + 2 * n_kv, d), dt)  # [B, S, R, D]
    positions = slice(start, start + s)
    c, sn = rope.cos_q[positions, None, None], rope.sin_q[positions, None, None]
    rope_unrotate(
        _group_view(dqg, s, a), c, sn, out=_grouped(dqkv[:, :, :n_heads], batch, s, a, n_kv)
    )
    c, sn = rope.cos_k[positions, None], rope.sin_k[positions, None]
    rope_unrotate(dkg.transpose(0, 2, 1, 3), c, sn, out=dqkv[:, :, n_heads : n_heads + n_kv])
    np.copyto(dqkv[:, :, n_heads + n_kv :], dvg.transpose(0, 2, 1, 3))
    return linear_backward(dqkv.reshape(n, -1), x, w_qkv, dw_qkv, ws, key + "qkv.")  # [N, H]
