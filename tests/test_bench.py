"""The benchmark harness: scenario table, JSON schema, floor arithmetic, summary tool, CLI."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from timeouts import SUBPROCESS_TIMEOUT

from nn_core import Config
from nn_core.app.cli import main as cli_main
from nn_core.bench import SCENARIO_IDS, SCENARIOS, select
from nn_core.bench import floor as fl
from nn_core.bench.harness import (
    GcTracker,
    numerical_stats,
    peak_rss_bytes,
    timing_stats,
    traced_alloc_bytes,
)
from nn_core.bench.scenarios import make_inputs, tokens_of
from nn_core.bench.summary import summarize, summary_table

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]

EXPECTED = {  # id -> (axis, kind, params that must be present)
    "mem_train_step": ("memory", "train", {"config": "tiny", "batch": 2, "seq": 8}),
    **{
        f"mem_scale_batch_{b}": ("memory", "forward", {"config": "tiny", "batch": b, "seq": 32})
        for b in (1, 2, 4, 8)
    },
    **{
        f"mem_scale_seq_{s}": ("memory", "forward", {"config": "tiny", "batch": 2, "seq": s})
        for s in (8, 16, 32, 64)
    },
    "kernel_matmul": (
        "compiler",
        "kernel",
        {"m": 64, "n": 64, "k": 64, "M": 64, "K": 64, "N": 64, "known_flops": 524288},
    ),  # fmt: skip
    "kernel_softmax": ("compiler", "kernel", {"n": 1000, "known_flops": 4000}),
    "kernel_rmsnorm": ("compiler", "kernel", {"shape": [2, 32, 64], "known_flops": 12288}),
    "dispatch_warm": ("type_system", "forward", {"config": "tiny", "batch": 2, "seq": 32}),
    "dispatch_cold": ("type_system", "cold", {"config": "tiny", "batch": 1, "seq": 8}),
    **{
        f"parallel_T{t}": (
            "parallel",
            "parallel_forward",
            {"config": "tiny", "batch": 2, "seq": 32, "thread_count": t},
        )
        for t in (1, 2, 4)
    },
    **{
        f"parallel_train_T{t}": (
            "parallel",
            "parallel_train",
            {"config": "tiny", "batch": 2, "seq": 8, "thread_count": t},
        )
        for t in (1, 2, 4)
    },
    "scale_forward_256": ("scale", "forward", {"config": "small", "batch": 2, "seq": 32}),
    "scale_train_256": ("scale", "train", {"config": "small", "batch": 2, "seq": 8}),
}

SCENARIO_FIELDS = [
    "id", "axis", "params", "timings_ns", "cpu_times_ns", "warmup_timings_ns",
    "median_ns", "p95_ns", "min_ns", "max_ns", "iqr_ns", "cpu_median_ns",
    "memory", "gc", "numerical", "derived", "warmup_runs", "trial_runs",
]  # fmt: skip


# ---------------------------------------------------------------------------- scenario table


def test_the_22_scenarios_have_the_spec_ids_axes_and_workloads() -> None:
    assert len(SCENARIOS) == 22
    assert list(SCENARIO_IDS) == list(EXPECTED)  # the order of docs/benchmark.md
    for sc in SCENARIOS:
        axis, kind, params = EXPECTED[sc.id]
        assert (sc.axis, sc.kind) == (axis, kind), sc.id
        for key, value in params.items():
            assert sc.params[key] == value, (sc.id, key)
        if sc.axis == "parallel":
            assert sc.params["parallel_semantics"] == "independent"
            assert sc.params["executor"] == "processes"  # one executor, fixed by design
        if "seq" in sc.params:  # the suite's names beside ours
            assert sc.params["seq_len"] == sc.params["seq"]
            assert sc.params["hidden_dim"] == Config.preset(sc.params["config"]).hidden_dim
        if sc.kind == "kernel":
            assert sc.params["dtype"] == "float32"
            assert sc.params["repeats_per_trial"] >= 1


def test_inputs_follow_the_spec_formula() -> None:
    ids, targets = make_inputs(2, 8, 1000)
    assert ids.shape == targets.shape == (2, 8)
    assert ids.dtype == np.int64
    for b in range(2):
        for s in range(8):
            assert ids[b, s] == (b * 8 + s) % 1000
            assert targets[b, s] == (ids[b, s] + 1) % 1000
    ids, targets = make_inputs(2, 600, 1000)  # wraps around the vocabulary
    assert ids[1, 399] == 999 and targets[1, 399] == 0 and ids[1, 400] == 0


def test_tokens_count_all_parallel_instances() -> None:
    by_id = {s.id: s for s in SCENARIOS}
    assert tokens_of(by_id["dispatch_warm"]) == 64
    assert tokens_of(by_id["parallel_T4"]) == 4 * 64
    assert tokens_of(by_id["parallel_train_T2"]) == 2 * 16
    assert tokens_of(by_id["kernel_matmul"]) is None


def test_trainer_scenarios_are_measured_last_and_reported_in_suite_order() -> None:
    from nn_core.bench.runner import measuring_order

    order = [s.id for s in measuring_order(list(SCENARIOS))]
    assert sorted(order) == sorted(SCENARIO_IDS)
    trainers = [s.id for s in SCENARIOS if s.kind in ("train", "parallel_train")]
    assert order[-len(trainers) :] == trainers  # mem_train_step, parallel_train_T*, scale_train
    assert order[0] == "mem_scale_batch_1"


def test_scenario_globs_select_in_suite_order() -> None:
    assert [s.id for s in select(None)] == list(SCENARIO_IDS)
    assert [s.id for s in select(["kernel_*"])] == [
        "kernel_matmul",
        "kernel_softmax",
        "kernel_rmsnorm",
    ]
    picked = [s.id for s in select(["scale_train_256", "parallel_T?", "dispatch_warm"])]
    assert picked == ["dispatch_warm", *(f"parallel_T{t}" for t in (1, 2, 4)), "scale_train_256"]
    assert [s.id for s in select(["mem_*", "mem_scale_seq_8"])][:2] == [
        "mem_train_step",
        "mem_scale_batch_1",
    ]
    assert "decode_kv_256" in [s.id for s in select(["decode_*"])]  # an extra
    threads = select(["parallel_threads_T*"])  # the other executor, as extras
    assert [s.params["executor"] for s in threads] == ["threads"] * 3
    with pytest.raises(ValueError, match="matches no scenario"):
        select(["nope_*"])


# ---------------------------------------------------------------------------- floor arithmetic

# H=4, 1 layer, nH=2 (D=2, Q=4), nKV=1 (KV=2), E=2, K=1, F=8, V=10; batch 1, seq 2 -> N=2
HAND = Config(
    hidden_dim=4, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=2, n_experts=2,
    top_k_experts=1, ffn_dim=8, vocab_size=10, max_seq_len=16,
)  # fmt: skip


def test_kernel_scenarios_call_the_package_kernel_on_what_they_describe() -> None:
    """The timed call computes the scenario's formula (C = A @ B^T for the matmul, on a
    non-square case too: B [n, k] reaches the library as the B^T [k, n] it stores)."""
    from nn_core.bench.scenarios import _kernel
    from nn_core.bench.workloads import KernelWorkload

    odd = _kernel("m", "matmul", 1, m=3, k=5, n=7)
    for sc in [s for s in SCENARIOS if s.kind == "kernel"] + [odd]:
        work = KernelWorkload(sc)
        assert work.info["function"].startswith("nn_core.model."), sc.id
        got = work.run_once()
        got = got[0] if isinstance(got, tuple) else got
        np.testing.assert_allclose(got, work.reference(), rtol=1e-5, atol=1e-6, err_msg=sc.id)


def test_forward_flops_by_hand() -> None:
    f = fl.forward_flops(HAND, batch=1, seq=2)
    assert f.qkv == 2 * 2 * 4 * (4 + 2 + 2) == 128
    assert f.attn_scores == f.attn_values == 2 * 1 * 2 * (2 * 2) * 2 == 32
    assert f.o_proj == 2 * 2 * 4 * 4 == 64
    assert f.router == 2 * 2 * 4 * 2 == 32
    assert f.experts == 3 * 2 * 2 * 1 * 4 * 8 == 384
    assert f.lm_head == 2 * 2 * 4 * 10 == 160
    assert f.total == 832
    half = fl.forward_flops(HAND, batch=1, seq=2, causal_half=True)  # 3 of 4 (q, k) pairs
    assert half.attn_scores == 24 and half.total == 832 - 16
    assert fl.train_step_flops(HAND, 1, 2) == 3 * 832


def test_tiny_forward_flops_match_the_formulas() -> None:
    f = fl.forward_flops(Config.tiny(), batch=2, seq=32)  # N = 64, two layers
    assert f.qkv == 2 * 2 * 64 * 64 * (64 + 16 + 16)
    assert f.experts == 2 * 3 * 2 * 64 * 2 * 64 * 256
    assert f.lm_head == 2 * 64 * 64 * 1000
    assert f.total == 37_093_376


def test_floor_time_and_ratio_by_hand() -> None:
    assert fl.optimizer_bytes(100) == 8 * 100 * 4  # AdamW reads 4, writes 3; clip reads 1
    assert fl.optimizer_working_set(100) == 1600
    # 2496 flops at 1 GFLOP/s = 2496 ns; 3200 bytes at 1.6 GB/s = 2000 ns
    floor = fl.floor_ns(2496, 1e9, 3200, 1.6e9)
    assert floor == pytest.approx(4496.0)
    assert fl.floor_ratio(8992, floor) == pytest.approx(2.0)
    assert fl.floor_ns(1000, 2e9) == pytest.approx(500.0)
    with pytest.raises(ValueError, match="bandwidth"):
        fl.floor_ns(1000, 1e9, 10, None)


def test_measured_rates_are_positive() -> None:
    assert fl.measure_gemm_rate(64, threads=1, repeats=2) > 1e6
    assert fl.measure_copy_bandwidth(1 << 20, threads=2, repeats=2) > 1e6


# ---------------------------------------------------------------------------- harness pieces


def test_timing_stats() -> None:
    s = timing_stats(list(range(1, 11)))
    assert s == {"median_ns": 6, "p95_ns": 10, "min_ns": 1, "max_ns": 10, "iqr_ns": 4}
    assert all(isinstance(v, int) for v in s.values())


def test_numerical_stats_of_arrays_losses_and_metrics() -> None:
    a = np.array([1.0, -3.0, np.nan, np.inf, -np.inf], dtype=np.float32)
    assert numerical_stats(a) == {"nan_count": 1, "inf_count": 2, "max_abs": 3.0}
    assert numerical_stats({"loss": 2.5, "lr": 99.0}) == {
        "nan_count": 0,
        "inf_count": 0,
        "max_abs": 2.5,
    }
    assert numerical_stats([np.ones(2), np.full(3, -4.0)])["max_abs"] == 4.0


def test_gc_tracker_counts_collections_only_while_active() -> None:
    with GcTracker() as t:
        gc.collect()
        assert t.count == 0
        t.active = True
        gc.collect()
        t.active = False
    assert t.count == 1 and t.time_ns > 0


def test_alloc_and_rss_probes() -> None:
    assert traced_alloc_bytes(lambda: np.ones(1_000_000)) >= 8_000_000  # NumPy buffers seen
    assert peak_rss_bytes() > 10 * 2**20  # bytes, not KiB


# ---------------------------------------------------------------------------- summary tool

A, B, SIB = (str(FIXTURES / f) for f in ("bench_a.json", "bench_b.json", "bench_sibling.json"))


def test_summary_table_rows_and_ratios() -> None:
    text = summarize([A, B, SIB])
    lines = text.splitlines()
    assert lines[0] == (
        "| scenario | axis | python (bench_a.json) | python (bench_b.json) "
        "| ratio vs python (bench_a.json) | rust (bench_sibling.json) "
        "| ratio vs python (bench_a.json) |"
    )
    assert lines[1] == "|---|---|---|---|---|---|---|"
    rows = lines[2:7]
    assert rows == [
        "| dispatch_warm | type_system | 600.00 us | 1.20 ms | 2.00x | 2.40 ms | 4.00x |",
        "| mem_train_step | memory | 1.30 ms | 650.00 us | 0.50x | 4.00 ms | 3.08x |",
        "| kernel_softmax | compiler | 4.60 us | - | - | 4.70 us | 1.02x |",
        "| scale_forward_256 | scale | 7.00 ms | 7.00 ms | 1.00x | - | - |",
        "| decode_kv_256 | decoding | - | 31.92 ms | - | - | - |",
    ]
    assert lines[7] == "| kernel_rmsnorm | compiler | - | - | - | - | - |"
    assert "- rust (bench_sibling.json): Apple M1, macOS-14.5-arm64" in text
    head = text.split("\n\n")[1].splitlines()  # the headline figures, a column per file
    assert head[0] == (
        "| figure | python (bench_a.json) | python (bench_b.json) | rust (bench_sibling.json) |"
    )
    assert len(head) == 2 + 8  # none of these files has the parallel scenarios: all '-'
    assert head[2] == "| inference/s at T4 (parallel_T4) | - | - | - |"


PEER = str(FIXTURES / "bench_rust_peer.json")  # the Rust implementation's own output


def test_summary_headline_figures_of_every_file() -> None:
    text = summarize([A, PEER])
    assert "| 951.14 us |" in text  # the peer's dispatch_warm median in the medians table
    head = text.split("\n\n")[1].splitlines()
    assert head[0] == "| figure | python (bench_a.json) | rust (bench_rust_peer.json) |"
    rows = {r.split(" | ")[0].lstrip("| "): r.split(" | ")[1:] for r in head[2:]}
    # by hand from the peer's medians: T4 -> 4 / 2728145 ns; T2/T1 -> 2 * m1 / m2
    assert rows["inference/s at T4 (parallel_T4)"] == ["-", "1,466 |"]
    assert rows["train steps/s at T4 (parallel_train_T4)"] == ["-", "728 |"]
    assert rows["forward speed-up T2/T1"] == ["-", "2.00x |"]  # 2 * 1404726 / 1405427
    assert rows["forward speed-up T4/T1"] == ["-", "2.06x |"]  # 4 * 1404726 / 2728145
    assert rows["train speed-up T2/T1"] == ["-", "1.84x |"]  # 2 * 2046235 / 2221982
    assert rows["train speed-up T4/T1"] == ["-", "1.49x |"]  # 4 * 2046235 / 5496744
    assert rows["cold/warm (dispatch_cold / dispatch_warm)"] == ["-", "8.48x |"]
    assert rows["GFLOP/s (kernel_matmul)"] == ["-", "114.93 |"]  # 2 * 64^3 / 4562 ns
    assert len(rows) == 8


def test_summary_headline_figures_from_our_fields_and_the_peers() -> None:
    from nn_core.bench.summary import headline_figures, matmul_flops

    assert matmul_flops({"params": {"M": 2, "K": 3, "N": 4}}) == 48
    assert matmul_flops({"params": {"m": 2, "k": 3, "n": 5}}) == 60
    assert matmul_flops({"known_flops": 7, "params": {"M": 2}}) == 7
    recs = {
        "parallel_T1": {"median_ns": 1_000_000},
        "parallel_T2": {"timings_ns": [1_000_000, 1_250_000, 1_500_000]},
        "dispatch_warm": {"median_ns": 2_000},
        "dispatch_cold": {"median_ns": 5_000},
        "kernel_matmul": {"median_ns": 1_000, "params": {"m": 10, "k": 10, "n": 10}},
    }
    f = headline_figures(recs)
    assert f["forward speed-up T2/T1"] == pytest.approx(2 * 1.0 / 1.25)
    assert f["cold/warm (dispatch_cold / dispatch_warm)"] == pytest.approx(2.5)
    assert f["GFLOP/s (kernel_matmul)"] == pytest.approx(2.0)  # 2000 flops / 1000 ns
    assert f["forward speed-up T4/T1"] is None and f["train speed-up T2/T1"] is None


def test_summary_of_one_file_and_scenarios_as_mapping() -> None:
    doc = {"scenarios": {"x": {"median_ns": 1500}, "y": {"timings_ns": [3, 1, 2]}}}
    table = summary_table([("only", doc)])
    assert table.splitlines()[2:] == ["| x | - | 1.50 us |", "| y | - | 2 ns |"]
    assert "| inference/s at T4 (parallel_T4) | - |" in summarize_docs([("only", doc)])


def summarize_docs(docs: list) -> str:
    from nn_core.bench.summary import headline_table

    return headline_table(docs)


def main(argv: list[str]) -> int:
    """``nn-core bench ARGV`` in this process."""
    return cli_main(["bench", *argv])


def test_summary_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--summary", A, B]) == 0
    out = capsys.readouterr().out
    assert "| dispatch_warm | type_system | 600.00 us | 1.20 ms | 2.00x |" in out
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["--summary", A, str(bad)]) == 1  # like unreadable data: one line
    err = capsys.readouterr().err
    assert "not JSON" in err and err.startswith("nn-core: error: ") and err.count("\n") == 1


def test_unknown_scenario_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--scenario", "no_such_*"]) == 2
    err = capsys.readouterr().err
    assert "matches no scenario" in err and err.startswith("nn-core: error: ")


# ---------------------------------------------------------------------------- a real small run


def _check_types(rec: dict) -> None:
    for key in SCENARIO_FIELDS:
        assert key in rec, (rec.get("id"), key)
    assert isinstance(rec["params"], dict)
    for key in ("timings_ns", "cpu_times_ns", "warmup_timings_ns"):
        assert all(isinstance(v, int) for v in rec[key]), key
    for key in ("median_ns", "p95_ns", "min_ns", "max_ns", "iqr_ns", "cpu_median_ns"):
        assert isinstance(rec[key], int), key
    assert rec["min_ns"] <= rec["median_ns"] <= rec["max_ns"]
    assert set(rec["memory"]) == {"peak_rss_bytes", "alloc_bytes"}
    assert rec["memory"]["peak_rss_bytes"] > 10 * 2**20 and rec["memory"]["alloc_bytes"] >= 0
    assert set(rec["gc"]) == {"total_gc_time_ns", "gc_pause_count"}
    assert all(isinstance(v, int) for v in rec["gc"].values())
    num = rec["numerical"]
    assert set(num) == {"nan_count", "inf_count", "max_abs"}
    assert num["nan_count"] == num["inf_count"] == 0 and num["max_abs"] > 0
    d = rec["derived"]
    assert isinstance(d["alloc_rate_bytes_per_sec"], float)
    assert 0.0 <= d["gc_throughput"] <= 1.0
    assert isinstance(d["flops"], int) and d["flops"] > 0
    assert d["gflops"] > 0 and d["floor_ratio"] > 0
    assert rec["params"]["floor"]["floor_ns"] > 0
    assert isinstance(rec["warmup_runs"], int) and isinstance(rec["trial_runs"], int)


def test_small_run_json_schema_and_pure_stdout() -> None:
    ids = [
        "kernel_softmax", "kernel_matmul", "dispatch_warm", "dispatch_cold", "mem_train_step",
        "parallel_T2", "parallel_train_T1", "decode_kv_256",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "nn_core", "bench", "--trials", "2", "--warmup", "1"]
    cmd += ["--gemm-size", "128", "--bandwidth-mib", "4"]
    for i in ids:
        cmd += ["--scenario", i]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # stdout is exactly one JSON document
    # progress went to stderr, the scenarios that build a trainer measured last
    assert "[1/8] kernel_matmul" in proc.stderr and "[7/8] mem_train_step" in proc.stderr
    err = proc.stderr  # the floor probe and the pool start after the lean scenarios
    assert err.index("decode_kv_256") < err.index("measuring the floor") < err.index("] parallel")

    meta = doc["metadata"]
    assert meta["language"] == "python" and meta["seed"] == 42
    assert (meta["n_trials"], meta["n_warmup"]) == (2, 1)
    for key in ("language_version", "numpy_version", "os", "cpu_model", "timestamp"):
        assert isinstance(meta[key], str) and meta[key], key
    assert meta["timestamp"].endswith("Z")
    assert set(meta["blas"]) >= {"library", "version", "threads", "architecture"}
    assert meta["gemm"]["gflops_1_thread"] > 0 and meta["gemm"]["gflops_all_threads"] > 0
    assert "blas_thread_policy" in meta

    (extra,) = doc["extras"]  # scenarios outside the suite's 22 have their own key
    assert extra["id"] == "decode_kv_256" and extra["throughput_tokens_per_sec"] > 0
    recs = {r["id"]: r for r in doc["scenarios"]}
    assert list(recs) == [s.id for s in select(ids) if s.id != "decode_kv_256"]
    for rec in recs.values():
        _check_types(rec)
        assert len(rec["timings_ns"]) == rec["trial_runs"] == 2
        assert len(rec["warmup_timings_ns"]) == rec["warmup_runs"] == 1
    for k in ("kernel_softmax", "kernel_matmul"):
        assert recs[k]["known_flops"] == recs[k]["derived"]["flops"]
        assert recs[k]["params"]["function"].startswith("nn_core.")
        assert "throughput_tokens_per_sec" not in recs[k]
    warm = recs["dispatch_warm"]
    assert warm["derived"]["flops"] == 37_093_376
    assert warm["throughput_tokens_per_sec"] == pytest.approx(64 / (warm["median_ns"] * 1e-9))
    assert recs["mem_train_step"]["params"]["floor"]["optimizer_bytes"] > 0
    for k in ("parallel_T2", "parallel_train_T1"):
        rec = recs[k]
        assert list(rec)[:3] == ["id", "parallel_semantics", "axis"]  # scenario level
        assert rec["parallel_semantics"] == "independent"
        p = rec["params"]
        assert "parallel_semantics" not in p and "alternatives" not in p
        assert p["executor"] == "processes" and p["blas_threads_per_worker"] == 1
        assert p["seq_len"] == p["seq"] and p["hidden_dim"] == 64
        # the memory of every instance: the parent and each of the T workers
        workers = p["peak_rss_worker_bytes"]
        assert len(workers) == p["thread_count"] and all(w > 10 * 2**20 for w in workers)
        assert rec["memory"]["peak_rss_bytes"] == p["peak_rss_parent_bytes"] + sum(workers)
    # a worker builds a task when a scenario asks: the forward workers hold no trainer
    forward_workers = recs["parallel_T2"]["params"]["peak_rss_worker_bytes"]
    assert max(forward_workers) < min(recs["parallel_train_T1"]["params"]["peak_rss_worker_bytes"])
    assert recs["kernel_matmul"]["params"]["M"] == 64
    t2 = recs["parallel_T2"]
    assert t2["derived"]["flops"] == 2 * 37_093_376
    assert t2["throughput_tokens_per_sec"] == pytest.approx(128 / (t2["median_ns"] * 1e-9))


LEAN_PROBE = """
import json, sys
from nn_core.bench.runner import RunOptions, run_benchmark
from nn_core.bench.scenarios import select
seen = {}
def log(line):
    if line.startswith("["):
        seen[line.split()[1]] = [m for m in ("multiprocessing", "subprocess") if m in sys.modules]
opts = RunOptions(trials=1, warmup=0, gemm_size=64, bandwidth_bytes=1 << 20)
doc, failures = run_benchmark(select(["parallel_T1", "dispatch_warm"]), opts, log)
assert not failures, failures
print(json.dumps(seen))
"""


def test_lean_scenarios_run_before_the_floor_probe_and_the_pool_load_their_modules() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", LEAN_PROBE],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)  # {scenario: the modules loaded when it started}
    assert seen == {"dispatch_warm": [], "parallel_T1": ["multiprocessing", "subprocess"]}


def test_process_pool_with_spawn_runs_independent_models() -> None:
    from nn_core.bench.pool import PoolTask, ProcessPool

    task = PoolTask("forward", "tiny", 1, 8)
    pool = ProcessPool(2, [task], start_method="spawn")
    try:
        assert pool.start_method == "spawn" and pool.size == 2
        with pytest.raises(RuntimeError, match="bench worker error"):
            pool.run(task.key, 1)  # not prepared yet: workers build a task when asked
        pool.prepare(task.key, 2)
        replies = pool.run(task.key, 2)  # (cpu_ns, gc_ns, gc_count) per worker
        assert len(replies) == 2 and all(r[0] >= 0 for r in replies)
        stats = pool.call(2, "numerics", task.key)
        assert stats[0] == stats[1] and stats[0]["nan_count"] == 0 and stats[0]["max_abs"] > 0
        assert all(a > 0 for a in pool.call(2, "alloc", task.key))
        assert all(r > 10 * 2**20 for r in pool.call(2, "rss"))
        with pytest.raises(RuntimeError, match="bench worker error"):
            pool.run("forward:tiny:9x9", 1)  # a task no worker prepared
    finally:
        procs = list(pool.procs)
        pool.close()
    assert not any(p.is_alive() for p in procs)


def test_process_pool_reports_tasks_it_could_not_build() -> None:
    from nn_core.bench.pool import PoolTask, ProcessPool

    task = PoolTask("forward", "no_such_preset", 1, 8)
    pool = ProcessPool(1, [task])
    try:
        with pytest.raises(RuntimeError, match="could not build.*no_such_preset"):
            pool.prepare(task.key, 1)
        with pytest.raises(ValueError, match="no pool task"):
            pool.prepare("forward:tiny:9x9", 1)
    finally:
        pool.close()


def test_train_options_parse_and_validate(capsys: pytest.CaptureFixture[str]) -> None:
    from nn_core.bench.runner import train_options

    assert train_options(["kernels=numba", "grad_clip=0.5"]) == {
        "kernels": "numba",
        "grad_clip": 0.5,
    }
    with pytest.raises(ValueError, match="key=value"):
        train_options(["kernels"])
    assert main(["--scenario", "mem_train_step", "--set", "no_such=1"]) == 2
    assert "no_such" in capsys.readouterr().err


def test_isolated_run_measures_each_scenario_in_a_fresh_process(tmp_path: Path) -> None:
    out = tmp_path / "iso.json"
    code = main(
        ["--isolate", "--scenario", "kernel_softmax", "--trials", "1", "--warmup", "0"]
        + ["--gemm-size", "64", "--bandwidth-mib", "4", "--out", str(out)]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    (rec,) = doc["scenarios"]
    assert rec["id"] == "kernel_softmax" and rec["known_flops"] == 4000
    assert "isolated_process" in rec["params"]
    assert rec["derived"]["floor_ratio"] > 0  # the parent's floor rates reached the child
    assert doc["metadata"]["isolation"].startswith("each scenario in a fresh interpreter")
    # the child measured its own peak RSS; how big it may be is not a unit test's call
    rss = rec["memory"]["peak_rss_bytes"]
    assert isinstance(rss, int) and rss > 0


# ---------------------------------------------------------------------------- no hidden tuning

ALLOCATOR_TUNING = ("mallopt", "M_MMAP_THRESHOLD", "M_TRIM_THRESHOLD", "M_ARENA", "MALLOC_")


def test_the_bench_source_tunes_no_allocator() -> None:
    files = [*(REPO / "src" / "nn_core" / "bench").glob("*.py")]
    files.append(REPO / "src" / "nn_core" / "app" / "commands" / "bench.py")
    for path in files:
        text = path.read_text()
        for word in ALLOCATOR_TUNING:
            assert word not in text, (path.name, word)


def test_a_model_scenario_runs_as_the_library_sets_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bench applies nothing the library does not: no BLAS thread limit of its own
    around a single model (the library chooses per call), no environment or allocator
    change, and the BLAS count it records is the library's own choice."""
    from nn_core.bench import runner, workloads
    from nn_core.bench.runner import RunOptions, run_benchmark
    from nn_core.model.blas import current_threads
    from nn_core.model.transformer import MoETransformer

    limits: list[object] = []

    def spy(*args: object, **kwargs: object) -> None:
        limits.append((args, kwargs))
        raise AssertionError("the bench set a BLAS thread limit of its own")

    monkeypatch.setattr(runner, "threadpool_limits", spy)
    monkeypatch.setattr(workloads, "threadpool_limits", spy)
    # what the library itself does first (its fused kernels choose OMP_WAIT_POLICY when
    # they load), so that only what the bench adds can differ below
    from nn_core.training.config import TrainConfig
    from nn_core.training.trainer import Trainer

    ids0, targets0 = make_inputs(1, 8, Config.tiny().vocab_size)
    trainer = Trainer(
        MoETransformer(Config.tiny(), seed=0), TrainConfig(batch_size=1, seq_len=8, kernels="numba")
    )
    trainer.train_step(ids0, targets0)
    env, blas = dict(os.environ), current_threads()
    ids = ["mem_train_step", "kernel_softmax", "dispatch_warm", "dispatch_cold"]
    doc, failures = run_benchmark(select(ids), RunOptions(trials=1, warmup=0, floor=False))
    assert failures == [] and limits == []
    assert dict(os.environ) == env and current_threads() == blas
    policy = doc["metadata"]["blas_thread_policy"]["single_model"]
    assert "the library's own choice" in policy and "the bench sets none" in policy
    assert doc["metadata"]["malloc"].startswith("allocator defaults")
    recs = {r["id"]: r for r in doc["scenarios"]}
    tiny = MoETransformer(Config.tiny(), seed=0)
    for sid in ("mem_train_step", "dispatch_warm"):
        p = recs[sid]["params"]
        assert p["blas_threads"] == tiny.blas_threads_for(p["batch"] * p["seq"]) == 1
