"""Every plot nn-core draws (matplotlib, Agg backend: no screen needed).

plot_loss_curve(metrics, png)       train and validation cross-entropy per update
plot_convergence(losses, png)       the suite's convergence check, log scale
plot_lr(metrics, png)               the learning rate per update
plot_expert_load(metrics, l, png)   layer l's expert load over the updates, a heatmap
plot_run(metrics, plots_dir)        all of a run's plots (``nn-core plot``, end of train)
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


def plot_lr(metrics: Sequence[dict[str, Any]], png_path: PathLike) -> Path:
    """The learning rate of each update (warmup, then cosine), from metrics.jsonl records."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=120)
    ax.plot([m["step"] + 1 for m in metrics], [m["lr"] for m in metrics], color="tab:green")
    ax.set_xlabel("update")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate per update")
    ax.grid(True, alpha=0.3)
    return _save(fig, png_path)


def expert_load_matrix(metrics: Sequence[dict[str, Any]], layer: int) -> tuple[Any, Any]:
    """(steps [T], load [E, T]) of one layer from the records that hold "experts"."""
    rows = [m for m in metrics if "experts" in m]
    steps = np.array([m["step"] + 1 for m in rows], dtype=np.int64)  # [T]
    load = np.array([m["experts"]["load"][layer] for m in rows], dtype=np.float64).T  # [E, T]
    return steps, load


def plot_expert_load(metrics: Sequence[dict[str, Any]], layer: int, png_path: PathLike) -> Path:
    """Heatmap of layer ``layer``'s expert load over the updates: row e, column t is
    E * f_e at update t (the load as a multiple of the uniform share 1/E: 1 = balanced,
    0 = the expert got no token, E = it got every assignment)."""
    plt = _pyplot()
    steps, load = expert_load_matrix(metrics, layer)
    n_experts = load.shape[0]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.28 * n_experts), dpi=120)
    extent = (steps[0] - 0.5, steps[-1] + 0.5, n_experts - 0.5, -0.5)
    image = ax.imshow(
        load * n_experts,  # E f_e   [E, T]
        aspect="auto",
        interpolation="nearest",
        cmap="magma",
        vmin=0.0,
        vmax=max(2.0, float(np.max(load * n_experts))),
        extent=extent,
    )
    fig.colorbar(image, ax=ax, label="load / uniform share (E f_e)")
    ax.set_xlabel("update")
    ax.set_ylabel("expert")
    if n_experts <= 32:
        ax.set_yticks(range(n_experts))
    ax.set_title(f"layer {layer}: expert load per update (1 = uniform, 0 = unused)")
    return _save(fig, png_path)


def plot_run(
    metrics: Sequence[dict[str, Any]], plots_dir: PathLike, *, title: str = "nn-core training"
) -> list[Path]:
    """Every plot of a run into ``plots_dir`` (it must exist and be the run's to write):
    loss.png (train and validation), lr.png, and expert_load_layer_L.png per layer
    (from the records holding expert telemetry). Returns the files written."""
    out = Path(plots_dir)
    records = sorted(metrics, key=lambda m: m["step"])
    written = [plot_loss_curve(records, out / "loss.png", title=title)]
    if records:
        written.append(plot_lr(records, out / "lr.png"))
    with_experts = [m for m in records if "experts" in m]
    if with_experts:
        for layer in range(len(with_experts[0]["experts"]["load"])):
            png = out / f"expert_load_layer_{layer}.png"
            written.append(plot_expert_load(with_experts, layer, png))
    return written
