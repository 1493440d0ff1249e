"""The router and the Mixture-of-Experts layer, forward and backward.

Shape legend: N tokens, H hidden, E experts, K top-k, F ffn, C = N*K (token, slot)
assignments.

Routing in this order: softmax over experts, keep the top-k, renormalize, gather each
expert's rows (sorted by expert, so each expert is one product per weight), run the
experts, scatter the weighted outputs back to their tokens. The backward mirrors it:
the combine's backward is a gather, the gather's backward is a scatter-add.

Assignments are numbered slot-major: assignment a = k*N + t is token t's k-th choice.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .layers import SwiGLUCache, swiglu_backward, swiglu_forward, weight_grad
from .tensor import softmax, softmax_backward
from .workspace import Workspace, buffer

# ---------------------------------------------------------------------------- router


class Routing(NamedTuple):
    probs: np.ndarray  # [N, E] router probabilities (a view of the [E, N] array computed)
    top_idx: np.ndarray  # [N, K] kept experts, most probable first
    kept_sum: np.ndarray  # [N, 1] S = sum of the kept probabilities
    weights: np.ndarray  # [N, K] w_k = p_k / S
    order: np.ndarray  # [C] assignments (a = k*N + t) sorted by expert
    counts: np.ndarray  # [E] assignments per expert


def router_forward(
    x: np.ndarray, w_router: np.ndarray, top_k: int, ws: Workspace | None = None, key: str = ""
) -> Routing:
    """Router: probs = softmax(x @ Wr^T) over experts; keep the top_k per token by
    probability; renormalize the kept probabilities to sum to 1.

    x [N, H]; w_router [E, H]. Ties go to the lower expert index (stable sort).
    Computed with experts along rows ([E, N]): the reductions over E then run across
    whole rows instead of along rows of length E.
    """
    n = x.shape[0]
    n_experts = w_router.shape[0]
    probs_t = buffer(ws, key + "probs_t", (n_experts, n), x.dtype)
    np.matmul(w_router, x.T, out=probs_t)  # router logits, transposed: Wr x^T   [E, N]
    softmax(probs_t, axis=0, out=probs_t, may_be_masked=False)  # probs^T   [E, N]
    top_t = np.argsort(-probs_t, axis=0, kind="stable")[:top_k]  # [K, N]
    if n == 1:  # probs_t [E, 1]: expert e's entry is flat index e (no index grid)
        weights_t = probs_t.take(top_t)  # kept p_k   [K, 1]
    else:
        weights_t = probs_t[top_t, np.arange(n)]  # kept p_k   [K, N]
    kept_sum = np.add.reduce(weights_t, axis=0, keepdims=True)  # S   [1, N]
    weights_t /= kept_sum  # renormalized top-k: w_k = p_k / S
    flat = top_t.reshape(-1)  # [C] expert of assignment a = k*N + t
    order = np.argsort(flat, kind="stable")  # [C] grouped by expert
    counts = np.bincount(flat, minlength=n_experts)  # [E]
    return Routing(probs_t.T, top_t.T, kept_sum.T, weights_t.T, order, counts)


def expert_fractions(routing: Routing) -> np.ndarray:
    """f_e = fraction of (token, slot) assignments going to expert e.   [E] float64."""
    return routing.counts / routing.order.size


def aux_loss(routing: Routing, alpha: float, fractions: np.ndarray | None = None) -> float:
    """Aux (load-balancing) loss: L_aux = alpha * N_experts * sum_e f_e * P_e,
    f_e = fraction of (token, slot) assignments going to expert e,
    P_e = mean router probability of expert e over tokens.

    ``fractions``: f_e of a larger batch this one is part of (gradient accumulation, data
    parallelism); default the batch's own.
    """
    n_experts = routing.probs.shape[1]
    f = expert_fractions(routing) if fractions is None else fractions  # [E]
    p_mean = routing.probs.mean(axis=0, dtype=np.float64)  # [E]
    return float(alpha * n_experts * np.dot(f, p_mean))


class RoutingStats(NamedTuple):
    """What one layer's router did on one batch, as sums (so batches add up)."""

    counts: np.ndarray  # [E] int64: (token, slot) assignments per expert
    prob_sum: np.ndarray  # [E] float64: sum over tokens of the router probability
    entropy_sum: float  # sum over tokens of the routing distribution's entropy (nats)
    tokens: int  # N


def routing_stats(routing: Routing) -> RoutingStats:
    """Counts, summed probabilities and summed entropy -sum_e p_e log p_e of a routing."""
    probs = routing.probs  # [N, E]
    p64 = probs.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p64 > 0, p64 * np.log(p64), 0.0)
    return RoutingStats(
        routing.counts.astype(np.int64),
        p64.sum(axis=0),
        float(-plogp.sum()),
        int(probs.shape[0]),
    )


def router_backward(
    dweights: np.ndarray,
    routing: Routing,
    x: np.ndarray,
    w_router: np.ndarray,
    dw_router: np.ndarray,
    alpha: float,
    fractions: np.ndarray | None = None,
    ws: Workspace | None = None,
    key: str = "",
    *,
    overwrite: bool = False,
) -> np.ndarray:
    """Router backward, through the renormalized top-k gate weights and the aux loss.

    Renormalized top-k: dp_k = (dw_k - sum_{j in K} w_j dw_j) / S for k in K.
    Aux loss (f_e constant): dp_te += alpha E f_e / N.
    Router: dz = softmax backward of the summed dp; dWr += dz^T x; dx = dz Wr.
    dweights [N, K] -> dx [N, H].
    """
    probs, top_idx, kept_sum, weights = routing[:4]
    n, n_experts = probs.shape
    dkept = dweights - np.add.reduce(weights * dweights, axis=1, keepdims=True)  # [N, K]
    dkept /= kept_sum
    # experts along rows, as in the forward: dprobs^T [E, N]
    dprobs_t = buffer(ws, key + "dprobs_t", (n_experts, n), x.dtype)
    if alpha:
        f = expert_fractions(routing) if fractions is None else fractions  # [E]
        dprobs_t[...] = (alpha * n_experts / n * f).astype(x.dtype)[:, None]
    else:
        dprobs_t.fill(0)  # 0 outside the kept experts
    kept = (top_idx.T, np.arange(n))  # the kept (expert, token) entries   [K, N] each
    dprobs_t[kept] += dkept.T
    dz_t = softmax_backward(dprobs_t, probs.T, axis=0, out=dprobs_t)  # [E, N]
    weight_grad(dz_t, x, dw_router, overwrite, ws, key + "dw")  # dWr += dz^T x   [E, H]
    dx = buffer(ws, key + "dx", x.shape, x.dtype)
    return np.matmul(dz_t.T, w_router, out=dx)  # [N, H]


# ---------------------------------------------------------------------------- MoE layer


class MoEWeights(NamedTuple):
    router: np.ndarray  # [E, H]
    gate_up: np.ndarray  # [E, H, 2F]  each expert's [Wg; Wu]^T
    down: np.ndarray  # [E, F, H]  each expert's Wd^T


class MoECache(NamedTuple):
    x: np.ndarray  # [N, H] normalized input
    routing: Routing
    tokens: np.ndarray  # [C] token of each sorted assignment
    gate: np.ndarray  # [C] w_k of each sorted assignment
    y: np.ndarray  # [C, H] expert outputs, sorted by expert
    experts: SwiGLUCache  # all experts' activations, rows grouped by expert


def moe_forward(
    x: np.ndarray, w: MoEWeights, top_k: int, ws: Workspace | None = None, key: str = ""
) -> tuple[np.ndarray, MoECache]:
    """MoE combine: out = sum over kept k of w_k * Expert_k(x).   x [N, H] -> [N, H]."""
    n, hidden = x.shape
    dt = x.dtype
    routing = router_forward(x, w.router, top_k, ws, key + "router.")
    c = n * top_k
    tokens = np.remainder(routing.order, n)  # [C] token of each sorted assignment
    xs = x.take(tokens, axis=0, out=buffer(ws, key + "xs", (c, hidden), dt))  # gather
    ys, experts = swiglu_forward(
        xs, w.gate_up, w.down, routing.counts.tolist(), ws, key + "experts."
    )  # [C, H]
    gate = routing.weights.T.reshape(-1).take(routing.order)  # [C] w_k, sorted
    weighted = np.multiply(ys, gate[:, None], out=buffer(ws, key + "yw", (c, hidden), dt))
    slots = buffer(ws, key + "slots", (c, hidden), dt)
    slots[routing.order] = weighted  # scatter back to (slot, token) order   [K*N, H]
    out = buffer(ws, key + "out", (n, hidden), dt)
    np.add.reduce(slots.reshape(top_k, n, hidden), axis=0, out=out)  # sum_k w_k y_k   [N, H]
    return out, MoECache(x, routing, tokens, gate, ys, experts)


def moe_backward(
    dout: np.ndarray,
    cache: MoECache,
    w: MoEWeights,
    dw: MoEWeights,
    alpha: float,
    fractions: np.ndarray | None = None,
    ws: Workspace | None = None,
    key: str = "",
    *,
    overwrite: bool = False,
) -> np.ndarray:
    """MoE backward: dy_tk = w_tk dout_t (into expert k's backward); dw_tk = dout_t . y_tk;
    the gather's backward is a scatter-add of the experts' input gradients.
    """
    x, routing, tokens, gate, ys, experts = cache
    n, hidden = x.shape
    top_k = routing.top_idx.shape[1]
    c = n * top_k
    dt = x.dtype
    dys = np.take(dout, tokens, axis=0, out=buffer(ws, key + "dys", (c, hidden), dt))  # dout_t
    dgate = np.vecdot(dys, ys)  # dw_tk = dout_t . y_tk   [C], sorted
    dys *= gate[:, None]  # dy_tk = w_tk dout_t
    dxs = swiglu_backward(
        dys,
        cache.experts,
        w.gate_up,
        w.down,
        dw.gate_up,
        dw.down,
        ws,
        key + "experts.",
        overwrite=overwrite,
    )
    slots = buffer(ws, key + "dslots", (c, hidden), dt)
    slots[routing.order] = dxs  # back to (slot, token) order
    dx = buffer(ws, key + "dx", (n, hidden), dt)
    np.add.reduce(slots.reshape(top_k, n, hidden), axis=0, out=dx)  # scatter-add over slots
    dweights_t = np.empty(c, dt)
    dweights_t[routing.order] = dgate
    dx += router_backward(
        dweights_t.reshape(top_k, n).T,
        routing,
        x,
        w.router,
        dw.router,
        alpha,
        fractions,
        ws,
        key + "router.",
        overwrite=overwrite,
    )
    return dx
