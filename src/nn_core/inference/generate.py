"""Generation: prompt -> prompt + new tokens, with a KV cache, stops and a sliding window.

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
    generate_text / stream_text(model, tokenizer, text, ...)  -> text, stop strings cut

Stopping (``eos_id``, ``stop``; see docs/sampling.md):
- ``eos_id=E``: a row ends after it picks E (E is the last id returned). The token-level
  functions take no default; the text functions default to the tokenizer's EOS
  (``ignore_eos=True`` turns that off).
- ``stop=("\n\n", ...)`` with a ``tokenizer``: a row ends after the token whose text
  completes one of the strings (searched in the new text only). The ids returned end
  with that token; ``generate_text`` / ``stream_text`` cut the text before the stop
  string, and ``stream_text`` holds back any text that might be the start of one.
- ``generate_batch`` stops when every row has stopped; each row is cut at its own stop.

Sliding window (``slide_keep=K``): past ``max_seq_len`` the context slides. When the
sequence holds ``max_seq_len`` tokens and another is wanted, a fresh cache is prefilled
with the last K tokens (positions restart at 0, as RoPE saw in training) and decoding goes
on. Every token after a slide is exactly what generating from those K tokens as the
prompt would give (tested). Cost: one prefill of K positions every max_seq_len - K new
tokens, i.e. about K / (max_seq_len - K) extra positions per new token (K = half the
window: one extra prefilled position per new token). The repetition penalty sees
the current window only, for the same reason.

Defined behaviour at the edges (tested in tests/test_generate.py):
- An empty prompt raises InputError: there is no implicit start token (the byte
  tokenizer's BOS never occurs in training text, so it would be a poor context).
- A prompt longer than ``max_seq_len`` raises InputError; nothing is truncated
  silently. (The CLI keeps the prompt's tail and says so on stderr.)
- ``max_len`` must be an int in [len(prompt), max_seq_len], else ConfigError, unless
  ``slide_keep`` is given (then any ``max_len >= len(prompt)``).
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

from ..checks import check_int, check_token_ids, is_int
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
    "generate_text",
    "generate_sample",
    "generate_top_k",
    "generate_top_p",
    "generate_uncached",
    "stream",
    "stream_text",
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


def _check_max_len(
    max_len: Any, prompt_len: int, max_seq_len: int, slide_keep: int | None = None
) -> int:
    if slide_keep is not None and is_int(max_len) and max_len >= prompt_len:
        return int(max_len)
    if not is_int(max_len) or not prompt_len <= max_len <= max_seq_len:
        raise ConfigError(
            f"max_len must be an int in [len(prompt) = {prompt_len}, max_seq_len = "
            f"{max_seq_len}], got {max_len!r} (slide_keep=K continues past max_seq_len)"
        )
    return int(max_len)


def _check_slide_keep(slide_keep: Any, max_seq_len: int) -> int | None:
    """None, or the tokens kept when the window slides: an int in [1, max_seq_len - 1]."""
    return None if slide_keep is None else check_int(slide_keep, "slide_keep", 1, max_seq_len - 1)


def _check_eos(eos_id: Any, vocab_size: int) -> int | None:
    """None, or a token id in [0, vocab_size)."""
    return None if eos_id is None else check_int(eos_id, "eos_id", 0, vocab_size - 1)


def _check_stop(stop: Any, tokenizer: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Sequence) or not all(isinstance(x, str) and x for x in stop):
        raise ConfigError(f"stop must be a sequence of non-empty strings, got {stop!r}")
    if stop and not callable(getattr(tokenizer, "decode", None)):
        raise ConfigError("stop strings need a tokenizer (tokenizer=...) to decode the new ids")
    return tuple(stop)


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
    history: Any = None,
) -> IntArray:
    """[B, V'] -> [B]; a list of generators gives row b its own generator rng[b]."""
    if history is None:
        if isinstance(rng, list):
            return np.concatenate(
                [strategy.pick_tokens(logits[b : b + 1], g) for b, g in enumerate(rng)]
            )
        return strategy.pick_tokens(logits, rng)
    if isinstance(rng, list):
        return np.concatenate(
            [
                strategy.pick_tokens(logits[b : b + 1], g, history=[history[b]])
                for b, g in enumerate(rng)
            ]
        )
    return strategy.pick_tokens(logits, rng, history=history)


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
    slide_keep: int | None = None,
) -> Iterator[DecodeStep]:
    """Decode ``n_new`` tokens after each row of ``prompts`` [B, P]; yield one step at a time.

    Everything is validated before the first model call (this function is not a
    generator itself; it returns one). ``cached=True`` prefills a KVCache once and
    then runs ``decode_step`` on one token per row per step; ``cached=False`` runs
    ``forward`` on the whole sequence [B, P + g] at step g. ``slide_keep=K``: past
    max_seq_len the context slides to its last K tokens (re-prefilled; module docstring).
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
    keep = _check_slide_keep(slide_keep, cfg.max_seq_len)
    if keep is not None and is_int(n_new) and n_new >= 0:
        pass  # any length: the window slides
    elif not is_int(n_new) or not 0 <= n_new <= cfg.max_seq_len - prompt_len:
        raise ConfigError(
            f"n_new must be an int in [0, max_seq_len - len(prompt) = "
            f"{cfg.max_seq_len - prompt_len}], got {n_new!r}"
        )
    limit = _check_vocab_limit(vocab_limit, cfg.vocab_size)
    gens = _make_rngs(seed, rng, batch)
    step = _cached_steps if cached else _uncached_steps
    return step(model, ids, int(n_new), strategy, gens, limit, keep)


def _history(strategy: SamplingStrategy, seq: IntArray, start: int, t: int, limit: int) -> Any:
    """The ids a history-aware strategy sees: the current window seq[:, start:t] (ids the
    logits were cut away from, >= limit, cannot be picked and are left out); else None."""
    if not strategy.uses_history:
        return None
    window = seq[:, start:t]  # [B, t - start]
    if window.size and window.max() >= limit:
        return [row[row < limit] for row in window]
    return window


def _window_start(start: int, length: int, max_seq_len: int, keep: int | None) -> int:
    """Where the context seq[start:length] must begin: slid to the last ``keep`` tokens
    when it holds max_seq_len tokens (only with sliding; otherwise it never does). As in
    ``generate`` without sliding, a token is predicted from at most max_seq_len - 1."""
    if keep is not None and length - start >= max_seq_len:
        return length - keep
    return start


def _cached_steps(
    model: Any,
    ids: IntArray,
    n_new: int,
    strategy: SamplingStrategy,
    rng: Rngs,
    limit: int,
    keep: int | None = None,
) -> Iterator[DecodeStep]:
    if n_new == 0:
        return
    batch, prompt_len = ids.shape
    max_seq = model.config.max_seq_len
    seq = np.empty((batch, prompt_len + n_new), dtype=np.int64)  # [B, T], for history/slides
    seq[:, :prompt_len] = ids
    # the last new token is never fed back: P + G - 1 positions are cached (at most the window)
    cache = model.new_kv_cache(batch, min(prompt_len + n_new - 1, max_seq))
    logits = model.forward_cached(ids, cache)[:, -1, :limit]  # prefill   [B, V']
    start, t = 0, prompt_len  # the context is seq[:, start:t]
    history = strategy.uses_history
    for g in range(n_new):
        hist = _history(strategy, seq, start, t, limit) if history else None
        tokens = _pick(logits, strategy, rng, hist)  # [B]
        seq[:, t] = tokens
        t += 1
        yield DecodeStep(tokens, logits)
        if g + 1 < n_new:
            new_start = start if keep is None else _window_start(start, t, max_seq, keep)
            if new_start != start:  # slide: re-prefill the last `keep` tokens, positions 0..
                start = new_start
                cache = model.new_kv_cache(batch, max_seq)
                logits = model.forward_cached(seq[:, start:t], cache)[:, -1, :limit]
            else:
                # a sampler's picks are in [0, V') by construction: no re-validation
                logits = model.decode_step(tokens, cache, check_ids=False)[:, :limit]  # [B, V']


def _uncached_steps(
    model: Any,
    ids: IntArray,
    n_new: int,
    strategy: SamplingStrategy,
    rng: Rngs,
    limit: int,
    keep: int | None = None,
) -> Iterator[DecodeStep]:
    batch, prompt_len = ids.shape
    max_seq = model.config.max_seq_len
    seq = np.empty((batch, prompt_len + n_new), dtype=np.int64)  # [B, T]
    seq[:, :prompt_len] = ids
    start = 0
    for g in range(n_new):
        t = prompt_len + g
        start = _window_start(start, t, max_seq, keep)
        logits = model.forward(seq[:, start:t])[:, -1, :limit]  # whole window again   [B, V']
        tokens = _pick(logits, strategy, rng, _history(strategy, seq, start, t, limit))
        seq[:, t] = tokens
        yield DecodeStep(tokens, logits)


# ---- stops --------------------------------------------------------------------------


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """(text before the earliest occurrence of any stop string, whether one occurred)."""
    hits = [i for i in (text.find(x) for x in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string:
    text a streamer must hold back, since the next tokens may complete a stop string."""
    best = 0
    for x in stop:
        for n in range(min(len(x) - 1, len(text)), best, -1):
            if text.endswith(x[:n]):
                best = n
                break
    return best


class _Stops:
    """Per-row stop conditions: the EOS id, and stop strings in the decoded new text."""

    def __init__(self, rows: int, eos_id: int | None, stop: tuple[str, ...], tokenizer: Any):
        self.eos_id, self.stop, self.tokenizer = eos_id, stop, tokenizer
        self.new: list[list[int]] = [[] for _ in range(rows)]  # new ids of each row
        self.done = [False] * rows
        self.scanned = [0] * rows  # text length already searched for stop strings
        self.longest = max((len(x) for x in stop), default=0)

    @property
    def active(self) -> bool:
        return self.eos_id is not None or bool(self.stop)

    def update(self, tokens: IntArray) -> bool:
        """Record one step's tokens [B]; True when every row has stopped."""
        for b, tok in enumerate(tokens.tolist()):
            if self.done[b]:
                continue
            self.new[b].append(tok)
            if tok == self.eos_id:
                self.done[b] = True
            elif self.stop:
                text = self.tokenizer.decode(np.asarray(self.new[b], dtype=np.int64))
                # a trailing U+FFFD (an incomplete character) may change: search from before it
                low = max(0, self.scanned[b] - self.longest - 4)
                self.done[b] = any(x in text[low:] for x in self.stop)
                self.scanned[b] = len(text)
        return all(self.done)


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
    eos_id: int | None = None,
    stop: Sequence[str] | None = None,
    tokenizer: Any = None,
    slide_keep: int | None = None,
) -> list[int]:
    return list(
        _stream(
            model,
            prompt,
            max_len,
            strategy,
            seed,
            rng,
            vocab_limit,
            cached,
            eos_id,
            stop,
            tokenizer,
            slide_keep,
            with_prompt=True,
        )
    )


def _stream(
    model: Any,
    prompt: ArrayLike,
    max_len: int | None,
    strategy: SamplingStrategy | None,
    seed: int,
    rng: np.random.Generator | None,
    vocab_limit: int | None,
    cached: bool,
    eos_id: int | None,
    stop: Sequence[str] | None,
    tokenizer: Any,
    slide_keep: int | None,
    *,
    with_prompt: bool,
    max_new_tokens: int | None = None,
) -> Iterator[int]:
    """Checks everything now, then returns an iterator over (prompt and) new ids."""
    _check_model(model)
    cfg = model.config
    ids = _as_prompt(prompt, cfg.vocab_size, cfg.max_seq_len)  # [P]
    keep = _check_slide_keep(slide_keep, cfg.max_seq_len)
    if max_new_tokens is None:
        n_new = _check_max_len(max_len, ids.size, cfg.max_seq_len, keep) - ids.size
    else:
        n_new = max_new_tokens
        if not is_int(n_new) or n_new < 0 or (keep is None and n_new > cfg.max_seq_len - ids.size):
            raise ConfigError(
                f"max_new_tokens must be an int in [0, max_seq_len - len(prompt) = "
                f"{cfg.max_seq_len - ids.size}], got {n_new!r} (slide_keep=K continues past "
                "max_seq_len)"
            )
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng must be an np.random.Generator or None, got {rng!r}")
    stops = _Stops(1, _check_eos(eos_id, cfg.vocab_size), _check_stop(stop, tokenizer), tokenizer)
    steps = decode(
        model,
        ids[None, :],
        n_new,
        strategy,
        seed=seed,
        rng=rng,
        vocab_limit=vocab_limit,
        cached=cached,
        slide_keep=keep,
    )

    def run() -> Iterator[int]:
        if with_prompt:
            yield from ids.tolist()
        for s in steps:
            yield int(s.tokens[0])
            if stops.active and stops.update(s.tokens):
                return

    return run()


def generate(
    model: Any,
    prompt: ArrayLike,
    max_len: int,
    strategy: SamplingStrategy | None = None,
    *,
    seed: int = 0,
    rng: np.random.Generator | None = None,
    vocab_limit: int | None = None,
    eos_id: int | None = None,
    stop: Sequence[str] | None = None,
    tokenizer: Any = None,
    slide_keep: int | None = None,
) -> list[int]:
    """The prompt followed by new tokens until the sequence holds ``max_len`` tokens.

    ``prompt``: token ids [P] (1 <= P <= max_seq_len); ``max_len`` in [P, max_seq_len]
    (any ``max_len >= P`` with ``slide_keep``); ``strategy``: a SamplingStrategy
    (default Greedy()); draws come from ``rng``, or from ``np.random.default_rng(seed)``
    when ``rng`` is None. KV-cached decoding.

    Ends early after ``eos_id`` or after the token completing a ``stop`` string (decoded
    with ``tokenizer``); that token is the last one returned. ``slide_keep=K``: past
    max_seq_len the window slides to the last K tokens, re-prefilled (cost: K positions
    every max_seq_len - K new tokens; see the module docstring).
    """
    return _generate(
        model,
        prompt,
        max_len,
        strategy,
        seed,
        rng,
        vocab_limit,
        True,
        eos_id,
        stop,
        tokenizer,
        slide_keep,
    )


def generate_uncached(
    model: Any,
    prompt: ArrayLike,
    max_len: int,
    strategy: SamplingStrategy | None = None,
    *,
    seed: int = 0,
    rng: np.random.Generator | None = None,
    vocab_limit: int | None = None,
    eos_id: int | None = None,
    stop: Sequence[str] | None = None,
    tokenizer: Any = None,
    slide_keep: int | None = None,
) -> list[int]:
    """``generate`` without a KV cache: the whole window is re-run every step."""
    return _generate(
        model,
        prompt,
        max_len,
        strategy,
        seed,
        rng,
        vocab_limit,
        False,
        eos_id,
        stop,
        tokenizer,
        slide_keep,
    )


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
    eos_id: int | None = None,
    stop: Sequence[str] | None = None,
    tokenizer: Any = None,
    slide_keep: int | None = None,
) -> list[list[int]]:
    """``generate`` for several prompts at once; one list of ids per prompt, in input order.

    ``eos_id`` / ``stop`` / ``slide_keep`` as in ``generate``: each row ends at its own
    stop; a group of rows is decoded until every row in it has stopped.

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
    keep = _check_slide_keep(slide_keep, cfg.max_seq_len)
    n_new = [_check_max_len(max_len, r.size, cfg.max_seq_len, keep) - r.size for r in rows]
    strategy = _check_strategy(Greedy() if strategy is None else strategy)
    _check_vocab_limit(vocab_limit, cfg.vocab_size)
    eos = _check_eos(eos_id, cfg.vocab_size)
    stop_strings = _check_stop(stop, tokenizer)
    gens = _make_rngs(seed, rng, len(rows))
    groups: dict[int, list[int]] = {}  # prompt length -> row indices
    for i, r in enumerate(rows):
        groups.setdefault(r.size, []).append(i)
    out: list[list[int]] = [[] for _ in rows]
    for members in groups.values():
        group_rng = [gens[i] for i in members] if isinstance(gens, list) else gens
        ids = np.stack([rows[i] for i in members])  # [B_group, P]
        new = np.empty((len(members), n_new[members[0]]), dtype=np.int64)  # [B_group, G]
        steps = decode(
            model,
            ids,
            new.shape[1],
            strategy,
            rng=group_rng,
            vocab_limit=vocab_limit,
            slide_keep=keep,
        )
        stops = _Stops(len(members), eos, stop_strings, tokenizer)
        for g, s in enumerate(steps):
            new[:, g] = s.tokens
            if stops.active and stops.update(s.tokens):
                break
        for j, i in enumerate(members):
            tail = stops.new[j] if stops.active else new[j].tolist()
            out[i] = rows[i].tolist() + tail
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
    eos_id: int | None = None,
    stop: Sequence[str] | None = None,
    tokenizer: Any = None,
    slide_keep: int | None = None,
) -> Iterator[int]:
    """The new tokens after ``prompt``, yielded one at a time as they are decoded.

    ``list(stream(m, p, n, s, rng=r))`` equals ``generate(m, p, len(p) + n, s,
    rng=r)[len(p):]`` (with the same ``eos_id`` / ``stop`` / ``slide_keep``). Arguments
    are checked before the first token is requested.
    """
    return _stream(
        model,
        prompt,
        None,
        strategy,
        seed,
        rng,
        vocab_limit,
        True,
        eos_id,
        stop,
        tokenizer,
        slide_keep,
        with_prompt=False,
        max_new_tokens=max_new_tokens,
    )


def _text_setup(
    model: Any, tokenizer: Any, prompt: Any, vocab_limit: Any, eos_id: Any, ignore_eos: bool
) -> tuple[IntArray, int, int | None]:
    """(prompt ids, vocab limit, EOS id) for the text functions."""
    if not callable(getattr(tokenizer, "decode", None)):
        raise ConfigError(f"tokenizer must be an nn_core Tokenizer, got {tokenizer!r}")
    _check_model(model)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else np.asarray(prompt)
    limit = (
        min(tokenizer.vocab_size, model.config.vocab_size) if vocab_limit is None else vocab_limit
    )
    if eos_id == "tokenizer":
        eos_id = tokenizer.eos_id
        if eos_id is not None and eos_id >= limit:
            eos_id = None  # it cannot be picked
    return ids, limit, None if ignore_eos else eos_id


def stream_text(
    model: Any,
    tokenizer: Any,
    prompt: str | ArrayLike,
    max_new_tokens: int,
    strategy: SamplingStrategy | None = None,
    *,
    stop: Sequence[str] | None = None,
    eos_id: int | str | None = "tokenizer",
    ignore_eos: bool = False,
    seed: int = 0,
    rng: np.random.Generator | None = None,
    vocab_limit: int | None = None,
    slide_keep: int | None = None,
) -> Iterator[str]:
    """The new text after ``prompt`` (text or ids), in pieces as it is decoded.

    Stops at the tokenizer's EOS (unless ``ignore_eos`` or ``eos_id=None``) and before
    any ``stop`` string, which is never yielded: text that might be the start of a stop
    string is held back until the next tokens settle it, and an incomplete UTF-8
    character until it is complete. ``"".join(pieces)`` equals ``generate_text``.
    ``vocab_limit`` defaults to the smaller of the tokenizer's and the model's vocab.
    """
    ids, limit, eos = _text_setup(model, tokenizer, prompt, vocab_limit, eos_id, ignore_eos)
    stop_strings = _check_stop(stop, tokenizer)
    tokens = stream(
        model,
        ids,
        max_new_tokens,
        strategy,
        seed=seed,
        rng=rng,
        vocab_limit=limit,
        eos_id=eos,
        stop=stop_strings,
        tokenizer=tokenizer,
        slide_keep=slide_keep,
    )

    def run() -> Iterator[str]:
        new: list[int] = []
        sent = 0  # characters of the new text already yielded
        text = ""
        for tok in tokens:
            new.append(tok)
            text = tokenizer.decode(np.asarray(new, dtype=np.int64))
            text, stopped = cut_at_stop(text, stop_strings)
            if stopped:
                break
            end = len(text)
            while end > sent and text[end - 1] == "\ufffd":  # maybe an incomplete character
                end -= 1
            end -= stop_prefix_len(text[:end], stop_strings)  # maybe the start of a stop
            if end > sent:
                yield text[sent:end]
                sent = end
        if len(text) > sent:
            yield text[sent:]

    return run()


def generate_text(
    model: Any,
    tokenizer: Any,
    prompt: str | ArrayLike,
    max_new_tokens: int,
    strategy: SamplingStrategy | None = None,
    **kwargs: Any,
) -> str:
    """The new text after ``prompt``: ``"".join(stream_text(...))`` (same arguments)."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, strategy, **kwargs))
