"""A process pool for the parallel axis: one model per worker, built in its initializer.

The pool is created once per benchmark run, while this process runs no other
Python thread and no Numba thread pool (so 'fork' is safe on Linux; otherwise
'spawn'). Each worker caps BLAS (and Numba) at one thread and waits on its own
pipe for commands. A scenario first asks the workers it uses to prepare its task
(``prepare``: build the model or trainer and run one untimed priming call, as the
suite's other implementations do before timing); a worker keeps what it built for
later scenarios. So a worker that only ran forwards so far holds no trainer, and no
Numba, in the forward scenarios' peak RSS.

A timed run sends ("run", key) to T workers and waits for all T replies; each
worker reports the CPU time (its own getrusage user+system) and GC pauses of
its work. Outputs stay in the workers; their NaN/Inf/max-abs statistics are
fetched afterwards, untimed.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import sys
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .harness import (
    GcTracker,
    cpu_ns,
    numerical_stats,
    peak_rss_bytes,
    reset_peak_rss,
    traced_alloc_bytes,
)


@dataclass(frozen=True)
class PoolTask:
    """A workload every worker prepares: kind 'forward' or 'train' on [batch, seq]."""

    kind: str
    config: str
    batch: int
    seq: int

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.config}:{self.batch}x{self.seq}"


def fork_is_safe() -> bool:
    """'fork' is safe while this process runs no extra threads that a child could
    inherit mid-lock: no other Python threads and no launched Numba thread pool.
    (OpenBLAS re-initializes its pool in the child through pthread_atfork.)"""
    if not sys.platform.startswith("linux"):
        return False
    if threading.active_count() != 1:
        return False
    numba_parallel = sys.modules.get("numba.np.ufunc.parallel")
    return not (numba_parallel is not None and getattr(numba_parallel, "_is_initialized", False))


class ProcessPool:
    """``n_workers`` processes, each holding its own instance of every task."""

    def __init__(
        self,
        n_workers: int,
        tasks: list[PoolTask],
        start_method: str | None = None,
        train_options: dict[str, Any] | None = None,
    ):
        self.start_method = start_method or ("fork" if fork_is_safe() else "spawn")
        ctx: Any = mp.get_context(self.start_method)
        self.tasks = {t.key: t for t in tasks}
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(n_workers):
            parent, child = ctx.Pipe()
            args = (child, tasks, dict(train_options or {}))
            proc = ctx.Process(target=_worker_main, args=args, daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            status, error = conn.recv()
            if status != "ready":
                raise RuntimeError(f"bench worker failed to start: {error}")

    @property
    def size(self) -> int:
        return len(self.conns)

    def prepare(self, key: str, t: int) -> None:
        """Workers 0..t-1 build task ``key`` (if not yet) and prime it, untimed. Raises
        RuntimeError naming the task if a worker could not build it."""
        if key not in self.tasks:
            raise ValueError(f"no pool task {key!r}; the pool has {sorted(self.tasks)}")
        for error in self.call(t, "prepare", key):
            if error is not None:
                raise RuntimeError(f"worker could not build {key}: {error}")

    def run(self, key: str, t: int) -> list[tuple[int, int, int]]:
        """The timed operation: workers 0..t-1 each run task ``key`` once, concurrently.

        Returns per worker (cpu_ns, gc_time_ns, gc_count) of its own work.
        """
        conns = self.conns[:t]
        for c in conns:
            c.send(("run", key))
        return [_unwrap(c.recv()) for c in conns]

    def call(self, t: int, *msg: Any) -> list[Any]:
        """Send ``msg`` to workers 0..t-1 and collect their replies (untimed helpers)."""
        conns = self.conns[:t]
        for c in conns:
            c.send(msg)
        return [_unwrap(c.recv()) for c in conns]

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("stop",))
                c.close()
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self.conns, self.procs = [], []


def _unwrap(reply: Any) -> Any:
    status, value = reply
    if status != "ok":
        raise RuntimeError(f"bench worker error: {value}")
    return value


# ---------------------------------------------------------------------------- worker side


def _build_task(task: PoolTask, train_options: dict[str, Any]) -> Any:
    """A zero-argument callable running the task once (built untimed)."""
    from ..model.config import Config
    from .ops import model_op  # the model modules load in the worker

    if task.kind not in ("forward", "train"):
        raise ValueError(f"pool task kind must be 'forward' or 'train', got {task.kind!r}")
    return model_op(task.kind, Config.preset(task.config), task.batch, task.seq, train_options)


def _limit_threads() -> None:
    """One BLAS thread and one Numba thread per worker: T workers share the cores."""
    from threadpoolctl import threadpool_limits

    os.environ["NUMBA_NUM_THREADS"] = "1"  # honoured if Numba is first imported after this
    threadpool_limits(limits=1, user_api="blas")
    numba = sys.modules.get("numba")
    if numba is not None:
        try:
            numba.set_num_threads(1)
        except (ValueError, RuntimeError):
            pass


def _worker_main(conn: Connection, tasks: list[PoolTask], train_options: dict[str, Any]) -> None:
    sys.stdout = sys.stderr  # stdout belongs to the parent's JSON
    _limit_threads()
    by_key = {task.key: task for task in tasks}
    fns: dict[str, Any] = {}
    conn.send(("ready", None))
    last: dict[str, Any] = {}
    tracker = GcTracker()
    gc.callbacks.append(tracker)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        cmd = msg[0]
        if cmd == "stop":
            break
        try:
            if cmd == "prepare":
                key = msg[1]
                error = None
                if key not in fns:
                    try:
                        fn = _build_task(by_key[key], train_options)
                        fn()  # priming: any lazy loading happens here, untimed
                        fns[key] = fn
                    except Exception as exc:  # the parent fails that scenario
                        error = f"{type(exc).__name__}: {exc}"
                conn.send(("ok", error))
            elif cmd == "run":
                key = msg[1]
                last.pop(key, None)
                tracker.time_ns = tracker.count = 0
                tracker.active = True
                c0 = cpu_ns()
                last[key] = fns[key]()
                c1 = cpu_ns()
                tracker.active = False
                conn.send(("ok", (c1 - c0, tracker.time_ns, tracker.count)))
            elif cmd == "numerics":
                conn.send(("ok", numerical_stats(last.get(msg[1]))))
            elif cmd == "alloc":
                conn.send(("ok", traced_alloc_bytes(fns[msg[1]])))
            elif cmd == "reset_rss":
                conn.send(("ok", reset_peak_rss()))
            elif cmd == "rss":
                conn.send(("ok", peak_rss_bytes()))
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
        except Exception:
            tracker.active = False
            conn.send(("error", traceback.format_exc(limit=3)))
    conn.close()
