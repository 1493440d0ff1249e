"""Data parallelism over MPI: ``mpiexec -n 2`` launched from pytest (tests/mpi_worker.py).

- 2 ranks with b rows each equal 1 process with 2b rows: float64 to 1e-12 relative
  (losses, gradient norms, parameters; the routing counts exactly), with and without
  gradient accumulation; the ranks' parameters are bitwise equal.
- the command line: rank 0 alone writes; 2 ranks against 1 process in float32 (bound
  measured and stated below); an exception on one rank ends both with the error printed
  once; ``kill -9`` of one rank ends the job; after either, the last checkpoint resumes
  bit for bit on 2 ranks, and on 1 process (2 -> 1) within the float32 bound; parameters
  that drift apart on one rank stop the run with a clear error.

mpi4py is a test oracle here: missing, these tests skip, or fail under
NN_CORE_REQUIRE_ORACLES=1 (tests/oracles.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nn_core.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from mpi_worker import FAULT, equiv_run, equiv_trainer  # noqa: E402
from oracles import oracles_required, require_oracle  # noqa: E402
from timeouts import SUBPROCESS_TIMEOUT  # noqa: E402

require_oracle("mpi4py")
WORKER = Path(__file__).parent / "mpi_worker.py"
KILL_BOUND_SECONDS = 30.0  # kill -9 of a rank to the end of the job (see the kill test)
FLOAT32_RTOL = 1e-4  # 2 ranks vs 1 process, float32 (measured after 20 updates: <= 8e-7)


def mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"  # the mpich wheel's, in the venv
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        problem = "mpiexec not found (pip install 'nn-core[mpi]' provides it)"
        if oracles_required():
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    return found


def run_ranks(
    n: int, *args: object, fault: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``mpiexec -n N python tests/mpi_worker.py ARGS`` (no extra flags needed as root)."""
    env = {k: v for k, v in os.environ.items() if k != FAULT}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")]
    )
    if fault:
        env[FAULT] = fault
    cmd = [mpiexec(), "-n", str(n), sys.executable, str(WORKER), *map(str, args)]
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ---- exact equivalence through the Trainer (float64) -------------------------------------


@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_of_b_rows_equal_one_process_of_2b_rows_float64(tmp_path, accum) -> None:  # type: ignore[no-untyped-def]
    steps = 4
    done = run_ranks(2, "equiv", tmp_path, accum, steps)
    assert done.returncode == 0, done.stderr
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    assert np.array_equal(r0["params"], r1["params"])  # bitwise the same model on each rank
    assert np.array_equal(r0["losses"], r1["losses"])
    one = equiv_run(equiv_trainer(accum, None), steps)  # this process, batch 8 = 2 x 4 rows
    assert rel(r0["losses"], one["losses"]) < 1e-12
    assert rel(r0["norms"], one["norms"]) < 1e-12
    assert rel(r0["params"], one["params"]) < 1e-12
    assert rel(r0["v"], one["v"]) < 1e-12
    assert np.array_equal(r0["counts"], one["counts"])  # routing of the whole batch, summed
    assert np.all(r0["counts"].sum(axis=-1) == 64 * 2)  # 64 tokens x top-2 per step


# ---- the command line --------------------------------------------------------------------


def corpus(path: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "value", "items", "count", "total"]
    path.write_text(
        "".join(
            f"def f{i}({a}, {b}):\n    return {a} * {b} + {i % 7}\n"
            for i, (a, b) in enumerate(rng.choice(words, (300, 2)))
        ),
        encoding="utf-8",
    )
    return path


TRAIN = [
    "--batch-size", "4", "--seq-len", "16", "--steps", "6", "--warmup-steps", "1",
    "--checkpoint-interval", "2", "--eval-interval", "3", "--sample-tokens", "0", "--quiet",
    "--tokenizer", "byte",  # the data as bytes, also when prepared
]  # fmt: skip


def train_ranks(n: int, out: Path, data: Path, *extra: str, fault: str | None = None):  # type: ignore[no-untyped-def]
    if extra and extra[0] == "--resume":
        args = ["--resume", "--out", str(out)]
    else:
        args = [*TRAIN, "--data", str(data), "--out", str(out)]
    return run_ranks(n, "cli", "train", *args, fault=fault)


def train_one(out: Path, data: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = (
        ["--resume", "--out", str(out)]
        if extra
        else [*TRAIN, "--data", str(data), "--out", str(out)]
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "nn_core", "train", "--threads", "1", *args]
    return subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False
    )


def metrics(run: Path) -> list[dict[str, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    timings = {"tokens_per_sec", "comm_seconds", "step_seconds"}
    return [{k: v for k, v in json.loads(x).items() if k not in timings} for x in lines]


def weights(run: Path) -> np.ndarray:
    return Trainer.resume(run).model.flat_params


def latest(run: Path) -> str:
    return (run / "latest").read_text().strip()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):  # type: ignore[no-untyped-def]
    """One uninterrupted 6-update run on 2 ranks, the reference of the fault tests."""
    root = tmp_path_factory.mktemp("mpi")
    data = corpus(root / "corpus.txt")
    done = train_ranks(2, root / "straight", data)
    assert done.returncode == 0, done.stderr
    return root, data, done


def test_rank_0_alone_writes_and_reports(straight) -> None:  # type: ignore[no-untyped-def]
    root, _, done = straight
    run = root / "straight"
    assert [m["step"] for m in metrics(run)] == list(range(6))  # one line per update
    assert done.stdout.count("over 2 ranks") == 1 and done.stdout.count("\nstep 6 of 6;") == 1
    assert sorted(p.name for p in run.glob("step_*")) == [
        "step_000002",
        "step_000004",
        "step_000006",
    ]
    assert "val_loss" in metrics(run)[2]


def test_two_ranks_against_one_process_float32(straight) -> None:  # type: ignore[no-untyped-def]
    root, data, _ = straight
    done = train_one(root / "one", data)
    assert done.returncode == 0, done.stderr
    two, one = metrics(root / "straight"), metrics(root / "one")
    for key in ("loss", "ce", "aux", "grad_norm"):
        assert rel([m[key] for m in two], [m[key] for m in one]) < FLOAT32_RTOL, key
    assert rel(weights(root / "straight"), weights(root / "one")) < FLOAT32_RTOL
    for m2, m1 in zip(two, one, strict=True):  # expert telemetry of the whole batch
        assert m2["experts"]["tokens"] == m1["experts"]["tokens"] == 4 * 16
        assert ("val_experts" in m2) == ("val_experts" in m1)
        if "val_experts" in m2:  # every validation batch, over both ranks
            assert m2["val_experts"]["tokens"] == m1["val_experts"]["tokens"]
            assert rel(m2["val_experts"]["prob"], m1["val_experts"]["prob"]) < 1e-4


def test_an_exception_on_one_rank_ends_all_printed_once_and_resume_is_exact(straight) -> None:  # type: ignore[no-untyped-def]
    root, data, _ = straight
    run = root / "raise"
    done = train_ranks(2, run, data, fault="1:5:raise")
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("No space left on device (injected fault)") == 1, done.stderr
    assert "error (rank 1 of 2)" in done.stderr and "Traceback" not in done.stderr
    assert latest(run) == "step_000004"  # the last checkpoint, intact: it loads
    resumed = train_ranks(2, run, data, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(run) == metrics(root / "straight")  # bit for bit
    assert np.array_equal(weights(run), weights(root / "straight"))


def test_kill_9_of_one_rank_ends_the_job_and_resume_is_exact_on_2_and_on_1(straight) -> None:  # type: ignore[no-untyped-def]
    root, data, _ = straight
    run = root / "kill"
    done = train_ranks(2, run, data, fault="1:5:kill")
    ended = time.time()
    assert done.returncode != 0
    assert "BAD TERMINATION" in done.stdout + done.stderr and "signal 9" in done.stdout
    killed = float(done.stderr.split("injected kill at ")[1].split()[0])
    # mpiexec ends the job as soon as it sees the lost rank (measured: 0.05-0.07 s); the
    # bound only tells a prompt end from a hang that the subprocess timeout would catch
    assert ended - killed < KILL_BOUND_SECONDS
    assert latest(run) == "step_000004"
    shutil.copytree(run, root / "kill_on_one")
    resumed = train_ranks(2, run, data, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(run) == metrics(root / "straight")
    assert np.array_equal(weights(run), weights(root / "straight"))
    on_one = train_one(root / "kill_on_one", data, "--resume")  # 2 ranks -> 1 process
    assert on_one.returncode == 0, on_one.stderr
    assert rel(weights(root / "kill_on_one"), weights(root / "straight")) < FLOAT32_RTOL
    assert metrics(root / "kill_on_one")[:4] == metrics(root / "straight")[:4]


def test_parameters_drifting_apart_stop_the_run_with_a_clear_error(straight) -> None:  # type: ignore[no-untyped-def]
    root, data, _ = straight
    run = root / "drift"
    done = train_ranks(2, run, data, fault="1:2:drift")
    assert done.returncode == 1
    assert done.stderr.count("rank(s) [1] differ from rank 0's after step 4") == 1, done.stderr
    assert latest(run) == "step_000002"  # nothing of the drifted steps was written


# ---- without a launcher ------------------------------------------------------------------


def test_without_mpiexec_or_with_one_rank_there_is_no_group(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from nn_core.training.distributed import DistributedError, world

    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert world() is None
    monkeypatch.setenv("PMI_SIZE", "1")
    assert world() is None
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if not installed
    with pytest.raises(DistributedError, match=r"nn-core\[mpi\]"):
        world()


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_once(straight) -> None:  # type: ignore[no-untyped-def]
    root, data, _ = straight
    args = ["train", "--data", data, "--batch-size", "3", "--steps", "2", "--out", root / "odd"]
    done = run_ranks(2, "cli", *args)
    assert done.returncode == 2
    assert (
        done.stderr.count("batch_size (3) must be divisible by grad_accum_steps (1) x ranks (2)")
        == 1
    )


def test_a_prepared_dataset_is_memory_mapped_by_every_rank_with_the_same_batches(straight) -> None:  # type: ignore[no-untyped-def]
    root, data, _ = straight
    prepared = root / "prepared"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    made = subprocess.run(
        [sys.executable, "-m", "nn_core", "prepare", str(data), "--out", str(prepared)]
        + ["--tokenizer", "byte"],
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    done = train_ranks(2, root / "from_prepared", prepared)
    assert done.returncode == 0, done.stderr
    assert metrics(root / "from_prepared") == metrics(root / "straight")


def test_file_window_finds_a_split_of_a_memory_map_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nn_core.app.commands.train import file_window

    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    tokens = np.memmap(path, np.uint16, mode="r", offset=20, shape=(900,))
    for split in (tokens[:700], tokens[700:]):
        name, offset = file_window(split)  # type: ignore[misc]
        again = np.memmap(name, np.uint16, mode="r", offset=offset, shape=split.shape)
        assert np.array_equal(again, split)
    assert file_window(np.arange(5)) is None and file_window(np.asarray(tokens)[::2]) is None
