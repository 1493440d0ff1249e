"""The ``nn-core`` command line: train, generate, evaluate, export, import, info, bench,
convergence.

    nn-core train                        tiny config on the default corpus, a few minutes
    nn-core train --data FILE --config small --set lr=1e-3 --steps 5000 --out DIR
    nn-core train --resume --out DIR     continue DIR/latest exactly (weights, AdamW, data)
    nn-core train --steps 3000 --stop-at 1000    stop early; --resume later continues the
                                         same schedule, bit for bit as one straight run
    nn-core generate --checkpoint DIR --prompt TEXT [--strategy top_k --temperature 0.8]
    nn-core bench [ARGS...]              the benchmark harness (python -m nn_core.bench)
    nn-core convergence [ARGS...]        the suite's convergence check
    nn-core evaluate --checkpoint DIR --data FILE [--scheduler tcp://HOST:8786]
    nn-core export --checkpoint DIR --out FILE.safetensors [--force]  (weights PyTorch loads)
    nn-core import FILE.safetensors --out DIR [--force]
    nn-core info [--config NAME|FILE | --checkpoint DIR]

Exit status:
    0    success
    1    runtime error: missing or corrupt checkpoint, missing or unreadable data/config
         file, non-finite loss, a full disk, the run directory locked by another writer
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
life (new runs and ``--resume``): a second writer exits 1 at once, naming the holder's
pid; the lock dies with the process.

A run directory (``nn-core train --out DIR``) holds::

    .nn-core-run      marks it as an nn-core run directory; the writers' lock (holds a pid)
    run.json          model and train config, data source (+ SHA-256), command line, time
    tokenizer.json    the tokenizer (byte level) -- generate reads it from here
    step_XXXXXX/      checkpoints (nn_core.storage.checkpoint), the newest few are kept
    latest            names the newest checkpoint
    metrics.jsonl     one line per update (loss, ce, aux, grad_norm, lr, tokens/s, val_*)
    loss_curve.png    train and validation cross-entropy against the unigram entropy
    summary.json      final validation loss, unigram entropy, time, the sample
    sample.txt        the sample printed at the end

To add a subcommand: write ``_add_<name>(subparsers)`` (its options, with
``set_defaults(run=...)``) and a ``_run_<name>(args) -> int``, and list the adder in
``SUBCOMMANDS``. Heavy modules (matplotlib, tqdm, safetensors, the benchmark) are
imported inside the commands that use them, so ``nn-core --help`` stays fast.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, InputError, NNCoreError, OutputError
from ..model.config import Config

PROG = "nn-core"

# `nn-core train` with no options: ~2.5 minutes on the 2-core reference machine (measured)
TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 8,
    "seq_len": 128,
    "lr": 5e-3,
    "warmup_steps": 100,
    "total_steps": 3000,
    "eval_interval": 250,
    "checkpoint_interval": 500,
    "seed": 42,
}
EVAL_BATCHES = 16  # validation batches per periodic evaluation
FINAL_EVAL_BATCHES = 256  # at most this many for the final number (the whole default val split)
SAMPLE_TOKENS = 200  # length of the sample printed at the end of training
SAMPLE_TOP_K, SAMPLE_TEMPERATURE = 10, 0.8  # its strategy: top-k sampling, seed 0
DEFAULT_CORPUS_PROMPT = "def "

# options that would change the run's math, refused with --resume (dest -> flag)
_FIXED_ON_RESUME = {
    "config": "--config",
    "set": "--set",
    "data": "--data",
    "batch_size": "--batch-size",
    "seq_len": "--seq-len",
    "lr": "--lr",
    "seed": "--seed",
    "val_fraction": "--val-fraction",
    "warmup_steps": "--warmup-steps",
}


class UsageError(NNCoreError):
    """A bad command line (option value, combination of options): exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise UsageError (one line on stderr, exit 2) instead of
    printing the usage block."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---- option value types (argparse turns their ValueError into a usage error) ------------


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _float_in(low: float, high: float, low_ok: bool, high_ok: bool) -> Callable[[str], float]:
    lo_b, hi_b = "[" if low_ok else "(", "]" if high_ok else ")"
    desc = f"a number in {lo_b}{low:g}, {high:g}{hi_b}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text!r}") from None
        above = value > low or (low_ok and value == low)
        below = value < high or (high_ok and value == high)
        if not (above and below):  # NaN fails both
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text}")
        return value

    parse.__name__ = desc
    return parse


_pos_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)
_pos_float = _float_in(0.0, float("inf"), False, False)
_temperature = _float_in(0.0, float("inf"), True, False)
_top_p = _float_in(0.0, 1.0, False, True)
_fraction = _float_in(0.0, 1.0, False, False)


# ---- configs: presets, files, --set ------------------------------------------------------


def _parse_value(text: str) -> Any:
    """--set values: JSON (1, 1e-3, true, "x"), else a float (inf), else the raw string."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _read_config_file(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ConfigError(
            f"--config must be a preset ({', '.join(Config.PRESETS)}) or a .toml/.json file, "
            f"got {str(path)!r}"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:  # unreadable like a data file: a runtime error (exit 1)
        raise InputError(f"--config file {path}: {exc.strerror or exc}") from None
    if suffix == ".json":
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"--config file {path} is not valid JSON: {exc}") from None
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise ConfigError(
                    "TOML config files need Python >= 3.11 (or the tomli package); use a .json file"
                ) from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"--config file {path} is not valid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config file {path} must hold a table/object of fields")
    return data


def _split_fields(
    data: dict[str, Any], where: str, model: dict[str, Any], train: dict[str, Any] | None
) -> None:
    """Route each key of ``data`` to the model or train fields by name (in place)."""
    from ..training.config import TrainConfig

    model_names = {f.name for f in dataclasses.fields(Config)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in data.items():
        if key in model_names:
            model[key] = value
        elif key in train_names and train is not None:
            train[key] = value
        else:
            known = sorted(model_names) + ([] if train is None else sorted(train_names))
            raise ConfigError(f"unknown config field {key!r} in {where}; known fields: {known}")


def resolve_configs(
    config: str | None, sets: Sequence[str], train: dict[str, Any] | None = None
) -> tuple[Config, str, dict[str, Any]]:
    """(model Config, its name, train fields) from a preset or file, then --set overrides.

    A config file holds model fields and, optionally, train fields: at the top level
    (routed by name), under [model] / [train], and an optional ``preset`` to start
    from. ``train`` (the starting train fields) is updated in place and returned; when
    None, train fields are not accepted (``info``).
    """
    model: dict[str, Any] = {}
    name = config or "tiny"
    if config is None or config in Config.PRESETS:
        model.update(Config.preset(name).to_dict())
    else:
        path = Path(config)
        name = path.stem
        data = _read_config_file(path)
        preset = data.pop("preset", "tiny")
        model.update(Config.preset(str(preset)).to_dict())
        for section, target in (("model", model), ("train", train)):
            part = data.pop(section, {})
            if not isinstance(part, dict):
                raise ConfigError(f"[{section}] in {path} must be a table of fields")
            if target is None and part:
                raise ConfigError(f"{path}: [{section}] fields are not used by this command")
            _split_fields(part, f"{path} [{section}]", model, train if section == "train" else None)
        _split_fields(data, str(path), model, train)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value, got {item!r}")
        _split_fields({key.strip(): _parse_value(value.strip())}, "--set", model, train)
    return Config.from_dict(model), name, train if train is not None else {}


def _check_allocatable(cfg: Config) -> None:
    """Refuse configs whose weights, gradients and AdamW moments do not fit in RAM."""
    need = 16 * cfg.total_params()  # float32 params + grads + m + v
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > ram:
        raise UsageError(
            f"this config has {cfg.total_params():,} parameters; training needs about "
            f"{need / 2**30:.1f} GiB, more than this machine's {ram / 2**30:.1f} GiB "
            "(nn-core info --config ... shows its counts)"
        )


# ---- small helpers -----------------------------------------------------------------------


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_text(path: Path, text: str) -> None:
    """Write a run-directory file atomically (a full disk leaves the old file whole)."""
    from ..storage.checkpoint import atomic_write_file

    atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2) + "\n")


def _blas_limit(threads: int | None) -> Any:
    from contextlib import nullcontext

    if threads is None:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(threads)


def _say(*parts: Any) -> None:
    print(*parts, flush=True)


def _note(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


# ---- train -------------------------------------------------------------------------------


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on a text file (default: tiny config, default corpus)",
        description=(
            "Train on UTF-8 text with the byte tokenizer. With no options: the tiny config "
            "on the default corpus (Python standard-library source) for "
            f"{TRAIN_DEFAULTS['total_steps']} steps of {TRAIN_DEFAULTS['batch_size']} x "
            f"{TRAIN_DEFAULTS['seq_len']} tokens. Precedence: preset < config file < --set "
            "< explicit options."
        ),
    )
    p.add_argument(
        "--config",
        metavar="NAME|FILE",
        help="preset (tiny, small) or a .toml/.json file (default tiny)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="override a model or train config field (repeatable), e.g. --set hidden_dim=128",
    )
    p.add_argument(
        "--data", metavar="FILE", help="UTF-8 text file to train on (default: the default corpus)"
    )
    p.add_argument(
        "--steps", type=_pos_int, metavar="N", help="total updates (the LR schedule's length)"
    )
    p.add_argument("--batch-size", type=_pos_int, metavar="B", help="sequences per batch")
    p.add_argument("--seq-len", type=_pos_int, metavar="S", help="tokens per sequence")
    p.add_argument("--lr", type=_pos_float, metavar="LR", help="peak learning rate")
    p.add_argument("--warmup-steps", type=_nonneg_int, metavar="N", help="linear warmup updates")
    p.add_argument(
        "--eval-interval", type=_nonneg_int, metavar="N", help="validate every N updates (0: never)"
    )
    p.add_argument(
        "--checkpoint-interval",
        type=_nonneg_int,
        metavar="N",
        help="checkpoint every N updates (0: end only)",
    )
    p.add_argument(
        "--seed", type=_nonneg_int, metavar="N", help="seed of the weights and the batch sampler"
    )
    p.add_argument(
        "--val-fraction",
        type=_fraction,
        metavar="F",
        help="last fraction of the text held out (default 0.1)",
    )
    p.add_argument(
        "--out", metavar="DIR", help="run directory (default runs/<config>-<date>-<time>)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="start a new run in --out even if it holds a run with checkpoints or another "
        "nn-core directory (replaced); a directory nn-core did not write is never replaced",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (default: the newest under runs/) from its latest "
        "checkpoint, exactly",
    )
    p.add_argument(
        "--stop-at",
        type=_pos_int,
        metavar="STEP",
        help="stop after update STEP (checkpointed); the schedule still spans --steps; "
        "continue with --resume",
    )
    p.add_argument(
        "--threads",
        type=_pos_int,
        default=1,
        metavar="N",
        help="BLAS threads (default 1: fastest here)",
    )
    p.add_argument(
        "--sample-tokens",
        type=_nonneg_int,
        metavar="N",
        default=SAMPLE_TOKENS,
        help=f"length of the sample printed at the end (default {SAMPLE_TOKENS})",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_train)


RUNS_ROOT = Path("runs")  # the default run directories: runs/<config>-<date>-<time>[-N]


def _check_new_run_out(out: str | None, force: bool) -> Any:
    """Refuse, before any work, a --out a new run may not use; returns what is there.

    Usable: absent (its parent must exist), empty, or a run directory without
    checkpoints (replaced); with --force also a run with checkpoints or another nn-core
    directory (replaced). A directory nn-core did not write never. The default (no
    --out): runs/ must be creatable or writable.
    """
    from ..storage import ownership as own

    if out is None:
        if RUNS_ROOT.exists():
            if not RUNS_ROOT.is_dir():
                raise OutputError(f"{RUNS_ROOT} exists but is not a directory; give --out DIR")
            own.check_parent(RUNS_ROOT / "x")
        else:
            own.check_parent(RUNS_ROOT)
        return None
    path = Path(out)
    own.check_not_cwd(path)
    with own.locked_if_run(path):  # a run being written: InUseError, naming the writer
        info = own.classify(path)
    if info.kind in (own.ABSENT, own.EMPTY):
        own.check_parent(path)
    elif info.kind == own.RUN and not info.foreign:
        if info.has_checkpoints and not force:
            raise UsageError(
                f"{path} already holds a run: continue it with --resume, pick another --out, "
                "or --force replaces it"
            )
    elif info.kind in (own.MODEL, own.TRAINING):
        if not force:
            raise OutputError(
                f"{path} holds {own.WHAT[info.kind]}; refusing to replace it with a run "
                "directory (--force replaces it)"
            )
    else:  # a foreign directory, a run holding foreign files, any file
        raise own.refuse_foreign(info, "--force")
    return info


def _claim_run_dir(out: str | None, config_name: str, force: bool) -> tuple[Path, Any]:
    """Create (or take over, as ``_check_new_run_out`` allowed) the run directory and lock
    it; returns (directory, held RunLock). A replaced directory is moved aside first and
    deleted once the new one is locked (a crash between leaves ``.NAME.old-*`` beside it)."""
    from ..storage import ownership as own

    if out is None:  # runs/<config>-<stamp>, -2, -3, ...: exclusive mkdir, no collision
        RUNS_ROOT.mkdir(exist_ok=True)
        base = f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        for n in range(1, 10_000):
            path = RUNS_ROOT / (base if n == 1 else f"{base}-{n}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return path, own.RunLock(path).acquire()
        raise OutputError(f"cannot create a run directory {RUNS_ROOT / base}-N: all taken")
    path = Path(out)
    moved = None
    with own.locked_if_run(path):  # a run being written is not replaced
        info = _check_new_run_out(out, force)  # again: the data took a while to load
        if info.kind in (own.RUN, own.MODEL, own.TRAINING):
            moved = own.move_aside(path)
        try:
            path.mkdir()
        except FileExistsError:
            if own.classify(path).kind != own.EMPTY:
                raise OutputError(f"{path} appeared while starting; not touching it") from None
        lock = own.RunLock(path).acquire()
    if moved is not None:
        own.delete_moved(moved)
    return path, lock


def _newest_run(root: Path = RUNS_ROOT) -> Path:
    runs = [p for p in root.glob("*") if (p / "latest").is_file()] if root.is_dir() else []
    if not runs:
        raise UsageError("--resume needs --out DIR (no run with a checkpoint under runs/)")
    return max(runs, key=lambda p: (p / "latest").stat().st_mtime)


def _load_data(source: str | None, val_fraction: float) -> tuple[str, str, Any]:
    """(text, description, TokenDataset) of --data FILE or the default corpus."""
    from ..data.corpus import default_corpus, describe_default_corpus, load_text
    from ..data.dataset import TokenDataset

    if source is None:
        text, desc = default_corpus(), "default corpus: " + describe_default_corpus()
    else:
        text = load_text(source)
        desc = f"{source} ({len(text.encode('utf-8')):,} bytes)"
    return text, desc, TokenDataset.from_text(text, val_fraction=val_fraction)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics lines of updates < step (an interrupted run may have logged more);
    rewritten atomically, so a full disk leaves the file as it was."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if int(json.loads(line)["step"]) < step:
                kept.append(line)
        except (ValueError, KeyError, TypeError, RecursionError):
            continue
    _write_text(path, "".join(k + "\n" for k in kept))


@dataclasses.dataclass
class _Run:
    """A training run ready to go: a fresh one or one restored from its checkpoint."""

    out: Path
    lock: Any  # nn_core.storage.ownership.RunLock, held until the command ends
    config_name: str
    trainer: Any  # nn_core.training.train.Trainer (model, TrainConfig, AdamW, data source)
    sampler: Any  # nn_core.data.BatchSampler over the train split
    data: Any  # nn_core.data.TokenDataset
    data_desc: str

    @property
    def data_label(self) -> str:
        """A short name of the training text for plot titles."""
        if self.data_desc.startswith("default corpus"):
            return "default corpus (stdlib source)"
        return Path(self.data_desc.split(" (")[0]).name


def _new_run(args: argparse.Namespace) -> _Run:
    from ..data.dataset import BatchSampler, eval_batches
    from ..data.tokenizer import ByteTokenizer
    from ..model.transformer import MoETransformer
    from ..training.config import TrainConfig
    from ..training.trainer import Trainer

    tokenizer = ByteTokenizer()
    fields = dict(TRAIN_DEFAULTS)
    cfg, config_name, fields = resolve_configs(args.config, args.set or [], fields)
    explicit = {
        "total_steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "eval_interval": args.eval_interval,
        "checkpoint_interval": args.checkpoint_interval,
        "seed": args.seed,
    }
    fields.update({k: v for k, v in explicit.items() if v is not None})
    warmup_given = args.warmup_steps is not None or any(
        s.partition("=")[0].strip() == "warmup_steps" for s in args.set or []
    )
    if not warmup_given and fields["warmup_steps"] >= fields["total_steps"]:
        fields["warmup_steps"] = fields["total_steps"] // 10  # short runs: 10% warmup
    tcfg = TrainConfig.from_dict(fields)
    if tcfg.seq_len > cfg.max_seq_len:
        raise ConfigError(f"seq_len must be <= max_seq_len {cfg.max_seq_len}, got {tcfg.seq_len}")
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"vocab_size must be >= {tokenizer.vocab_size} for the byte tokenizer, "
            f"got {cfg.vocab_size}"
        )
    if args.stop_at is not None and args.stop_at > tcfg.total_steps:
        raise UsageError(f"--stop-at ({args.stop_at}) must be <= steps ({tcfg.total_steps})")
    _check_allocatable(cfg)
    _check_new_run_out(args.out, args.force)  # before any work
    val_fraction = 0.1 if args.val_fraction is None else args.val_fraction
    text, data_desc, ds = _load_data(args.data, val_fraction)
    sampler = BatchSampler(ds.train, tcfg.batch_size, tcfg.seq_len, tcfg.seed)
    eval_batches(ds.val, tcfg.batch_size, tcfg.seq_len, 1)  # is the val split long enough?
    out, lock = _claim_run_dir(args.out, config_name, args.force)
    try:
        trainer = Trainer(
            MoETransformer(cfg, seed=tcfg.seed), tcfg, out_dir=out, data_source=sampler
        )
        from ..storage.checkpoint import atomic_write_file

        atomic_write_file(out / "tokenizer.json", tokenizer.save)
        _write_run_json(out, args, config_name, cfg, tcfg, text, data_desc, ds, val_fraction)
    except BaseException:
        lock.release()
        raise
    return _Run(out, lock, config_name, trainer, sampler, ds, data_desc)


def _write_run_json(
    out: Path,
    args: argparse.Namespace,
    config_name: str,
    cfg: Config,
    tcfg: Any,
    text: str,
    data_desc: str,
    ds: Any,
    val_fraction: float,
) -> None:
    from ..data.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    _write_json(
        out / "run.json",
        {
            "library": "nn-core",
            "kind": "run",
            "config_name": config_name,
            "config": cfg.to_dict(),
            "train_config": tcfg.to_dict(),
            "data": {
                "source": None if args.data is None else str(Path(args.data).resolve()),
                "description": data_desc,
                "sha256": _sha256_text(text),
                "val_fraction": val_fraction,
                "train_tokens": int(ds.train.size),
                "val_tokens": int(ds.val.size),
            },
            "tokenizer": tokenizer.to_dict(),
            "command": [PROG, *(sys.argv[1:] if args.argv is None else args.argv)],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),  # checkpoints hold no time
        },
    )


def _resumed_run(args: argparse.Namespace) -> _Run:
    from ..storage import ownership as own

    given = [flag for dest, flag in _FIXED_ON_RESUME.items() if getattr(args, dest) is not None]
    if args.force:
        given.append("--force")
    if given:
        raise UsageError(
            f"{', '.join(given)} cannot change when resuming (the run's settings are in "
            "run.json); only --steps, --stop-at, --eval-interval, --checkpoint-interval can"
        )
    out = Path(args.out) if args.out is not None else _newest_run()
    info = own.classify(out)
    if info.kind != own.RUN or not (out / "latest").is_file() or not (out / "run.json").is_file():
        raise CheckpointError(f"{out} holds no run to resume (no latest checkpoint or run.json)")
    lock = own.RunLock(out).acquire()  # before reading: nobody else writes it meanwhile
    try:
        return _resume_locked(args, out, lock)
    except BaseException:
        lock.release()
        raise


def _resume_locked(args: argparse.Namespace, out: Path, lock: Any) -> _Run:
    from ..data.dataset import BatchSampler
    from ..training.trainer import Trainer

    run_file = out / "run.json"
    try:
        run = json.loads(run_file.read_text(encoding="utf-8"))
        source, val_fraction = run["data"]["source"], run["data"]["val_fraction"]
        digest, saved, config_name = run["data"]["sha256"], run["train_config"], run["config_name"]
        if not (source is None or isinstance(source, str)) or not isinstance(config_name, str):
            raise TypeError("data.source and config_name must be strings")
        sampler_args = (int(saved["batch_size"]), int(saved["seq_len"]), int(saved["seed"]))
        val_fraction = float(val_fraction)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{run_file} is corrupt: {exc!r}") from None
    text, data_desc, ds = _load_data(source, val_fraction)
    if _sha256_text(text) != digest:
        raise CheckpointError(
            f"the training text {source or '(default corpus)'} changed since the run "
            "started (SHA-256 differs): an exact resume needs the same data"
        )
    try:
        sampler = BatchSampler(ds.train, *sampler_args)
    except ConfigError as exc:
        raise CheckpointError(f"{run_file} is corrupt: {exc}") from None
    trainer = Trainer.resume(out, data_source=sampler, out_dir=out)
    if sampler.batches_drawn != trainer.step or trainer.step > trainer.config.total_steps:
        raise CheckpointError(
            f"{trainer.last_checkpoint}: step {trainer.step} disagrees with the data position "
            f"({sampler.batches_drawn} batches drawn) or the schedule "
            f"({trainer.config.total_steps} steps); the checkpoint is not from this run"
        )
    if args.steps is not None and args.steps < trainer.step:
        raise UsageError(
            f"--steps ({args.steps}) must be >= the run's current step {trainer.step} "
            "(--steps is the total length of the schedule, not the updates still to do)"
        )
    if args.stop_at is not None and args.stop_at < trainer.step:
        raise UsageError(
            f"--stop-at ({args.stop_at}) must be >= the run's current step {trainer.step}"
        )
    changes = {
        "total_steps": args.steps,
        "eval_interval": args.eval_interval,
        "checkpoint_interval": args.checkpoint_interval,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes:
        trainer.config = trainer.config.replace(**changes)
    if args.stop_at is not None and args.stop_at > trainer.config.total_steps:
        raise UsageError(
            f"--stop-at ({args.stop_at}) must be <= steps ({trainer.config.total_steps})"
        )
    _truncate_metrics(out / "metrics.jsonl", trainer.step)
    _say(f"resuming {out} at step {trainer.step} of {trainer.config.total_steps}")
    return _Run(out, lock, config_name, trainer, sampler, ds, data_desc)


def _run_train(args: argparse.Namespace) -> int:
    if args.stop_at is not None and args.steps is not None and args.stop_at > args.steps:
        raise UsageError(f"--stop-at ({args.stop_at}) must be <= --steps ({args.steps})")
    run = _resumed_run(args) if args.resume else _new_run(args)
    try:  # the run directory stays locked until the command ends (crash: the OS frees it)
        return _train(args, run)
    finally:
        run.lock.release()


def _train(args: argparse.Namespace, run: _Run) -> int:
    import numpy as np

    from ..data.dataset import eval_batches, unigram_entropy
    from ..data.tokenizer import ByteTokenizer

    trainer, ds, out = run.trainer, run.data, run.out
    model, tcfg, cfg = trainer.model, trainer.config, trainer.model.config
    entropy = unigram_entropy(np.concatenate([ds.train, ds.val]))
    stop = tcfg.total_steps if args.stop_at is None else args.stop_at
    todo = max(0, stop - trainer.step)
    _say(
        f"model: {run.config_name}, {_human(cfg.total_params())} parameters "
        f"({_human(cfg.active_params())} active per token)\n"
        f"data: {run.data_desc}; {ds.train.size:,} train / {ds.val.size:,} validation tokens\n"
        f"unigram entropy of the corpus: {entropy:.4f} nats/token\n"
        f"training: {todo} updates (to step {stop} of {tcfg.total_steps}), batch "
        f"{tcfg.batch_size} x {tcfg.seq_len}, lr {tcfg.lr:g} (warmup {tcfg.warmup_steps}, "
        f"cosine), {args.threads} BLAS thread(s)\n"
        f"run directory: {out}"
    )
    val_batches = eval_batches(ds.val, tcfg.batch_size, tcfg.seq_len, EVAL_BATCHES)
    start = time.perf_counter()
    with _blas_limit(args.threads):
        try:
            trainer.fit(run.sampler, todo, eval_batches=val_batches, progress=not args.quiet)
        except KeyboardInterrupt:
            last = trainer.last_checkpoint
            _note(
                f"interrupted at step {trainer.step}; last checkpoint: {last or 'none'}; "
                f"continue with: {PROG} train --resume --out {out}"
            )
            return 130
        elapsed = time.perf_counter() - start
        final = trainer.evaluate(
            eval_batches(ds.val, tcfg.batch_size, tcfg.seq_len, FINAL_EVAL_BATCHES)
        )
    png = plot_loss_curve(
        out / "metrics.jsonl",
        out / "loss_curve.png",
        entropy=entropy,
        title=f"nn-core train: {run.config_name} config, {run.data_label}, "
        f"batch {tcfg.batch_size} x {tcfg.seq_len}",
        final_val_ce=final["val_ce"],
    )
    tokenizer = ByteTokenizer()
    sample = ""
    if args.sample_tokens:
        sample = _training_sample(model, tokenizer, ds, run.data_desc, args.sample_tokens)
        _write_text(out / "sample.txt", sample)
    rate = f" ({todo / elapsed:.1f} updates/s)" if todo and elapsed > 0 else ""
    _say(
        f"\nstep {trainer.step} of {tcfg.total_steps}; {todo} updates in {elapsed:.1f} s{rate}\n"
        f"validation cross-entropy: {final['val_ce']:.4f} nats/token "
        f"(with aux loss {final['val_loss']:.4f}); unigram entropy: {entropy:.4f} "
        f"({final['val_ce'] - entropy:+.4f} nats, {final['val_ce'] / entropy:.0%} of it)\n"
        f"checkpoint: {trainer.last_checkpoint}\nloss curve: {png}"
    )
    if sample:
        _say(
            f"\nsample ({args.sample_tokens} tokens, top-k {SAMPLE_TOP_K}, "
            f"temperature {SAMPLE_TEMPERATURE}):\n{sample}"
        )
    _write_json(
        out / "summary.json",
        {
            "step": trainer.step,
            "total_steps": tcfg.total_steps,
            "updates_this_session": todo,
            "seconds_this_session": elapsed,
            "unigram_entropy": entropy,
            **final,
            "checkpoint": str(trainer.last_checkpoint),
            "sample": sample,
        },
    )
    return 0


def _training_sample(model: Any, tokenizer: Any, ds: Any, data_desc: str, n: int) -> str:
    """A short top-k sample after training, from "def " (default corpus) or the first 16
    tokens of the validation split."""
    import numpy as np

    from ..inference.generate import generate
    from ..inference.sampling import TopK

    if data_desc.startswith("default corpus"):
        prompt = tokenizer.encode(DEFAULT_CORPUS_PROMPT)
    else:
        prompt = ds.val[:16]
    n = min(n, model.config.max_seq_len - prompt.size)
    strategy = TopK(SAMPLE_TOP_K, SAMPLE_TEMPERATURE)
    ids = generate(
        model,
        prompt,
        prompt.size + n,
        strategy,
        rng=np.random.default_rng(0),
        vocab_limit=tokenizer.vocab_size,
    )
    return tokenizer.decode(np.asarray(ids))


def plot_loss_curve(
    metrics_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    *,
    entropy: float | None = None,
    title: str = "nn-core training",
    final_val_ce: float | None = None,
) -> Path:
    """Train CE (raw and smoothed) and validation CE per step from metrics.jsonl, with the
    unigram entropy as a reference line; written with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps, train_ce, val_steps, val_ce = [], [], [], []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        m = json.loads(line)
        steps.append(m["step"] + 1)  # updates done after this one
        train_ce.append(m["ce"])
        if "val_ce" in m:
            val_steps.append(m["step"] + 1)
            val_ce.append(m["val_ce"])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if steps:
        ce = np.asarray(train_ce)
        ax.plot(steps, ce, color="tab:blue", alpha=0.25, lw=0.7, label="train (per batch)")
        # moving average over i-h..i+h, h growing from 0 to ~1/60 of the run (the steep
        # start is not smeared); cut off at the last step
        idx = np.arange(ce.size)
        half = np.minimum(max(1, ce.size // 60), idx // 4)
        lo, hi = idx - half, np.minimum(ce.size, idx + half + 1)
        csum = np.concatenate([[0.0], np.cumsum(ce)])
        smooth = (csum[hi] - csum[lo]) / (hi - lo)
        ax.plot(steps, smooth, color="tab:blue", lw=1.6, label="train (moving average)")
    if val_ce:
        ax.plot(val_steps, val_ce, "o-", color="tab:orange", lw=1.6, ms=4, label="validation")
    if final_val_ce is not None:
        label = f"final validation {final_val_ce:.3f}"
        ax.axhline(final_val_ce, color="tab:orange", ls=":", lw=1.0, label=label)
    if entropy is not None:
        ax.axhline(
            entropy, color="tab:red", ls="--", lw=1.0, label=f"unigram entropy {entropy:.3f}"
        )
    ax.set_xlabel("update")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(png_path)
    from ..storage.checkpoint import atomic_write_file

    try:
        atomic_write_file(out, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return out


# ---- generate ----------------------------------------------------------------------------


def _add_generate(sub: Any) -> None:
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
    p.add_argument("--max-new-tokens", type=_pos_int, default=200, help="default 200")
    p.add_argument(
        "--strategy",
        choices=["greedy", "temperature", "sample", "top_k", "top-k", "top_p", "top-p"],
        help="sampling strategy (default top_k, or top_p when --top-p is given)",
    )
    p.add_argument(
        "--temperature", type=_temperature, default=0.8, help=">= 0; 0 = greedy (default 0.8)"
    )
    p.add_argument("--top-k", type=_pos_int, default=40, help="k of top_k (default 40)")
    p.add_argument("--top-p", type=_top_p, help="p of top_p, in (0, 1] (default 0.9)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="sample i uses seed + i")
    p.add_argument("--num-samples", type=_pos_int, default=1, help="samples to draw (default 1)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are decoded")
    p.set_defaults(run=_run_generate)


def _check_utf8(value: str, option: str, advice: str) -> None:
    """Refuse an argument holding bytes that are not UTF-8 (Python keeps them as surrogate
    escapes, which cannot be encoded)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = value[exc.start].encode("utf-8", "surrogateescape")
        raise UsageError(
            f"{option} is not valid UTF-8 (byte 0x{byte.hex()} at character {exc.start}); {advice}"
        ) from None


def _find_tokenizer(checkpoint: Path) -> Any:
    """tokenizer.json in the checkpoint directory or its run directory; else byte level."""
    from ..data.tokenizer import ByteTokenizer

    for where in (checkpoint, checkpoint.parent):
        if (where / "tokenizer.json").is_file():
            return ByteTokenizer.load(where / "tokenizer.json")
    _note(f"no tokenizer.json beside {checkpoint}; using the byte tokenizer")
    return ByteTokenizer()


def _run_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from ..data.corpus import load_text
    from ..inference.generate import generate_batch, stream
    from ..inference.sampling import make_strategy
    from ..storage.checkpoint import load_model, resolve_checkpoint

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
        _check_utf8(args.prompt, "--prompt", "put the text in a UTF-8 file: --prompt-file")
        text = args.prompt
    else:
        text = load_text(args.prompt_file)
    model = load_model(args.checkpoint)  # a run directory: its latest, verified
    tokenizer = _find_tokenizer(resolve_checkpoint(args.checkpoint))
    max_seq = model.config.max_seq_len
    if args.max_new_tokens > max_seq - 1:
        raise UsageError(
            f"--max-new-tokens must be <= max_seq_len - 1 = {max_seq - 1} for this model, "
            f"got {args.max_new_tokens}"
        )
    prompt = tokenizer.encode(text)
    room = max_seq - args.max_new_tokens
    if prompt.size > room:
        _note(
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
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            rng = np.random.default_rng(seed)
            for tok in stream(
                model, prompt, args.max_new_tokens, strategy, rng=rng, vocab_limit=limit
            ):
                out.write(decoder.decode(bytes([tok])) if tok < 256 else "")  # bytes only
                out.flush()
            out.write(decoder.decode(b"", final=True) + "\n")
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


# ---- export / import / evaluate (nn_core.storage.weights, nn_core.app.jobs) -------


def _add_export(sub: Any) -> None:
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
        "--out",
        required=True,
        help="output file, e.g. model.safetensors (its directory must exist; an existing "
        "nn-core weights file is replaced)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace --out even if it is another kind of file"
    )
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from ..storage.ownership import check_file_output
    from ..storage.weights import export_weights

    check_file_output(args.out, overwrite=args.force, force="--force")
    out = export_weights(args.checkpoint, args.out, overwrite=args.force)
    _say(f"wrote {out} ({_human(out.stat().st_size)}B)")
    return 0


def _add_import(sub: Any) -> None:
    p = sub.add_parser(
        "import",
        help="turn a .safetensors weights file into an nn-core model directory",
        description="Verify a weights file (names, shapes, dtypes, finite values, config) "
        "and write a model directory that generate / evaluate / MoETransformer.load read.",
    )
    p.add_argument("file", help="weights file (.safetensors)")
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
    p.add_argument(
        "--config",
        help="preset or .toml/.json config, for a file without nn_core_config metadata "
        "(if the file has one, they must agree)",
    )
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE")
    p.set_defaults(run=_run_import)


def _run_import(args: argparse.Namespace) -> int:
    from ..storage.weights import import_weights

    if args.set and args.config is None:
        raise UsageError("--set applies to --config; give --config too")
    from ..storage.ownership import MODEL, check_dir_output

    config = None if args.config is None else resolve_configs(args.config, args.set or [])[0]
    check_dir_output(args.out, MODEL, overwrite=args.force, force="--force")
    out = import_weights(args.file, args.out, config=config, overwrite=args.force)
    _say(f"wrote model directory {out}")
    return 0


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="loss and perplexity of a checkpoint on a text file (parallel)",
        description="Mean cross-entropy over non-overlapping windows of a UTF-8 file "
        "(byte tokens), spread over local worker processes or a Dask cluster.",
    )
    p.add_argument(
        "--checkpoint", required=True, help="run directory (uses its latest) or checkpoint dir"
    )
    p.add_argument("--data", required=True, help="UTF-8 text file")
    p.add_argument("--seq-len", type=_pos_int, default=64, help="window length (default 64)")
    p.add_argument("--batch-size", type=_pos_int, default=16, help="windows per work unit")
    p.add_argument("--max-batches", type=_pos_int, help="at most this many (evenly spread)")
    p.add_argument("--workers", type=_pos_int, default=2, help="local processes (default 2)")
    p.add_argument(
        "--scheduler", help="Dask scheduler address (tcp://host:8786) instead of local processes"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .jobs import evaluate_file

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
        _say(json.dumps(result))
    else:
        _say(
            f"loss {result['loss']:.4f} nats/token  perplexity {result['perplexity']:.2f}  "
            f"({result['tokens']:,} tokens, {result['batches']} batches)"
        )
    return 0


# ---- info --------------------------------------------------------------------------------


def _add_info(sub: Any) -> None:
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
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_run_info)


def runtime_info() -> dict[str, Any]:
    """Versions, CPU count and the BLAS libraries with their thread counts (threadpoolctl)."""
    import platform
    from importlib import metadata

    import numpy as np
    from threadpoolctl import threadpool_info

    from ..version import __version__

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    blas = [
        {
            "api": lib.get("internal_api"),
            "prefix": lib.get("prefix"),
            "version": lib.get("version"),
            "threading_layer": lib.get("threading_layer"),
            "architecture": lib.get("architecture"),
            "num_threads": lib.get("num_threads"),
            "filepath": lib.get("filepath"),
        }
        for lib in threadpool_info()
        if lib.get("user_api") == "blas"
    ]
    return {
        "nn_core": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": version("numba"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "blas": blas,
    }


def _run_info(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {}
    if args.checkpoint is not None:
        from ..storage.checkpoint import read_state, resolve_checkpoint

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
        cfg, name, _ = resolve_configs(args.config, args.set or [])
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
        _say(json.dumps(doc, indent=2))
        return 0
    _say(f"config: {name}")
    for key, value in extra.items():
        _say(f"  {key}: {value}")
    for key, value in cfg.to_dict().items():
        _say(f"  {key:<15} {value}")
    _say(
        f"parameters: {total:,} total ({_human(total)}), {active:,} active per token "
        f"({_human(active)}); float32 weights {4 * total / 2**20:,.1f} MiB"
    )
    rt = doc["runtime"]
    _say(
        f"nn-core {rt['nn_core']}, Python {rt['python']}, NumPy {rt['numpy']}, "
        f"numba {rt['numba'] or 'not installed'}; {rt['cpu_count']} CPUs; {rt['platform']}"
    )
    if not rt["blas"]:
        _say("BLAS: none found by threadpoolctl")
    for lib in rt["blas"]:
        _say(
            f"BLAS: {lib['api']} {lib['version']} ({lib['threading_layer']} threading, "
            f"{lib['architecture']}), {lib['num_threads']} threads: {lib['filepath']}"
        )
    return 0


# ---- forwarded subcommands ---------------------------------------------------------------


def _run_bench(argv: list[str]) -> int:
    from ..bench import main as bench_main

    return int(bench_main(argv) or 0)


def _run_convergence(argv: list[str]) -> int:
    from ..training.convergence import main as convergence_main

    return int(convergence_main(argv) or 0)


# name -> (help, function taking the remaining argv)
FORWARDED: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "bench": ("the benchmark harness (all arguments go to python -m nn_core.bench)", _run_bench),
    "convergence": (
        "the suite's convergence check (arguments go to python -m nn_core.training.convergence)",
        _run_convergence,
    ),
}

SUBCOMMANDS: list[Callable[[Any], None]] = [
    _add_train,
    _add_generate,
    _add_evaluate,
    _add_export,
    _add_import,
    _add_info,
]


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = _Parser(
        prog=PROG,
        description="nn-core: a from-scratch Mixture-of-Experts transformer on NumPy.",
        epilog="Exit status: 0 ok, 1 runtime error, 2 usage error (including a refused --out), "
        "130 interrupted, 141 stdout closed early (broken pipe).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    for name, (help_text, _) in FORWARDED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a tool killed by SIGPIPE reports


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (errors: one line on stderr)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if argv is None:  # a real command line: print paths holding non-UTF-8 bytes as given
        with contextlib.suppress(AttributeError, ValueError):
            sys.stdout.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
    try:
        if args_list and args_list[0] in FORWARDED:
            status = FORWARDED[args_list[0]][1](args_list[1:])
        else:
            args = build_parser().parse_args(args_list)
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
