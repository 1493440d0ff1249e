"""Text to train on: the default corpus and UTF-8 text files.

- ``default_corpus()``: the source of a fixed, sorted list of pure-Python
  standard-library modules of the running interpreter (no download needed).
- ``load_text(path)``: a UTF-8 file, every failure a one-line InputError.
- ``load_corpus(source, val_fraction)``: either of them, tokenized and split.
"""

from __future__ import annotations

import functools
import os
import platform
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import InputError

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
        f"standard library ({n_bytes:,} bytes of UTF-8 source = byte tokens)"
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
