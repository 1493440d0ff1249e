"""The benchmark run: floor measurement, every selected scenario, the JSON document, the CLI.

The command line is ``nn-core bench`` (``nn_core.app.commands.bench``).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from threadpoolctl import threadpool_limits

from . import floor as fl
from . import metadata as md
from .harness import (
    Measurement,
    Workload,
    current_rss_bytes,
    finite_or_none,
    measure,
    median_int,
    release_free_memory,
    reset_peak_rss,
    timing_stats,
)
from .ops import config_of, model_op
from .scenarios import EXECUTORS, PARALLEL_EXECUTOR, SEED, Scenario, tokens_of
from .summary import fmt_ns
from .workloads import (
    ProcessParallelWorkload,
    ThreadParallelWorkload,
    build,
    threads_unsafe_reason,
)

if TYPE_CHECKING:
    from .pool import PoolTask, ProcessPool

DEFAULT_TRIALS = 10
DEFAULT_WARMUP = 3
DEFAULT_GEMM_SIZE = 1024
DEFAULT_BANDWIDTH_MIB = 256

PARALLEL_KINDS = ("parallel_forward", "parallel_train")

# Idle pause before each scenario's warm-ups: OpenBLAS worker threads keep spinning
# for up to ~100 ms after a multi-threaded call (measured here), which would leak the
# previous scenario's (or the floor probe's) CPU use into the next one.
SETTLE_S = 0.15


# ---------------------------------------------------------------------------- floor context


@dataclass
class FloorRates:
    """This machine's rates, measured in the same run as the scenarios."""

    gemm_size: int
    gemm_flops_1_thread: float
    gemm_flops_all_threads: float
    all_threads: int
    bandwidth_large_bytes: int
    bandwidth_large_1_thread: float
    bandwidth_large_all_threads: float
    # working-set bytes -> best copy bandwidth (bytes/s), measured on demand
    bandwidth_by_working_set: dict[int, float] = field(default_factory=dict)

    @property
    def gemm_rate(self) -> float:
        """The floor's GEMM rate: the faster of one thread and all threads."""
        return max(self.gemm_flops_1_thread, self.gemm_flops_all_threads)

    def bandwidth_for(self, working_set: int) -> float:
        """Copy bandwidth over a working set of this size (cache- or DRAM-resident, as the
        optimizer's p, g, m, v would be): the faster of one thread and all threads."""
        if working_set not in self.bandwidth_by_working_set:
            rates = [fl.measure_copy_bandwidth(working_set, threads=1)]
            if self.all_threads > 1:
                rates.append(fl.measure_copy_bandwidth(working_set, threads=self.all_threads))
            self.bandwidth_by_working_set[working_set] = max(rates)
        return self.bandwidth_by_working_set[working_set]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        bw = d["bandwidth_by_working_set"]
        d["bandwidth_by_working_set"] = {str(k): v for k, v in bw.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FloorRates:
        d = dict(d)
        d["bandwidth_by_working_set"] = {
            int(k): float(v) for k, v in d.get("bandwidth_by_working_set", {}).items()
        }
        return cls(**d)

    def to_metadata(self) -> dict[str, Any]:
        return {
            "gemm": {
                "product": f"C = A @ B^T, float32, {self.gemm_size}^3",
                "statistic": "best of 5 after one warm-up",
                "gflops_1_thread": round(self.gemm_flops_1_thread / 1e9, 3),
                "gflops_all_threads": round(self.gemm_flops_all_threads / 1e9, 3),
                "all_threads": self.all_threads,
                "floor_uses": "the faster of the two",
            },
            "memory_bandwidth": {
                "probe": "np.copyto, bytes read + written, best of 5",
                "large_working_set_bytes": self.bandwidth_large_bytes,
                "large_gbytes_per_sec_1_thread": round(self.bandwidth_large_1_thread / 1e9, 3),
                "large_gbytes_per_sec_all_threads": round(
                    self.bandwidth_large_all_threads / 1e9, 3
                ),
                "by_working_set_gbytes_per_sec": {
                    str(k): round(v / 1e9, 3) for k, v in self.bandwidth_by_working_set.items()
                },
            },
        }


def measure_floor(gemm_size: int, bandwidth_bytes: int) -> FloorRates:
    threads = int(md.blas_threads_now() or os.cpu_count() or 1)
    return FloorRates(
        gemm_size=gemm_size,
        gemm_flops_1_thread=fl.measure_gemm_rate(gemm_size, threads=1),
        gemm_flops_all_threads=fl.measure_gemm_rate(gemm_size, threads=threads),
        all_threads=threads,
        bandwidth_large_bytes=bandwidth_bytes,
        bandwidth_large_1_thread=fl.measure_copy_bandwidth(bandwidth_bytes, threads=1),
        bandwidth_large_all_threads=(
            fl.measure_copy_bandwidth(bandwidth_bytes, threads=threads) if threads > 1 else 0.0
        ),
    )


FLOOR_CHILD = (
    "import json, sys; from nn_core.bench.runner import floor_child; "
    "json.dump(floor_child(json.loads(sys.argv[1])), sys.stdout)"
)


def floor_child(args: dict[str, Any]) -> dict[str, Any]:
    """In the floor's own process: the rates, with every selected scenario's optimizer
    working set probed."""
    from .scenarios import select

    with threadpool_limits(limits=args.get("blas_threads"), user_api="blas"):  # the run's cap
        rates = measure_floor(int(args["gemm_size"]), int(args["bandwidth_bytes"]))
        for sc in select(args["ids"]):
            scenario_floor(sc, rates)
    return rates.to_json()


def measure_floor_apart(
    gemm_size: int, bandwidth_bytes: int, scenarios: list[Scenario], blas_threads: int | None
) -> FloorRates:
    """``measure_floor`` (and the scenarios' bandwidth probes) in a fresh interpreter: the
    1 GFLOP GEMM on every thread and the 256 MiB copies would otherwise leave BLAS
    thread buffers and heap resident in this process, counted in every scenario's peak
    RSS though the library never needs them."""
    import subprocess  # here: the lean scenarios run before, without it (measuring_order)

    args: dict[str, Any] = {"gemm_size": gemm_size, "bandwidth_bytes": bandwidth_bytes}
    args.update(ids=[sc.id for sc in scenarios], blas_threads=blas_threads)
    proc = subprocess.run(
        [sys.executable, "-c", FLOOR_CHILD, json.dumps(args)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the floor probe exited {proc.returncode}")
    return FloorRates.from_json(json.loads(proc.stdout))


def scenario_floor(sc: Scenario, rates: FloorRates | None) -> dict[str, Any] | None:
    """Analytic flops (and optimizer bytes) of one run of ``sc``, and its floor in ns."""
    p = sc.params
    detail: dict[str, Any]
    if "known_flops" in p:  # kernels
        flops, moved = int(p["known_flops"]), 0
        detail = {"basis": "known_flops"}
    elif sc.kind in ("forward", "train", "cold", *PARALLEL_KINDS):
        cfg = config_of(sc)
        t = int(p.get("thread_count", 1))
        fwd = fl.forward_flops(cfg, int(p["batch"]), int(p["seq"]))
        train = sc.kind in ("train", "parallel_train")
        flops = t * (3 * fwd.total if train else fwd.total)
        moved = t * fl.optimizer_bytes(cfg.total_params()) if train else 0
        detail = {
            "basis": "analytic matmul flops (2*m*n*k); attention over the full S x S square"
            + ("; backward = 2 x forward; + AdamW/clip memory traffic" if train else ""),
            "forward_flops_per_instance": fwd.to_dict(),
        }
        if sc.kind == "cold":
            detail["excludes"] = "model construction (weight init has no matmul flops)"
    else:
        return None
    out: dict[str, Any] = {"flops": flops, **detail}
    if moved:
        out["optimizer_bytes"] = moved
    if rates is not None:
        out["gemm_gflops"] = round(rates.gemm_rate / 1e9, 3)
        bw = None
        if moved:
            ws = int(p.get("thread_count", 1)) * fl.optimizer_working_set(
                config_of(sc).total_params()
            )
            bw = rates.bandwidth_for(ws)
            out["bandwidth_gbytes_per_sec"] = round(bw / 1e9, 3)
            out["bandwidth_working_set_bytes"] = ws
        out["floor_ns"] = round(fl.floor_ns(flops, rates.gemm_rate, moved, bw), 1)
    return out


# ---------------------------------------------------------------------------- one scenario


@dataclass
class VariantResult:
    measurement: Measurement
    peak_rss: int
    alloc_bytes: int
    numerical: dict[str, Any]
    info: dict[str, Any]
    blas_threads: int | None


def _run_variant(make: Callable[[], Workload], trials: int, warmup: int) -> VariantResult:
    gc.collect()
    release_free_memory()
    rss_at_start = current_rss_bytes()
    reset_peak_rss()
    work = make()
    try:
        blas_threads = md.blas_threads_now()
        time.sleep(SETTLE_S)
        meas = measure(work, trials, warmup)
        peak = work.peak_rss()  # before the tracemalloc pass, whose traces cost memory
        alloc = work.alloc_bytes()
        numerical = work.numerics(meas.last_output)
        meas.last_output = None
    finally:
        work.close()
    tokens = getattr(work, "tokens", None)
    info = dict(work.info)
    info["rss_at_start_bytes"] = rss_at_start
    if tokens is not None:
        info["tokens"] = tokens
    return VariantResult(meas, peak, alloc, numerical, info, blas_threads)


def run_scenario(
    sc: Scenario,
    trials: int,
    warmup: int,
    pool: ProcessPool | None,
    rates: FloorRates | None,
    log: Callable[[str], None],
    train_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure one scenario and return its JSON record.

    The bench sets no BLAS thread count of its own for a single model: the library
    chooses one per call (``nn_core.model.blas``), and a run-wide ``--blas-threads``
    cap is the caller's limit the library obeys. The parallel axis runs on the executor
    its params name (``scenarios.PARALLEL_EXECUTOR`` for the suite), fixed before
    measuring; if that executor cannot run here the scenario fails (no fallback).
    ``train_options``: TrainConfig fields of every trainer (default: none, TrainConfig's own).
    """
    options = dict(train_options or {})
    params: dict[str, Any] = {k: v for k, v in sc.params.items() if k != "known_flops"}
    semantics = params.pop("parallel_semantics", None)  # a scenario-level field
    params.setdefault("seed", SEED)
    if sc.kind != "kernel":
        params.setdefault("dtype", "float32")
    if sc.kind in PARALLEL_KINDS:
        executor = str(params.get("executor", PARALLEL_EXECUTOR))
        if executor == "processes":
            if pool is None:
                raise RuntimeError("the process pool could not start in this run")
            res = _run_variant(lambda: ProcessParallelWorkload(sc, pool), trials, warmup)
        elif executor == "threads":
            reason = threads_unsafe_reason()
            if reason is not None:
                raise RuntimeError(f"threads executor unavailable: {reason}")
            res = _run_variant(lambda: ThreadParallelWorkload(sc, options), trials, warmup)
        else:
            raise ValueError(f"scenario {sc.id}: executor must be one of {EXECUTORS}")
    else:
        res = _run_variant(lambda: build(sc, options), trials, warmup)
    params.update({k: v for k, v in res.info.items() if k not in params})
    # BLAS threads the measured work ran with: per worker for the parallel axis, the
    # library's own choice for a model (workloads.build records it), else the pool's count
    params.setdefault("blas_threads", res.info.get("blas_threads_per_worker", res.blas_threads))

    tokens = res.info.get("tokens", tokens_of(sc) if sc.kind != "kernel" else None)
    rec = build_record(sc, params, res, trials, warmup, tokens, semantics)
    attach_floor(rec, sc, rates)
    return rec


def build_record(
    sc: Scenario,
    params: dict[str, Any],
    res: VariantResult,
    trials: int,
    warmup: int,
    tokens: int | None,
    parallel_semantics: str | None = None,
) -> dict[str, Any]:
    """The scenario's JSON object, with the suite's field names and order
    (docs/benchmark.md); ``parallel_semantics`` (parallel axis) sits beside ``id``.
    Without its floor: ``attach_floor`` adds it."""
    m = res.measurement
    stats = timing_stats(m.timings_ns)
    med = stats["median_ns"]
    med_s = med * 1e-9
    derived: dict[str, Any] = {
        "alloc_rate_bytes_per_sec": finite_or_none(res.alloc_bytes / med_s) if med else None,
        # 1 - gc time / wall time (process pools: / (wall x T), each worker collects alone)
        "gc_throughput": (1.0 - m.gc_time_ns / m.gc_capacity_ns) if m.gc_capacity_ns else 1.0,
    }
    rec: dict[str, Any] = {"id": sc.id}
    if parallel_semantics is not None:
        rec["parallel_semantics"] = parallel_semantics
    rec.update({
        "axis": sc.axis,
        "params": params,
        "timings_ns": m.timings_ns,
        "cpu_times_ns": m.cpu_times_ns,
        "warmup_timings_ns": m.warmup_timings_ns,
        **stats,
        "cpu_median_ns": median_int(m.cpu_times_ns),
        "memory": {"peak_rss_bytes": res.peak_rss, "alloc_bytes": res.alloc_bytes},
        "gc": {"total_gc_time_ns": m.gc_time_ns, "gc_pause_count": m.gc_count},
        "numerical": {**res.numerical, "max_abs": finite_or_none(res.numerical["max_abs"])},
        "derived": derived,
    })  # fmt: skip
    if tokens is not None:
        rec["throughput_tokens_per_sec"] = finite_or_none(tokens / med_s) if med else None
    if "known_flops" in sc.params:
        rec["known_flops"] = int(sc.params["known_flops"])
    rec["warmup_runs"] = warmup
    rec["trial_runs"] = trials
    return rec


def attach_floor(rec: dict[str, Any], sc: Scenario, rates: FloorRates | None) -> None:
    """Add the scenario's analytic flops and floor (``scenario_floor``) to its record:
    ``params.floor``, and ``derived`` gflops, flops, floor_ratio. Nothing for a scenario
    without flops; the floor's time needs ``rates``."""
    floor = scenario_floor(sc, rates)
    if floor is None:
        return
    rec["params"]["floor"] = {k: v for k, v in floor.items() if k != "flops"}
    med = rec["median_ns"]
    flops = int(floor["flops"])
    derived = rec["derived"]
    derived["gflops"] = finite_or_none(flops / med) if med else None
    derived["flops"] = flops
    fns = floor.get("floor_ns")
    derived["floor_ratio"] = finite_or_none(fl.floor_ratio(med, fns)) if fns else None


# ---------------------------------------------------------------------------- the whole run


def pool_tasks(scenarios: list[Scenario]) -> tuple[int, list[PoolTask]]:
    """Workers needed (max T) and the distinct tasks the workers may be asked to run."""
    from .pool import PoolTask

    tasks: dict[str, PoolTask] = {}
    n = 0
    for sc in scenarios:
        if sc.kind in PARALLEL_KINDS and sc.params.get("executor") == "processes":
            p = sc.params
            kind = "forward" if sc.kind == "parallel_forward" else "train"
            task = PoolTask(kind, str(p.get("config", "tiny")), int(p["batch"]), int(p["seq"]))
            tasks[task.key] = task
            n = max(n, int(p["thread_count"]))
    return n, list(tasks.values())


TRAINER_KINDS = ("train", "parallel_train")


def is_lean(sc: Scenario) -> bool:
    """A scenario of one model in this process that builds no trainer (forwards,
    kernels, dispatch, decoding): measured first, before the floor probe and the process
    pool, so its peak RSS holds what a program running the model holds, and not the
    modules those two need (subprocess, multiprocessing: ~1.5 MiB)."""
    return sc.kind not in TRAINER_KINDS and sc.kind not in PARALLEL_KINDS


def measuring_order(scenarios: list[Scenario]) -> list[Scenario]:
    """The lean scenarios (``is_lean``) first, then the parallel forwards, then the
    scenarios that build a trainer (each group in suite order). A trainer may load the
    fused training kernels (Numba: ~65 MB and more once its compiled kernels load) into
    this process for good; measured earlier, every later scenario's peak RSS would carry
    them, though a program that only runs forwards never loads them. The JSON lists the
    records in suite order all the same."""
    lean = [s for s in scenarios if is_lean(s)]
    parallel = [s for s in scenarios if s.kind in PARALLEL_KINDS and s.kind not in TRAINER_KINDS]
    return lean + parallel + [s for s in scenarios if s.kind in TRAINER_KINDS]


def prime(scenarios: list[Scenario], train_options: dict[str, Any], train: bool) -> int:
    """One untimed tiny forward (``train``: one train step) if the selection has such
    scenarios, so lazy imports and any cached JIT loading happen before the first timed
    region. Returns the ns it took."""
    from ..model.config import Config

    t0 = time.perf_counter_ns()
    kinds = {sc.kind for sc in scenarios}
    if not train and kinds - set(TRAINER_KINDS):
        model_op("forward", Config.tiny(), 1, 8, train_options)()
    if train and kinds & set(TRAINER_KINDS):
        model_op("train", Config.tiny(), 1, 8, train_options)()
    return time.perf_counter_ns() - t0


@dataclass
class RunOptions:
    """How a run measures (the CLI flags)."""

    trials: int = DEFAULT_TRIALS
    warmup: int = DEFAULT_WARMUP
    gemm_size: int = DEFAULT_GEMM_SIZE
    bandwidth_bytes: int = DEFAULT_BANDWIDTH_MIB << 20
    floor: bool = True
    blas_threads: int | None = None  # BLAS threads for the whole run (None: auto per scenario)
    # TrainConfig overrides (--set); none by default: trainers are what a library user gets
    train_options: dict[str, Any] = field(default_factory=dict)
    isolate: bool = False  # each scenario in a fresh interpreter (per-scenario RSS, imports)
    floor_rates: FloorRates | None = None  # given: reuse instead of measuring (isolated child)


def run_benchmark(
    scenarios: list[Scenario],
    options: RunOptions | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Run ``scenarios``; returns the JSON document and the list of failures."""
    return _run_benchmark(scenarios, options or RunOptions(), log)


def start_pool(
    scenarios: list[Scenario], opts: RunOptions, log: Callable[[str], None]
) -> tuple[ProcessPool | None, str | None]:
    """The run's process pool if a selected scenario needs one: (pool, None), or
    (None, why it could not start). Each worker builds a task when a scenario first
    asks for it (``ProcessPool.prepare``)."""
    n_workers, tasks = pool_tasks(scenarios)
    if not n_workers:
        return None, None
    from .pool import ProcessPool

    log(f"starting a process pool of {n_workers} workers ({len(tasks)} tasks)")
    try:
        return ProcessPool(n_workers, tasks, train_options=opts.train_options), None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        log(f"process pool unavailable: {error}")
        return None, error


def _run_benchmark(
    scenarios: list[Scenario], opts: RunOptions, log: Callable[[str], None]
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    blas = opts.blas_threads
    limits = threadpool_limits(limits=blas, user_api="blas") if blas else None
    pool: ProcessPool | None = None
    pool_error = None
    try:
        prime_ns: int | None = None

        def prime_for(train: bool) -> None:
            nonlocal prime_ns
            if opts.isolate:
                return
            try:
                prime_ns = (prime_ns or 0) + prime(scenarios, opts.train_options, train)
            except Exception as exc:
                log(f"priming failed ({type(exc).__name__}: {exc}); scenarios will report it")

        rates = opts.floor_rates

        def measure_rates() -> FloorRates:
            log(f"measuring the floor: GEMM {opts.gemm_size}^3 float32, copy bandwidth")
            r = measure_floor_apart(opts.gemm_size, opts.bandwidth_bytes, scenarios, blas)
            log(
                f"  GEMM {r.gemm_flops_1_thread / 1e9:.1f} GFLOP/s (1 thread), "
                f"{r.gemm_flops_all_threads / 1e9:.1f} GFLOP/s ({r.all_threads} threads)"
            )
            for sc in scenarios:  # any working set still unprobed: now, not between scenarios
                scenario_floor(sc, r)
            return r

        if opts.isolate and rates is None and opts.floor:  # the children need it first
            rates = measure_rates()
        prime_for(train=False)
        records: list[dict[str, Any]] = []
        failures: list[dict[str, str]] = []
        lean: list[tuple[dict[str, Any], Scenario]] = []  # measured before the floor
        primed_train = False
        lean_phase = not opts.isolate
        for i, sc in enumerate(measuring_order(scenarios), 1):
            if lean_phase and not is_lean(sc):  # the lean scenarios are done
                lean_phase = False
                if rates is None and opts.floor:
                    rates = measure_rates()
                pool, pool_error = start_pool(scenarios, opts, log)
            if sc.kind in TRAINER_KINDS and not primed_train:
                prime_for(train=True)
                primed_train = True
            log(f"[{i}/{len(scenarios)}] {sc.id}" + (" (fresh process)" if opts.isolate else ""))
            try:
                if opts.isolate:
                    rec = run_isolated(sc, opts, rates)
                else:
                    rec = run_scenario(
                        sc,
                        opts.trials,
                        opts.warmup,
                        pool,
                        rates,
                        log,
                        train_options=opts.train_options,
                    )
            except Exception as exc:
                msg = f"{type(exc).__name__}: {exc}"
                log(f"    FAILED: {msg}")
                failures.append({"id": sc.id, "error": msg})
                continue
            records.append(rec)
            if lean_phase:
                lean.append((rec, sc))
            if not opts.isolate:  # an isolated child has printed it already
                log("    " + progress_line(rec))
        if rates is None and opts.floor and lean:  # every scenario was lean
            rates = measure_rates()
        for rec, sc in lean:  # their floors, now that the rates are known
            attach_floor(rec, sc, rates)
        policy = {
            "single_model": (
                f"BLAS capped at {blas} thread(s) by --blas-threads; within it the "
                "library's own choice per call (nn_core.model.blas)"
                if blas
                else "the library's own choice per call (nn_core.model.blas: one thread "
                "for products under 8M multiply-adds, else all the pool allows); the "
                "bench sets none"
            ),
            "parallel_threads": "BLAS capped at 1 thread process-wide while T threads run",
            "parallel_processes": "each worker process: BLAS 1 thread, NUMBA_NUM_THREADS=1",
        }
        scope = "scenario" if reset_peak_rss() else "process"
        extra: dict[str, Any] = {
            "prime_ns": prime_ns,
            "settle_s": SETTLE_S,
            "train_config_overrides": dict(opts.train_options),
            "isolation": (
                "each scenario in a fresh interpreter (python -m nn_core bench --scenario ID)"
                if opts.isolate
                else "all scenarios in this process: one model without a trainer first, "
                "then the parallel forwards, then those that build a trainer, each group "
                "in suite order (runner.measuring_order)"
            ),
            "peak_rss_scope": scope,
            "malloc": "allocator defaults (the library reuses its buffers; nothing is tuned)",
        }
        if pool is not None:
            extra["process_pool"] = {"workers": pool.size, "start_method": pool.start_method}
        elif pool_error:
            extra["process_pool"] = {"error": pool_error}
        if rates is not None:
            extra.update(rates.to_metadata())
        if failures:
            extra["failed_scenarios"] = failures
        meta = md.collect(
            seed=SEED,
            n_trials=opts.trials,
            n_warmup=opts.warmup,
            blas_thread_policy=policy,
            extra=extra,
        )
    finally:
        if limits is not None:
            limits.restore_original_limits()
        if pool is not None:
            pool.close()
    from .scenarios import EXTRAS

    rank = {sc.id: i for i, sc in enumerate(scenarios)}
    records.sort(key=lambda r: rank[r["id"]])  # suite order in the JSON
    doc: dict[str, Any] = {"metadata": meta}
    doc["scenarios"] = [r for r in records if r["id"] not in EXTRAS]  # the suite's 22
    extras = [r for r in records if r["id"] in EXTRAS]
    if extras:  # scenarios outside the suite, under their own key
        doc["extras"] = extras
    return doc, failures


def run_isolated(sc: Scenario, opts: RunOptions, rates: FloorRates | None) -> dict[str, Any]:
    """Run one scenario in a fresh ``python -m nn_core bench`` and return its record.

    The child reuses this run's floor rates (passed as a JSON file), primes itself and,
    for the parallel axis, starts its own process pool. Its progress goes to stderr.
    """
    import subprocess
    import tempfile

    cmd = [sys.executable, "-m", "nn_core", "bench", "--scenario", sc.id]
    cmd += ["--trials", str(opts.trials), "--warmup", str(opts.warmup)]
    if opts.blas_threads:
        cmd += ["--blas-threads", str(opts.blas_threads)]
    for key, value in opts.train_options.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    with tempfile.TemporaryDirectory(prefix="nn_core_bench_") as tmp:
        if rates is None:
            cmd.append("--no-floor")
        else:
            rates_file = os.path.join(tmp, "floor.json")
            with open(rates_file, "w") as f:
                json.dump(rates.to_json(), f)
            cmd += ["--floor-rates", rates_file]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"isolated run exited {proc.returncode} without JSON") from exc
    failed = doc.get("metadata", {}).get("failed_scenarios")
    if failed:
        raise RuntimeError(failed[0]["error"])
    (rec,) = doc.get("scenarios") or doc["extras"]
    child = doc["metadata"]
    rec["params"]["isolated_process"] = {
        k: child[k] for k in ("prime_ns", "process_pool") if k in child
    }
    return rec


# ---------------------------------------------------------------------------- formatting


def progress_line(rec: dict[str, Any]) -> str:
    parts = [f"median {fmt_ns(rec['median_ns'])}", f"cpu {fmt_ns(rec['cpu_median_ns'])}"]
    ratio = rec["derived"].get("floor_ratio")
    if ratio is not None:
        parts.append(f"floor x{ratio:.1f}")
    if "executor" in rec["params"]:
        parts.append(f"executor {rec['params']['executor']}")
    parts.append(f"peak RSS {rec['memory']['peak_rss_bytes'] / 2**20:.1f} MiB")
    return ", ".join(parts)


# ---------------------------------------------------------------------------- CLI


def train_options(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE overrides of TrainConfig fields (the one syntax: ``parse_assignment``),
    validated by building a TrainConfig."""
    from ..model.config import parse_assignment
    from ..training.config import TrainConfig

    out: dict[str, Any] = dict(parse_assignment(item) for item in items)
    TrainConfig.from_dict(out)  # unknown field / bad value: ConfigError now, not mid-run
    return out
