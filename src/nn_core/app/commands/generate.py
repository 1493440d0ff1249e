"""``nn-core generate``: continue a prompt with a trained model (KV-cached decoding)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..options import UsageError, check_utf8, nonneg_int, note, pos_int, temperature, top_p


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
        choices=["greedy", "temperature", "sample", "top_k", "top-k", "top_p", "top-p"],
        help="sampling strategy (default top_k, or top_p when --top-p is given)",
    )
    p.add_argument(
        "--temperature", type=temperature, default=0.8, help=">= 0; 0 = greedy (default 0.8)"
    )
    p.add_argument("--top-k", type=pos_int, default=40, help="k of top_k (default 40)")
    p.add_argument("--top-p", type=top_p, help="p of top_p, in (0, 1] (default 0.9)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="sample i uses seed + i")
    p.add_argument("--num-samples", type=pos_int, default=1, help="samples to draw (default 1)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are decoded")
    p.set_defaults(run=run)


def find_tokenizer(checkpoint: Path) -> Any:
    """tokenizer.json in the checkpoint directory or its run directory; else byte level."""
    from ...data.tokenizer import ByteTokenizer, load_tokenizer

    for where in (checkpoint, checkpoint.parent):
        if (where / "tokenizer.json").is_file():
            return load_tokenizer(where / "tokenizer.json")
    note(f"no tokenizer.json beside {checkpoint}; using the byte tokenizer")
    return ByteTokenizer()


def run(args: argparse.Namespace) -> int:
    from ...data.corpus import load_text
    from ...data.tokenizer import StreamDecoder
    from ...inference.generate import generate_batch, stream
    from ...inference.sampling import make_strategy
    from ...storage.checkpoint import load_model, resolve_checkpoint

    name = args.strategy or ("top_p" if args.top_p is not None else "top_k")
    strategy = make_strategy(
        name,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=0.9 if args.top_p is None else args.top_p,
    )
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
    if args.max_new_tokens > max_seq - 1:
        raise UsageError(
            f"--max-new-tokens must be <= max_seq_len - 1 = {max_seq - 1} for this model, "
            f"got {args.max_new_tokens}"
        )
    prompt = tokenizer.encode(text)
    room = max_seq - args.max_new_tokens
    if prompt.size > room:
        note(
            f"the prompt has {prompt.size} tokens; keeping its last {room} (max_seq_len "
            f"{max_seq} - {args.max_new_tokens} new tokens)"
        )
        prompt = prompt[-room:]
    limit = min(tokenizer.vocab_size, model.config.vocab_size)
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
            decoder = StreamDecoder(tokenizer)  # any tokenizer; held back: partial UTF-8
            rng = np.random.default_rng(seed)
            for tok in stream(
                model, prompt, args.max_new_tokens, strategy, rng=rng, vocab_limit=limit
            ):
                out.write(decoder.feed(tok))
                out.flush()
            out.write(decoder.final() + "\n")
            out.flush()
        return 0
    rows = generate_batch(  # all samples decoded together, each with its own generator
        model,
        [prompt] * args.num_samples,
        prompt.size + args.max_new_tokens,
        strategy,
        rng=[np.random.default_rng(s) for s in seeds],
        vocab_limit=limit,
    )
    for i, ids in enumerate(rows):
        header(i)
        out.write(tokenizer.decode(np.asarray(ids)) + "\n")
    out.flush()
    return 0
