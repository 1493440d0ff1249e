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

import math
from typing import NamedTuple

import numpy as np

from .layers import (
    FusedBackward,
    FusedExperts,
    SwiGLUCache,
    expert_bounds,
    matmul_into,
    padded_rows,
    swiglu_backward,
    swiglu_dout_buffer,
    swiglu_forward,
    swiglu_rows,
    weight_grad,
)
from .tensor import sigmoid, softmax, softmax_backward
from .workspace import Workspace, buffer

# ---------------------------------------------------------------------------- router


class Routing(NamedTuple):
    probs: np.ndarray  # [N, E] router probabilities (a view of the [E, N] array computed)
    top_idx: np.ndarray  # [N, K] kept experts, most probable first
    kept_sum: np.ndarray  # [N, 1] S = sum of the kept probabilities
    weights: np.ndarray  # [N, K] w_k = p_k / S
    order: np.ndarray  # [C] assignments (a = k*N + t) sorted by expert
    counts: np.ndarray  # [E] assignments per expert


# N*K up to this: router_forward picks the top-k and groups by expert in plain Python
# (a few microseconds on lists of a handful of floats) instead of two argsorts, an index
# grid and a bincount. Decoding one token per row stays under it up to batch 8 at K = 2.
FEW_ASSIGNMENTS = 16


def router_probs(x: np.ndarray, w_router: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Router probabilities, experts along rows: probs^T = softmax over E of Wr x^T.

    x [N, H]; w_router [E, H]; out [E, N] (C-contiguous; returned). With experts along
    rows, the softmax's reductions over E run across whole rows.
    """
    matmul_into(w_router, x.T, out)  # router logits, transposed: Wr x^T   [E, N]
    flat = out[:, 0] if out.shape[1] == 1 else out  # one token: a 1-D softmax
    softmax(flat, 0, flat, may_be_masked=False)  # probs^T   [E, N]
    return out


def renormalize_top_k(kept_t: np.ndarray) -> np.ndarray:
    """Renormalized top-k, in place: w_k = p_k / S, S = sum of the kept p_k.

    kept_t [K, N] kept probabilities -> S [1, N] (kept_t now holds w_k)."""
    kept_sum = np.add.reduce(kept_t, 0, None, None, keepdims=True)  # S   [1, N]
    kept_t /= kept_sum
    return kept_sum


def top_k_few(probs_t: np.ndarray, top_k: int) -> tuple[list[int], list[int], list[int]] | None:
    """Top-k and grouping by expert for few tokens, in plain Python.

    probs_t [E, N] -> (kept [K*N]: flat index e*N + t into probs_t of assignment
    a = k*N + t (token t's k-th choice, most probable first, ties to the lower expert
    index); order [C]: the assignments sorted by expert (stable); counts [E]), exactly
    what the argsorts of ``router_forward`` give. None if a probability is NaN (a
    Python sort does not order NaN).
    """
    n_experts, n = probs_t.shape
    by_prob = range(n_experts)
    if n == 1:  # one token (decoding): kept = its experts, order = them by expert index
        p = probs_t[:, 0].tolist()
        if math.isnan(sum(p)):
            return None
        top = sorted(by_prob, key=p.__getitem__, reverse=True)[:top_k]  # stable, as below
        counts = [0] * n_experts
        for e in top:
            counts[e] += 1
        return top, sorted(range(top_k), key=top.__getitem__), counts
    cols = probs_t.T.tolist()  # N lists of E probabilities
    kept = [0] * (top_k * n)
    experts = [0] * (top_k * n)  # expert of assignment a
    for t, p in enumerate(cols):
        if math.isnan(sum(p)):
            return None
        # sorted is stable, also with reverse=True: equal probabilities keep index order
        for k, e in enumerate(sorted(by_prob, key=p.__getitem__, reverse=True)[:top_k]):
            kept[k * n + t] = e * n + t
            experts[k * n + t] = e
    order = sorted(range(top_k * n), key=experts.__getitem__)  # stable: a ascending per expert
    counts = [0] * n_experts
    for e in experts:
        counts[e] += 1
    return kept, order, counts


def router_forward(
    x: np.ndarray, w_router: np.ndarray, top_k: int, ws: Workspace | None = None, key: str = ""
) -> Routing:
    """Router: probs = softmax(x @ Wr^T) over experts; keep the top_k per token by
    probability; renormalize the kept probabilities to sum to 1.

    x [N, H]; w_router [E, H]. Ties go to the lower expert index (stable sort).
    Computed with experts along rows ([E, N]): the reductions over E then run across
    whole rows instead of along rows of length E. With N*K <= FEW_ASSIGNMENTS the top-k
    and the grouping are done in Python (``top_k_few``), with the same result.
    """
    n = x.shape[0]
    n_experts = w_router.shape[0]
    probs_t = router_probs(x, w_router, buffer(ws, key + "probs_t", (n_experts, n), x.dtype))
    few = top_k_few(probs_t, top_k) if n * top_k <= FEW_ASSIGNMENTS else None
    if few is not None:
        kept, order_list, counts_list = few
        idx = np.array(kept, dtype=np.intp)  # [C] flat indices e*N + t
        top_t = np.floor_divide(idx, n).reshape(top_k, n)  # [K, N] experts
        weights_t = probs_t.take(idx).reshape(top_k, n)  # kept p_k   [K, N]
        order = np.array(order_list, dtype=np.intp)  # [C] grouped by expert
        counts = np.array(counts_list, dtype=np.int64)  # [E]
    else:
        top_t = np.argsort(-probs_t, axis=0, kind="stable")[:top_k]  # [K, N]
        weights_t = probs_t[top_t, np.arange(n)]  # kept p_k   [K, N]
        flat = top_t.reshape(-1)  # [C] expert of assignment a = k*N + t
        order = np.argsort(flat, kind="stable")  # [C] grouped by expert
        counts = np.bincount(flat, minlength=n_experts)  # [E]
    kept_sum = renormalize_top_k(weights_t)  # renormalized top-k: w_k = p_k / S
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
    # P_e: the sum over tokens / N, as np.mean computes it (without its Python layers)
    p_mean = np.add.reduce(routing.probs, 0, np.float64) / routing.probs.shape[0]  # [E]
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
    fused: FusedBackward | None = None,
) -> np.ndarray:
    """Router backward, through the renormalized top-k gate weights and the aux loss.

    Renormalized top-k: dp_k = (dw_k - sum_{j in K} w_j dw_j) / S for k in K.
    Aux loss (f_e constant): dp_te += alpha E f_e / N.
    Router: dz = softmax backward of the summed dp; dWr += dz^T x; dx = dz Wr.
    dweights [N, K] -> dx [N, H]. Computed with experts along rows, as the forward.
    ``fused``: the lines from dweights to dz by its compiled ``router_grad`` (one pass).
    """
    probs, top_idx, kept_sum, weights = routing[:4]
    n, n_experts = probs.shape
    dz_t = buffer(ws, key + "dprobs_t", (n_experts, n), x.dtype)  # dprobs^T, then dz^T [E, N]
    aux = None  # Aux loss: dp_te += alpha E f_e / N (the float64 value cast to the dtype once)
    if alpha:
        f = expert_fractions(routing) if fractions is None else fractions  # [E]
        aux = (alpha * n_experts / n * f).astype(x.dtype)
    if fused is not None:  # the lines below, in one pass
        aux = np.zeros(n_experts, x.dtype) if aux is None else aux
        fused.router_grad(probs.T, top_idx.T, kept_sum.T, weights.T, dweights.T, aux, dz_t)
    else:
        dweights_t, weights_t = dweights.T, weights.T  # [K, N]
        dkept_t = weights_t * dweights_t  # w_j dw_j   [K, N]
        # dp_k = (dw_k - sum_j w_j dw_j) / S
        np.subtract(dweights_t, np.add.reduce(dkept_t, 0, None, None, keepdims=True), out=dkept_t)
        dkept_t /= kept_sum.T
        if aux is None:
            dz_t.fill(0)  # 0 outside the kept experts
        else:
            np.copyto(dz_t, aux[:, None])
        # the kept (expert, token) entries, as flat indices e*N + t   [K, N]; distinct per token
        kept = top_idx.T * n
        kept += np.arange(n)
        flat = dz_t.reshape(-1)
        flat[kept] += dkept_t
        softmax_backward(dz_t, probs.T, axis=0, out=dz_t)  # dz^T   [E, N]
    weight_grad(dz_t, x, dw_router, overwrite, ws, key + "dw")  # dWr += dz^T x   [E, H]
    return matmul_into(dz_t.T, w_router, buffer(ws, key + "dx", x.shape, x.dtype))  # [N, H]


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
    x: np.ndarray,
    w: MoEWeights,
    top_k: int,
    ws: Workspace | None = None,
    key: str = "",
    fused: FusedBackward | None = None,
) -> tuple[np.ndarray, MoECache]:
    """MoE combine: out = sum over kept k of w_k * Expert_k(x).   x [N, H] -> [N, H].

    ``fused`` with ``experts``: the lines after the router by its compiled arrangement
    (``experts_forward``), equal to these to rounding."""
    n, hidden = x.shape
    dt = x.dtype
    if fused is not None and fused.experts is not None:
        return experts_forward(x, w, top_k, fused.experts, ws, key)
    routing = router_forward(x, w.router, top_k, ws, key + "router.")
    c = n * top_k
    tokens = np.remainder(routing.order, n)  # [C] token of each sorted assignment
    # gather, into a buffer with ROW_BLOCK - 1 zero rows past the C rows: the experts'
    # products run on row windows padded to multiples of ROW_BLOCK (swiglu_rows)
    xs_p = padded_rows(ws, key + "xs", c, hidden, dt)  # [C + pad, H]
    x.take(tokens, axis=0, out=xs_p[:c])  # gather
    ys, experts = swiglu_forward(
        xs_p, w.gate_up, w.down, routing.counts.tolist(), ws, key + "experts."
    )  # [C, H]
    gate = routing.weights.T.reshape(-1).take(routing.order)  # [C] w_k, sorted
    weighted = np.multiply(ys, gate[:, None], out=buffer(ws, key + "yw", (c, hidden), dt))
    slots = buffer(ws, key + "slots", (c, hidden), dt)
    slots[routing.order] = weighted  # scatter back to (slot, token) order   [K*N, H]
    out = buffer(ws, key + "out", (n, hidden), dt)
    np.add.reduce(slots.reshape(top_k, n, hidden), axis=0, out=out)  # sum_k w_k y_k   [N, H]
    return out, MoECache(x, routing, tokens, gate, ys, experts)


def experts_forward(
    x: np.ndarray,
    w: MoEWeights,
    top_k: int,
    k: FusedExperts,
    ws: Workspace | None = None,
    key: str = "",
) -> tuple[np.ndarray, MoECache]:
    """``moe_forward`` by the compiled ``FusedExperts``: the router's probabilities
    (``router_probs``, NumPy), then its top-k, renormalization and grouping, the gather
    and G|U = x [Wg; Wu]^T (``k.gate_up``), sigma(G) by ``tensor.sigmoid`` (NumPy's
    vectorized exp), then h = s(G) . U, Down(h) = h Wd^T and out = sum_k w_k y_k
    (``k.down``). The same routing record, buffers and cache as the NumPy lines (either
    backward takes it). x [N, H] -> out [N, H]."""
    n, hidden = x.shape
    dt = x.dtype
    n_experts = w.router.shape[0]
    c = n * top_k
    f = w.down.shape[1]
    probs_t = router_probs(x, w.router, buffer(ws, key + "router.probs_t", (n_experts, n), dt))
    # the routing record is kept past the next step (Trainer.last_routing): fresh arrays
    top_t, order = np.empty((top_k, n), np.intp), np.empty(c, np.intp)  # [K, N], [C]
    weights_t, kept_sum = np.empty((top_k, n), dt), np.empty((1, n), dt)  # [K, N], [1, N]
    counts = np.empty(n_experts, np.int64)  # [E]
    ekey = key + "experts."
    xs_p = padded_rows(ws, key + "xs", c, hidden, dt)  # [C + pad, H]
    gu = buffer(ws, ekey + "gu", xs_p.shape[:1] + (2 * f,), dt)  # [C + pad, 2F]
    tokens = buffer(ws, key + "tokens", (c,), np.dtype(np.intp))  # [C]
    gate = buffer(ws, key + "gate", (c,), dt)  # [C]
    k.gate_up(
        x, probs_t, top_t, weights_t, kept_sum, order, counts, w.gate_up, xs_p, gu, tokens, gate
    )
    routing = Routing(probs_t.T, top_t.T, kept_sum.T, weights_t.T, order, counts)
    sig = sigmoid(gu[:c, :f], out=buffer(ws, ekey + "sig", (c, f), dt))  # sigma(G)   [C, F]
    h = padded_rows(ws, ekey + "h", c, f, dt)  # [C + pad, F]
    ys = buffer(ws, ekey + "out", xs_p.shape, dt)  # [C + pad, H]
    out = buffer(ws, key + "out", (n, hidden), dt)
    k.down(gu, sig, routing.order, gate, w.down, counts, h, ys, out)
    experts = SwiGLUCache(xs_p[:c], expert_bounds(counts.tolist()), gu[:c], sig, h[:c])
    return out, MoECache(x, routing, tokens, gate, ys[:c], experts)


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
    fused: FusedBackward | None = None,
) -> np.ndarray:
    """MoE backward: dy_tk = w_tk dout_t (into expert k's backward); dw_tk = dout_t . y_tk;
    the gather's backward is a scatter-add of the experts' input gradients.
    ``fused``: compiled element-wise lines for the experts (``layers.FusedBackward``);
    with ``experts``, the lines before the router by ``experts_backward`` and the
    scatter-add by ``experts.combine_grad`` (equal to these to rounding).
    """
    x, routing, tokens, gate, ys, experts = cache
    n, hidden = x.shape
    top_k = routing.top_idx.shape[1]
    c = n * top_k
    dt = x.dtype
    order = routing.order
    ekey = key + "experts."
    if fused is not None and fused.experts is not None:
        dxs, dweights_t = experts_backward(dout, cache, w, dw, fused.experts, ws, key, overwrite)
        dx = router_backward(
            dweights_t.T,
            routing,
            x,
            w.router,
            dw.router,
            alpha,
            fractions,
            ws,
            key + "router.",
            overwrite=overwrite,
            fused=fused,
        )
        fused.experts.combine_grad(dx, dxs, order)  # the scatter-add over slots
        return dx
    # dout_t of each sorted assignment, gathered straight into the experts' input buffer
    dys_p = swiglu_dout_buffer(c, hidden, dt, ws, ekey)  # [C + pad, H]
    dys = dout.take(tokens, axis=0, out=dys_p[:c])
    dgate = np.vecdot(dys, ys)  # dw_tk = dout_t . y_tk   [C], sorted
    dys *= gate[:, None]  # dy_tk = w_tk dout_t
    dxs = swiglu_backward(
        dys,
        experts,
        w.gate_up,
        w.down,
        dw.gate_up,
        dw.down,
        ws,
        ekey,
        overwrite=overwrite,
        fused=fused,
        dout_padded=dys_p,  # dys is its first C rows
    )
    slots = buffer(ws, key + "dslots", (c, hidden), dt)
    slots[order] = dxs  # back to (slot, token) order
    dweights_t = np.empty(c, dt)
    dweights_t[order] = dgate
    dx = router_backward(
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
        fused=fused,
    )
    for k in range(top_k):  # the scatter-add over slots
        dx += slots[k * n : (k + 1) * n]
    return dx


def experts_backward(
    dout: np.ndarray,
    cache: MoECache,
    w: MoEWeights,
    dw: MoEWeights,
    k: FusedExperts,
    ws: Workspace | None = None,
    key: str = "",
    overwrite: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``moe_backward``'s lines before the router by the compiled ``k.grad``: gather
    dout_tk = dout_t, dw_tk = dout_t . y_tk, dy_tk = w_tk dout_t, and ``swiglu_backward``
    (dh = dy Wd; dWd (+)= h^T dy; dG, dU; [dWg dWu] (+)= x^T [dG dU]; dx = [dG dU] [Wg; Wu]).
    Returns (dx_tk [C, H] sorted by expert, dw_k [K, N] by slot)."""
    x, routing, tokens, gate, ys, experts = cache
    n, hidden = x.shape
    c = tokens.size
    f = experts.sig.shape[1]
    dt = x.dtype
    ekey = key + "experts."
    dys_p = swiglu_dout_buffer(c, hidden, dt, ws, ekey)  # [C + pad, H]
    dh = buffer(ws, ekey + "dh", (dys_p.shape[0], f), dt)  # [C + pad, F]
    dgu_p = padded_rows(ws, ekey + "dgu", c, 2 * f, dt)  # [C + pad, 2F]
    dxs = buffer(ws, ekey + "dx", dys_p.shape, dt)  # [C + pad, H]
    dweights_t = buffer(ws, key + "dweights_t", (c // n, n), dt)  # [K, N]
    k.grad(
        dout,
        tokens,
        gate,
        routing.order,
        ys,
        experts.x,
        experts.gu,
        experts.sig,
        experts.h,
        w.gate_up,
        w.down,
        routing.counts,
        dw.gate_up,
        dw.down,
        overwrite,
        dys_p,
        dh,
        dgu_p,
        dxs,
        dweights_t,
    )
    return dxs[:c], dweights_t


# ---------------------------------------------------------------------------- few tokens


class MoEStep(NamedTuple):
    """The arrays ``moe_step`` writes for N tokens, made once (``moe_step_buffers``)."""

    probs_t: np.ndarray  # [E, N] router probabilities, transposed
    weights_t: np.ndarray  # [K, N] kept p_k, then w_k
    weights_flat: np.ndarray  # [K*N] the same (a view)
    gate: np.ndarray  # [C] w_k of each assignment sorted by expert
    gate_t: np.ndarray  # gate seen as [C, 1] (one token: its K kept p_k, renormalized)
    gate_row: np.ndarray  # gate seen as [1, C]
    xs: np.ndarray  # [C, H] the gathered rows, grouped by expert
    gu: np.ndarray  # [C, 2F]
    sig: np.ndarray  # [C, F]
    h: np.ndarray  # [C, F]
    ys: np.ndarray  # [C, H] expert outputs
    slots: np.ndarray  # [K*N, H] weighted outputs in (slot, token) order
    out: np.ndarray  # [N, H]


def moe_step_buffers(
    n: int, hidden: int, n_experts: int, top_k: int, ffn: int, dtype: np.dtype
) -> MoEStep:
    """Buffers of ``moe_step`` for ``n`` tokens."""
    c = n * top_k
    weights_t = np.empty((top_k, n), dtype)
    gate = np.empty(c, dtype)
    return MoEStep(
        np.empty((n_experts, n), dtype),
        weights_t,
        weights_t.reshape(-1),
        gate,
        gate.reshape(c, 1),
        gate.reshape(1, c),
        np.empty((c, hidden), dtype),
        np.empty((c, 2 * ffn), dtype),
        np.empty((c, ffn), dtype),
        np.empty((c, ffn), dtype),
        np.empty((c, hidden), dtype),
        np.empty((c, hidden), dtype),
        np.empty((n, hidden), dtype),
    )


def moe_step(x: np.ndarray, w: MoEWeights, top_k: int, b: MoEStep) -> np.ndarray:
    """MoE combine for few tokens (N*K <= FEW_ASSIGNMENTS, decoding): out = sum over kept
    k of w_k * Expert_k(x), with the router's top-k and grouping from ``top_k_few``.

    The arrangement of ``moe_forward`` (router probabilities, renormalized top-k, rows
    grouped by expert, SwiGLU experts, weighted sum), on buffers made once and without
    the routing record the backward needs. x [N, H] -> out [N, H] (``b.out``); equal to
    ``moe_forward(x, w, top_k)[0]`` to float rounding.
    """
    n = x.shape[0]
    probs_t = router_probs(x, w.router, b.probs_t)  # [E, N]
    few = top_k_few(probs_t, top_k)
    if few is None:  # NaN probabilities: the general path orders them
        return moe_forward(x, w, top_k)[0]
    kept, order, counts = few
    bounds = expert_bounds(counts)
    if n == 1:  # one token: its K experts read the row itself; kept p_k taken in expert order
        probs_t.take([kept[a] for a in order], out=b.gate)  # [C] kept p_k, sorted
        renormalize_top_k(b.gate_t)  # renormalized top-k: w_k = p_k / S
        ys = swiglu_rows(x, w.gate_up, w.down, bounds, b.gu, b.sig, b.h, b.ys)
        return b.gate_row.dot(ys, b.out)  # sum_k w_k y_k = w [1, K] y [K, H]
    probs_t.take(kept, out=b.weights_flat)  # kept p_k   [K, N]
    renormalize_top_k(b.weights_t)  # renormalized top-k: w_k = p_k / S
    x.take([a % n for a in order], axis=0, out=b.xs)  # gather   [C, H]
    b.weights_flat.take(order, out=b.gate)  # [C] w_k, sorted
    ys = swiglu_rows(b.xs, w.gate_up, w.down, bounds, b.gu, b.sig, b.h, b.ys)
    ys *= b.gate[:, None]  # w_k y_k
    b.slots[order] = ys  # back to (slot, token) order   [K*N, H]
    np.add.reduce(b.slots.reshape(top_k, n, -1), axis=0, out=b.out)  # sum_k w_k y_k
    return b.out
