"""End-to-end tests of the ``nn-core`` command line, in a temporary directory.

Most run ``nn_core.app.cli.main(argv)`` in-process (fast); a few run ``python -m nn_core``
in a subprocess where the real exit status and stderr matter.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from timeouts import SUBPROCESS_TIMEOUT

from nn_core import Config
from nn_core.app.cli import main
from nn_core.storage.checkpoint import load_model, load_training_checkpoint

TRAIN = ["--batch-size", "4", "--seq-len", "32", "--eval-interval", "8"]
TRAIN += ["--checkpoint-interval", "8", "--sample-tokens", "16", "--quiet"]


def _text() -> str:
    """~8 KB of varied, code-like text: enough windows for 4 x 32 batches and validation."""
    rng = np.random.default_rng(0)
    names = ["alpha", "beta", "gamma", "delta", "value", "items", "count", "total"]
    lines = []
    for i in range(300):
        a, b = rng.choice(names, 2)
        lines.append(f"def f{i}({a}, {b}):\n    return {a} + {b} * {i % 7}\n")
    return "".join(lines)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("nn-core: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli")
    (path / "data.txt").write_text(_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def straight_run(workdir: Path) -> Path:
    """24 updates in one go (the reference for the resume test)."""
    out = workdir / "straight"
    assert (
        main(
            [
                "train",
                "--data",
                str(workdir / "data.txt"),
                "--steps",
                "24",
                *TRAIN,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


# ---- train -------------------------------------------------------------------------------


def test_train_writes_a_complete_run_directory(straight_run, capsys):
    out = straight_run
    for name in ("run.json", "tokenizer.json", "metrics.jsonl", "summary.json", "sample.txt"):
        assert (out / name).is_file(), name
    assert (out / "latest").read_text().strip() == "step_000024"
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(24))
    assert [m["step"] for m in metrics if "val_ce" in m] == [7, 15, 23]  # after 8, 16, 24 updates
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 24 and 0 < summary["val_ce"] < 10 and summary["unigram_entropy"] > 0
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["train_config"]["total_steps"] == 24
    assert run_info["train_config"]["warmup_steps"] == 2  # 10% of a short run
    assert run_info["config"] == Config.tiny().to_dict()


def test_train_prints_entropy_validation_loss_and_a_sample(workdir, capsys):
    code, out, err = run(
        [
            "train",
            "--data",
            workdir / "data.txt",
            "--steps",
            "6",
            *TRAIN,
            "--out",
            workdir / "printed",
        ],
        capsys,
    )
    assert code == 0, err
    assert "unigram entropy" in out and "validation cross-entropy" in out
    assert "sample (16 tokens" in out and "loss curve:" in out


def test_resume_continues_exactly_like_a_straight_run(straight_run, workdir, capsys):
    split = workdir / "split"
    data = workdir / "data.txt"
    code, _, err = run(
        ["train", "--data", data, "--steps", "24", "--stop-at", "10", *TRAIN, "--out", split],
        capsys,
    )
    assert code == 0, err
    assert (split / "latest").read_text().strip() == "step_000010"
    code, out, err = run(
        ["train", "--resume", "--out", split, "--quiet", "--sample-tokens", "0"], capsys
    )
    assert code == 0, err
    assert "resuming" in out and "at step 10 of 24" in out
    a = load_training_checkpoint(straight_run)
    b = load_training_checkpoint(split)
    assert b.state["step"] == 24
    np.testing.assert_array_equal(a.model.flat_params, b.model.flat_params)  # bitwise
    np.testing.assert_array_equal(a.m, b.m)
    np.testing.assert_array_equal(a.v, b.v)
    assert a.state["data_state"] == b.state["data_state"]

    def losses(path: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (path / "metrics.jsonl").read_text().splitlines()]

    assert losses(split) == losses(straight_run)


def test_resume_to_more_steps_extends_the_run(straight_run, workdir, capsys):
    longer = workdir / "longer"
    shutil.copytree(straight_run, longer)
    code, out, err = run(
        ["train", "--resume", "--out", longer, "--steps", "30", "--quiet", "--sample-tokens", "0"],
        capsys,
    )
    assert code == 0, err
    assert load_training_checkpoint(longer).state["step"] == 30
    assert len((longer / "metrics.jsonl").read_text().splitlines()) == 30


def test_train_reads_a_config_file_and_set_overrides(workdir, capsys):
    toml = workdir / "small.toml"
    toml.write_text(
        "hidden_dim = 32\nn_heads = 2\nffn_dim = 64\n[train]\nlr = 0.002\n", encoding="utf-8"
    )
    out = workdir / "from_toml"
    argv = ["train", "--config", toml, "--set", "n_layers=1", "--set", "lr=0.004"]
    code, _, err = run(
        [*argv, "--data", workdir / "data.txt", "--steps", "3", *TRAIN, "--out", out], capsys
    )
    assert code == 0, err
    saved = json.loads((out / "run.json").read_text())
    assert saved["config_name"] == "small"
    assert (
        saved["config"]["hidden_dim"],
        saved["config"]["n_heads"],
        saved["config"]["n_layers"],
    ) == (32, 2, 1)
    assert saved["train_config"]["lr"] == 0.004  # --set wins over the file
    jfile = workdir / "c.json"
    jfile.write_text(json.dumps({"model": {"hidden_dim": 48}, "train": {"seq_len": 16}}))
    code, _, err = run(["info", "--config", jfile, "--json"], capsys)
    assert code == 2 and "not used by this command" in err  # info takes no train fields


# ---- generate ----------------------------------------------------------------------------


def test_generate_from_a_checkpoint(straight_run, capsys):
    base = [
        "generate",
        "--checkpoint",
        straight_run,
        "--prompt",
        "def f1(",
        "--max-new-tokens",
        "24",
    ]
    code, out, err = run([*base, "--seed", "3"], capsys)
    assert code == 0, err
    assert out.startswith("def f1(") and len(out) > len("def f1(")
    assert run([*base, "--seed", "3"], capsys)[1] == out  # reproducible
    assert run([*base, "--seed", "3", "--stream"], capsys)[1] == out  # streaming prints the same
    code, two, _ = run([*base, "--seed", "3", "--num-samples", "2"], capsys)
    assert code == 0 and two.count("===== sample") == 2
    assert out.rstrip("\n") in two  # sample 1 uses seed 3, like the single run
    step_dir = straight_run / "step_000024"
    for extra in (["--strategy", "greedy"], ["--top-p", "0.5"], ["--temperature", "0"]):
        code, _, err = run(
            [
                "generate",
                "--checkpoint",
                step_dir,
                "--prompt",
                "x",
                "--max-new-tokens",
                "5",
                *extra,
            ],
            capsys,
        )
        assert code == 0, err


def test_generate_keeps_the_tail_of_a_too_long_prompt(straight_run, workdir, capsys):
    prompt = workdir / "long_prompt.txt"
    prompt.write_text("x = 1\n" * 100, encoding="utf-8")  # 600 tokens > max_seq_len 512
    code, out, err = run(
        [
            "generate",
            "--checkpoint",
            straight_run,
            "--prompt-file",
            prompt,
            "--max-new-tokens",
            "12",
        ],
        capsys,
    )
    assert code == 0
    assert "keeping its last 500" in err and "Traceback" not in err


# ---- info, bench, convergence ------------------------------------------------------------


def test_info(straight_run, capsys):
    code, out, _ = run(["info"], capsys)
    assert code == 0 and "542,528 total" in out and "BLAS" in out and "NumPy" in out
    code, out, _ = run(["info", "--config", "default_6_9b", "--json"], capsys)
    doc = json.loads(out)
    assert doc["total_params"] == Config.default_6_9b().total_params()
    assert doc["active_params"] == Config.default_6_9b().active_params()
    assert "blas" in doc["runtime"]
    code, out, _ = run(["info", "--checkpoint", straight_run], capsys)
    assert code == 0 and "step: 24" in out


def test_bench_and_convergence_are_forwarded(workdir, capsys):
    code, out, _ = run(["bench", "--list"], capsys)
    assert code == 0 and "mem_train_step" in out
    code, _, _ = run(["convergence", "--out", workdir / "conv", "--steps", "3", "--quiet"], capsys)
    assert code == 1  # 3 steps do not reach the target loss
    assert (workdir / "conv" / "convergence.json").is_file()


# ---- errors: one line on stderr, exit 1 (runtime) or 2 (usage) ---------------------------


def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "step_000024" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    return dst


def test_runtime_errors_exit_1_with_one_line(straight_run, workdir, capsys):
    data = workdir / "data.txt"
    bad_utf8 = workdir / "latin1.txt"
    bad_utf8.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    corrupt = _corrupt_copy(straight_run, workdir / "corrupt")
    cases = [
        (["generate", "--checkpoint", workdir / "missing", "--prompt", "x"], "does not exist"),
        (["generate", "--checkpoint", corrupt, "--prompt", "x"], "corrupt"),
        (["generate", "--checkpoint", data, "--prompt", "x"], "not a directory"),
        (
            ["generate", "--checkpoint", straight_run, "--prompt-file", workdir / "nope.txt"],
            "no such file",
        ),
        (["train", "--data", workdir / "nope.txt", "--out", workdir / "e1"], "no such file"),
        (["train", "--data", workdir, "--out", workdir / "e2"], "unusable file"),
        (["train", "--data", bad_utf8, "--out", workdir / "e3"], "not valid UTF-8"),
        (["train", "--resume", "--out", workdir / "no_run"], "no run to resume"),
        (["info", "--checkpoint", workdir / "missing"], "does not exist"),
    ]
    for argv, fragment in cases:
        code, _, err = run(argv, capsys)
        assert code == 1, (argv, err)
        assert_one_line_error(err, fragment)
    assert not (workdir / "e1").exists()  # nothing written before the data was read


def test_resume_refuses_changed_data(straight_run, workdir, capsys):
    moved = workdir / "changed"
    shutil.copytree(straight_run, moved)
    run_json = json.loads((moved / "run.json").read_text())
    other = workdir / "other.txt"
    other.write_text(_text().upper(), encoding="utf-8")
    run_json["data"]["source"] = str(other)
    (moved / "run.json").write_text(json.dumps(run_json))
    code, _, err = run(["train", "--resume", "--out", moved], capsys)
    assert code == 1
    assert_one_line_error(err, "changed since the run started")


def test_usage_errors_exit_2_with_one_line(straight_run, workdir, capsys):
    data = workdir / "data.txt"
    bad_toml = workdir / "bad.toml"
    bad_toml.write_text("hidden_dim = 32\nwidth = 3\n", encoding="utf-8")
    gen = ["generate", "--checkpoint", straight_run, "--prompt", "x"]
    cases = [
        ([*gen, "--temperature", "-1"], "--temperature"),
        ([*gen, "--top-k", "0"], "--top-k"),
        ([*gen, "--top-p", "0"], "--top-p"),
        ([*gen, "--top-p", "nan"], "--top-p"),
        ([*gen, "--max-new-tokens", "512"], "--max-new-tokens"),
        ([*gen, "--strategy", "beam"], "--strategy"),
        (["generate", "--checkpoint", straight_run, "--prompt", ""], "--prompt must not be empty"),
        (
            ["train", "--set", "unknown_field=1", "--data", data],
            "unknown config field 'unknown_field'",
        ),
        (["train", "--set", "hidden_dim=0", "--data", data], "hidden_dim must be an int >= 1"),
        (["train", "--set", "lr", "--data", data], "key=value"),
        (["train", "--config", bad_toml, "--data", data], "unknown config field 'width'"),
        (["train", "--config", "huge", "--data", data], "preset"),
        (["train", "--steps", "0"], "--steps"),
        (["train", "--lr", "-1"], "--lr"),
        (["train", "--steps", "5", "--stop-at", "9"], "--stop-at"),
        (["train", "--data", data, "--out", straight_run], "already holds a run"),
        (
            ["train", "--resume", "--out", straight_run, "--lr", "0.1"],
            "cannot change when resuming",
        ),
        (["frobnicate"], "invalid choice"),
    ]
    for argv, fragment in cases:
        code, _, err = run(argv, capsys)
        assert code == 2, (argv, err)
        assert_one_line_error(err, fragment)


def test_real_exit_codes_and_stderr_in_a_subprocess(straight_run, workdir):
    def cli(*argv: object) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "nn_core", *map(str, argv)]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, cwd=workdir
        )

    missing = cli("generate", "--checkpoint", workdir / "missing", "--prompt", "x")
    assert missing.returncode == 1 and missing.stdout == ""
    assert_one_line_error(missing.stderr, "does not exist")
    unknown = cli("train", "--set", "unknown_field=1")
    assert unknown.returncode == 2
    assert_one_line_error(unknown.stderr, "unknown_field")
    corrupt = cli(
        "generate",
        "--checkpoint",
        _corrupt_copy(straight_run, workdir / "corrupt2"),
        "--prompt",
        "x",
    )
    assert corrupt.returncode == 1
    assert_one_line_error(corrupt.stderr, "SHA-256")
    ok = cli("generate", "--checkpoint", straight_run, "--prompt", "def ", "--max-new-tokens", "8")
    assert ok.returncode == 0 and ok.stdout.startswith("def ")


def test_export_import_and_evaluate(straight_run, workdir, capsys):
    """export -> import round trip is bitwise; evaluate gives a loss below uniform."""

    weights = workdir / "export.safetensors"
    code, out, _ = run(["export", "--checkpoint", straight_run, "--out", weights], capsys)
    assert code == 0 and weights.is_file() and "wrote" in out
    imported = workdir / "imported"
    code, _, _ = run(["import", weights, "--out", imported], capsys)
    assert code == 0
    original = load_model(straight_run)
    np.testing.assert_array_equal(load_model(imported).flat_params, original.flat_params)
    code, out, _ = run(
        [
            "evaluate",
            "--checkpoint",
            imported,
            "--data",
            workdir / "data.txt",
            "--seq-len",
            "32",
            "--max-batches",
            "2",
            "--workers",
            "1",
            "--json",
        ],
        capsys,
    )
    result = json.loads(out)
    assert code == 0 and 0 < result["loss"] < np.log(Config.tiny().vocab_size)
    code, _, err = run(["import", workdir / "data.txt", "--out", workdir / "bad"], capsys)
    assert code == 1
    assert_one_line_error(err, "safetensors")
    code, _, err = run(["export", "--checkpoint", workdir / "nowhere", "--out", weights], capsys)
    assert code == 1
    assert_one_line_error(err)
