"""``nn-core experts``: each expert's load on a text and the tokens it takes most often."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ...errors import InputError
from ..options import UsageError, pos_int, say


def add(sub: Any) -> None:
    p = sub.add_parser(
        "experts",
        help="per layer and expert: its load on a text and the tokens it takes most often",
        description="Route a UTF-8 text through a checkpoint (non-overlapping windows) and "
        "print, per layer and expert, its share of the (token, slot) assignments, its mean "
        "router probability and the input tokens it takes most often; --json writes the same.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="run directory (its latest) or checkpoint",
    )
    p.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON to this file")
    p.add_argument("--seq-len", type=pos_int, default=64, help="window length (default 64)")
    p.add_argument("--batch-size", type=pos_int, default=16, help="windows per batch (default 16)")
    p.add_argument("--max-batches", type=pos_int, help="at most this many batches (evenly spread)")
    p.add_argument("--top", type=pos_int, default=8, help="tokens shown per expert (default 8)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ...data.corpus import load_text
    from ...data.dataset import eval_batches
    from ...storage.checkpoint import load_model, resolve_checkpoint
    from ...storage.ownership import check_writable_file
    from ...training.telemetry import expert_report
    from .generate import find_tokenizer

    if args.json is not None:
        check_writable_file(args.json)  # before the work
    model = load_model(args.checkpoint)  # a run directory: its latest, verified
    tokenizer = find_tokenizer(resolve_checkpoint(args.checkpoint))
    if args.seq_len > model.config.max_seq_len:
        raise UsageError(
            f"--seq-len must be in [1, max_seq_len={model.config.max_seq_len}], got {args.seq_len}"
        )
    ids = tokenizer.encode(load_text(args.data))  # [T]
    if ids.size < args.seq_len + 1:
        raise InputError(
            f"data file {args.data} has {ids.size} tokens; --seq-len {args.seq_len} needs at "
            f"least {args.seq_len + 1}"
        )
    batches = eval_batches(ids, args.batch_size, args.seq_len, args.max_batches)
    report = expert_report(model, batches, tokenizer, top=args.top)
    report = {"checkpoint": str(resolve_checkpoint(args.checkpoint)), "data": args.data, **report}
    say(format_report(report))
    if args.json is not None:
        from ...storage.checkpoint import atomic_write_file

        text = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
        atomic_write_file(Path(args.json), lambda tmp: tmp.write_text(text, encoding="utf-8"))
        say(f"\nwritten: {args.json}")
    return 0


def format_report(report: dict[str, Any]) -> str:
    """The report as text: a line per layer, then one per expert with its top tokens,
    each with its share of the expert's assignments and its lift (share / frequency)."""
    n_experts = len(report["load"][0])
    lines = [
        f"{report['tokens']:,} tokens of {report['data']} through {report['checkpoint']} "
        f"(top-{report['top_k']} of {n_experts} experts; uniform load {1 / n_experts:.1%})"
    ]
    for layer in report["layers"]:
        i = layer["layer"]
        ratio = report["max_min"][i]
        lines.append(
            f"layer {i}: router entropy {report['entropy'][i]:.3f} nats "
            f"(max log E = {math.log(n_experts):.3f}), max/min load "
            f"{'inf' if ratio is None else f'{ratio:.2f}'}, unused experts {report['unused'][i]}"
        )
        for e in layer["experts"]:
            tops = "  ".join(
                f"{json.dumps(t['text'], ensure_ascii=False)} {t['share']:.0%} x{t['lift']:.1f}"
                for t in e["top_tokens"]
            )
            lines.append(
                f"  expert {e['expert']:>2}  load {e['load']:6.1%}  prob {e['prob']:.3f}  "
                f"tokens: {tops or '(none)'}"
            )
    return "\n".join(lines)
