"""The decoding arrangements (attention_step, moe_step, block_step, top_k_few) and the
reworked shared helpers against the batch functions and the formulas."""

from __future__ import annotations

import numpy as np
import pytest

from nn_core import Config, MoETransformer
from nn_core.model import layers as layers_mod
from nn_core.model import moe as moe_mod
from nn_core.model.attention import (
    KVCache,
    attention_forward,
    attention_step,
    attention_step_buffers,
    build_rope,
)
from nn_core.model.blas import blas_threads, current_threads
from nn_core.model.block import block_forward, block_step, block_step_buffers
from nn_core.model.layers import (
    ROW_BLOCK,
    expert_bounds,
    linear_forward,
    rmsnorm_forward,
    rmsnorm_into,
    swiglu_forward,
    swiglu_rows,
)
from nn_core.model.moe import (
    FEW_ASSIGNMENTS,
    MoEWeights,
    moe_forward,
    moe_step,
    moe_step_buffers,
    router_forward,
    top_k_few,
)
from nn_core.model.tensor import exp_shifted, softmax
from nn_core.model.workspace import Workspace

TOL = {np.float64: 1e-12, np.float32: 2e-5}


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-300))


# ---- top-k in Python == the argsorts -----------------------------------------------------


def _argsort_reference(probs_t: np.ndarray, top_k: int):
    """What router_forward's NumPy path computes: kept flat indices, order, counts."""
    n_experts, n = probs_t.shape
    top_t = np.argsort(-probs_t, axis=0, kind="stable")[:top_k]  # [K, N]
    kept = (top_t * n + np.arange(n)).reshape(-1)
    flat = top_t.reshape(-1)
    return (
        kept.tolist(),
        np.argsort(flat, kind="stable").tolist(),
        np.bincount(flat, minlength=n_experts).tolist(),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_k_few_equals_the_argsorts_including_ties(dtype):
    rng = np.random.default_rng(0)
    for trial in range(300):
        n_experts = int(rng.integers(2, 7))
        n = int(rng.integers(1, 9))
        top_k = int(rng.integers(1, n_experts + 1))
        # few distinct values: many exact ties, also across experts of one token
        probs_t = rng.integers(0, 3, (n_experts, n)).astype(dtype) / 4
        if trial % 3 == 0:
            probs_t = rng.random((n_experts, n)).astype(dtype)
        got = top_k_few(probs_t, top_k)
        assert got is not None
        assert list(got) == list(_argsort_reference(probs_t, top_k)), (n_experts, n, top_k)


def test_top_k_few_declines_nan():
    probs_t = np.array([[0.5, np.nan], [0.5, 0.2]])
    assert top_k_few(probs_t, 1) is None
    assert top_k_few(probs_t[:, 1:], 1) is None  # one token


def _routing_fields(r):
    return [np.asarray(f) for f in r]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, FEW_ASSIGNMENTS // 2, FEW_ASSIGNMENTS // 2 + 1, 20])
def test_router_forward_python_and_numpy_paths_agree_exactly(monkeypatch, n, dtype):
    """N*K on both sides of FEW_ASSIGNMENTS; ties from rows of zeros (equal logits)."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 8)).astype(dtype)
    x[::3] = 0  # every expert's logit 0: a four-way tie, broken to the lower index
    w = rng.standard_normal((4, 8)).astype(dtype)
    few = router_forward(x, w, 2)
    monkeypatch.setattr(moe_mod, "FEW_ASSIGNMENTS", -1)  # always the argsorts
    ref = router_forward(x, w, 2)
    for a, b in zip(_routing_fields(few), _routing_fields(ref)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert ref.top_idx[0].tolist() == [0, 1]  # the tie of row 0


def test_router_forward_with_nan_input_takes_the_numpy_path():
    x = np.full((1, 4), np.nan)
    r = router_forward(x, np.ones((3, 4)), 2)
    assert np.isnan(r.weights).all()


# ---- moe_step == moe_forward --------------------------------------------------------------


def _moe_weights(rng, e, h, f, dtype):
    return MoEWeights(
        rng.standard_normal((e, h)).astype(dtype),
        (rng.standard_normal((e, h, 2 * f)) / np.sqrt(h)).astype(dtype),
        (rng.standard_normal((e, f, h)) / np.sqrt(f)).astype(dtype),
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("n", "top_k"), [(1, 1), (1, 2), (1, 4), (3, 2), (8, 2)])
def test_moe_step_equals_moe_forward(n, top_k, dtype):
    rng = np.random.default_rng(10 * n + top_k)
    h, e, f = 16, 5, 12
    w = _moe_weights(rng, e, h, f, dtype)
    b = moe_step_buffers(n, h, e, top_k, f, dtype)
    for _ in range(5):  # reused buffers
        x = rng.standard_normal((n, h)).astype(dtype)
        ref, _ = moe_forward(x, w, top_k)
        got = moe_step(x, w, top_k, b)
        assert _rel(got, ref) < TOL[dtype]


def test_moe_step_with_nan_input_matches_moe_forward():
    rng = np.random.default_rng(1)
    w = _moe_weights(rng, 4, 8, 6, np.float64)
    x = np.full((1, 8), np.nan)
    got = moe_step(x, w, 2, moe_step_buffers(1, 8, 4, 2, 6, np.float64))
    assert np.isnan(got).all() and np.isnan(moe_forward(x, w, 2)[0]).all()


# ---- attention_step == attention_forward with S = 1 ---------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("batch", "n_heads", "n_kv"), [(1, 4, 1), (2, 4, 1), (1, 4, 2), (3, 6, 3)])
def test_attention_step_equals_attention_forward(batch, n_heads, n_kv, dtype):
    rng = np.random.default_rng(batch * 100 + n_heads * 10 + n_kv)
    h, d, max_len, prompt = 16, 8, 12, 5
    rope = build_rope(10000.0, d, max_len, np.dtype(dtype))
    w_qkv = (rng.standard_normal((h, (n_heads + 2 * n_kv) * d)) / 4).astype(dtype)
    w_o = (rng.standard_normal((n_heads * d, h)) / 4).astype(dtype)
    caches = [KVCache(1, batch, n_kv, d, max_len, np.dtype(dtype)) for _ in range(2)]
    x0 = rng.standard_normal((batch * prompt, h)).astype(dtype)
    for c in caches:  # the same prefill in both caches
        attention_forward(x0, batch, w_qkv, w_o, n_heads, n_kv, rope, 0, c.layers[0])
    b = attention_step_buffers(batch, h, n_heads, n_kv, d, np.dtype(dtype))
    for t in range(prompt, max_len):
        x = rng.standard_normal((batch, h)).astype(dtype)
        ref, _ = attention_forward(
            x, batch, w_qkv, w_o, n_heads, n_kv, rope, t, caches[0].layers[0]
        )
        got = attention_step(x, w_qkv, w_o, rope, t, caches[1].layers[0], b)
        assert _rel(got, ref) < TOL[dtype]
        assert _rel(caches[1].k[0][:, :, : t + 1], caches[0].k[0][:, :, : t + 1]) < TOL[dtype]
        np.testing.assert_array_equal(caches[1].v[0], caches[0].v[0])


# ---- block_step == block_forward, decode path == forward ---------------------------------


@pytest.mark.parametrize("batch", [1, 2, 9])  # 9 * K = 18 > FEW_ASSIGNMENTS: moe_forward
def test_block_step_equals_block_forward(batch):
    cfg = Config.tiny().replace(max_seq_len=16)
    model = MoETransformer(cfg, seed=3, dtype=np.float64)
    rng = np.random.default_rng(batch)
    caches = [model.new_kv_cache(batch, 16) for _ in range(2)]
    b = block_step_buffers(batch, cfg, np.dtype(np.float64))
    w = model.layer_weights[0]
    for t in range(6):
        x = rng.standard_normal((batch, cfg.hidden_dim))
        ref, _ = block_forward(x, batch, w, cfg, model.rope, t, caches[0].layers[0])
        got = block_step(x.copy(), w, cfg, model.rope, t, caches[1].layers[0], b)
        assert _rel(got, ref) < 1e-12


@pytest.mark.parametrize("batch", [1, 4])
def test_forward_cached_of_one_token_is_the_decode_path(batch):
    cfg = Config.tiny().replace(max_seq_len=16)
    model = MoETransformer(cfg, seed=5)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, 6))
    c1, c2 = model.new_kv_cache(batch, 16), model.new_kv_cache(batch, 16)
    model.forward_cached(ids[:, :5], c1)
    model.forward_cached(ids[:, :5], c2)
    a = model.forward_cached(ids[:, 5:], c1)  # [B, 1, V]
    b = model.decode_step(ids[:, 5], c2)  # [B, V]
    np.testing.assert_array_equal(a[:, 0], b)
    full = model.forward(ids)[:, 5]
    assert _rel(b, full) < 1e-5
    assert c1.length == c2.length == 6


# ---- shared helpers -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rmsnorm_into_one_row_as_1d_equals_2d_and_the_formula(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16)).astype(dtype)
    g = rng.standard_normal(16).astype(dtype)
    y, cache = rmsnorm_forward(x, g, 1e-6)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * g
    assert _rel(y, ref) < TOL[dtype]
    np.testing.assert_allclose(
        cache.r[:, 0] ** -2 - 1e-6, (x.astype(np.float64) ** 2).mean(-1), rtol=TOL[dtype] * 10
    )
    for i in range(3):
        r0, y0 = np.empty((), dtype), np.empty(16, dtype)
        rmsnorm_into(x[i], g, 1e-6, r0, y0)
        r1, y1 = np.empty((1, 1), dtype), np.empty((1, 16), dtype)
        rmsnorm_into(x[i : i + 1], g, 1e-6, r1, y1)
        assert _rel(y0, y[i]) < TOL[dtype] and _rel(y1[0], y[i]) < TOL[dtype]
        assert abs(r0 - cache.r[i, 0]) <= TOL[dtype] * cache.r[i, 0]


def test_softmax_of_1d_and_2d_and_masked_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(50)
    ref = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    np.testing.assert_allclose(softmax(x), ref, rtol=1e-14)
    e, m, s = exp_shifted(x)
    assert np.ndim(m) == 0 and np.ndim(s) == 0
    assert softmax(np.full(4, -np.inf)).tolist() == [0.0] * 4  # masked: zeros, not NaN
    x2 = np.stack([x[:5], np.full(5, -np.inf), np.full(5, np.nan)])
    p = softmax(x2)
    assert p[1].tolist() == [0.0] * 5 and np.isnan(p[2]).all()
    np.testing.assert_allclose(p[0], softmax(x[:5]), rtol=1e-14)


def test_swiglu_rows_with_one_shared_row_equals_swiglu_forward():
    rng = np.random.default_rng(0)
    e, h, f = 4, 8, 6
    wgu = rng.standard_normal((e, h, 2 * f))
    wd = rng.standard_normal((e, f, h))
    x = rng.standard_normal((1, h))
    counts = [1, 0, 1, 1]
    ref, _ = swiglu_forward(np.repeat(x, 3, axis=0), wgu, wd, counts)
    bufs = [np.empty((3, 2 * f)), np.empty((3, f)), np.empty((3, f)), np.empty((3, h))]
    got = swiglu_rows(x, wgu, wd, expert_bounds(counts), *bufs)
    np.testing.assert_allclose(got, ref, rtol=1e-13)


def _swiglu_formula(x, wgu, wd, counts):
    """out = Down(SiLU(Gate(x)) * Up(x)) per expert's block of rows, straight from the formula."""
    f = wd.shape[1]
    out, lo = np.empty_like(x), 0
    for e, c in enumerate(counts):
        gu = x[lo : lo + c] @ wgu[e]
        g, u = gu[:, :f], gu[:, f:]
        out[lo : lo + c] = (g / (1 + np.exp(-g)) * u) @ wd[e]
        lo += c
    return out


def test_swiglu_forward_on_padded_rows_equals_the_formula(monkeypatch):
    # x with ROW_BLOCK - 1 zero scratch rows: the products run on row windows padded to
    # multiples of ROW_BLOCK; results and cache are those of the C rows alone.
    rng = np.random.default_rng(0)
    e, h, f = 4, 8, 6
    wgu = rng.standard_normal((e, h, 2 * f))
    wd = rng.standard_normal((e, f, h))
    counts = [5, 0, 7, 2]
    rows = sum(counts)
    xp = np.zeros((rows + ROW_BLOCK - 1, h))
    xp[:rows] = rng.standard_normal((rows, h))
    windows = []
    real = layers_mod.matmul_into

    def spy(a, b, out):
        windows.append(a.shape[0])
        return real(a, b, out)

    monkeypatch.setattr(layers_mod, "matmul_into", spy)
    ws = Workspace()
    for _ in range(2):  # the second call reuses the workspace's buffers
        out, cache = swiglu_forward(xp, wgu, wd, counts, ws, "e.")
        np.testing.assert_allclose(out, _swiglu_formula(xp[:rows], wgu, wd, counts), rtol=1e-12)
    assert out.shape == (rows, h) and cache.x.shape == (rows, h)
    assert cache.gu.shape == (rows, 2 * f) and cache.h.shape == (rows, f)
    assert windows and all(w % ROW_BLOCK == 0 for w in windows)  # 5 -> 8, 7 -> 8, 2 -> 4
    _, ref_cache = swiglu_forward(xp[:rows].copy(), wgu, wd, counts)  # unpadded
    for got, ref in zip(cache[2:], ref_cache[2:]):
        np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_linear_forward_into_out_and_fresh():
    rng = np.random.default_rng(0)
    x, w_t = rng.standard_normal((5, 4)), rng.standard_normal((4, 3))
    out = np.empty((5, 3))
    assert linear_forward(x, w_t, out=out) is out
    np.testing.assert_allclose(out, x @ w_t, rtol=1e-14)
    np.testing.assert_allclose(linear_forward(x, w_t), x @ w_t, rtol=1e-14)


def test_blas_threads_lowers_and_restores():
    before = current_threads()
    if before is None:
        pytest.skip("no BLAS thread control here")
    with blas_threads(1):
        assert current_threads() == 1
        with blas_threads(1):  # nested: shares the limit
            assert current_threads() == 1
        assert current_threads() == 1
    assert current_threads() == before
    with blas_threads(None):
        assert current_threads() == before
