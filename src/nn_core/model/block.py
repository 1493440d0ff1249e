"""The transformer block: h = x + Attention(RMSNorm_attn(x)); out = h + MoE(RMSNorm_ffn(h)).

Shape legend: B batch, S new positions, N = B*S tokens, H hidden.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .attention import AttentionCache, KVLayer, Rope, attention_backward, attention_forward
from .config import Config
from .layers import RMSNormCache, rmsnorm_backward, rmsnorm_forward
from .moe import MoECache, MoEWeights, moe_backward, moe_forward
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
) -> tuple[np.ndarray, BlockCache]:
    """Block: h = x + Attention(RMSNorm_attn(x)); out = h + MoE(RMSNorm_ffn(h)).

    x [N, H] -> (out [N, H], cache); the layer's routing (for the aux loss) is
    cache.moe.routing. ``x`` is not modified.
    """
    a, n1 = rmsnorm_forward(x, w.attn_norm, cfg.rms_eps, ws, key + "n1.")
    attn_out, attn = attention_forward(
        a, batch, w.qkv, w.o, cfg.n_heads, cfg.n_kv_heads, rope, start, kv, ws, key + "attn."
    )
    h = np.add(x, attn_out, out=buffer(ws, key + "h", x.shape, x.dtype))
    m, n2 = rmsnorm_forward(h, w.ffn_norm, cfg.rms_eps, ws, key + "n2.")
    moe_out, moe = moe_forward(m, w.moe, cfg.top_k_experts, ws, key + "moe.")
    out = np.add(h, moe_out, out=buffer(ws, key + "out", x.shape, x.dtype))
    return out, BlockCache(n1, attn, h, n2, moe)


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
) -> np.ndarray:
    """Block backward, each sublayer's backward before its norm's:
    dh = dout + n2_backward(M_backward(dout)); dx = dh + n1_backward(A_backward(dh)).
    ``fractions``: the aux loss's f_e [E] if not this batch's own (see moe.aux_loss).
    ``overwrite``: write the parameter gradients instead of adding them (layers.py).
    """
    ow = overwrite
    dm = moe_backward(
        dout, cache.moe, w.moe, dw.moe, alpha, fractions, ws, key + "moe.", overwrite=ow
    )
    dh = rmsnorm_backward(dm, cache.n2, w.ffn_norm, dw.ffn_norm, ws, key + "n2.", overwrite=ow)
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
    dx = rmsnorm_backward(da, cache.n1, w.attn_norm, dw.attn_norm, ws, key + "n1.", overwrite=ow)
    dx += dh
    return dx
