"""``nn-core convergence``: the suite's convergence check, as JSON and a PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ...errors import OutputError
from ..options import nonneg_int, pos_int, say

RESULT_FILES = ("convergence.json", "convergence.png")


def add(sub: Any) -> None:
    p = sub.add_parser(
        "convergence",
        help="the suite's convergence check (tiny config, fixed batch, 1000 steps)",
        description="Train the tiny config on the suite's fixed 2 x 8 batch and write "
        "DIR/convergence.json (the loss of every update) and DIR/convergence.png. Exit "
        "status 1 if the last loss is not below the target.",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="directory for convergence.json/.png: absent (its parent must exist), empty, "
        "or holding an earlier result (replaced)",
    )
    p.add_argument("--steps", type=pos_int, default=1000, help="updates to run (default 1000)")
    p.add_argument("--seed", type=nonneg_int, default=42, help="model seed (default 42)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def check_out(out: Path) -> None:
    """DIR absent (parent existing), empty, or holding only an earlier result of ours."""
    from ...storage.ownership import check_not_cwd, check_parent

    check_not_cwd(out)
    if not out.exists():
        check_parent(out)
        return
    if not out.is_dir():
        raise OutputError(f"--out {out} is not a directory; refusing to touch it")
    other = sorted(p.name for p in out.iterdir() if p.name not in RESULT_FILES)
    if other:
        raise OutputError(
            f"--out {out} holds files a convergence run does not write ({', '.join(other[:3])}); "
            "refusing to write there"
        )
    previous = out / RESULT_FILES[0]
    if previous.exists():
        try:
            ours = json.loads(previous.read_text(encoding="utf-8")).get("library") == "nn-core"
        except (OSError, ValueError, AttributeError, RecursionError):
            ours = False
        if not ours:
            raise OutputError(f"{previous} was not written by nn-core; refusing to replace it")


def run(args: argparse.Namespace) -> int:
    from ...storage.checkpoint import atomic_write_file
    from ...training.convergence import TARGET_LOSS, run_convergence
    from ..plots import plot_convergence

    out = Path(args.out)
    check_out(out)
    losses = run_convergence(args.steps, seed=args.seed, progress=not args.quiet)
    out.mkdir(exist_ok=True)
    json_path, png_path = (out / name for name in RESULT_FILES)
    doc = {
        "language": "python",
        "library": "nn-core",
        "steps": len(losses),
        "losses": [float(x) for x in losses],
    }
    text = json.dumps(doc) + "\n"
    atomic_write_file(json_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    plot_convergence(losses, png_path, TARGET_LOSS)
    ok = losses[-1] < TARGET_LOSS
    say(
        f"convergence: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps "
        f"({'below' if ok else 'NOT below'} {TARGET_LOSS}); wrote {json_path} and {png_path}"
    )
    return 0 if ok else 1
