"""``nn-core export``: a checkpoint's weights as one .safetensors file PyTorch loads, or
(``--format hf``) a Mixtral directory Hugging Face transformers loads."""

from __future__ import annotations

import argparse
from typing import Any

from ..options import human, note, say


def add(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint's weights as one .safetensors file (PyTorch can load it)",
        description="Export weights with the documented names and the config in the "
        "safetensors metadata (key nn_core_config).",
    )
    p.add_argument(
        "--checkpoint", required=True, help="run directory (uses its latest) or checkpoint dir"
    )
    p.add_argument(
        "--format",
        choices=("weights", "hf"),
        default="weights",
        help="weights: one .safetensors file with nn-core's names (default); hf: a "
        "directory transformers' AutoModelForCausalLM / AutoTokenizer load (Mixtral format)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output file, e.g. model.safetensors (its directory must exist; an existing "
        "nn-core weights file is replaced); with --format hf a directory (absent, empty or "
        "an earlier export)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace --out even if it is another kind of file"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ...storage.ownership import check_file_output
    from ...storage.weights import export_weights

    if args.format == "hf":
        from ...storage.hf import export_hf

        out_dir = export_hf(args.checkpoint, args.out, overwrite=args.force)
        say(f"wrote Hugging Face (Mixtral) directory {out_dir}")
        return 0
    check_file_output(args.out, overwrite=args.force, force="--force")
    out = export_weights(args.checkpoint, args.out, overwrite=args.force)
    say(f"wrote {out} ({human(out.stat().st_size)}B)")
    from ...storage.hf import run_tokenizer

    tokenizer = run_tokenizer(args.checkpoint)
    if tokenizer is not None and tokenizer.to_dict()["type"] != "byte":
        note(
            f"the run's tokenizer ({tokenizer.vocab_size} tokens) is not in a weights file; "
            "keep its tokenizer.json beside it, or export with --format hf"
        )
    return 0
