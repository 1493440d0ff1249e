"""Generation (SPEC.md section 4): prompt -> prompt + new tokens, with a KV cache.

Shape legend: B batch rows (prompts decoded together), P prompt length, G new tokens,
T = P + G, V vocab_size (V' = vocab_limit when the logits are cut to it).

One decoding loop, ``decode``, serves every entry point. It prefills the prompt
once with ``model.forward_cached`` (keys and values of all P positions go into a
``KVCache``), then feeds one token per row per step through ``model.decode_step`` (ids a
sampler picked are not re-validated); ``cached=False`` instead re-runs
``model.forward`` on the whole sequence every step (the sibling implementations'
method; used by tests and the decoding benchmark). Each step the strategy picks a
token from the logits of the last position (``SamplingStrategy.pick_tokens``).

    generate(model, prompt, max_len, strategy)   -> prompt + new tokens, len max_len
    generate_greedy / generate_sample / generate_top_k / generate_top_p  (wrappers)
    generate_batch(model, prompts, max_len, ...)  -> several prompts at once
    stream(model, prompt, max_new_tokens, ...)    -> iterator over the new tokens
    generate_uncached(...)                        -> generate without the KV cache

Defined behaviour at the edges (tested in tests/test_generate.py):
- An empty prompt raises InputError: there is no implicit start token (the byte
  tokenizer's BOS never occurs in training text, so it would be a poor context).
- A prompt longer than ``max_seq_len`` raises InputError; nothing is truncated
  silently. (The CLI keeps the prompt's tail and says so on stderr.)
- ``max_len`` must be an int in [len(prompt), max_seq_len], else ConfigError: no
  sliding window (RoPE positions and the cache end at max_seq_len).
  ``max_len == len(prompt)`` returns the prompt without calling the model.
- Bad parameters (strategy, seed, rng, vocab_limit, max_len) are rejected before
  any model call.
- ``vocab_limit=L`` picks only among ids [0, L): the logits are cut to their first
  L columns. With the byte tokenizer (L = 258) a model whose vocab is larger (tiny
  has 1000) never emits an id the tokenizer cannot decode.

Randomness: every draw comes from an explicit ``np.random.Generator`` -- ``rng`` if
given, else ``np.random.default_rng(seed)``. Greedy (and temperature 0) draws
nothing. Sampling draws one uniform per row per step (see nn_core.inference.sampling).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..checks import check_token_ids, is_int
from ..errors import ConfigError, InputError
from .sampling import Greedy, SamplingStrategy, Temperature, TopK, TopP

IntArray = NDArray[np.int64]
RngArg = np.random.Generator | Sequence[np.random.Generator] | None  # one, one per row, none

__all__ = [
    "DecodeStep",
    "decode",
    "generate",
    "generate_batch",
    "generate_greedy",
    "generate_sample",
    "generate_top_k",
    "generate_top_p",
    "generate_uncached",
    "stream",
]

# ---- argument checks -------------------------------------------------------------------


def _check_model(model: Any) -> None:
    for attr in ("config", "forward", "forward_cached", "new_kv_cache"):
        if not hasattr(model, attr):
            raise InputError(f"model must be an nn_core.MoETransformer (no .{attr})")


def _check_prompt_ids(arr: np.ndarray, vocab_size: int, max_seq_len: int, name: str) -> IntArray:
    """Validate a 1-D or 2-D integer array of prompt ids (already np.asarray)."""
    length = arr.shape[-1] if arr.ndim else 0
    if length == 0:
        raise InputError(
            f"{name} is empty; generation needs at least one prompt token "
            "(there is no implicit start token)"
        )
    if length > max_seq_len:
        raise InputError(
            f"{name} has {length} tokens > max_seq_len {max_seq_len}; pass at most "
            f"max_seq_len - 1 tokens (e.g. its last ones) to leave room for new tokens"
        )
    return check_token_ids(arr, vocab_size, ndim=arr.ndim, name=f"{name} ids")


def _as_prompt(prompt: ArrayLike, vocab_size: int, max_seq_len: int) -> IntArray:
    """A prompt (sequence of ints or 1-D array) -> int64 [P]."""
    if isinstance(prompt, (str, bytes)):
        raise InputError("prompt must be token ids, not text: encode it with a tokenizer first")
    arr = np.asarray(prompt)
    if arr.ndim != 1:
        raise InputError(f"prompt must be a 1-D sequence of token ids, got shape {arr.shape}")
    return _check_prompt_ids(arr, vocab_size, max_seq_len, "prompt")


def _check_max_len(max_len: Any, prompt_len: int, max_seq_len: int) -> int:
    if not is_int(max_len) or not prompt_len <= max_len <= max_seq_len:
        raise ConfigError(
            f"max_len must be an int in [len(prompt) = {prompt_len}, max_seq_len = "
            f"{max_seq_len}], got {max_len!r}"
        )
    return int(max_len)


def _check_strategy(strategy: Any) -> SamplingStrategy:
    if not isinstance(strategy, SamplingStrategy):
        raise ConfigError(
            "strategy must be an nn_core.inference.sampling.SamplingStrategy (Greedy(), "
            f"Temperature(t), TopK(k, t), TopP(p, t)), got {strategy!r}"
        )
    return strategy


def _check_vocab_limit(vocab_limit: Any, vocab_size: int) -> int:
    if vocab_limit is None:
        return vocab_size
    if not is_int(vocab_limit) or not 1 <= vocab_limit <= vocab_size:
        raise ConfigError(
            f"vocab_limit must be None or an int in [1, vocab_size = {vocab_size}], "
            f"got {vocab_limit!r}"
        )
    return int(vocab_limit)


Rngs = np.random.Generator | list[np.random.Generator]  # shared, or one per row


def _make_rngs(seed: Any, rng: RngArg, rows: int) -> Rngs:
    """One generator for all rows, or a list with one generator per row."""
    if rng is None:
        if not is_int(seed) or seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
        return np.random.default_rng(int(seed))
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, Sequence) and all(isinstance(g, np.random.Generator) for g in rng):
        if len(rng) != rows:
            raise ConfigError(f"rng must hold one generator per prompt ({rows}), got {len(rng)}")
        return list(rng)
    raise ConfigError(
        f"rng must be an np.random.Generator or a sequence of them (one per prompt), got {rng!r}"
    )


# ---- the decoding loop -----------------------------------------------------------------


class DecodeStep(NamedTuple):
    tokens: IntArray  # [B] the ids picked at this step
    logits: np.ndarray  # [B, V'] the logits they were picked from (model dtype)


def _pick(
    logits: np.ndarray,
    strategy: SamplingStrategy,
    rng: Rngs,
) -> IntArray:
    """[B, V'] -> [B]; a list of generators gives row b its own generator rng[b]."""
    if isinstance(rng, list):
        return np.concatenate(
            [strategy.pick_tokens(logits[b : b + 1], g) for b, g in enumerate(rng)]
        )
    return strategy.pick_tokens(logits, rng)


def decode(
    model: Any,
    prompts: ArrayLike,
    n_new: int,
    strategy: SamplingStrategy | None = None,
    *,
    seed: int = 0,
    rng: RngArg = None,
    vocab_limit: int | None = None,
    cached: bool = True,
) -> Iterator[DecodeStep]:
    """Decode ``n_new`` tokens after each row of ``prompts`` [B, P]; yield one step at a time.

    Everything is validated before the first model call (this function is not a
    generator itself; it returns one). ``cached=True`` prefills a KVCache once and
    then runs ``decode_step`` on one token per row per step; ``cached=False`` runs
    ``forward`` on the whole sequence [B, P + g] at step g.
    """
    _check_model(model)
    cfg = model.config
    strategy = _check_strategy(Greedy() if strategy is None else strategy)
    arr = np.asarray(prompts)
    if arr.ndim != 2:
        raise InputError(f"prompts must be a [batch, prompt_len] array, got shape {arr.shape}")
    if arr.shape[0] < 1:
        raise InputError("prompts must hold at least one prompt")
    ids = _check_prompt_ids(arr, cfg.vocab_size, cfg.max_seq_len, "prompt")  # [B, P]
    batch, prompt_len = ids.shape
    if not is_int(n_new) or not 0 <= n_new <= cfg.max_seq_len - prompt_len:
        raise ConfigError(
            f"n_new must be an int in [0, max_seq_len - len(prompt) = "
            f"{cfg.max_seq_len - prompt_len}], got {n_new!r}"
        )
    limit = _check_vocab_limit(vocab_limit, cfg.vocab_size)
    gens = _make_rngs(seed, rng, batch)
    step = _cached_steps if cached else _uncached_steps
    return step(model, ids, int(n_new), strategy, gens, limit)


def _cached_steps(
    model: Any,
    ids: IntArray,
    n_new: int,
    strategy: SamplingStrategy,
    rng: Rngs,
    limit: int,
) -> Iterator[DecodeStep]:
    if n_new == 0:
        return
    batch, prompt_len = ids.shape
    # the last new token is never fed back: P + G - 1 positions are cached
    cache = model.new_kv_cache(batch, prompt_len + n_new - 1)
    logits = model.forward_cached(ids, cache)[:, -1, :limit]  # prefill   [B, V']
    for g in range(n_new):
        tokens = _pick(logits, strategy, rng)  # [B]
        yield DecodeStep(tokens, logits)
        if g + 1 < n_new:
            # a sampler's picks are in [0, V') by construction: no re-validation
            logits = model.decode_step(tokens, cache, check_ids=False)[:, :limit]  # [B, V']


def _uncached_steps(
    model: Any,
    ids: IntArray,
    n_new: int,
    strategy: SamplingStrategy,
    rng: Rngs,
    limit: int,
) -> Iterator[DecodeStep]:
    batch, prompt_len = ids.shape
    seq = np.empty((batch, prompt_len + n_new), dtype=np.int64)  # [B, T]
    seq[:, :prompt_len] = ids
    for g in range(n_new):
        t = prompt_len + g
        logits = model.forward(seq[:, :t])[:, -1, :limit]  # whole sequence again   [B, V']
        tokens = _pick(logits, strategy, rng)
        seq[:, t] = tokens
        yield DecodeStep(tokens, logits)


# ---- public entry points ---------------------------------------------------------------


def _generate(
    model: Any,
    prompt: ArrayLike,
    max_len: int,
    strategy: SamplingStrategy | None,
    seed: int,
    rng: np.random.Generator | None,
    vocab_limit: int | None,
    cached: bool,
) -> list[int]:
    _check_model(model)
    cfg = model.config
    ids = _as_prompt(prompt, cfg.vocab_size, cfg.max_seq_len)  # [P]
    n_new = _check_max_len(max_len, ids.size, cfg.max_seq_len) - ids.size
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng must be an np.random.Generator or None, got {rng!r}")
    steps = decode(
        model,
        ids[None, :],
        n_new,
        strategy,
        seed=seed,
        rng=rng,
        vocab_limit=vocab_limit,
        cached=cached,
    )
    return ids.tolist() + [int(s.tokens[0]) for s in steps]


def generate(
    model: Any,
    prompt: ArrayLike,
    max_len: int,
    strategy: SamplingStrategy | None = None,
    *,
    seed: int = 0,
    rng: np.random.Generator | None = None,
    vocab_limit: int | None = None,
) -> list[int]:
    """The prompt followed by new tokens until the sequence holds ``max_len`` tokens.

    ``prompt``: token ids [P] (1 <= P <= max_seq_len); ``max_len`` in [P, max_seq_len];
    ``strategy``: a SamplingStrategy (default Greedy()); draws come from ``rng``, or
    from ``np.random.default_rng(seed)`` when ``rng`` is None. KV-cached decoding.
    """
    return _generate(model, prompt, max_len, strategy, seed, rng, vocab_limit, cached=True)


def generate_uncached(
    model: Any,
    prompt: ArrayLike,
    max_len: int,
    strategy: SamplingStrategy | None = None,
    *,
    seed: int = 0,
    rng: np.random.Generator | None = None,
    vocab_limit: int | None = None,
) -> list[int]:
    """``generate`` without a KV cache: the whole sequence is re-run every step."""
    return _generate(model, prompt, max_len, strategy, seed, rng, vocab_limit, cached=False)


def generate_greedy(
    model: Any, prompt: ArrayLike, max_len: int, *, vocab_limit: int | None = None
) -> list[int]:
    """``generate`` with Greedy(): the most likely token every step."""
    return generate(model, prompt, max_len, Greedy(), vocab_limit=vocab_limit)


def generate_sample(
    model: Any,
    prompt: ArrayLike,
    max_len: int,
    temperature: float = 1.0,
    *,
    seed: int = 0,
    rng: np.random.Generator | None = None,
    vocab_limit: int | None = None,
) -> list[int]:
    """``generate`` sampling from softmax(logits / temperature); temperature 0 is greedy."""
    strategy = Temperature(temperature)
    return generate(model, prompt, max_len, strategy, seed=seed, rng=rng, vocab_limit=vocab_limit)


def generate_top_k(
    model: Any,
    prompt: ArrayLike,
    max_len: int,
    k: int = 40,
    temperature: float = 1.0,
    *,
    seed: int = 0,
    rng: np.random.Generator | None = None,
    vocab_limit: int | None = None,
) -> list[int]:
    """``generate`` sampling among the k highest logits."""
    strategy = TopK(k, temperature)
    return generate(model, prompt, max_len, strategy, seed=seed, rng=rng, vocab_limit=vocab_limit)


def generate_top_p(
    model: Any,
    prompt: ArrayLike,
    max_len: int,
    p: float = 0.9,
    temperature: float = 1.0,
    *,
    seed: int = 0,
    rng: np.random.Generator | None = None,
    vocab_limit: int | None = None,
) -> list[int]:
    """``generate`` with nucleus sampling: among the most probable tokens holding mass p."""
    strategy = TopP(p, temperature)
    return generate(model, prompt, max_len, strategy, seed=seed, rng=rng, vocab_limit=vocab_limit)


def generate_batch(
    model: Any,
    prompts: ArrayLike | Sequence[ArrayLike],
    max_len: int,
    strategy: SamplingStrategy | None = None,
    *,
    seed: int = 0,
    rng: RngArg = None,
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """``generate`` for several prompts at once; one list of ids per prompt, in input order.

    ``prompts``: a [B, P] integer array or a list of 1-D prompts. Rows of one batch
    share a KV cache whose length is common to all rows, and there is no attention
    mask to hide left padding, so prompts are grouped by length and each group is
    decoded as one batch (groups in order of first appearance).

    Randomness: with ``rng`` a sequence of B generators, row b draws only from
    ``rng[b]``, so row b equals ``generate(model, prompts[b], max_len, strategy,
    rng=rng[b])`` (greedy rows equal one-at-a-time whatever the rng). With a single
    generator (or ``seed``) each step draws one uniform per row of the group, in row
    order.
    """
    _check_model(model)
    cfg = model.config
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        rows = [_as_prompt(p, cfg.vocab_size, cfg.max_seq_len) for p in prompts]
    elif isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
        rows = [_as_prompt(p, cfg.vocab_size, cfg.max_seq_len) for p in prompts]
    else:
        raise InputError(
            f"prompts must be a [batch, prompt_len] array or a list of 1-D prompts, "
            f"got {type(prompts).__name__}"
        )
    if not rows:
        raise InputError("prompts must hold at least one prompt")
    n_new = [_check_max_len(max_len, r.size, cfg.max_seq_len) - r.size for r in rows]
    strategy = _check_strategy(Greedy() if strategy is None else strategy)
    _check_vocab_limit(vocab_limit, cfg.vocab_size)
    gens = _make_rngs(seed, rng, len(rows))
    groups: dict[int, list[int]] = {}  # prompt length -> row indices
    for i, r in enumerate(rows):
        groups.setdefault(r.size, []).append(i)
    out: list[list[int]] = [[] for _ in rows]
    for members in groups.values():
        group_rng = [gens[i] for i in members] if isinstance(gens, list) else gens
        ids = np.stack([rows[i] for i in members])  # [B_group, P]
        new = np.empty((len(members), n_new[members[0]]), dtype=np.int64)  # [B_group, G]
        steps = decode(model, ids, new.shape[1], strategy, rng=group_rng, vocab_limit=vocab_limit)
        for g, s in enumerate(steps):
            new[:, g] = s.tokens
        for j, i in enumerate(members):
            out[i] = rows[i].tolist() + new[j].tolist()
    return out


def stream(
    model: Any,
    prompt: ArrayLike,
    max_new_tokens: int,
    strategy: SamplingStrategy | None = None,
    *,
    seed: int = 0,
    rng: np.random.Generator | None = None,
    vocab_limit: int | None = None,
) -> Iterator[int]:
    """The new tokens after ``prompt``, yielded one at a time as they are decoded.

    ``list(stream(m, p, n, s, rng=r))`` equals ``generate(m, p, len(p) + n, s,
    rng=r)[len(p):]``. Arguments are checked before the first token is requested.
    """
    _check_model(model)
    cfg = model.config
    ids = _as_prompt(prompt, cfg.vocab_size, cfg.max_seq_len)
    if not is_int(max_new_tokens) or not 0 <= max_new_tokens <= cfg.max_seq_len - ids.size:
        raise ConfigError(
            f"max_new_tokens must be an int in [0, max_seq_len - len(prompt) = "
            f"{cfg.max_seq_len - ids.size}], got {max_new_tokens!r}"
        )
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng must be an np.random.Generator or None, got {rng!r}")
    steps = decode(
        model, ids[None, :], max_new_tokens, strategy, seed=seed, rng=rng, vocab_limit=vocab_limit
    )
    return (int(s.tokens[0]) for s in steps)
