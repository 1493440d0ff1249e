"""``nn-core bench``: the suite's 22 benchmark scenarios as one JSON document.

    nn-core bench [--scenario GLOB ...] [--trials 10] [--warmup 3] [--out FILE]
    nn-core bench --summary A.json [B.json ...]

JSON goes to stdout (or --out); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from ...errors import ConfigError, InputError
from ..options import UsageError, nonneg_int, pos_int, say


def add(sub: Any) -> None:
    from ...bench.runner import (
        DEFAULT_BANDWIDTH_MIB,
        DEFAULT_GEMM_SIZE,
        DEFAULT_TRIALS,
        DEFAULT_WARMUP,
    )

    p = sub.add_parser(
        "bench",
        help="the benchmark: the suite's 22 scenarios as JSON, or a summary of result files",
        description="nn-core benchmark: the suite's 22 scenarios as JSON (docs/benchmark.md).",
    )
    p.add_argument("--trials", type=pos_int, default=DEFAULT_TRIALS, help="timed trials (10)")
    p.add_argument("--warmup", type=nonneg_int, default=DEFAULT_WARMUP, help="warm-up runs (3)")
    p.add_argument(
        "--scenario",
        action="append",
        metavar="GLOB",
        help="run the scenarios whose id matches (fnmatch; repeatable; extras too)",
    )
    p.add_argument("--out", metavar="FILE", help="write the JSON here instead of stdout")
    p.add_argument("--list", action="store_true", help="list the scenario ids and exit")
    p.add_argument(
        "--summary",
        nargs="+",
        metavar="JSON",
        help="print markdown tables of the files (medians with ratios against the first; "
        "inference/s and train steps/s at T4, speed-ups, cold/warm, GFLOP/s) and exit",
    )
    p.add_argument(
        "--gemm-size",
        type=pos_int,
        default=DEFAULT_GEMM_SIZE,
        help="n of the n^3 GEMM measured for the floor (1024)",
    )
    p.add_argument(
        "--bandwidth-mib",
        type=pos_int,
        default=DEFAULT_BANDWIDTH_MIB,
        help="working set of the large copy-bandwidth probe in MiB (256)",
    )
    p.add_argument("--no-floor", action="store_true", help="skip the GEMM/bandwidth probes")
    p.add_argument(
        "--blas-threads",
        type=pos_int,
        default=None,
        help="cap BLAS at N threads for the whole run (default: the library's own choice)",
    )
    p.add_argument(
        "--isolate",
        action="store_true",
        help="run each scenario in a fresh interpreter: per-scenario peak RSS and imports "
        "(the floor is measured once, here)",
    )
    p.add_argument("--floor-rates", metavar="JSON", help=argparse.SUPPRESS)  # isolated child
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a TrainConfig field of every trainer (repeatable), e.g. --set kernels=numpy",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ...bench.runner import FloorRates, RunOptions, run_benchmark, train_options
    from ...bench.scenarios import EXTRAS, select
    from ...bench.summary import summarize

    if args.summary:
        try:
            say(summarize(args.summary))
        except ValueError as exc:  # a file that is not a benchmark result: like bad data
            raise InputError(str(exc)) from None
        return 0
    if args.out:  # checked now, not after the whole benchmark ran
        from ...storage.ownership import check_writable_file

        check_writable_file(args.out)
    try:
        scenarios = select(args.scenario)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    options = train_options(args.set)
    rates = None
    if args.floor_rates:
        try:
            with open(args.floor_rates) as f:
                rates = FloorRates.from_json(json.load(f))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"--floor-rates {args.floor_rates}: {exc}") from None
    if args.list:
        for sc in scenarios if args.scenario else [*scenarios, *EXTRAS.values()]:
            say(f"{sc.id}\t{sc.axis}")
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # stray prints must not corrupt the JSON
        opts = RunOptions(
            trials=args.trials,
            warmup=args.warmup,
            gemm_size=args.gemm_size,
            bandwidth_bytes=args.bandwidth_mib << 20,
            floor=not args.no_floor,
            blas_threads=args.blas_threads,
            train_options=options,
            isolate=args.isolate,
            floor_rates=rates,
        )
        doc, failures = run_benchmark(scenarios, opts, log)
    text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
    if args.out:
        from ...storage.checkpoint import atomic_write_file

        atomic_write_file(args.out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        log(f"wrote {args.out}")
    else:
        real_stdout.write(text)
        real_stdout.flush()
    if failures:
        log(f"{len(failures)} scenario(s) failed: {', '.join(f['id'] for f in failures)}")
        return 1
    return 0
