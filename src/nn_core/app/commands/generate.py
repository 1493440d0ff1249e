"""``nn-core generate``: continue a prompt with a trained model (KV-cached decoding).

Stops at the tokenizer's end-of-text token (``--ignore-eos`` turns that off) and before
any ``--stop STRING`` (never printed, also with ``--stream``); ``--slide`` continues
past max_seq_len by sliding the context window (see docs/sampling.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..options import (
    UsageError,
    check_utf8,
    float_in,
    nonneg_int,
    note,
    pos_float,
    pos_int,
    temperature,
    top_p,
)


def add(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a checkpoint",
        description="Continue a prompt with a trained model (KV-cached decoding).",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="run directory (uses its latest) or checkpoint dir",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="prompt text")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file")
    p.add_argument("--max-new-tokens", type=pos_int, default=200, help="default 200")
    p.add_argument(
        "--strategy",
        choices=[
            "greedy",
            "temperature",
            "sample",
            "top_k",
            "top-k",
            "top_p",
            "top-p",
            "min_p",
            "min-p",
        ],
        help="sampling strategy (default top_k, or top_p / min_p when --top-p / --min-p is given)",
    )
    p.add_argument(
        "--temperature", type=temperature, default=0.8, help=">= 0; 0 = greedy (default 0.8)"
    )
    p.add_argument("--top-k", type=pos_int, default=40, help="k of top_k (default 40)")
    p.add_argument("--top-p", type=top_p, help="p of top_p, in (0, 1] (default 0.9)")
    p.add_argument(
        "--min-p",
        type=float_in(0.0, 1.0, True, True),
        help="p of min_p, in [0, 1]: keep tokens with probability >= p * the top one's "
        "(default 0.05)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=pos_float,
        default=1.0,
        metavar="R",
        help="> 0: divide positive logits of tokens already in the context by R, multiply "
        "negative ones (default 1 = off; 1.1-1.3 discourages repeats)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STRING",
        help="stop before this text (repeatable; not printed)",
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="do not stop at the tokenizer's end-of-text token",
    )
    p.add_argument(
        "--slide",
        action="store_true",
        help="continue past max_seq_len: when the context is full, keep its last half and "
        "re-prefill it (one extra prefilled position per new token)",
    )
    p.add_argument("--seed", type=nonneg_int, default=0, help="sample i uses seed + i")
    p.add_argument("--num-samples", type=pos_int, default=1, help="samples to draw (default 1)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are decoded")
    p.set_defaults(run=run)


def find_tokenizer(checkpoint: Path) -> Any:
    """tokenizer.json in the checkpoint directory or its run directory; else byte level."""
    from ...data.tokenizer import ByteTokenizer

    for where in (checkpoint, checkpoint.parent):
        if (where / "tokenizer.json").is_file():
            return ByteTokenizer.load(where / "tokenizer.json")
    note(f"no tokenizer.json beside {checkpoint}; using the byte tokenizer")
    return ByteTokenizer()


def run(args: argparse.Namespace) -> int:
    from ...data.corpus import load_text
    from ...inference.generate import cut_at_stop, generate_batch, stream_text
    from ...inference.sampling import make_strategy
    from ...storage.checkpoint import load_model, resolve_checkpoint

    default = "top_p" if args.top_p is not None else "min_p" if args.min_p is not None else "top_k"
    strategy = make_strategy(
        args.strategy or default,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=0.9 if args.top_p is None else args.top_p,
        min_p=0.05 if args.min_p is None else args.min_p,
        repetition_penalty=args.repetition_penalty,
    )
    for text in args.stop:
        if not text:
            raise UsageError("--stop must not be empty")
        check_utf8(text, "--stop", "a stop string must be valid text")
    if args.prompt is not None:
        if not args.prompt:
            raise UsageError("--prompt must not be empty (generation needs a context)")
        check_utf8(args.prompt, "--prompt", "put the text in a UTF-8 file: --prompt-file")
        text = args.prompt
    else:
        text = load_text(args.prompt_file)
    model = load_model(args.checkpoint)  # a run directory: its latest, verified
    tokenizer = find_tokenizer(resolve_checkpoint(args.checkpoint))
    max_seq = model.config.max_seq_len
    keep = max_seq // 2 if args.slide else None  # tokens kept when the window slides
    if args.max_new_tokens > max_seq - 1 and keep is None:
        raise UsageError(
            f"--max-new-tokens must be <= max_seq_len - 1 = {max_seq - 1} for this model, "
            f"got {args.max_new_tokens} (--slide continues past max_seq_len)"
        )
    prompt = tokenizer.encode(text)
    room = max_seq - (1 if keep is not None else args.max_new_tokens)
    if prompt.size > room:
        note(
            f"the prompt has {prompt.size} tokens; keeping its last {room} (max_seq_len "
            f"{max_seq} - {args.max_new_tokens} new tokens)"
        )
        prompt = prompt[-room:]
    limit = min(tokenizer.vocab_size, model.config.vocab_size)
    eos = tokenizer.eos_id
    eos = None if args.ignore_eos or eos is None or eos >= limit else eos
    seeds = [args.seed + i for i in range(args.num_samples)]  # sample i: its own generator
    out = sys.stdout

    def header(i: int) -> None:
        if args.num_samples > 1:
            out.write(f"{'' if i == 0 else chr(10)}===== sample {i + 1} (seed {seeds[i]}) =====\n")

    if args.stream:
        for i, seed in enumerate(seeds):
            header(i)
            out.write(tokenizer.decode(prompt))
            out.flush()
            pieces = stream_text(  # text held back while it may start a stop string
                model,
                tokenizer,
                prompt,
                args.max_new_tokens,
                strategy,
                stop=args.stop,
                eos_id=eos,
                rng=np.random.default_rng(seed),
                vocab_limit=limit,
                slide_keep=keep,
            )
            for piece in pieces:
                out.write(piece)
                out.flush()
            out.write("\n")
            out.flush()
        return 0
    rows = generate_batch(  # all samples decoded together, each with its own generator
        model,
        [prompt] * args.num_samples,
        prompt.size + args.max_new_tokens,
        strategy,
        rng=[np.random.default_rng(s) for s in seeds],
        vocab_limit=limit,
        eos_id=eos,
        stop=args.stop,
        tokenizer=tokenizer,
        slide_keep=keep,
    )
    for i, ids in enumerate(rows):
        header(i)
        new_text, _ = cut_at_stop(tokenizer.decode(np.asarray(ids[prompt.size :])), args.stop)
        out.write(tokenizer.decode(prompt) + new_text + "\n")
    out.flush()
    return 0
