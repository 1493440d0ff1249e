"""``nn-core import``: a .safetensors weights file, or a Hugging Face Mixtral directory,
-> an nn-core model directory."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..options import UsageError, add_config_options, say


def add(sub: Any) -> None:
    p = sub.add_parser(
        "import",
        help="turn a .safetensors weights file or a Hugging Face Mixtral directory into an "
        "nn-core model directory",
        description="Verify a weights file (names, shapes, dtypes, finite values, config) "
        "and write a model directory that generate / evaluate / nn_core.load_model read.",
    )
    p.add_argument(
        "file",
        help="weights file (.safetensors), or a Mixtral directory (config.json, safetensors "
        "weights, optionally tokenizer.json)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="model directory to write (absent, empty or an nn-core model directory)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --out even if it is another nn-core directory (a run, a training "
        "checkpoint); a directory nn-core did not write is never replaced",
    )
    add_config_options(p, "model config (for a file without nn_core_config metadata)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ...model.config import resolve_config
    from ...storage.ownership import MODEL, check_dir_output
    from ...storage.weights import import_weights

    if os.path.isdir(args.file):
        from ...storage.hf import import_hf

        if args.config is not None or args.set:
            raise UsageError(
                "--config / --set apply to a weights file; a directory has config.json"
            )
        out, tok = import_hf(args.file, args.out, overwrite=args.force)
        what = "" if tok is None else f" with its tokenizer ({tok.vocab_size} tokens)"
        say(f"wrote model directory {out}{what}")
        return 0
    if args.set and args.config is None:
        raise UsageError("--set applies to --config; give --config too")
    config = None if args.config is None else resolve_config(args.config, args.set)[0]
    check_dir_output(args.out, MODEL, overwrite=args.force, force="--force")
    out = import_weights(args.file, args.out, config=config, overwrite=args.force)
    say(f"wrote model directory {out}")
    return 0
