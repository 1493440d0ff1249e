"""Each layer's forward against a direct NumPy formula of docs/model.md, and its backward
against central finite differences in float64 (relative error below 1e-6)."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_gradient

from nn_core.model.attention import (
    attention_backward,
    attention_forward,
    build_rope,
    rope_rotate,
    rope_tables,
    rope_unrotate,
)
from nn_core.model.block import BlockWeights, block_backward, block_forward
from nn_core.model.config import Config, ntk_rope_base
from nn_core.model.layers import (
    embedding_backward,
    embedding_forward,
    linear_backward,
    linear_forward,
    rmsnorm_backward,
    rmsnorm_forward,
    swiglu_backward,
    swiglu_forward,
)
from nn_core.model.loss import cross_entropy_backward, cross_entropy_forward
from nn_core.model.moe import (
    MoEWeights,
    aux_loss,
    moe_backward,
    moe_forward,
    router_forward,
)
from nn_core.model.tensor import silu, silu_grad, softmax, softmax_backward

TOL = 1e-6  # float64 central differences; see gradcheck.py for why this is loose enough


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def sigmoid_ref(x):
    return 1 / (1 + np.exp(-x))


# ------------------------------------------------------------------ elementwise / softmax


def test_silu_and_its_derivative(rng):
    x = rng.standard_normal(50) * 4
    np.testing.assert_allclose(silu(x), x / (1 + np.exp(-x)), rtol=1e-14)
    s = sigmoid_ref(x)
    np.testing.assert_allclose(silu_grad(x), s * (1 + x * (1 - s)), rtol=1e-14)
    h = 1e-6
    np.testing.assert_allclose(silu_grad(x), (silu(x + h) - silu(x - h)) / (2 * h), rtol=1e-7)
    # no overflow warning and exact limits far out
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        assert silu(np.array([-1e4, 1e4], dtype=np.float32)).tolist() == [-0.0, 1e4]


def test_softmax_matches_formula_and_survives_all_minus_inf_rows(rng):
    x = rng.standard_normal((3, 7))
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(softmax(x), e / e.sum(axis=1, keepdims=True), rtol=1e-14)
    big = np.array([[1000.0, 1000.0], [-np.inf, -np.inf], [-np.inf, 0.0]])
    p = softmax(big)
    assert np.isfinite(p).all()
    np.testing.assert_array_equal(p, [[0.5, 0.5], [0.0, 0.0], [0.0, 1.0]])


def test_softmax_backward(rng):
    z = rng.standard_normal((4, 5))
    r = rng.standard_normal((4, 5))
    grad = softmax_backward(r, softmax(z))
    assert check_gradient(lambda: float(np.sum(softmax(z) * r)), z, grad) < TOL


# ------------------------------------------------------------------ embedding


def test_embedding_forward_and_backward_accumulates_repeats(rng):
    w = rng.standard_normal((10, 4))
    ids = np.array([3, 1, 3, 3, 9])
    out = embedding_forward(ids, w)
    np.testing.assert_array_equal(out, np.stack([w[i] for i in ids]))
    r = rng.standard_normal(out.shape)
    dw = np.zeros_like(w)
    embedding_backward(r, ids, dw)
    np.testing.assert_allclose(dw[3], r[0] + r[2] + r[3])
    assert check_gradient(lambda: float(np.sum(embedding_forward(ids, w) * r)), w, dw) < TOL


# ------------------------------------------------------------------ RMSNorm


def test_rmsnorm_forward_formula(rng):
    x = rng.standard_normal((5, 8))
    g = rng.standard_normal(8)
    y, _ = rmsnorm_forward(x, g, 1e-6)
    ref = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * g
    np.testing.assert_allclose(y, ref, rtol=1e-13)


def test_rmsnorm_backward(rng):
    x = rng.standard_normal((5, 8))
    g = rng.standard_normal(8)
    r = rng.standard_normal((5, 8))
    y, cache = rmsnorm_forward(x, g)
    dg = np.zeros_like(g)
    dx = rmsnorm_backward(r, cache, g, dg)

    def loss():
        return float(np.sum(rmsnorm_forward(x, g)[0] * r))

    assert check_gradient(loss, x, dx) < TOL
    assert check_gradient(loss, g, dg) < TOL


# ------------------------------------------------------------------ Linear


def test_linear_forward_and_backward(rng):
    x = rng.standard_normal((6, 5))
    w = rng.standard_normal((3, 5))  # [out, in]
    wt = w.T  # the layer takes W^T [in, out] (a view: perturbing it perturbs w)
    y = linear_forward(x, wt)
    np.testing.assert_allclose(y, np.einsum("ni,oi->no", x, w), rtol=1e-13)
    r = rng.standard_normal(y.shape)
    dwt = np.zeros_like(wt)
    dx = linear_backward(r, x, wt, dwt)

    def loss():
        return float(np.sum(linear_forward(x, wt) * r))

    assert check_gradient(loss, x, dx) < TOL
    assert check_gradient(loss, w, dwt.T) < TOL


def test_backward_adds_into_gradient_buffers(rng):
    """Two backwards give twice the gradient: backward accumulates with +=."""
    x = rng.standard_normal((6, 5))
    w = rng.standard_normal((3, 5))
    r = rng.standard_normal((6, 3))
    once, twice = np.zeros_like(w.T), np.zeros_like(w.T)
    linear_backward(r, x, w.T, once)
    linear_backward(r, x, w.T, twice)
    linear_backward(r, x, w.T, twice)
    np.testing.assert_allclose(twice, 2 * once, rtol=1e-15)


# ------------------------------------------------------------------ SwiGLU expert


def test_swiglu_forward_and_backward(rng):
    c, h, f = 5, 6, 10
    x = rng.standard_normal((c, h))
    wg, wu = rng.standard_normal((f, h)), rng.standard_normal((f, h))
    wd = rng.standard_normal((h, f))
    wgu = np.concatenate([wg, wu]).T  # [Wg; Wu]^T [H, 2F], as the model stores them
    wd = wd.T  # Wd^T [F, H]
    out, cache = swiglu_forward(x, wgu, wd)
    g, u = x @ wg.T, x @ wu.T
    ref = (g / (1 + np.exp(-g)) * u) @ wd  # Down(SiLU(Gate(x)) * Up(x))
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    r = rng.standard_normal(out.shape)
    grads = [np.zeros_like(a) for a in (wgu, wd)]
    dx = swiglu_backward(r, cache, wgu, wd, *grads)

    def loss():
        return float(np.sum(swiglu_forward(x, wgu, wd)[0] * r))

    for arr, grad in zip((x, wgu, wd), (dx, *grads)):
        assert check_gradient(loss, arr, grad) < TOL


# ------------------------------------------------------------------ RoPE


def rope_reference(x, positions, theta):
    """RoPE by docs/model.md, section 6, pair by pair: [x0 cos - x1 sin, x0 sin + x1 cos]."""
    d = x.shape[-1]
    out = np.empty_like(x)
    for s, t in enumerate(positions):
        for i in range(d // 2):
            a = t / theta ** (2 * i / d)
            x0, x1 = x[:, s, :, 2 * i], x[:, s, :, 2 * i + 1]
            out[:, s, :, 2 * i] = x0 * np.cos(a) - x1 * np.sin(a)
            out[:, s, :, 2 * i + 1] = x0 * np.sin(a) + x1 * np.cos(a)
    return out


def test_rope_matches_formula_preserves_norms_and_is_relative(rng):
    d, n = 8, 40
    rot = rope_tables(10000.0, d, n)  # e^(i t f_k)   [n, D/2]
    x = rng.standard_normal((2, 5, 3, d))  # [B, S, heads, D]
    pos = np.arange(7, 12)
    rotated = rope_rotate(x, rot[pos, None, :])
    np.testing.assert_allclose(rotated, rope_reference(x, pos, 10000.0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        np.linalg.norm(rotated, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13
    )
    # q.k depends only on the position difference
    q, k = rng.standard_normal(d), rng.standard_normal(d)

    def at(v, t):
        return rope_rotate(v[None, None, None], rot[t : t + 1, None])

    dots = [float(np.sum(at(q, t + 3) * at(k, t))) for t in (0, 5, 20, 36)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-12)
    # RoPE's backward is the inverse rotation: it undoes the forward, and is its transpose
    back = rope_unrotate(rotated, rot[pos, None, :].conj())
    np.testing.assert_allclose(back, x, rtol=1e-12, atol=1e-14)
    r = rng.standard_normal(x.shape)
    grad = rope_unrotate(r, rot[pos, None, :].conj())

    def loss():
        return float(np.sum(rope_rotate(x, rot[pos, None, :]) * r))

    assert check_gradient(loss, x, grad) < TOL


def test_ntk_base_formula():
    assert ntk_rope_base(10000.0, 1.0, 64) == 10000.0
    assert ntk_rope_base(10000.0, 8.0, 64) == pytest.approx(10000.0 * 8.0 ** (64 / 62))
    cfg = Config.default_6_9b()
    assert cfg.rope_theta == pytest.approx(10000.0 * 8.0 ** (64 / 62), rel=1e-15)
    assert Config.tiny().rope_theta == 10000.0


# ------------------------------------------------------------------ attention


def attention_reference(x, batch, wq, wk, wv, wo, n_heads, n_kv, theta):
    """Direct per-head attention by docs/model.md, section 7 (loops, no grouping tricks)."""
    n, _ = x.shape
    s = n // batch
    d = wq.shape[0] // n_heads
    q = (x @ wq.T).reshape(batch, s, n_heads, d)
    k = (x @ wk.T).reshape(batch, s, n_kv, d)
    v = (x @ wv.T).reshape(batch, s, n_kv, d)
    q, k = rope_reference(q, range(s), theta), rope_reference(k, range(s), theta)
    out = np.zeros((batch, s, n_heads, d))
    for b in range(batch):
        for h in range(n_heads):
            j = h % n_kv  # query head h uses kv head h % n_kv_heads
            scores = q[b, :, h] @ k[b, :, j].T / np.sqrt(d)
            scores[np.triu_indices(s, 1)] = -np.inf  # causal mask
            out[b, :, h] = softmax(scores) @ v[b, :, j]
    return out.reshape(n, n_heads * d) @ wo.T


@pytest.mark.parametrize("n_heads,n_kv", [(4, 1), (4, 2), (2, 2)])
def test_attention_forward_and_backward(rng, n_heads, n_kv):
    batch, s, h, d = 2, 5, 6, 4
    theta = 500.0
    rope = build_rope(theta, d, 16, np.float64)
    x = rng.standard_normal((batch * s, h))
    wqkv = rng.standard_normal((h, (n_heads + 2 * n_kv) * d)) * 0.5  # [Wq; Wk; Wv]^T
    wo = rng.standard_normal((n_heads * d, h)) * 0.5  # Wo^T
    out, cache = attention_forward(x, batch, wqkv, wo, n_heads, n_kv, rope)
    q_rows, kv_rows = n_heads * d, n_kv * d
    wq, wk, wv = np.split(wqkv.T, [q_rows, q_rows + kv_rows])
    ref = attention_reference(x, batch, wq, wk, wv, wo.T, n_heads, n_kv, theta)
    np.testing.assert_allclose(out, ref, rtol=1e-11, atol=1e-12)

    r = rng.standard_normal(out.shape)
    dwqkv, dwo = np.zeros_like(wqkv), np.zeros_like(wo)
    dx = attention_backward(r, cache, wqkv, wo, dwqkv, dwo, n_heads, n_kv, rope)

    def loss():
        return float(np.sum(attention_forward(x, batch, wqkv, wo, n_heads, n_kv, rope)[0] * r))

    for arr, grad in ((x, dx), (wqkv, dwqkv), (wo, dwo)):
        assert check_gradient(loss, arr, grad, coords=10) < TOL


# ------------------------------------------------------------------ router and MoE


def test_router_probabilities_and_kept_weights_sum_to_one(rng):
    x = rng.standard_normal((20, 6))
    wr = rng.standard_normal((5, 6))
    routing = router_forward(x, wr, top_k=3)
    np.testing.assert_allclose(routing.probs, softmax(x @ wr.T), rtol=1e-14)
    np.testing.assert_allclose(routing.probs.sum(axis=1), 1, rtol=1e-14)
    np.testing.assert_allclose(routing.weights.sum(axis=1), 1, rtol=1e-14)
    for t in range(20):  # the kept experts are the 3 most probable, in that order
        assert list(routing.top_idx[t]) == list(np.argsort(-routing.probs[t])[:3])
    assert routing.counts.sum() == 60


def test_aux_loss_is_alpha_under_uniform_routing_and_grows_with_imbalance():
    e, k = 4, 2
    # Token t (one-hot input t) prefers experts t, t+1, ... in cyclic order: every expert
    # is kept by exactly two of the four tokens (f_e = 1/E) and, by the same symmetry,
    # its mean probability is 1/E (P_e = 1/E): perfectly uniform routing.
    prefs = np.array([3.0, 2.0, 1.0, 0.0])
    w_router = np.stack([np.roll(prefs, i) for i in range(e)])  # [E, H=4]: w[e, t]
    routing = router_forward(np.eye(4), w_router, k)
    np.testing.assert_array_equal(routing.counts, [2, 2, 2, 2])
    np.testing.assert_allclose(routing.probs.mean(axis=0), 1 / e, rtol=1e-15)
    assert aux_loss(routing, alpha=0.01) == pytest.approx(0.01, rel=1e-14)
    # more and more tokens sent to experts 0 and 1: the loss grows with the imbalance
    losses = []
    for skew in (0.0, 1.0, 3.0, 9.0):
        w_skewed = w_router.copy()
        w_skewed[:2] += skew  # experts 0 and 1 gain logit on every token
        losses.append(aux_loss(router_forward(np.eye(4), w_skewed, k), alpha=0.01))
    assert losses[0] == pytest.approx(0.01, rel=1e-14)
    assert all(a < b for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] == pytest.approx(0.02, rel=1e-3)  # all on 2 of 4 experts: alpha E/K


def moe_reference(x, w: MoEWeights, top_k):
    """Per token: softmax, top-k, renormalize, sum_k w_k Expert_k(x)."""
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        p = softmax(x[t] @ w.router.T)
        kept = np.argsort(-p, kind="stable")[:top_k]
        for e in kept:
            f = w.down.shape[1]
            wg, wu = w.gate_up[e, :, :f].T, w.gate_up[e, :, f:].T  # Wg, Wu of expert e [F, H]
            g, u = wg @ x[t], wu @ x[t]
            out[t] += p[e] / p[kept].sum() * (w.down[e].T @ (silu(g) * u))
    return out


def random_moe(rng, e=4, h=6, f=8):
    return MoEWeights(
        rng.standard_normal((e, h)),
        rng.standard_normal((e, h, 2 * f)) * 0.4,  # [Wg; Wu]^T of each expert
        rng.standard_normal((e, f, h)) * 0.4,  # Wd^T
    )


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_forward_and_backward_including_router_and_aux(rng, top_k):
    w = random_moe(rng)
    x = rng.standard_normal((9, 6))
    alpha = 0.3  # large, so the aux path's share of the router gradient is checked too
    out, cache = moe_forward(x, w, top_k)
    np.testing.assert_allclose(out, moe_reference(x, w, top_k), rtol=1e-12, atol=1e-13)
    r = rng.standard_normal(out.shape)
    dw = MoEWeights(*(np.zeros_like(a) for a in w))
    dx = moe_backward(r, cache, w, dw, alpha)
    assert np.abs(dw.router).max() > 0

    def loss():
        o, c = moe_forward(x, w, top_k)
        # the aux loss with f_e held at its current value (a constant: docs/gradients.md)
        f_e = cache.routing.counts / cache.routing.order.size
        p_e = c.routing.probs.mean(axis=0)
        return float(np.sum(o * r) + alpha * w.router.shape[0] * f_e @ p_e)

    for arr, grad in ((x, dx), *zip(w, dw)):
        assert check_gradient(loss, arr, grad, coords=10) < TOL


def test_moe_with_an_expert_that_receives_no_tokens(rng):
    w = random_moe(rng)
    w.router[3] = -50.0  # expert 3 is never in the top 2 for these inputs
    x = np.abs(rng.standard_normal((6, 6)))
    out, cache = moe_forward(x, w, 2)
    assert cache.routing.counts[3] == 0 and 3 not in [e for e, _, _ in cache.experts.bounds]
    np.testing.assert_allclose(out, moe_reference(x, w, 2), rtol=1e-12)
    dw = MoEWeights(*(np.zeros_like(a) for a in w))
    moe_backward(np.ones_like(out), cache, w, dw, 0.0)
    assert not dw.gate_up[3].any() and not dw.down[3].any()


# ------------------------------------------------------------------ block


def test_block_forward_and_backward(rng):
    cfg = Config(
        hidden_dim=8,
        n_heads=2,
        n_kv_heads=1,
        head_dim=4,
        n_experts=3,
        top_k_experts=2,
        ffn_dim=6,
        vocab_size=10,
        max_seq_len=8,
    )
    rope = build_rope(cfg.rope_theta, cfg.head_dim, cfg.max_seq_len, np.float64)
    h, d = cfg.hidden_dim, cfg.head_dim
    w = BlockWeights(
        1 + 0.1 * rng.standard_normal(h),
        rng.standard_normal((h, (2 + 2) * d)) * 0.4,  # [Wq; Wk; Wv]^T
        rng.standard_normal((2 * d, h)) * 0.4,  # Wo^T
        1 + 0.1 * rng.standard_normal(h),
        random_moe(rng, e=3, h=h, f=6),
    )
    x = rng.standard_normal((2 * 4, h))
    out, cache = block_forward(x, 2, w, cfg, rope)
    # direct composition: h = x + A(n1(x)); out = h + M(n2(h))
    a, _ = attention_forward(rmsnorm_forward(x, w.attn_norm)[0], 2, w.qkv, w.o, 2, 1, rope)
    mid = x + a
    np.testing.assert_allclose(
        out, mid + moe_reference(rmsnorm_forward(mid, w.ffn_norm)[0], w.moe, 2), rtol=1e-12
    )
    r = rng.standard_normal(out.shape)
    dw = BlockWeights(
        *(np.zeros_like(a) for a in w[:4]), MoEWeights(*(np.zeros_like(a) for a in w.moe))
    )
    dx = block_backward(r, cache, w, dw, cfg, rope, alpha=0.0)

    def loss():
        return float(np.sum(block_forward(x, 2, w, cfg, rope)[0] * r))

    for arr, grad in ((x, dx), *zip(w[:4], dw[:4]), *zip(w.moe, dw.moe)):
        assert check_gradient(loss, arr, grad, coords=8) < TOL


# ------------------------------------------------------------------ cross-entropy


def test_cross_entropy_forward_and_backward(rng):
    logits = rng.standard_normal((7, 11)) * 3
    targets = rng.integers(0, 11, 7)
    loss, cache = cross_entropy_forward(logits, targets)
    ref = -np.mean(np.log(softmax(logits)[np.arange(7), targets]))
    assert loss == pytest.approx(ref, rel=1e-14)
    dlogits = cross_entropy_backward(cache)
    expected = (softmax(logits) - np.eye(11)[targets]) / 7
    np.testing.assert_allclose(dlogits, expected, rtol=1e-13, atol=1e-16)
    assert check_gradient(lambda: cross_entropy_forward(logits, targets)[0], logits, dlogits) < TOL
    huge = np.array([[1e4, 0.0, -1e4]])  # stable log-softmax: no overflow, no NaN
    assert cross_entropy_forward(huge, np.array([0]))[0] == 0.0
