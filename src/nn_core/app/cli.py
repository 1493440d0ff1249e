"""The ``nn-core`` command line: one module per subcommand (``nn_core.app.commands``).

    nn-core train [--data FILE] [--config NAME|FILE] [--set KEY=VALUE] [--out DIR]
    nn-core train --resume --out DIR     continue DIR/latest exactly (weights, AdamW, data)
    nn-core generate --checkpoint DIR --prompt TEXT [--strategy top_k --temperature 0.8]
    nn-core evaluate --checkpoint DIR --data FILE [--scheduler tcp://HOST:8786]
    nn-core export --checkpoint DIR --out FILE.safetensors [--force]  (weights PyTorch loads)
    nn-core import FILE.safetensors --out DIR [--force]
    nn-core info [--config NAME|FILE | --checkpoint DIR]
    nn-core bench [--scenario GLOB] [--out FILE] [--summary A.json B.json ...]
    nn-core convergence --out DIR        the suite's convergence check
    nn-core plot RUN_DIR                 loss, learning rate, expert-load heatmaps -> RUN_DIR/plots
    nn-core experts --checkpoint DIR --data FILE [--json OUT]   what each expert takes

Exit status:
    0    success
    1    runtime error: missing or corrupt checkpoint, missing or unreadable data/config
         file, non-finite loss, a full disk, the run directory locked by another writer;
         ``convergence``: the loss did not reach its target
    2    usage error: bad option value, unknown or invalid config field, an --out that is
         refused (see below) or whose parent directory is missing or not writable
    130  interrupted (Ctrl-C)
    141  stdout closed early (a broken pipe, e.g. ``nn-core info | head -1``): nothing
         more is printed, as a tool killed by SIGPIPE (128 + 13) would; no message
Every error is one line on stderr, ``nn-core: error: ...``; nothing prints a traceback.

Outputs (``nn_core.storage.ownership``): ``--out`` is written only if it is absent, empty or
holds what the command itself writes (``import``: an nn-core model directory;
``export``: an nn-core weights file; ``train``: a run directory with no checkpoint
yet). An nn-core directory or file of another kind, or a run that has checkpoints, is
replaced only with ``--force``; a directory nn-core did not write is never deleted,
not even with ``--force``. Parent directories are not created, except ``runs/`` for
the default run directory. ``nn-core train`` locks its run directory for its whole
life (see ``nn_core.app.run_dir``).

To add a subcommand: a module in ``nn_core.app.commands`` with ``add(subparsers)`` (its
options, and ``set_defaults(run=...)``) and ``run(args) -> int``, named in ``COMMANDS``.
Heavy modules (matplotlib, tqdm, safetensors) are imported inside the commands that
use them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
from collections.abc import Sequence

from ..errors import ConfigError, NNCoreError, OutputError
from ..version import __version__
from .options import PROG, Parser, UsageError

# subcommand -> its module in nn_core.app.commands, in the order `--help` lists them.
# Only the module of the command being run is imported (with every module when no
# known command is given, for the list in --help and the usage error): `nn-core bench`
# does not load the training, data and storage code.
COMMANDS = {
    "train": "train",
    "generate": "generate",
    "evaluate": "evaluate",
    "export": "export",
    "import": "import_",
    "info": "info",
    "bench": "bench",
    "convergence": "convergence",
    "prepare": "prepare",
    "plot": "plot",  # expert telemetry
    "experts": "experts",
}
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a tool killed by SIGPIPE reports


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for a command line ``argv``: every subcommand is listed, and the one
    ``argv`` names (every one if it names none) gets its options."""
    parser = Parser(
        prog=PROG,
        description="nn-core: a from-scratch Mixture-of-Experts transformer on NumPy.",
        epilog="Exit status: 0 ok, 1 runtime error, 2 usage error (including a refused --out), "
        "130 interrupted, 141 stdout closed early (broken pipe).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=Parser
    )
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, module in COMMANDS.items():
        if chosen in (name, None) or chosen not in COMMANDS:
            importlib.import_module(f"{__package__}.commands.{module}").add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (errors: one line on stderr)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if argv is None:  # a real command line: print paths holding non-UTF-8 bytes as given
        with contextlib.suppress(AttributeError, ValueError):
            sys.stdout.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
    try:
        args = build_parser(args_list).parse_args(args_list)
        args.argv = None if argv is None else args_list
        status = int(args.run(args))
        sys.stdout.flush()  # a reader gone now is a broken pipe here, not at exit
        return status
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, like Unix tools
        _detach_stdout()
        return EXIT_BROKEN_PIPE
    except (UsageError, ConfigError, OutputError) as exc:
        return _fail(exc, 2)
    except (NNCoreError, OSError, MemoryError) as exc:
        return _fail(exc, 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _detach_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush finds no broken pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # not a real file (tests capture stdout): nothing to flush at exit


def _fail(exc: BaseException, status: int) -> int:
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        message = f"{exc.filename}: {exc.strerror}"
    with contextlib.suppress(OSError, ValueError):
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
