"""``nn-core evaluate``: loss and perplexity of a checkpoint on a text file, in parallel."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..options import UsageError, pos_int, say


def add(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="loss and perplexity of a checkpoint on a text file (parallel)",
        description="Mean cross-entropy over non-overlapping windows of a UTF-8 file "
        "(the run's tokenizer), spread over local worker processes or a Dask cluster.",
    )
    p.add_argument(
        "--checkpoint", required=True, help="run directory (uses its latest) or checkpoint dir"
    )
    p.add_argument(
        "--data",
        required=True,
        help="UTF-8 text file, directory of them (EOS between files) or prepared dataset",
    )
    p.add_argument("--seq-len", type=pos_int, default=64, help="window length (default 64)")
    p.add_argument("--batch-size", type=pos_int, default=16, help="windows per work unit")
    p.add_argument("--max-batches", type=pos_int, help="at most this many (evenly spread)")
    p.add_argument("--workers", type=pos_int, default=2, help="local processes (default 2)")
    p.add_argument(
        "--scheduler", help="Dask scheduler address (tcp://host:8786) instead of local processes"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..jobs import evaluate_file

    kwargs = dict(seq_len=args.seq_len, batch_size=args.batch_size, max_batches=args.max_batches)
    if args.scheduler is None:
        result = evaluate_file(args.checkpoint, args.data, workers=args.workers, **kwargs)
    else:
        try:
            from distributed import Client
        except ImportError:
            raise UsageError("--scheduler needs Dask: pip install 'nn-core[distributed]'") from None
        try:
            client = Client(args.scheduler)
        except ValueError as exc:  # a malformed address (no port, unknown scheme, ...)
            raise UsageError(
                f"--scheduler must be a Dask scheduler address like tcp://HOST:8786, got "
                f"{args.scheduler!r} ({exc})"
            ) from None
        except (OSError, TimeoutError) as exc:  # nobody answers there
            raise OSError(f"cannot reach the Dask scheduler {args.scheduler}: {exc}") from None
        with client:
            result = evaluate_file(
                args.checkpoint, args.data, executor=client.get_executor(), **kwargs
            )
    if args.json:
        say(json.dumps(result))
    else:
        say(
            f"loss {result['loss']:.4f} nats/token  perplexity {result['perplexity']:.2f}  "
            f"{result['bits_per_byte']:.4f} bits/byte  "
            f"({result['tokens']:,} tokens, {result['batches']} batches)"
        )
        say(format_experts(result["experts"]))
    return 0


def format_experts(experts: dict[str, Any]) -> str:
    """Expert telemetry as text: a line per layer (``nn_core.training.telemetry``)."""
    lines = []
    for i, load in enumerate(experts["load"]):
        ratio = experts["max_min"][i]
        lines.append(
            f"layer {i}: expert load {' '.join(f'{f:.1%}' for f in load)}  max/min "
            f"{'inf' if ratio is None else f'{ratio:.2f}'}  unused {experts['unused'][i]}  "
            f"router entropy {experts['entropy'][i]:.3f} nats"
        )
    return "\n".join(lines)
