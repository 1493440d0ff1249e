"""Compiled (Numba) kernels of the MoE experts for the train step, and SwiGLU's
derivative line.

Shape legend: N tokens, H hidden, F ffn, E experts, K top-k, C = N*K (token, slot)
assignments, pad = ROW_BLOCK - 1 zero rows past the C rows of a buffer.

Imported only by ``kernels._compiled`` (it imports Numba). The experts' products are
direct calls of the BLAS NumPy itself uses (Numba's own ``np.dot`` needs SciPy, which
is not a dependency): the same library and thread pool (``nn_core.model.blas`` sets
its threads), found through threadpoolctl and called by symbol. The addresses are
registered under names of our own when this module is imported, before any kernel is
compiled or loaded from the disk cache (cached code names the symbol, not the address).
Without such a BLAS (``BLAS_FOUND`` False) the trainer keeps the NumPy arrangement.

The kernels are module-level functions (not closures): Numba's disk cache keys a
closure on its captured objects, which would miss in every new process.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import numba as nb
import numpy as np
from numba import types

from ..model.layers import ROW_BLOCK

# CBLAS constants (cblas.h)
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# NumPy's OpenBLAS with the 64-bit integer interface: the scipy-openblas64 build NumPy's
# wheels ship, or a plain ILP64 build (the symbols' suffix 64_).
_GEMM_SYMBOLS = (
    ("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_"),
    ("cblas_sgemm64_", "cblas_dgemm64_"),
)


def _register_gemm() -> bool:
    """Register NumPy's BLAS sgemm and dgemm as the symbols ``nn_core_sgemm`` and
    ``nn_core_dgemm``; False if no OpenBLAS in the process has those symbols. With
    several OpenBLAS libraries loaded, the one shipped inside NumPy's own directory
    (``numpy.libs``) is taken first."""
    try:
        from threadpoolctl import ThreadpoolController

        paths = [
            c.filepath
            for c in ThreadpoolController().lib_controllers
            if c.user_api == "blas" and c.internal_api == "openblas"
        ]
    except Exception:  # no threadpoolctl support: no compiled experts
        return False
    numpy_dir = os.path.dirname(os.path.abspath(np.__file__))  # .../numpy
    own = (numpy_dir + os.sep, numpy_dir + ".libs" + os.sep)  # numpy/.dylibs, numpy.libs
    paths.sort(key=lambda path: not os.path.abspath(path).startswith(own))
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for single, double in _GEMM_SYMBOLS:
            if hasattr(lib, single) and hasattr(lib, double):
                import llvmlite.binding as llvm

                for name, fn in (("nn_core_sgemm", single), ("nn_core_dgemm", double)):
                    llvm.add_symbol(name, ctypes.cast(getattr(lib, fn), ctypes.c_void_p).value)
                return True
    return False


BLAS_FOUND = _register_gemm()

# cblas_?gemm(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc), the
# integers 64-bit and the pointers passed as integers (the same registers)
_i32, _i64 = types.int32, types.int64
_sgemm: Any = types.ExternalFunction(
    "nn_core_sgemm",
    types.void(_i32, _i32, _i32, _i64, _i64, _i64, types.float32, _i64, _i64, _i64, _i64,
               types.float32, _i64, _i64),
)  # fmt: skip
_dgemm: Any = types.ExternalFunction(
    "nn_core_dgemm",
    types.void(_i32, _i32, _i32, _i64, _i64, _i64, types.float64, _i64, _i64, _i64, _i64,
               types.float64, _i64, _i64),
)  # fmt: skip


@nb.njit(cache=True)
def gemm(
    trans_a: bool, trans_b: bool, a: Any, b: Any, c: Any, beta: float
) -> None:  # pragma: no cover - compiled
    """c = op(a) op(b) (beta 0) or c += op(a) op(b) (beta 1), op a transpose if trans_*.

    a, b, c: 2-D views with contiguous rows (leading dimension = row stride)."""
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
        _sgemm(_ROW_MAJOR, ta, tb, m, n, k, one, pa, lda, pb, ldb, bt, pc, ldc)
    elif size == 8:
        _dgemm(_ROW_MAJOR, ta, tb, m, n, k, 1.0, pa, lda, pb, ldb, float(beta), pc, ldc)
    else:
        raise ValueError("gemm computes in float32 or float64")


@nb.njit(cache=True)
def window(lo: int, hi: int) -> int:  # pragma: no cover - compiled
    """layers._row_window: end of the ROW_BLOCK-padded row window over rows [lo, hi)."""
    n = hi - lo
    return hi if n == 1 else lo + -(-n // ROW_BLOCK) * ROW_BLOCK


@nb.njit(cache=True)
def slots_of(order: Any) -> Any:  # pragma: no cover - compiled
    """Position in the sorted order of each assignment a = k*N + t (order's inverse)."""
    pos = np.empty(order.size, np.intp)
    for i in range(order.size):
        pos[order[i]] = i
    return pos


@nb.njit(cache=True)  # fastmath off: the reference's operations in its order
def swiglu_grad_rows(gu: Any, sig: Any, dh: Any, dgu: Any) -> None:  # pragma: no cover
    """layers.swiglu_backward's element-wise line: dG = dh . U . s'(G), dU = dh . s(G),
    s'(G) = sigma(G) + s(G) (1 - sigma(G)), s(G) = G sigma(G); gu = [G | U].
    gu [C, 2F], sig [C, F], dh [C (+ pad), F], dgu [C (+ pad), 2F]: rows < C written."""
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
def experts_gate_up(  # type: ignore[no-untyped-def]
    x, probs_t, top_t, weights_t, kept_sum, order, counts, w_gate_up, xs, gu, tokens, gate
):  # pragma: no cover
    """moe.router_forward after the probabilities, then moe_forward's gather and
    swiglu_rows' first products:
    top-k per token by probability, ties to the lower expert index (the stable argsort's
    order, NaN last); renormalized top-k w_k = p_k / S, S = sum of the kept p_k (added in
    k order); assignments a = k*N + t grouped by expert (a counting sort, stable: the
    stable argsort's order); xs = x[token of each sorted assignment]; per expert on its
    padded row window G|U = xs [Wg; Wu]^T; gate = w_k of each sorted assignment.

    x [N, H], probs_t [E, N]; written: top_t [K, N], weights_t [K, N], kept_sum [1, N],
    order [C], counts [E], xs [C + pad, H] (pad rows 0), gu [C + pad, 2F], tokens [C],
    gate [C]; w_gate_up [E, H, 2F]."""
    n_experts, n = probs_t.shape
    top_k = top_t.shape[0]
    for t in range(n):
        for k in range(top_k):
            best = -1
            for e in range(n_experts):
                chosen = False
                for j in range(k):
                    if top_t[j, t] == e:
                        chosen = True
                if chosen:
                    continue
                p = probs_t[e, t]
                if best < 0:
                    best = e
                else:
                    q = probs_t[best, t]
                    if p > q or (q != q and p == p):  # a larger p, or a number over NaN
                        best = e
            top_t[k, t] = best
            weights_t[k, t] = probs_t[best, t]  # kept p_k
        s = weights_t[0, t]
        for k in range(1, top_k):
            s += weights_t[k, t]
        kept_sum[0, t] = s  # S
        for k in range(top_k):
            weights_t[k, t] /= s  # w_k = p_k / S
    counts[:] = 0
    for k in range(top_k):
        for t in range(n):
            counts[top_t[k, t]] += 1
    start = np.empty(n_experts, np.intp)
    end = 0
    for e in range(n_experts):
        start[e] = end
        end += counts[e]
    for k in range(top_k):
        for t in range(n):
            e = top_t[k, t]
            order[start[e]] = k * n + t  # assignments ascending within each expert
            start[e] += 1
    for i in range(order.size):
        a = order[i]
        t = a % n
        tokens[i] = t
        gate[i] = weights_t[a // n, t]
        xs[i, :] = x[t, :]
    lo = 0
    for e in range(n_experts):
        hi = lo + counts[e]
        if hi > lo:
            w = window(lo, hi)
            gemm(False, False, xs[lo:w], w_gate_up[e], gu[lo:w], 0.0)  # G|U = x [Wg; Wu]^T
        lo = hi


@nb.njit(cache=True)  # fastmath off: the reference's operations in its order
def experts_down(gu, sig, order, gate, w_down, counts, h, ys, out):  # type: ignore[no-untyped-def]  # pragma: no cover
    """swiglu_rows after sigma(G): h = s(G) . U with s(G) = G sigma(G)   [C, F];
    Down(h) = h Wd^T per expert   [C, H]; then moe_forward's combine
    out_t = sum over k of w_k y_tk, added in slot order k = 0, 1, ...   [N, H].

    gu [C + pad, 2F], sig [C, F], gate [C], w_down [E, F, H], h [C + pad, F] (pad rows 0),
    ys [C + pad, H], out [N, H]."""
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
    n, hidden = out.shape
    pos = slots_of(order)
    for t in range(n):
        i = pos[t]
        g = gate[i]
        for j in range(hidden):
            out[t, j] = ys[i, j] * g
        for k in range(1, rows // n):
            i = pos[k * n + t]
            g = gate[i]
            for j in range(hidden):
                out[t, j] += ys[i, j] * g


@nb.njit(cache=True)  # fastmath off: the reference's operations in its order
def experts_grad(  # type: ignore[no-untyped-def]
    dout, tokens, gate, order, ys, xs, gu, sig, h, w_gate_up, w_down, counts,
    dw_gate_up, dw_down, overwrite, dys, dh, dgu, dxs, dweights_t,
):  # fmt: skip  # pragma: no cover
    """moe_backward's lines before the router, and swiglu_backward, per expert on padded
    row windows: dout_tk = dout_t (gather); dw_tk = dout_t . y_tk; dy_tk = w_tk dout_t;
    dh = dy Wd; dWd (+)= h^T dy; dG = dh . U . s'(G), dU = dh . s(G) (swiglu_grad_rows);
    [dWg dWu] (+)= x^T [dG dU]; dx = [dG dU] [Wg; Wu]. ``overwrite``: the weight gradients
    written (an expert without rows: 0), else added.

    dout [N, H]; tokens, gate, order [C]; ys, xs [C, H]; gu [C, 2F]; sig, h [C, F];
    weights and their gradients [E, H, 2F], [E, F, H]; dys [C + pad, H], dh [C + pad, F],
    dgu [C + pad, 2F] (pad rows 0), dxs [C + pad, H]; dweights_t [K, N]: dw_k of
    assignment a = k*N + t."""
    n, hidden = dout.shape
    for i in range(tokens.size):
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
            gemm(True, False, xs[lo:hi], dgu[lo:hi], dw_gate_up[e], beta)  # x^T [dG dU]
            gemm(False, True, dgu[lo:w], w_gate_up[e], dxs[lo:w], 0.0)  # [dG dU] [Wg; Wu]
        lo = hi


@nb.njit(cache=True)  # fastmath off: the reference's additions in its order
def experts_combine_grad(dx, dxs, order):  # type: ignore[no-untyped-def]  # pragma: no cover
    """The gather's backward, a scatter-add: dx_t += dx_tk for k = 0, 1, ... in order.

    dx [N, H] (the router's input gradient, added to), dxs [C, H] sorted by expert."""
    n, hidden = dx.shape
    pos = slots_of(order)
    for k in range(order.size // n):
        for t in range(n):
            i = pos[k * n + t]
            for j in range(hidden):
                dx[t, j] += dxs[i, j]


KERNELS: dict[str, Any] = {
    "experts_gate_up": experts_gate_up,
    "experts_down": experts_down,
    "experts_grad": experts_grad,
    "experts_combine_grad": experts_combine_grad,
}
