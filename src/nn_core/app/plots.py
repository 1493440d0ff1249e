"""Every plot nn-core draws (matplotlib, Agg backend: no screen needed).

plot_loss_curve(metrics, png)       train and validation cross-entropy per update
plot_convergence(losses, png)       the suite's convergence check, log scale
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PathLike = str | os.PathLike[str]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, png_path: PathLike) -> Path:
    """Save atomically (a full disk leaves the old PNG whole) and close the figure."""
    from ..storage.checkpoint import atomic_write_file

    out = Path(png_path)
    fig.tight_layout()
    atomic_write_file(out, lambda tmp: fig.savefig(tmp, format="png"))
    _pyplot().close(fig)
    return out


def plot_loss_curve(
    metrics: Sequence[dict[str, Any]],
    png_path: PathLike,
    *,
    entropy: float | None = None,
    title: str = "nn-core training",
    final_val_ce: float | None = None,
) -> Path:
    """Train CE (raw and smoothed) and validation CE per update, from metrics.jsonl
    records, with the unigram entropy as a reference line."""
    plt = _pyplot()
    steps, train_ce, val_steps, val_ce = [], [], [], []
    for m in metrics:
        steps.append(m["step"] + 1)  # updates done after this one
        train_ce.append(m["ce"])
        if "val_ce" in m:
            val_steps.append(m["step"] + 1)
            val_ce.append(m["val_ce"])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if steps:
        ce = np.asarray(train_ce)
        ax.plot(steps, ce, color="tab:blue", alpha=0.25, lw=0.7, label="train (per batch)")
        # moving average over i-h..i+h, h growing from 0 to ~1/60 of the run (the steep
        # start is not smeared); cut off at the last step
        idx = np.arange(ce.size)
        half = np.minimum(max(1, ce.size // 60), idx // 4)
        lo, hi = idx - half, np.minimum(ce.size, idx + half + 1)
        csum = np.concatenate([[0.0], np.cumsum(ce)])
        smooth = (csum[hi] - csum[lo]) / (hi - lo)
        ax.plot(steps, smooth, color="tab:blue", lw=1.6, label="train (moving average)")
    if val_ce:
        ax.plot(val_steps, val_ce, "o-", color="tab:orange", lw=1.6, ms=4, label="validation")
    if final_val_ce is not None:
        label = f"final validation {final_val_ce:.3f}"
        ax.axhline(final_val_ce, color="tab:orange", ls=":", lw=1.0, label=label)
    if entropy is not None:
        ax.axhline(
            entropy, color="tab:red", ls="--", lw=1.0, label=f"unigram entropy {entropy:.3f}"
        )
    ax.set_xlabel("update")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, png_path)


def plot_convergence(losses: Sequence[float], png_path: PathLike, target: float) -> Path:
    """The convergence check's loss curve, log scale, with the target line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.semilogy(np.arange(len(losses)), losses, lw=1.2, color="tab:blue", label="total loss")
    ax.axhline(target, color="tab:red", ls="--", lw=0.8, label=f"target {target}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (CE + aux), log scale")
    start, end = (losses[0], losses[-1]) if len(losses) else (float("nan"), float("nan"))
    ax.set_title(
        f"nn-core (Python) convergence check: tiny config, fixed 2x8 batch\n"
        f"{len(losses)} steps, lr 1e-3: loss {start:.3f} -> {end:.4f}"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, png_path)
