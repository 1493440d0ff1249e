"""The compiled kernels equal their NumPy references (nn_core.training.optim)."""

from __future__ import annotations

import numpy as np
import pytest

from nn_core.training.kernels import adamw_update_fused, global_norm_fused
from nn_core.training.optim import adamw_update, global_norm


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_adamw_equals_numpy_reference(dtype):
    rng = np.random.default_rng(0)
    n = 100_003  # not a multiple of any block or vector width
    params = rng.standard_normal(n).astype(dtype)
    ref = [params.copy(), np.zeros_like(params), np.zeros_like(params)]
    fused = [params.copy(), np.zeros_like(params), np.zeros_like(params)]
    for t in range(1, 6):
        grads = (rng.standard_normal(n) * 10.0 ** rng.integers(-9, 2, n)).astype(dtype)
        adamw_update(ref[0], grads, ref[1], ref[2], 1e-3, 0.9, 0.95, 1e-8, 0.1, t)
        adamw_update_fused(fused[0], grads, fused[1], fused[2], 1e-3, 0.9, 0.95, 1e-8, 0.1, t)
    # the same operations in the same order; the compiler may still fuse a multiply-add
    # (one rounding instead of two), so allow a few units in the last place
    ulp = np.finfo(dtype).eps
    for a, b in zip(ref, fused):
        np.testing.assert_allclose(b, a, rtol=4 * ulp, atol=4 * ulp * np.abs(a).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_adamw_applies_the_clipping_factor_as_clip_grad_norm_does(dtype):
    """grad_scale: the gradients are scaled in place (as clip_grad_norm leaves them), then
    the update uses them; 1.0 leaves the gradients untouched."""
    rng = np.random.default_rng(2)
    n = 70_001
    params = rng.standard_normal(n).astype(dtype)
    grads = (rng.standard_normal(n) * 3).astype(dtype)
    ref = [params.copy(), grads.copy(), np.zeros_like(params), np.zeros_like(params)]
    fused = [params.copy(), grads.copy(), np.zeros_like(params), np.zeros_like(params)]
    clipped = [params.copy(), grads.copy(), np.zeros_like(params), np.zeros_like(params)]
    scale = 0.37
    adamw_update(*ref, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1, scale)
    adamw_update_fused(*fused, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1, scale)
    clipped[1] *= scale  # what clip_grad_norm does, then the update without a factor
    adamw_update(*clipped, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1)
    for a, b in zip(clipped, ref):
        np.testing.assert_array_equal(b, a)  # the reference: exactly clip, then update
    np.testing.assert_array_equal(fused[1], ref[1])  # the clipped gradient, written back
    ulp = np.finfo(dtype).eps
    for a, b in zip(ref, fused):
        np.testing.assert_allclose(b, a, rtol=4 * ulp, atol=4 * ulp * np.abs(a).max())
    untouched = grads.copy()
    adamw_update_fused(params.copy(), untouched, *fused[2:], 1e-3, 0.9, 0.95, 1e-8, 0.1, 2)
    np.testing.assert_array_equal(untouched, grads)


def test_fused_adamw_is_the_same_on_one_thread_and_on_all(monkeypatch):
    """Small buffers take one thread, large ones all: element by element the same
    arithmetic, so bit for bit the same result."""
    from nn_core.training import kernels

    rng = np.random.default_rng(3)
    n = 50_001
    start = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    start[3] = np.abs(start[3])  # v >= 0
    runs = []
    for parallel_min in (n + 1, 0):  # one thread, then all
        monkeypatch.setattr(kernels, "ADAMW_PARALLEL_MIN", parallel_min)
        bufs = [b.copy() for b in start]
        adamw_update_fused(*bufs, 1e-3, 0.9, 0.95, 1e-8, 0.1, 3, 0.5)
        runs.append(bufs)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_global_norm_equals_numpy_reference(dtype):
    rng = np.random.default_rng(1)
    flat = rng.standard_normal(250_001).astype(dtype)
    # both accumulate float64 squares; only the summation order differs
    assert global_norm_fused(flat) == pytest.approx(global_norm(flat), rel=1e-12)
    flat[7] = np.inf
    assert global_norm_fused(flat) == np.inf
    flat[7] = np.nan
    assert np.isnan(global_norm_fused(flat))


def test_trainer_with_fused_kernels_matches_the_numpy_trainer():
    from nn_core import Config, MoETransformer, TrainConfig, Trainer

    ids = np.arange(16).reshape(2, 8)
    runs = {}
    for kernels in ("numpy", "numba"):
        cfg = TrainConfig(lr=1e-3, warmup_steps=2, total_steps=10, kernels=kernels)
        trainer = Trainer(MoETransformer(Config.tiny(), seed=0), cfg)
        runs[kernels] = (
            [trainer.train_step(ids, (ids + 1) % 1000)["loss"] for _ in range(4)],
            trainer.model.flat_params,
        )
    # a norm summed in another order, then AdamW's g / (|g| + eps) on gradients near
    # float32 resolution: agreement to float32 rounding amplified by four steps
    np.testing.assert_allclose(runs["numba"][0], runs["numpy"][0], rtol=1e-5)
    np.testing.assert_allclose(runs["numba"][1], runs["numpy"][1], rtol=1e-4, atol=1e-6)


def test_unknown_kernels_are_rejected():
    from nn_core import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="kernels"):
        TrainConfig(kernels="cuda")


def test_compiled_kernels_are_loaded_from_the_disk_cache():
    """A second process loads the kernels instead of compiling them again (a compile
    costs over a second and ~15 MB of resident memory in every training process)."""
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from nn_core.training.kernels import _compiled, adamw_update_fused, global_norm_fused\n"
        "p, g, m, v = (np.ones(64, np.float32) for _ in range(4))\n"
        "adamw_update_fused(p, g, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1, 0.5)\n"
        "global_norm_fused(g)\n"
        "from nn_core import Config, MoETransformer\n"
        "from nn_core.training.kernels import fused_backward\n"
        "model = MoETransformer(Config.tiny())\n"
        "ids = np.arange(16).reshape(2, 8)\n"
        # the element-wise lines alone (the compiled experts call SwiGLU's from inside)
        "fused = fused_backward()._replace(experts=None)\n"
        "model.backward(model.forward_loss(ids, ids), fused=fused)\n"
        "k = _compiled()\n"
        "names = ('adamw', 'sum_squares', 'rmsnorm_backward', 'swiglu_grad', 'router_grad')\n"
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
    assert runs[1].stdout.split() == ["1"] * 5, (runs[1].stdout, runs[1].stderr)
