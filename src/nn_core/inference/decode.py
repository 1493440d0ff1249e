"""Single-token decoding against a KV cache: the fast inner step of ``generate``.

Shape legend: B batch rows, H hidden, nH query heads, nKV key/value heads,
A = nH / nKV query heads per kv head, D head dim, Q = nH*D, R = nH + 2 nKV
projected heads, t the new token's position, T = t + 1 key positions, E experts,
K top-k, F ffn, V vocab, C rows routed to one expert.

    decode_step(model, token_ids [B], cache) -> logits [B, V]

feeds ONE new token per row at position ``cache.length`` and appends its keys and
values to the model's ``KVCache`` (so ``model.forward_cached`` prefills the prompt
into the same cache). It computes what ``model.forward_cached(token_ids[:, None],
cache)[:, 0]`` computes -- the same SPEC.md formulas on the same parameter views --
equal to float rounding, in about a third of the NumPy calls. With one token per row
a step is a few hundred tiny calls, so the call count, not the arithmetic, sets
its speed. The choices below cut calls; none changes the result beyond rounding:

- RMSNorm is x * (gamma / sqrt(mean(x^2) + eps)): one product with x.
- RoPE is one multiply-add over the whole q|k|v row with the model's tables (the q
  rows carry the 1/sqrt(D) score scale, the v rows are cos 1 / sin 0), the pair
  swap a reversed view of the pairs instead of a permutation product.
- No causal mask: the new position sees every cached key.
- Router: the top-k of the raw logits z (softmax is monotonic), then a softmax over
  the kept k alone, w_k = exp(z_k) / sum_{j in K} exp(z_j) = p_k / sum_{j in K} p_j,
  which is the renormalized top-k without the softmax over all E experts. (Ties are
  broken by index on z here and on the rounded probabilities in the model; the two
  can disagree only when distinct logits round to one probability.)
- Experts: with few (row, slot) pairs (B*K <= 2E), each pair runs its expert as
  vector products; otherwise each chosen expert runs once on all its rows. (With
  OpenBLAS a [2..3, H] x [H, F] product costs three or four [H] x [H, F] ones, so an
  expert's matrix product pays off only from about 3 rows: measured on tiny.)
- 2-D products use ``ndarray.dot``, which skips the ufunc dispatch of ``@`` (~0.7 us
  a call); the batched attention products [B, nKV, ...] keep ``@``.

Token ids: ``decode_step`` validates them unless ``check_ids=False``. The decoding
loop in ``nn_core.inference.generate`` validates the prompt once and passes ids picked by a
sampler, which are in [0, V) by construction, with ``check_ids=False``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from ..errors import InputError
from ..model.attention import KVLayerCache, Rope
from ..model.config import Config
from ..model.moe import BlockWeights, MoEWeights
from ..model.transformer import KVCache, validate_token_ids

__all__ = ["decode_step", "step_weights"]

# ---------------------------------------------------------------------------- weights


class StepWeights(NamedTuple):
    """The model's parameters as views into its flat buffer, grouped per layer."""

    embed: np.ndarray  # [V, H]
    layers: list[BlockWeights]  # per layer; qkv [Q + 2KV, H] is the adjacent Wq|Wk|Wv
    final_norm: np.ndarray  # [H]
    lm_head: np.ndarray  # [V, H]


def step_weights(model: Any) -> StepWeights:
    """``model``'s parameter views (views, not copies: training shows through)."""
    p = model.store.params
    return StepWeights(
        p["embed.weight"], model.layer_weights, p["final_norm.weight"], p["lm_head.weight"]
    )


# ---------------------------------------------------------------------------- pieces


def rmsnorm_step(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm: y = x * 1/sqrt(mean(x^2) + eps) * gamma.   x [B, H], gamma [H] -> [B, H]."""
    ss = (x * x).sum(axis=-1, keepdims=True)  # sum(x^2)   [B, 1]
    return x * (gain / np.sqrt(ss * (1.0 / x.shape[-1]) + eps))


def rope_step(qkv: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE: pairs (x[2i], x[2i+1]) -> [x0 cos - x1 sin, x0 sin + x1 cos], all R heads at once.

    qkv [B, R*D]; cos, sin [R, D] = one position's rows of the model's Rope tables (signed
    sin; q rows scaled by 1/sqrt(D); v rows cos 1, sin 0, so v passes through unchanged).
    """
    batch = qkv.shape[0]
    pairs = qkv.reshape(batch, -1, 2)  # [B, R*D/2, 2]
    out = pairs[:, :, ::-1] * sin.reshape(-1, 2)  # (x1, x0) * (-sin, sin)
    out += pairs * cos.reshape(-1, 2)
    return out.reshape(batch, -1)  # [B, R*D]


def attention_step(
    a: np.ndarray,
    w_qkv: np.ndarray,
    w_o: np.ndarray,
    kv: KVLayerCache,
    t: int,
    cfg: Config,
    rope: Rope,
) -> np.ndarray:
    """Attention of one new position per row over the T = t + 1 cached ones.

    a [B, H] normalized input; w_qkv [Q + 2KV, H]; w_o [H, Q]; kv.k, kv.v
    [B, max_len, nKV, D] receive the new key and value at position t. -> [B, H].
    """
    batch = a.shape[0]
    n_heads, n_kv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q_end, k_end = n_heads * d, (n_heads + n_kv) * d
    qkv = rope_step(a.dot(w_qkv.T), rope.cos[t], rope.sin[t])  # [B, R*D] q scaled, k rotated
    kv.k[:, t] = qkv[:, q_end:k_end].reshape(batch, n_kv, d)
    kv.v[:, t] = qkv[:, k_end:].reshape(batch, n_kv, d)
    # query head h = a_i*nKV + j uses kv head j: group the A heads of each kv head
    q = qkv[:, :q_end].reshape(batch, n_heads // n_kv, n_kv, d).transpose(0, 2, 1, 3)
    k = kv.k[:, : t + 1].transpose(0, 2, 3, 1)  # k^T   [B, nKV, D, T]
    v = kv.v[:, : t + 1].transpose(0, 2, 1, 3)  # [B, nKV, T, D]
    scores = q @ k  # scores = q k^T / sqrt(D) (scale in q)   [B, nKV, A, T]
    # Softmax over keys; no causal mask: the new position sees all T cached keys
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores, out=scores)
    p /= p.sum(axis=-1, keepdims=True)
    o = p @ v  # out = softmax(scores) v   [B, nKV, A, D]
    return o.transpose(0, 2, 1, 3).reshape(batch, -1).dot(w_o.T)  # heads concatenated, Wo


def route_rows(z: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Router for B rows of logits z [B, E]: keep the top_k experts by probability;
    renormalize the kept probabilities to sum to 1.

    -> (experts [B, K] int, most probable first, ties to the lower index; gate weights
    [B, K]). Ranked on z (softmax is monotonic); renormalized top-k:
    w_k = p_k / sum_kept p_j = exp(z_k - z_max) / sum_kept exp(z_j - z_max).
    """
    neg_z = -z  # [B, E]
    top = np.argsort(neg_z, axis=-1, kind="stable")[:, :top_k]  # [B, K]
    neg_kept = np.sort(neg_z, axis=-1)[:, :top_k]  # -z of the kept experts, best first
    gates = np.exp(neg_kept[:, :1] - neg_kept)  # exp(z_k - z_max)
    gates /= gates.sum(axis=-1, keepdims=True)
    finite = np.isfinite(z).all(axis=-1)  # [B]
    if not finite.all():  # NaN/inf logits: the model's softmax over all experts is NaN
        gates[~finite] = np.nan
    return top, gates


def route_row(z: list[float], top_k: int) -> list[tuple[int, float]]:
    """``route_rows`` for one row of logits z [E] as Python floats: [(expert, w_k)] * K.

    For a handful of experts plain Python beats NumPy's per-call cost. ``sorted`` is
    stable, so ties go to the lower index, as in ``route_rows``.
    """
    kept = sorted(range(len(z)), key=z.__getitem__, reverse=True)[:top_k]
    if not math.isfinite(sum(z)):  # NaN/inf logits: the model's softmax is NaN
        return [(e, math.nan) for e in kept]
    z_max = z[kept[0]]
    p = [math.exp(z[e] - z_max) for e in kept]  # exp(z_k - z_max)
    total = sum(p)
    return [(e, pe / total) for e, pe in zip(kept, p)]  # w_k = p_k / sum_kept p_j


def expert_work(
    z: np.ndarray, top_k: int
) -> Iterator[tuple[int, slice | np.ndarray, float | np.ndarray]]:
    """(expert, rows, gate weights) units of MoE work for router logits z [B, E].

    Few (row, slot) pairs (B*K <= 2E): one unit per pair, ``rows`` a one-row slice and
    the weight a float, so the expert runs as vector products. Otherwise one unit per
    chosen expert, ``rows`` the [C] rows routed to it (each row picks an expert at most
    once) and the weights [C, 1].
    """
    batch, n_experts = z.shape
    if batch * top_k <= 2 * n_experts:
        for b, row in enumerate(z.tolist()):
            for e, g in route_row(row, top_k):
                yield e, slice(b, b + 1), g
        return
    top, gates = route_rows(z, top_k)  # [B, K], [B, K]
    for e in np.unique(top).tolist():
        rows, slots = np.nonzero(top == e)  # [C], [C]
        yield e, rows, gates[rows, slots][:, None]


def swiglu_step(
    x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray
) -> np.ndarray:
    """SwiGLU expert: out = Down(SiLU(Gate(x)) * Up(x)).

    x [C, H]; w_gate, w_up [F, H]; w_down [H, F] -> [C, H]. SiLU(G) * U computed as
    G U / (1 + exp(-G)) (exp may overflow to inf for very negative G: the result is -0).
    """
    g = x.dot(w_gate.T)  # G = x Wg^T   [C, F]
    h = g * x.dot(w_up.T)  # G . U, U = x Wu^T
    h /= 1 + np.exp(-g)  # SiLU: silu(x) = x / (1 + exp(-x))
    return h.dot(w_down.T)  # [C, H]


def moe_step(m: np.ndarray, w: MoEWeights, top_k: int) -> np.ndarray:
    """MoE combine: out = sum over kept k of w_k * Expert_k(x).   m [B, H] -> [B, H]."""
    z = m.dot(w.router.T)  # router logits   [B, E]
    out = np.zeros_like(m)  # [B, H]
    for e, rows, g in expert_work(z, top_k):
        out[rows] += g * swiglu_step(m[rows], w.gate[e], w.up[e], w.down[e])
    return out


def block_step(
    x: np.ndarray, w: BlockWeights, kv: KVLayerCache, t: int, cfg: Config, rope: Rope
) -> np.ndarray:
    """Block: h = x + Attention(RMSNorm_attn(x)); out = h + MoE(RMSNorm_ffn(h)).

    x [B, H] (updated in place and returned).
    """
    x += attention_step(rmsnorm_step(x, w.attn_norm, cfg.rms_eps), w.qkv, w.o, kv, t, cfg, rope)
    x += moe_step(rmsnorm_step(x, w.ffn_norm, cfg.rms_eps), w.moe, cfg.top_k_experts)
    return x


# ---------------------------------------------------------------------------- the step


def decode_step(
    model: Any, token_ids: Any, cache: KVCache, *, check_ids: bool = True
) -> np.ndarray:
    """Logits [B, V] (model dtype) of one new token per row, appended to ``cache``.

    token_ids [B] integers, the tokens at position ``cache.length`` of each row;
    ``cache`` a ``model.new_kv_cache(B, ...)``, typically prefilled by
    ``model.forward_cached``. Equals ``model.forward_cached(token_ids[:, None],
    cache)[:, 0]`` to float rounding. ``check_ids=False`` skips the id range check,
    for ids already known to be in [0, vocab_size) (a sampler's picks).
    """
    cfg = model.config
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or ids.shape[0] != cache.batch_size:
        raise InputError(
            f"token_ids must have shape [batch] = ({cache.batch_size},) (one token per "
            f"row of the KV cache), got shape {ids.shape}"
        )
    if check_ids:
        ids = validate_token_ids(ids[:, None], cfg.vocab_size, cfg.max_seq_len)[:, 0]
    t = cache.length  # the new tokens' position
    if t >= cache.max_len:
        raise InputError(f"KV cache holds {t} of {cache.max_len} positions; 1 more does not fit")
    w = step_weights(model)
    x = w.embed[ids]  # Embedding: out = W[token_id, :]   [B, H] (a copy)
    with np.errstate(over="ignore"):  # SiLU's exp(-G) may overflow: G / inf = -0, exact
        for layer, kv in zip(w.layers, cache.layers):
            x = block_step(x, layer, kv, t, cfg, model.rope)
    cache.length = t + 1
    y = rmsnorm_step(x, w.final_norm, cfg.rms_eps)  # final RMSNorm
    return y.dot(w.lm_head.T)  # LM head   [B, V]
