"""The suite's 22 benchmark scenarios (the contract in docs/benchmark.md) and a registry
of extras.

Shape legend: B batch, S sequence, V vocab_size.

Each scenario is data: its id, its axis, the params that describe the workload
(copied into the JSON) and its ``kind``, which ``workloads.build`` turns into a
timed operation. Params carry the names the other implementations of the suite read
(``seq_len``, ``hidden_dim``; ``M``, ``K``, ``N`` for the matmul kernel) beside our
own (``seq``, ``config``; ``m``, ``k``, ``n``). Extras (scenarios outside the 22, e.g.
decoding speed or the parallel axis on threads) live in ``EXTRAS``; they run only when
selected by ``--scenario``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..model.config import Config

SEED = 42  # the suite's fixed seed of every model and every random input

# The parallel axis runs T independent model instances in T worker processes (one BLAS
# thread each), fixed by design before measuring: docs/benchmark.md says why. The same
# workloads on T threads of one process are the extras parallel_threads_T{T} and
# parallel_train_threads_T{T}.
PARALLEL_EXECUTOR = "processes"
EXECUTORS = ("processes", "threads")

# kind -> what one timed run does
KINDS = (
    "forward",  # model.forward(ids) on a built model
    "train",  # one Trainer.train_step(ids, targets): forward, loss, backward, clip, AdamW
    "cold",  # MoETransformer(config, seed) + its first forward, timed together
    "kernel",  # `repeats_per_trial` calls of one package kernel
    "parallel_forward",  # T independent models, one forward each, concurrently
    "parallel_train",  # T independent trainers, one train step each, concurrently
    "custom",  # an extra with its own factory
)


@dataclass(frozen=True)
class Scenario:
    id: str
    axis: str
    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)
    # extras only: factory(scenario, context) -> harness.Workload
    factory: Callable[..., Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"scenario kind must be one of {KINDS}, got {self.kind!r}")


def _model(
    sid: str, axis: str, kind: str, config: str, batch: int, seq: int, **extra: Any
) -> Scenario:
    workload = {
        "forward": "forward",
        "train": "train_step",
        "cold": "build_model_and_first_forward",
        "parallel_forward": "forward",
        "parallel_train": "train_step",
    }[kind]
    params = {
        "config": config,
        "workload": workload,
        "batch": batch,
        "seq": seq,
        "seq_len": seq,  # the suite's name for seq
        "hidden_dim": Config.preset(config).hidden_dim,
        **extra,
    }
    return Scenario(sid, axis, kind, params)


def _kernel(sid: str, kernel: str, repeats: int, **extra: Any) -> Scenario:
    params = {"kernel": kernel, "dtype": "float32", **extra, "repeats_per_trial": repeats}
    return Scenario(sid, "compiler", "kernel", params)


def _parallel(sid: str, kind: str, threads: int, seq: int, executor: str) -> Scenario:
    """T independent tiny instances, one op each, concurrently on ``executor``. The
    runner writes ``parallel_semantics`` at the scenario level of the record."""
    return _model(
        sid, "parallel", kind, "tiny", 2, seq,
        thread_count=threads, parallel_semantics="independent", executor=executor,
    )  # fmt: skip


SCENARIOS: tuple[Scenario, ...] = (
    # memory axis
    _model("mem_train_step", "memory", "train", "tiny", 2, 8),
    *(_model(f"mem_scale_batch_{b}", "memory", "forward", "tiny", b, 32) for b in (1, 2, 4, 8)),
    *(_model(f"mem_scale_seq_{s}", "memory", "forward", "tiny", 2, s) for s in (8, 16, 32, 64)),
    # compiler axis: known flops 2*64^3, 4n, 3 per element
    _kernel(
        "kernel_matmul",
        "matmul",
        100,
        m=64,
        n=64,
        k=64,
        M=64,
        K=64,
        N=64,
        known_flops=2 * 64**3,
    ),  # fmt: skip
    _kernel("kernel_softmax", "softmax", 200, n=1000, known_flops=4 * 1000),
    _kernel("kernel_rmsnorm", "rmsnorm", 200, shape=[2, 32, 64], known_flops=3 * 2 * 32 * 64),
    # type_system axis
    _model("dispatch_warm", "type_system", "forward", "tiny", 2, 32),
    _model("dispatch_cold", "type_system", "cold", "tiny", 1, 8),
    # parallel axis
    *(_parallel(f"parallel_T{t}", "parallel_forward", t, 32, PARALLEL_EXECUTOR) for t in (1, 2, 4)),
    *(
        _parallel(f"parallel_train_T{t}", "parallel_train", t, 8, PARALLEL_EXECUTOR)
        for t in (1, 2, 4)
    ),
    # scale axis
    _model("scale_forward_256", "scale", "forward", "small", 2, 32),
    _model("scale_train_256", "scale", "train", "small", 2, 8),
)

SCENARIO_IDS: tuple[str, ...] = tuple(s.id for s in SCENARIOS)

# Scenarios outside the suite's 22, by id; run only when --scenario selects them.
EXTRAS: dict[str, Scenario] = {}


def register_extra(scenario: Scenario) -> Scenario:
    """Add a scenario outside the 22 (its id must be new)."""
    if scenario.id in SCENARIO_IDS or scenario.id in EXTRAS:
        raise ValueError(f"scenario id {scenario.id!r} is already defined")
    EXTRAS[scenario.id] = scenario
    return scenario


for _t in (1, 2, 4):  # the parallel axis on the other executor, for comparison
    register_extra(_parallel(f"parallel_threads_T{_t}", "parallel_forward", _t, 32, "threads"))
    register_extra(_parallel(f"parallel_train_threads_T{_t}", "parallel_train", _t, 8, "threads"))


def select(patterns: Iterable[str] | None) -> list[Scenario]:
    """Scenarios whose id matches any fnmatch glob, in suite order, extras last.

    No patterns: the 22 suite scenarios. A pattern that matches nothing is an error.
    """
    pats = list(patterns or [])
    if not pats:
        return list(SCENARIOS)
    pool = [*SCENARIOS, *EXTRAS.values()]
    for p in pats:
        if not any(fnmatch.fnmatchcase(s.id, p) for s in pool):
            known = ", ".join(s.id for s in pool)
            raise ValueError(f"--scenario {p!r} matches no scenario; known ids: {known}")
    return [s for s in pool if any(fnmatch.fnmatchcase(s.id, p) for p in pats)]


def make_inputs(batch: int, seq: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """The suite's inputs: ids[b, s] = (b*seq + s) mod V; targets = (ids + 1) mod V.
    [B, S] int64."""
    ids = (np.arange(batch * seq, dtype=np.int64) % vocab).reshape(batch, seq)  # [B, S]
    return ids, (ids + 1) % vocab


def tokens_of(scenario: Scenario) -> int | None:
    """Tokens processed by one run (all T instances for the parallel axis)."""
    p = scenario.params
    if "batch" not in p or "seq" not in p:
        return None
    return int(p["batch"]) * int(p["seq"]) * int(p.get("thread_count", 1))
