"""``nn-core info``: a config (or a checkpoint's), its parameter counts, the runtime."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ...model.config import Config, resolve_config
from ..options import UsageError, human, say


def add(sub: Any) -> None:
    p = sub.add_parser(
        "info",
        help="config, parameter counts, BLAS library and threads, versions",
        description="Show a config (or a checkpoint's), its parameter counts and the runtime.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--config",
        metavar="NAME|FILE",
        help="preset (tiny, small, default_6_9b) or .toml/.json file",
    )
    src.add_argument(
        "--checkpoint", metavar="DIR", help="show the config of this checkpoint / run directory"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ...bench.metadata import runtime_info

    extra: dict[str, Any] = {}
    if args.checkpoint is not None:
        from ...storage.checkpoint import read_state, resolve_checkpoint

        if args.set:
            raise UsageError("--set applies to --config, not to --checkpoint")
        ckpt = resolve_checkpoint(args.checkpoint)
        state = read_state(ckpt)  # verified: its checksum, every field's type and range
        cfg = Config.from_dict(state["config"])
        name = str(ckpt)
        extra = {"checkpoint": str(ckpt), "kind": state.get("kind"), "dtype": state.get("dtype")}
        if "step" in state:
            extra["step"] = state["step"]
    else:
        cfg, name = resolve_config(args.config, args.set)
    total, active = cfg.total_params(), cfg.active_params()
    doc = {
        "config_name": name,
        "config": cfg.to_dict(),
        **extra,
        "total_params": total,
        "active_params": active,
        "float32_weights_bytes": 4 * total,
        "runtime": runtime_info(),
    }
    if args.json:
        say(json.dumps(doc, indent=2))
        return 0
    say(f"config: {name}")
    for key, value in extra.items():
        say(f"  {key}: {value}")
    for key, value in cfg.to_dict().items():
        say(f"  {key:<15} {value}")
    say(
        f"parameters: {total:,} total ({human(total)}), {active:,} active per token "
        f"({human(active)}); float32 weights {4 * total / 2**20:,.1f} MiB"
    )
    rt = doc["runtime"]
    say(
        f"nn-core {rt['nn_core']}, Python {rt['python']}, NumPy {rt['numpy']}, "
        f"numba {rt['numba'] or 'not installed'}; {rt['cpu_count']} CPUs; {rt['platform']}"
    )
    if not rt["blas"]:
        say("BLAS: none found by threadpoolctl")
    for lib in rt["blas"]:
        say(
            f"BLAS: {lib['api']} {lib['version']} ({lib['threading_layer']} threading, "
            f"{lib['architecture']}), {lib['num_threads']} threads: {lib['filepath']}"
        )
    return 0
