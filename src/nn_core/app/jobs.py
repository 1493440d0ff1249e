"""Batch work over any ``concurrent.futures.Executor``: evaluate a text file, many prompts.

    evaluate_file(checkpoint, data_file, seq_len=, batch_size=)  -> {loss, perplexity, ...}
    generate_many(checkpoint, prompts, max_new_tokens=, ...)      -> one text per prompt

The work is cut into units; a unit carries the checkpoint PATH (never the model) and
its token ids, so any executor can run it: the default local process pool (2 "spawn"
workers, created and shut down inside the call), a ``ThreadPoolExecutor``, or a Dask
cluster through ``distributed.Client(...).get_executor()``. Each worker process loads
a checkpoint once and keeps it (cache keyed by path and file mtimes); BLAS runs one
thread inside a unit (threadpoolctl), as the workers themselves are the parallelism.

Results do not depend on the executor or on how the work is split:
- evaluation: a unit returns (sum of its token losses, its token count); the parent
  sums them in unit order (sorted by unit index) in float64, so every executor gives
  the bitwise same loss -- the token-weighted mean CE over the windows.
- generation: prompt i draws only from ``np.random.default_rng([seed, i])`` and is
  decoded on its own (no batching with other prompts), so its text depends on
  (checkpoint, prompt, i, seed, strategy) only.

The checkpoint directory is resolved once in the caller (a run directory's ``latest``
becomes the step directory it names), so all units read the same checkpoint even if
training moves ``latest`` meanwhile. On a real cluster that path must be readable by
every worker, at the same absolute path (a shared filesystem). The default pool
starts fresh interpreters ("spawn"): a script calling these functions without an
executor needs the usual ``if __name__ == "__main__":`` guard.

Shape legend: U units, B windows per unit (batch_size), S seq_len, V vocab, N = B*S.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ..checks import check_int
from ..data.dataset import eval_batches
from ..data.prepared import evaluation_tokens
from ..data.tokenizer import ByteTokenizer, Tokenizer
from ..errors import CheckpointError, ConfigError, InputError
from ..inference.sampling import SamplingStrategy, make_strategy
from ..model.config import Config
from ..model.moe import RoutingStats
from ..storage.checkpoint import MODEL_FILE, STATE_FILE, load_model, read_state, resolve_checkpoint
from ..training.distributed import sum_stats
from ..training.telemetry import empty_routing_stats, expert_telemetry

if TYPE_CHECKING:
    from ..model.transformer import MoETransformer

IntArray = NDArray[np.int64]
PathLike = str | os.PathLike[str]

DEFAULT_WORKERS = 2  # processes of the default local pool
MP_CONTEXT = "spawn"  # fresh interpreters: safe with threads and BLAS pools in the parent
MODEL_CACHE_SIZE = 2  # checkpoints kept loaded per worker process

__all__ = ["DEFAULT_WORKERS", "clear_model_cache", "evaluate_file", "generate_many"]


# ---- inside a worker: the model cache and one BLAS thread --------------------------------

_models: OrderedDict[tuple[str, int, int], MoETransformer] = OrderedDict()
_models_lock = threading.Lock()


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1  # missing: load_model reports it


def cached_model(checkpoint: str) -> MoETransformer:
    """The model of checkpoint directory ``checkpoint``, loaded once per process.

    Keyed by (path, mtime of state.json, mtime of model.safetensors): a checkpoint
    rewritten in place is loaded again. The newest MODEL_CACHE_SIZE models are kept.
    """
    ckpt = Path(checkpoint)
    key = (checkpoint, _mtime_ns(ckpt / STATE_FILE), _mtime_ns(ckpt / MODEL_FILE))
    with _models_lock:  # threads of one process share the cache; a load happens once
        model = _models.get(key)
        if model is None:
            model = load_model(ckpt)
            _models[key] = model
            while len(_models) > MODEL_CACHE_SIZE:
                _models.popitem(last=False)
        _models.move_to_end(key)
        return model


def clear_model_cache() -> None:
    """Forget the models this process has loaded."""
    with _models_lock:
        _models.clear()


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter: Any = None


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """BLAS limited to one thread while any unit of this process runs; the previous
    limits come back when the last one ends (safe with a thread pool, where units of
    one process overlap)."""
    global _blas_users, _blas_limiter
    from threadpoolctl import threadpool_limits

    with _blas_lock:
        if _blas_users == 0:
            _blas_limiter = threadpool_limits(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


def _eval_unit(
    index: int, checkpoint: str, inputs: IntArray, targets: IntArray
) -> tuple[int, float, int, list[RoutingStats]]:
    """One work unit of ``evaluate_file``: -> (index, sum of token CE losses, tokens,
    each layer's routing statistics)."""
    with _one_blas_thread():
        model = cached_model(checkpoint)
        state = model.forward_loss(inputs, targets, 0.0)  # the loss without the aux term
        n = int(targets.size)  # N = B*S
        # Cross-entropy: L = -(1/N) sum_i log softmax(logits_i)[target_i]; N * L is the sum
        ce = state.terms.ce
    return index, ce * n, n, state.routing_stats()


def _generate_unit(
    checkpoint: str,
    items: list[tuple[int, list[int]]],
    max_new_tokens: int,
    strategy: SamplingStrategy,
    seed: int,
    vocab_limit: int,
) -> list[tuple[int, list[int]]]:
    """One work unit of ``generate_many``: (prompt index, prompt ids) -> (index, all ids)."""
    from ..inference.generate import generate

    out = []
    with _one_blas_thread():
        model = cached_model(checkpoint)
        for index, ids in items:
            rng = np.random.default_rng([seed, index])  # prompt i's own stream
            tokens = generate(
                model, ids, len(ids) + max_new_tokens, strategy, rng=rng, vocab_limit=vocab_limit
            )
            out.append((index, tokens))
    return out


# ---- in the caller: checks, units, executor --------------------------------------------


def _checkpoint_tokenizer(checkpoint: PathLike) -> Tokenizer:
    """The run's tokenizer (tokenizer.json beside the checkpoint or in its run); else bytes."""
    from ..storage.hf import run_tokenizer

    return run_tokenizer(checkpoint) or ByteTokenizer()


def _prepare_checkpoint(checkpoint: PathLike, tokenizer: Tokenizer) -> tuple[str, Config]:
    """Resolve the checkpoint once (absolute path of the step directory) and read its
    config without loading the weights; the tokenizer's ids must fit its vocab."""
    ckpt = Path(os.path.abspath(resolve_checkpoint(checkpoint)))
    try:
        config = Config.from_dict(read_state(ckpt)["config"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{ckpt}: invalid config in {STATE_FILE}: {exc}") from exc
    if config.vocab_size < tokenizer.vocab_size:
        raise CheckpointError(
            f"{ckpt}: vocab_size {config.vocab_size} is smaller than the "
            f"{tokenizer.to_dict()['type']} tokenizer's {tokenizer.vocab_size}"
        )
    return str(ckpt), config


def _check_executor(executor: Any) -> None:
    if executor is not None and not callable(getattr(executor, "submit", None)):
        raise ConfigError(
            f"executor must be a concurrent.futures.Executor (or have .submit), got {executor!r}"
        )


def _run_units(
    fn: Callable[..., Any], units: list[tuple[Any, ...]], executor: Executor | None, workers: int
) -> list[Any]:
    """fn(*unit) for every unit on ``executor`` (default: a local spawn process pool of
    ``workers`` processes, shut down before returning); results in unit order."""
    if executor is None:
        context = multiprocessing.get_context(MP_CONTEXT)
        with ProcessPoolExecutor(min(workers, len(units)), mp_context=context) as pool:
            return _run_units(fn, units, pool, workers)
    futures: list[Future[Any]] = []
    try:
        futures = [executor.submit(fn, *unit) for unit in units]
        return [f.result() for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        raise


def evaluate_file(
    checkpoint: PathLike,
    data_file: PathLike,
    *,
    seq_len: int,
    batch_size: int,
    executor: Executor | None = None,
    max_batches: int | None = None,
    workers: int = DEFAULT_WORKERS,
) -> dict[str, Any]:
    """Mean cross-entropy and perplexity of a checkpoint on a UTF-8 text file.

    The file is read with the run's tokenizer (bytes if it has none) and cut into
    W = (T-1) // seq_len non-overlapping windows (inputs ids[i:i+S], targets ids[i+1:i+S+1]); with
    ``max_batches`` only max_batches * batch_size of them, evenly spread
    (``text.eval_batches``). Each batch of ``batch_size`` windows is one work unit.

    Returns {"loss": token-weighted mean CE (nats), "perplexity": exp(loss),
    "bits_per_byte": loss / ln 2 times the file's tokens per byte,
    "tokens": tokens scored, "batches": work units, "experts": the expert telemetry of
    all the windows (``nn_core.training.telemetry``)}. ``executor``: any
    concurrent.futures.Executor (default: a local process pool of ``workers``).
    """
    _check_executor(executor)
    workers = check_int(workers, "workers", 1)
    tokenizer = _checkpoint_tokenizer(checkpoint)
    ckpt, config = _prepare_checkpoint(checkpoint, tokenizer)
    seq_len = check_int(seq_len, "seq_len", 1, config.max_seq_len)
    batch_size = check_int(batch_size, "batch_size", 1)
    if max_batches is not None:
        max_batches = check_int(max_batches, "max_batches", 1)
    ids = evaluation_tokens(data_file, tokenizer)  # [T]: a file, a directory or prepared
    if ids.size < seq_len + 1:
        raise InputError(
            f"data file {data_file} has {ids.size} tokens; seq_len={seq_len} needs at least "
            f"seq_len+1 = {seq_len + 1}"
        )
    batches = eval_batches(ids, batch_size, seq_len, max_batches)  # U x ([B, S], [B, S])
    units = [(i, ckpt, x, y) for i, (x, y) in enumerate(batches)]
    results = sorted(_run_units(_eval_unit, units, executor, workers))  # by unit index
    loss_sum, tokens = 0.0, 0
    routed = empty_routing_stats(config)
    for _, unit_sum, unit_tokens, unit_routed in results:  # fixed order: the same float sum
        loss_sum += unit_sum
        tokens += unit_tokens
        routed = sum_stats(routed, unit_routed)
    loss = loss_sum / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        # bits per byte = loss / ln 2 * tokens / bytes of the file: comparable across tokenizers
        "bits_per_byte": loss / math.log(2) * ids.size / _n_bytes(tokenizer, ids),
        "tokens": tokens,
        "batches": len(batches),
        "experts": expert_telemetry(routed).as_dict(),
    }


def _n_bytes(tokenizer: Tokenizer, ids: Any) -> int:
    """UTF-8 bytes the ids stand for (byte-level tokenizers decode exactly)."""
    return max(len(tokenizer.decode(np.asarray(ids, np.int64)).encode("utf-8")), 1)


def generate_many(
    checkpoint: PathLike,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    strategy: SamplingStrategy | str = "greedy",
    temperature: float = 1.0,
    top_k: int = 40,
    top_p: float = 0.9,
    seed: int = 0,
    executor: Executor | None = None,
    prompts_per_unit: int = 1,
    include_prompt: bool = True,
    workers: int = DEFAULT_WORKERS,
) -> list[str]:
    """Continue every prompt with ``max_new_tokens`` byte tokens; texts in prompt order.

    ``strategy``: a SamplingStrategy, or a name for ``sampling.make_strategy`` (greedy,
    temperature, top_k, top_p) that takes ``temperature``, ``top_k``, ``top_p``. Prompt
    i samples from ``np.random.default_rng([seed, i])``, so the result is the same
    whatever the executor and ``prompts_per_unit`` (prompts per work unit). Only byte
    ids are picked (vocab_limit 258). Returns prompt + continuation, or only the
    continuation with ``include_prompt=False``.
    """
    _check_executor(executor)
    workers = check_int(workers, "workers", 1)
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise InputError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise InputError(f"prompts[{i}] must be a non-empty string, got {p!r}")
    if isinstance(strategy, str):
        strategy = make_strategy(strategy, temperature=temperature, top_k=top_k, top_p=top_p)
    elif not isinstance(strategy, SamplingStrategy):
        raise ConfigError(f"strategy must be a SamplingStrategy or a name, got {strategy!r}")
    seed = check_int(seed, "seed", 0)
    per_unit = check_int(prompts_per_unit, "prompts_per_unit", 1)
    tokenizer = _checkpoint_tokenizer(checkpoint)
    ckpt, config = _prepare_checkpoint(checkpoint, tokenizer)
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", 0, config.max_seq_len - 1)
    encoded = [tokenizer.encode(p).tolist() for p in prompts]
    for i, ids in enumerate(encoded):
        if len(ids) + max_new_tokens > config.max_seq_len:
            raise InputError(
                f"prompts[{i}] has {len(ids)} tokens; with max_new_tokens={max_new_tokens} "
                f"that exceeds max_seq_len {config.max_seq_len}"
            )
    if not encoded:
        return []
    items = list(enumerate(encoded))
    units = [
        (ckpt, items[i : i + per_unit], max_new_tokens, strategy, seed, tokenizer.vocab_size)
        for i in range(0, len(items), per_unit)
    ]
    rows = dict(
        pair for unit in _run_units(_generate_unit, units, executor, workers) for pair in unit
    )
    start = {i: 0 if include_prompt else len(ids) for i, ids in items}
    return [tokenizer.decode(np.asarray(rows[i][start[i] :], np.int64)) for i, _ in items]
