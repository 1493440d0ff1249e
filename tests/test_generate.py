"""Tests of nn_core.inference.generate: KV-cached decoding, batching, streaming, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from stats import chi_squared_test, inverse_cdf

from nn_core import Config, MoETransformer
from nn_core.errors import ConfigError, InputError
from nn_core.inference.generate import (
    decode,
    generate,
    generate_batch,
    generate_greedy,
    generate_sample,
    generate_top_k,
    generate_top_p,
    generate_uncached,
    stream,
)
from nn_core.inference.sampling import Greedy, Temperature, TopK, TopP

CFG = Config.tiny().replace(max_seq_len=48)  # short max_seq_len: the edges are cheap to reach
PROMPT = [3, 14, 15, 92, 65, 35]
STRATEGIES = [Greedy(), Temperature(1.0), TopK(5, 0.8), TopP(0.9, 1.2)]


@pytest.fixture(scope="module")
def model() -> MoETransformer:
    return MoETransformer(CFG, seed=7, dtype=np.float32)


@pytest.fixture(scope="module")
def model64() -> MoETransformer:
    return MoETransformer(CFG, seed=7, dtype=np.float64)


class NoModelCalls:
    """A model whose forward passes fail the test: arguments must be checked first."""

    def __init__(self, model: MoETransformer):
        self.config = model.config

    def forward(self, *args: object) -> None:
        raise AssertionError("forward called before the arguments were checked")

    forward_cached = new_kv_cache = forward


def _steps(model, prompts, n_new, strategy=None, **kw):
    steps = list(decode(model, prompts, n_new, strategy, **kw))
    tokens = np.stack([s.tokens for s in steps], axis=1)  # [B, G]
    logits = np.stack([s.logits for s in steps], axis=1)  # [B, G, V]
    return tokens, logits


# ---- cached == uncached ----------------------------------------------------------------


def test_cached_and_uncached_logits_agree_to_float32_rounding(model):
    prompts = np.array([PROMPT, PROMPT[::-1]])  # [2, 6]
    tok_c, log_c = _steps(model, prompts, 30, cached=True)
    tok_u, log_u = _steps(model, prompts, 30, cached=False)
    assert log_c.dtype == np.float32 and log_c.shape == (2, 30, CFG.vocab_size)
    scale = np.abs(log_u).max()
    np.testing.assert_allclose(log_c, log_u, rtol=0, atol=2e-5 * scale)
    np.testing.assert_array_equal(tok_c, tok_u)  # the same greedy tokens


def test_cached_and_uncached_agree_tightly_in_float64(model64):
    _, log_c = _steps(model64, np.array([PROMPT]), 20, cached=True)
    _, log_u = _steps(model64, np.array([PROMPT]), 20, cached=False)
    np.testing.assert_allclose(log_c, log_u, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=repr)
def test_generate_equals_generate_uncached(model, strategy):
    cached = generate(model, PROMPT, 30, strategy, seed=4)
    assert cached == generate_uncached(model, PROMPT, 30, strategy, seed=4)


# ---- the contract of generate ----------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES, ids=repr)
def test_generate_returns_prompt_then_new_tokens_up_to_max_len(model, strategy):
    out = generate(model, np.array(PROMPT), 25, strategy, seed=1)
    assert isinstance(out, list) and all(type(t) is int for t in out)
    assert len(out) == 25 and out[: len(PROMPT)] == PROMPT
    assert all(0 <= t < CFG.vocab_size for t in out)


def test_generate_fills_the_context_up_to_max_seq_len(model):
    out = generate(model, PROMPT, CFG.max_seq_len)
    assert len(out) == CFG.max_seq_len
    assert out == generate_uncached(model, PROMPT, CFG.max_seq_len)


def test_greedy_is_deterministic_and_the_default(model):
    a = generate(model, PROMPT, 20)
    assert (
        a == generate(model, PROMPT, 20, Greedy(), seed=123) == generate_greedy(model, PROMPT, 20)
    )


def test_top_k_1_equals_greedy(model):
    greedy = generate_greedy(model, PROMPT, 30)
    assert generate_top_k(model, PROMPT, 30, k=1, temperature=1.5, seed=9) == greedy
    assert generate(model, PROMPT, 30, TopK(1), seed=3) == greedy


def test_temperature_0_is_greedy(model):
    greedy = generate_greedy(model, PROMPT, 20)
    assert generate_sample(model, PROMPT, 20, temperature=0, seed=5) == greedy
    assert generate_top_p(model, PROMPT, 20, p=0.5, temperature=0.0) == greedy


def test_sampling_is_reproducible_from_a_seed_or_a_generator(model):
    for strategy in STRATEGIES[1:]:
        a = generate(model, PROMPT, 30, strategy, seed=11)
        assert a == generate(model, PROMPT, 30, strategy, seed=11)
        assert a == generate(model, PROMPT, 30, strategy, rng=np.random.default_rng(11))
    draws = {tuple(generate_sample(model, PROMPT, 30, 1.0, seed=s)) for s in range(4)}
    assert len(draws) > 1  # the seed matters (untrained model: near-uniform logits)


def test_wrappers_equal_generate_with_their_strategy(model):
    assert generate_sample(model, PROMPT, 20, 0.7, seed=2) == generate(
        model, PROMPT, 20, Temperature(0.7), seed=2
    )
    assert generate_top_k(model, PROMPT, 20, 7, 0.9, seed=2) == generate(
        model, PROMPT, 20, TopK(7, 0.9), seed=2
    )
    assert generate_top_p(model, PROMPT, 20, 0.8, 1.1, seed=2) == generate(
        model, PROMPT, 20, TopP(0.8, 1.1), seed=2
    )


def test_vocab_limit_restricts_the_ids(model):
    for strategy in STRATEGIES:
        out = generate(model, PROMPT, 30, strategy, seed=0, vocab_limit=20)
        assert max(out[len(PROMPT) :]) < 20
    assert generate(model, PROMPT, 12, vocab_limit=1)[len(PROMPT) :] == [0] * 6
    _, logits = _steps(model, np.array([PROMPT]), 3, vocab_limit=258)
    assert logits.shape[-1] == 258


# ---- what generation samples from -------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES[1:], ids=repr)
@pytest.mark.parametrize("cached", [True, False])
def test_each_token_is_drawn_from_strategy_probs_of_the_models_next_token_logits(
    model, strategy, cached
):
    prompts = np.array([PROMPT, PROMPT[::-1]])  # [2, 6]
    steps = list(decode(model, prompts, 12, strategy, seed=21, vocab_limit=300, cached=cached))
    rng = np.random.default_rng(21)
    seq = prompts
    for step in steps:
        # the logits the strategy saw are the model's, for the last position, cut to 300
        expected = model.forward(seq)[:, -1, :300]  # [2, 300]
        np.testing.assert_allclose(
            step.logits, expected, rtol=0, atol=2e-5 * np.abs(expected).max()
        )
        u = rng.random(2)  # one uniform per row per step, in row order
        picks = [inverse_cdf(p.tolist(), u_b) for p, u_b in zip(strategy.probs(step.logits), u)]
        assert step.tokens.tolist() == picks
        seq = np.concatenate([seq, step.tokens[:, None]], axis=1)


def test_first_token_frequencies_fit_strategy_probs(model):
    """2000 identical prompts, one new token each: counts against probs (chi-squared)."""
    strategy = TopK(5, 0.7)
    (step,) = decode(model, np.tile(PROMPT, (2000, 1)), 1, strategy, seed=5, vocab_limit=16)
    probs = strategy.probs(step.logits[0])  # [16]; every row has the same logits
    np.testing.assert_allclose(strategy.probs(step.logits), np.tile(probs, (2000, 1)), atol=1e-6)
    counts = np.bincount(step.tokens, minlength=16)
    assert chi_squared_test(counts, probs)[2] > 1e-4


# ---- batching and streaming ------------------------------------------------------------


def test_batch_equals_one_at_a_time_greedy(model):
    prompts = np.array([PROMPT, [1, 2, 3, 4, 5, 6], [999, 0, 500, 7, 7, 7]])  # [3, 6]
    batched = generate_batch(model, prompts, 30)
    assert batched == [generate(model, p, 30) for p in prompts]


@pytest.mark.parametrize("strategy", STRATEGIES[1:], ids=repr)
def test_batch_with_a_generator_per_row_equals_one_at_a_time(model, strategy):
    prompts = [PROMPT, [9, 8, 7, 6, 5, 4]]
    rngs = [np.random.default_rng(s) for s in (5, 6)]
    batched = generate_batch(model, prompts, 28, strategy, rng=rngs)
    single = [
        generate(model, p, 28, strategy, rng=np.random.default_rng(s))
        for p, s in zip(prompts, (5, 6))
    ]
    assert batched == single


def test_batch_of_different_lengths_is_grouped_by_length(model):
    prompts = [PROMPT, [5, 6], PROMPT[:4], [8, 9]]
    out = generate_batch(model, prompts, 20)
    assert out == [generate(model, p, 20) for p in prompts]
    assert [len(o) for o in out] == [20] * 4
    rngs = [np.random.default_rng(s) for s in range(4)]
    out = generate_batch(model, prompts, 20, TopK(10), rng=rngs)
    assert out == [
        generate(model, p, 20, TopK(10), rng=np.random.default_rng(s))
        for s, p in enumerate(prompts)
    ]


def test_stream_equals_generate(model):
    for strategy in STRATEGIES:
        tokens = stream(model, PROMPT, 25, strategy, rng=np.random.default_rng(3))
        full = generate(model, PROMPT, len(PROMPT) + 25, strategy, rng=np.random.default_rng(3))
        assert list(tokens) == full[len(PROMPT) :]
    assert list(stream(model, PROMPT, 0)) == []


def test_stream_is_lazy_and_checks_arguments_up_front(model):
    it = stream(model, PROMPT, 10)
    assert next(it) == generate(model, PROMPT, len(PROMPT) + 1)[-1]
    with pytest.raises(ConfigError, match="max_new_tokens"):
        stream(model, PROMPT, CFG.max_seq_len)  # raised at the call, not at the first next()


# ---- edges and bad parameters ----------------------------------------------------------


def test_empty_prompt_is_an_input_error(model):
    for empty in ([], np.array([], dtype=np.int64)):
        with pytest.raises(InputError, match="prompt is empty"):
            generate(model, empty, 10)
        with pytest.raises(InputError, match="prompt is empty"):
            stream(model, empty, 3)
    with pytest.raises(InputError, match="prompt is empty"):
        generate_batch(model, [PROMPT, []], 10)


def test_prompt_longer_than_max_seq_len_is_an_input_error(model):
    long = list(range(CFG.max_seq_len + 1))
    with pytest.raises(InputError, match=r"49 tokens > max_seq_len 48"):
        generate(model, long, CFG.max_seq_len)
    with pytest.raises(InputError, match="max_seq_len"):
        stream(model, long, 1)
    with pytest.raises(InputError, match="max_seq_len"):
        generate_batch(model, [long], CFG.max_seq_len)


def test_max_len_equal_to_the_prompt_returns_it_without_a_model_call(model):
    assert generate(NoModelCalls(model), PROMPT, len(PROMPT)) == PROMPT
    full = list(range(CFG.max_seq_len))
    assert generate(NoModelCalls(model), full, CFG.max_seq_len) == full


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"max_len": 5},
            ConfigError,
            r"max_len must be an int in \[len\(prompt\) = 6, max_seq_len",
        ),
        ({"max_len": 49}, ConfigError, "max_len"),
        ({"max_len": 10.0}, ConfigError, "max_len"),
        ({"max_len": True}, ConfigError, "max_len"),
        ({"strategy": "greedy"}, ConfigError, "strategy must be"),
        ({"seed": -1}, ConfigError, "seed must be an int >= 0"),
        ({"seed": 1.5}, ConfigError, "seed"),
        ({"rng": 42}, ConfigError, "rng must be"),
        ({"vocab_limit": 0}, ConfigError, "vocab_limit"),
        ({"vocab_limit": CFG.vocab_size + 1}, ConfigError, "vocab_limit"),
        ({"prompt": [1, 2, CFG.vocab_size]}, InputError, r"\[0, 1000\)"),
        ({"prompt": [-1, 2]}, InputError, r"\[0, 1000\)"),
        ({"prompt": [1.0, 2.0]}, InputError, "integer"),
        ({"prompt": [[1, 2]]}, InputError, "1-D"),
        ({"prompt": "hello"}, InputError, "not text"),
    ],
)
def test_bad_parameters_are_rejected_before_any_model_call(model, kwargs, error, match):
    args = {"prompt": PROMPT, "max_len": 20, "strategy": TopK(5), **kwargs}
    with pytest.raises(error, match=match):
        generate(NoModelCalls(model), args.pop("prompt"), args.pop("max_len"), **args)


def test_bad_strategy_parameters_are_rejected(model):
    with pytest.raises(ConfigError, match="temperature"):
        generate_sample(model, PROMPT, 10, temperature=-1)
    with pytest.raises(ConfigError, match="k"):
        generate_top_k(model, PROMPT, 10, k=0)
    for p in (0.0, 1.5):
        with pytest.raises(ConfigError, match="p"):
            generate_top_p(model, PROMPT, 10, p=p)


def test_batch_rejects_a_wrong_number_of_generators(model):
    with pytest.raises(ConfigError, match="one generator per prompt"):
        generate_batch(
            NoModelCalls(model), [PROMPT, PROMPT], 10, TopK(3), rng=[np.random.default_rng()]
        )
    with pytest.raises(InputError, match="at least one prompt"):
        generate_batch(model, [], 10)


def test_non_finite_logits_are_never_sampled_from():
    broken = MoETransformer(CFG, seed=1)
    broken.parameters()["lm_head.weight"][5, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        generate(broken, PROMPT, 10)


# ---- the decoding benchmark ------------------------------------------------------------
