"""The run directory of ``nn-core train``: its whole format, in one type.

    .nn-core-run      marks it as an nn-core run directory; the writers' lock (holds a pid)
    run.json          model and train config, data source (+ SHA-256), tokenizer, command
    tokenizer.json    the tokenizer -- generate, evaluate and export read it from here
    step_XXXXXX/      checkpoints (nn_core.storage.checkpoint), the newest few are kept
    latest            names the newest checkpoint
    metrics.jsonl     one line per update (loss, ce, aux, grad_norm, lr, tokens/s, val_*)
    loss_curve.png    train and validation cross-entropy against the unigram entropy
    plots/            PNGs of nn-core plot / the end of train: loss, learning rate, and
                      each layer's expert load over the steps (only PNGs: anything else
                      there is not ours, and plots are then refused)
    summary.json      final validation loss, unigram entropy, time, the sample
    sample.txt        the sample printed at the end

Ownership (``nn_core.storage.ownership``): a new run goes only into a path that is
absent, empty, or a run directory without checkpoints; a run with checkpoints or
another nn-core directory is replaced only with ``force``; a directory nn-core did not
write never. A run directory is locked by one writer for the whole life of a command
(``RunDir`` holds the lock until ``release``); the lock dies with the process. Every
file here is written atomically (a full disk leaves the old file whole).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, InputError, OutputError
from ..model.config import Config
from ..storage import ownership as own
from ..storage.checkpoint import LATEST_FILE, atomic_write_file
from ..storage.names import PLOTS_DIR
from ..training.config import TrainConfig
from .options import UsageError

RUNS_ROOT = Path("runs")  # the default run directories: runs/<config>-<date>-<time>[-N]
RUN_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SAMPLE_FILE = "sample.txt"
LOSS_CURVE_FILE = "loss_curve.png"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RunInfo:
    """What run.json says about how a run was set up (checked on read)."""

    config_name: str
    config: dict[str, Any]
    train_config: dict[str, Any]
    data_source: str | None  # a file path, or None for the default corpus
    data_sha256: str
    val_fraction: float
    data_options: dict[str, Any] | None = None  # how the data was read (glob, skip_bad, kind)


class RunDir:
    """A run directory, locked by this process while the object is held."""

    def __init__(self, path: Path, lock: own.RunLock) -> None:
        self.path = path
        self.lock = lock

    def file(self, name: str) -> Path:
        return self.path / name

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---- a new run ---------------------------------------------------------------------
    @staticmethod
    def check_new(out: str | None, force: bool) -> own.Ownership | None:
        """Refuse, before any work, a --out a new run may not use; returns what is there.

        Usable: absent (its parent must exist), empty, or a run directory without
        checkpoints (replaced); with ``force`` also a run with checkpoints or another
        nn-core directory (replaced). A directory nn-core did not write never. The
        default (no --out): runs/ must be creatable or writable.
        """
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
                    f"{path} already holds a run: continue it with --resume, pick another "
                    "--out, or --force replaces it"
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

    @classmethod
    def create(cls, out: str | None, config_name: str, force: bool) -> RunDir:
        """Create (or take over, as ``check_new`` allows) the run directory and lock it.

        Without ``out``: runs/<config>-<date>-<time>, with -2, -3, ... by exclusive mkdir,
        so two runs started in the same second never collide. A replaced directory is
        moved aside first and deleted once the new one is locked (a crash in between
        leaves ``.NAME.old-*`` beside it)."""
        if out is None:
            RUNS_ROOT.mkdir(exist_ok=True)
            base = f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
            for n in range(1, 10_000):
                path = RUNS_ROOT / (base if n == 1 else f"{base}-{n}")
                try:
                    path.mkdir()
                except FileExistsError:
                    continue
                return cls(path, own.RunLock(path).acquire())
            raise OutputError(f"cannot create a run directory {RUNS_ROOT / base}-N: all taken")
        path = Path(out)
        moved = None
        with own.locked_if_run(path):  # a run being written is not replaced
            info = cls.check_new(out, force)  # again: the data took a while to load
            assert info is not None
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
        return cls(path, lock)

    # ---- an existing run ---------------------------------------------------------------
    @staticmethod
    def newest(root: Path = RUNS_ROOT) -> Path:
        """The run under ``root`` whose ``latest`` checkpoint moved last."""
        runs = [p for p in root.glob("*") if (p / LATEST_FILE).is_file()] if root.is_dir() else []
        if not runs:
            raise UsageError("--resume needs --out DIR (no run with a checkpoint under runs/)")
        return max(runs, key=lambda p: (p / LATEST_FILE).stat().st_mtime)

    @classmethod
    def open(cls, out: str | None) -> RunDir:
        """Lock an existing run (``out``, or the newest under runs/) to continue it."""
        path = Path(out) if out is not None else cls.newest()
        info = own.classify(path)
        run_file = path / RUN_FILE
        if info.kind != own.RUN or not (path / LATEST_FILE).is_file() or not run_file.is_file():
            raise CheckpointError(
                f"{path} holds no run to resume (no latest checkpoint or run.json)"
            )
        return cls(path, own.RunLock(path).acquire())  # before reading: nobody writes meanwhile

    @classmethod
    def open_any(cls, path: str) -> RunDir:
        """Lock an existing run directory (with or without checkpoints), e.g. to plot it."""
        p = Path(path)
        if own.classify(p).kind != own.RUN:
            raise InputError(f"{p} is not an nn-core run directory (no {RUN_FILE} or marker)")
        return cls(p, own.RunLock(p).acquire())

    # ---- the files ---------------------------------------------------------------------
    def plots_dir(self) -> Path:
        """The run's plots/ (created if absent). Refused (OutputError) if it holds anything
        nn-core does not write there (only PNG files)."""
        path = self.file(PLOTS_DIR)
        if os.path.lexists(path) and not own.is_plots_dir(path):
            raise OutputError(
                f"{path} holds something other than nn-core's PNG plots; refusing to write "
                "plots there (move it away)"
            )
        path.mkdir(exist_ok=True)
        return path

    def write_text(self, name: str, text: str) -> Path:
        """Write a file of the run atomically (a full disk leaves the old file whole)."""
        path = self.file(name)
        atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return path

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2) + "\n")

    def write_run_info(
        self,
        *,
        config_name: str,
        config: Config,
        train_config: TrainConfig,
        data_source: str | None,
        data_description: str,
        text: str | None,
        val_fraction: float,
        train_tokens: int,
        val_tokens: int,
        tokenizer: dict[str, Any],
        command: list[str],
        data_sha256: str | None = None,
        data_options: dict[str, Any] | None = None,
    ) -> None:
        """run.json: everything an exact resume needs besides the checkpoint."""
        self.write_json(
            RUN_FILE,
            {
                "library": "nn-core",
                "kind": "run",
                "config_name": config_name,
                "config": config.to_dict(),
                "train_config": train_config.to_dict(),
                "data": {
                    "source": None if data_source is None else str(Path(data_source).resolve()),
                    "description": data_description,
                    "sha256": data_sha256 or sha256_text(text or ""),
                    "val_fraction": val_fraction,
                    "train_tokens": train_tokens,
                    "val_tokens": val_tokens,
                    **({} if data_options is None else {"options": data_options}),
                },
                "tokenizer": tokenizer,
                "command": command,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),  # checkpoints hold no time
            },
        )

    def read_run_info(self) -> RunInfo:
        """run.json, checked: a corrupt file is a CheckpointError naming it."""
        run_file = self.file(RUN_FILE)
        try:
            run = json.loads(run_file.read_text(encoding="utf-8"))
            info = RunInfo(
                config_name=run["config_name"],
                config=run["config"],
                train_config=run["train_config"],
                data_source=run["data"]["source"],
                data_sha256=run["data"]["sha256"],
                val_fraction=float(run["data"]["val_fraction"]),
                data_options=run["data"].get("options"),
            )
            if not (info.data_source is None or isinstance(info.data_source, str)):
                raise TypeError("data.source must be a string or null")
            if not isinstance(info.config_name, str) or not isinstance(info.data_sha256, str):
                raise TypeError("config_name and data.sha256 must be strings")
            if not isinstance(info.train_config, dict) or not isinstance(info.config, dict):
                raise TypeError("config and train_config must be objects")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CheckpointError(f"{run_file} is corrupt: {exc!r}") from None
        return info

    def truncate_metrics(self, step: int) -> None:
        """Keep the metrics lines of updates < step (an interrupted run may have logged
        more); rewritten atomically, so a full disk leaves the file as it was."""
        path = self.file(METRICS_FILE)
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                if int(json.loads(line)["step"]) < step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError, RecursionError):
                continue
        self.write_text(METRICS_FILE, "".join(k + "\n" for k in kept))

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl (lines that are not JSON objects are skipped)."""
        path = self.file(METRICS_FILE)
        records = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(record, dict):
                    records.append(record)
        return records
