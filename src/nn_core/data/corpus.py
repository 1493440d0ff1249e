"""Text to train on: the default corpus and UTF-8 text files.

- ``default_corpus()``: the source of a fixed, sorted list of pure-Python
  standard-library modules of the running interpreter (no download needed).
- ``load_text(path)``: a UTF-8 file, every failure a one-line InputError.
- ``load_corpus(source, val_fraction)``: either of them, tokenized and split.
- ``read_corpus(path, tokenizer, glob=, skip_bad=)``: a file or a directory (read
  recursively, files in sorted order, the tokenizer's EOS between them), in memory.
  Prepared (memory-mapped) datasets: ``nn_core.data.prepared``; one entry point for
  every kind of --data: ``nn_core.data.prepared.load_data``.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import os
import platform
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import InputError
from .tokenizer import ByteTokenizer, Tokenizer

IntArray = NDArray[np.int64]

# ---- corpus and text files -------------------------------------------------------------

# Pure-Python stdlib modules present (as name.py or name/__init__.py) in Python 3.10-3.13.
DEFAULT_CORPUS_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "collections",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "difflib", "dis",
    "enum", "fnmatch", "fractions", "functools", "glob", "heapq", "inspect",
    "json.decoder", "json.encoder", "operator", "optparse", "pprint", "queue",
    "random", "shlex", "statistics", "string", "textwrap", "tokenize", "typing",
    "weakref",
)  # fmt: skip


def _default_corpus_files() -> list[tuple[str, Path]]:
    """(module, path) of every DEFAULT_CORPUS_MODULES entry found; most must exist."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for module in DEFAULT_CORPUS_MODULES:
        base = stdlib.joinpath(*module.split("."))
        for candidate in (base.with_name(base.name + ".py"), base / "__init__.py"):
            if candidate.is_file():
                found.append((module, candidate))
                break
    if len(found) < 0.75 * len(DEFAULT_CORPUS_MODULES):
        raise InputError(
            f"default corpus: only {len(found)} of {len(DEFAULT_CORPUS_MODULES)} standard-library "
            f"modules found as .py files under {stdlib}; pass a text file instead"
        )
    return found


@functools.lru_cache(maxsize=1)
def default_corpus() -> str:
    """The concatenated source of the default modules, each after a header line."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for module, path in _default_corpus_files():
        source = path.read_text(encoding="utf-8")
        parts.append(f"# ===== {module} ({path.relative_to(stdlib).as_posix()}) =====\n")
        parts.append(source if source.endswith("\n") else source + "\n")
    return "".join(parts)


def describe_default_corpus() -> str:
    """One line for the README / CLI: modules, Python version, size in bytes (= tokens)."""
    n_modules = len(_default_corpus_files())
    n_bytes = len(default_corpus().encode("utf-8"))
    return (
        f"{n_modules} pure-Python modules of the Python {platform.python_version()} "
        f"standard library ({n_bytes:,} bytes of UTF-8 source)"
    )


def load_text(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 text file; missing, unreadable, non-UTF-8 or empty -> InputError."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"text file {p}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"text file {p}: is a directory, expected a file") from None
    except PermissionError:
        raise InputError(f"text file {p}: permission denied") from None
    except OSError as exc:
        raise InputError(f"text file {p}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"text file {p}: not valid UTF-8 (byte offset {exc.start})") from None
    if not text:
        raise InputError(f"text file {p}: is empty")
    return text


def load_corpus(
    source: str | os.PathLike[str] | None, val_fraction: float = 0.1
) -> tuple[str, str, Any]:
    """(text, a one-line description, TokenDataset) of a UTF-8 file, or of the default
    corpus when ``source`` is None; byte tokens, the last ``val_fraction`` held out."""
    from .dataset import TokenDataset

    if source is None:
        text, desc = default_corpus(), "default corpus: " + describe_default_corpus()
    else:
        text = load_text(source)
        desc = f"{source} ({len(text.encode('utf-8')):,} bytes)"
    return text, desc, TokenDataset.from_text(text, val_fraction=val_fraction)


# ---- any corpus: a file, a directory, a prepared dataset --------------------------------

READ_CHUNK = 1 << 24  # bytes read at a time when a tokenizer works on bytes (16 MiB)


@dataclass(frozen=True)
class BadFile:
    """A file of a directory that cannot be used, and why (one line)."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


def list_files(directory: str | os.PathLike[str], glob: str | None = None) -> list[Path]:
    """Every file under ``directory`` (recursively, symbolic links to files included),
    whose path relative to it matches ``glob`` (``PurePath.match``: "*.py" matches at any
    depth), sorted by that relative path: a deterministic order."""
    root = Path(directory)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            if glob is None or rel.match(glob):
                found.append(rel)
    return [root / rel for rel in sorted(found, key=lambda r: r.as_posix())]


def _file_error(path: Path, reason: str) -> InputError:
    return InputError(f"text file {path}: {reason}")


def byte_chunks(path: Path) -> Iterator[bytes]:
    """The bytes of a file in chunks; every failure an InputError naming the file."""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                yield chunk
    except FileNotFoundError:
        raise _file_error(path, "no such file") from None
    except IsADirectoryError:
        raise _file_error(path, "is a directory, expected a file") from None
    except PermissionError:
        raise _file_error(path, "permission denied") from None
    except OSError as exc:
        raise _file_error(path, f"cannot read ({exc.strerror or exc})") from None


def file_tokens(path: str | os.PathLike[str], tokenizer: Tokenizer) -> Iterator[IntArray]:
    """The token ids of one UTF-8 file, in pieces: what ``tokenizer.encode(load_text(path))``
    returns, concatenated. The byte tokenizer streams the file in READ_CHUNK pieces
    (checked as UTF-8 incrementally), so memory stays bounded; other tokenizers read it
    whole. Missing, unreadable, non-UTF-8 or empty -> InputError naming the file."""
    p = Path(path)
    if type(tokenizer) is not ByteTokenizer:  # a subclass may encode otherwise
        yield tokenizer.encode(load_text(p))
        return
    check = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0
    for chunk in byte_chunks(p):
        try:
            check.decode(chunk)
        except UnicodeDecodeError as exc:
            raise _file_error(p, f"not valid UTF-8 (byte offset {offset + exc.start})") from None
        offset += len(chunk)
        yield np.frombuffer(chunk, dtype=np.uint8).astype(np.int64)  # ids = bytes
    try:
        check.decode(b"", final=True)
    except UnicodeDecodeError:
        raise _file_error(p, f"not valid UTF-8 (byte offset {offset}: truncated)") from None
    if offset == 0:
        raise _file_error(p, "is empty")


def corpus_files(source: str | os.PathLike[str], glob: str | None = None) -> tuple[str, list[Path]]:
    """(kind, files) of a --data path: ("file", [it]) or ("directory", its files, sorted).
    A missing path, or a directory with no (matching) file -> InputError."""
    p = Path(source)
    if p.is_dir():
        files = list_files(p, glob)
        if not files:
            what = f"no file matching {glob!r}" if glob else "no file"
            raise InputError(f"data directory {p}: {what} in it (recursively)")
        return "directory", files
    if glob is not None:
        raise InputError(f"--glob filters a directory, but {p} is not a directory")
    if not os.path.lexists(p):
        raise InputError(f"data {p}: no such file or directory")
    return "file", [p]


def document_separator(tokenizer: Tokenizer, n_files: int) -> IntArray:
    """The ids put between two files of a directory: [EOS] if the tokenizer has one."""
    eos = tokenizer.eos_id
    return np.array([] if eos is None or n_files < 2 else [eos], dtype=np.int64)


def bad_files_error(source: Any, bad: list[BadFile]) -> InputError:
    """One line naming every unusable file and the way out (--skip-bad)."""
    listed = "; ".join(str(b) for b in bad[:5]) + (
        f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    )
    return InputError(
        f"data directory {source}: {len(bad)} unusable file(s): {listed}; fix or remove them, "
        "or pass --skip-bad to skip them"
    )


def read_corpus(
    source: str | os.PathLike[str],
    tokenizer: Tokenizer,
    *,
    glob: str | None = None,
    skip_bad: bool = False,
) -> tuple[IntArray, str, list[BadFile], str]:
    """The token ids [T] of a file or a directory in memory, with (description, skipped
    files, SHA-256 identifying the data). A file: its text's SHA-256 (as runs record it);
    a directory: the SHA-256 of its token ids as int64. Files of a directory that cannot
    be used (unreadable, not UTF-8, empty) -> one InputError naming them all, unless
    ``skip_bad`` (then they are left out and returned)."""
    kind, files = corpus_files(source, glob)
    if kind == "file":
        text = load_text(files[0])
        ids = tokenizer.encode(text)  # [T]
        desc = f"{source} ({len(text.encode('utf-8')):,} bytes)"
        return ids, desc, [], hashlib.sha256(text.encode("utf-8")).hexdigest()
    pieces: list[IntArray] = []
    bad: list[BadFile] = []
    used = 0
    sep = document_separator(tokenizer, 2)
    for path in files:
        try:
            doc = np.concatenate(list(file_tokens(path, tokenizer)))
        except InputError as exc:
            bad.append(BadFile(path, str(exc).split(": ", 1)[-1]))
            continue
        if used:
            pieces.append(sep)
        pieces.append(doc)
        used += 1
    if bad and not skip_bad:
        raise bad_files_error(source, bad)
    if not used:
        raise InputError(f"data directory {source}: every file was skipped as unusable")
    ids = np.concatenate(pieces).astype(np.int64)
    desc = f"{source} ({used:,} files" + (f", {len(bad)} skipped" if bad else "") + ")"
    return ids, desc, bad, hashlib.sha256(ids.tobytes()).hexdigest()
