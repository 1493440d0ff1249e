"""Tests of nn_core.inference.sampling: greedy / temperature / top-k / top-p and their contracts."""

from __future__ import annotations

import re

import numpy as np
import pytest

from nn_core.errors import ConfigError, InputError
from nn_core.inference.sampling import (
    Greedy,
    SamplingStrategy,
    Temperature,
    TopK,
    TopP,
    check_logits,
    make_strategy,
    softmax64,
)

STOCHASTIC = [Temperature(1.0), Temperature(0.7), TopK(3), TopK(5, 1.3), TopP(0.8), TopP(1.0, 0.5)]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _logits(b: int, v: int, seed: int = 1) -> np.ndarray:
    return _rng(seed).normal(size=(b, v)).astype(np.float32)  # [B, V]


def _draws(strategy: SamplingStrategy, row: np.ndarray, n: int, seed: int = 3) -> np.ndarray:
    """n independent picks from one logits row [V] (as one batch [n, V])."""
    return strategy.pick_tokens(np.tile(row, (n, 1)), _rng(seed))


def test_greedy_is_argmax_and_needs_no_rng():
    x = _logits(6, 50)
    assert Greedy().pick_tokens(x).tolist() == np.argmax(x, axis=1).tolist()
    for row in x:
        assert Greedy().pick_token(row) == int(np.argmax(row))
    assert isinstance(Greedy().pick_token(x[0]), int)
    assert Greedy().pick_tokens(x).dtype == np.int64


def test_greedy_ties_go_to_lowest_id():
    row = np.array([0.0, 2.0, 1.0, 2.0])
    assert Greedy().pick_token(row) == 1
    assert TopK(1).pick_token(row, _rng()) == 1


def test_top_k_1_equals_greedy():
    x = _logits(64, 100)
    assert TopK(1).pick_tokens(x, _rng()).tolist() == Greedy().pick_tokens(x).tolist()


@pytest.mark.parametrize("strategy", [Temperature(0), TopK(7, 0.0), TopP(0.5, 0.0)])
def test_temperature_zero_is_greedy_and_draws_nothing(strategy):
    x = _logits(16, 40)
    rng = _rng(5)
    before = rng.bit_generator.state
    assert strategy.is_greedy
    assert strategy.pick_tokens(x, rng).tolist() == Greedy().pick_tokens(x).tolist()
    assert rng.bit_generator.state == before
    assert strategy.pick_token(x[0]) == Greedy().pick_token(x[0])  # no rng needed


def test_low_temperature_concentrates_on_argmax():
    row = np.array([1.0, 3.0, 2.9, -1.0])
    picks = _draws(Temperature(1e-3), row, 500)
    assert set(picks.tolist()) == {1}


def test_top_k_never_picks_outside_top_k():
    row = _logits(1, 60, seed=8)[0]
    top5 = set(np.argsort(-row)[:5].tolist())
    picks = _draws(TopK(5, temperature=2.0), row, 5000)
    assert set(picks.tolist()) == top5  # only the top 5, and each of them appears


def test_top_k_larger_than_vocab_is_clamped():
    row = _logits(1, 6)[0]
    a = _draws(TopK(1000), row, 300, seed=9)
    b = _draws(Temperature(1.0), row, 300, seed=9)
    assert a.tolist() == b.tolist()


def test_top_p_small_picks_only_the_nucleus():
    probs = np.array([0.05, 0.5, 0.3, 0.1, 0.05])
    row = np.log(probs)
    assert set(_draws(TopP(0.3), row, 2000).tolist()) == {1}
    assert set(_draws(TopP(0.7), row, 2000).tolist()) == {1, 2}
    assert set(_draws(TopP(0.85), row, 2000).tolist()) == {1, 2, 3}


def test_top_p_one_can_pick_every_token_with_nonzero_probability():
    row = np.append(np.log([0.02, 0.5, 0.3, 0.1, 0.08]), -np.inf)  # last token: probability 0
    picks = _draws(TopP(1.0), row, 5000)
    assert set(picks.tolist()) == {0, 1, 2, 3, 4}


def test_temperature_one_frequencies_match_softmax():
    row = np.array([0.5, -1.0, 2.0, 0.0, 1.0])
    n = 20000
    expected = n * softmax64(row[None, :], 1.0)[0]  # [V]
    counts = np.bincount(_draws(Temperature(1.0), row, n, seed=11), minlength=row.size)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0  # df = 4; P(chi2 > 18.5) = 0.001


def test_temperature_scales_the_distribution():
    row = np.array([0.0, 1.0, 2.0])
    hot = np.bincount(_draws(Temperature(5.0), row, 4000), minlength=3) / 4000
    cold = np.bincount(_draws(Temperature(0.3), row, 4000), minlength=3) / 4000
    assert cold[2] > 0.9 > hot[2] and hot[0] > 0.2


@pytest.mark.parametrize("strategy", STOCHASTIC)
def test_same_seed_same_picks(strategy):
    x = _logits(32, 30)
    a = strategy.pick_tokens(x, _rng(42))
    b = strategy.pick_tokens(x, _rng(42))
    c = strategy.pick_tokens(x, _rng(43))
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


@pytest.mark.parametrize("strategy", [Greedy(), *STOCHASTIC])
def test_pick_tokens_equals_pick_token_row_by_row(strategy):
    x = _logits(40, 25, seed=4)
    batch = strategy.pick_tokens(x, _rng(7))
    rng = _rng(7)
    rows = [strategy.pick_token(row, rng) for row in x]  # one uniform per row, in row order
    assert batch.tolist() == rows


def test_float32_and_float64_logits_agree():
    x = _logits(20, 30)
    for strategy in STOCHASTIC:
        a = strategy.pick_tokens(x, _rng(2))
        b = strategy.pick_tokens(x.astype(np.float64), _rng(2))
        assert a.tolist() == b.tolist()


def test_masked_tokens_are_never_picked():
    row = np.array([-np.inf, 0.0, -np.inf, 0.0])
    for strategy in [Greedy(), *STOCHASTIC]:
        assert set(_draws(strategy, row, 500).tolist()) <= {1, 3}


@pytest.mark.parametrize(
    ("make", "arg"),
    [
        (lambda: Temperature(-0.1), "temperature"),
        (lambda: Temperature(float("nan")), "temperature"),
        (lambda: Temperature(float("inf")), "temperature"),
        (lambda: Temperature("hot"), "temperature"),
        (lambda: TopK(0), "k"),
        (lambda: TopK(-3), "k"),
        (lambda: TopK(2.5), "k"),
        (lambda: TopK(True), "k"),
        (lambda: TopK(5, temperature=-1.0), "temperature"),
        (lambda: TopP(0.0), "p"),
        (lambda: TopP(1.01), "p"),
        (lambda: TopP(-0.5), "p"),
        (lambda: TopP(float("nan")), "p"),
        (lambda: TopP(0.9, temperature=float("nan")), "temperature"),
    ],
)
def test_bad_parameters_raise_config_error_naming_the_argument(make, arg):
    with pytest.raises(ConfigError, match=rf"\b{arg}\b") as info:
        make()
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "logits",
    [
        np.array([0.0, np.nan, 1.0]),
        np.array([0.0, np.inf, 1.0]),
        np.array([-np.inf, -np.inf]),
        np.zeros(0),
        np.zeros((2, 3)),  # pick_token wants one row
        np.array(["a", "b"]),
    ],
)
def test_bad_logits_raise_input_error(logits):
    for strategy in (Greedy(), Temperature(1.0), TopK(2), TopP(0.9)):
        with pytest.raises(InputError, match="logits"):
            strategy.pick_token(logits, _rng())


def test_nan_in_one_row_of_a_batch_raises():
    x = _logits(3, 5).astype(np.float64)
    x[1, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        TopK(2).pick_tokens(x, _rng())
    with pytest.raises(InputError, match=re.escape("[B, V]")):
        Greedy().pick_tokens(x[0])


@pytest.mark.parametrize(
    ("bad_row", "match"),
    [
        ([0.0, np.nan, -np.inf], "NaN"),
        ([0.0, np.inf, 1.0], r"\+inf"),
        ([-np.inf, -np.inf, -np.inf], "entirely -inf"),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_non_finite_problem_in_a_batch_is_named(bad_row, match, dtype):
    x = np.zeros((3, 3), dtype=dtype)
    x[0, 0] = -np.inf  # allowed: a masked token
    x[2] = bad_row
    for strategy in (Greedy(), TopP(0.9)):
        with pytest.raises(InputError, match=match):
            strategy.pick_tokens(x, _rng())


def test_float_logits_are_checked_without_a_copy():
    x = _logits(4, 30)  # float32
    assert check_logits(x, ndim=2) is x  # greedy reads them as they are
    assert Greedy().pick_tokens(x).tolist() == np.argmax(x.astype(np.float64), axis=1).tolist()
    ints = check_logits(np.array([[1, 5, 2]]), ndim=2)
    assert ints.dtype == np.float64 and ints.tolist() == [[1.0, 5.0, 2.0]]
    with pytest.raises(InputError, match="real-valued"):
        check_logits(np.array([[True, False]]), ndim=2)


def test_stochastic_strategy_requires_a_generator():
    with pytest.raises(TypeError, match="Generator"):
        Temperature(1.0).pick_token(np.zeros(3))


def test_strategies_are_frozen_and_comparable():
    s = TopK(5, 0.8)
    with pytest.raises(AttributeError):
        s.k = 3  # type: ignore[misc]
    assert s == TopK(5, 0.8) and s != TopK(5, 0.9)


def test_make_strategy():
    assert make_strategy("greedy", temperature=0.3) == Greedy()
    assert make_strategy("temperature", temperature=0.7) == Temperature(0.7)
    assert make_strategy("sample", temperature=0.7) == Temperature(0.7)
    assert make_strategy("top_k", temperature=0.5, top_k=8) == TopK(8, 0.5)
    assert make_strategy("Top-K", top_k=8) == TopK(8, 1.0)
    assert make_strategy("top_p", top_p=0.95, temperature=0.9) == TopP(0.95, 0.9)
    with pytest.raises(ConfigError, match="strategy"):
        make_strategy("beam")
    with pytest.raises(ConfigError, match="top_k"):
        make_strategy("top_k", top_k=0)
    with pytest.raises(ConfigError, match="top_p"):
        make_strategy("top_p", top_p=2.0)
