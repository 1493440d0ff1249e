"""Scenario -> timed operation. Everything here is set up untimed; only ``run`` is timed.

Shape legend: B batch, S sequence, H hidden_dim, V vocab_size, T parallel instances.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from threadpoolctl import threadpool_limits

from ..model.config import Config
from .harness import Workload, numerical_stats, peak_rss_bytes, traced_alloc_bytes
from .ops import config_of, model_and_op, model_op
from .scenarios import SEED, Scenario, make_inputs

if TYPE_CHECKING:  # the pool's module (multiprocessing) loads with the pool
    from .pool import ProcessPool

# ---------------------------------------------------------------------------- single model


class CallWorkload(Workload):
    """One call of a prepared zero-argument function per run."""

    def __init__(self, fn: Callable[[], Any], info: dict[str, Any] | None = None):
        super().__init__()
        self.fn = fn
        self.info = dict(info or {})

    def run(self) -> Any:
        return self.fn()


def cold_op(cfg: Config, batch: int, seq: int) -> Callable[[], Any]:
    """dispatch_cold: build the model (init of every weight) and run its first forward."""
    from ..model.transformer import MoETransformer

    ids, _ = make_inputs(batch, seq, cfg.vocab_size)

    def build_and_forward() -> Any:
        return MoETransformer(cfg, seed=SEED, dtype=np.float32).forward(ids)

    return build_and_forward


# ---------------------------------------------------------------------------- kernels

# kernel -> (module, function) of the package, tried in order
KERNEL_FUNCTIONS: dict[str, list[tuple[str, str]]] = {
    "matmul": [("nn_core.model.layers", "linear_forward")],  # Y = X @ W^T
    "softmax": [("nn_core.model.tensor", "softmax")],
    "rmsnorm": [("nn_core.model.layers", "rmsnorm_into")],
}


def _find_kernel(kernel: str) -> tuple[str, Callable[..., Any]] | None:
    for module, name in KERNEL_FUNCTIONS[kernel]:
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        return f"{module}.{name}", fn
    return None


class KernelWorkload(Workload):
    """``repeats_per_trial`` calls of a package kernel per run; reported per call.

    Each kernel writes into output arrays made once before timing, as the model calls it
    (into its workspace buffers), so a call allocates nothing.
    """

    def __init__(self, sc: Scenario):
        super().__init__()
        p = sc.params
        kernel = str(p["kernel"])
        self.repeats = int(p.get("repeats_per_trial", 1))
        rng = np.random.default_rng(SEED)
        found = _find_kernel(kernel)
        if kernel == "matmul":  # C = A @ B^T, A [m, k], B [n, k]
            a = rng.standard_normal((p["m"], p["k"]), dtype=np.float32)
            b = rng.standard_normal((p["n"], p["k"]), dtype=np.float32)
            # the package's linear_forward takes B^T [k, n] as the model stores its weights
            bt = np.ascontiguousarray(b.T)
            c = np.empty((p["m"], p["n"]), np.float32)
            ref: Callable[[], Any] = lambda: a @ b.T  # noqa: E731
            call = (lambda: found[1](a, bt, out=c)) if found else ref
        elif kernel == "softmax":  # x [n]
            x = rng.standard_normal(p["n"], dtype=np.float32)
            sm = np.empty_like(x)
            ref = lambda: _np_softmax(x)  # noqa: E731
            call = (lambda: found[1](x, out=sm)) if found else ref
        elif kernel == "rmsnorm":  # x [2, 32, 64] viewed as rows [N, H]
            shape = tuple(p["shape"])
            x = rng.standard_normal(shape, dtype=np.float32).reshape(-1, shape[-1])
            gain = np.ones(shape[-1], dtype=np.float32)
            r, y = np.empty((x.shape[0], 1), np.float32), np.empty_like(x)  # 1/rms, output
            ref = lambda: _np_rmsnorm(x, gain)  # noqa: E731
            call = (lambda: found[1](x, gain, 1e-6, r, y)) if found else ref
            self.info["input_view"] = f"rows [{x.shape[0]}, {x.shape[1]}] (N, H)"
        else:
            raise ValueError(f"unknown kernel {kernel!r}")
        self.call = call
        self.reference = ref  # the same result computed directly with NumPy (tests compare)
        self.info["function"] = found[0] if found else "numpy reference (no package kernel found)"
        self.info["output"] = "preallocated (written in place each call)"

    def run(self) -> Any:
        call = self.call
        out = None
        for _ in range(self.repeats):
            out = call()
        return out

    def run_once(self) -> Any:
        return self.call()

    def numerics(self, last_output: Any) -> dict[str, Any]:
        if isinstance(last_output, tuple):  # (out, cache) of a forward/backward pair
            last_output = last_output[0]
        return numerical_stats(last_output)


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_rmsnorm(x: np.ndarray, gain: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * gain


# ---------------------------------------------------------------------------- parallel axis


def threads_unsafe_reason() -> str | None:
    """Why T Python threads must not run the model concurrently here, or None."""
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is not None and getattr(parallel, "_is_initialized", False):
        import numba

        if numba.threading_layer() == "workqueue":
            return "Numba's workqueue threading layer aborts on concurrent parallel launches"
    return None


class ThreadParallelWorkload(Workload):
    """T independent models in this process, one op each on a pool of T threads.

    BLAS is capped at one thread process-wide for the scenario (threadpoolctl), so
    T threads use at most T cores for BLAS work; the GIL serializes the rest.
    """

    def __init__(self, sc: Scenario, train_options: dict[str, Any]):
        super().__init__()
        p = sc.params
        self.t = int(p["thread_count"])
        cfg = config_of(sc)
        self.limits = threadpool_limits(limits=1, user_api="blas")
        try:
            self.ops = [
                model_op(sc.kind, cfg, p["batch"], p["seq"], train_options) for _ in range(self.t)
            ]
            from concurrent.futures import ThreadPoolExecutor  # with this executor only

            self.pool = ThreadPoolExecutor(max_workers=self.t, thread_name_prefix="bench")
            self.run()  # start the T threads (untimed; warm-ups follow anyway)
        except BaseException:
            self.limits.restore_original_limits()
            raise
        self.info = {"executor": "threads", "blas_threads_per_worker": 1}

    def run(self) -> Any:
        futures = [self.pool.submit(op) for op in self.ops]
        return [f.result() for f in futures]

    def alloc_bytes(self) -> int:
        return traced_alloc_bytes(self.run)  # all T concurrently: tracemalloc sees every thread

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.limits.restore_original_limits()


class ProcessParallelWorkload(Workload):
    """T independent models in T worker processes of the run's pool, one op each."""

    def __init__(self, sc: Scenario, pool: ProcessPool):
        super().__init__()
        p = sc.params
        self.t = int(p["thread_count"])
        if self.t > pool.size:
            raise ValueError(f"thread_count {self.t} > process pool size {pool.size}")
        from .pool import PoolTask

        kind = "forward" if sc.kind == "parallel_forward" else "train"
        self.key = PoolTask(kind, str(p.get("config", "tiny")), p["batch"], p["seq"]).key
        self.pool = pool
        self.processes = self.t
        self.pool.call(self.t, "reset_rss")  # the workers' peaks count from here,
        pool.prepare(self.key, self.t)  # with the build of their models as for one model
        self._last: list[tuple[int, int, int]] = []
        self.info = {
            "executor": "processes",
            "start_method": pool.start_method,
            "blas_threads_per_worker": 1,
            "cpu_time_source": "parent getrusage(RUSAGE_SELF) + each worker's own getrusage",
        }

    def run(self) -> Any:
        self._last = self.pool.run(self.key, self.t)
        return None  # outputs stay in the workers

    def extra_cpu_ns(self) -> int:
        return sum(r[0] for r in self._last)

    def extra_gc(self) -> tuple[int, int]:
        return sum(r[1] for r in self._last), sum(r[2] for r in self._last)

    def alloc_bytes(self) -> int:
        return int(sum(self.pool.call(self.t, "alloc", self.key)))  # concurrent, summed

    def numerics(self, last_output: Any) -> dict[str, Any]:
        stats = self.pool.call(self.t, "numerics", self.key)
        return {
            "nan_count": sum(s["nan_count"] for s in stats),
            "inf_count": sum(s["inf_count"] for s in stats),
            "max_abs": max(s["max_abs"] for s in stats),
        }

    def peak_rss(self) -> int:
        """The memory of every instance: this (parent) process's peak plus each of the T
        workers' peak since the scenario started (their peaks may fall at different
        moments, so the sum is an upper bound of the simultaneous total)."""
        parent = peak_rss_bytes()
        workers = [int(r) for r in self.pool.call(self.t, "rss")]
        self.info["peak_rss_parent_bytes"] = parent
        self.info["peak_rss_worker_bytes"] = workers
        return parent + sum(workers)


# ---------------------------------------------------------------------------- dispatch


def blas_pool_threads() -> int | None:
    """The BLAS pool's thread count now, as the library reads it."""
    from ..model.blas import current_threads

    return current_threads()


def build(sc: Scenario, train_options: dict[str, Any], context: Any = None) -> Workload:
    """The workload of a non-parallel scenario (parallel ones: see the runner);
    ``train_options``: TrainConfig fields of every trainer."""
    p = sc.params
    if sc.kind == "custom":
        if sc.factory is None:
            raise ValueError(f"custom scenario {sc.id} has no factory")
        return sc.factory(sc, context)
    if sc.kind == "kernel":
        return KernelWorkload(sc)
    cfg = config_of(sc)
    if sc.kind in ("forward", "train"):
        model, op = model_and_op(sc.kind, cfg, p["batch"], p["seq"], train_options)
        chosen = model.blas_threads_for(int(p["batch"]) * int(p["seq"]))
        return CallWorkload(
            op,
            {  # what the library chooses per call (None: all the pool allows)
                "blas_threads": chosen if chosen is not None else blas_pool_threads(),
                "blas_threads_chosen_by": "the library (nn_core.model.blas)",
            },
        )
    if sc.kind == "cold":
        return CallWorkload(
            cold_op(cfg, p["batch"], p["seq"]),
            {"timed": "MoETransformer(config, seed=42) construction + first forward"},
        )
    raise ValueError(f"scenario {sc.id}: kind {sc.kind!r} is not built here")
