"""Backwards that WRITE their parameter gradients (``overwrite=True``) equal zeroing the
buffers and adding (the default): bit for bit, whatever the buffers held before."""

from __future__ import annotations

import numpy as np
import pytest

from nn_core import Config, MoETransformer
from nn_core.model.layers import embedding_backward, weight_grad

# 8 experts, top-1, a 2-token batch: most experts get no rows (their gradients must be
# written as zeros), and the routed ones get a single row (the outer-product path)
SPARSE = Config(
    hidden_dim=16,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=4,
    n_experts=8,
    top_k_experts=1,
    ffn_dim=12,
    vocab_size=40,
    max_seq_len=16,
)


def batch(cfg: Config, b: int, s: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (b, s)), rng.integers(0, cfg.vocab_size, (b, s))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "cfg, b, s, checkpointing",
    [
        (Config.tiny(), 2, 8, False),
        (Config.tiny(), 2, 8, True),
        (Config.tiny(), 1, 1, False),  # one token: every product over rows has one term
        (SPARSE, 1, 2, False),
        (SPARSE, 2, 5, True),
    ],
    ids=["tiny", "tiny-ckpt", "one-token", "sparse-experts", "sparse-ckpt"],
)
def test_backward_with_zero_grad_overwrites_every_gradient(cfg, b, s, checkpointing, dtype):
    model = MoETransformer(cfg, seed=3, dtype=dtype)
    ids, tgt = batch(cfg, b, s)
    state = model.forward_loss(ids, tgt, 0.02, activation_checkpointing=checkpointing)
    model.zero_grad()
    model.backward(state, scale=0.5)  # the reference: zeroed, then added
    expected = model.flat_grads.copy()
    assert expected.any()
    state = model.forward_loss(ids, tgt, 0.02, activation_checkpointing=checkpointing)
    model.flat_grads.fill(np.nan)  # whatever was there must not survive
    model.backward(state, scale=0.5, zero_grad=True)
    np.testing.assert_array_equal(model.flat_grads, expected)
    model.flat_grads.fill(np.nan)  # loss_and_grad writes as well
    model.loss_and_grad(ids, tgt, 0.02, activation_checkpointing=checkpointing)
    grads = model.flat_grads
    grads /= 2
    np.testing.assert_array_equal(model.flat_grads, expected)


def test_a_second_backward_still_adds_after_an_overwriting_one():
    model = MoETransformer(SPARSE, seed=1, dtype=np.float64)
    ids, tgt = batch(SPARSE, 2, 6)
    model.zero_grad()
    for _ in range(2):  # the reference: zeroed, then two backwards added
        model.backward(model.forward_loss(ids, tgt))
    twice = model.flat_grads.copy()
    model.loss_and_grad(ids, tgt)  # written
    model.backward(model.forward_loss(ids, tgt))  # added
    np.testing.assert_array_equal(model.flat_grads, twice)
    model.loss_and_grad(ids, tgt)
    np.testing.assert_allclose(model.flat_grads, twice / 2, rtol=1e-14)


@pytest.mark.parametrize("rows", [1, 2, 7])
def test_weight_grad_writes_or_adds_the_product(rows):
    rng = np.random.default_rng(rows)
    a, b = rng.standard_normal((5, rows)), rng.standard_normal((rows, 3))  # [in, C], [C, out]
    dw = np.full((5, 3), np.nan)
    weight_grad(a, b, dw, overwrite=True)
    np.testing.assert_array_equal(dw, a @ b)  # one term per entry for rows = 1: exact
    start = rng.standard_normal((5, 3))
    acc = start.copy()
    weight_grad(a, b, acc)
    np.testing.assert_array_equal(acc, start + a @ b)


@pytest.mark.parametrize("overwrite", [False, True])
def test_embedding_backward_on_flat_indices_equals_row_adds(overwrite):
    """The flat-index path (contiguous dW) and the row path (any other layout) add the
    same terms in the same order: bit for bit equal, repeated ids accumulated."""
    rng = np.random.default_rng(4)
    ids = np.array([3, 1, 3, 3, 9, 0, 1])
    dout = rng.standard_normal((ids.size, 5)).astype(np.float32)  # [N, H]
    start = rng.standard_normal((10, 5)).astype(np.float32)  # [V, H]
    flat = start.copy()
    strided = np.asfortranarray(start)  # not C-contiguous: the row path
    embedding_backward(dout, ids, flat, overwrite=overwrite)
    embedding_backward(dout, ids, strided, overwrite=overwrite)
    np.testing.assert_array_equal(flat, strided)
    expected = np.zeros_like(start) if overwrite else start.astype(np.float64)
    for i, t in enumerate(ids):
        expected[t] += dout[i]
    np.testing.assert_allclose(flat, expected, rtol=1e-6, atol=1e-6)
    assert (flat[[2, 4]] == (0 if overwrite else start[[2, 4]])).all()  # untouched rows
