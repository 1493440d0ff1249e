"""nn-core's benchmark: the suite's 22 scenarios as JSON (contract: docs/benchmark.md).

    nn-core bench [--scenario GLOB ...] [--trials N] [--warmup N] [--out FILE]
    nn-core bench --summary A.json [B.json ...]

Modules: scenarios (the 22 definitions + EXTRAS), workloads (scenario -> timed
operation), harness (timing, CPU, GC, RSS, tracemalloc, numerics), pool (the
process pool of the parallel axis), floor (FLOP counts, GEMM rate, bandwidth),
metadata, summary, runner (the run and the CLI).
"""

from __future__ import annotations

from . import extras as _extras  # noqa: F401  (registers the extra scenarios)
from .runner import run_benchmark
from .scenarios import EXTRAS, SCENARIO_IDS, SCENARIOS, Scenario, register_extra, select
from .summary import summarize

__all__ = [
    "EXTRAS",
    "SCENARIOS",
    "SCENARIO_IDS",
    "Scenario",
    "register_extra",
    "run_benchmark",
    "select",
    "summarize",
]
