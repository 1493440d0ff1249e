"""``nn-core prepare``: tokenize a corpus once into a memory-mapped dataset.

nn-core prepare DATA --out DIR [--tokenizer bpe|byte|FILE] [--vocab-size N]
                [--val-fraction F] [--glob PAT]

DATA is a UTF-8 file or a directory (read recursively, files in sorted order). DIR
receives tokens.bin (uint16/uint32 token ids), tokenizer.json and manifest.json (see
docs/data.md); ``nn-core train --data DIR`` then trains on it through a memory map.
The default, a byte-level BPE of the default config's vocab_size (1000) trained on the
training split, is what ``nn-core train --data DATA`` uses: both give the same ids.
The dataset is written beside DIR and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from ...errors import OutputError
from ...storage import ownership as own
from ..options import UsageError, fraction, int_at_least, say

PREPARED = "a prepared dataset"
DEFAULT_TOKENIZER = "bpe"  # as nn-core train's


def default_vocab_size() -> int:
    """The vocab_size of the config ``nn-core train`` uses with no option (tiny: 1000)."""
    from ...training.config import resolve_run_config

    return resolve_run_config(None, [], {})[0].vocab_size


def add(sub: Any) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize a file or directory once into a memory-mapped dataset",
        description="Tokenize DATA (a UTF-8 file, or a directory read recursively) into "
        "DIR: tokens.bin (token ids, uint16 when the vocabulary fits), tokenizer.json and "
        "manifest.json; train on it with --data DIR, in flat memory however large it is.",
    )
    p.add_argument("data", metavar="DATA", help="a UTF-8 text file or a directory of them")
    p.add_argument("--out", required=True, metavar="DIR", help="the dataset directory")
    p.add_argument(
        "--tokenizer",
        default=DEFAULT_TOKENIZER,
        metavar="bpe|byte|FILE",
        help="'bpe' (default: a byte-level BPE trained on the training split only, as "
        "nn-core train does), 'byte' or a tokenizer.json file",
    )
    p.add_argument(
        "--vocab-size",
        type=int_at_least(258),
        metavar="N",
        help="ids of the BPE in all (default: the default config's vocab_size, "
        f"{default_vocab_size()}); use the vocab_size of the config you will train, "
        "for the same ids nn-core train --data DATA would use",
    )
    p.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.1,
        metavar="F",
        help="last fraction of the data (its bytes) held out for validation (default 0.1)",
    )
    p.add_argument("--glob", metavar="PATTERN", help="only files matching it, e.g. '*.py'")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip files that are unreadable, empty or not UTF-8 (listed) instead of failing",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace another nn-core directory at DIR (never one nn-core did not write)",
    )
    p.set_defaults(run=run)


def check_output(out: str | os.PathLike[str], force: bool = False) -> own.Ownership:
    """May prepare write ``out``? Absent, empty or a prepared dataset: yes; another nn-core
    directory: only with ``force``; anything else: never (OutputError)."""
    from ...data.prepared import FILES, is_prepared

    p = Path(out)
    own.check_not_cwd(p)
    own.check_parent(p)
    if not p.is_symlink() and is_prepared(p):
        extra = sorted(set(os.listdir(p)) - set(FILES))
        if not extra:
            return own.Ownership(p, PREPARED)
        detail = f"a prepared dataset with other files in it ({extra[0]})"
        raise own.refuse_foreign(own.Ownership(p, own.FOREIGN, detail), "--force")
    info = own.classify(p)
    if info.kind in (own.ABSENT, own.EMPTY):
        return info
    if info.kind in (own.MODEL, own.TRAINING) or (info.kind == own.RUN and not info.foreign):
        if force:
            return info
        raise OutputError(
            f"{p} holds {own.WHAT[info.kind]}; refusing to replace it with {PREPARED} "
            "(--force replaces it)"
        )
    raise own.refuse_foreign(info, "--force")


def tokenizer_from_option(value: str) -> Any:
    """--tokenizer: 'byte' or a tokenizer.json file ('bpe' is trained by ``prepare``)."""
    from ...data.tokenizer import ByteTokenizer, load_tokenizer

    return ByteTokenizer() if value == "byte" else load_tokenizer(value)


def prepare(
    data: str,
    out: str,
    *,
    tokenizer: Any = None,
    bpe_vocab_size: int | None = None,
    val_fraction: float = 0.1,
    glob: str | None = None,
    skip_bad: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Write the prepared dataset ``out`` atomically (temp directory, then a rename);
    ``tokenizer`` None: bytes, or with ``bpe_vocab_size`` a BPE trained here."""
    from ...data.prepared import write_prepared

    check_output(out, force)
    target = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.absolute().parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a dataset is an ordinary directory
    try:
        manifest = write_prepared(
            data, tmp, tokenizer=tokenizer, bpe_vocab_size=bpe_vocab_size,
            val_fraction=val_fraction, glob=glob, skip_bad=skip_bad,
        )  # fmt: skip
        info = check_output(out, force)  # again: it may have changed meanwhile
        old = own.move_aside(target) if info.kind != own.ABSENT else None
        os.rename(tmp, target)  # complete, or not there at all
        if old is not None:
            own.delete_moved(old)
    except BaseException:
        own.delete_moved(tmp)
        raise
    return manifest


def run(args: argparse.Namespace) -> int:
    bpe = args.tokenizer == "bpe"
    if args.vocab_size is not None and not bpe:
        raise UsageError("--vocab-size sets the size of a BPE trained here: use --tokenizer bpe")
    m = prepare(
        args.data,
        args.out,
        tokenizer=None if bpe else tokenizer_from_option(args.tokenizer),
        bpe_vocab_size=(args.vocab_size or default_vocab_size()) if bpe else None,
        val_fraction=args.val_fraction,
        glob=args.glob,
        skip_bad=args.skip_bad,
        force=args.force,
    )
    src = m["source"]
    for bad in src["skipped"]:
        say(f"skipped: {bad}")
    say(
        f"{args.out}: {m['n_tokens']:,} tokens ({m['dtype']}; {m['train_tokens']:,} train / "
        f"{m['val_tokens']:,} validation) from {src['files']:,} file(s), "
        f"{len(src['skipped'])} skipped; tokenizer {m['tokenizer'].get('type')}; "
        f"unigram entropy {m['unigram_entropy']:.4f} nats/token"
    )
    return 0
