"""Tests of nn_core.inference.decode: the one-token step equals the forward, piece by piece."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from nn_core import Config, InputError, MoETransformer
from nn_core.inference.decode import (
    decode_step,
    expert_work,
    moe_step,
    route_row,
    route_rows,
    step_weights,
)
from nn_core.model.moe import moe_forward, router_forward

# GQA (2 kv heads), NTK RoPE, 5 experts; top_k set per test.
GQA = Config(
    hidden_dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    n_experts=5,
    top_k_experts=3,
    ffn_dim=24,
    vocab_size=50,
    max_seq_len=64,
    rope_alpha=2.0,
)
CONFIGS = {
    "tiny": Config.tiny().replace(max_seq_len=64),
    "gqa-k3": GQA,
    "gqa-k1": GQA.replace(top_k_experts=1),
}
PROMPT_LEN, STEPS = 5, 40
# |decode_step - reference| / max|reference logit|
TOL = {np.float64: 1e-12, np.float32: 1e-5}


def _rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _prefilled(model: MoETransformer, prompt: np.ndarray, max_len: int):
    cache = model.new_kv_cache(prompt.shape[0], max_len)
    model.forward_cached(prompt, cache)
    return cache


# ---- the step equals the model -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("batch", [1, 3, 6])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_step_equals_forward_cached_and_forward(name, batch, dtype):
    """Teacher-forced random ids for STEPS steps. Batch 6 with top_k >= 2 takes the
    grouped-expert path (B*K > 2E), the other cases the per-(row, slot) path."""
    cfg = CONFIGS[name]
    model = MoETransformer(cfg, seed=3, dtype=dtype)
    rng = np.random.default_rng(batch)
    seq = rng.integers(0, cfg.vocab_size, (batch, PROMPT_LEN + STEPS))  # [B, T]
    ref_cache = _prefilled(model, seq[:, :PROMPT_LEN], PROMPT_LEN + STEPS)
    cache = _prefilled(model, seq[:, :PROMPT_LEN], PROMPT_LEN + STEPS)
    got, ref = [], []
    for t in range(PROMPT_LEN, PROMPT_LEN + STEPS):
        ref.append(model.forward_cached(seq[:, t : t + 1], ref_cache)[:, 0])
        got.append(decode_step(model, seq[:, t], cache))
        assert cache.length == t + 1
    got_a, ref_a = np.stack(got, axis=1), np.stack(ref, axis=1)  # [B, STEPS, V]
    assert got_a.dtype == dtype and got_a.shape == (batch, STEPS, cfg.vocab_size)
    assert _rel_err(got_a, ref_a) < TOL[dtype]
    full = model.forward(seq)[:, PROMPT_LEN:]  # the uncached model on the whole sequence
    assert _rel_err(got_a, full) < TOL[dtype]
    for layer, ref_layer in zip(cache.layers, ref_cache.layers):  # the same keys and values
        assert _rel_err(layer.k, ref_layer.k) < TOL[dtype]
        assert _rel_err(layer.v, ref_layer.v) < TOL[dtype]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_decoding_gives_the_same_tokens(name, batch):
    cfg = CONFIGS[name]
    model = MoETransformer(cfg, seed=11, dtype=np.float32)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, PROMPT_LEN))
    n_new = cfg.max_seq_len - PROMPT_LEN
    ref_cache = _prefilled(model, prompt, cfg.max_seq_len)
    cache = _prefilled(model, prompt, cfg.max_seq_len)
    ref_tok = tok = prompt[:, -1]
    ref_out, out = [], []
    for _ in range(n_new):
        ref_tok = model.forward_cached(ref_tok[:, None], ref_cache)[:, 0].argmax(-1)
        tok = decode_step(model, tok, cache, check_ids=False).argmax(-1)
        ref_out.append(ref_tok)
        out.append(tok)
    np.testing.assert_array_equal(np.stack(out), np.stack(ref_out))


def test_forward_cached_and_decode_step_share_one_cache():
    """Prefill, a few fast steps, a multi-token chunk, more fast steps == one forward."""
    model = MoETransformer(GQA, seed=5, dtype=np.float64)
    seq = np.random.default_rng(1).integers(0, GQA.vocab_size, (2, 20))
    cache = model.new_kv_cache(2, 20)
    pieces = [model.forward_cached(seq[:, :4], cache)]
    pieces += [decode_step(model, seq[:, t], cache)[:, None] for t in range(4, 9)]
    pieces.append(model.forward_cached(seq[:, 9:14], cache))
    pieces += [decode_step(model, seq[:, t], cache)[:, None] for t in range(14, 20)]
    assert _rel_err(np.concatenate(pieces, axis=1), model.forward(seq)) < 1e-12


# ---- the pieces ------------------------------------------------------------------------


def test_routing_equals_the_model_router_including_ties():
    """route_rows and route_row keep the model's experts and renormalized gate weights."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(40, 6))  # [N, E] router logits
    z[0] = [1.0, 2.0, 2.0, 0.0, 2.0, -1.0]  # ties: the lower index first
    z[1] = 0.5  # all equal
    for k in (1, 2, 3, 6):
        routing = router_forward(z, np.eye(6), k)  # x = z, Wr = I: logits x Wr^T = z
        top, gates = route_rows(z, k)
        np.testing.assert_array_equal(top, routing.top_idx)
        np.testing.assert_allclose(gates, routing.weights, rtol=1e-13, atol=1e-15)
        for row, want_top, want_w in zip(z.tolist(), routing.top_idx, routing.weights):
            experts, weights = zip(*route_row(row, k))
            assert list(experts) == want_top.tolist()
            np.testing.assert_allclose(weights, want_w, rtol=1e-13, atol=1e-15)


def test_non_finite_router_logits_give_nan_gates_as_in_the_model():
    z = np.array([[0.0, np.nan, 1.0, 2.0], [0.0, 1.0, np.inf, 2.0], [0.0, 1.0, 3.0, 2.0]])
    with np.errstate(invalid="ignore"):  # inf - inf, NaN products: expected here
        _, gates = route_rows(z, 2)
        model_weights = router_forward(z[:2], np.eye(4), 2).weights
    assert np.isnan(gates[:2]).all() and np.isfinite(gates[2]).all()
    assert np.isnan(model_weights).all()  # the model agrees
    for row in z[:2].tolist():
        assert all(np.isnan(w) for _, w in route_row(row, 2))


@pytest.mark.parametrize("batch", [1, 4, 5, 12])
def test_both_expert_paths_equal_the_model_moe(batch):
    """B*K <= 2E runs one unit per (row, slot), larger batches one unit per expert."""
    cfg = Config.tiny()  # E = 4, K = 2: per-slot up to batch 4
    model = MoETransformer(cfg, seed=9, dtype=np.float64)
    w = step_weights(model).layers[1].moe
    m = np.random.default_rng(batch).normal(size=(batch, cfg.hidden_dim))  # [B, H]
    z = m @ w.router.T
    units = list(expert_work(z, cfg.top_k_experts))
    per_slot = batch * cfg.top_k_experts <= 2 * cfg.n_experts
    assert all(isinstance(rows, slice) for _, rows, _ in units) == per_slot
    chosen = route_rows(z, cfg.top_k_experts)[0]  # [B, K]
    assert len(units) == (chosen.size if per_slot else len(np.unique(chosen)))
    ref, _ = moe_forward(m, w, cfg.top_k_experts)
    np.testing.assert_allclose(moe_step(m, w, cfg.top_k_experts), ref, rtol=1e-12, atol=1e-14)


def test_step_weights_are_views_of_the_flat_buffer():
    model = MoETransformer(Config.tiny(), seed=1)
    w = step_weights(model)
    assert np.shares_memory(w.layers[0].qkv, model.flat_params)
    np.testing.assert_array_equal(
        w.layers[0].qkv[: model.config.q_dim], model.parameters()["layers.0.attn.q_proj.weight"]
    )
    cache = model.new_kv_cache(1, 4)
    before = decode_step(model, [7], cache)
    model.parameters()["lm_head.weight"][:] *= 2  # an update shows through the views
    cache.length = 0
    np.testing.assert_allclose(decode_step(model, [7], cache), 2 * before, rtol=1e-6)


def test_silu_overflow_is_exact_and_silent():
    """A very negative gate pre-activation overflows exp(-G) to inf: SiLU is -0, no warning."""
    model = MoETransformer(Config.tiny().replace(max_seq_len=8), seed=2)
    for i in range(model.config.n_layers):
        model.parameters()[f"layers.{i}.moe.gate_proj.weight"][:] *= 1e3
    prompt = np.array([[1, 2, 3]])
    ref_cache, cache = _prefilled(model, prompt, 8), _prefilled(model, prompt, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = decode_step(model, [4], cache)
    ref = model.forward_cached([[4]], ref_cache)[:, 0]
    assert np.isfinite(got).all() and _rel_err(got, ref) < 1e-5


# ---- bad input -------------------------------------------------------------------------


def test_bad_ids_shapes_and_a_full_cache_raise_input_errors():
    model = MoETransformer(Config.tiny().replace(max_seq_len=8), seed=1)
    cache = model.new_kv_cache(2, 3)
    for bad in ([1, -1], [1, 1000]):
        with pytest.raises(InputError, match=r"token_ids must be in \[0, 1000\)"):
            decode_step(model, bad, cache)
    with pytest.raises(InputError, match="integer"):
        decode_step(model, [1.0, 2.0], cache)
    for shape_bad in ([1, 2, 3], [[1], [2]], 5):
        with pytest.raises(InputError, match=r"shape \[batch\] = \(2,\)"):
            decode_step(model, shape_bad, cache)
    assert cache.length == 0  # nothing was written
    for _ in range(3):
        decode_step(model, [1, 2], cache)
    with pytest.raises(InputError, match="KV cache holds 3 of 3 positions"):
        decode_step(model, [1, 2], cache)
