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

from ..model.layers import ROW_BLOCK, FusedBackward, FusedExperts

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
    def swiglu_grad_rows(gu, sig, dh, dgu):  # pragma: no cover
        # layers.swiglu_backward's element-wise line: dG = dh . U . s'(G), dU = dh . s(G),
        # s'(G) = sigma(G) + s(G) (1 - sigma(G)), s(G) = G sigma(G); gu = [G | U]
        rows, f = sig.shape
        one = sig.dtype.type(1.0)
        for i in range(rows):
            for j in range(f):
                s = sig[i, j]
                silu = gu[i, j] * s
                d = dh[i, j]
                dgu[i, j] = ((((one - s) * silu) + s) * gu[i, f + j]) * d
                dgu[i, f + j] = silu * d

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

    kernels = {
        "adamw": adamw,
        "sum_squares": sum_squares,
        "rmsnorm_backward": rmsnorm_backward_rows,
        "swiglu_grad": swiglu_grad_rows,
        "router_grad": router_grad_rows,
    }
    gemms = _blas_gemm()
    if gemms is not None:
        kernels.update(_experts_kernels(nb, gemms, swiglu_grad_rows))
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


# ---------------------------------------------------------------------------- the experts

# CBLAS constants (cblas.h)
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# NumPy's own OpenBLAS, 64-bit integer interface: the symbols of the scipy-openblas64
# build NumPy's wheels ship. Another BLAS (no such symbol): the NumPy reference runs.
_GEMM_SYMBOLS = (
    ("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_"),
    ("cblas_sgemm64_", "cblas_dgemm64_"),
)


@cache
def _blas_gemm() -> tuple[Any, Any] | None:
    """(sgemm, dgemm) of the BLAS library NumPy calls, as Numba external functions, or None.

    Numba's own ``np.dot`` needs SciPy (not a dependency), so the compiled kernels call
    the BLAS NumPy itself uses, by symbol: the same library, the same thread pool
    (``nn_core.model.blas`` sets its threads), the same products. The addresses are
    registered under names of our own before any kernel is compiled or loaded from the
    disk cache (the cached code refers to the names, not to addresses).
    """
    import ctypes

    try:
        from threadpoolctl import ThreadpoolController

        paths = [
            c.filepath
            for c in ThreadpoolController().lib_controllers
            if c.user_api == "blas" and c.internal_api == "openblas"
        ]
    except Exception:  # no threadpoolctl support here: no compiled experts
        return None
    if len(paths) != 1:
        return None
    try:
        lib = ctypes.CDLL(paths[0])
    except OSError:
        return None
    addresses = None
    for single, double in _GEMM_SYMBOLS:
        if hasattr(lib, single) and hasattr(lib, double):
            addresses = (getattr(lib, single), getattr(lib, double))
            break
    if addresses is None:
        return None
    import llvmlite.binding as llvm
    from numba import types

    i32, i64 = types.int32, types.int64
    externals = []
    for name, fn, real in zip(
        ("nn_core_sgemm", "nn_core_dgemm"), addresses, (types.float32, types.float64)
    ):
        llvm.add_symbol(name, ctypes.cast(fn, ctypes.c_void_p).value)
        # cblas_?gemm(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc),
        # integers 64-bit (the pointers passed as integers: the same registers)
        sig = types.void(i32, i32, i32, i64, i64, i64, real, i64, i64, i64, i64, real, i64, i64)
        externals.append(types.ExternalFunction(name, sig))
    return externals[0], externals[1]


def _experts_kernels(nb: Any, gemms: tuple[Any, Any], swiglu_grad_rows: Any) -> dict[str, Any]:
    """The MoE layer's experts in compiled arrangement: ``moe.moe_forward`` (gather, SwiGLU
    experts, weighted combine) and ``moe.moe_backward`` (the experts' backward and the
    scatter-adds) with every expert product a direct BLAS call. The NumPy functions are
    the reference; tests hold them equal to rounding."""
    sgemm, dgemm = gemms
    row_block = ROW_BLOCK

    @nb.njit(cache=True)
    def gemm(trans_a, trans_b, a, b, c, beta):  # pragma: no cover - compiled
        # c = op(a) op(b) (beta 0) or c += op(a) op(b) (beta 1); op: transpose if trans_*.
        # a, b, c: 2-D views with contiguous rows (leading dimension = row stride)
        m, n = c.shape
        k = a.shape[0] if trans_a else a.shape[1]
        if m == 0 or n == 0 or k == 0:
            return
        size = c.itemsize
        if a.strides[1] != size or b.strides[1] != size or c.strides[1] != size:
            raise ValueError("gemm operands need contiguous rows")
        ta = _TRANS if trans_a else _NO_TRANS
        tb = _TRANS if trans_b else _NO_TRANS
        lda, ldb, ldc = a.strides[0] // size, b.strides[0] // size, c.strides[0] // size
        pa, pb, pc = a.ctypes.data, b.ctypes.data, c.ctypes.data
        if size == 4:
            one, bt = np.float32(1.0), np.float32(beta)
            sgemm(_ROW_MAJOR, ta, tb, m, n, k, one, pa, lda, pb, ldb, bt, pc, ldc)
        else:
            dgemm(_ROW_MAJOR, ta, tb, m, n, k, 1.0, pa, lda, pb, ldb, float(beta), pc, ldc)

    @nb.njit(cache=True)
    def window(lo, hi):  # pragma: no cover - compiled
        # layers._row_window: end of the ROW_BLOCK-padded row window over rows [lo, hi)
        n = hi - lo
        return hi if n == 1 else lo + -(-n // row_block) * row_block

    @nb.njit(cache=True)
    def slots_of(order):  # pragma: no cover - compiled
        # position in the sorted order of each assignment a = k*N + t (order's inverse)
        pos = np.empty(order.size, np.intp)
        for i in range(order.size):
            pos[order[i]] = i
        return pos

    @nb.njit(cache=True)
    def experts_gate_up(
        x, order, weights_t, w_gate_up, counts, xs, gu, tokens, gate
    ):  # pragma: no cover
        # moe_forward's gather and swiglu_rows' first products, per expert e on its padded
        # row window: xs = x[token of each sorted assignment]   [C, H];
        # G|U = xs [Wg; Wu]^T   [C, 2F];  w_k of each sorted assignment   [C]
        # x [N, H], order [C], weights_t [K, N], w_gate_up [E, H, 2F], counts [E],
        # xs [C + pad, H] (pad rows 0), gu [C + pad, 2F]
        n = x.shape[0]
        for i in range(order.size):
            a = order[i]
            t = a % n
            tokens[i] = t
            gate[i] = weights_t[a // n, t]
            xs[i, :] = x[t, :]
        lo = 0
        for e in range(counts.size):
            hi = lo + counts[e]
            if hi > lo:
                w = window(lo, hi)
                gemm(False, False, xs[lo:w], w_gate_up[e], gu[lo:w], 0.0)  # G|U = x [Wg; Wu]^T
            lo = hi

    @nb.njit(cache=True)  # fastmath off: the reference's operations in its order
    def experts_down(gu, sig, order, gate, w_down, counts, h, ys, out):  # pragma: no cover
        # swiglu_rows after sigma(G): h = s(G) . U with s(G) = G sigma(G)  [C, F];
        # Down(h) = h Wd^T per expert   [C, H]; then moe_forward's combine:
        # out_t = sum over k of w_k y_k, summed in slot order k = 0, 1, ...   [N, H]
        # gu [C + pad, 2F], sig [C, F], w_down [E, F, H], h [C + pad, F] (pad rows 0),
        # ys [C + pad, H], out [N, H]
        rows, f = sig.shape
        for i in range(rows):
            for j in range(f):
                h[i, j] = gu[i, j] * sig[i, j] * gu[i, f + j]
        lo = 0
        for e in range(counts.size):
            hi = lo + counts[e]
            if hi > lo:
                w = window(lo, hi)
                gemm(False, False, h[lo:w], w_down[e], ys[lo:w], 0.0)  # Down(h) = h Wd^T
            lo = hi
        n = out.shape[0]
        top_k = rows // n
        pos = slots_of(order)
        for t in range(n):
            i = pos[t]
            g = gate[i]
            for j in range(out.shape[1]):
                out[t, j] = ys[i, j] * g
            for k in range(1, top_k):
                i = pos[k * n + t]
                g = gate[i]
                for j in range(out.shape[1]):
                    out[t, j] += ys[i, j] * g

    @nb.njit(cache=True)  # fastmath off: the reference's operations in its order
    def experts_grad(
        dout,
        tokens,
        gate,
        order,
        ys,
        xs,
        gu,
        sig,
        h,
        w_gate_up,
        w_down,
        counts,
        dw_gate_up,
        dw_down,
        overwrite,
        dys,
        dh,
        dgu,
        dxs,
        dweights_t,
    ):  # pragma: no cover
        # moe_backward up to the router, and swiglu_backward, per expert on padded windows:
        # dout_tk = dout_t (gather); dw_tk = dout_t . y_tk; dy_tk = w_tk dout_t;
        # dh = dy Wd; dWd (+)= h^T dy; dG = dh . U . s'(G), dU = dh . s(G) (swiglu_grad);
        # [dWg dWu] (+)= x^T [dG dU]; dx = [dG dU] [Wg; Wu]
        # dout [N, H]; ys, xs [C, H]; gu [C, 2F]; sig, h [C, F]; dys [C + pad, H],
        # dh [C + pad, F], dgu [C + pad, 2F] (pad rows 0), dxs [C + pad, H];
        # dweights_t [K, N]: dw_k of assignment a = k*N + t
        n, hidden = dout.shape
        rows = tokens.size
        for i in range(rows):
            t = tokens[i]
            d = dout.dtype.type(0.0)
            for j in range(hidden):
                v = dout[t, j]
                d += v * ys[i, j]  # dw_tk = dout_t . y_tk
                dys[i, j] = v
            a = order[i]
            dweights_t[a // n, a % n] = d
            g = gate[i]
            for j in range(hidden):
                dys[i, j] *= g  # dy_tk = w_tk dout_t
        beta = 0.0 if overwrite else 1.0
        lo = 0
        for e in range(counts.size):
            hi = lo + counts[e]
            if hi > lo:
                w = window(lo, hi)
                gemm(False, True, dys[lo:w], w_down[e], dh[lo:w], 0.0)  # dh = dy Wd
                gemm(True, False, h[lo:hi], dys[lo:hi], dw_down[e], beta)  # dWd^T (+)= h^T dy
            elif overwrite:  # an expert that got no rows: dW = 0
                dw_gate_up[e, :, :] = 0
                dw_down[e, :, :] = 0
            lo = hi
        swiglu_grad_rows(gu, sig, dh, dgu)  # dG = dh . U . s'(G), dU = dh . s(G)
        lo = 0
        for e in range(counts.size):
            hi = lo + counts[e]
            if hi > lo:
                w = window(lo, hi)
                # [dWg dWu]^T (+)= x^T [dG dU];  dx = [dG dU] [Wg; Wu]
                gemm(True, False, xs[lo:hi], dgu[lo:hi], dw_gate_up[e], beta)
                gemm(False, True, dgu[lo:w], w_gate_up[e], dxs[lo:w], 0.0)
            lo = hi

    @nb.njit(cache=True)  # fastmath off: the reference's additions in its order
    def experts_combine_grad(dx, dxs, order):  # pragma: no cover
        # the gather's backward, a scatter-add: dx_t += dx_tk for k = 0, 1, ... in order
        # dx [N, H] (the router's dx, added to), dxs [C, H] sorted by expert
        n, hidden = dx.shape
        pos = slots_of(order)
        for k in range(order.size // n):
            for t in range(n):
                i = pos[k * n + t]
                for j in range(hidden):
                    dx[t, j] += dxs[i, j]

    return {
        "experts_gate_up": experts_gate_up,
        "experts_down": experts_down,
        "experts_grad": experts_grad,
        "experts_combine_grad": experts_combine_grad,
    }
