"""The arrangements the train step's backward takes for speed give what the plain
arrangement gives: the experts' upstream gradient read in place or copied, weight
gradients written into strided buffers, the router's scatter on flat indices, and the
RMSNorm gain gradient."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_gradient

from nn_core.model.layers import (
    ROW_BLOCK,
    rmsnorm_backward,
    rmsnorm_forward,
    swiglu_backward,
    swiglu_dout_buffer,
    swiglu_forward,
    weight_grad,
)
from nn_core.model.moe import MoEWeights, moe_backward, moe_forward, router_backward, router_forward
from nn_core.model.tensor import softmax
from nn_core.model.workspace import Workspace


def experts(rng, dtype, e=4, h=6, f=8):
    return (
        (rng.standard_normal((e, h, 2 * f)) * 0.4).astype(dtype),  # [Wg; Wu]^T per expert
        (rng.standard_normal((e, f, h)) * 0.4).astype(dtype),  # Wd^T
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("overwrite", [False, True])
def test_swiglu_backward_reads_its_gradient_in_place_or_copies_it(dtype, overwrite):
    """dout written into a ``swiglu_dout_buffer`` handed over as ``dout_padded`` (what
    moe_backward does) and dout given as an array of its own (copied into the workspace's
    buffer, even when that buffer already exists) give the same gradients, bit for bit,
    and the buffer's pad rows stay zero: the padded row windows read them."""
    rng = np.random.default_rng(7)
    wgu, wd = experts(rng, dtype)
    counts = [3, 0, 5, 1]  # an empty expert and a one-row expert
    rows = sum(counts)
    x = rng.standard_normal((rows, 6)).astype(dtype)
    g0 = rng.standard_normal(wgu.shape).astype(dtype)  # what the buffers held before
    d0 = rng.standard_normal(wd.shape).astype(dtype)
    results = []
    for in_place in (False, True):
        ws = Workspace()
        _, cache = swiglu_forward(x, wgu, wd, counts, ws, "e.")
        dwgu, dwd = g0.copy(), d0.copy()
        dout = np.random.default_rng(9).standard_normal((rows, 6)).astype(dtype)
        for _ in range(2):  # the second call finds the buffer holding the first's rows
            buf = swiglu_dout_buffer(rows, 6, np.dtype(dtype), ws, "e.")
            if in_place:
                np.copyto(buf[:rows], dout)
                arg = buf[:rows]
            else:
                buf[:rows] = 123.0  # stale rows must be replaced by the copy
                arg = dout
            dwgu[...], dwd[...] = g0, d0
            dx = swiglu_backward(
                arg,
                cache,
                wgu,
                wd,
                dwgu,
                dwd,
                ws,
                "e.",
                overwrite=overwrite,
                dout_padded=buf if in_place else None,
            )
            assert buf.shape == (rows + ROW_BLOCK - 1, 6)
            assert not buf[rows:].any()  # the pad rows
        results.append((dx.copy(), dwgu.copy(), dwd.copy()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    # and both equal the backward without a workspace (fresh buffers, dout copied)
    _, cache = swiglu_forward(x, wgu, wd, counts)
    dwgu, dwd = g0.copy(), d0.copy()
    dx = swiglu_backward(dout, cache, wgu, wd, dwgu, dwd, overwrite=overwrite)
    for a, b in zip(results[0], (dx, dwgu, dwd)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rows", [1, 4])
def test_weight_grad_writes_into_a_strided_gradient(rows):
    """A gradient view that is not C-contiguous (a column slice) is written by the general
    product; contiguous ones by matmul_into; both hold a b."""
    rng = np.random.default_rng(rows)
    a, b = rng.standard_normal((5, rows)), rng.standard_normal((rows, 3))  # [in, C], [C, out]
    big = np.full((5, 7), np.nan)
    strided = big[:, 2:5]  # [5, 3], not C-contiguous
    weight_grad(a, b, strided, overwrite=True)
    np.testing.assert_allclose(strided, a @ b, rtol=1e-14)
    assert np.isnan(big[:, :2]).all() and np.isnan(big[:, 5:]).all()  # nothing else written
    contiguous = np.full((5, 3), np.nan)
    weight_grad(a, b, contiguous, overwrite=True)
    np.testing.assert_array_equal(contiguous, strided)


def router_backward_reference(dweights, routing, x, w_router, alpha, fractions):
    """Router backward token by token in float64, from the formulas: renormalized top-k
    dp_k = (dw_k - sum_j w_j dw_j) / S; aux dp_te += alpha E f_e / N; softmax backward
    dz = p . (dp - p . dp); dWr = dz^T x; dx = dz Wr."""
    n, n_experts = routing.probs.shape
    probs = softmax(x @ w_router.T)
    dz = np.zeros((n, n_experts))
    for t in range(n):
        kept = routing.top_idx[t]
        w = routing.weights[t]
        s = probs[t, kept].sum()
        dp = np.full(n_experts, alpha * n_experts / n) * fractions
        dp[kept] += (dweights[t] - w @ dweights[t]) / s
        dz[t] = probs[t] * (dp - probs[t] @ dp)
    return dz.T @ x, dz @ w_router


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("overwrite", [False, True])
def test_router_backward_scatters_the_kept_entries_by_flat_index(top_k, overwrite):
    rng = np.random.default_rng(top_k)
    n, e, h = 11, 5, 6
    x = rng.standard_normal((n, h))
    w_router = rng.standard_normal((e, h))
    routing = router_forward(x, w_router, top_k, Workspace(), "r.")
    dweights = rng.standard_normal((n, top_k))
    fractions = routing.counts / routing.order.size
    ref_dw, ref_dx = router_backward_reference(dweights, routing, x, w_router, 0.3, fractions)
    start = rng.standard_normal((e, h))
    dw = start.copy()
    dx = router_backward(
        dweights, routing, x, w_router, dw, 0.3, None, Workspace(), "r.", overwrite=overwrite
    )
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dw, ref_dw + (0 if overwrite else start), rtol=1e-12, atol=1e-14)
    # other fractions f_e (a larger batch's) enter the aux term only
    f = rng.random(e)
    ref_dw, ref_dx = router_backward_reference(dweights, routing, x, w_router, 0.3, f)
    dx = router_backward(dweights, routing, x, w_router, dw, 0.3, f, overwrite=True)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-12, atol=1e-14)


def test_rmsnorm_gain_gradient_is_the_sum_over_rows_written_or_added():
    rng = np.random.default_rng(5)
    x, gain = rng.standard_normal((9, 7)), rng.standard_normal(7)
    dy = rng.standard_normal((9, 7))
    _, cache = rmsnorm_forward(x, gain, 1e-6)
    xn = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + 1e-6)
    start = rng.standard_normal(7)
    written, added = start.copy(), start.copy()
    rmsnorm_backward(dy, cache, gain, written, overwrite=True)
    rmsnorm_backward(dy, cache, gain, added)
    np.testing.assert_allclose(written, (dy * xn).sum(axis=0), rtol=1e-13)
    np.testing.assert_allclose(added, start + (dy * xn).sum(axis=0), rtol=1e-13)


# ------------------------------------------------------------------ compiled backward lines


def test_fused_swiglu_line_equals_the_numpy_lines():
    """The compiled SwiGLU derivative line does the reference's operations in its order."""
    from nn_core.training.kernels import fused_backward

    fused = fused_backward()
    for dtype in (np.float32, np.float64):
        rng = np.random.default_rng(11)
        wgu, wd = experts(rng, dtype)
        counts = [4, 2, 0, 7]
        x = rng.standard_normal((13, 6)).astype(dtype) * 3  # saturated gates too
        _, cache = swiglu_forward(x, wgu, wd, counts)
        dout = rng.standard_normal((13, 6)).astype(dtype)
        runs = []
        for f in (None, fused):
            dwgu, dwd = np.zeros_like(wgu), np.zeros_like(wd)
            dx = swiglu_backward(dout, cache, wgu, wd, dwgu, dwd, Workspace(), "e.", fused=f)
            runs.append((dx, dwgu, dwd))
        ulp = np.finfo(dtype).eps
        for a, b in zip(*runs):
            # the same operations; a compiler may still fuse a multiply-add (one rounding)
            np.testing.assert_allclose(b, a, rtol=8 * ulp, atol=8 * ulp * np.abs(a).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("overwrite", [False, True])
def test_fused_rmsnorm_backward_equals_the_numpy_reference(dtype, overwrite):
    from nn_core.training.kernels import fused_backward

    rng = np.random.default_rng(12)
    x, gain = rng.standard_normal((10, 33)).astype(dtype), rng.standard_normal(33).astype(dtype)
    dy = rng.standard_normal((10, 33)).astype(dtype)
    _, cache = rmsnorm_forward(x, gain, 1e-6)
    start = rng.standard_normal(33).astype(dtype)
    ref_g, fused_g = start.copy(), start.copy()
    ref = rmsnorm_backward(dy, cache, gain, ref_g, overwrite=overwrite)
    out = rmsnorm_backward(
        dy, cache, gain, fused_g, Workspace(), "n.", overwrite=overwrite, fused=fused_backward()
    )
    # sums over 33 terms in another order: a few units of the dtype's rounding
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * np.abs(ref).max())
    np.testing.assert_allclose(fused_g, ref_g, rtol=tol, atol=tol * np.abs(ref_g).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_model_backward_with_fused_lines_equals_the_numpy_backward(dtype):
    """The whole gradient, float64 to 1e-12 (so the float64 gradient checks of the NumPy
    backward carry over) and float32 to its rounding."""
    from nn_core import Config, MoETransformer
    from nn_core.training.kernels import fused_backward

    model = MoETransformer(Config.tiny(), seed=5, dtype=dtype)
    rng = np.random.default_rng(0)
    ids, tgt = rng.integers(0, 1000, (2, 8)), rng.integers(0, 1000, (2, 8))
    grads = []
    fused = fused_backward()
    assert fused.experts is not None  # NumPy's BLAS found: the compiled experts are tested
    for f in (None, fused):
        state = model.forward_loss(ids, tgt, 0.05, fused=f)
        model.backward(state, zero_grad=True, fused=f)
        grads.append(model.flat_grads.copy())
    assert grads[0].any()
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(grads[1], grads[0], rtol=tol, atol=tol * np.abs(grads[0]).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_fused_router_lines_equal_the_numpy_reference(dtype, alpha):
    from nn_core.training.kernels import fused_backward

    rng = np.random.default_rng(13)
    n, e, h, top_k = 12, 6, 5, 3
    x = rng.standard_normal((n, h)).astype(dtype)
    w_router = rng.standard_normal((e, h)).astype(dtype)
    routing = router_forward(x, w_router, top_k, Workspace(), "r.")
    dweights = rng.standard_normal((n, top_k)).astype(dtype)
    for fractions in (None, rng.random(e)):
        runs = []
        for fused in (None, fused_backward()):
            dw = np.zeros_like(w_router)
            dx = router_backward(
                dweights, routing, x, w_router, dw, alpha, fractions, Workspace(), "r.", fused=fused
            )
            runs.append((dx, dw))
        # the same operations in the same order (sums over K and E are sequential in both)
        ulp = np.finfo(dtype).eps
        for a, b in zip(*runs):
            np.testing.assert_allclose(b, a, rtol=16 * ulp, atol=16 * ulp * np.abs(a).max())


def test_trainer_hands_the_fused_lines_to_the_backward_only_with_numba_kernels(monkeypatch):
    from nn_core import Config, MoETransformer, TrainConfig, Trainer

    seen = []
    for kernels in ("numpy", "numba"):
        model = MoETransformer(Config.tiny(), seed=0)
        original = model.backward

        def spy(state, _original=original, **kw):
            seen.append(kw.get("fused"))
            return _original(state, **kw)

        monkeypatch.setattr(model, "backward", spy)
        trainer = Trainer(model, TrainConfig(kernels=kernels, grad_accum_steps=1))
        ids = np.arange(16).reshape(2, 8)
        trainer.train_step(ids, (ids + 1) % 1000)
        accum = Trainer(model, TrainConfig(kernels=kernels, grad_accum_steps=2))
        accum.train_step(ids, (ids + 1) % 1000)
    assert seen[:3] == [None, None, None]
    assert all(f is not None for f in seen[3:]) and len(seen) == 6


def test_trainer_hands_the_compiled_experts_to_the_training_forward(monkeypatch):
    from nn_core import Config, MoETransformer, TrainConfig, Trainer

    seen = []
    for kernels in ("numpy", "numba"):
        for accum in (1, 2):
            model = MoETransformer(Config.tiny(), seed=0)
            original = model.forward_loss

            def spy(*args, _original=original, **kw):
                seen.append(kw.get("fused"))
                return _original(*args, **kw)

            monkeypatch.setattr(model, "forward_loss", spy)
            trainer = Trainer(model, TrainConfig(kernels=kernels, grad_accum_steps=accum))
            ids = np.arange(16).reshape(2, 8)
            trainer.train_step(ids, (ids + 1) % 1000)
    assert seen[:3] == [None, None, None] and len(seen) == 6
    assert all(f is not None and f.experts is not None for f in seen[3:])


# ------------------------------------------------------------------ compiled experts


def moe_weights(rng, dtype, e=6, h=8, f=12):
    return MoEWeights(
        rng.standard_normal((e, h)).astype(dtype),
        (rng.standard_normal((e, h, 2 * f)) * 0.4).astype(dtype),  # [Wg; Wu]^T per expert
        (rng.standard_normal((e, f, h)) * 0.4).astype(dtype),  # Wd^T
    )


def fused_experts():
    from nn_core.training.kernels import fused_backward

    fused = fused_backward()
    assert fused.experts is not None
    return fused


# (tokens, top_k): 5 tokens at K = 1 leave an expert of 6 without rows and give one-row
# experts; 17 tokens at K = 3 give experts of more than ROW_BLOCK rows (padded windows)
CASES = [(5, 1), (7, 2), (17, 3)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "top_k"), CASES)
def test_compiled_experts_forward_equals_moe_forward(dtype, n, top_k):
    """The compiled gather, experts and combine give moe_forward's output and cache (every
    array the backward reads): float64 to 1e-13, float32 to a few roundings."""
    rng = np.random.default_rng(n)
    w = moe_weights(rng, dtype)
    x = rng.standard_normal((n, 8)).astype(dtype)
    ref_out, ref = moe_forward(x, w, top_k, Workspace(), "m.")
    out, cache = moe_forward(x, w, top_k, Workspace(), "m.", fused_experts())
    if n == 5:
        assert 0 in cache.routing.counts and 1 in cache.routing.counts
    else:
        assert cache.routing.counts.max() > ROW_BLOCK
    for a, b in zip(cache.routing, ref.routing):  # the router's top-k, weights, grouping
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(cache.tokens, ref.tokens)
    np.testing.assert_array_equal(cache.gate, ref.gate)
    assert cache.experts.bounds == ref.experts.bounds
    tol = 1e-13 if dtype == np.float64 else 2e-6
    pairs = [(out, ref_out), (cache.y, ref.y), *zip(cache.experts[2:], ref.experts[2:])]
    for a, b in pairs + [(cache.experts.x, ref.experts.x)]:
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_compiled_top_k_breaks_ties_as_the_stable_argsort(top_k):
    """Equal probabilities (zero rows: uniform; two equal router rows) go to the lower
    expert index, and the grouping keeps assignments in order, as the argsorts do."""
    rng = np.random.default_rng(top_k)
    w = moe_weights(rng, np.float64)
    w.router[4] = w.router[1]  # experts 1 and 4 always tie
    x = rng.standard_normal((9, 8))
    x[[0, 3, 4]] = 0.0  # uniform probabilities: every expert ties
    _, ref = moe_forward(x, w, top_k, Workspace(), "m.")
    _, cache = moe_forward(x, w, top_k, Workspace(), "m.", fused_experts())
    for a, b in zip(cache.routing, ref.routing):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(cache.routing.top_idx[0], np.arange(top_k))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "top_k"), CASES)
@pytest.mark.parametrize("overwrite", [False, True])
def test_compiled_experts_backward_equals_moe_backward(dtype, n, top_k, overwrite):
    """dx and every weight gradient, written or added onto what the buffers held, with the
    aux term and other fractions f_e; the compiled backward also takes a NumPy forward's
    cache (the caches are the same)."""
    rng = np.random.default_rng(100 + n)
    w = moe_weights(rng, dtype)
    x = rng.standard_normal((n, 8)).astype(dtype)
    dout = rng.standard_normal((n, 8)).astype(dtype)
    start = [rng.standard_normal(a.shape).astype(dtype) for a in w]
    fused = fused_experts()
    runs = []  # numpy, compiled, NumPy forward + compiled backward; each without, with f_e
    for fwd, bwd in ((None, None), (fused, fused), (None, fused)):
        for fractions in (None, np.linspace(0.05, 0.4, 6)):
            _, cache = moe_forward(x, w, top_k, Workspace(), "m.", fwd)
            dw = MoEWeights(*(a.copy() for a in start))
            dx = moe_backward(
                dout,
                cache,
                w,
                dw,
                0.3,
                fractions,
                Workspace(),
                "m.",
                overwrite=overwrite,
                fused=bwd,
            )
            runs.append([dx.copy(), *dw])
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for i in range(2, len(runs)):
        for a, b in zip(runs[i], runs[i % 2]):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())
    if n == 5 and overwrite:  # an expert without rows: its weight gradients written as 0
        empty = int(np.flatnonzero(cache.routing.counts == 0)[0])
        assert not runs[2][2][empty].any() and not runs[2][3][empty].any()


@pytest.mark.parametrize(("n", "top_k"), CASES)
def test_compiled_experts_gradient_by_central_differences(n, top_k):
    """The compiled forward and backward of the MoE layer against central differences of
    the compiled forward itself (float64), router and aux term included."""
    rng = np.random.default_rng(200 + n)
    w = moe_weights(rng, np.float64)
    x = rng.standard_normal((n, 8))
    fused = fused_experts()
    alpha = 0.3
    out, cache = moe_forward(x, w, top_k, Workspace(), "m.", fused)
    r = rng.standard_normal(out.shape)
    dw = MoEWeights(*(np.zeros_like(a) for a in w))
    dx = moe_backward(r, cache, w, dw, alpha, None, Workspace(), "b.", fused=fused)
    f_e = cache.routing.counts / cache.routing.order.size  # held constant (docs/gradients.md)

    def loss():
        o, c = moe_forward(x, w, top_k, Workspace(), "l.", fused)
        return float(np.sum(o * r) + alpha * 6 * f_e @ c.routing.probs.mean(axis=0))

    for arr, grad in ((x, dx), *zip(w, dw)):
        assert check_gradient(loss, arr, grad, coords=10) < 1e-6


def test_model_with_compiled_experts_and_activation_checkpointing_gives_the_same_gradient():
    """Recomputing the blocks in the backward runs the same compiled forward: the gradient
    is the same, bit for bit."""
    from nn_core import Config, MoETransformer

    fused = fused_experts()
    model = MoETransformer(Config.tiny(), seed=3)
    rng = np.random.default_rng(1)
    ids, tgt = rng.integers(0, 1000, (2, 8)), rng.integers(0, 1000, (2, 8))
    grads = []
    for checkpointing in (False, True):
        state = model.forward_loss(ids, tgt, activation_checkpointing=checkpointing, fused=fused)
        model.backward(state, zero_grad=True, fused=fused)
        grads.append(model.flat_grads.copy())
    np.testing.assert_array_equal(grads[0], grads[1])


def test_compiled_experts_are_loaded_from_the_disk_cache():
    """A second process loads the experts' kernels instead of compiling them again (their
    BLAS symbols are registered before the cache is read)."""
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from nn_core import Config, MoETransformer\n"
        "from nn_core.training.kernels import _compiled, fused_backward\n"
        "fused = fused_backward()\n"
        "model = MoETransformer(Config.tiny())\n"
        "ids = np.arange(16).reshape(2, 8)\n"
        "model.backward(model.forward_loss(ids, ids, fused=fused), fused=fused)\n"
        "k = _compiled()\n"
        "names = ('experts_gate_up', 'experts_down', 'experts_grad', 'experts_combine_grad')\n"
        "print(*(sum(k[n].stats.cache_hits.values()) for n in names))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert runs[1].stdout.split() == ["1"] * 4, (runs[1].stdout, runs[1].stderr)
