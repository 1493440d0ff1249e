"""Fault injection: nothing a user owns is destroyed, overwritten or half-read.

Each test injects one fault that an audit of commit b232fd8 found (findings 1-7 below,
each reproduced there) and states in its docstring which finding it covers; every test
here fails on that commit:

1. ``--out`` deleted whatever was there (import, the save functions), export overwrote
   any file and created missing parents, pruning removed directories nn-core did not
   write;
2. no lock on a run directory: two writers ran at once, default names collided;
3. tracebacks where one line is promised (a full disk, malformed state.json, a bad
   prompt or scheduler address, a broken pipe);
4. state.json was not verified: edited fields loaded silently;
5. tensor files were created 0600 while everything else followed the umask;
6. gradients from several threads on one model mixed silently;
7. a corrupted ``latest`` gave no hint, ``--resume --steps`` below the current step was
   accepted, ``bench --out`` in a missing directory failed only at the end, and
   identical runs wrote different checkpoint bytes.

Faults that concern the command line run the real ``nn-core`` (``python -m nn_core`` in
a subprocess) where exit status and stderr are the point, and assert exactly one stderr
line (none for a broken pipe) and the documented exit status: 1 runtime error, 2 usage
error (a refused --out too), 141 broken pipe.

Shape legend: B batch, S sequence, P parameters (the flat buffers).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nn_core import CheckpointError, Config, MoETransformer
from nn_core.app.cli import main
from nn_core.data.dataset import BatchSampler
from nn_core.storage.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    latest_checkpoint,
    load_model,
    load_training_checkpoint,
    save_model,
)
from nn_core.storage.weights import export_weights, import_weights
from nn_core.training.config import TrainConfig
from nn_core.training.trainer import Trainer

FIXTURES = Path(__file__).parent / "fixtures"
# a small model: the faults are about files, not arithmetic (~90k parameters)
SMALL = ["--set", "hidden_dim=32", "--set", "ffn_dim=64", "--set", "n_layers=1"]
TRAIN = ["--batch-size", "2", "--seq-len", "16", "--eval-interval", "0"]
TRAIN += ["--checkpoint-interval", "4", "--sample-tokens", "0", "--quiet", *SMALL]
SMALL_CONFIG = Config.tiny().replace(hidden_dim=32, ffn_dim=64, n_layers=1)
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, documented in nn_core.app.cli


# ---- helpers ---------------------------------------------------------------------------


def corpus() -> str:
    """~6 KB of code-like text: windows for 2 x 16 batches and a validation split."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "value", "items", "count", "total"]
    return "".join(
        f"def f{i}({a}, {b}):\n    return {a} * {b} + {i % 7}\n"
        for i, (a, b) in enumerate(rng.choice(words, (200, 2)))
    )


def nn_core(
    *argv: object, cwd: Path, timeout: float = 180, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run the real command line in a fresh interpreter."""
    cmd = [sys.executable, "-m", "nn_core", *(a if isinstance(a, bytes) else str(a) for a in argv)]
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(
        cmd, cwd=cwd, stderr=subprocess.PIPE, text=True, timeout=timeout, check=False, **kwargs
    )


def one_error_line(stderr: str, *fragments: str) -> str:
    """The single stderr line ``nn-core: error: ...`` (no traceback), containing fragments."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("nn-core: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def run_main(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> SHA-256 (files) or "dir" / "link": everything under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def resign(state: dict[str, Any]) -> dict[str, Any]:
    """Recompute ``state_sha256`` if the state has one (format 2): the SHA-256 of the
    compact, sorted JSON of every other field -- what a consistent but wrong save writes."""
    if "state_sha256" not in state:
        return state
    rest = {k: v for k, v in state.items() if k != "state_sha256"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return {**rest, "state_sha256": hashlib.sha256(canonical.encode()).hexdigest()}


def edit_state(ckpt: Path, change: Callable[[dict[str, Any]], None], *, sign: bool) -> None:
    """Change checkpoint ``ckpt``'s state.json in place; re-sign it if ``sign``."""
    state = json.loads((ckpt / STATE_FILE).read_text())
    change(state)
    (ckpt / STATE_FILE).write_text(json.dumps(resign(state) if sign else state))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults")
    (path / "data.txt").write_text(corpus(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run12(work: Path) -> Path:
    """A complete training run: checkpoints after 4, 8 and 12 updates, metrics, run.json."""
    out = work / "run12"
    assert (
        main(
            ["train", "--data", str(work / "data.txt"), "--steps", "12", *TRAIN, "--out", str(out)]
        )
        == 0
    )
    assert [p.name for p in sorted(out.glob("step_*"))] == [
        "step_000004",
        "step_000008",
        "step_000012",
    ]
    return out


@pytest.fixture()
def run_copy(run12: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run12, tmp_path / "run"))


@pytest.fixture(scope="module")
def weights(run12: Path, work: Path) -> Path:
    return export_weights(run12, work / "weights.safetensors")


# ---- finding 1: --out deletes whatever is there ----------------------------------------


def test_import_never_deletes_a_foreign_directory(weights: Path, tmp_path: Path, capsys) -> None:
    """Finding 1: `import --out DIR` wiped a folder holding an unrelated thesis.txt."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    before = snapshot(folder)
    for force in ([], ["--force"]):  # not even --force deletes what nn-core did not write
        code, _, err = run_main(["import", weights, "--out", folder, *force], capsys)
        assert code == 2
        one_error_line(err, str(folder), "thesis.txt", "never deletes")
        assert snapshot(folder) == before


def test_import_refuses_to_replace_a_training_run(
    weights: Path, run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 1: `import --out RUN` replaced a complete run (three checkpoints, metrics,
    run.json) and exited 0; now refused, replaced only with --force."""
    before = snapshot(run_copy)
    code, _, err = run_main(["import", weights, "--out", run_copy], capsys)
    assert code == 2
    one_error_line(err, str(run_copy), "run directory", "--force")
    assert snapshot(run_copy) == before
    code, _, err = run_main(["import", weights, "--out", run_copy, "--force"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in run_copy.iterdir()) == [MODEL_FILE, STATE_FILE]
    assert not [p for p in run_copy.parent.iterdir() if ".old-" in p.name]  # nothing left over


def test_save_functions_refuse_what_they_do_not_own(run_copy: Path, tmp_path: Path) -> None:
    """Finding 1: MoETransformer.save, save_model, Trainer.save and import_weights moved
    any existing target aside and deleted it."""
    model = MoETransformer(SMALL_CONFIG, seed=1)
    trainer = Trainer(model, TrainConfig(total_steps=10, warmup_steps=1))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    a_file = tmp_path / "plain.txt"
    a_file.write_text("mine too")
    for target in (foreign, a_file):
        before = snapshot(tmp_path)
        for save in (
            lambda p, o: save_model(model, p, overwrite=o),
            lambda p, o: trainer.save(p, overwrite=o),
        ):
            for overwrite in (False, True):
                with pytest.raises(ValueError, match="refusing"):
                    save(target, overwrite)
        assert snapshot(tmp_path) == before
    # an nn-core directory of another kind: only with overwrite=True
    before = snapshot(run_copy)
    with pytest.raises(ValueError, match="run directory.*overwrite=True"):
        save_model(model, run_copy)
    with pytest.raises(ValueError, match="overwrite=True"):
        trainer.save(save_model(model, tmp_path / "model_dir"))
    assert snapshot(run_copy) == before
    save_model(model, run_copy, overwrite=True)
    assert np.array_equal(load_model(run_copy).flat_params, model.flat_params)
    # the same kind is replaced (atomically) without asking
    other = MoETransformer(SMALL_CONFIG, seed=2)
    save_model(other, tmp_path / "model_dir")
    assert np.array_equal(load_model(tmp_path / "model_dir").flat_params, other.flat_params)


def test_export_never_overwrites_another_file_and_never_creates_parents(
    run12: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 1: `export --out existing.txt` overwrote silently; `export --out
    /nonexistent/x.safetensors` created /nonexistent/."""
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    code, _, err = run_main(["export", "--checkpoint", run12, "--out", existing], capsys)
    assert code == 2
    one_error_line(err, str(existing), "--force")
    assert existing.read_text() == "keep me"
    missing = tmp_path / "nonexistent" / "x.safetensors"
    code, _, err = run_main(["export", "--checkpoint", run12, "--out", missing], capsys)
    assert code == 2
    one_error_line(err, "does not exist")
    assert not missing.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.txt"]  # no temp left
    code, _, err = run_main(["export", "--checkpoint", run12, "--out", existing, "--force"], capsys)
    assert code == 0, err
    assert np.array_equal(
        import_weights_model(existing, tmp_path / "back").flat_params, load_model(run12).flat_params
    )


def test_train_never_creates_parents_and_checks_its_output_before_training(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 1 (parents created behind the user's back): `train --out a/b/run` created
    a/ and a/b/. Now it fails at once, before loading data or training; a plain file in
    the way is refused too."""
    out = tmp_path / "typo" / "run"
    argv = ["train", "--data", work / "data.txt", "--steps", "4", *TRAIN]
    code, stdout, err = run_main([*argv, "--out", out], capsys)
    assert code == 2 and stdout == ""
    one_error_line(err, "does not exist")
    (tmp_path / "notes").write_text("mine")
    code, stdout, err = run_main([*argv, "--out", tmp_path / "notes", "--force"], capsys)
    assert code == 2 and stdout == ""
    one_error_line(err, "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    assert (tmp_path / "notes").read_text() == "mine"


def import_weights_model(file: Path, out: Path) -> MoETransformer:
    return load_model(import_weights(file, out))


@pytest.mark.parametrize("out", [".", "..", "sub/.."])
def test_import_into_the_current_directory_fails_cleanly(
    out: str,
    weights: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Finding 1: `import --out .` failed but left a `..old-*` directory behind."""
    cwd = tmp_path / "parent" / "cwd"
    (cwd / "sub").mkdir(parents=True)
    (cwd / "mine.txt").write_text("x")
    monkeypatch.chdir(cwd)
    before = snapshot(tmp_path)
    code, _, err = run_main(["import", weights, "--out", out], capsys)
    assert code == 2
    one_error_line(err, "current directory")
    assert snapshot(tmp_path) == before


def test_a_step_directory_nn_core_did_not_write_is_never_pruned(tmp_path: Path) -> None:
    """Finding 1 (deleting what is not ours): pruning old checkpoints removed any
    directory named step_XXXXXX in the run directory, whatever it held."""
    run = tmp_path / "run"
    trainer = Trainer(
        MoETransformer(SMALL_CONFIG, seed=1),
        TrainConfig(batch_size=2, seq_len=8, total_steps=10, warmup_steps=1, keep_checkpoints=1),
    )
    batch = (np.arange(16).reshape(2, 8), np.arange(1, 17).reshape(2, 8))  # [B, S] each
    trainer.fit(lambda: batch, 1, checkpoint_dir=run, progress=False)
    mine = run / "step_000000"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a checkpoint")
    trainer.fit(lambda: batch, 2, checkpoint_dir=run, progress=False)
    assert (mine / "notes.txt").read_text() == "not a checkpoint"
    assert latest_checkpoint(run).name == "step_000003"


# ---- finding 2: no lock on a run directory ---------------------------------------------


def test_second_writer_exits_1_naming_the_holder_and_kill_9_leaves_no_stale_lock(
    work: Path, tmp_path: Path
) -> None:
    """Finding 2: two `nn-core train` on the same run directory both ran and exited 0,
    one overwriting the other's checkpoints. Now the second exits 1 at once naming the
    directory and the holder's pid; after the holder is killed with SIGKILL, the run
    resumes (the lock died with the process)."""
    run = tmp_path / "run"
    data = work / "data.txt"
    holder = subprocess.Popen(
        [sys.executable, "-m", "nn_core", "train", "--data", str(data), "--steps", "100000"]
        + [*TRAIN, "--checkpoint-interval", "2", "--out", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "latest").is_file():  # the holder is training and has checkpointed
            assert holder.poll() is None and time.monotonic() < deadline, "holder did not start"
            time.sleep(0.05)
        for argv in (
            ["train", "--resume", "--out", run, "--stop-at", "1"],
            ["train", "--data", data, "--steps", "6", *TRAIN, "--out", run, "--force"],
        ):
            second = nn_core(*argv, cwd=tmp_path)
            assert second.returncode == 1, second.stderr
            one_error_line(second.stderr, str(run), f"pid {holder.pid}")
        assert holder.poll() is None  # the holder was not disturbed
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    step = int(latest_checkpoint(run).name.split("_")[1])
    resumed = nn_core(
        "train", "--resume", "--out", run, "--stop-at", step + 2, "--quiet", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    assert load_training_checkpoint(run).state["step"] == step + 2


def test_default_run_directories_started_in_the_same_second_do_not_collide(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Finding 2: two plain `nn-core train` started in the same second shared one
    timestamped directory; now the second gets its own (runs/NAME-2)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "20261126-120000")
    for seed in ("1", "2"):
        argv = ["train", "--data", work / "data.txt", "--steps", "4", *TRAIN, "--seed", seed]
        code, _, err = run_main(argv, capsys)
        assert code == 0, err
    runs = sorted((tmp_path / "runs").iterdir())
    assert [p.name for p in runs] == ["tiny-20261126-120000", "tiny-20261126-120000-2"]
    for run, seed in zip(runs, (1, 2)):  # each run.json agrees with its own checkpoint
        info = json.loads((run / "run.json").read_text())
        assert info["train_config"]["seed"] == seed
        assert load_training_checkpoint(run).state["train_config"]["seed"] == seed


def test_a_second_trainer_thread_cannot_write_into_a_run_being_written(tmp_path: Path) -> None:
    """Finding 2 (library): Trainer.fit held no lock, so two trainers could interleave
    checkpoints and metrics in one run directory."""
    run = tmp_path / "run"
    cfg = TrainConfig(batch_size=2, seq_len=8, total_steps=10, warmup_steps=1)
    batch = (np.arange(16).reshape(2, 8), np.arange(1, 17).reshape(2, 8))  # [B, S] each
    inside, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow_batches() -> tuple[np.ndarray, np.ndarray]:
        inside.set()  # fit is running: the run directory is held
        assert release.wait(60)
        return batch

    def first() -> None:
        try:
            Trainer(MoETransformer(SMALL_CONFIG, seed=1), cfg).fit(
                slow_batches, 1, checkpoint_dir=run, progress=False
            )
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert inside.wait(60)
        other = Trainer(MoETransformer(SMALL_CONFIG, seed=2), cfg)
        with pytest.raises(RuntimeError, match="being written by another"):
            other.save_checkpoint(run)
        with pytest.raises(RuntimeError, match="being written by another"):
            other.fit(lambda: batch, 1, checkpoint_dir=run, progress=False)
    finally:
        release.set()
        thread.join()
    assert not errors
    assert load_training_checkpoint(run).state["step"] == 1
    assert np.array_equal(load_model(run).flat_params, load_model(run / "step_000001").flat_params)


# ---- finding 3: tracebacks where one line is promised ----------------------------------


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Any:
    """A 6 MiB tmpfs (needs root: CAP_SYS_ADMIN), unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs, and mounting one needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path, leave: int) -> Path:
    """Fill ``directory``'s filesystem up to ``leave`` free bytes with one file."""
    filler = directory / "filler"
    vfs = os.statvfs(directory)
    size = vfs.f_bavail * vfs.f_frsize - leave
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 20)
        while size > 0:
            size -= f.write(chunk[: min(size, len(chunk))])
    return filler


def test_disk_full_during_save_is_one_line_and_the_run_resumes_bit_for_bit(
    work: Path, tmpfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 3: a full disk during a checkpoint save ended in a traceback
    (safetensors' SafetensorError is not an OSError). Now: one line, exit 1; the previous
    checkpoint still loads, and resuming from it continues bit for bit."""
    data = work / "data.txt"
    straight = tmp_path / "straight"
    code, _, err = run_main(
        ["train", "--data", data, "--steps", "8", *TRAIN, "--out", straight], capsys
    )
    assert code == 0, err
    run = tmpfs / "run"
    code, _, err = run_main(
        ["train", "--data", data, "--steps", "8", "--stop-at", "4", *TRAIN, "--out", run], capsys
    )
    assert code == 0, err
    assert latest_checkpoint(run).name == "step_000004"
    before = snapshot(run / "step_000004")
    filler = fill(tmpfs, leave=64 << 10)  # room for metrics lines, not for a checkpoint
    full = nn_core("train", "--resume", "--out", run, "--stop-at", "8", "--quiet", cwd=tmp_path)
    assert full.returncode == 1
    one_error_line(full.stderr, "No space left on device", "step_000008")
    assert latest_checkpoint(run).name == "step_000004"
    assert snapshot(run / "step_000004") == before
    assert load_training_checkpoint(run).state["step"] == 4
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]  # the half save is gone
    filler.unlink()
    code, _, err = run_main(
        ["train", "--resume", "--out", run, "--stop-at", "8", "--quiet"], capsys
    )
    assert code == 0, err
    a, b = load_training_checkpoint(straight), load_training_checkpoint(run)
    assert b.state["step"] == 8
    assert np.array_equal(a.model.flat_params, b.model.flat_params)  # bitwise
    assert np.array_equal(a.m, b.m) and np.array_equal(a.v, b.v)
    assert a.state["data_state"] == b.state["data_state"]
    losses = [
        [json.loads(line)["loss"] for line in (p / "metrics.jsonl").read_text().splitlines()]
        for p in (straight, run)
    ]
    assert losses[0] == losses[1]


MALFORMED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "bytes as a string": lambda s: s["files"][MODEL_FILE].update(bytes="1234"),
    "bad __ndarray__ tag": lambda s: s["data_state"].update(
        extra={"__ndarray__": [1, 2], "dtype": "float33", "shape": [2]}
    ),
    "step as a string": lambda s: s.update(step="12"),
    "data_state as a string": lambda s: s.update(data_state="start"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_state_json_is_one_line_never_a_traceback(
    case: str, run_copy: Path, tmp_path: Path
) -> None:
    """Finding 3: a malformed state.json ended in a traceback (bytes as a string, a bad
    __ndarray__ tag, data_state not an object) or, with step as a string, resumed
    silently. Consistent (re-signed) edits reach every check."""
    edit_state(run_copy / "step_000012", MALFORMED[case], sign=True)
    done = nn_core("train", "--resume", "--out", run_copy, "--quiet", cwd=tmp_path)
    assert done.returncode == 1
    one_error_line(done.stderr, "state.json")


def test_deeply_nested_state_json_and_a_binary_latest_are_one_line(
    run_copy: Path, tmp_path: Path
) -> None:
    """Finding 3: 100k-deep nesting in state.json raised RecursionError; a `latest`
    holding bytes that are not text raised UnicodeDecodeError."""
    (run_copy / "step_000012" / STATE_FILE).write_text("[" * 100_000 + "]" * 100_000)
    done = nn_core("generate", "--checkpoint", run_copy, "--prompt", "x", cwd=tmp_path)
    assert done.returncode == 1
    one_error_line(done.stderr, "nested too deeply")
    (run_copy / "latest").write_bytes(b"\xff\xfe\x00step")
    done = nn_core("info", "--checkpoint", run_copy, cwd=tmp_path)
    assert done.returncode == 1
    one_error_line(done.stderr, "latest", "step_000008")  # step_000012 is broken: the next


def test_undecodable_prompt_is_a_usage_error(run12: Path, tmp_path: Path) -> None:
    """Finding 3: an invalid UTF-8 byte in --prompt (a surrogate escape in argv) ended in
    UnicodeEncodeError."""
    done = nn_core("generate", "--checkpoint", run12, "--prompt", b"def \xff(", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    one_error_line(done.stderr, "--prompt", "UTF-8", "0xff")


def test_bad_scheduler_address_is_a_usage_error(run12: Path, work: Path) -> None:
    """Finding 3: `evaluate --scheduler garbage` ended in a ValueError traceback."""
    pytest.importorskip("distributed")
    done = nn_core(
        "evaluate",
        "--checkpoint",
        run12,
        "--data",
        work / "data.txt",
        "--scheduler",
        "garbage",
        cwd=work,
    )
    assert done.returncode == 2
    one_error_line(done.stderr, "--scheduler", "garbage")


@pytest.mark.parametrize(
    "argv",
    [["info"], ["generate", "--stream", "--prompt", "def ", "--max-new-tokens", "20"]],
    ids=["info", "generate-stream"],
)
def test_broken_pipe_exits_quietly(argv: list[str], run12: Path, tmp_path: Path) -> None:
    """Finding 3: `nn-core info | head -1` and `generate --stream | head -c 10` printed
    "[Errno 32] Broken pipe" and exited 1. Now: no message, exit 141 (128 + SIGPIPE). The
    reader is gone before the first write (its end of the pipe is closed), so every run
    sees the broken pipe."""
    if argv[0] == "generate":
        argv = [argv[0], "--checkpoint", str(run12), *argv[1:]]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = nn_core(*argv, cwd=tmp_path, stdout=write_end)
    finally:
        os.close(write_end)
    assert done.returncode == EXIT_BROKEN_PIPE, done.stderr
    assert done.stderr == ""


# ---- finding 4: state.json is not verified ---------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("step", 11),
        ("step", 10**12),
        ("data_state.batches_drawn", -1),
        ("config.rope_base", 500.0),
        ("config.max_seq_len", 64),
    ],
)
def test_an_edited_state_json_is_rejected(field: str, value: Any, run_copy: Path) -> None:
    """Finding 4: editing step (12 -> 11, or 1e12), the data position (batches_drawn=-1),
    rope_base or max_seq_len in state.json loaded silently."""

    def change(state: dict[str, Any]) -> None:
        *path, last = field.split(".")
        node = state
        for key in path:
            node = node[key]
        node[last] = value

    ckpt = run_copy / "step_000012"
    edit_state(ckpt, change, sign=False)  # as a hand edit or a flipped bit would
    with pytest.raises(CheckpointError, match="state.json"):
        load_model(ckpt)
    with pytest.raises(CheckpointError, match="state.json"):
        load_training_checkpoint(run_copy)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update(step=-1), "step must be an int >= 0"),
        (lambda s: s.update(step=11), r"optimizer t \(12\) must equal step \(11\)"),
        (lambda s: s["optimizer"].update(t=True), "optimizer t"),
        (lambda s: s["rng_state"]["state"].update(inc=2), "PCG64"),
        (lambda s: s.update(saved_by="me"), "unexpected field"),
    ],
)
def test_every_field_is_range_checked_even_when_consistently_signed(
    change: Callable[[dict[str, Any]], Any], message: str, run_copy: Path
) -> None:
    """Finding 4: beyond the checksum, each field is range-checked (a consistent but
    wrong save, or a version-1 checkpoint, has no checksum to stop it)."""
    edit_state(run_copy / "step_000012", change, sign=True)
    with pytest.raises(CheckpointError, match=message):
        Trainer.resume(run_copy)


def test_the_data_position_is_checked_against_the_corpus(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 4: the data position (batches_drawn=-1) was accepted on resume; it must be
    >= 0, agree with the step, and the sampler's corpus must have the saved size."""
    cases = {
        "batches_drawn must be an int >= 0": lambda s: s["data_state"].update(batches_drawn=-1),
        "disagrees with the data position": lambda s: s["data_state"].update(batches_drawn=11),
        "n_tokens=": lambda s: s["data_state"].update(n_tokens=s["data_state"]["n_tokens"] + 1),
    }
    ckpt = run_copy / "step_000012"
    good = (ckpt / STATE_FILE).read_text()
    for message, change in cases.items():
        (ckpt / STATE_FILE).write_text(good)
        edit_state(ckpt, change, sign=True)
        code, out, err = run_main(["train", "--resume", "--out", run_copy, "--quiet"], capsys)
        assert code == 1 and "resuming" not in out
        one_error_line(err, message)


def test_a_version_1_checkpoint_still_loads_and_resumes(tmp_path: Path) -> None:
    """Finding 4 (compatibility): checkpoints written before state.json had a checksum
    (format 1, tests/fixtures/v1_run, written by nn-core at b232fd8) still load and resume
    exactly, and every range check applies to them."""
    v1 = Path(shutil.copytree(FIXTURES / "v1_run", tmp_path / "v1"))
    ckpt = load_training_checkpoint(v1)
    assert ckpt.state["format_version"] == 1 and ckpt.state["step"] == 2

    def sampler() -> BatchSampler:
        return BatchSampler(np.arange(200) % 32, 2, 8, seed=0)  # seed replaced by the state

    old = Trainer.resume(v1, data_source=(s_old := sampler()))
    v2 = tmp_path / "v2"
    old.save(v2)  # the same state in format 2
    assert json.loads((v2 / STATE_FILE).read_text())["format_version"] == 2
    new = Trainer.resume(v2, data_source=(s_new := sampler()))
    a = old.fit(s_old, 3, progress=False)
    b = new.fit(s_new, 3, progress=False)
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert np.array_equal(old.model.flat_params, new.model.flat_params)
    edit_state(v1 / "step_000002", lambda s: s.update(step=-1), sign=False)
    with pytest.raises(CheckpointError, match="step must be an int >= 0"):
        load_training_checkpoint(v1)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
    # small and absurd ints; not 1e5..1e10, which are valid sizes that only take long
    | st.one_of(st.integers(-5, 5000), st.sampled_from([-(2**63), 2**63, 2**64 + 1, 10**30])),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def json_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a parsed JSON document (dict keys and list indices)."""
    paths = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            paths += json_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            paths += json_paths(value, (*prefix, i))
    return paths


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    v1 = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(FIXTURES / "v1_run", v1)
    trainer = Trainer.resume(v1, data_source=BatchSampler(np.arange(200) % 32, 2, 8, seed=0))
    trainer.save(v1 / "step_000002")  # the same checkpoint in today's format (2: signed)
    return v1


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_malformed_state_json_of_any_shape_is_a_checkpoint_error(fuzz_run: Path, data: Any) -> None:
    """Finding 3/4: any JSON value at any place of state.json (re-signed, so it reaches
    the field checks) is either a valid checkpoint or a CheckpointError -- never a
    TypeError, KeyError, RecursionError, MemoryError or a silent wrong load."""
    ckpt = fuzz_run / "step_000002"
    good = (ckpt / STATE_FILE).read_text()
    state = json.loads(good)
    path = data.draw(st.sampled_from(json_paths(state)))
    value = data.draw(JSON)
    node = state
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    try:
        (ckpt / STATE_FILE).write_text(json.dumps(resign(state)))
        sampler = BatchSampler(np.arange(200) % 32, 2, 8, seed=0)
        try:
            trainer = Trainer.resume(fuzz_run, data_source=sampler)
        except CheckpointError:
            return
        # accepted: then it is a well-formed state that trains on
        assert trainer.step == trainer.optimizer.t >= 0
        assert sampler.batches_drawn >= 0
    finally:
        (ckpt / STATE_FILE).write_text(good)


# ---- finding 5: tensor files created 0600 ----------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_written_follows_the_umask(
    umask: int, work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 5: safetensors' save_file created tensor files 0600 while everything else
    got the umask's mode; the old test checked only the directory. Each file is checked."""
    old = os.umask(umask)
    try:
        run = tmp_path / "run"
        argv = ["train", "--data", work / "data.txt", "--steps", "4", *TRAIN, "--out", run]
        code, _, err = run_main([*argv[:-2], "--sample-tokens", "4", *argv[-2:]], capsys)
        assert code == 0, err
        code, _, err = run_main(
            ["export", "--checkpoint", run, "--out", tmp_path / "w.safetensors"], capsys
        )
        assert code == 0, err
        code, _, err = run_main(
            ["import", tmp_path / "w.safetensors", "--out", tmp_path / "m"], capsys
        )
        assert code == 0, err
    finally:
        os.umask(old)
    paths = sorted(tmp_path.rglob("*"))
    names = {p.name for p in paths}
    for expected in (MODEL_FILE, "optimizer.safetensors", "w.safetensors", "loss_curve.png"):
        assert expected in names
    for path in paths:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, (path, oct(path.stat().st_mode))


# ---- finding 6: loss_and_grad from several threads -------------------------------------


def test_gradients_from_a_second_thread_raise_instead_of_mixing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding 6: two threads calling loss_and_grad on one model silently got wrong
    gradients (one shared buffer). Now the second call raises at once, the first one's
    gradient is exact, and forwards still run concurrently. Deterministic: the first
    call is held inside its backward until the second has been refused."""
    model = MoETransformer(SMALL_CONFIG, seed=4, dtype=np.float64)
    rng = np.random.default_rng(0)
    ids, tgt = rng.integers(0, 1000, (2, 8)), rng.integers(0, 1000, (2, 8))  # [B, S]
    model.loss_and_grad(ids, tgt)
    expected = model.flat_grads.copy()  # [P]
    inside, release = threading.Event(), threading.Event()
    backward = model._backward
    results: list[Any] = []

    def held_backward(*args: Any) -> None:
        if threading.current_thread() is worker:
            inside.set()
            assert release.wait(60)
        backward(*args)

    monkeypatch.setattr(model, "_backward", held_backward)
    worker = threading.Thread(target=lambda: results.append(model.loss_and_grad(ids, tgt)))
    worker.start()
    try:
        assert inside.wait(60)
        with pytest.raises(RuntimeError, match="one model per thread"):
            model.loss_and_grad(tgt, ids)
        with pytest.raises(RuntimeError, match="one model per thread"):
            model.loss_terms_and_grad(tgt, ids)
        assert model.forward(ids).shape == (2, 8, 1000)  # forwards share the model
    finally:
        release.set()
        worker.join()
    assert len(results) == 1
    assert np.array_equal(model.flat_grads, expected)
    model.loss_and_grad(tgt, ids)  # free again afterwards


# ---- finding 7: latest, --steps, bench --out, reproducible bytes ------------------------


def test_a_broken_latest_names_the_newest_loadable_checkpoint(
    run_copy: Path, tmp_path: Path
) -> None:
    """Finding 7: a corrupted `latest` with older good checkpoints beside it gave no hint."""
    (run_copy / "latest").write_text("step_000099\n")  # dangling
    done = nn_core("generate", "--checkpoint", run_copy, "--prompt", "x", cwd=tmp_path)
    assert done.returncode == 1
    one_error_line(done.stderr, "step_000099", str(run_copy / "step_000012"))
    (run_copy / "latest").write_text("step_000012\n")
    flip_byte(run_copy / "step_000012" / MODEL_FILE)  # latest names a corrupt checkpoint
    done = nn_core("train", "--resume", "--out", run_copy, "--quiet", cwd=tmp_path)
    assert done.returncode == 1
    one_error_line(done.stderr, "SHA-256", str(run_copy / "step_000008"), "echo step_000008")


def test_resume_with_steps_below_the_current_step_is_a_usage_error(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 7: `--resume --steps 4` at step 12 printed "resuming at step 12 of 4"."""
    before = snapshot(run_copy)
    code, out, err = run_main(["train", "--resume", "--out", run_copy, "--steps", "4"], capsys)
    assert code == 2
    one_error_line(err, "--steps (4)", "current step 12")
    assert "resuming" not in out
    assert snapshot(run_copy).keys() == before.keys()


def test_bench_out_in_a_missing_directory_fails_before_the_benchmark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 7: `bench --out missing_dir/x.json` failed only after the whole benchmark."""
    import nn_core.bench.runner as runner

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the benchmark ran although --out cannot be written")

    monkeypatch.setattr(runner, "run_benchmark", must_not_run)
    out = tmp_path / "missing_dir" / "x.json"
    code, _, err = run_main(["bench", "--out", out, "--scenario", "kernel_matmul"], capsys)
    assert code == 2
    assert "missing_dir" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.parent.exists()


def test_identical_runs_write_identical_checkpoint_bytes(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 7: checkpoint bytes differed between identical runs (metadata key order,
    a saved_at time), so runs could not be compared by hash."""
    digests = []
    for name in ("a", "b"):
        run = tmp_path / name
        argv = ["train", "--data", work / "data.txt", "--steps", "8", *TRAIN, "--out", run]
        code, _, err = run_main(argv, capsys)
        assert code == 0, err
        files = sorted(run.glob("step_*/*"))
        assert len(files) == 6
        digests.append(
            {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
        )
        time.sleep(1.0)  # a timestamp with one-second resolution would now differ
    assert digests[0] == digests[1]
    model = MoETransformer(SMALL_CONFIG, seed=5)
    one, two = save_model(model, tmp_path / "one"), save_model(model, tmp_path / "two")
    for name in (MODEL_FILE, STATE_FILE):
        assert (one / name).read_bytes() == (two / name).read_bytes()
