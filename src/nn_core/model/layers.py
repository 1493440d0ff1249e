"""Embedding, RMSNorm, Linear and the SwiGLU experts: forward/backward pairs.

Shape legend: N rows (tokens), H hidden, F ffn, V vocab, E experts, C rows routed to
the experts (grouped by expert).

Each ``*_forward`` returns ``(out, cache)``; each ``*_backward`` takes the upstream
gradient and that cache, ADDS parameter gradients into the given buffers (``+=``) and
returns the gradient of its input. With ``overwrite=True`` a backward WRITES its
parameter gradients instead (the buffers' old contents are ignored, as if they had been
zeroed first): the model's first backward into freshly "zeroed" gradients uses it and
skips both the zero fill and the read-add-write pass. ``ws``/``key`` name the workspace
buffers the function writes (``nn_core.model.workspace``); without a workspace every
output is a fresh array.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .tensor import dtype_scalar, sigmoid
from .workspace import Workspace, buffer


class FusedExperts(NamedTuple):
    """The MoE layer's experts in one compiled arrangement each for the training forward
    and backward (``moe.moe_forward``, ``moe.moe_backward``): gathers, scatters and the
    element-wise lines in loops, every expert product a direct BLAS call. Handed in by
    the trainer (``nn_core.training.kernels``); the NumPy functions are the reference."""

    # (x [N, H], probs_t [E, N], top_t [K, N], weights_t [K, N], kept_sum [1, N], order [C],
    # counts [E], w_gate_up [E, H, 2F], xs [C + pad, H], gu [C + pad, 2F], tokens [C],
    # gate [C]): the router's top-k, renormalization and grouping, gather xs = x[tokens],
    # G|U = xs [Wg; Wu]^T per expert, w_k of each row
    gate_up: Callable[..., None]
    # (gu, sig [C, F], order, gate, w_down [E, F, H], counts, h [C + pad, F],
    # ys [C + pad, H], out [N, H]): h = s(G) . U, y = h Wd^T, out_t = sum_k w_k y_tk
    down: Callable[..., None]
    # (dout [N, H], tokens, gate, order, ys, xs, gu, sig, h, w_gate_up, w_down, counts,
    # dw_gate_up, dw_down, overwrite, dys, dh, dgu, dxs [C + pad, .], dweights_t [K, N]):
    # moe_backward's lines before the router and swiglu_backward
    grad: Callable[..., None]
    # (dx [N, H], dxs [C, H], order [C]): the gather's backward, dx_t += dx_tk in k order
    combine_grad: Callable[..., None]


class FusedBackward(NamedTuple):
    """Compiled one-pass versions of element-wise training lines, handed in by the caller
    (the trainer's ``nn_core.training.kernels.fused_backward``; the model imports no
    compiler). The NumPy code of ``rmsnorm_backward``, ``swiglu_backward`` and
    ``moe.router_backward`` is the reference they are tested against; ``experts``
    (optional) is taken by the training forward (``MoETransformer.forward_loss``) and the
    backward, with ``moe_forward`` and ``moe_backward`` as its reference."""

    # (dy, x, r, gain, dgain, dx, overwrite): RMSNorm backward, dx [N, H] written
    rmsnorm: Callable[..., None]
    # (gu [C, 2F], sig [C, F], dh [C, F], dgu [C, 2F]): dG = dh . U . s'(G), dU = dh . s(G)
    swiglu_grad: Callable[..., None]
    # (probs_t [E, N], top_t [K, N], kept_sum_t [1, N], weights_t, dweights_t [K, N],
    # aux [E], dz_t [E, N]): moe.router_backward's lines from dweights to dz
    router_grad: Callable[..., None]
    # the experts' compiled forward and backward (None: the NumPy arrangement)
    experts: FusedExperts | None = None


# ---------------------------------------------------------------------------- Embedding


def embedding_forward(
    ids: np.ndarray,
    weight: np.ndarray,
    ws: Workspace | None = None,
    key: str = "",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Embedding: out = W[token_id, :].   ids [N] int, W [V, H] -> [N, H] (into ``out``
    if given, else the workspace's buffer)."""
    if out is None:
        out = buffer(ws, key + "out", (ids.size, weight.shape[1]), weight.dtype)
    return weight.take(ids, axis=0, out=out)  # the method: np.take adds a Python layer


def embedding_backward(
    dout: np.ndarray, ids: np.ndarray, dweight: np.ndarray, *, overwrite: bool = False
) -> None:
    """dW[ids] += dout; repeated ids accumulate (np.add.at, not fancy assignment).

    dout [N, H], ids [N] int, dW [V, H]. ``overwrite``: rows absent from ``ids`` get 0.
    On a contiguous dW the adds run on the flat buffer with one flat index per entry,
    id * H + column (the same additions in the same order; NumPy's add.at is several
    times faster on one-dimensional indices).
    """
    if overwrite:
        dweight.fill(0)
    if not dweight.flags.c_contiguous:
        np.add.at(dweight, ids, dout)
        return
    h = dweight.shape[1]
    flat = np.multiply(ids, h)[:, None] + np.arange(h)  # [N, H] flat index of each entry
    np.add.at(dweight.reshape(-1), flat.reshape(-1), dout.reshape(-1))


# ---------------------------------------------------------------------------- RMSNorm


class RMSNormCache(NamedTuple):
    x: np.ndarray  # [N, H] input
    r: np.ndarray  # [N, 1] 1 / sqrt(mean(x^2) + eps)


def rmsnorm_forward(
    x: np.ndarray,
    gain: np.ndarray,
    eps: float = 1e-6,
    ws: Workspace | None = None,
    key: str = "",
) -> tuple[np.ndarray, RMSNormCache]:
    """RMSNorm: y = x * 1/sqrt(mean(x^2) + eps) * gamma.   x [N, H], gamma [H] -> [N, H]."""
    r = buffer(ws, key + "r", (x.shape[0], 1), x.dtype)  # [N, 1]
    y = buffer(ws, key + "y", x.shape, x.dtype)
    return rmsnorm_into(x, gain, eps, r, y), RMSNormCache(x, r)


def rmsnorm_into(
    x: np.ndarray, gain: np.ndarray, eps: float, r: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """RMSNorm into given arrays: r [N, 1] = 1/sqrt(mean(x^2) + eps), y [N, H] = x r gamma.
    One row may also come as x [H], r 0-d, y [H].

    Computed as r = sqrt(H) / sqrt(sum(x^2) + H eps) (the same value: four calls instead
    of five); for one row [H] that scalar is computed in Python floats (two NumPy calls
    fewer than 0-d arrays take). Returns y.
    """
    h = x.shape[-1]
    if x.ndim == 1:  # one row as [H] with r 0-d (decoding): r in Python floats, 1-D products
        r.fill(math.sqrt(h) / math.sqrt(float(x.dot(x)) + h * eps))  # sum(x^2) by BLAS dot
        np.multiply(x, gain, y)
        np.multiply(y, r, y)  # y = x gamma r
        return y
    consts = _RMS_CONSTANTS.get((h, eps, x.dtype))
    if consts is None:
        consts = _rms_constants(h, eps, x.dtype)
    if x.shape[0] == 1:  # one row: a BLAS dot, a third of vecdot's cost
        x.dot(x.T, r)  # sum(x^2)   [1, 1]
    else:
        np.vecdot(x, x, out=r, keepdims=True)  # type: ignore[call-overload]  # sum(x^2) [N, 1]
    np.add(r, consts[0], r)  # H (mean(x^2) + eps)
    np.sqrt(r, r)
    np.divide(consts[1], r, r)  # r = sqrt(H) / sqrt(H (mean(x^2) + eps))
    np.multiply(x, r, y)
    np.multiply(y, gain, y)
    return y


_RMS_CONSTANTS: dict[tuple[int, float, np.dtype], tuple[np.ndarray, np.ndarray]] = {}


def _rms_constants(h: int, eps: float, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(H eps, sqrt(H)) as 0-d arrays of ``dt``, made once per (H, eps, dtype)."""
    if len(_RMS_CONSTANTS) >= 64:
        _RMS_CONSTANTS.clear()
    c = _RMS_CONSTANTS[(h, eps, dt)] = (dtype_scalar(h * eps, dt), dtype_scalar(math.sqrt(h), dt))
    return c


def rmsnorm_backward(
    dy: np.ndarray,
    cache: RMSNormCache,
    gain: np.ndarray,
    dgain: np.ndarray,
    ws: Workspace | None = None,
    key: str = "",
    *,
    overwrite: bool = False,
    fused: FusedBackward | None = None,
) -> np.ndarray:
    """RMSNorm backward, per row with r = (mean(x^2) + eps)^(-1/2):
    a = dy . g;  dx = r . a - x . r^3 . (sum_j a_j x_j) / H;  dg = sum over rows of dy . x . r.

    (x . r^3 . sum(a x) / H equals xn . r . mean(a . xn) with xn = x . r, which is how it
    is computed.) Returns dx [N, H]. ``fused``: the same lines by its compiled ``rmsnorm``.
    """
    x, r = cache
    n, h = x.shape
    if fused is not None:
        dx = buffer(ws, key + "dx", x.shape, x.dtype)
        fused.rmsnorm(dy, x, r, gain, dgain, dx, overwrite)
        return dx
    xn = buffer(ws, key + "xn", x.shape, x.dtype)
    np.multiply(x, r, out=xn)  # [N, H] normalized input
    if overwrite:  # dg = sum over rows of dy . xn   [H]
        np.vecdot(dy.T, xn.T, out=dgain)
    else:
        dgain += np.vecdot(dy.T, xn.T)
    a = buffer(ws, key + "dx", x.shape, x.dtype)
    np.multiply(dy, gain, out=a)  # a = dy . g   [N, H]
    proj = buffer(ws, key + "proj", (n, 1), x.dtype)
    np.vecdot(a, xn, out=proj[:, 0])
    proj *= 1.0 / h  # mean(a . xn)   [N, 1]
    xn *= proj
    a -= xn
    a *= r  # dx
    return a


# ---------------------------------------------------------------------------- Linear


def weight_grad(
    a: np.ndarray,
    b: np.ndarray,
    dw: np.ndarray,
    overwrite: bool = False,
    ws: Workspace | None = None,
    key: str = "",
) -> None:
    """A weight's gradient as a product: dW += a b (``overwrite``: dW = a b).

    a [in, C], b [C, out], dW [in, out] (the stored, transposed layout of every weight).
    With C = 1 it is an outer product, computed as one: BLAS is several times slower on
    a sum of one term (same values either way: each entry is the single product).
    """
    if a.shape[1] == 1:
        if overwrite:
            np.multiply(a, b, out=dw)
        else:
            dw += np.multiply(a, b, out=buffer(ws, key, dw.shape, dw.dtype))
    elif not overwrite:
        dw += matmul_into(a, b, buffer(ws, key, dw.shape, dw.dtype))
    elif dw.flags.c_contiguous:  # every gradient view of the flat buffer
        matmul_into(a, b, dw)
    else:
        np.matmul(a, b, out=dw)


def linear_forward(
    x: np.ndarray,
    w_t: np.ndarray,
    ws: Workspace | None = None,
    key: str = "",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Linear: Y = X @ W^T, no bias, for W [out_features, in_features].

    ``w_t`` is W^T [in, out] (how the model stores it: a contiguous right operand).
    x [N, in] -> [N, out], into ``out`` (C-contiguous) if given, else the workspace's
    buffer (a fresh array without a workspace); see ``matmul_into``.
    """
    if out is None:
        out = buffer(ws, key + "y", (x.shape[0], w_t.shape[1]), x.dtype)
    return matmul_into(x, w_t, out)


# ndarray.dot skips the ufunc dispatch of np.matmul (about half a microsecond a call) but
# zero-fills its output before the BLAS call: it pays for outputs up to about this size.
DOT_MAX_OUT = 16384


def matmul_into(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The 2-D product a @ b into ``out`` (C-contiguous), by ``ndarray.dot`` for small
    outputs and ``np.matmul`` for large ones (the same BLAS product)."""
    if out.size <= DOT_MAX_OUT:
        return a.dot(b, out)
    return np.matmul(a, b, out=out)


def linear_backward(
    dy: np.ndarray,
    x: np.ndarray,
    w_t: np.ndarray,
    dw_t: np.ndarray,
    ws: Workspace | None = None,
    key: str = "",
    *,
    overwrite: bool = False,
) -> np.ndarray:
    """Linear backward: dW += dY^T X (as dW^T += X^T dY);  dX = dY W.

    dy [N, out], x [N, in], w_t / dw_t = W^T / dW^T [in, out] -> dx [N, in].
    """
    weight_grad(x.T, dy, dw_t, overwrite, ws, key + "dw")  # dW^T += X^T dY
    return matmul_into(dy, w_t.T, buffer(ws, key + "dx", x.shape, x.dtype))  # dX = dY W


# ---------------------------------------------------------------------------- SwiGLU experts


class SwiGLUCache(NamedTuple):
    x: np.ndarray  # [C, H] input rows, grouped by expert
    bounds: list[tuple[int, int, int]]  # (expert, first row, end row) of each non-empty expert
    gu: np.ndarray  # [C, 2F] G | U = x [Wg; Wu]^T
    sig: np.ndarray  # [C, F] sigma(G)
    h: np.ndarray  # [C, F] h = s(G) . U


def expert_bounds(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of each expert that received rows; empty ones skipped."""
    bounds, end = [], 0
    for e, c in enumerate(counts):
        if c:
            bounds.append((e, end, end + c))
            end += c
    return bounds


def swiglu_forward(
    x: np.ndarray,
    w_gate_up: np.ndarray,
    w_down: np.ndarray,
    counts: list[int] | None = None,
    ws: Workspace | None = None,
    key: str = "",
) -> tuple[np.ndarray, SwiGLUCache]:
    """SwiGLU expert: out = Down(SiLU(Gate(x)) * Up(x)).

    Weights as the model stores them, transposed: ``w_gate_up`` = [Wg^T | Wu^T] [H, 2F]
    (Gate, Up: Linear H -> F, stacked), ``w_down`` = Wd^T [F, H].
    One expert: x [C, H] -> [C, H]. Stacked experts: w_gate_up [E, H, 2F], w_down
    [E, F, H], ``counts`` [E] rows of each expert, x grouped by expert. Each expert is two
    products (gate|up fused, then down); the element-wise SiLU . U runs once over all rows.
    With ``counts``, x may carry ROW_BLOCK - 1 zero rows past its C = sum(counts) rows
    (``moe_forward`` gathers into such a buffer): the products then run on padded row
    windows (see ``swiglu_rows``). The cache holds the first C rows.
    """
    if counts is None:  # a single expert
        w_gate_up, w_down, counts = w_gate_up[None], w_down[None], [x.shape[0]]
    bounds = expert_bounds(counts)
    rows, f = (bounds[-1][2] if bounds else 0), w_down.shape[1]
    spare = x.shape[0] - rows  # scratch rows past the C rows (0 or ROW_BLOCK - 1)
    hidden = x.shape[1]
    dt = x.dtype
    gu = buffer(ws, key + "gu", (rows + spare, 2 * f), dt)  # [C (+ pad), 2F]
    sig = buffer(ws, key + "sig", (rows, f), dt)  # [C, F]
    h = buffer(ws, key + "h", (rows + spare, f), dt, zero=True)  # [C (+ pad), F]
    out = buffer(ws, key + "out", (rows + spare, hidden), dt)  # [C (+ pad), H]
    swiglu_rows(x, w_gate_up, w_down, bounds, gu, sig, h, out)
    return out[:rows], SwiGLUCache(x[:rows], bounds, gu[:rows], sig, h[:rows])


def swiglu_rows(
    x: np.ndarray,
    w_gate_up: np.ndarray,
    w_down: np.ndarray,
    bounds: list[tuple[int, int, int]],
    gu: np.ndarray,
    sig: np.ndarray,
    h: np.ndarray,
    out: np.ndarray,
) -> np.ndarray:
    """SwiGLU experts into given arrays: out = Down(SiLU(Gate(x)) * Up(x)) for the rows
    lo:hi of each (expert, lo, hi) in ``bounds`` (experts in row order).

    x [C, H], or [1, H] when every row is that one row (one token's experts); stacked
    weights w_gate_up [E, H, 2F], w_down [E, F, H]; gu [C, 2F], sig [C, F], h [C, F], out
    [C, H] C-contiguous (written; the cache's activations). When x, gu, h and out all
    carry ROW_BLOCK - 1 more rows (zeros in x's and h's, never written past C), each
    expert's products run on its row window padded to a multiple of ROW_BLOCK: the extra
    rows belong to the next expert (recomputed in its turn) or to the scratch rows.
    Returns out [C, H] (out's first C rows).
    """
    f = h.shape[1]
    rows = sig.shape[0]
    shared = x.shape[0] == 1
    if not shared and min(x.shape[0], gu.shape[0], h.shape[0], out.shape[0]) > rows:
        windows = [(e, lo, _row_window(lo, hi)) for e, lo, hi in bounds]  # padded row windows
    else:
        windows = bounds
    for e, lo, w in windows:
        matmul_into(x if shared else x[lo:w], w_gate_up[e], gu[lo:w])  # G|U = x [Wg; Wu]^T
    g, u = gu[:rows, :f], gu[:rows, f:]
    sigmoid(g, out=sig)  # sigma(G)   [C, F]
    hc = h[:rows]
    np.multiply(g, sig, out=hc)  # SiLU: silu(G) = G sigma(G)
    hc *= u  # h = s(G) . U
    for e, lo, w in windows:
        matmul_into(h[lo:w], w_down[e], out[lo:w])  # Down(h) = h Wd^T
    return out[:rows]


# OpenBLAS computes a product's rows in blocks of 4: on the expert products (a few rows
# times a large weight) 5, 6 or 7 rows cost more than 8 (measured, float32 on AVX2: 7 rows
# x [2048, 256] 240 us, 8 rows 155 us), because each call repacks the whole weight and
# the left-over rows run a slow path. So those products run on row counts padded to a
# multiple of ROW_BLOCK (one row stays one row: a matrix-vector product, faster still).
ROW_BLOCK = 4


def _row_window(lo: int, hi: int) -> int:
    """End of the padded row window [lo, end) that covers rows [lo, hi)."""
    n = hi - lo
    return hi if n == 1 else lo + -(-n // ROW_BLOCK) * ROW_BLOCK


def padded_rows(
    ws: Workspace | None, key: str, rows: int, cols: int, dtype: np.dtype
) -> np.ndarray:
    """A buffer [C + ROW_BLOCK - 1, cols] for C = ``rows`` rows whose ROW_BLOCK - 1 extra
    rows are zero (made so; callers write only the first C rows): the operand of the
    experts' products on padded row windows."""
    return buffer(ws, key, (rows + ROW_BLOCK - 1, cols), dtype, zero=True)


def swiglu_dout_buffer(
    rows: int, hidden: int, dtype: np.dtype, ws: Workspace | None = None, key: str = ""
) -> np.ndarray:
    """The buffer ``swiglu_backward`` reads its upstream gradient from (``padded_rows``,
    [C + ROW_BLOCK - 1, H]). A caller that writes dout into its first C rows (and hands
    the buffer over as ``dout_padded``) saves ``swiglu_backward`` a copy."""
    return padded_rows(ws, key + "dout", rows, hidden, dtype)


def swiglu_backward(
    dout: np.ndarray,
    cache: SwiGLUCache,
    w_gate_up: np.ndarray,
    w_down: np.ndarray,
    dw_gate_up: np.ndarray,
    dw_down: np.ndarray,
    ws: Workspace | None = None,
    key: str = "",
    *,
    overwrite: bool = False,
    fused: FusedBackward | None = None,
    dout_padded: np.ndarray | None = None,
) -> np.ndarray:
    """SwiGLU backward, per expert for the products:
    dh = dout Wd; dWd += dout^T h; dG = dh . U . s'(G); dU = dh . s(G);
    dx = dG Wg + dU Wu = [dG dU] [Wg; Wu]; dWg += dG^T x; dWu += dU^T x (one product each
    with gate|up fused), with the SiLU derivative s'(x) = sigma(x) (1 + x (1 - sigma(x))).
    Weights and their gradients in the stored (transposed) layout of ``swiglu_forward``.
    dout [C, H] -> dx [C, H]. ``dout_padded``: a ``swiglu_dout_buffer`` whose first C
    rows are dout (the caller gathered it there): used as it is, dout is not copied.
    ``fused``: the element-wise line by its compiled ``swiglu_grad``.
    """
    x, bounds, gu, sig, h = cache
    if w_gate_up.ndim == 2:  # a single expert
        w_gate_up, w_down = w_gate_up[None], w_down[None]
        dw_gate_up, dw_down = dw_gate_up[None], dw_down[None]
    rows, f = h.shape
    hidden = x.shape[1]
    dt = x.dtype
    if overwrite and len(bounds) < dw_down.shape[0]:  # experts that got no rows: dW = 0
        for e in set(range(dw_down.shape[0])) - {b[0] for b in bounds}:
            dw_gate_up[e].fill(0)
            dw_down[e].fill(0)
    # The products whose rows are the expert's rows (dh, dx) run on ROW_BLOCK-padded row
    # windows: the buffers carry ROW_BLOCK - 1 zero rows past the end, and a window's
    # extra rows (the next expert's, computed again in its turn) are overwritten later.
    pad = ROW_BLOCK - 1
    dout_p = dout_padded  # [C + pad, H]
    if dout_p is None:
        dout_p = swiglu_dout_buffer(rows, hidden, dt, ws, key)
        np.copyto(dout_p[:rows], dout)
    dout = dout_p[:rows]
    dh = buffer(ws, key + "dh", (rows + pad, f), dt)  # [C + pad, F]
    wd = w_down.transpose(0, 2, 1)  # [E, H, F] each expert's Wd (views)
    h_t = h.T  # [F, C]
    windows = [(e, lo, hi, _row_window(lo, hi)) for e, lo, hi in bounds]
    key_dwd = key + "dwd"
    for e, lo, hi, w in windows:
        matmul_into(dout_p[lo:w], wd[e], dh[lo:w])  # dh = dout Wd
        # dWd^T += h^T dout
        weight_grad(h_t[:, lo:hi], dout[lo:hi], dw_down[e], overwrite, ws, key_dwd)
    dgu_p = padded_rows(ws, key + "dgu", rows, 2 * f, dt)  # [C + pad, 2F]
    dgu = dgu_p[:rows]  # [C, 2F]; the pad rows stay 0
    if fused is not None:
        fused.swiglu_grad(gu, sig, dh, dgu)  # the lines below, in one pass
    else:
        g, u = gu[:, :f], gu[:, f:]
        dg, du = dgu[:, :f], dgu[:, f:]
        np.multiply(g, sig, out=du)  # s(G) = G sigma(G)
        np.subtract(1, sig, out=dg)
        dg *= du
        dg += sig  # s'(G) = sigma(G) (1 + G (1 - sigma(G))) = sigma(G) + s(G) (1 - sigma(G))
        dg *= u  # U . s'(G)
        dgu2 = dgu.reshape(rows, 2, f)  # [C, 2, F]: both halves times dh in one pass
        dgu2 *= dh[:rows, None]  # dG = dh . U . s'(G);  dU = dh . s(G)
    dx = buffer(ws, key + "dx", (rows + pad, hidden), dt)  # [C + pad, H]
    wgu = w_gate_up.transpose(0, 2, 1)  # [E, 2F, H] each expert's [Wg; Wu] (views)
    x_t = x.T  # [H, C]
    key_dwgu = key + "dwgu"
    for e, lo, hi, w in windows:
        # [dWg dWu]^T += x^T [dG dU]
        weight_grad(x_t[:, lo:hi], dgu[lo:hi], dw_gate_up[e], overwrite, ws, key_dwgu)
        matmul_into(dgu_p[lo:w], wgu[e], dx[lo:w])  # dx = [dG dU] [Wg; Wu]
    return dx[:rows]
