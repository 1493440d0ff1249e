"""Router, Mixture-of-Experts layer and the transformer block.

Shape legend: N tokens, H hidden, E experts, K top-k, F ffn, C rows of one expert.

Routing in SPEC.md order: softmax over experts, keep the top-k, renormalize,
gather each expert's rows (sorted by expert, so each expert is one batched
product), run the experts, scatter the weighted outputs back to their tokens.
The backward mirrors it: the combine's backward is a gather, the gather's
backward is a scatter-add.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .attention import AttentionCache, KVLayerCache, Rope, attention_backward, attention_forward
from .config import Config
from .layers import (
    RMSNormCache,
    SwiGLUCache,
    rmsnorm_backward,
    rmsnorm_forward,
    swiglu_backward,
    swiglu_forward,
)
from .tensor import softmax, softmax_backward

# ---------------------------------------------------------------------------- router


class Routing(NamedTuple):
    probs: np.ndarray  # [N, E] router probabilities
    top_idx: np.ndarray  # [N, K] kept experts, most probable first
    kept_sum: np.ndarray  # [N, 1] S = sum of the kept probabilities
    weights: np.ndarray  # [N, K] w_k = p_k / S
    order: np.ndarray  # [N*K] (token, slot) assignments sorted by expert
    counts: np.ndarray  # [E] assignments per expert


def router_forward(x: np.ndarray, w_router: np.ndarray, top_k: int) -> Routing:
    """Router: probs = softmax(x @ Wr^T) over experts; keep the top_k per token by
    probability; renormalize the kept probabilities to sum to 1.

    x [N, H]; w_router [E, H]. Ties go to the lower expert index (stable sort).
    Computed with experts along rows ([E, N]): the reductions over E then run
    across whole rows instead of along rows of length E.
    """
    n = x.shape[0]
    probs_t = softmax(w_router @ x.T, axis=0)  # [E, N]
    top_idx = np.argsort(-probs_t, axis=0, kind="stable")[:top_k].T  # [N, K]
    probs = probs_t.T  # [N, E]
    kept = probs[np.arange(n)[:, None], top_idx]  # [N, K]
    kept_sum = kept.sum(axis=1, keepdims=True)  # S   [N, 1]
    weights = kept / kept_sum  # renormalized top-k: w_k = p_k / S
    flat_idx = top_idx.reshape(-1)  # [N*K] expert of each (token, slot)
    order = np.argsort(flat_idx, kind="stable")  # [N*K] grouped by expert
    counts = np.bincount(flat_idx, minlength=w_router.shape[0])  # [E]
    return Routing(probs, top_idx, kept_sum, weights, order, counts)


def aux_loss(routing: Routing, alpha: float) -> float:
    """Aux (load-balancing) loss: L_aux = alpha * N_experts * sum_e f_e * P_e,
    f_e = fraction of (token, slot) assignments going to expert e,
    P_e = mean router probability of expert e over tokens.
    """
    n_experts = routing.probs.shape[1]
    f = routing.counts / routing.order.size  # [E]
    p_mean = routing.probs.mean(axis=0, dtype=np.float64)  # [E]
    return float(alpha * n_experts * np.dot(f, p_mean))


def router_backward(
    dweights: np.ndarray,
    routing: Routing,
    x: np.ndarray,
    w_router: np.ndarray,
    dw_router: np.ndarray,
    alpha: float,
) -> np.ndarray:
    """Router backward, through the renormalized top-k gate weights and the aux loss.

    Renormalized top-k: dp_k = (dw_k - sum_{j in K} w_j dw_j) / S for k in K.
    Aux loss (f_e constant): dp_te += alpha E f_e / N.
    Router: dz = softmax backward of the summed dp; dWr += dz^T x; dx = dz Wr.
    """
    probs, top_idx, kept_sum, weights = routing[:4]
    n, n_experts = probs.shape
    dkept = dweights - np.sum(weights * dweights, axis=1, keepdims=True)  # [N, K]
    dkept /= kept_sum
    # experts along rows, as in the forward: dprobs^T [E, N]
    dprobs_t = np.zeros((n_experts, n), dtype=probs.dtype)  # 0 outside the kept experts
    dprobs_t[top_idx, np.arange(n)[:, None]] = dkept
    if alpha:
        f = routing.counts / routing.order.size  # [E]
        dprobs_t += (alpha * n_experts / n * f).astype(probs.dtype)[:, None]
    dz_t = softmax_backward(dprobs_t, probs.T, axis=0)  # [E, N]
    dw_router += dz_t @ x
    return dz_t.T @ w_router  # [N, H]


# ---------------------------------------------------------------------------- MoE layer


class MoEWeights(NamedTuple):
    router: np.ndarray  # [E, H]
    gate: np.ndarray  # [E, F, H]
    up: np.ndarray  # [E, F, H]
    down: np.ndarray  # [E, H, F]


class MoECache(NamedTuple):
    x: np.ndarray  # [N, H] normalized input
    routing: Routing
    y: np.ndarray  # [N, K, H] expert outputs per (token, slot)
    experts: SwiGLUCache  # all experts' activations, rows grouped by expert


def moe_forward(x: np.ndarray, w: MoEWeights, top_k: int) -> tuple[np.ndarray, MoECache]:
    """MoE combine: out = sum over kept k of w_k * Expert_k(x).   x [N, H] -> [N, H]."""
    n, hidden = x.shape
    routing = router_forward(x, w.router, top_k)
    xs = x[routing.order // top_k]  # gather: [N*K, H] rows grouped by expert
    counts = routing.counts.tolist()
    ys, experts = swiglu_forward(xs, w.gate, w.up, w.down, counts)  # [N*K, H]
    y = np.empty_like(ys)
    y[routing.order] = ys  # scatter back to (token, slot) order
    y = y.reshape(n, top_k, hidden)  # [N, K, H]
    out = np.matmul(routing.weights[:, None, :], y)[:, 0]  # sum_k w_k y_k   [N, H]
    return out, MoECache(x, routing, y, experts)


def moe_backward(
    dout: np.ndarray, cache: MoECache, w: MoEWeights, dw: MoEWeights, alpha: float
) -> np.ndarray:
    """MoE backward: dy_tk = w_tk dout_t (into expert k's backward); dw_tk = dout_t . y_tk;
    the gather's backward is a scatter-add of the experts' input gradients.
    """
    x, routing, y, experts = cache
    n, hidden = x.shape
    top_k = routing.top_idx.shape[1]
    dweights = np.matmul(y, dout[:, :, None])[:, :, 0]  # dw_tk = dout_t . y_tk   [N, K]
    dy = routing.weights[:, :, None] * dout[:, None, :]  # dy_tk = w_tk dout_t   [N, K, H]
    dys = dy.reshape(n * top_k, hidden)[routing.order]  # gather into sorted order
    dxs = swiglu_backward(dys, experts, w.gate, w.up, w.down, dw.gate, dw.up, dw.down)
    dx_slots = np.empty_like(dxs)
    dx_slots[routing.order] = dxs  # back to (token, slot) order
    dx = dx_slots.reshape(n, top_k, hidden).sum(axis=1)  # scatter-add over slots   [N, H]
    dx += router_backward(dweights, routing, x, w.router, dw.router, alpha)
    return dx


# ---------------------------------------------------------------------------- block


class BlockWeights(NamedTuple):
    attn_norm: np.ndarray  # [H]
    qkv: np.ndarray  # [Q + 2KV, H]  Wq, Wk, Wv stacked (adjacent in the flat buffer)
    o: np.ndarray  # [H, Q]
    ffn_norm: np.ndarray  # [H]
    moe: MoEWeights


class BlockCache(NamedTuple):
    n1: RMSNormCache
    attn: AttentionCache
    n2: RMSNormCache
    moe: MoECache


def block_forward(
    x: np.ndarray,
    batch: int,
    w: BlockWeights,
    cfg: Config,
    rope: Rope,
    start: int = 0,
    kv: KVLayerCache | None = None,
) -> tuple[np.ndarray, BlockCache]:
    """Block: h = x + Attention(RMSNorm_attn(x)); out = h + MoE(RMSNorm_ffn(h)).

    x [N, H] -> (out [N, H], cache); the layer's routing (for the aux loss) is cache.moe.routing.
    """
    a, n1 = rmsnorm_forward(x, w.attn_norm, cfg.rms_eps)
    attn_out, attn = attention_forward(
        a, batch, w.qkv, w.o, cfg.n_heads, cfg.n_kv_heads, rope, start, kv
    )
    h = x + attn_out
    m, n2 = rmsnorm_forward(h, w.ffn_norm, cfg.rms_eps)
    moe_out, moe = moe_forward(m, w.moe, cfg.top_k_experts)
    out = h + moe_out  # not in place: the ffn norm's cache holds h
    return out, BlockCache(n1, attn, n2, moe)


def block_backward(
    dout: np.ndarray,
    cache: BlockCache,
    w: BlockWeights,
    dw: BlockWeights,
    cfg: Config,
    rope: Rope,
    alpha: float,
) -> np.ndarray:
    """Block backward, each sublayer's backward before its norm's:
    dh = dout + n2_backward(M_backward(dout)); dx = dh + n1_backward(A_backward(dh)).
    """
    dm = moe_backward(dout, cache.moe, w.moe, dw.moe, alpha)
    dh = dout + rmsnorm_backward(dm, cache.n2, w.ffn_norm, dw.ffn_norm)
    da = attention_backward(
        dh, cache.attn, w.qkv, w.o, dw.qkv, dw.o, cfg.n_heads, cfg.n_kv_heads, rope
    )
    return dh + rmsnorm_backward(da, cache.n1, w.attn_norm, dw.attn_norm)
