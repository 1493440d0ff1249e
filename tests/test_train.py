"""Training: cross-entropy, AdamW, clipping, LR schedule, TrainConfig, the Trainer.

Shape legend: B batch, S sequence, N = B*S tokens, V vocab, P parameters.
"""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest

from nn_core import Config, MoETransformer
from nn_core.data.dataset import BatchSampler
from nn_core.errors import ConfigError, InputError, NonFiniteError
from nn_core.model.loss import cross_entropy_backward, cross_entropy_forward
from nn_core.training.config import TrainConfig
from nn_core.training.optim import AdamW, adamw_update, clip_grad_norm, get_lr, global_norm
from nn_core.training.trainer import Trainer

TINY = Config.tiny()


def batch(b: int = 2, s: int = 8, seed: int = 0, vocab: int = 1000) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (b, s)), rng.integers(0, vocab, (b, s))  # [B, S] each


def small_cfg(**kw: object) -> TrainConfig:
    base = dict(batch_size=2, seq_len=8, lr=1e-3, warmup_steps=2, total_steps=50, seed=7)
    return TrainConfig(**{**base, **kw})


# ---- TrainConfig -----------------------------------------------------------------------


def test_train_config_spec_defaults() -> None:
    c = TrainConfig()
    assert (c.batch_size, c.seq_len, c.lr, c.warmup_steps, c.total_steps) == (
        4,
        2048,
        1e-4,
        1000,
        100_000,
    )
    assert (c.grad_clip, c.aux_loss_weight) == (1.0, 0.01)
    assert (c.beta1, c.beta2, c.eps, c.weight_decay) == (0.9, 0.95, 1e-8, 0.1)
    assert c.activation_checkpointing is False
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert json.loads(json.dumps(c.to_dict())) == c.to_dict()


@pytest.mark.parametrize(
    "field,value",
    [
        ("batch_size", 0),
        ("seq_len", 1.5),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("warmup_steps", -1),
        ("warmup_steps", 100_000),  # must be < total_steps
        ("total_steps", 0),
        ("grad_clip", 0.0),
        ("aux_loss_weight", -0.1),
        ("beta1", 1.0),
        ("beta2", -0.5),
        ("eps", 0.0),
        ("weight_decay", -1.0),
        ("activation_checkpointing", 1),
        ("eval_interval", -1),
        ("checkpoint_interval", -5),
        ("keep_checkpoints", 0),
        ("seed", -1),
        ("batch_size", True),
    ],
)
def test_train_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_train_config_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    assert TrainConfig().replace(lr=3e-4).lr == 3e-4


# ---- LR schedule -----------------------------------------------------------------------


def test_get_lr_points() -> None:
    cfg = TrainConfig(lr=1e-3, warmup_steps=100, total_steps=1100)
    assert get_lr(0, cfg) == 0.0  # warmup starts at 0
    assert get_lr(50, cfg) == pytest.approx(0.5e-3, rel=1e-15)  # half way up
    assert get_lr(100, cfg) == pytest.approx(1e-3, rel=1e-15)  # end of warmup: peak
    assert get_lr(600, cfg) == pytest.approx(0.55e-3, rel=1e-12)  # mid cosine: (lr+min)/2
    assert get_lr(1100, cfg) == pytest.approx(1e-4, rel=1e-12)  # total_steps: min_lr
    assert get_lr(5000, cfg) == pytest.approx(1e-4, rel=1e-12)  # beyond: stays at min_lr
    lrs = [get_lr(t, cfg) for t in range(1200)]
    assert all(a <= b for a, b in zip(lrs[:100], lrs[1:101]))  # rises through warmup
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))  # then never rises
    assert get_lr(0, TrainConfig(warmup_steps=0, total_steps=10, lr=2e-3)) == 2e-3
    with pytest.raises(InputError, match="step"):
        get_lr(-1, cfg)


# ---- cross-entropy ---------------------------------------------------------------------


def test_cross_entropy_matches_direct_formula_and_finite_differences() -> None:
    rng = np.random.default_rng(1)
    n, v = 6, 11
    logits = rng.normal(0, 2, (n, v))  # [N, V] float64
    targets = rng.integers(0, v, n)  # [N]
    loss, cache = cross_entropy_forward(logits.copy(), targets)
    grad = cross_entropy_backward(cache)  # [N, V]
    # direct formula: L = -(1/N) sum_i log softmax(logits_i)[target_i], no max shift
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(n), targets])), rel=1e-13)
    onehot = np.eye(v)[targets]
    np.testing.assert_allclose(grad, (p - onehot) / n, rtol=1e-12, atol=1e-15)
    # central differences in float64 over every coordinate
    h = 1e-6
    fd = np.zeros_like(logits)
    for idx in np.ndindex(*logits.shape):
        up, down = logits.copy(), logits.copy()
        up[idx] += h
        down[idx] -= h
        fd[idx] = cross_entropy_forward(up, targets)[0] - cross_entropy_forward(down, targets)[0]
        fd[idx] /= 2 * h
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


def test_cross_entropy_is_stable_for_huge_logits() -> None:
    logits = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4]], dtype=np.float32)
    loss, cache = cross_entropy_forward(logits, np.array([0, 0]))
    assert math.isfinite(loss) and loss == pytest.approx(0.5 * (1e4 + math.log(2)), rel=1e-6)
    assert np.isfinite(cross_entropy_backward(cache)).all()


def test_model_gradient_with_aux_matches_finite_differences() -> None:
    """Directional derivative of the whole loss (CE + aux), float64, random direction."""
    model = MoETransformer(TINY, seed=3, dtype=np.float64)
    ids, tgt = batch(2, 5, seed=4)
    terms = model.loss_terms_and_grad(ids, tgt, 0.01)
    assert terms.total == pytest.approx(terms.ce + terms.aux, rel=1e-15)
    assert terms.aux > 0
    grad = model.flat_grads.copy()
    w0 = model.flat_params.copy()
    d = np.random.default_rng(5).normal(size=w0.size)
    d /= np.linalg.norm(d)
    h = 1e-5
    model.flat_params[:] = w0 + h * d
    up = model.loss_terms(ids, tgt, 0.01).total
    model.flat_params[:] = w0 - h * d
    down = model.loss_terms(ids, tgt, 0.01).total
    model.flat_params[:] = w0
    fd = (up - down) / (2 * h)
    assert grad @ d == pytest.approx(fd, rel=1e-6)


# ---- AdamW -----------------------------------------------------------------------------


def scalar_adamw(w, g, m, v, lr, b1, b2, eps, wd, t):  # type: ignore[no-untyped-def]
    """AdamW as docs/training.md, section 4 writes it, one Python float at a time."""
    for i in range(len(w)):
        m[i] = b1 * m[i] + (1 - b1) * g[i]
        v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
        m_hat = m[i] / (1 - b1**t)
        v_hat = v[i] / (1 - b2**t)
        w[i] -= lr * (m_hat / (math.sqrt(v_hat) + eps) + wd * w[i])


@pytest.mark.parametrize("dtype,rtol,atol", [(np.float64, 1e-13, 0.0), (np.float32, 2e-6, 1e-8)])
def test_adamw_matches_scalar_reference(dtype: type, rtol: float, atol: float) -> None:
    rng = np.random.default_rng(2)
    n = 300
    w_ref = rng.normal(size=n).tolist()
    m_ref, v_ref = [0.0] * n, [0.0] * n
    params = np.array(w_ref, dtype=dtype)
    grads = np.zeros(n, dtype=dtype)
    opt = AdamW(params, grads, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    for t, lr in enumerate([1e-3, 3e-3, 2e-2, 5e-4, 1e-2], start=1):
        g = rng.normal(scale=0.1, size=n).astype(dtype)
        g[:5] = 0.0  # never-touched coordinates: only weight decay moves them
        grads[:] = g
        opt.step(lr)
        scalar_adamw(w_ref, g.tolist(), m_ref, v_ref, lr, 0.9, 0.95, 1e-8, 0.1, t)
        assert opt.t == t
        np.testing.assert_allclose(params, w_ref, rtol=rtol, atol=0)
        np.testing.assert_allclose(opt.m, m_ref, rtol=rtol, atol=atol)  # float32: cancellation
        np.testing.assert_allclose(opt.v, v_ref, rtol=rtol, atol=atol**2)
    if dtype == np.float64:  # m and v are computed exactly as the formula reads
        assert np.array_equal(opt.m, m_ref) and np.array_equal(opt.v, v_ref)


def test_adamw_blocks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import nn_core.training.optim as train_mod

    rng = np.random.default_rng(3)
    n = 10_007  # not a multiple of any block
    init = [rng.normal(size=n).astype(np.float32) for _ in range(2)]

    def run(block_bytes: int) -> list[np.ndarray]:
        monkeypatch.setattr(train_mod, "BLOCK_BYTES", block_bytes)
        p, g = init[0].copy(), init[1].copy()
        m, v = np.zeros_like(p), np.zeros_like(p)
        for t in (1, 2, 3):
            adamw_update(p, g, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, t)
        return [p, m, v]

    whole, blocked = run(1 << 30), run(64 * 4 + 4)
    for a, b in zip(whole, blocked):
        assert np.array_equal(a, b)


def test_adamw_state_dict_round_trip_and_checks() -> None:
    p, g = np.ones(10, np.float32), np.full(10, 0.5, np.float32)
    opt = AdamW(p, g)
    opt.step(1e-3)
    state = opt.state_dict()
    opt2 = AdamW(p.copy(), g)
    opt2.load_state_dict(state)
    assert opt2.t == 1 and np.array_equal(opt2.m, opt.m) and np.array_equal(opt2.v, opt.v)
    with pytest.raises(InputError, match="optimizer state m"):
        opt2.load_state_dict({"m": np.zeros(3, np.float32), "v": opt.v, "t": 1})
    with pytest.raises(InputError, match="grads must match params"):
        AdamW(p, np.zeros(10, np.float64))


def test_adamw_update_allocates_no_big_temporaries() -> None:
    """The small config's size (7.1M parameters), float32. Its speed is the benchmark's
    business (the training scenarios), never a bound in a unit test."""
    n = Config.small().total_params()
    rng = np.random.default_rng(0)
    p = rng.normal(size=n).astype(np.float32)
    g = rng.normal(size=n).astype(np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    tracemalloc.start()
    adamw_update(p, g, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # one block of scratch, not a [P] temporary (28 MB here)


# ---- clipping --------------------------------------------------------------------------


def test_clip_grad_norm_returns_norm_before_clipping_and_clips_to_max() -> None:
    g = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    ref = float(np.linalg.norm(g.astype(np.float64)))
    norm = clip_grad_norm(g, 1.0)
    assert norm == pytest.approx(ref, rel=1e-12)  # before clipping
    assert global_norm(g) == pytest.approx(1.0, rel=1e-6)  # clipped norm == clip


def test_clip_grad_norm_leaves_small_gradients_alone() -> None:
    g = np.full(100, 0.01, np.float32)  # norm 0.1
    before = g.copy()
    assert clip_grad_norm(g, 1.0) == pytest.approx(0.1, rel=1e-6)
    assert np.array_equal(g, before)


def test_global_norm_accumulates_in_float64() -> None:
    g = np.full(3_000_000, 1e-3, np.float32)  # spans many blocks
    assert global_norm(g) == pytest.approx(math.sqrt(3_000_000) * float(np.float32(1e-3)), 1e-12)
    big = np.array([3e30, 4e30], np.float32)  # squares overflow float32, not float64
    assert global_norm(big) == pytest.approx(5e30, rel=1e-6)


def test_clip_grad_norm_with_non_finite_gradient_changes_nothing() -> None:
    g = np.ones(10, np.float32)
    g[3] = np.nan
    before = g.copy()
    assert math.isnan(clip_grad_norm(g, 1.0))
    assert np.array_equal(g, before, equal_nan=True)


# ---- Trainer ---------------------------------------------------------------------------


def test_train_step_is_loss_grad_clip_adamw_with_get_lr() -> None:
    cfg = small_cfg(warmup_steps=2, grad_clip=0.5, kernels="numpy")  # the NumPy reference pieces
    trainer = Trainer(MoETransformer(TINY, seed=1), cfg)
    manual = MoETransformer(TINY, seed=1)
    opt = AdamW.for_model(manual, cfg)
    w0 = trainer.model.flat_params.copy()
    for t in range(4):
        ids, tgt = batch(seed=t)
        out = trainer.train_step(ids, tgt)
        terms = manual.loss_terms_and_grad(ids, tgt, cfg.aux_loss_weight)
        norm = clip_grad_norm(manual.flat_grads, cfg.grad_clip)
        opt.step(get_lr(t, cfg))
        assert set(out) == {"step", "loss", "ce", "aux", "grad_norm", "lr"}
        assert out["step"] == t and trainer.step == t + 1 and trainer.optimizer.t == t + 1
        assert out["lr"] == get_lr(t, cfg)
        assert (out["loss"], out["ce"], out["aux"], out["grad_norm"]) == (*terms, norm)
        assert np.array_equal(trainer.model.flat_params, manual.flat_params)
        if t == 0:  # lr 0 at update 0: the schedule is really applied
            assert np.array_equal(trainer.model.flat_params, w0)
    assert not np.array_equal(trainer.model.flat_params, w0)


def poisoned_trainer(token: int = 999, out_dir: object = None, **kw: object) -> Trainer:
    """Embedding row ``token`` is NaN: any batch using that token has a NaN loss."""
    model = MoETransformer(TINY, seed=2)
    model.parameters()["embed.weight"][token] = np.nan
    return Trainer(model, small_cfg(**kw), out_dir=out_dir)


def test_non_finite_guard_refuses_the_update(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trainer = poisoned_trainer(out_dir=tmp_path)
    clean = (np.arange(16).reshape(2, 8), np.arange(1, 17).reshape(2, 8))  # no token 999
    trainer.train_step(*clean)
    trainer.train_step(*clean)
    before = [trainer.model.flat_params.copy(), trainer.optimizer.m.copy()]
    before.append(trainer.optimizer.v.copy())
    ids = clean[0].copy()
    ids[1, 3] = 999  # the poisoned batch
    with pytest.raises(NonFiniteError, match=r"step 2\b.*none saved yet"):
        trainer.train_step(ids, clean[1])
    after = [trainer.model.flat_params, trainer.optimizer.m, trainer.optimizer.v]
    for a, b in zip(before, after):
        assert np.array_equal(a, b, equal_nan=True)
    assert trainer.step == 2 and trainer.optimizer.t == 2
    assert not list(tmp_path.iterdir())


def test_non_finite_guard_in_fit_writes_nothing_for_the_bad_step(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nn_core.storage.checkpoint import latest_checkpoint, load_training_checkpoint

    trainer = poisoned_trainer(checkpoint_interval=2)
    clean = (np.arange(16).reshape(2, 8), np.arange(1, 17).reshape(2, 8))
    poisoned = (np.full((2, 8), 999), clean[1])
    batches = [clean, clean, clean, poisoned, clean]
    metrics = tmp_path / "metrics.jsonl"
    with pytest.raises(NonFiniteError, match=r"step 3\b.*step_000002"):
        trainer.fit(iter(batches), 5, metrics_path=metrics, checkpoint_dir=tmp_path, progress=False)
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2]  # nothing for step 3
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".nn-core-run", "latest", "metrics.jsonl", "step_000002"]  # + run marker
    assert latest_checkpoint(tmp_path).name == "step_000002"
    assert load_training_checkpoint(tmp_path).state["step"] == 2
    assert trainer.step == 3  # the refused update did not count


def test_activation_checkpointing_gives_bitwise_identical_gradients() -> None:
    model = MoETransformer(TINY, seed=5)
    ids, tgt = batch(2, 24, seed=6)
    plain = model.loss_terms_and_grad(ids, tgt, 0.01)
    g_plain = model.flat_grads.copy()
    ckpt = model.loss_terms_and_grad(ids, tgt, 0.01, activation_checkpointing=True)
    assert plain == ckpt
    assert np.array_equal(model.flat_grads, g_plain)
    # and through the trainer: identical trajectories
    runs = []
    for flag in (False, True):
        trainer = Trainer(MoETransformer(TINY, seed=5), small_cfg(activation_checkpointing=flag))
        losses = [trainer.train_step(*batch(2, 24, seed=s))["loss"] for s in range(3)]
        runs.append((losses, trainer.model.flat_params.copy()))
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1])


def peak_bytes(model: MoETransformer, ids: np.ndarray, tgt: np.ndarray, ckpt: bool) -> int:
    tracemalloc.start()
    model.loss_and_grad(ids, tgt, 0.01, activation_checkpointing=ckpt)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_activation_checkpointing_lowers_peak_memory() -> None:
    model = MoETransformer(TINY, seed=5)
    ids, tgt = batch(2, 256, seed=7)
    plain = peak_bytes(model, ids, tgt, False)
    ckpt = peak_bytes(model, ids, tgt, True)
    print(
        f"\npeak traced memory, loss_and_grad tiny B=2 S=256: plain {plain / 2**20:.2f} MiB, "
        f"checkpointing {ckpt / 2**20:.2f} MiB (saved {(plain - ckpt) / 2**20:.2f} MiB)"
    )
    assert ckpt < 0.9 * plain


def test_fit_metrics_eval_checkpoints_and_progress(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from nn_core.storage.checkpoint import latest_checkpoint, list_checkpoints

    cfg = small_cfg(eval_interval=2, checkpoint_interval=2, keep_checkpoints=2)
    ids = np.random.default_rng(0).integers(0, 1000, 400)
    sampler = BatchSampler(ids, batch_size=2, seq_len=8, seed=3)
    trainer = Trainer(MoETransformer(TINY, seed=1), cfg, out_dir=tmp_path)
    held_out = [batch(2, 8, seed=100), batch(2, 8, seed=101)]
    history = trainer.fit(sampler, 7, eval_batches=held_out, progress=True)
    assert len(history) == 7 and trainer.step == 7
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(7))
    required = {"step", "loss", "ce", "aux", "grad_norm", "lr", "tokens_per_sec"}
    for line, hist in zip(lines, history):
        assert required <= set(line)
        assert line["loss"] == hist["loss"] and line["tokens_per_sec"] > 0
        assert ("val_loss" in line) == ((line["step"] + 1) % 2 == 0)
    val = lines[1]
    assert math.isfinite(val["val_loss"])
    assert val["val_loss"] == pytest.approx(val["val_ce"] + val["val_aux"], rel=1e-12)
    # interval 2 -> steps 2, 4, 6, plus the end (7); newest 2 kept
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000006", "step_000007"]
    assert latest_checkpoint(tmp_path).name == "step_000007"
    state = json.loads((tmp_path / "step_000007" / "state.json").read_text())
    assert state["data_state"]["batches_drawn"] == 7  # the sampler became the data source
    err = capsys.readouterr().err
    assert "loss=" in err and "tok_s=" in err and "7/7" in err


def test_fit_accepts_callables_and_iterables_and_warns_when_batches_run_out() -> None:
    trainer = Trainer(MoETransformer(TINY, seed=1), small_cfg())
    assert len(trainer.fit(lambda: batch(), 2, progress=False)) == 2
    with pytest.warns(RuntimeWarning, match="ran out after 3 of 5"):
        history = trainer.fit([batch(seed=s) for s in range(3)], 5, progress=False)
    assert len(history) == 3 and trainer.step == 5
    with pytest.raises(InputError, match="batches"):
        trainer.fit(42, 1, progress=False)
    with pytest.raises(InputError, match="steps"):
        trainer.fit(lambda: batch(), -1, progress=False)
