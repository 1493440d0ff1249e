"""The hardware floor: analytic FLOP counts, this machine's GEMM rate and copy bandwidth.

Shape legend: B batch, S sequence, N = B*S tokens, H hidden_dim, nH n_heads,
nKV n_kv_heads, D head_dim, Q = nH*D, KV = nKV*D, E n_experts, K top_k_experts,
F ffn_dim, V vocab_size, L n_layers, P parameter count.

The floor of a scenario is the time this machine needs for the scenario's
unavoidable work if every matrix product ran at the rate of one large,
well-shaped float32 GEMM and every byte the optimizer must move streamed at the
measured copy bandwidth:

    floor_ns    = matmul_flops / gemm_rate  +  optimizer_bytes / bandwidth
    floor_ratio = median_ns / floor_ns            (1.0 = at the floor; larger = slower)

Only matrix products are counted (2*m*n*k each). Element-wise work (softmax,
RMSNorm, SiLU, RoPE, the loss) is left out: it is memory- and call-bound, and
leaving it out keeps the floor a lower bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from ..model.config import Config

# AdamW per parameter (docs/training.md, section 4): reads p, g, m, v and writes p, m, v.
ADAMW_READS = 4
ADAMW_WRITES = 3
# Global-norm clipping reads every gradient once for the norm; the rescale (only when
# norm > clip) is not counted, so the floor stays a lower bound.
CLIP_READS = 1
OPTIMIZER_STREAMS = ADAMW_READS + ADAMW_WRITES + CLIP_READS  # 8 arrays of P elements

# Attention scores and P@V are counted over the full S x S square: the dense masked
# product that a batched-GEMM implementation performs (a causal kernel could skip
# about half). At the benchmark's S <= 64 the difference is below 2% of the total.
ATTENTION_COUNTS_FULL_SQUARE = True


@dataclass(frozen=True)
class FlopCount:
    """Matmul FLOPs of one forward pass, by product (totals over all layers)."""

    qkv: int  # 2*N*H*(Q + 2*KV) per layer:  X[N,H] @ [Wq; Wk; Wv]^T
    attn_scores: int  # 2*B*nH*S*S*D per layer:  q k^T  (full square)
    attn_values: int  # 2*B*nH*S*S*D per layer:  P v    (full square)
    o_proj: int  # 2*N*Q*H per layer:  O[N,Q] @ Wo^T
    router: int  # 2*N*H*E per layer:  X[N,H] @ Wr^T
    experts: int  # 3 * 2*N*K*H*F per layer: gate, up, down for the top_k experts only
    lm_head: int  # 2*N*H*V once

    @property
    def total(self) -> int:
        return (
            self.qkv
            + self.attn_scores
            + self.attn_values
            + self.o_proj
            + self.router
            + self.experts
            + self.lm_head
        )

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def forward_flops(cfg: Config, batch: int, seq: int, *, causal_half: bool = False) -> FlopCount:
    """Matmul FLOPs of one forward pass of ``cfg`` on [batch, seq] token ids.

    ``causal_half=True`` counts only the S*(S+1)/2 query-key pairs the causal mask keeps.
    """
    n = batch * seq  # N tokens
    h, q, kv, d = cfg.hidden_dim, cfg.q_dim, cfg.kv_dim, cfg.head_dim
    pairs = seq * (seq + 1) // 2 if causal_half else seq * seq  # (query, key) pairs per head
    layers = cfg.n_layers
    return FlopCount(
        qkv=layers * 2 * n * h * (q + 2 * kv),
        attn_scores=layers * 2 * batch * cfg.n_heads * pairs * d,
        attn_values=layers * 2 * batch * cfg.n_heads * pairs * d,
        o_proj=layers * 2 * n * q * h,
        router=layers * 2 * n * h * cfg.n_experts,
        experts=layers * 3 * 2 * n * cfg.top_k_experts * h * cfg.ffn_dim,
        lm_head=2 * n * h * cfg.vocab_size,
    )


def train_step_flops(cfg: Config, batch: int, seq: int) -> int:
    """Forward + backward matmul FLOPs: backward = 2 x forward (dX and dW per product)."""
    return 3 * forward_flops(cfg, batch, seq).total


def optimizer_bytes(n_params: int, itemsize: int = 4) -> int:
    """Bytes the optimizer must move per step: OPTIMIZER_STREAMS arrays of P elements."""
    return OPTIMIZER_STREAMS * n_params * itemsize


def optimizer_working_set(n_params: int, itemsize: int = 4) -> int:
    """Bytes of p, g, m, v: the memory the optimizer sweeps (sizes the bandwidth probe)."""
    return 4 * n_params * itemsize


def floor_ns(
    flops: int,
    gemm_flops_per_sec: float,
    moved_bytes: int = 0,
    bandwidth_bytes_per_sec: float | None = None,
) -> float:
    """floor_ns = flops / gemm_rate + moved_bytes / bandwidth, in nanoseconds."""
    if gemm_flops_per_sec <= 0:
        raise ValueError(f"gemm_flops_per_sec must be > 0, got {gemm_flops_per_sec}")
    ns = flops / gemm_flops_per_sec * 1e9
    if moved_bytes:
        if not bandwidth_bytes_per_sec or bandwidth_bytes_per_sec <= 0:
            raise ValueError(
                f"bandwidth_bytes_per_sec must be > 0 when moved_bytes > 0, "
                f"got {bandwidth_bytes_per_sec}"
            )
        ns += moved_bytes / bandwidth_bytes_per_sec * 1e9
    return ns


def floor_ratio(median_ns: float, floor: float) -> float:
    """median / floor: how many times slower than the floor this run was."""
    return median_ns / floor


# ---------------------------------------------------------------------------- measured rates


def measure_gemm_rate(n: int = 1024, threads: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of C = A @ B^T, float32 [n, n] x [n, n], best of ``repeats`` after one warm-up.

    ``threads`` caps the BLAS pool (threadpoolctl); None leaves it as it is.
    """
    rng = np.random.default_rng(42)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    with threadpool_limits(limits=threads, user_api="blas"):
        np.matmul(a, b.T, out=c)  # warm-up: page in c, spin up the BLAS threads
        best = min(_timed(lambda: np.matmul(a, b.T, out=c)) for _ in range(repeats))
    return 2.0 * n**3 / (best * 1e-9)


def measure_copy_bandwidth(working_set: int, threads: int = 1, repeats: int = 5) -> float:
    """Bytes/s of np.copyto over a working set of ``working_set`` bytes (src + dst halves).

    Counts read + write bytes (2 x the copied array), the same bookkeeping as
    ``optimizer_bytes``. Each sample copies the arrays enough times to last about
    5 ms, so cache-sized working sets are measured in steady state and thread
    dispatch is amortized; ``threads`` > 1 copies contiguous slices concurrently
    (NumPy releases the GIL in large copies). Best of ``repeats`` samples.
    """
    n = max(working_set // 2 // 4, 1024)  # float32 elements per array
    src = np.ones(n, dtype=np.float32)
    dst = np.zeros(n, dtype=np.float32)
    bounds = np.linspace(0, n, threads + 1).astype(np.int64)
    slices = [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    np.copyto(dst, src)  # page in both arrays
    one = _timed(lambda: np.copyto(dst, src))
    passes = max(1, min(1000, 5_000_000 // one))  # copies per sample: about 5 ms

    def copy_slice(s: slice) -> None:
        d, r = dst[s], src[s]
        for _ in range(passes):
            np.copyto(d, r)

    if threads == 1:
        best = min(_timed(lambda: copy_slice(slice(None))) for _ in range(repeats))
    else:
        from concurrent.futures import ThreadPoolExecutor  # the floor's child process only

        with ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(lambda s: None, slices))  # start the threads
            best = min(_timed(lambda: list(ex.map(copy_slice, slices))) for _ in range(repeats))
    return 2.0 * n * 4 * passes / (best * 1e-9)


def _timed(fn: Callable[[], object]) -> int:
    t0 = time.perf_counter_ns()
    fn()
    return max(time.perf_counter_ns() - t0, 1)
