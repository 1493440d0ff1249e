"""The transformer block: h = x + Attention(RMSNorm_attn(x)); out = h + MoE(RMSNorm_ffn(h)).

Shape legend: B batch, S new positions, N = B*S tokens, H hidden.

``block_forward`` serves every forward (training, evaluation, prefill); ``block_step`` is
its arrangement for one new token per row on a KV cache (decoding): the same layer
helpers on buffers made once per batch size (``BlockStep``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .attention import (
    AttentionCache,
    AttentionStep,
    KVLayer,
    Rope,
    attention_backward,
    attention_forward,
    attention_step,
    attention_step_buffers,
)
from .config import Config
from .layers import FusedBackward, RMSNormCache, rmsnorm_backward, rmsnorm_forward, rmsnorm_into
from .moe import (
    FEW_ASSIGNMENTS,
    MoECache,
    MoEStep,
    MoEWeights,
    moe_backward,
    moe_forward,
    moe_step,
    moe_step_buffers,
)
from .workspace import Workspace, buffer


class BlockWeights(NamedTuple):
    attn_norm: np.ndarray  # [H]
    qkv: np.ndarray  # [H, Q + 2KV]  [Wq; Wk; Wv]^T (one slab of the flat buffer)
    o: np.ndarray  # [Q, H]  Wo^T
    ffn_norm: np.ndarray  # [H]
    moe: MoEWeights


class BlockCache(NamedTuple):
    n1: RMSNormCache
    attn: AttentionCache
    h: np.ndarray  # [N, H] the residual stream between the two sublayers
    n2: RMSNormCache
    moe: MoECache


def block_forward(
    x: np.ndarray,
    batch: int,
    w: BlockWeights,
    cfg: Config,
    rope: Rope,
    start: int = 0,
    kv: KVLayer | None = None,
    ws: Workspace | None = None,
    key: str = "",
    fused: FusedBackward | None = None,
) -> tuple[np.ndarray, BlockCache]:
    """Block: h = x + Attention(RMSNorm_attn(x)); out = h + MoE(RMSNorm_ffn(h)).

    x [N, H] -> (out [N, H], cache); the layer's routing (for the aux loss) is
    cache.moe.routing. ``x`` is not modified. ``fused``: the training forward's compiled
    experts (``layers.FusedBackward.experts``), None for NumPy.
    """
    a, n1 = rmsnorm_forward(x, w.attn_norm, cfg.rms_eps, ws, key + "n1.")
    attn_out, attn = attention_forward(
        a, batch, w.qkv, w.o, cfg.n_heads, cfg.n_kv_heads, rope, start, kv, ws, key + "attn."
    )
    h = np.add(x, attn_out, out=buffer(ws, key + "h", x.shape, x.dtype))
    m, n2 = rmsnorm_forward(h, w.ffn_norm, cfg.rms_eps, ws, key + "n2.")
    moe_out, moe = moe_forward(m, w.moe, cfg.top_k_experts, ws, key + "moe.", fused)
    out = np.add(h, moe_out, out=buffer(ws, key + "out", x.shape, x.dtype))
    return out, BlockCache(n1, attn, h, n2, moe)


class BlockStep(NamedTuple):
    """The arrays ``block_step`` writes for B rows (every layer reuses them in turn)."""

    r: np.ndarray  # [B, 1] RMSNorm's 1/sqrt(mean(x^2) + eps)
    normed: np.ndarray  # [B, H] RMSNorm's output
    attn: AttentionStep
    moe: MoEStep | None  # None when B*K > FEW_ASSIGNMENTS: moe_forward on a workspace
    r_row: np.ndarray | None  # B = 1: r seen as 0-d, normed as [H] (views; else None)
    normed_row: np.ndarray | None


def block_step_buffers(batch: int, cfg: Config, dtype: np.dtype) -> BlockStep:
    """Buffers of ``block_step`` for ``batch`` rows."""
    h, k = cfg.hidden_dim, cfg.top_k_experts
    few = batch * k <= FEW_ASSIGNMENTS
    r, normed = np.empty((batch, 1), dtype), np.empty((batch, h), dtype)
    one = batch == 1
    return BlockStep(
        r,
        normed,
        attention_step_buffers(batch, h, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, dtype),
        moe_step_buffers(batch, h, cfg.n_experts, k, cfg.ffn_dim, dtype) if few else None,
        r.reshape(()) if one else None,
        normed[0] if one else None,
    )


def step_rmsnorm(x: np.ndarray, gain: np.ndarray, eps: float, b: BlockStep) -> np.ndarray:
    """RMSNorm of the rows x [B, H] into ``b.normed`` (one row: as 1-D arrays, which skips
    NumPy's broadcasting machinery). Returns b.normed [B, H]."""
    if b.r_row is None or b.normed_row is None:
        rmsnorm_into(x, gain, eps, b.r, b.normed)
    else:
        rmsnorm_into(x[0], gain, eps, b.r_row, b.normed_row)
    return b.normed


def block_step(
    x: np.ndarray,
    w: BlockWeights,
    cfg: Config,
    rope: Rope,
    start: int,
    kv: KVLayer,
    b: BlockStep,
    ws: Workspace | None = None,
    key: str = "",
) -> np.ndarray:
    """Block for one new token per row at position ``start`` (decoding):
    h = x + Attention(RMSNorm_attn(x)); out = h + MoE(RMSNorm_ffn(h)).

    x [B, H], updated in place (the residual stream) and returned. Equal to
    ``block_forward`` with S = 1 on the same cache, to float rounding. ``ws``/``key``:
    the MoE's workspace when B*K is above FEW_ASSIGNMENTS.
    """
    a = step_rmsnorm(x, w.attn_norm, cfg.rms_eps, b)
    x += attention_step(a, w.qkv, w.o, rope, start, kv, b.attn)  # h = x + Attention(...)
    m = step_rmsnorm(x, w.ffn_norm, cfg.rms_eps, b)
    if b.moe is None:
        x += moe_forward(m, w.moe, cfg.top_k_experts, ws, key + "moe.")[0]
    else:
        x += moe_step(m, w.moe, cfg.top_k_experts, b.moe)  # out = h + MoE(RMSNorm_ffn(h))
    return x


def block_backward(
    dout: np.ndarray,
    cache: BlockCache,
    w: BlockWeights,
    dw: BlockWeights,
    cfg: Config,
    rope: Rope,
    alpha: float,
    fractions: np.ndarray | None = None,
    ws: Workspace | None = None,
    key: str = "",
    *,
    overwrite: bool = False,
    fused: FusedBackward | None = None,
) -> np.ndarray:
    """Block backward, each sublayer's backward before its norm's:
    dh = dout + n2_backward(M_backward(dout)); dx = dh + n1_backward(A_backward(dh)).
    ``fractions``: the aux loss's f_e [E] if not this batch's own (see moe.aux_loss).
    ``overwrite``: write the parameter gradients instead of adding them (layers.py).
    ``fused``: compiled element-wise lines (``layers.FusedBackward``), None for NumPy.
    """
    ow = overwrite
    dm = moe_backward(
        dout,
        cache.moe,
        w.moe,
        dw.moe,
        alpha,
        fractions,
        ws,
        key + "moe.",
        overwrite=ow,
        fused=fused,
    )
    dh = rmsnorm_backward(
        dm, cache.n2, w.ffn_norm, dw.ffn_norm, ws, key + "n2.", overwrite=ow, fused=fused
    )
    dh += dout
    da = attention_backward(
        dh,
        cache.attn,
        w.qkv,
        w.o,
        dw.qkv,
        dw.o,
        cfg.n_heads,
        cfg.n_kv_heads,
        rope,
        ws,
        key + "attn.",
        overwrite=ow,
    )
    dx = rmsnorm_backward(
        da, cache.n1, w.attn_norm, dw.attn_norm, ws, key + "n1.", overwrite=ow, fused=fused
    )
    dx += dh
    return dx
