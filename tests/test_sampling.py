"""Tests of nn_core.inference.sampling: greedy / temperature / top-k / top-p and their contracts.

The distribution each strategy samples from (``strategy.probs``) is compared with a
direct formula written here in plain Python (sorted lists, loops, math.exp), at
temperatures other than 1, on rows with exact ties, near-ties (1e-12 apart) and ties
at the top-k and top-p boundaries; the draws of ``pick_tokens`` are compared with
``probs`` by a chi-squared test (tests/stats.py, significance 1e-4, fixed seeds).
The same checking function, ``distribution_errors``, must report the sampling bugs
that once passed every test (mutants below), injected into ``probs`` or into the
sampling alone.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np
import pytest
from oracles import require_oracle
from stats import chi2_sf, chi_squared_test, inverse_cdf

from nn_core.errors import ConfigError, InputError
from nn_core.inference.sampling import (
    Greedy,
    MinP,
    RepetitionPenalty,
    SamplingStrategy,
    Temperature,
    TopK,
    TopP,
    check_logits,
    make_strategy,
    sample_mult,
    softmax64,
    top_k_mask,
    top_p_mask,
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
        ([9.0, 0.0, np.nan], "NaN"),  # after the largest finite logit
        ([9.0, np.inf, np.nan], "NaN"),
        ([0.0, np.inf, 1.0], r"\+inf"),
        ([9.0, 1.0, np.inf], r"\+inf"),
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
        with pytest.raises(InputError, match=match):  # one row (greedy reads one value)
            strategy.pick_tokens(x[2:], _rng())


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


# ---- the distribution each strategy samples from, against a direct formula -------------

INF = math.inf
ROWS: dict[str, list[float]] = {  # V = 8 logits each
    "random": [0.19, -1.98, 1.13, 0.16, -0.81, 0.55, 1.96, -0.39],
    "exact ties": [1.0, 2.0, 2.0, 0.5, 2.0, -1.0, 0.5, 0.0],
    "near ties": [1.0, 1.0 + 1e-12, 1.0 - 1e-12, 0.3, 1.0, 0.3 + 1e-12, -2.0, 0.3],
    "masked": [-INF, 0.5, 0.5, -INF, 2.0, 0.0, -INF, 1.0],
    "uniform": [0.7] * 8,  # probabilities exactly 1/8: exact top-p boundaries
    "large spread": [30.0, 0.0, -30.0, 10.0, 10.0, 29.0, -5.0, 0.0],
    "top-k boundary tie": [0.1, 2.0, 1.0, 1.5, 1.0, 1.0, -0.5, 0.9],
    "top-k boundary near tie": [0.1, 2.0, 1.0, 1.5, 1.0 + 1e-12, 1.0, -0.5, 0.9],
}
GREEDY = [Greedy(), Temperature(0), TopK(3, 0.0), TopP(0.5, 0.0)]
SAMPLERS = [
    Temperature(0.5), Temperature(0.7), Temperature(1.0), Temperature(1.3), Temperature(2.0),
    TopK(1, 1.3), TopK(2, 1.0), TopK(3, 0.7), TopK(3, 2.0), TopK(5, 0.5), TopK(100, 1.3),
    TopP(0.125, 1.0), TopP(0.5, 0.7), TopP(0.6, 1.3), TopP(0.8, 0.5), TopP(0.9, 2.0),
    TopP(0.95, 0.7), TopP(1.0, 0.5),
]  # fmt: skip
RTOL = 1e-12  # float64 rounding of the same formula computed two ways
ALPHA = 1e-4  # significance of each chi-squared test
DRAWS = 20000  # per (strategy, row)


def ref_softmax(row: Sequence[float], t: float) -> list[float]:
    """exp((x_i - max x) / t) / sum_j exp((x_j - max x) / t); -inf -> 0."""
    top = max(x for x in row if x != -INF)
    e = [0.0 if x == -INF else math.exp((x - top) / t) for x in row]
    total = math.fsum(e)
    return [v / total for v in e]


def ref_probs(strategy: SamplingStrategy, row: Sequence[float]) -> list[float]:
    """The distribution the strategy's documentation promises, from its parameters."""
    v = len(row)
    t = getattr(strategy, "temperature", 0.0)
    if t == 0:  # greedy: the first (lowest) id of the maximum
        best = min(i for i in range(v) if row[i] == max(row))
        return [1.0 if i == best else 0.0 for i in range(v)]
    if isinstance(strategy, Temperature):
        return ref_softmax(row, t)
    if isinstance(strategy, TopK):
        kept = sorted(range(v), key=lambda i: (-row[i], i))[: strategy.k]  # ties: lower id
        return ref_softmax([row[i] if i in kept else -INF for i in range(v)], t)
    assert isinstance(strategy, TopP)
    q = ref_softmax(row, t)
    nucleus: list[int] = []
    mass = 0.0
    for i in sorted(range(v), key=lambda i: (-q[i], i)):  # most probable first, ties: lower id
        if strategy.p < 1 and mass >= strategy.p:
            break  # the nucleus reached p
        nucleus.append(i)
        mass += q[i]
    total = math.fsum(q[i] for i in nucleus)
    return [q[i] / total if i in nucleus else 0.0 for i in range(v)]


def probs_errors(strategy: SamplingStrategy, rows: dict[str, list[float]]) -> list[str]:
    """Where ``strategy.probs`` differs from ``ref_probs`` (batch and single rows)."""
    errors = []
    batch = strategy.probs(np.array(list(rows.values())))  # [B, V]
    for (name, row), got in zip(rows.items(), batch):
        want = np.array(ref_probs(strategy, row))
        single = strategy.probs(np.array(row))  # [V]
        if not np.array_equal(single, got):
            errors.append(f"{strategy!r} on {name!r}: probs of one row != its batch row")
        if got.dtype != np.float64 or not np.all(np.abs(got - want) <= RTOL * want):
            errors.append(f"{strategy!r} on {name!r}: probs {got.tolist()} != {want.tolist()}")
    return errors


def frequency_errors(
    strategy: SamplingStrategy, rows: dict[str, list[float]], draws: int = DRAWS
) -> list[str]:
    """Where the draws of ``pick_tokens`` do not fit ``strategy.probs`` (chi-squared)."""
    errors = []
    for seed, (name, row) in enumerate(rows.items()):
        probs = strategy.probs(np.array(row))  # [V]
        picks = strategy.pick_tokens(np.tile(row, (draws, 1)), _rng(100 + seed))  # [draws]
        counts = np.bincount(picks, minlength=len(row))  # [V]
        stat, df, p_value = chi_squared_test(counts, probs)
        if not p_value > ALPHA:
            errors.append(
                f"{strategy!r} on {name!r}: counts {counts.tolist()} do not fit probs "
                f"(chi2 {stat:.1f}, df {df}, p {p_value:.1e} <= {ALPHA})"
            )
    return errors


def distribution_errors(
    strategy: SamplingStrategy, rows: dict[str, list[float]] = ROWS
) -> list[str]:
    """Every way the strategy's distribution or its sampling is wrong (empty: none)."""
    return probs_errors(strategy, rows) + frequency_errors(strategy, rows)


@pytest.mark.parametrize("strategy", GREEDY + SAMPLERS, ids=repr)
def test_probs_equal_the_direct_formula(strategy):
    assert probs_errors(strategy, ROWS) == []


@pytest.mark.parametrize("strategy", GREEDY + SAMPLERS, ids=repr)
def test_sampling_frequencies_fit_probs(strategy):
    assert frequency_errors(strategy, ROWS) == []


def _support(strategy: SamplingStrategy, row: Sequence[float]) -> set[int]:
    assert probs_errors(strategy, {"row": list(row)}) == []
    return set(np.flatnonzero(strategy.probs(np.array(row))).tolist())


@pytest.mark.parametrize("t", [0.5, 0.7, 1.3, 2.0])
def test_ties_and_near_ties_at_the_top_k_boundary(t):
    assert _support(TopK(3, t), ROWS["top-k boundary tie"]) == {1, 3, 2}  # tie: lower id
    assert _support(TopK(3, t), ROWS["top-k boundary near tie"]) == {1, 3, 4}  # 1e-12 more
    assert _support(TopK(1, t), ROWS["near ties"]) == {1}
    assert _support(TopK(1, t), ROWS["exact ties"]) == {1}
    assert _support(TopK(2, t), ROWS["exact ties"]) == {1, 2}


@pytest.mark.parametrize("t", [0.5, 0.7, 1.3, 2.0])
def test_ties_and_near_ties_at_the_top_p_boundary(t):
    uniform = ROWS["uniform"]  # every probability exactly 1/8
    assert _support(TopP(0.5, t), uniform) == {0, 1, 2, 3}  # 4/8 reaches p: the 5th is out
    assert _support(TopP(0.5 + 1e-12, t), uniform) == {0, 1, 2, 3, 4}
    assert _support(TopP(0.5 - 1e-12, t), uniform) == {0, 1, 2, 3}
    assert _support(TopP(0.125, t), uniform) == {0}
    # a tied group of four straddles the boundary: its lower ids come first
    tied = [3.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, 0.0]
    q = ref_softmax(tied, t)
    assert _support(TopP(q[0] + 1.5 * q[1], t), tied) == {0, 1, 2}
    assert _support(TopP(q[0] + 3.5 * q[1], t), tied) == {0, 1, 2, 3, 4}
    # near ties rank by value: 1 (1 + 1e-12), then 0 and 4 (1.0), then 2 (1 - 1e-12)
    near = ROWS["near ties"]
    q = ref_softmax(near, t)
    assert _support(TopP(q[1] + 0.5 * q[0], t), near) == {1, 0}
    assert _support(TopP(q[1] + q[0] + 0.5 * q[4], t), near) == {1, 0, 4}
    assert _support(TopP(q[1] + q[0] + q[4] + 0.5 * q[2], t), near) == {1, 0, 4, 2}
    assert _support(TopP(q[1] + q[0] + q[4] + q[2] + 0.5 * q[5], t), near) == {1, 0, 4, 2, 5}


def test_probs_api():
    x = np.array(list(ROWS.values()), dtype=np.float32)  # [B, V] float32 logits
    for strategy in GREEDY + SAMPLERS:
        batch = strategy.probs(x)
        assert batch.shape == x.shape and batch.dtype == np.float64
        np.testing.assert_allclose(batch.sum(axis=1), 1.0, rtol=0, atol=1e-15 * x.shape[1])
        assert np.array_equal(batch, strategy.probs(x.astype(np.float64)))  # exact widening
        assert strategy.probs(x[0]).shape == (x.shape[1],)
        assert strategy.probs(x[0].tolist()).tolist() == batch[0].tolist()
    for strategy in GREEDY:  # a one-hot on exactly the token greedy picks
        assert np.argmax(strategy.probs(x), axis=1).tolist() == strategy.pick_tokens(x).tolist()
        assert set(strategy.probs(x).ravel().tolist()) == {0.0, 1.0}
    with pytest.raises(InputError, match="logits"):
        Temperature(0.7).probs(np.zeros((2, 3, 4)))
    with pytest.raises(InputError, match="NaN"):
        TopP(0.9).probs([0.0, np.nan])


@pytest.mark.parametrize("strategy", SAMPLERS, ids=repr)
def test_pick_tokens_is_the_inverse_cdf_of_probs_with_one_uniform_per_row(strategy):
    x = np.array(list(ROWS.values()) * 40)  # [320, V]
    picks = strategy.pick_tokens(x, _rng(8))
    u = _rng(8).random(x.shape[0])  # [B]: the uniforms pick_tokens drew, in row order
    want = [inverse_cdf(row.tolist(), u_b) for row, u_b in zip(strategy.probs(x), u)]
    assert picks.tolist() == want


@pytest.mark.parametrize("strategy", GREEDY + SAMPLERS, ids=repr)
def test_pick_tokens_equals_pick_token_row_by_row_on_ties(strategy):
    x = np.array(list(ROWS.values()) * 5)  # [40, V]
    batch = strategy.pick_tokens(x, _rng(9))
    rng = _rng(9)
    assert batch.tolist() == [strategy.pick_token(row, rng) for row in x]


# ---- the chi-squared helper (tests/stats.py) --------------------------------------------

# Critical values from the standard chi-squared table: P(X >= x) for X ~ chi2(df).
CHI2_TABLE = [
    (1, 3.841, 0.05), (1, 6.635, 0.01), (1, 10.828, 0.001), (2, 5.991, 0.05),
    (2, 13.816, 0.001), (3, 7.815, 0.05), (4, 9.488, 0.05), (4, 18.467, 0.001),
    (5, 11.070, 0.05), (7, 24.322, 0.001), (10, 18.307, 0.05), (10, 29.588, 0.001),
    (30, 43.773, 0.05), (100, 124.342, 0.05),
]  # fmt: skip


@pytest.mark.parametrize(("df", "x", "p"), CHI2_TABLE)
def test_chi2_sf_matches_the_table(df, x, p):
    assert chi2_sf(x, df) == pytest.approx(p, rel=2e-3)  # the table has 4 digits


@pytest.mark.parametrize("df", [1, 2, 3, 6, 11])
def test_chi2_sf_is_the_integral_of_the_density(df):
    """Q(x) = integral from x to infinity of x^(k/2-1) e^(-x/2) / (2^(k/2) Gamma(k/2))."""

    def pdf(z: np.ndarray) -> np.ndarray:
        log = (df / 2 - 1) * np.log(z) - z / 2 - df / 2 * math.log(2) - math.lgamma(df / 2)
        return np.exp(log)

    for x in (0.5, 2.0, df, 3.0 * df + 10):
        z = np.linspace(x, x + 400.0, 400_001)  # Simpson's rule; the tail beyond is < 1e-80
        f = pdf(z)
        h = z[1] - z[0]
        integral = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
        assert chi2_sf(x, df) == pytest.approx(integral, rel=1e-9, abs=1e-300)
    assert chi2_sf(0.0, df) == 1.0
    with pytest.raises(ValueError, match="df"):
        chi2_sf(1.0, 0)


def test_chi_squared_test_pools_small_bins_and_rejects_impossible_draws():
    probs = np.array([0.5, 0.3, 0.2, 1e-9, 0.0])
    stat, df, p = chi_squared_test(np.array([500, 300, 200, 0, 0]), probs)
    assert (stat, p) == (pytest.approx(0.0, abs=1e-6), pytest.approx(1.0)) and df == 2
    assert chi_squared_test(np.array([500, 300, 199, 0, 1]), probs)[2] == 0.0  # p_4 = 0
    assert chi_squared_test(np.array([900, 50, 50, 0, 0]), probs)[2] < 1e-50
    assert chi_squared_test(np.array([7, 0]), np.array([1.0, 0.0])) == (0.0, 0, 1.0)


# ---- mutants: the sampling bugs these tests exist to catch -------------------------------


@dataclasses.dataclass(frozen=True)
class UniformNucleus(TopP):
    """Bug: top-p picks uniformly inside the nucleus."""

    def _probs(self, logits):
        keep = top_p_mask(softmax64(logits, self.temperature), float(self.p))
        return keep / keep.sum(axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class TopKWithoutTemperature(TopK):
    """Bug: top-k ignores the temperature."""

    def _probs(self, logits):
        return softmax64(np.where(top_k_mask(logits, self.k), logits, -np.inf), 1.0)


@dataclasses.dataclass(frozen=True)
class NucleusNotRenormalized(TopP):
    """Bug: the nucleus is not renormalized; the left-over mass goes to the last kept
    token (what inverse CDF without the total does: u beyond the kept mass falls there)."""

    def _probs(self, logits):
        q = softmax64(logits, self.temperature)
        kept = np.where(top_p_mask(q, float(self.p)), q, 0.0)
        rows = np.arange(kept.shape[0])
        last = kept.shape[1] - 1 - np.argmax(kept[:, ::-1] > 0, axis=1)  # highest kept id
        kept[rows, last] += 1.0 - kept.sum(axis=1)
        return kept


@dataclasses.dataclass(frozen=True)
class TopPWithoutTemperature(TopP):
    """Bug: top-p ignores the temperature."""

    def _probs(self, logits):
        return TopP(self.p, 1.0)._probs(logits)


@dataclasses.dataclass(frozen=True)
class NucleusChosenAtTemperatureOne(TopP):
    """Bug: the nucleus is chosen before the temperature, then sampled with it."""

    def _probs(self, logits):
        kept = np.where(top_p_mask(softmax64(logits, 1.0), float(self.p)), logits, -np.inf)
        return softmax64(kept, self.temperature)


@dataclasses.dataclass(frozen=True)
class NucleusKeepsTheBoundary(TopP):
    """Bug: ``mass before <= p`` -- an id is kept although the mass already reached p."""

    def _probs(self, logits):
        return TopP(float(np.nextafter(self.p, 2.0)), self.temperature)._probs(logits)


@dataclasses.dataclass(frozen=True)
class TopKTiesToTheHigherId(TopK):
    """Bug: a tie at the top-k boundary goes to the higher id."""

    def _probs(self, logits):
        flipped = top_k_mask(logits[:, ::-1], self.k)[:, ::-1]
        return softmax64(np.where(flipped, logits, -np.inf), self.temperature)


MUTANTS = [  # first the four that once passed every sampling test
    UniformNucleus(0.8, 0.7),
    TopKWithoutTemperature(3, 0.5),
    NucleusNotRenormalized(0.6, 1.3),
    TopPWithoutTemperature(0.8, 0.5),
    NucleusChosenAtTemperatureOne(0.6, 2.0),
    NucleusKeepsTheBoundary(0.5, 1.3),
    TopKTiesToTheHigherId(3, 0.7),
]


def sampling_only(mutant: SamplingStrategy) -> SamplingStrategy:
    """The mutant's bug in the sampling alone: ``probs`` stays right, the draws do not."""
    real = type(mutant).__mro__[1]  # TopP or TopK
    bug = type(mutant)._probs

    class SampledWrongly(real):  # type: ignore[valid-type, misc]
        def pick_tokens(self, logits, rng=None):
            x = check_logits(logits, ndim=2).astype(np.float64)
            return sample_mult(bug(self, x), rng.random(x.shape[0]))

    SampledWrongly.__name__ = SampledWrongly.__qualname__ = f"SamplesAs{type(mutant).__name__}"
    return SampledWrongly(**dataclasses.asdict(mutant))


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: type(m).__name__)
def test_each_mutant_distribution_is_caught(mutant):
    errors = distribution_errors(mutant)
    assert errors, f"{mutant!r} passed the distribution checks"
    assert probs_errors(mutant, ROWS)  # caught exactly, against the direct formula


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: type(m).__name__)
def test_each_mutant_in_the_sampling_alone_is_caught_by_the_frequencies(mutant):
    wrong = sampling_only(mutant)
    assert probs_errors(wrong, ROWS) == []  # its probs are right...
    assert frequency_errors(wrong, ROWS), f"{wrong!r} sampled wrongly unnoticed"
    assert distribution_errors(wrong)


# ---- min-p and the repetition penalty ---------------------------------------------------

MIN_P = [MinP(0.0, 1.0), MinP(0.05, 0.7), MinP(0.2, 1.3), MinP(0.5, 0.5), MinP(1.0, 2.0)]
HISTORY = [1, 4, 4, 6, 0]  # ids already in the context (a repeat included)
PENALIZED = [
    RepetitionPenalty(1.3, Temperature(0.7)),
    RepetitionPenalty(2.0, TopK(3, 1.3)),
    RepetitionPenalty(0.8, TopP(0.8, 1.0)),
    RepetitionPenalty(1.5, MinP(0.1, 0.7)),
]


def ref_min_p(row: Sequence[float], p_min: float, t: float) -> list[float]:
    """softmax(row / t) kept where q_i >= p_min * max q, renormalized (loops, math.exp)."""
    q = ref_softmax(row, t)
    top = max(q)
    kept = [qi if qi >= p_min * top else 0.0 for qi in q]
    total = math.fsum(kept)
    return [k / total for k in kept]


def ref_penalized(row: Sequence[float], history: Sequence[int], penalty: float) -> list[float]:
    """x / penalty (x > 0) or x * penalty (x <= 0) for every id seen once or more."""
    return [
        (x / penalty if x > 0 else x * penalty) if i in history else x for i, x in enumerate(row)
    ]


@pytest.mark.parametrize("strategy", MIN_P, ids=repr)
def test_min_p_probs_equal_the_direct_formula_and_the_draws_fit(strategy):
    for name, row in ROWS.items():
        got = strategy.probs(np.array(row))
        want = np.array(ref_min_p(row, strategy.p_min, strategy.temperature))
        assert np.all(np.abs(got - want) <= RTOL * want), name
    assert frequency_errors(strategy, ROWS) == []


def test_min_p_support_and_greedy():
    row = [math.log(x) for x in (0.5, 0.25, 0.125, 0.0625, 0.0625)]  # q exactly, at t = 1
    assert set(np.flatnonzero(MinP(0.25, 1.0).probs(np.array(row))).tolist()) == {0, 1, 2}
    assert set(np.flatnonzero(MinP(0.26, 1.0).probs(np.array(row))).tolist()) == {0, 1}
    assert MinP(0.3, 0.0).is_greedy and MinP(0.3, 0.0).pick_tokens(np.array([row])).tolist() == [0]
    assert make_strategy("min-p", min_p=0.1, temperature=0.5) == MinP(0.1, 0.5)
    with pytest.raises(ConfigError, match="min_p"):
        MinP(1.5)


@pytest.mark.parametrize("strategy", PENALIZED, ids=repr)
def test_repetition_penalty_probs_equal_the_direct_formula_and_the_draws_fit(strategy):
    for name, row in ROWS.items():
        got = strategy.probs(np.array(row), history=HISTORY)
        want = strategy.base.probs(np.array(ref_penalized(row, HISTORY, strategy.penalty)))
        assert np.array_equal(got, want), name  # same float64 operations: exact
        assert np.array_equal(strategy.probs(np.array(row)), strategy.base.probs(np.array(row)))
    errors = []
    for seed, (name, row) in enumerate(ROWS.items()):
        probs = strategy.probs(np.array(row), history=HISTORY)
        hist = np.tile(HISTORY, (DRAWS, 1))
        picks = strategy.pick_tokens(np.tile(row, (DRAWS, 1)), _rng(200 + seed), history=hist)
        _, _, p_value = chi_squared_test(np.bincount(picks, minlength=len(row)), probs)
        if not p_value > ALPHA:
            errors.append(name)
    assert errors == []


def test_repetition_penalty_changes_greedy_picks_and_checks_its_history():
    row = np.array([[2.0, 1.9, -1.0, 0.5]])
    assert Greedy().pick_tokens(row).tolist() == [0]
    rp = RepetitionPenalty(1.2)  # 2.0 / 1.2 < 1.9: the repeat loses
    assert rp.is_greedy and rp.pick_tokens(row, history=[[0]]).tolist() == [1]
    assert rp.pick_tokens(row).tolist() == [0]  # no history: no penalty
    assert rp.pick_token(row[0], history=[0, 0]) == 1
    ragged = RepetitionPenalty(5.0).probs(np.tile(row, (2, 1)), history=[[0], [0, 1]])
    assert np.argmax(ragged, axis=1).tolist() == [1, 3]  # row 1: 2/5, 1.9/5, -1, 0.5
    with pytest.raises(InputError, match="history"):
        rp.probs(row, history=[[4]])
    with pytest.raises(InputError, match="history"):
        rp.probs(row, history=[[0], [1]])
    with pytest.raises(ConfigError, match="penalty"):
        RepetitionPenalty(0.0)
    assert make_strategy("top_k", top_k=5, repetition_penalty=1.3) == RepetitionPenalty(
        1.3, TopK(5)
    )


# the oracles: transformers' own logits processors (offline; no download)


def _hf_processors():
    require_oracle("torch")
    generation = require_oracle("transformers.generation.logits_process")
    import torch

    return torch, generation


@pytest.mark.parametrize("p_min", [0.0, 0.05, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("t", [0.7, 1.0, 1.3])
def test_min_p_equals_transformers_min_p_logits_warper(p_min, t):
    torch, generation = _hf_processors()
    x = np.array(list(ROWS.values()))  # [8, 8]
    x = np.concatenate([x, _logits(4, 8, seed=5).astype(np.float64)])  # [12, 8]
    x = np.where(np.isinf(x), -1e30, x)  # transformers' warpers use finite masks
    scores = generation.TemperatureLogitsWarper(t)(None, torch.tensor(x))
    warped = generation.MinPLogitsWarper(p_min)(None, scores)
    want = torch.softmax(warped, dim=-1).numpy()
    got = MinP(p_min, t).probs(x)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)
    assert np.array_equal(got > 0, want > 0)  # the same support


@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.3, 2.5])
def test_repetition_penalty_equals_transformers_repetition_penalty_processor(penalty):
    torch, generation = _hf_processors()
    x = _logits(6, 40, seed=7).astype(np.float64) * 3  # [B, V] both signs
    history = _rng(11).integers(0, 40, size=(6, 25))  # [B, T] with repeats
    want = generation.RepetitionPenaltyLogitsProcessor(penalty)(
        torch.tensor(history), torch.tensor(x)
    ).numpy()
    got = RepetitionPenalty(penalty, Temperature(1.0))._penalized(x, history)
    assert np.array_equal(got, want)
    want_probs = torch.softmax(torch.tensor(want), dim=-1).numpy()
    np.testing.assert_allclose(
        RepetitionPenalty(penalty, Temperature(1.0)).probs(x, history=history),
        want_probs,
        rtol=1e-12,
    )
