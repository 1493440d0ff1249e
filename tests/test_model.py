"""The whole model: exact gradients, causality, determinism, init, bad input, KV cache."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from gradcheck import check_gradient

import nn_core
from nn_core import Config, InputError, MoETransformer
from nn_core.model.moe import aux_loss, router_forward

# Small but complete: GQA (2 kv heads), NTK RoPE, 3 of 5 experts, two layers.
SMALL = Config(
    hidden_dim=16,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=4,
    n_experts=5,
    top_k_experts=3,
    ffn_dim=12,
    vocab_size=40,
    max_seq_len=16,
    rope_alpha=2.0,
)


def batch(cfg, b=2, s=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (b, s)), rng.integers(0, cfg.vocab_size, (b, s))


@pytest.mark.parametrize("cfg", [SMALL, Config.tiny()], ids=["small-gqa-ntk", "tiny"])
def test_loss_and_grad_matches_finite_differences_on_every_tensor(cfg):
    """Every parameter tensor, router included, on sampled coordinates: 1e-5 relative."""
    model = MoETransformer(cfg, seed=3, dtype=np.float64)
    ids, targets = batch(cfg, s=5)
    alpha = 0.05
    model.loss_and_grad(ids, targets, aux_loss_weight=alpha)
    grads = {k: v.copy() for k, v in model.gradients().items()}

    def loss():
        return model.loss_terms(ids, targets, aux_loss_weight=alpha).total

    worst = {}
    for name, param in model.parameters().items():
        worst[name] = check_gradient(loss, param, grads[name], coords=4, seed=len(name))
    assert max(worst.values()) < 1e-5, worst
    assert np.abs(grads["layers.0.moe.router.weight"]).max() > 0  # the router learns


def test_loss_terms_add_up_and_match_forward():
    model = MoETransformer(SMALL, seed=1, dtype=np.float64)
    ids, targets = batch(SMALL)
    terms = model.loss_and_grad(ids, targets, 0.01)
    parts = model.loss_terms(ids, targets, 0.01)
    assert terms == pytest.approx(parts.total, rel=1e-15)
    assert parts.total == pytest.approx(parts.ce + parts.aux, rel=1e-15)
    logits = model.forward(ids).reshape(-1, SMALL.vocab_size)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert parts.ce == pytest.approx(
        -logp[np.arange(logp.shape[0]), targets.ravel()].mean(), rel=1e-13
    )
    assert model.loss_terms(ids, targets, 0.0).aux == 0.0  # aux without weight is zero
    e, k, n_layers = SMALL.n_experts, SMALL.top_k_experts, SMALL.n_layers
    low, high = aux_bounds(0.01, e, k)
    assert n_layers * low * (1 - 1e-12) <= parts.aux <= n_layers * high * (1 + 1e-12)


def aux_bounds(alpha: float, e: int, k: int) -> tuple[float, float]:
    """Bounds of one layer's aux loss L = alpha E sum_e f_e P_e (any routing, any input).

    f_e = c_e / (N K), c_e = tokens keeping expert e; P_e = (1/N) sum_t p_te.
    Upper: a token keeps an expert at most once, so c_e <= N and f_e <= 1/K; hence
    sum_e f_e P_e <= (1/K) sum_e P_e = 1/K and L <= alpha E / K.
    Lower: let a_e = tokens whose most probable expert is e (sum_e a_e = N). That
    expert is kept, so c_e >= a_e, and its probability is a maximum, >= the mean 1/E,
    so P_e >= a_e / (N E). Then sum_e f_e P_e >= sum_e a_e^2 / (N^2 K E)
    >= (N^2 / E) / (N^2 K E) (Cauchy-Schwarz: sum a_e^2 >= (sum a_e)^2 / E), and
    L >= alpha / (E K).
    (L >= alpha is NOT true in general: see test_aux_loss_bounds_hold_and_alpha_is_not_one.)
    """
    return alpha / (e * k), alpha * e / k


def test_aux_loss_bounds_hold_and_alpha_is_not_one():
    alpha = 0.01
    # E=2, K=1: three tokens barely prefer expert 0 (p ~ 1/2), one is sure of expert 1.
    # f = (3/4, 1/4), P ~ (3/8, 5/8): L ~ alpha * 2 * (9/32 + 5/32) = 0.875 alpha < alpha.
    w_router = np.array([[1e-9, 1e-9, 1e-9, 0.0], [0.0, 0.0, 0.0, 40.0]])  # [E=2, H=4]
    routing = router_forward(np.eye(4), w_router, 1)
    assert routing.counts.tolist() == [3, 1]
    assert aux_loss(routing, alpha) == pytest.approx(0.875 * alpha, rel=1e-8)
    # the bounds on random routings, including very peaked ones
    rng = np.random.default_rng(0)
    for e, k in [(2, 1), (4, 1), (4, 2), (5, 3), (8, 2), (3, 3)]:
        low, high = aux_bounds(alpha, e, k)
        for scale in (0.1, 1.0, 10.0, 100.0):
            x = rng.normal(size=(int(rng.integers(1, 20)), 6))  # [N, H]
            aux = aux_loss(router_forward(x, scale * rng.normal(size=(e, 6)), k), alpha)
            assert low * (1 - 1e-12) <= aux <= high * (1 + 1e-12), (e, k, scale, aux)


def test_aux_loss_with_every_expert_kept_is_exactly_alpha_per_layer():
    # K = E: every f_e = 1/E, so L = alpha E sum_e P_e / E = alpha (sum_e P_e = 1)
    cfg = SMALL.replace(top_k_experts=SMALL.n_experts)
    model = MoETransformer(cfg, seed=2, dtype=np.float64)
    ids, targets = batch(cfg)
    aux = model.loss_terms(ids, targets, 0.03).aux
    assert aux == pytest.approx(0.03 * cfg.n_layers, rel=1e-13)


def test_two_backwards_accumulate_and_loss_and_grad_zeroes_first():
    model = MoETransformer(SMALL, seed=1, dtype=np.float64)
    ids, targets = batch(SMALL)
    model.loss_and_grad(ids, targets)
    once = model.flat_grads.copy()
    model.loss_and_grad(ids, targets)
    np.testing.assert_array_equal(model.flat_grads, once)  # zeroed, not accumulated
    model.zero_grad()
    assert not model.flat_grads.any()


def test_activation_checkpointing_gives_bitwise_identical_gradients():
    model = MoETransformer(Config.tiny(), seed=5)
    ids, targets = batch(Config.tiny(), s=16)
    plain = model.loss_terms_and_grad(ids, targets)
    g_plain = model.flat_grads.copy()
    ckpt = model.loss_terms_and_grad(ids, targets, activation_checkpointing=True)
    assert plain == ckpt
    np.testing.assert_array_equal(model.flat_grads, g_plain)


def test_causality_later_tokens_do_not_change_earlier_logits():
    model = MoETransformer(Config.tiny(), seed=0, dtype=np.float64)
    ids = np.arange(20).reshape(2, 10) * 7
    base = model.forward(ids)
    changed = ids.copy()
    changed[:, 6] = 999
    out = model.forward(changed)
    # equal to rounding: another token changes how many rows each expert's product has
    np.testing.assert_allclose(out[:, :6], base[:, :6], rtol=1e-12, atol=1e-12)
    assert not np.allclose(out[:, 6:], base[:, 6:])


def test_batch_rows_are_independent():
    model = MoETransformer(Config.tiny(), seed=0, dtype=np.float64)
    ids = np.arange(24).reshape(3, 8) * 11
    both = model.forward(ids)
    for b in range(3):
        np.testing.assert_allclose(
            model.forward(ids[b : b + 1])[0], both[b], rtol=1e-12, atol=1e-12
        )


def test_forward_output_shape_and_dtype():
    for dtype in (np.float32, np.float64):
        model = MoETransformer(Config.tiny(), seed=0, dtype=dtype)
        logits = model.forward(np.zeros((2, 3), dtype=np.int32))
        assert logits.shape == (2, 3, 1000) and logits.dtype == dtype
        assert np.isfinite(logits).all()


def test_same_seed_bitwise_identical_and_different_seed_differs():
    ids = np.arange(16).reshape(2, 8)
    a, b = MoETransformer(Config.tiny(), seed=7), MoETransformer(Config.tiny(), seed=7)
    np.testing.assert_array_equal(a.flat_params, b.flat_params)
    np.testing.assert_array_equal(a.forward(ids), b.forward(ids))
    c = MoETransformer(Config.tiny(), seed=8)
    assert not np.array_equal(a.flat_params, c.flat_params)
    # float32 and float64 models from one seed hold the same weights (float32 values)
    d = MoETransformer(Config.tiny(), seed=7, dtype=np.float64)
    np.testing.assert_array_equal(d.flat_params, a.flat_params.astype(np.float64))


def test_initialization_experts_and_layers_differ_with_kaiming_scale():
    cfg = Config.tiny()
    p = MoETransformer(cfg, seed=0).parameters()
    for i in range(cfg.n_layers):
        gate = p[f"layers.{i}.moe.gate_proj.weight"]
        for e in range(1, cfg.n_experts):
            assert not np.array_equal(gate[0], gate[e])
    assert not np.array_equal(p["layers.0.attn.q_proj.weight"], p["layers.1.attn.q_proj.weight"])
    assert (p["layers.0.attn_norm.weight"] == 1).all() and (p["final_norm.weight"] == 1).all()
    # std = sqrt(2 / fan_in): fan_in = H for the gate (64 x 4 x 256 draws), F for the down
    assert p["layers.0.moe.gate_proj.weight"].std() == pytest.approx(np.sqrt(2 / 64), rel=0.01)
    assert p["layers.0.moe.down_proj.weight"].std() == pytest.approx(np.sqrt(2 / 256), rel=0.01)
    assert p["embed.weight"].std() == pytest.approx(np.sqrt(2 / 64), rel=0.01)


def test_normal_draws_are_box_muller_of_the_generators_uniforms():
    """standard_normal_f32 against the transform written directly in float64 on the same
    uniforms, then the distribution: moments and tails of a standard normal."""
    from nn_core.model.tensor import standard_normal_f32

    z = standard_normal_f32(np.random.default_rng(5), 7)  # odd n: the last pair is cut
    u = np.random.default_rng(5).random(8, dtype=np.float32).astype(np.float64)
    radius, angle = np.sqrt(-2 * np.log(1 - u[:4])), 2 * np.pi * u[4:]
    want = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:7]
    assert z.dtype == np.float32 and z.shape == (7,)
    np.testing.assert_allclose(z, want, rtol=2e-6, atol=2e-6)
    big = standard_normal_f32(np.random.default_rng(0), 1_000_000).astype(np.float64)
    assert abs(big.mean()) < 0.005 and abs(big.std() - 1) < 0.005
    assert abs(np.mean(big**3)) < 0.02 and abs(np.mean(big**4) - 3) < 0.05  # skew, kurtosis
    assert abs(np.mean(np.abs(big) > 2) - 0.0455) < 0.002  # P(|z| > 2) of a normal
    assert np.abs(big).max() <= np.sqrt(2 * 24 * np.log(2)) + 1e-5


def test_parameter_names_shapes_and_flat_views():
    cfg = Config.tiny()
    model = MoETransformer(cfg)
    params, grads = model.parameters(), model.gradients()
    shapes = {k: v.shape for k, v in params.items()}
    assert shapes["embed.weight"] == (1000, 64)
    assert shapes["layers.1.attn.q_proj.weight"] == (64, 64)
    assert shapes["layers.1.attn.k_proj.weight"] == (16, 64)
    assert shapes["layers.1.attn.o_proj.weight"] == (64, 64)
    assert shapes["layers.0.moe.router.weight"] == (4, 64)
    assert shapes["layers.0.moe.gate_proj.weight"] == (4, 256, 64)
    assert shapes["layers.0.moe.down_proj.weight"] == (4, 64, 256)
    assert shapes["lm_head.weight"] == (1000, 64)
    assert len(params) == 2 + 10 * cfg.n_layers + 1
    assert sum(v.size for v in params.values()) == cfg.total_params() == model.flat_params.size
    for name in params:
        assert np.shares_memory(params[name], model.flat_params)
        assert np.shares_memory(grads[name], model.flat_grads)
    params["final_norm.weight"][0] = 3.0  # writable views into the flat buffer
    assert 3.0 in model.flat_params


def test_bad_token_ids_raise_input_errors_naming_the_argument():
    model = MoETransformer(Config.tiny())
    cases = {
        "negative": np.array([[1, -1]]),
        ">= vocab": np.array([[1, 1000]]),
        "float": np.array([[1.0, 2.0]]),
        "bool": np.array([[True, False]]),
        "1-d": np.array([1, 2, 3]),
        "3-d": np.zeros((1, 2, 3), dtype=int),
        "empty batch": np.zeros((0, 4), dtype=int),
        "empty seq": np.zeros((2, 0), dtype=int),
        "too long": np.zeros((1, 513), dtype=int),
    }
    for what, ids in cases.items():
        with pytest.raises(InputError, match="token_ids") as info:
            model.forward(ids)
        assert isinstance(info.value, ValueError), what
    ok = np.zeros((2, 4), dtype=int)
    with pytest.raises(InputError, match="targets"):
        model.loss_and_grad(ok, np.zeros((2, 5), dtype=int))
    with pytest.raises(InputError, match="targets"):
        model.loss_and_grad(ok, np.full((2, 4), -3))
    with pytest.raises(nn_core.ConfigError, match="dtype"):
        MoETransformer(Config.tiny(), dtype=np.float16)


def test_kv_cache_decoding_equals_full_forward():
    model = MoETransformer(SMALL, seed=2, dtype=np.float64)
    ids, _ = batch(SMALL, b=2, s=9)
    full = model.forward(ids)
    cache = model.new_kv_cache(batch_size=2, max_len=9)
    pieces = [model.forward_cached(ids[:, :4], cache)]  # prefill
    pieces += [model.forward_cached(ids[:, t : t + 1], cache) for t in range(4, 9)]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-12, atol=1e-12)
    assert cache.length == 9
    with pytest.raises(InputError, match="KV cache"):
        model.forward_cached(ids[:, :1], cache)


def test_concurrent_forwards_on_one_model_are_safe():
    model = MoETransformer(Config.tiny(), seed=0)
    inputs = [np.arange(32).reshape(2, 16) * (i + 1) % 1000 for i in range(4)]
    expected = [model.forward(x) for x in inputs]
    results: dict[int, np.ndarray] = {}

    def work(i):
        for _ in range(20):
            results[i] = model.forward(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        np.testing.assert_array_equal(results[i], expected[i])
