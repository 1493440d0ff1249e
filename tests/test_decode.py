"""MoETransformer.decode_step: one new token per row on the KV cache equals the forward."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from nn_core import Config, InputError, MoETransformer
from nn_core.model.moe import router_forward


def decode_step(model, ids, cache, **kwargs):
    return model.decode_step(ids, cache, **kwargs)


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
    """Teacher-forced random ids for STEPS steps, batch 1 to 6, top_k 1 to 3."""
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
    for k, ref_k in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):  # same keys and values
        assert _rel_err(k, ref_k) < TOL[dtype]


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


def test_router_breaks_ties_to_the_lower_expert_index():
    """The router keeps the top-k by probability, exact ties to the lower index."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(40, 6))  # [N, E] router logits
    z[0] = [1.0, 2.0, 2.0, 0.0, 2.0, -1.0]  # ties: the lower index first
    z[1] = 0.5  # all equal
    for k in (1, 2, 3, 6):
        routing = router_forward(z, np.eye(6), k)  # x = z, Wr = I: logits x Wr^T = z
        for row, got in zip(routing.probs, routing.top_idx):
            want = sorted(range(6), key=lambda e: (-row[e], e))[:k]  # direct: by p, then index
            assert got.tolist() == want
    assert router_forward(z[:1], np.eye(6), 3).top_idx.tolist() == [[1, 2, 4]]


def test_non_finite_router_logits_give_nan_gates():
    z = np.array([[0.0, np.nan, 1.0, 2.0], [0.0, 1.0, np.inf, 2.0]])
    with np.errstate(invalid="ignore"):  # inf - inf, NaN products: expected here
        weights = router_forward(z, np.eye(4), 2).weights
    assert np.isnan(weights).all()  # visible, never a silent finite answer


def test_decode_reads_the_flat_buffer_views():
    model = MoETransformer(Config.tiny(), seed=1)
    w = model.layer_weights
    assert np.shares_memory(w[0].qkv, model.flat_params)
    np.testing.assert_array_equal(  # the slab is [Wq; Wk; Wv]^T
        w[0].qkv[:, : model.config.q_dim].T, model.parameters()["layers.0.attn.q_proj.weight"]
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
