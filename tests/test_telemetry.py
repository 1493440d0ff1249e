"""Expert telemetry: values against the router's formula written out in NumPy, the
metrics.jsonl and evaluation fields, the plots (and their ownership), ``nn-core experts``."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nn_core import Config
from nn_core.app.cli import main
from nn_core.app.plots import plot_run
from nn_core.data.dataset import eval_batches
from nn_core.data.tokenizer import ByteTokenizer
from nn_core.errors import InputError
from nn_core.model.moe import RoutingStats, router_forward, routing_stats
from nn_core.model.transformer import MoETransformer
from nn_core.storage import ownership as own
from nn_core.storage.checkpoint import load_model
from nn_core.training.config import TrainConfig
from nn_core.training.distributed import sum_stats
from nn_core.training.telemetry import (
    empty_routing_stats,
    expert_report,
    expert_telemetry,
    worst_max_min,
)
from nn_core.training.trainer import Trainer

CFG = dataclasses.replace(Config.preset("tiny"), n_experts=6, top_k_experts=2, vocab_size=64)
B, S = 3, 8


def batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, (B, S + 1))
    return ids[:, :-1], ids[:, 1:]


# ---- the formula, written out --------------------------------------------------------------


def direct(x: np.ndarray, w_router: np.ndarray, top_k: int) -> dict[str, Any]:
    """Telemetry of one layer from its router input x [N, H] and weight [E, H], by the
    definitions: softmax, top-k by probability, counts, means, entropy."""
    z = x.astype(np.float64) @ w_router.astype(np.float64).T  # logits [N, E]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)  # softmax over experts
    n, e = p.shape
    counts = np.zeros(e, np.int64)
    for t in range(n):  # top-k of each token, one by one
        for k in sorted(range(e), key=lambda j: (-p[t, j], j))[:top_k]:
            counts[k] += 1
    entropy = -np.sum(p * np.log(p), axis=1)  # H(p_t) per token
    return {
        "load": counts / (n * top_k),
        "prob": p.mean(axis=0),
        "entropy": entropy.mean(),
        "max_min": None if counts.min() == 0 else counts.max() / counts.min(),
        "unused": int(np.sum(counts == 0)),
        "counts": counts,
        "entropy_sum": entropy.sum(),
        "prob_sum": p.sum(axis=0),
    }


def direct_model(model: MoETransformer, ids: np.ndarray, tgt: np.ndarray) -> list[dict[str, Any]]:
    """Per layer ``direct`` on the router inputs of a forward (read from its caches)."""
    state = model.forward_loss(ids, tgt, 0.01)
    params = model.parameters()
    return [
        direct(cache.moe.x, params[f"layers.{i}.moe.router.weight"], model.config.top_k_experts)
        for i, cache in enumerate(state.caches)
    ]


def assert_matches(tel: dict[str, Any], want: list[dict[str, Any]], tokens: int) -> None:
    assert tel["tokens"] == tokens
    assert len(tel["load"]) == len(want)
    for i, w in enumerate(want):
        np.testing.assert_allclose(tel["load"][i], w["load"], rtol=0, atol=0)  # exact counts
        np.testing.assert_allclose(tel["prob"][i], w["prob"], rtol=1e-12, atol=1e-15)
        assert tel["entropy"][i] == pytest.approx(w["entropy"], rel=1e-12)
        assert tel["max_min"][i] == (None if w["max_min"] is None else pytest.approx(w["max_min"]))
        assert tel["unused"][i] == w["unused"]


def test_routing_stats_entropy_is_the_direct_formula() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 16))  # [N, H]
    w = rng.standard_normal((6, 16)) * 2.0  # [E, H]: confident routers, small p included
    stats = routing_stats(router_forward(x, w, 2))
    want = direct(x, w, 2)
    assert stats.tokens == 40
    np.testing.assert_array_equal(stats.counts, want["counts"])
    np.testing.assert_allclose(stats.prob_sum, want["prob_sum"], rtol=1e-12)
    assert stats.entropy_sum == pytest.approx(want["entropy_sum"], rel=1e-12)


def test_entropy_of_a_one_hot_router_is_zero_and_of_a_uniform_one_log_e() -> None:
    x = np.ones((5, 2))
    sure = routing_stats(router_forward(x, np.array([[800.0, 800.0], [0.0, 0.0]]), 1))
    assert sure.entropy_sum == 0.0  # p = (1, 0): 0 log 0 counted as 0, no NaN
    flat = routing_stats(router_forward(x, np.zeros((4, 2)), 2))
    assert flat.entropy_sum == pytest.approx(5 * math.log(4), rel=1e-15)


def test_step_telemetry_equals_the_direct_computation_from_the_router() -> None:
    tcfg = TrainConfig(batch_size=B, seq_len=S, total_steps=3, warmup_steps=1, lr=1e-2)
    trainer = Trainer(MoETransformer(CFG, seed=5, dtype=np.float64), tcfg)
    twin = Trainer(MoETransformer(CFG, seed=5, dtype=np.float64), tcfg)  # in lockstep
    batches = [batch(s) for s in range(3)]
    history = trainer.fit(batches, 3, progress=False)
    for step, (ids, tgt) in enumerate(batches):
        want = direct_model(twin.model, ids, tgt)  # the weights before update `step`
        assert_matches(history[step]["experts"], want, B * S)
        twin.train_step(ids, tgt)
    assert trainer.expert_telemetry().as_dict() == history[-1]["experts"]


def test_with_gradient_accumulation_the_telemetry_is_of_the_whole_batch() -> None:
    rows = 4  # two micro-batches of 2 rows
    tcfg = TrainConfig(batch_size=rows, seq_len=S, total_steps=2, warmup_steps=1)
    trainer = Trainer(
        MoETransformer(CFG, seed=6, dtype=np.float64), tcfg.replace(grad_accum_steps=2)
    )
    twin = MoETransformer(CFG, seed=6, dtype=np.float64)
    rng = np.random.default_rng(8)
    ids = rng.integers(0, CFG.vocab_size, (rows, S + 1))
    history = trainer.fit([(ids[:, :-1], ids[:, 1:])], 1, progress=False)
    want = direct_model(twin, ids[:, :-1], ids[:, 1:])  # all 4 rows at once
    assert_matches(history[0]["experts"], want, rows * S)


def test_collapsed_router_counts_unused_experts_and_an_infinite_ratio() -> None:
    stats = [
        RoutingStats(np.array([0, 6, 2]), np.array([0.5, 3.0, 0.5]), 1.25, 4),
        RoutingStats(np.array([3, 3, 2]), np.array([1.5, 1.5, 1.0]), 2.0, 4),
    ]
    tel = expert_telemetry(stats).as_dict()
    assert tel["load"] == [[0.0, 0.75, 0.25], [0.375, 0.375, 0.25]]
    assert tel["prob"] == [[0.125, 0.75, 0.125], [0.375, 0.375, 0.25]]
    assert tel["entropy"] == [0.3125, 0.5]
    assert tel["max_min"] == [None, 1.5] and tel["unused"] == [1, 0]
    assert worst_max_min(tel) == math.inf
    assert json.loads(json.dumps(tel)) == tel  # plain JSON: null, never Infinity
    both = sum_stats(stats, stats)
    assert both[0].tokens == 8 and both[0].counts.tolist() == [0, 12, 4]
    assert expert_telemetry(both).as_dict()["load"] == tel["load"]  # fractions of sums
    with pytest.raises(InputError):
        expert_telemetry([])
    zero = empty_routing_stats(dataclasses.replace(CFG, n_experts=3))
    assert [z.tokens for z in zero] == [0] * CFG.n_layers
    assert expert_telemetry(sum_stats(zero, stats)).as_dict() == tel  # zeros change nothing
    with pytest.raises(InputError, match="empty"):
        expert_telemetry(zero)


# ---- metrics.jsonl, the progress bar, evaluation -------------------------------------------


def test_metrics_jsonl_holds_the_telemetry_of_every_step_and_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = MoETransformer(CFG, seed=2, dtype=np.float64)
    held_out = [batch(100), batch(101)]
    tcfg = TrainConfig(batch_size=B, seq_len=S, total_steps=4, warmup_steps=1, eval_interval=2)
    trainer = Trainer(model, tcfg, out_dir=tmp_path / "run")
    trainer.fit([batch(s) for s in range(4)], 4, eval_batches=held_out, progress=True)
    err = capsys.readouterr().err
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 4
    for rec in records:
        tel = rec["experts"]
        assert set(tel) == {"load", "prob", "entropy", "max_min", "unused", "tokens"}
        assert tel["tokens"] == B * S and len(tel["load"]) == CFG.n_layers
        for i in range(CFG.n_layers):
            assert sum(tel["load"][i]) == pytest.approx(1.0, abs=1e-12)
            assert sum(tel["prob"][i]) == pytest.approx(1.0, abs=1e-12)
            assert 0.0 <= tel["entropy"][i] <= math.log(CFG.n_experts) + 1e-12
            counts = np.rint(np.array(tel["load"][i]) * B * S * CFG.top_k_experts)
            assert tel["unused"][i] == int(np.sum(counts == 0))
            if tel["max_min"][i] is not None:
                assert tel["max_min"][i] == pytest.approx(counts.max() / counts.min())
        assert ("val_experts" in rec) == ((rec["step"] + 1) % 2 == 0)
    # the evaluation's telemetry: all held-out tokens, with the weights of that moment
    want = [direct_model(model, *b) for b in held_out]  # after the last update = step 3's eval
    val = records[-1]["val_experts"]
    assert val["tokens"] == 2 * B * S
    for i in range(CFG.n_layers):
        counts = sum(w[i]["counts"] for w in want)
        np.testing.assert_array_equal(val["load"][i], counts / counts.sum())
        probs = sum(w[i]["prob_sum"] for w in want) / (2 * B * S)
        np.testing.assert_allclose(val["prob"][i], probs, rtol=1e-12)
        entropy = sum(w[i]["entropy_sum"] for w in want) / (2 * B * S)
        assert val["entropy"][i] == pytest.approx(entropy, rel=1e-12)
    # the bar shows the worst layer's max/min of the last step
    shown = f"max_min={worst_max_min(records[-1]['experts']):.2f}"
    assert shown in err, err[-300:]
    # Trainer.evaluate on its own reports the same
    assert trainer.evaluate(held_out)["val_experts"] == val


# ---- plots ---------------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n"
TEXT = "".join(f"def f{i}(a, b):\n    return a + b * {i % 7}\n" for i in range(300))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run of the command line: 12 updates, evaluated every 4."""
    root = tmp_path_factory.mktemp("tel")
    (root / "data.txt").write_text(TEXT, encoding="utf-8")
    out = root / "run"
    argv = ["train", "--data", root / "data.txt", "--steps", 12, "--batch-size", 4]
    argv += ["--seq-len", 32, "--eval-interval", 4, "--sample-tokens", 0, "--quiet"]
    argv += ["--tokenizer", "byte"]  # the tests count bytes
    assert main([str(a) for a in [*argv, "--out", out]]) == 0
    return out


def expected_plots(n_layers: int) -> set[str]:
    return {"loss.png", "lr.png"} | {f"expert_load_layer_{i}.png" for i in range(n_layers)}


def test_train_writes_the_plots_and_the_run_stays_a_run(trained_run: Path) -> None:
    plots = trained_run / "plots"
    assert {p.name for p in plots.iterdir()} == expected_plots(Config.preset("tiny").n_layers)
    assert all(p.read_bytes()[:8] == PNG for p in plots.iterdir())
    info = own.classify(trained_run)
    assert info.kind == own.RUN and info.foreign == ()  # plots/ is the run's own


def test_plot_command_rewrites_the_plots(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for p in (trained_run / "plots").iterdir():
        p.unlink()
    assert main(["plot", str(trained_run)]) == 0
    out = capsys.readouterr().out
    names = expected_plots(Config.preset("tiny").n_layers)
    assert {p.name for p in (trained_run / "plots").iterdir()} == names
    assert all(str(trained_run / "plots" / n) in out for n in names)


def test_plot_refuses_what_it_does_not_own(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = trained_run / "plots" / "notes.txt"
    notes.write_text("mine")
    try:
        assert own.classify(trained_run).foreign == ("plots",)
        assert main(["plot", str(trained_run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "refusing to write plots" in err, err
        assert notes.read_text() == "mine"
    finally:
        notes.unlink()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "metrics.jsonl").write_text("{}\n")
    assert main(["plot", str(foreign)]) == 1
    err = capsys.readouterr().err
    assert "not an nn-core run directory" in err and not (foreign / "plots").exists()


def test_plot_run_draws_from_records(tmp_path: Path) -> None:
    records = [
        {"step": s, "ce": 3.0 - s * 0.1, "lr": 1e-3, "experts": {"load": [[0.5, 0.5, 0.0]]}}
        for s in range(5)
    ]
    files = plot_run(records, tmp_path)
    assert {p.name for p in files} == {"loss.png", "lr.png", "expert_load_layer_0.png"}
    assert all(p.read_bytes()[:8] == PNG for p in files)


# ---- nn-core experts and nn-core evaluate --------------------------------------------------


def test_experts_command_counts_the_tokens_each_expert_takes(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out_json = trained_run.parent / "data.txt", trained_run.parent / "experts.json"
    argv = ["experts", "--checkpoint", trained_run, "--data", data, "--json", out_json]
    assert main([str(a) for a in [*argv, "--seq-len", 32, "--top", 3]]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out_json.read_text(encoding="utf-8"))
    # independently: route every window and count (expert, input token) pairs
    model = load_model(trained_run)
    tok = ByteTokenizer()
    batches = eval_batches(tok.encode(TEXT), 16, 32)
    k = model.config.top_k_experts
    pairs: list[Counter[tuple[int, int]]] = [Counter() for _ in range(model.config.n_layers)]
    for ids, tgt in batches:
        state = model.forward_loss(ids, tgt, 0.0)
        flat = ids.reshape(-1)
        for i, routing in enumerate(state.routing):
            for t in range(flat.size):
                for e in routing.top_idx[t]:
                    pairs[i][(int(e), int(flat[t]))] += 1
    tokens = sum(x.size for x, _ in batches)
    assert report["tokens"] == tokens and report["top_k"] == k
    for i, layer in enumerate(report["layers"]):
        assert layer["layer"] == i
        for e, ex in enumerate(layer["experts"]):
            mine = {v: c for (ee, v), c in pairs[i].items() if ee == e}
            assert ex["count"] == sum(mine.values())
            assert ex["load"] == pytest.approx(ex["count"] / (tokens * k), rel=1e-15)
            best = sorted(mine.items(), key=lambda vc: (-vc[1], vc[0]))[:3]
            assert [(t["id"], t["count"]) for t in ex["top_tokens"]] == best
            for t in ex["top_tokens"]:
                assert t["text"] == tok.decode(np.array([t["id"]]))
                assert t["share"] == pytest.approx(t["count"] / ex["count"])
            text = "  ".join(
                f"{json.dumps(t['text'])} {t['share']:.0%} x{t['lift']:.1f}"
                for t in ex["top_tokens"]
            )
            assert f"expert {e:>2}  load {ex['load']:6.1%}" in printed and text in printed
        assert f"layer {i}: router entropy {report['entropy'][i]:.3f}" in printed


def test_expert_report_lists_every_token_an_expert_took_and_no_other() -> None:
    model = MoETransformer(CFG, seed=4, dtype=np.float64)
    ids, tgt = batch(7)
    report = expert_report(model, [(ids, tgt)], ByteTokenizer(), top=CFG.vocab_size)
    state = model.forward_loss(ids, tgt, 0.0)
    flat = ids.reshape(-1)
    for i, routing in enumerate(state.routing):
        for ex in report["layers"][i]["experts"]:
            took = Counter(
                int(flat[t]) for t in range(flat.size) if ex["expert"] in routing.top_idx[t]
            )
            want = sorted(took.items(), key=lambda vc: (-vc[1], vc[0]))  # count, then id
            assert [(t["id"], t["count"]) for t in ex["top_tokens"]] == want
            freq = np.bincount(flat, minlength=CFG.vocab_size) / flat.size
            for t in ex["top_tokens"]:
                assert t["lift"] == pytest.approx(t["count"] / ex["count"] / freq[t["id"]])


def test_expert_report_rejects_no_text() -> None:
    model = MoETransformer(CFG, seed=1)
    with pytest.raises(InputError, match="empty"):
        expert_report(model, [], ByteTokenizer())
    with pytest.raises(InputError, match="top"):
        expert_report(model, [batch(0)], ByteTokenizer(), top=0)


def test_experts_command_refuses_a_directory_as_json_and_too_little_text(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = trained_run.parent / "data.txt"
    argv = ["experts", "--checkpoint", trained_run, "--data", data, "--json", trained_run]
    assert main([str(a) for a in argv]) == 2
    assert "is a directory" in capsys.readouterr().err
    short = trained_run.parent / "short.txt"
    short.write_text("abc", encoding="utf-8")
    assert main(["experts", "--checkpoint", str(trained_run), "--data", str(short)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has 3 tokens; --seq-len 64 needs at least 65" in err


def test_evaluate_reports_the_expert_telemetry_of_the_windows(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = trained_run.parent / "data.txt"
    argv = ["evaluate", "--checkpoint", trained_run, "--data", data, "--seq-len", 32]
    argv += ["--max-batches", 2, "--workers", 1]
    assert main([str(a) for a in [*argv, "--json"]]) == 0
    result = json.loads(capsys.readouterr().out)
    model = load_model(trained_run)
    total = empty_routing_stats(model.config)
    for ids, tgt in eval_batches(ByteTokenizer().encode(TEXT), 16, 32, 2):
        total = sum_stats(total, model.forward_loss(ids, tgt, 0.0).routing_stats())
    assert result["experts"] == expert_telemetry(total).as_dict()
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    for i, load in enumerate(result["experts"]["load"]):
        assert f"layer {i}: expert load {' '.join(f'{f:.1%}' for f in load)}" in printed
