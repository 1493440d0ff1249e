"""Measurement: wall and CPU time, GC pauses, peak RSS, traced allocations, numerics.

A workload is measured in three separate passes so that no instrument disturbs
the timings:
  1. warm-up runs, then timed trials (perf_counter_ns wall, getrusage CPU, GC pauses
     through gc.callbacks) -- tracemalloc is OFF here;
  2. peak RSS read right after the trials (getrusage ru_maxrss, reset per scenario
     through /proc/self/clear_refs on Linux);
  3. one untimed call under tracemalloc for alloc_bytes.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------- clocks


def cpu_ns() -> int:
    """User + system CPU time of this process (all its threads), getrusage(RUSAGE_SELF)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return int(round((r.ru_utime + r.ru_stime) * 1e9))


# ---------------------------------------------------------------------------- peak RSS

RSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes.

    Linux: VmHWM of /proc/self/status -- the memory map's high-water mark, the same
    counter getrusage's ru_maxrss reports, but without the maxrss that ru_maxrss
    carries over across exec from the parent's memory map (a child started from a
    large process would otherwise report the parent's peak). Elsewhere: ru_maxrss.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB -> bytes
    except (OSError, ValueError, IndexError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * RSS_UNIT


def current_rss_bytes() -> int | None:
    """Resident set size now (Linux /proc/self/statm), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_free_memory() -> None:
    """Return memory that glibc's malloc holds free to the OS (malloc_trim), so a
    previous scenario's freed heap does not count as resident in the next one."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux: write 5 to /proc/self/clear_refs).

    getrusage's ru_maxrss follows the reset, so a scenario's peak is measured from
    the process's state at its start. Returns False where this is not possible
    (then ru_maxrss is the peak of the whole process lifetime).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------- GC pauses


class GcTracker:
    """Counts collections and sums their duration via gc.callbacks while ``active``."""

    def __init__(self) -> None:
        self.time_ns = 0
        self.count = 0
        self.active = False
        self._start: int | None = None

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter_ns()
        elif self._start is not None:
            if self.active:
                self.time_ns += time.perf_counter_ns() - self._start
                self.count += 1
            self._start = None

    def __enter__(self) -> GcTracker:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


# ---------------------------------------------------------------------------- allocations


def traced_alloc_bytes(fn: Callable[[], Any]) -> int:
    """Peak tracemalloc-traced bytes above the baseline during one call of ``fn``.

    Covers what Python's allocators see: Python objects (PyMem/PyObject domains)
    and NumPy array buffers (NumPy reports its data allocations to tracemalloc in
    its own domain, 389047). Not covered: BLAS-internal buffers, Numba/NRT
    allocations and other C-level malloc calls that bypass those hooks.
    """
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
        del out
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return max(int(peak - base), 0)


# ---------------------------------------------------------------------------- numerics


def numerical_stats(output: Any) -> dict[str, Any]:
    """nan_count, inf_count and the largest finite |value| of an output (array, float,
    sequence of them, or an object with a ``loss``/``total`` attribute)."""
    arrays = list(_arrays(output))
    nan = inf = 0
    max_abs = 0.0
    for a in arrays:
        if a.size == 0:
            continue
        if not np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float64)
        nan += int(np.isnan(a).sum())
        inf += int(np.isinf(a).sum())
        finite = np.abs(a[np.isfinite(a)])
        if finite.size:
            max_abs = max(max_abs, float(finite.max()))
    return {"nan_count": nan, "inf_count": inf, "max_abs": max_abs}


def _arrays(output: Any) -> Iterable[np.ndarray]:
    if output is None:
        return
    if isinstance(output, np.ndarray):
        yield output
    elif isinstance(output, (int, float, np.number)):
        yield np.asarray([output], dtype=np.float64)
    elif isinstance(output, dict):
        key = next((k for k in ("loss", "total") if k in output), None)
        if key is not None:
            yield from _arrays(output[key])
    elif isinstance(output, (list, tuple)) and not hasattr(output, "_fields"):
        for item in output:
            yield from _arrays(item)
    else:  # a NamedTuple / result object: its loss if it has one, else its first field
        for name in ("loss", "total"):
            if hasattr(output, name):
                yield from _arrays(getattr(output, name))
                return
        if isinstance(output, tuple) and output:
            yield from _arrays(output[0])


# ---------------------------------------------------------------------------- the timed loop


@dataclass
class Measurement:
    """Raw results of warm-ups and trials (per call when repeats > 1)."""

    timings_ns: list[int]
    cpu_times_ns: list[int]
    warmup_timings_ns: list[int]
    trial_wall_ns: int  # total wall time of all timed trials (all repeats)
    gc_capacity_ns: int  # trial wall time x processes that could collect at once
    gc_time_ns: int
    gc_count: int
    last_output: Any = field(default=None, repr=False)


class Workload:
    """One timed operation. ``run`` is the timed call; everything else is untimed."""

    repeats: int = 1  # operations per run(); timings are reported per operation
    processes: int = 1  # processes running the work (each has its own GC)
    info: dict[str, Any]

    def __init__(self) -> None:
        self.info = {}

    def run(self) -> Any:
        raise NotImplementedError

    def extra_cpu_ns(self) -> int:
        """CPU time spent in other processes during the last run (process pools)."""
        return 0

    def extra_gc(self) -> tuple[int, int]:
        """(gc time ns, collections) in other processes during the last run."""
        return 0, 0

    def alloc_bytes(self) -> int:
        """alloc_bytes of ONE operation, measured untimed."""
        return traced_alloc_bytes(self.run_once)

    def run_once(self) -> Any:
        return self.run()

    def numerics(self, last_output: Any) -> dict[str, Any]:
        return numerical_stats(last_output)

    def peak_rss(self) -> int:
        return peak_rss_bytes()

    def close(self) -> None:
        pass


def measure(work: Workload, trials: int, warmup: int) -> Measurement:
    """Run ``warmup`` untimed-for-stats runs, then ``trials`` timed runs of ``work.run``."""
    reps = max(int(work.repeats), 1)
    timings: list[int] = []
    cpus: list[int] = []
    warm: list[int] = []
    trial_wall = 0
    gc_extra_ns = gc_extra_n = 0
    out: Any = None
    with GcTracker() as tracker:
        for i in range(warmup + trials):
            timed = i >= warmup
            tracker.active = timed
            out = None  # the previous output must not stay alive during this run
            c0 = cpu_ns()
            t0 = time.perf_counter_ns()
            out = work.run()
            t1 = time.perf_counter_ns()
            c1 = cpu_ns()
            tracker.active = False
            wall = t1 - t0
            if timed:
                cpu = c1 - c0 + work.extra_cpu_ns()
                timings.append(int(round(wall / reps)))
                cpus.append(int(round(cpu / reps)))
                trial_wall += wall
                g_ns, g_n = work.extra_gc()
                gc_extra_ns += g_ns
                gc_extra_n += g_n
            else:
                warm.append(int(round(wall / reps)))
        gc_ns, gc_n = tracker.time_ns, tracker.count
    return Measurement(
        timings_ns=timings,
        cpu_times_ns=cpus,
        warmup_timings_ns=warm,
        trial_wall_ns=trial_wall,
        gc_capacity_ns=trial_wall * max(int(work.processes), 1),
        gc_time_ns=gc_ns + gc_extra_ns,
        gc_count=gc_n + gc_extra_n,
        last_output=out,
    )


# ---------------------------------------------------------------------------- statistics


def timing_stats(timings_ns: list[int]) -> dict[str, int]:
    """median, p95 (linear interpolation), min, max, IQR -- integer nanoseconds."""
    if not timings_ns:
        return {"median_ns": 0, "p95_ns": 0, "min_ns": 0, "max_ns": 0, "iqr_ns": 0}
    t = np.asarray(timings_ns, dtype=np.float64)
    p25, p50, p75, p95 = np.percentile(t, [25, 50, 75, 95])
    return {
        "median_ns": int(round(p50)),
        "p95_ns": int(round(p95)),
        "min_ns": int(t.min()),
        "max_ns": int(t.max()),
        "iqr_ns": int(round(p75 - p25)),
    }


def median_int(values: list[int]) -> int:
    return int(round(float(np.median(values)))) if values else 0


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN/Inf: map them to null."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)
