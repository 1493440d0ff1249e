"""Fused compiled kernels (Numba) for the memory-bound passes of a train step.

The plain-NumPy functions in ``optim.py`` are the reference; these do the same
arithmetic in one pass over the flat buffers instead of ~13 (AdamW with the clipping
factor, split over the cores from ADAMW_PARALLEL_MIN parameters up) or 3 (gradient
norm, one vectorized thread). Tests hold the two equal to float
rounding. Numba is imported only when a kernel is first asked for (importing it
costs about half a second), and compiled functions are cached on disk
(``cache=True``), so neither import nor compile lands in a forward pass or in
CLI start-up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np

from ..model.layers import FusedBackward, FusedExperts

# AdamW on buffers smaller than this runs on one thread: waking the second costs more
# than it saves there (measured on 2 cores, tiny config, 542,528 parameters, buffers
# not in cache: median 287 us on one thread, 333 us on two), and a parallel pass waits
# for its slowest thread, which on a busy machine is one that lost its core.
ADAMW_PARALLEL_MIN = 1 << 21


@cache
def _compiled() -> dict[str, Callable[..., Any]]:
    # Numba's parallel loops run on an OpenMP pool whose idle threads spin-wait by
    # default; on two cores that spinning steals the core BLAS needs for the next
    # matrix product (measured: train step 4.1 -> 2.9 ms tiny, 37 -> 26 ms small).
    # Passive waiting must be chosen before the OpenMP runtime starts; a user's own
    # setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numba as nb

    @nb.njit(parallel=True, fastmath=False, cache=True)
    def adamw(params, grads, m, v, lr, beta1, beta2, eps, wd, t, scale):  # pragma: no cover
        dt = params.dtype.type
        s = dt(scale)  # Gradient clipping: g *= clip / (norm + 1e-12), in the gradients' dtype
        bc1 = 1.0 - beta1**t  # bias corrections
        bc2 = 1.0 - beta2**t
        sqrt_bc2 = math.sqrt(bc2)
        step_size = dt(lr * sqrt_bc2 / bc1)  # as the NumPy reference: see optim.adamw_update
        eps_hat = dt(eps * sqrt_bc2)
        decay = dt(1.0 - lr * wd)
        b1, b2 = dt(beta1), dt(beta2)
        one_m_b1, one_m_b2 = dt(1.0 - beta1), dt(1.0 - beta2)
        for i in nb.prange(params.size):
            # the clipped gradient, written back as clip_grad_norm leaves it (unconditionally:
            # a loop with a conditional store is not vectorized; g * 1 is exactly g)
            g = grads[i] * s
            grads[i] = g
            mi = m[i] * b1 + g * one_m_b1  # m = b1 m + (1-b1) g
            vi = v[i] * b2 + (g * g) * one_m_b2  # v = b2 v + (1-b2) g^2
            m[i] = mi
            v[i] = vi
            update = mi / (np.sqrt(vi) + eps_hat) * step_size
            params[i] = params[i] * decay - update  # w -= lr * (m_hat/(sqrt(v_hat)+eps) + wd w)

    @nb.njit(fastmath=True, cache=True)  # one thread, vectorized: reassociates the float64 sum
    def sum_squares(flat):  # pragma: no cover - compiled
        total = 0.0  # float64 accumulator
        for i in range(flat.size):
            x = np.float64(flat[i])
            total += x * x
        return total

    @nb.njit(cache=True)  # fastmath off: the reference's operations, one rounding each
    def rmsnorm_backward_rows(dy, x, r, gain, dgain, dx, overwrite):  # pragma: no cover
        # layers.rmsnorm_backward in one pass per row: xn = x r; a = dy . g;
        # dx = r (a - xn mean(a . xn)); dg (+)= sum over rows of dy . xn
        n, h = x.shape
        inv_h = x.dtype.type(1.0 / h)
        if overwrite:
            dgain[:] = 0
        for i in range(n):
            ri = r[i, 0]
            proj = x.dtype.type(0.0)
            for j in range(h):
                xn = x[i, j] * ri
                a = dy[i, j] * gain[j]
                dx[i, j] = a
                proj += a * xn  # sum(a . xn)
                dgain[j] += dy[i, j] * xn
            proj *= inv_h  # mean(a . xn)
            for j in range(h):
                dx[i, j] = (dx[i, j] - (x[i, j] * ri) * proj) * ri

    @nb.njit(cache=True)  # fastmath off: the reference's operations in its order
    def router_grad_rows(
        probs_t, top_t, kept_sum_t, weights_t, dweights_t, aux, dz_t
    ):  # pragma: no cover
        # moe.router_backward's element-wise lines, token by token (column t):
        # dp = aux + at the kept experts (dw_k - sum_j w_j dw_j) / S; dz = p (dp - p . dp)
        n_experts, n = probs_t.shape
        top_k = top_t.shape[0]
        zero = probs_t.dtype.type(0.0)
        for t in range(n):
            wdw = zero
            for k in range(top_k):
                wdw += weights_t[k, t] * dweights_t[k, t]  # sum_j w_j dw_j
            for e in range(n_experts):
                dz_t[e, t] = aux[e]  # aux loss: alpha E f_e / N
            for k in range(top_k):  # renormalized top-k: dp_k = (dw_k - sum_j w_j dw_j) / S
                dz_t[top_t[k, t], t] += (dweights_t[k, t] - wdw) / kept_sum_t[0, t]
            dot = zero
            for e in range(n_experts):
                dot += probs_t[e, t] * dz_t[e, t]  # sum_e p_e dp_e
            for e in range(n_experts):
                dz_t[e, t] = (dz_t[e, t] - dot) * probs_t[e, t]  # softmax backward

    kernels: dict[str, Callable[..., Any]] = {
        "adamw": adamw,
        "sum_squares": sum_squares,
        "rmsnorm_backward": rmsnorm_backward_rows,
        "router_grad": router_grad_rows,
    }
    from . import expert_kernels as ek  # the experts' kernels; SwiGLU's line lives there

    kernels["swiglu_grad"] = ek.swiglu_grad_rows
    if ek.BLAS_FOUND:
        kernels.update(ek.KERNELS)
    return kernels


def adamw_update_fused(params, grads, m, v, lr, beta1, beta2, eps, wd, t, grad_scale=1.0) -> None:  # type: ignore[no-untyped-def]
    """``optim.adamw_update`` as one fused parallel pass (same signature, same formula):
    the clipping factor ``grad_scale`` is applied in the same pass, not in one of its own."""
    kernel = _compiled()["adamw"]
    args = (params, grads, m, v, lr, beta1, beta2, eps, wd, t, float(grad_scale))
    if params.size >= ADAMW_PARALLEL_MIN:
        kernel(*args)
        return
    import numba as nb  # imported by _compiled already

    threads = nb.get_num_threads()
    nb.set_num_threads(1)  # this thread's launches only
    try:
        kernel(*args)
    finally:
        nb.set_num_threads(threads)


def global_norm_fused(flat) -> float:  # type: ignore[no-untyped-def]
    """``optim.global_norm`` in one pass, accumulated in float64."""
    return math.sqrt(float(_compiled()["sum_squares"](flat)))


def fused_backward() -> FusedBackward:
    """The compiled element-wise backward passes the model's backward takes
    (``MoETransformer.backward(..., fused=...)``): RMSNorm's backward in one pass per row,
    the SwiGLU derivative line in one pass instead of six, and the router's lines between
    its two products (top-k, aux and softmax backward) in one pass instead of about ten.
    The NumPy code in ``nn_core.model`` is the reference; tests hold them equal to
    rounding."""
    k = _compiled()
    experts = None
    if "experts_gate_up" in k:  # NumPy's BLAS found: the experts' compiled arrangement
        experts = FusedExperts(
            k["experts_gate_up"], k["experts_down"], k["experts_grad"], k["experts_combine_grad"]
        )
    return FusedBackward(k["rmsnorm_backward"], k["swiglu_grad"], k["router_grad"], experts)
