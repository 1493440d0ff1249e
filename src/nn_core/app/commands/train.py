"""``nn-core train``: train on a text file (or the default corpus), resumable bit for bit.

nn-core train                        tiny config on the default corpus, a few minutes
nn-core train --data FILE --config small --set lr=1e-3 --steps 5000 --out DIR
nn-core train --resume --out DIR     continue DIR/latest exactly (weights, AdamW, data)
nn-core train --steps 3000 --stop-at 1000    stop early; --resume later continues the
                                     same schedule, bit for bit as one straight run
mpiexec -n 2 nn-core train ...       the same run over 2 processes (docs/distributed.md)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...data.tokenizer import tokenizer_files
from ...errors import CheckpointError, ConfigError, OutputError
from ...model.config import Config
from ...training.config import DEFAULT_RUN, resolve_run_config
from ..options import (
    PROG,
    UsageError,
    add_config_options,
    fraction,
    human,
    nonneg_int,
    note,
    pos_float,
    pos_int,
    say,
)
from ..run_dir import LOSS_CURVE_FILE, SAMPLE_FILE, SUMMARY_FILE, TOKENIZER_FILE, RunDir

DEFAULT_TOKENIZER = "bpe"  # 2.32 vs 2.83 bits/byte at 400 steps (docs/interop.md)
EVAL_BATCHES = 16  # validation batches per periodic evaluation
FINAL_EVAL_BATCHES = 256  # at most this many for the final number (the whole default val split)
SAMPLE_TOKENS = 200  # length of the sample printed at the end of training
SAMPLE_TOP_K, SAMPLE_TEMPERATURE = 10, 0.8  # its strategy: top-k sampling, seed 0
DEFAULT_CORPUS_PROMPT = "def "

# options that would change the run's math, refused with --resume (dest -> flag)
FIXED_ON_RESUME = {
    "config": "--config",
    "data": "--data",
    "glob": "--glob",
    "skip_bad": "--skip-bad",
    "batch_size": "--batch-size",
    "seq_len": "--seq-len",
    "lr": "--lr",
    "seed": "--seed",
    "val_fraction": "--val-fraction",
    "warmup_steps": "--warmup-steps",
}
# explicit options -> TrainConfig fields (they override --config and --set)
EXPLICIT = {
    "steps": "total_steps",
    "batch_size": "batch_size",
    "seq_len": "seq_len",
    "lr": "lr",
    "warmup_steps": "warmup_steps",
    "eval_interval": "eval_interval",
    "checkpoint_interval": "checkpoint_interval",
    "seed": "seed",
}


def add(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on a text file (default: tiny config, default corpus)",
        description=(
            "Train on UTF-8 text (a byte-level BPE or bytes: --tokenizer). With no options: "
            "the tiny config "
            "on the default corpus (Python standard-library source) for "
            f"{DEFAULT_RUN['total_steps']} steps of {DEFAULT_RUN['batch_size']} x "
            f"{DEFAULT_RUN['seq_len']} tokens. Precedence: preset < config file < --set "
            "< explicit options."
        ),
    )
    add_config_options(p, "model or train config")
    p.add_argument(
        "--data",
        metavar="PATH",
        help="a UTF-8 text file, a directory of them (recursive) or a prepared dataset "
        "(nn-core prepare) to train on (default: the default corpus)",
    )
    p.add_argument("--glob", metavar="PATTERN", help="with a directory: only files matching it")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        default=None,
        help="with a directory: skip unreadable, empty or non-UTF-8 files (listed)",
    )
    p.add_argument(
        "--steps", type=pos_int, metavar="N", help="total updates (the LR schedule's length)"
    )
    p.add_argument("--batch-size", type=pos_int, metavar="B", help="sequences per batch")
    p.add_argument("--seq-len", type=pos_int, metavar="S", help="tokens per sequence")
    p.add_argument("--lr", type=pos_float, metavar="LR", help="peak learning rate")
    p.add_argument("--warmup-steps", type=nonneg_int, metavar="N", help="linear warmup updates")
    p.add_argument(
        "--eval-interval", type=nonneg_int, metavar="N", help="validate every N updates (0: never)"
    )
    p.add_argument(
        "--checkpoint-interval",
        type=nonneg_int,
        metavar="N",
        help="checkpoint every N updates (0: end only)",
    )
    p.add_argument(
        "--seed", type=nonneg_int, metavar="N", help="seed of the weights and the batch sampler"
    )
    p.add_argument(
        "--val-fraction",
        type=fraction,
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
        type=pos_int,
        metavar="STEP",
        help="stop after update STEP (checkpointed); the schedule still spans --steps; "
        "continue with --resume",
    )
    p.add_argument(
        "--threads",
        type=pos_int,
        metavar="N",
        help="at most N BLAS threads (default: the library picks per product size)",
    )
    p.add_argument(
        "--sample-tokens",
        type=nonneg_int,
        metavar="N",
        default=SAMPLE_TOKENS,
        help=f"length of the sample printed at the end (default {SAMPLE_TOKENS})",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--tokenizer",
        metavar="byte|bpe|FILE",
        help=f"bytes, a byte-level BPE trained on the training split with the config's "
        f"vocab_size, or a tokenizer.json (default {DEFAULT_TOKENIZER}; fixed for the run)",
    )
    p.add_argument(
        "--init",
        metavar="CHECKPOINT",
        help="start from these weights (a model directory, e.g. from nn-core import, or a "
        "run) instead of random ones: fine-tuning; the config and tokenizer are its own",
    )
    p.set_defaults(run=run)


@dataclass
class Run:
    """A training run ready to go: a fresh one or one restored from its checkpoint."""

    dir: RunDir  # locked until the command ends
    config_name: str
    trainer: Any  # nn_core.training.Trainer (model, TrainConfig, AdamW, data source)
    sampler: Any  # nn_core.data.BatchSampler over the train split
    data: Any  # nn_core.data.TokenDataset
    data_desc: str
    tokenizer: Any = None  # the run's tokenizer (None: bytes)
    val_bytes: int = 0  # UTF-8 bytes of the validation split (for bits per byte)
    source: Any = None  # nn_core.data.prepared.DataSource (its tokenizer, entropy)

    @property
    def data_label(self) -> str:
        """A short name of the training text for plot titles."""
        if self.data_desc.startswith("default corpus"):
            return "default corpus (stdlib source)"
        return os.path.basename(self.data_desc.split(" (")[0])


def check_allocatable(cfg: Config) -> None:
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


def new_run(args: argparse.Namespace) -> Run:
    from ...data.dataset import BatchSampler, eval_batches
    from ...data.prepared import load_data, report_skipped
    from ...model.transformer import MoETransformer
    from ...training.trainer import Trainer

    init = _init_model(args)
    explicit = {field: getattr(args, dest) for dest, field in EXPLICIT.items()}
    overrides = {k: v for k, v in explicit.items() if v is not None}
    cfg, config_name, tcfg = resolve_run_config(args.config, args.set, overrides)
    if init is not None:
        cfg, config_name = init[0].config, f"init from {args.init}"
    if tcfg.seq_len > cfg.max_seq_len:
        raise ConfigError(f"seq_len must be <= max_seq_len {cfg.max_seq_len}, got {tcfg.seq_len}")
    if args.stop_at is not None and args.stop_at > tcfg.total_steps:
        raise UsageError(f"--stop-at ({args.stop_at}) must be <= steps ({tcfg.total_steps})")
    check_allocatable(cfg)
    RunDir.check_new(args.out, args.force)  # before any work
    data = load_data(
        args.data, val_fraction=args.val_fraction, glob=args.glob, skip_bad=bool(args.skip_bad)
    )
    report_skipped(data, note)
    data, val_bytes = _run_tokenizer(args, init, data, cfg.vocab_size)
    ds, data_desc, val_fraction = data.dataset, data.description, data.val_fraction
    sampler = BatchSampler(ds.train, tcfg.batch_size, tcfg.seq_len, tcfg.seed)
    eval_batches(ds.val, tcfg.batch_size, tcfg.seq_len, 1)  # is the val split long enough?
    run_dir = RunDir.create(args.out, config_name, args.force)
    try:
        model = MoETransformer(cfg, seed=tcfg.seed)
        if init is not None:
            np.copyto(model.flat_params, init[0].flat_params, casting="same_kind")
        trainer = Trainer(model, tcfg, out_dir=run_dir.path, data_source=sampler)
        for name, content in tokenizer_files(data.tokenizer).items():
            run_dir.write_text(name, content)
        run_dir.write_run_info(
            config_name=config_name,
            config=cfg,
            train_config=tcfg,
            data_source=args.data,
            data_description=data_desc,
            text=None,
            data_sha256=data.sha256,
            data_options={"glob": args.glob, "skip_bad": bool(args.skip_bad), **data.options},
            val_fraction=val_fraction,
            train_tokens=int(ds.train.size),
            val_tokens=int(ds.val.size),
            tokenizer=data.tokenizer.to_dict(),
            command=[PROG, *(sys.argv[1:] if args.argv is None else args.argv)],
        )
    except BaseException:
        run_dir.release()
        raise
    return Run(
        run_dir, config_name, trainer, sampler, ds, data_desc, data.tokenizer, val_bytes, data
    )


def _init_model(args: argparse.Namespace) -> tuple[Any, Any] | None:
    """(model, its tokenizer or None) of ``--init``; --config / --set cannot change it."""
    if args.init is None:
        return None
    from ...storage.checkpoint import load_model
    from ...storage.hf import run_tokenizer

    if args.config is not None or args.set:
        raise UsageError("--config / --set cannot change the model of --init (its config)")
    return load_model(args.init), run_tokenizer(args.init)


def _run_tokenizer(args: argparse.Namespace, init: Any, data: Any, vocab: int) -> tuple[Any, int]:
    """(data in the run's tokens, validation bytes) of a new run: --tokenizer (a BPE is
    trained on the training split only), --init's tokenizer or a prepared dataset's (a
    different --tokenizer is refused in one line)."""
    from ...data.retokenize import training_texts
    from ...data.tokenizer import ByteTokenizer, check_same_tokenizer, choose_tokenizer

    spec = args.tokenizer
    fixed = init[1] or ByteTokenizer() if init is not None else None
    if data.kind == "prepared":
        if fixed is not None:
            check_same_tokenizer(fixed, data.tokenizer, str(args.init))
        fixed, where = data.tokenizer, str(args.data)
    else:
        where = str(args.init)
    train_text = training_texts([data.dataset.train]) if data.kind != "prepared" else []
    if fixed is not None:
        tokenizer = fixed
        if spec is not None:
            check_same_tokenizer(fixed, choose_tokenizer(spec, train_text, vocab), where)
    else:
        tokenizer = choose_tokenizer(DEFAULT_TOKENIZER if spec is None else spec, train_text, vocab)
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"vocab_size must be >= {tokenizer.vocab_size}, got {vocab}")
    return retokenized(data, tokenizer)


def retokenized(data: Any, tokenizer: Any) -> tuple[Any, int]:
    """(``data`` read with bytes, now in ``tokenizer``'s ids, its validation bytes): each
    split is re-encoded on its own (``nn_core.data.retokenize``: EOS kept between
    documents), so the split stays where bytes put it and nothing of the validation text
    is in the training ids; ``nn-core prepare`` writes the same ids."""
    import dataclasses

    from ...data.dataset import TokenDataset, unigram_entropy
    from ...data.retokenize import retokenize
    from ...data.tokenizer import ByteTokenizer

    byte = ByteTokenizer()
    if data.kind == "prepared" or isinstance(tokenizer, ByteTokenizer):
        val_bytes = len(data.tokenizer.decode(np.asarray(data.dataset.val)).encode("utf-8"))
        return data, val_bytes
    val_text = byte.decode(data.dataset.val)
    train = retokenize(data.dataset.train, tokenizer)  # [T_train], EOS between documents
    val = retokenize(data.dataset.val, tokenizer)  # [T_val]
    entropy = unigram_entropy(np.concatenate([train, val]))
    out = dataclasses.replace(
        data, dataset=TokenDataset(train, val), tokenizer=tokenizer, unigram_entropy=entropy
    )
    return out, len(val_text.encode("utf-8"))


def resumed_run(args: argparse.Namespace) -> Run:
    given = [flag for dest, flag in FIXED_ON_RESUME.items() if getattr(args, dest) is not None]
    given += ["--set"] if args.set else []
    given += ["--force"] if args.force else []
    given += ["--init"] if args.init else []
    if given:
        raise UsageError(
            f"{', '.join(given)} cannot change when resuming (the run's settings are in "
            "run.json); only --steps, --stop-at, --eval-interval, --checkpoint-interval can"
        )
    run_dir = RunDir.open(args.out)
    try:
        return _resume_locked(args, run_dir)
    except BaseException:
        run_dir.release()
        raise


def _resume_locked(args: argparse.Namespace, run_dir: RunDir) -> Run:
    from ...data.dataset import BatchSampler
    from ...data.prepared import load_data
    from ...training.trainer import Trainer
    from ..run_dir import RUN_FILE

    info = run_dir.read_run_info()
    opts = info.data_options or {}
    data = load_data(
        info.data_source,
        val_fraction=info.val_fraction,
        glob=opts.get("glob"),
        skip_bad=bool(opts.get("skip_bad")),
    )
    ds, data_desc = data.dataset, data.description
    if data.sha256 != info.data_sha256:
        raise CheckpointError(
            f"the training text {info.data_source or '(default corpus)'} changed since the run "
            "started (SHA-256 differs): an exact resume needs the same data"
        )
    vocab = int(info.config.get("vocab_size", 1000))  # the run's, for a --tokenizer bpe check
    data, val_bytes = _resumed_tokenizer(args, run_dir, data, vocab)
    ds = data.dataset
    saved = info.train_config
    try:
        sampler = BatchSampler(ds.train, saved["batch_size"], saved["seq_len"], saved["seed"])
    except (ConfigError, KeyError) as exc:
        raise CheckpointError(f"{run_dir.file(RUN_FILE)} is corrupt: {exc}") from None
    trainer = Trainer.resume(run_dir.path, data_source=sampler, out_dir=run_dir.path)
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
    run_dir.truncate_metrics(trainer.step)
    say(f"resuming {run_dir.path} at step {trainer.step} of {trainer.config.total_steps}")
    return Run(
        run_dir, info.config_name, trainer, sampler, ds, data_desc, data.tokenizer, val_bytes, data
    )


def _resumed_tokenizer(
    args: argparse.Namespace, run_dir: RunDir, data: Any, vocab: int
) -> tuple[Any, int]:
    """The run's data in its saved tokenizer's ids; a different --tokenizer is refused."""
    from ...data.retokenize import training_texts
    from ...data.tokenizer import (
        ByteTokenizer,
        check_same_tokenizer,
        choose_tokenizer,
        load_tokenizer,
    )

    path = run_dir.file(TOKENIZER_FILE)
    tokenizer = load_tokenizer(path) if path.is_file() else ByteTokenizer()
    if args.tokenizer is not None:
        text = training_texts([data.dataset.train]) if data.kind != "prepared" else []
        check_same_tokenizer(
            tokenizer, choose_tokenizer(args.tokenizer, text, vocab), str(run_dir.path)
        )
    if data.kind == "prepared":
        check_same_tokenizer(tokenizer, data.tokenizer, str(run_dir.path))
    return retokenized(data, tokenizer)


def run(args: argparse.Namespace) -> int:
    from ...training.distributed import world

    group = world()  # mpiexec -n R with R > 1: data parallelism (None: this process alone)
    if group is not None:
        return run_ranks(args, group)
    if args.stop_at is not None and args.steps is not None and args.stop_at > args.steps:
        raise UsageError(f"--stop-at ({args.stop_at}) must be <= --steps ({args.steps})")
    r = resumed_run(args) if args.resume else new_run(args)
    with r.dir:  # the run directory stays locked until the command ends (a crash frees it)
        return train(args, r)


# ---- mpiexec -n R nn-core train ... (nn_core.training.distributed; docs/distributed.md) ----


def run_ranks(args: argparse.Namespace, group: Any) -> int:
    """Rank 0 runs the command as one process would (run directory, lock, messages,
    metrics, checkpoints, plots) and sends its starting state to the other ranks, which
    train beside it and write nothing. An error on any rank ends all of them."""
    from ...training.distributed import run_ranks as run_guarded

    def main() -> int:
        if group.rank != 0:
            return follow(args, group)
        if args.stop_at is not None and args.steps is not None and args.stop_at > args.steps:
            raise UsageError(f"--stop-at ({args.stop_at}) must be <= --steps ({args.steps})")
        r = resumed_run(args) if args.resume else new_run(args)
        with r.dir:
            return train(args, r, group)

    return run_guarded(group, main, lambda exc: report_rank_error(exc, group))


def share_run(group: Any, run: Run, todo: int, threads: int | None) -> None:
    """Rank 0: what the other ranks need to train beside it (``follow``): the token ids
    of both splits as rank 0 read and tokenized them (so no other rank reads the data),
    the sampler's shape and the trainer's whole state."""
    from ...training.replicas import share_trainer

    tcfg = run.trainer.config
    splits = [run.data.train, run.data.val]
    maps = [file_window(a) for a in splits]  # a prepared dataset: each rank maps the file
    shape = {"batch_size": tcfg.batch_size, "seq_len": tcfg.seq_len, "seed": tcfg.seed}
    tokens = [(a.shape, a.dtype.str) for a in splits]
    group.broadcast({"todo": todo, "threads": threads, "tokens": tokens, "maps": maps, **shape})
    for array, mapped in zip(splits, maps):
        if mapped is None:
            group.broadcast_array(np.ascontiguousarray(array))
    share_trainer(group, run.trainer)


def file_window(a: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset) of a contiguous view of a memory-mapped file, else None."""
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not (isinstance(root, np.memmap) and root.filename and a.flags.c_contiguous):
        return None
    start = a.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    return str(root.filename), int(root.offset + start)


def follow(args: argparse.Namespace, group: Any) -> int:
    """A rank other than 0: the same updates and evaluations as rank 0, writing nothing."""
    from ...data.dataset import BatchSampler, eval_batches
    from ...model.blas import blas_threads
    from ...training.replicas import receive_trainer

    job = group.broadcast(None)
    train_ids, val_ids = (
        group.broadcast_array(np.empty(shape, dtype))
        if mapped is None
        else np.memmap(mapped[0], dtype, mode="r", offset=mapped[1], shape=shape)
        for (shape, dtype), mapped in zip(job["tokens"], job["maps"])
    )
    b, s = job["batch_size"], job["seq_len"]
    sampler = BatchSampler(train_ids, b, s, job["seed"])
    trainer = receive_trainer(group, sampler)
    with blas_threads(job["threads"]):
        trainer.fit(sampler, job["todo"], eval_batches=eval_batches(val_ids, b, s, EVAL_BATCHES))
        trainer.evaluate(eval_batches(val_ids, b, s, FINAL_EVAL_BATCHES))
    return 0


def report_rank_error(exc: BaseException, group: Any) -> int:
    """Print an error of this rank in one line (as the command line does); its status."""
    from ...errors import NNCoreError

    where = f" (rank {group.rank} of {group.size})"
    if isinstance(exc, KeyboardInterrupt):
        note(f"interrupted{where}")
        return 130
    if not isinstance(exc, (UsageError, ConfigError, NNCoreError, OSError, MemoryError)):
        import traceback

        traceback.print_exception(exc)
        return 1
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        message = f"{exc.filename}: {exc.strerror}"
    print(f"{PROG}: error{where}: {message}", file=sys.stderr, flush=True)
    return 2 if isinstance(exc, (UsageError, ConfigError, OutputError)) else 1


def train(args: argparse.Namespace, run: Run, group: Any = None) -> int:
    from ...data.dataset import eval_batches, unigram_entropy
    from ...data.tokenizer import ByteTokenizer
    from ...model.blas import blas_threads
    from ...training.telemetry import worst_max_min
    from ..plots import plot_loss_curve, plot_run

    trainer, ds, out = run.trainer, run.data, run.dir
    model, tcfg, cfg = trainer.model, trainer.config, trainer.model.config
    entropy = (
        run.source.unigram_entropy
        if run.source is not None
        else unigram_entropy(np.concatenate([ds.train, ds.val]))
    )
    stop = tcfg.total_steps if args.stop_at is None else args.stop_at
    todo = max(0, stop - trainer.step)
    n_threads = 1 if group is not None and args.threads is None else args.threads
    if group is not None:  # the other ranks start from this state (docs/distributed.md)
        share_run(group, run, todo, n_threads)
    threads = "chosen per product size" if n_threads is None else f"at most {n_threads}"
    ranks = "" if group is None else f" over {group.size} ranks"
    say(
        f"model: {run.config_name}, {human(cfg.total_params())} parameters "
        f"({human(cfg.active_params())} active per token)\n"
        f"data: {run.data_desc}; {ds.train.size:,} train / {ds.val.size:,} validation tokens\n"
        f"unigram entropy of the corpus: {entropy:.4f} nats/token\n"
        f"training: {todo} updates (to step {stop} of {tcfg.total_steps}), batch "
        f"{tcfg.batch_size} x {tcfg.seq_len}{ranks}, lr {tcfg.lr:g} (warmup {tcfg.warmup_steps}, "
        f"cosine), BLAS threads {threads}\n"
        f"run directory: {out.path}"
    )
    val_batches = eval_batches(ds.val, tcfg.batch_size, tcfg.seq_len, EVAL_BATCHES)
    plots = out.plots_dir()  # refused now, not after training, if plots/ is not ours
    start = time.perf_counter()
    with blas_threads(n_threads):
        try:
            trainer.fit(run.sampler, todo, eval_batches=val_batches, progress=not args.quiet)
        except KeyboardInterrupt:
            last = trainer.last_checkpoint
            note(
                f"interrupted at step {trainer.step}; last checkpoint: {last or 'none'}; "
                f"continue with: {PROG} train --resume --out {out.path}"
            )
            return 130
        elapsed = time.perf_counter() - start
        final = trainer.evaluate(
            eval_batches(ds.val, tcfg.batch_size, tcfg.seq_len, FINAL_EVAL_BATCHES)
        )
    png = plot_loss_curve(
        out.read_metrics(),
        out.file(LOSS_CURVE_FILE),
        entropy=entropy,
        title=f"nn-core train: {run.config_name} config, {run.data_label}, "
        f"batch {tcfg.batch_size} x {tcfg.seq_len}",
        final_val_ce=final["val_ce"],
    )
    plot_run(out.read_metrics(), plots, title=f"nn-core run {out.path.name}")
    tokenizer = run.tokenizer or ByteTokenizer()
    bits = final["val_ce"] / np.log(2) * ds.val.size / max(run.val_bytes, 1)  # bits per byte
    sample = ""
    if args.sample_tokens:
        sample = training_sample(model, tokenizer, ds, run.data_desc, args.sample_tokens)
        out.write_text(SAMPLE_FILE, sample)
    rate = f" ({todo / elapsed:.1f} updates/s)" if todo and elapsed > 0 else ""
    say(
        f"\nstep {trainer.step} of {tcfg.total_steps}; {todo} updates in {elapsed:.1f} s{rate}\n"
        f"validation cross-entropy: {final['val_ce']:.4f} nats/token "
        f"(with aux loss {final['val_loss']:.4f}); unigram entropy: {entropy:.4f} "
        f"({final['val_ce'] - entropy:+.4f} nats, {final['val_ce'] / entropy:.0%} of it)\n"
        f"validation bits per byte: {bits:.4f} (tokenizer {tokenizer.to_dict()['type']}, "
        f"{tokenizer.vocab_size} tokens)\n"
        f"checkpoint: {trainer.last_checkpoint}\nloss curve: {png}\nplots: {plots}\n"
        f"expert load (validation), worst layer's max/min: "
        f"{worst_max_min(final['val_experts']):.2f}; unused experts per layer: "
        f"{final['val_experts']['unused']}"
    )
    if sample:
        say(
            f"\nsample ({args.sample_tokens} tokens, top-k {SAMPLE_TOP_K}, "
            f"temperature {SAMPLE_TEMPERATURE}):\n{sample}"
        )
    out.write_json(
        SUMMARY_FILE,
        {
            "step": trainer.step,
            "total_steps": tcfg.total_steps,
            "updates_this_session": todo,
            "seconds_this_session": elapsed,
            "unigram_entropy": entropy,
            **final,
            "val_bits_per_byte": float(bits),
            "tokenizer": tokenizer.to_dict(),
            "checkpoint": str(trainer.last_checkpoint),
            "sample": sample,
        },
    )
    return 0


def training_sample(model: Any, tokenizer: Any, ds: Any, data_desc: str, n: int) -> str:
    """A short top-k sample after training, from "def " (default corpus) or the first 16
    tokens of the validation split."""
    from ...inference.generate import generate
    from ...inference.sampling import TopK

    if data_desc.startswith("default corpus"):
        prompt = tokenizer.encode(DEFAULT_CORPUS_PROMPT)
    else:
        prompt = ds.val[:16]
    n = min(n, model.config.max_seq_len - prompt.size)
    ids = generate(
        model,
        prompt,
        prompt.size + n,
        TopK(SAMPLE_TOP_K, SAMPLE_TEMPERATURE),
        rng=np.random.default_rng(0),
        vocab_limit=tokenizer.vocab_size,
    )
    return tokenizer.decode(np.asarray(ids))
