"""Run metadata: the machine, the library versions, the BLAS pool and how things were measured.

Hostname-free: nothing here identifies the machine beyond its CPU model and OS.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from typing import Any

import numpy as np
from threadpoolctl import threadpool_info

ALLOC_BYTES_COVERS = (
    "tracemalloc, one separate untimed call: the peak of traced memory above the "
    "pre-call baseline. Covers Python object allocations and NumPy array buffers "
    "(NumPy reports them to tracemalloc in its domain 389047); not BLAS-internal "
    "buffers, Numba/NRT or other C allocations that bypass those hooks. Parallel "
    "scenarios: all T instances at once (threads) or the sum over T workers (processes)."
)
PEAK_RSS_COVERS = (
    "peak RSS of the harness process in bytes: on Linux VmHWM of /proc/self/status (the "
    "high-water mark getrusage ru_maxrss reports, minus the maxrss ru_maxrss inherits across "
    "exec from a parent), elsewhere ru_maxrss (bytes on macOS). Reset to the current RSS at "
    "each scenario's start via /proc/self/clear_refs where possible (peak_rss_scope), so it "
    "covers the scenario's setup and trials on top of "
    "the interpreter, NumPy and anything still alive. Process-pool scenarios: the parent "
    "only; the workers' own peaks are in params.worker_peak_rss_bytes."
)
CPU_TIME_COVERS = (
    "getrusage(RUSAGE_SELF) user+system delta around each trial (all threads of the "
    "process); process-pool scenarios add each worker's own getrusage(RUSAGE_SELF) "
    "delta around its work (RUSAGE_CHILDREN only covers exited children)."
)
GC_COVERS = (
    "gc.callbacks start/stop pairs during timed trials only (process pools: summed "
    "with the workers' collections); gc_throughput = 1 - gc_time / trial wall time."
)


def cpu_model() -> str:
    """'model name' of /proc/cpuinfo on Linux; platform.processor() elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_info() -> dict[str, Any]:
    """The BLAS library NumPy uses, as threadpoolctl reports it (first BLAS pool)."""
    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            return {
                "library": pool.get("internal_api"),
                "version": pool.get("version"),
                "threads": pool.get("num_threads"),
                "architecture": pool.get("architecture"),
                "threading_layer": pool.get("threading_layer"),
            }
    return {"library": None, "version": None, "threads": None, "architecture": None}


def blas_threads_now() -> int | None:
    return blas_info()["threads"]


def _version(dist: str) -> str | None:
    # imported here, when the metadata is written after the measurements: importlib.metadata
    # (with email, zipfile, csv) adds about 4 MB to a process, which every scenario's peak
    # RSS would otherwise carry
    from importlib import metadata as importlib_metadata

    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def collect(
    *,
    seed: int,
    n_trials: int,
    n_warmup: int,
    blas_thread_policy: dict[str, str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    meta: dict[str, Any] = {
        "language": "python",
        "language_version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "numpy_version": np.__version__,
        "numba_version": _version("numba"),
        "nn_core_version": _version("nn-core"),
        "blas": blas_info(),
        "blas_thread_policy": blas_thread_policy,
        "os": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "timestamp": now.isoformat().replace("+00:00", "Z"),
        "seed": seed,
        "n_trials": n_trials,
        "n_warmup": n_warmup,
        "timer": "time.perf_counter_ns",
        "cpu_time": CPU_TIME_COVERS,
        "alloc_bytes_covers": ALLOC_BYTES_COVERS,
        "peak_rss_covers": PEAK_RSS_COVERS,
        "gc": GC_COVERS,
    }
    meta.update(extra or {})
    return meta


def runtime_info() -> dict[str, Any]:
    """Versions, CPU count and the BLAS libraries with their thread counts (threadpoolctl):
    what ``nn-core info`` prints and the benchmark records."""
    from ..version import __version__

    blas = [
        {
            "api": lib.get("internal_api"),
            "prefix": lib.get("prefix"),
            "version": lib.get("version"),
            "threading_layer": lib.get("threading_layer"),
            "architecture": lib.get("architecture"),
            "num_threads": lib.get("num_threads"),
            "filepath": lib.get("filepath"),
        }
        for lib in threadpool_info()
        if lib.get("user_api") == "blas"
    ]
    return {
        "nn_core": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": _version("numba"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "blas": blas,
    }
