"""BLAS threads, chosen by the library for each model call from the size of its products.

On a machine with few cores, a multi-threaded BLAS is several times slower on the tiny
config's products (at most 64 x 64 x 1000 in a forward) than one thread: waking and
synchronizing the second thread costs more than it saves. On the small config's
products (64 x 256 x 2048) two threads are faster. So every public call of
``MoETransformer`` (forward, loss and gradient, decoding) runs inside
``blas_threads(n)``, with n from ``threads_for(largest product)``.

Rules:
- never more threads than the BLAS pool has when the call starts: a limit the caller
  set (``threadpoolctl.threadpool_limits``, OPENBLAS_NUM_THREADS) always wins;
- cheap: the BLAS library's own set/get functions are looked up once per process (via
  threadpoolctl) and called directly (well under a microsecond), and only when the
  count must change;
- thread-safe: calls overlapping in several threads share one limit; the first one
  sets it and the last one restores the count it found.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import cache
from typing import Any

# A call whose largest product has at least this many multiply-adds (m * n * k, as
# MoETransformer.blas_threads_for estimates it) runs on every thread the pool allows;
# smaller ones on one. Measured on the 2-core reference machine, idle: the tiny
# config's forward at batch 2, seq 32 (LM head 64 x 64 x 1000 = 4.1M) is fastest on one
# thread, the small config's (an expert's gate|up at even load, 64 x 256 x 1024 =
# 16.8M) on two. The tiny config at batch 8, seq 32 (256 x 64 x 1000 = 16.4M) also gets
# two. On a machine whose cores are busy with other processes, a second BLAS thread
# can cost several times what it saves (it waits for a core).
MULTI_THREAD_MIN_MACS = 8 << 20


def threads_for(macs: int) -> int | None:
    """Threads for a call whose largest product has ``macs`` multiply-adds: 1 below
    MULTI_THREAD_MIN_MACS, else None (= as many as the pool allows)."""
    return 1 if macs < MULTI_THREAD_MIN_MACS else None


class _BlasPool:
    """The BLAS library's thread count, through its own C functions."""

    def __init__(self) -> None:
        self.get: Callable[[], int] | None = None
        self.set: Callable[[int], Any] | None = None
        try:
            from threadpoolctl import ThreadpoolController

            libs = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
        except Exception:  # no threadpoolctl support here: leave BLAS alone
            libs = []
        if len(libs) == 1:  # one BLAS (NumPy's); with several, leave them alone
            lib = libs[0]
            self.get = lambda: int(lib.get_num_threads() or 1)
            self.set = lib.set_num_threads
            if lib.internal_api == "openblas":  # skip threadpoolctl's Python wrappers
                try:
                    getter = lib._get_symbol("openblas_get_num_threads")
                    setter = lib._get_symbol("openblas_set_num_threads")
                except Exception:
                    getter = setter = None
                if getter is not None and setter is not None:
                    self.get, self.set = getter, setter
        self.lock = threading.Lock()
        self.users = 0  # calls currently inside blas_threads with a lowered count
        self.restore_to = 0


@cache
def _pool() -> _BlasPool:
    return _BlasPool()


class blas_threads:  # noqa: N801 (used as a function: ``with blas_threads(n):``)
    """Run the body with at most ``n`` BLAS threads (None: leave the pool as it is).

    A class rather than a generator context manager: entered once per model call
    (once per decoded token), where ``contextlib``'s machinery costs a few microseconds.
    """

    __slots__ = ("n", "lowered")

    def __init__(self, n: int | None) -> None:
        self.n = n
        self.lowered = False

    def __enter__(self) -> None:
        n = self.n
        if n is None:
            return
        pool = _pool()
        if pool.get is None or pool.set is None:
            return
        with pool.lock:
            if pool.users == 0:
                current = pool.get()
                if current <= n:  # already at most n (the caller's limit wins)
                    return
                pool.restore_to = current
                pool.set(n)
            # else: share the limit set by a concurrent call
            pool.users += 1
            self.lowered = True

    def __exit__(self, *exc: object) -> None:
        if self.lowered:
            self.lowered = False
            pool = _pool()
            assert pool.set is not None
            with pool.lock:
                pool.users -= 1
                if pool.users == 0:
                    pool.set(pool.restore_to)


def current_threads() -> int | None:
    """The BLAS pool's thread count now (None if it cannot be read)."""
    pool = _pool()
    return None if pool.get is None else pool.get()
