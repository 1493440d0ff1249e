"""Batch evaluation and generation over executors: every executor, same answer.

The reference is a single-process run: ``SerialExecutor`` runs each unit in the
caller's thread at submit time. Thread pools, process pools (the default executor
included) and a local Dask cluster must reproduce it exactly -- the loss bit for bit
(per-unit sums added in unit order), the texts character for character.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nn_core import CheckpointError, Config, ConfigError, InputError, MoETransformer
from nn_core.app.jobs import cached_model, clear_model_cache, evaluate_file, generate_many
from nn_core.data.corpus import default_corpus
from nn_core.data.dataset import eval_batches
from nn_core.data.tokenizer import ByteTokenizer
from nn_core.inference.generate import generate
from nn_core.inference.sampling import Greedy, TopK
from nn_core.storage.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    load_model,
    resolve_checkpoint,
    save_model,
)
from nn_core.training.config import TrainConfig
from nn_core.training.trainer import Trainer

TINY = Config.tiny()
SEQ, BATCH = 32, 4
PROMPTS = ["def ", "class Foo", "import", "    return", "é ünïcode", "x = 1\n"]
SAMPLING = {"max_new_tokens": 12, "strategy": "top_k", "top_k": 20, "temperature": 0.9, "seed": 7}


class SerialExecutor(Executor):
    """Runs every task at submit time in the caller's thread: the single-process run."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose ``latest`` is a checkpoint after 12 updates on byte text."""
    ids = ByteTokenizer().encode(default_corpus()[:4000])
    cfg = TrainConfig(batch_size=2, seq_len=16, lr=3e-3, warmup_steps=1, total_steps=20)
    trainer = Trainer(MoETransformer(TINY, seed=9), cfg)
    for s in range(12):
        window = ids[np.array([100 * s, 100 * s + 2000])[:, None] + np.arange(17)]  # [2, 17]
        trainer.train_step(window[:, :-1], window[:, 1:])
    out = tmp_path_factory.mktemp("run")
    trainer.save_checkpoint(out)
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "eval.txt"
    path.write_text(default_corpus()[5000:11000], encoding="utf-8")  # 6000 bytes of source
    return path


@pytest.fixture(scope="module")
def serial(run_dir: Path, data_file: Path) -> dict[str, Any]:
    """The single-process reference results."""
    ex = SerialExecutor()
    return {
        "eval": evaluate_file(run_dir, data_file, seq_len=SEQ, batch_size=BATCH, executor=ex),
        "texts": generate_many(run_dir, PROMPTS, executor=ex, **SAMPLING),
    }


# ---- the single-process run is the right answer -----------------------------------------


def test_serial_evaluation_is_the_token_weighted_mean_ce(
    run_dir: Path, data_file: Path, serial: dict[str, Any]
) -> None:
    model = load_model(run_dir)
    ids = ByteTokenizer().encode(data_file.read_text(encoding="utf-8"))
    batches = eval_batches(ids, BATCH, SEQ)
    total = sum(x.size * model.loss_terms(x, y).ce for x, y in batches)
    tokens = sum(x.size for x, _ in batches)
    result = serial["eval"]
    assert result["tokens"] == tokens == (ids.size - 1) // SEQ * SEQ  # every window
    assert result["batches"] == len(batches) == -(-((ids.size - 1) // SEQ) // BATCH)
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-12)
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]), rel=1e-12)
    assert 0 < result["loss"] < np.log(TINY.vocab_size)  # trained: better than uniform


def test_max_batches_takes_that_many_batches(run_dir: Path, data_file: Path) -> None:
    out = evaluate_file(
        run_dir, data_file, seq_len=SEQ, batch_size=BATCH, max_batches=3, executor=SerialExecutor()
    )
    assert out["batches"] == 3 and out["tokens"] == 3 * BATCH * SEQ


def test_serial_generation_equals_generate_with_the_prompt_rng(
    run_dir: Path, serial: dict[str, Any]
) -> None:
    model = load_model(run_dir)
    tok = ByteTokenizer()
    strategy = TopK(20, 0.9)
    for i, prompt in enumerate(PROMPTS):
        ids = tok.encode(prompt)
        rng = np.random.default_rng([7, i])  # prompt i: default_rng([seed, i])
        want = generate(model, ids, ids.size + 12, strategy, rng=rng, vocab_limit=258)
        assert serial["texts"][i] == tok.decode(np.array(want)), prompt
    assert all(t.startswith(p) for t, p in zip(serial["texts"], PROMPTS))


def test_greedy_and_continuation_only(run_dir: Path) -> None:
    ex = SerialExecutor()
    full = generate_many(run_dir, PROMPTS[:2], max_new_tokens=8, executor=ex)
    tails = generate_many(
        run_dir, PROMPTS[:2], max_new_tokens=8, strategy=Greedy(), executor=ex, include_prompt=False
    )
    assert [p + t for p, t in zip(PROMPTS[:2], tails)] == full
    assert generate_many(run_dir, [], max_new_tokens=8, executor=ex) == []


# ---- every executor and every split gives the same result ------------------------------


def test_thread_pool_and_any_split_equal_serial(
    run_dir: Path, data_file: Path, serial: dict[str, Any]
) -> None:
    with ThreadPoolExecutor(3) as ex:
        got = evaluate_file(run_dir, data_file, seq_len=SEQ, batch_size=BATCH, executor=ex)
        assert got == serial["eval"]  # bitwise: floats compared with ==
        for per_unit in (1, 4, len(PROMPTS)):
            texts = generate_many(
                run_dir, PROMPTS, executor=ex, prompts_per_unit=per_unit, **SAMPLING
            )
            assert texts == serial["texts"], per_unit


def test_default_process_pool_equals_serial(
    run_dir: Path, data_file: Path, serial: dict[str, Any]
) -> None:
    got = evaluate_file(run_dir, data_file, seq_len=SEQ, batch_size=BATCH)  # executor=None
    assert got == serial["eval"]
    assert generate_many(run_dir, PROMPTS, prompts_per_unit=2, **SAMPLING) == serial["texts"]


def test_explicit_process_pool_equals_serial(
    run_dir: Path, data_file: Path, serial: dict[str, Any]
) -> None:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context) as ex:
        got = evaluate_file(run_dir, data_file, seq_len=SEQ, batch_size=BATCH, executor=ex)
        texts = generate_many(run_dir, PROMPTS, executor=ex, **SAMPLING)
    assert got == serial["eval"] and texts == serial["texts"]


@pytest.fixture(scope="module")
def dask_executor() -> Iterator[Executor]:
    """A 2-process Dask cluster on loopback (no dashboard), as a concurrent.futures executor."""
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    )
    try:
        client = distributed.Client(cluster)
        try:
            yield client.get_executor()
        finally:
            client.close()
    finally:
        cluster.close()


def test_dask_cluster_equals_serial(
    run_dir: Path, data_file: Path, serial: dict[str, Any], dask_executor: Executor
) -> None:
    got = evaluate_file(run_dir, data_file, seq_len=SEQ, batch_size=BATCH, executor=dask_executor)
    assert got == serial["eval"]
    texts = generate_many(run_dir, PROMPTS, executor=dask_executor, prompts_per_unit=2, **SAMPLING)
    assert texts == serial["texts"]


# ---- the checkpoint is resolved once and cached per process ------------------------------


def test_run_directory_and_its_step_directory_give_the_same_result(
    run_dir: Path, data_file: Path, serial: dict[str, Any]
) -> None:
    step = resolve_checkpoint(run_dir)
    assert step != run_dir
    got = evaluate_file(step, data_file, seq_len=SEQ, batch_size=BATCH, executor=SerialExecutor())
    assert got == serial["eval"]


def test_model_cache_loads_once_and_reloads_a_rewritten_checkpoint(
    run_dir: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(run_dir), ckpt)
    clear_model_cache()
    first = cached_model(str(ckpt))
    assert cached_model(str(ckpt)) is first
    stat = (ckpt / STATE_FILE).stat()
    os.utime(ckpt / STATE_FILE, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = cached_model(str(ckpt))
    assert second is not first
    assert np.array_equal(second.flat_params, first.flat_params)
    clear_model_cache()


# ---- errors ------------------------------------------------------------------------------


def test_bad_arguments_are_rejected_before_any_work(
    run_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    ex = SerialExecutor()
    with pytest.raises(ConfigError, match=r"seq_len must be an int in \[1, 512\], got 513"):
        evaluate_file(run_dir, data_file, seq_len=513, batch_size=2, executor=ex)
    with pytest.raises(ConfigError, match="batch_size must be an int >= 1"):
        evaluate_file(run_dir, data_file, seq_len=8, batch_size=0, executor=ex)
    short = tmp_path / "short.txt"
    short.write_text("tiny", encoding="utf-8")
    with pytest.raises(InputError, match="has 4 tokens; seq_len=8 needs at least"):
        evaluate_file(run_dir, short, seq_len=8, batch_size=2, executor=ex)
    with pytest.raises(InputError, match="no such file"):
        evaluate_file(run_dir, tmp_path / "none.txt", seq_len=8, batch_size=2, executor=ex)
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate_file(tmp_path / "nope", data_file, seq_len=8, batch_size=2, executor=ex)
    with pytest.raises(ConfigError, match="executor must be a concurrent.futures.Executor"):
        evaluate_file(run_dir, data_file, seq_len=8, batch_size=2, executor=object())  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"prompts\[1\] must be a non-empty string"):
        generate_many(run_dir, ["a", ""], max_new_tokens=4, executor=ex)
    with pytest.raises(InputError, match="prompts must be a list of strings"):
        generate_many(run_dir, "abc", max_new_tokens=4, executor=ex)
    with pytest.raises(InputError, match=r"prompts\[0\] has 500 tokens; with max_new_tokens=20"):
        generate_many(run_dir, ["x" * 500], max_new_tokens=20, executor=ex)
    with pytest.raises(ConfigError, match="strategy must be one of"):
        generate_many(run_dir, ["a"], max_new_tokens=4, strategy="beam", executor=ex)
    with pytest.raises(ConfigError, match="temperature"):
        generate_many(run_dir, ["a"], max_new_tokens=4, strategy="temperature", temperature=-1)


def test_small_vocab_checkpoint_is_rejected(tmp_path: Path, data_file: Path) -> None:
    save_model(MoETransformer(TINY.replace(vocab_size=100)), tmp_path / "m")
    with pytest.raises(CheckpointError, match="vocab_size 100 is smaller than the byte"):
        evaluate_file(tmp_path / "m", data_file, seq_len=8, batch_size=2, executor=SerialExecutor())


def test_a_corrupt_checkpoint_fails_in_the_worker_with_its_error(
    run_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(run_dir), ckpt)
    data = bytearray((ckpt / MODEL_FILE).read_bytes())
    data[-5] ^= 0xFF
    (ckpt / MODEL_FILE).write_bytes(bytes(data))
    with ThreadPoolExecutor(2) as ex, pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        evaluate_file(ckpt, data_file, seq_len=SEQ, batch_size=BATCH, executor=ex)
