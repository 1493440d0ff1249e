"""Multi-query causal self-attention with RoPE, its backward, and the KV cache.

Shape legend: B batch, S new positions, T key positions (T = start + S), H hidden,
nH query heads, nKV key/value heads, A = nH / nKV query heads per kv head, D head dim,
Q = nH*D, KV = nKV*D, N = B*S, R = nH + 2 nKV projected heads.

Query head h uses kv head h % nKV. Writing h = a*nKV + j puts the A query heads that
share kv head j side by side, so one batched product per kv head computes all their
scores: queries are kept grouped as [B, nKV, S*A, D] (for nKV = 1 that is the
projection's own layout: no copy).

Choices that keep the work in few, large, contiguous NumPy calls:
  * RoPE is one complex multiply: each pair (x0, x1) seen as x0 + i x1 (a view of the
    float array), times e^(i t f_k); the 1/sqrt(D) score scale rides on the query
    table. RoPE writes the rotated queries and keys straight into their grouped layout
    (the keys into the KV cache when there is one).
  * Scores are kept transposed, keys along rows: S^T [B, nKV, T, S*A]. The softmax then
    reduces over axis 2, which NumPy vectorizes across the S*A columns, instead of
    over short rows.

The same ``attention_forward`` serves training (no cache) and prefill (with a
``KVCache``: the new keys and values are appended, the queries attend over every cached
position). ``attention_step`` is the arrangement for one new position per row (S = 1,
decoding): the same helpers (``linear_forward``, ``rope_rotate``, ``softmax``) on buffers
made once per batch size (``AttentionStep``), with the scores kept in row layout
[B, nKV, A, T]: with A columns only, a softmax over the T keys along rows is several
times cheaper than down columns, and a single query needs no causal mask.
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
    """Rotations e^(i t f_k) for positions t = 0..max_len-1, as complex [max_len, D/2]."""

    q: np.ndarray  # e^(i t f_k) / sqrt(D): the query rotations carry the score scale
    q_back: np.ndarray  # the conjugates (the inverse rotation), for the backward
    k: np.ndarray  # e^(i t f_k)
    k_back: np.ndarray


def rope_frequencies(theta: float, head_dim: int) -> np.ndarray:
    """RoPE: f_k = 1 / base^(2k / head_dim), k = 0 .. D/2-1 (base already NTK-scaled)."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def rope_tables(theta: float, head_dim: int, max_len: int) -> np.ndarray:
    """e^(i t f_k) = cos(t f_k) + i sin(t f_k), complex128 [max_len, D/2]."""
    angles = np.arange(max_len, dtype=np.float64)[:, None] * rope_frequencies(theta, head_dim)
    return np.cos(angles) + 1j * np.sin(angles)


def build_rope(theta: float, head_dim: int, max_len: int, dtype: np.dtype) -> Rope:
    """The rotation tables in the model's complex dtype (complex64 for float32)."""
    rot = rope_tables(theta, head_dim, max_len)
    scaled = rot / np.sqrt(head_dim)  # Attention: scores = q k^T / sqrt(head_dim), folded into q
    cdt = np.result_type(dtype, np.complex64)
    return Rope(*(r.astype(cdt) for r in (scaled, scaled.conj(), rot, rot.conj())))


# the complex dtype whose pairs a real dtype's array is viewed as (np.result_type(dt,
# complex64), looked up once: it costs about a microsecond per call)
_COMPLEX_OF = {np.dtype(dt): np.result_type(dt, np.complex64) for dt in (np.float32, np.float64)}


def _complex(x: np.ndarray) -> np.ndarray:
    """A real [..., D] array (last axis contiguous) seen as complex [..., D/2]: entry k is
    the pair x[2k] + i x[2k+1] (a view; a complex array is returned as it is)."""
    if x.dtype.kind == "c":
        return x
    cdt = _COMPLEX_OF.get(x.dtype)
    return x.view(np.result_type(x.dtype, np.complex64) if cdt is None else cdt)


def rope_rotate(x: np.ndarray, rot: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """RoPE: pairs (x[2k], x[2k+1]) -> [x0 cos - x1 sin, x0 sin + x1 cos].

    That is the pair as the complex number x0 + i x1 times e^(i t f_k): one complex
    multiply. x [..., D] real; ``rot`` complex [..., D/2] broadcast against it (rows of
    a Rope table); ``out`` (real, x's shape) may be a strided view whose last axis is
    contiguous: the grouped query layout, the KV cache. ``x`` and ``out`` may also be
    given already seen as complex [..., D/2] (``attention_step`` keeps such views).
    """
    if out is None:
        out = np.empty(x.shape, x.dtype)
    np.multiply(_complex(x), rot, out=_complex(out))
    return out


def rope_unrotate(
    dy: np.ndarray, rot_back: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """RoPE backward: the inverse rotation R(-t) = R(t)^T, i.e. dx = dy times the
    conjugate e^(-i t f_k) (``rot_back``), pair by pair."""
    return rope_rotate(dy, rot_back, out)


# ---------------------------------------------------------------------------- masks


# A few masks are kept: the shapes a program repeats (its training batch, its forward).
# Generation without a KV cache runs every length once, and 64 masks of up to
# [512, 512 * A] held ~60 MB for good after it (measured in the bench's decode_uncached_256).
@lru_cache(maxsize=8)
def causal_mask_t(s: int, t: int, dtype: np.dtype, a: int = 1) -> np.ndarray:
    """Additive causal mask, transposed, with each query row repeated for the A query
    heads that share a kv head: [T, S*A]; key u is visible to query row i (at position
    t - s + i) when u <= t - s + i. Contiguous, so adding it to scores [.., T, S*A] is a
    plain broadcast over the leading axes (several times faster than a [T, S, 1] mask
    broadcast over a 5-D view)."""
    rows = np.arange(t - s, t)[None, :]  # query positions
    mask = np.where(np.arange(t)[:, None] <= rows, 0.0, -np.inf).astype(dtype)  # [T, S]
    mask = np.repeat(mask, a, axis=1)  # [T, S*A]: column i*A + j is query row i
    mask.flags.writeable = False  # shared between calls and threads
    return mask


# ---------------------------------------------------------------------------- KV cache


class KVLayer(NamedTuple):
    """One layer's slice of a KV cache, as attention_forward takes it."""

    k: np.ndarray  # [B, nKV, T_max, D]
    v: np.ndarray  # [B, nKV, T_max, D]


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
        self.layers = [KVLayer(k, v) for k, v in zip(self.k, self.v)]  # per layer (k, v)
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0  # positions filled so far


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

    x [N, H] (N = B*S); w_qkv = [Wq; Wk; Wv]^T [H, Q + 2KV]; w_o = Wo^T [Q, H]. With ``kv``,
    the new keys/values are written at positions start..start+S-1 and the queries attend
    over all T = start + S positions. -> (out [N, H], cache)
    """
    n = x.shape[0]
    s = n // batch
    d = 2 * rope.k.shape[1]
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
    rot = rope.q[positions, None, None]  # [S, 1, 1, D/2]
    rope_rotate(_grouped(q_in, batch, s, a, n_kv_heads), rot, out=_group_view(qg, s, a))
    # RoPE on k, into the cache (or a buffer); v as it is
    if kv is None:
        kg = buffer(ws, key + "k", (batch, n_kv_heads, s, d), dt)  # [B, nKV, T, D]
        k_out = kg.transpose(0, 2, 1, 3)
        vg = v_in.transpose(0, 2, 1, 3)  # [B, nKV, T, D] (a view of the projection)
    else:
        k_out = kv.k[:, :, positions].transpose(0, 2, 1, 3)  # [B, S, nKV, D] view of the cache
        np.copyto(kv.v[:, :, positions], v_in.transpose(0, 2, 1, 3))
        kg, vg = kv.k[:, :, :t], kv.v[:, :, :t]  # [B, nKV, T, D]
    rope_rotate(k_in, rope.k[positions, None], out=k_out)  # rotations [S, 1, D/2]
    # scores, transposed: S^T = k q^T   [B, nKV, T, S*A]
    tws = ws if kv is None else None  # T-dependent buffers: per call when T grows
    scores_t = buffer(tws, key + "p_t", (batch, n_kv_heads, t, s * a), dt)
    np.matmul(kg, qg.transpose(0, 1, 3, 2), out=scores_t)
    if s > 1:
        scores_t += causal_mask_t(s, t, dt, a)  # [T, S*A] over B, nKV
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
    *,
    overwrite: bool = False,
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
    do = linear_backward(dout, o, w_o, dw_o, ws, key + "o_proj.", overwrite=overwrite)  # [N, Q]
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
    rope_unrotate(
        _group_view(dqg, s, a),
        rope.q_back[positions, None, None],
        out=_grouped(dqkv[:, :, :n_heads], batch, s, a, n_kv),
    )
    rope_unrotate(
        dkg.transpose(0, 2, 1, 3),
        rope.k_back[positions, None],
        out=dqkv[:, :, n_heads : n_heads + n_kv],
    )
    np.copyto(dqkv[:, :, n_heads + n_kv :], dvg.transpose(0, 2, 1, 3))
    dqkv2 = dqkv.reshape(n, -1)  # [N, Q + 2KV]
    return linear_backward(dqkv2, x, w_qkv, dw_qkv, ws, key + "qkv.", overwrite=overwrite)


# ---------------------------------------------------------------------------- one position


class AttentionStep(NamedTuple):
    """The arrays ``attention_step`` writes for B rows, made once (``attention_step_buffers``)."""

    qkv: np.ndarray  # [B, Q + 2KV] the projection
    q_in: np.ndarray  # [B, A, nKV, D/2] its query heads, grouped, as complex pairs (a view)
    k_in: np.ndarray  # [B, nKV, D/2] its key heads, as complex pairs (a view)
    v_in: np.ndarray  # [B, nKV, D] its value heads (a view)
    qg: np.ndarray  # [B, nKV, A, D] rotated, 1/sqrt(D)-scaled queries, grouped by kv head
    q_out: np.ndarray  # qg seen as complex [B, A, nKV, D/2] (a view: where RoPE writes)
    og: np.ndarray  # [B, nKV, A, D] softmax(scores) v, grouped
    single: bool  # B = nKV = 1: the products are 2-D (qg, og seen as [A, D])
    o: np.ndarray  # [B, Q] heads concatenated (a view of og when nKV = 1)
    o_grouped: np.ndarray  # o seen as [B, A, nKV, D] (a view)
    out: np.ndarray  # [B, H]


def attention_step_buffers(
    batch: int, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, dtype: np.dtype
) -> AttentionStep:
    """Buffers of ``attention_step`` for ``batch`` rows."""
    a, d = n_heads // n_kv_heads, head_dim
    qkv = np.empty((batch, (n_heads + 2 * n_kv_heads) * d), dtype)
    qkv3 = qkv.reshape(batch, n_heads + 2 * n_kv_heads, d)  # [B, R, D]
    qg = np.empty((batch, n_kv_heads, a, d), dtype)
    og = np.empty((batch, n_kv_heads, a, d), dtype)
    o = og.reshape(batch, n_heads * d) if n_kv_heads == 1 else np.empty((batch, n_heads * d), dtype)
    return AttentionStep(
        qkv,
        _complex(qkv3[:, :n_heads].reshape(batch, a, n_kv_heads, d)),
        _complex(qkv3[:, n_heads : n_heads + n_kv_heads]),
        qkv3[:, n_heads + n_kv_heads :],
        qg,
        _complex(qg.transpose(0, 2, 1, 3)),
        og,
        batch * n_kv_heads == 1,
        o,
        o.reshape(batch, a, n_kv_heads, d),
        np.empty((batch, hidden), dtype),
    )


def attention_step(
    x: np.ndarray,
    w_qkv: np.ndarray,
    w_o: np.ndarray,
    rope: Rope,
    start: int,
    kv: KVLayer,
    b: AttentionStep,
) -> np.ndarray:
    """Attention of one new position per row (S = 1) at position ``start`` over the
    T = start + 1 cached ones: scores = q k^T / sqrt(D); out = softmax(scores) v; heads
    concatenated then Wo. No causal mask: the new position sees every cached key.

    x [B, H] normalized input; w_qkv [H, Q + 2KV]; w_o [Q, H]; the new key and value go
    into ``kv`` at ``start``. -> out [B, H] (``b.out``). Equal to ``attention_forward``
    with S = 1 and the same cache, to float rounding.
    """
    t = start + 1
    linear_forward(x, w_qkv, out=b.qkv)  # [B, Q + 2KV]
    rope_rotate(b.q_in, rope.q[start], out=b.q_out)  # RoPE on q (scaled by 1/sqrt(D))
    rope_rotate(b.k_in, rope.k[start], out=kv.k[:, :, start])  # RoPE on k, into the cache
    kv.v[:, :, start] = b.v_in
    if b.single:  # one row, one kv head: 2-D products (ndarray.dot: no ufunc dispatch)
        scores = b.qg[0, 0].dot(kv.k[0, 0, :t].T)  # scores = q k^T / sqrt(D)   [A, T]
        p = softmax(scores, -1, scores, may_be_masked=False)  # over the T keys
        p.dot(kv.v[0, 0, :t], b.og[0, 0])  # out = softmax(scores) v   [A, D]
    else:
        # scores = q k^T / sqrt(D) (the scale rides on q)   [B, nKV, A, T]
        scores = np.matmul(b.qg, kv.k[:, :, :t].transpose(0, 1, 3, 2))
        p = softmax(scores, -1, scores, may_be_masked=False)  # over the T keys
        np.matmul(p, kv.v[:, :, :t], out=b.og)  # out = softmax(scores) v   [B, nKV, A, D]
    if b.og.shape[1] > 1:  # nKV > 1: query head h = a*nKV + j back in order
        np.copyto(b.o_grouped, b.og.transpose(0, 2, 1, 3))
    return linear_forward(b.o, w_o, out=b.out)  # [B, H]
