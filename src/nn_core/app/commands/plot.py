"""``nn-core plot RUN_DIR``: a run's plots as PNGs in RUN_DIR/plots/."""

from __future__ import annotations

import argparse
from typing import Any

from ..options import UsageError, say


def add(sub: Any) -> None:
    p = sub.add_parser(
        "plot",
        help="write a run's plots (loss, learning rate, expert load) to RUN_DIR/plots",
        description="Draw a run's metrics.jsonl into RUN_DIR/plots/: loss.png (train and "
        "validation cross-entropy), lr.png (learning rate) and expert_load_layer_L.png (each "
        "layer's expert load per update, a heatmap). plots/ holds only nn-core's PNGs; "
        "anything else there is refused. The run is locked while plotting.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="an nn-core run directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..plots import plot_run
    from ..run_dir import METRICS_FILE, RunDir

    with RunDir.open_any(args.run_dir) as run_dir:  # one writer per run directory
        metrics = run_dir.read_metrics()
        if not metrics:
            raise UsageError(f"{run_dir.file(METRICS_FILE)} holds no records: nothing to plot")
        files = plot_run(metrics, run_dir.plots_dir(), title=f"nn-core run {run_dir.path.name}")
    for path in files:
        say(str(path))
    return 0
