"""The suite's convergence check and its command, ``nn-core convergence``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from timeouts import SUBPROCESS_TIMEOUT

from nn_core.app.cli import main as cli_main
from nn_core.training.convergence import convergence_batch, run_convergence


def main(argv: list[str]) -> int:
    return cli_main(["convergence", *argv])


def test_convergence_batch_is_the_spec_batch() -> None:
    inputs, targets = convergence_batch()
    assert inputs.shape == targets.shape == (2, 8)
    assert inputs.ravel().tolist() == list(range(16))
    assert targets.ravel().tolist() == list(range(1, 17))
    assert convergence_batch(10)[1].ravel().tolist() == [(i + 1) % 10 for i in range(16)]


def test_short_convergence_run_falls_steeply() -> None:
    losses = run_convergence(60)
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.4 * losses[0]
    assert losses == run_convergence(60)  # reproducible from the seed
    print(f"\nshort convergence: {losses[0]:.4f} -> {losses[-1]:.4f} in 60 steps")


def test_full_convergence_check_writes_json_and_plot(tmp_path: Path) -> None:
    """The real check: 1000 steps, the loss ends below 0.05 (about 8 s)."""
    assert main(["--out", str(tmp_path), "--quiet"]) == 0
    doc = json.loads((tmp_path / "convergence.json").read_text())
    assert set(doc) == {"language", "library", "steps", "losses"}
    assert doc["language"] == "python" and doc["steps"] == 1000 and len(doc["losses"]) == 1000
    losses = np.array(doc["losses"])
    assert 6.0 < losses[0] < 10.0  # about ln(1000) = 6.9 plus the random init's excess
    assert losses[-1] < 0.05
    assert (tmp_path / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"\nconvergence check: {losses[0]:.4f} -> {losses[-1]:.4f} in 1000 steps")


def test_cli_module_entry_and_exit_status(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nn_core",
            "convergence",
            "--out",
            str(tmp_path),
            "--steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert done.returncode == 1, done.stderr  # 2 steps cannot reach 0.05
    assert "NOT below 0.05" in done.stdout
    assert json.loads((tmp_path / "convergence.json").read_text())["steps"] == 2
    assert (tmp_path / "convergence.png").exists()
