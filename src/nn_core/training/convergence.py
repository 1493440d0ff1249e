"""The suite's convergence check (SPEC.md section 3), shared by all four languages.

Tiny config, float32, seed 42; one fixed batch B x S = 2 x 8 with inputs i mod 1000
and targets (i + 1) mod 1000 for i = 0..15; AdamW lr 1e-3, warmup 10, total_steps
1200, grad_clip 1.0, aux_loss_weight 0.01, weight_decay 0.1; 1000 updates. The
recorded loss of update t is the total loss (CE + aux) of the batch before update t.

    python -m nn_core.training.convergence --out DIR

writes DIR/convergence.json ({"language": "python", "steps": 1000, "losses": [...]})
and DIR/convergence.png (the curve, log scale). Exit status 1 if the final loss is not
below 0.05.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..model.config import Config
from .config import TrainConfig
from .trainer import Trainer

TARGET_LOSS = 0.05  # the check passes when the last loss is below this


def convergence_batch(vocab_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """inputs [2, 8] = i mod V and targets [2, 8] = (i + 1) mod V for i = 0..15."""
    i = np.arange(16, dtype=np.int64).reshape(2, 8)  # [B, S]
    return i % vocab_size, (i + 1) % vocab_size


def convergence_train_config() -> TrainConfig:
    return TrainConfig(
        batch_size=2,
        seq_len=8,
        lr=1e-3,
        warmup_steps=10,
        total_steps=1200,
        grad_clip=1.0,
        aux_loss_weight=0.01,
        weight_decay=0.1,
        seed=42,
    )


def run_convergence(
    steps: int = 1000,
    *,
    seed: int = 42,
    dtype: object = np.float32,
    progress: bool = False,
    blas_threads: int | None = 1,
) -> list[float]:
    """The per-update total losses of the convergence check (``steps`` updates).

    ``blas_threads`` caps the BLAS pool (threadpoolctl) during the run: tiny matrices
    are faster on one thread; None leaves it as it is.
    """
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    from ..model.transformer import MoETransformer

    model = MoETransformer(Config.tiny(), seed=seed, dtype=dtype)
    trainer = Trainer(model, convergence_train_config())
    inputs, targets = convergence_batch(model.config.vocab_size)
    limit = nullcontext() if blas_threads is None else threadpool_limits(blas_threads)
    with limit:
        history = trainer.fit(lambda: (inputs, targets), steps, progress=progress)
    return [m["loss"] for m in history]


def write_results(out_dir: str | Path, losses: Sequence[float]) -> tuple[Path, Path]:
    """DIR/convergence.json and DIR/convergence.png for a loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "convergence.json", out / "convergence.png"
    doc = {"language": "python", "steps": len(losses), "losses": [float(x) for x in losses]}
    json_path.write_text(json.dumps(doc) + "\n", encoding="utf-8")

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.semilogy(np.arange(len(losses)), losses, lw=1.2, color="tab:blue", label="total loss")
    ax.axhline(TARGET_LOSS, color="tab:red", ls="--", lw=0.8, label=f"target {TARGET_LOSS}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (CE + aux), log scale")
    start, end = (losses[0], losses[-1]) if len(losses) else (float("nan"), float("nan"))
    ax.set_title(
        f"nn-core (Python) convergence check: tiny config, fixed 2x8 batch\n"
        f"{len(losses)} steps, lr 1e-3: loss {start:.3f} -> {end:.4f}"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return json_path, png_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nn_core.training.convergence",
        description="Run the suite's convergence check (SPEC.md section 3).",
    )
    parser.add_argument("--out", required=True, help="directory for convergence.json/.png")
    parser.add_argument("--steps", type=int, default=1000, help="updates to run (default 1000)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    losses = run_convergence(args.steps, progress=not args.quiet)
    json_path, png_path = write_results(args.out, losses)
    ok = losses[-1] < TARGET_LOSS
    print(
        f"convergence: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps "
        f"({'below' if ok else 'NOT below'} {TARGET_LOSS}); wrote {json_path} and {png_path}",
        file=sys.stderr,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
