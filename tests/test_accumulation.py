"""Gradient accumulation: M micro-batches of b rows, one AdamW step, against one batch of M b.

Shape legend: B batch, S sequence, L layers, E experts, M = grad_accum_steps.

What is equal (float64, 1e-12 relative): the cross-entropy, its gradient, and with
aux_loss_weight = 0 the whole update. The aux loss under accumulation is the mean over
micro-batches of each micro-batch's aux loss (f_e and P_e of that micro-batch); it differs
from the whole batch's by alpha E sum_e cov_m(f_e, P_e) per layer, tested here exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from nn_core import Config, MoETransformer
from nn_core.errors import ConfigError, InputError
from nn_core.model.moe import routing_stats
from nn_core.training.config import TrainConfig, resolve_run_config
from nn_core.training.trainer import Trainer

TINY = Config.tiny()
RTOL = 1e-12


def rows(b: int, s: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (b, s)), rng.integers(0, 256, (b, s))  # [B, S] each


def trainer(accum: int, batch: int = 8, **kw: object) -> Trainer:
    cfg = dict(batch_size=batch, seq_len=8, lr=1e-2, warmup_steps=1, total_steps=50, seed=3)
    tcfg = TrainConfig(**{**cfg, "grad_accum_steps": accum, **kw})  # type: ignore[arg-type]
    return Trainer(MoETransformer(TINY, seed=5, dtype=np.float64), tcfg)


def rel(a: np.ndarray | float, b: np.ndarray | float) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def test_without_aux_loss_m_micro_batches_equal_one_batch_over_several_steps() -> None:
    one, accum = trainer(1, aux_loss_weight=0.0), trainer(4, aux_loss_weight=0.0)
    for step in range(4):
        ids, tgt = rows(8, seed=step)
        a, b = one.train_step(ids, tgt), accum.train_step(ids, tgt)
        assert rel(b["loss"], a["loss"]) < RTOL and rel(b["grad_norm"], a["grad_norm"]) < RTOL
    assert rel(accum.model.flat_params, one.model.flat_params) < RTOL
    assert rel(accum.optimizer.v, one.optimizer.v) < RTOL


def test_cross_entropy_and_its_gradient_equal_the_whole_batch_with_aux_on() -> None:
    ids, tgt = rows(8)
    whole = MoETransformer(TINY, seed=5, dtype=np.float64)
    whole.loss_terms_and_grad(ids, tgt, aux_loss_weight=0.0)
    t = trainer(4)  # aux_loss_weight 0.01
    terms = t._gradient(ids, tgt)
    assert rel(terms.ce, whole.loss_terms(ids, tgt, 0.0).ce) < RTOL
    # the gradient is the CE gradient of the whole batch plus the mean of the micro-batch
    # aux-loss gradients, each from the public loss_and_grad of that micro-batch
    aux_grad = np.zeros_like(whole.flat_grads)
    ref = MoETransformer(TINY, seed=5, dtype=np.float64)
    for m in range(4):
        sl = slice(2 * m, 2 * m + 2)
        ref.loss_terms_and_grad(ids[sl], tgt[sl], aux_loss_weight=0.01)
        aux_grad += ref.flat_grads / 4
        ref.loss_terms_and_grad(ids[sl], tgt[sl], aux_loss_weight=0.0)
        aux_grad -= ref.flat_grads / 4
    assert rel(t.model.flat_grads, whole.flat_grads + aux_grad) < RTOL


def test_aux_loss_is_the_mean_of_micro_batch_aux_and_differs_by_the_covariance() -> None:
    ids, tgt = rows(8, seed=1)
    alpha, m_count = 0.01, 4
    t = trainer(m_count, aux_loss_weight=alpha)
    terms = t._gradient(ids, tgt)
    model = MoETransformer(TINY, seed=5, dtype=np.float64)
    micro = [
        model.loss_terms(ids[2 * m : 2 * m + 2], tgt[2 * m : 2 * m + 2], alpha) for m in range(4)
    ]
    assert rel(terms.aux, np.mean([x.aux for x in micro])) < RTOL
    # f [M, L, E] and P [M, L, E] of each micro-batch, from its routing
    f = np.zeros((m_count, TINY.n_layers, TINY.n_experts))
    p = np.zeros_like(f)
    for m in range(m_count):
        state = model.forward_loss(ids[2 * m : 2 * m + 2], tgt[2 * m : 2 * m + 2], alpha)
        for layer, r in enumerate(state.routing):
            f[m, layer] = r.counts / r.counts.sum()
            p[m, layer] = r.probs.mean(axis=0)
        model.backward(state)
    cov = (f * p).mean(axis=0) - f.mean(axis=0) * p.mean(axis=0)  # cov_m(f_e, P_e)  [L, E]
    whole_aux = model.loss_terms(ids, tgt, alpha).aux
    assert rel(terms.aux - whole_aux, alpha * TINY.n_experts * cov.sum()) < 1e-9
    assert abs(terms.aux - whole_aux) > 1e-8  # a real difference on this batch


def test_routing_statistics_of_the_step_are_those_of_the_whole_batch() -> None:
    ids, tgt = rows(8, seed=2)
    t = trainer(4)
    t._gradient(ids, tgt)
    model = MoETransformer(TINY, seed=5, dtype=np.float64)
    state = model.forward_loss(ids, tgt)
    for mine, whole in zip(t.last_routing_stats, state.routing_stats()):
        assert np.array_equal(mine.counts, whole.counts) and mine.tokens == whole.tokens == 64
        assert rel(mine.prob_sum, whole.prob_sum) < RTOL
        assert rel(mine.entropy_sum, whole.entropy_sum) < RTOL
    one = trainer(1)
    one._gradient(ids, tgt)  # the one-step path computes them from its routing
    assert [s.counts.tolist() for s in one.last_routing_stats] == [
        routing_stats(r).counts.tolist() for r in state.routing
    ]


def test_checkpoint_keeps_grad_accum_steps_and_resume_is_exact(tmp_path) -> None:  # type: ignore[no-untyped-def]
    straight = trainer(2)
    for step in range(4):
        straight.train_step(*rows(8, seed=step))
    first = trainer(2)
    for step in range(2):
        first.train_step(*rows(8, seed=step))
    first.save(tmp_path / "ck")
    resumed = Trainer.resume(tmp_path / "ck")
    assert resumed.config.grad_accum_steps == 2
    for step in range(2, 4):
        resumed.train_step(*rows(8, seed=step))
    assert np.array_equal(resumed.model.flat_params, straight.model.flat_params)
    assert np.array_equal(resumed.optimizer.m, straight.optimizer.m)


def test_grad_accum_steps_is_checked_and_set_from_the_command_line_syntax() -> None:
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        TrainConfig(batch_size=8, grad_accum_steps=3)
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        TrainConfig(grad_accum_steps=0)
    _, _, tcfg = resolve_run_config("tiny", ["grad_accum_steps=4"])
    assert tcfg.grad_accum_steps == 4 and tcfg.batch_size == 8
    t = trainer(4)
    with pytest.raises(InputError, match="grad_accum_steps"):
        t.train_step(*rows(6))  # 6 rows do not split into 4 equal micro-batches
    assert t.step == 0
