"""Text pipeline: byte tokenizer, default corpus, train/val split, batch sampling.

- ``ByteTokenizer``: ids 0-255 are the UTF-8 bytes; 256 = BOS, 257 = EOS (vocab 258,
  which fits every config: tiny has vocab_size 1000). Saved as tokenizer.json.
- ``default_corpus()``: the source of a fixed, sorted list of pure-Python
  standard-library modules of the running interpreter (no download needed).
- ``split_tokens`` / ``TokenDataset``: contiguous split, the last fraction is validation.
- ``BatchSampler``: random windows from a seeded PCG64 generator whose state can be
  saved and restored, so resumed training sees exactly the batches it would have seen.
- ``eval_batches``: deterministic non-overlapping validation windows.
- ``unigram_entropy``: the loss of the best context-free model, a baseline for val loss.

Shape legend: B batch, S sequence (seq_len), T number of tokens in a split.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import CheckpointError, ConfigError, InputError

IntArray = NDArray[np.int64]

# ---- tokenizer -------------------------------------------------------------------------


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255 are bytes, BOS = 256, EOS = 257 (vocab_size 258).

    ``decode`` skips BOS/EOS, decodes invalid UTF-8 with U+FFFD (errors="replace") and
    shows ids outside [0, 258) (an untrained model with a larger vocab can emit them)
    as U+FFFD too.
    """

    type_name: ClassVar[str] = "byte"
    bos_id: ClassVar[int] = 256
    eos_id: ClassVar[int] = 257

    @property
    def vocab_size(self) -> int:
        return 258

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> IntArray:
        """str -> int64 [T] byte ids, optionally framed by BOS / EOS."""
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)  # [T]
        head = [self.bos_id] if add_bos else []
        tail = [self.eos_id] if add_eos else []
        if head or tail:
            ids = np.concatenate([np.array(head, np.int64), ids, np.array(tail, np.int64)])
        return ids

    def decode(self, ids: ArrayLike) -> str:
        """1-D ids -> str (specials skipped, unknown ids and bad UTF-8 become U+FFFD)."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise InputError(f"ids must be a 1-D integer array, got {arr.dtype} {arr.shape}")
        arr = arr[(arr != self.bos_id) & (arr != self.eos_id)].astype(np.int64)
        pieces, start = [], 0
        for bad in np.flatnonzero((arr < 0) | (arr > 255)):
            pieces.append(bytes(arr[start:bad].astype(np.uint8)).decode("utf-8", "replace"))
            start = bad + 1
        pieces.append(bytes(arr[start:].astype(np.uint8)).decode("utf-8", "replace"))
        return "\ufffd".join(pieces)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type_name,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ByteTokenizer:
        """Inverse of ``to_dict``; anything else raises CheckpointError."""
        tok = cls()
        if not isinstance(d, dict) or d.get("type") != cls.type_name:
            got = d.get("type") if isinstance(d, dict) else d
            raise CheckpointError(f"tokenizer type must be {cls.type_name!r}, got {got!r}")
        for key, want in tok.to_dict().items():
            if key in d and d[key] != want:
                raise CheckpointError(f"byte tokenizer {key} must be {want!r}, got {d[key]!r}")
        return tok

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write tokenizer.json (e.g. beside a checkpoint)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ByteTokenizer:
        """Read a tokenizer.json; a missing or malformed file raises CheckpointError."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(f"cannot read tokenizer file {path}: {exc!r}") from None
        return cls.from_dict(d)


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


# ---- splits and batches ----------------------------------------------------------------


def _token_ids(ids: ArrayLike, name: str) -> IntArray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{name} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def split_tokens(ids: ArrayLike, val_fraction: float = 0.1) -> tuple[IntArray, IntArray]:
    """Contiguous split [T] -> (train [T - T_val], val [T_val]); the last fraction is val.

    T_val = floor(T * val_fraction), clamped so that both splits hold at least one token.
    """
    arr = _token_ids(ids, "ids")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if arr.size < 2:
        raise InputError(f"need at least 2 tokens to split into train and val, got {arr.size}")
    n_val = min(max(int(arr.size * val_fraction), 1), arr.size - 1)
    return arr[:-n_val].copy(), arr[-n_val:].copy()


@dataclass(frozen=True, eq=False)
class TokenDataset:
    """A tokenized corpus split into train and validation token ids."""

    train: IntArray  # [T_train]
    val: IntArray  # [T_val]

    @classmethod
    def from_text(
        cls, text: str, tokenizer: ByteTokenizer | None = None, val_fraction: float = 0.1
    ) -> TokenDataset:
        ids = (tokenizer or ByteTokenizer()).encode(text)  # [T]
        return cls(*split_tokens(ids, val_fraction))


def _check_windows(ids: IntArray, seq_len: int, name: str) -> None:
    if ids.size < seq_len + 1:
        raise InputError(
            f"{name} has {ids.size} tokens; seq_len={seq_len} needs at least seq_len+1 = "
            f"{seq_len + 1} (use a shorter seq_len or more text)"
        )


class BatchSampler:
    """Random training windows: inputs ids[i:i+S], targets ids[i+1:i+S+1].

    Starts are drawn from np.random.Generator(PCG64(seed)); ``state_dict`` /
    ``load_state_dict`` save and restore the generator, so a restored sampler yields
    exactly the batches the original would have yielded next.
    """

    def __init__(
        self, ids: ArrayLike, batch_size: int, seq_len: int, seed: int, *, name: str = "tokens"
    ) -> None:
        self.ids = _token_ids(ids, name)  # [T]
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.seq_len = _positive_int(seq_len, "seq_len")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
        _check_windows(self.ids, self.seq_len, name)
        self._rng = np.random.Generator(np.random.PCG64(int(seed)))
        self.batches_drawn = 0

    def next_batch(self) -> tuple[IntArray, IntArray]:
        """-> (inputs int64 [B, S], targets int64 [B, S]), targets = inputs shifted by one."""
        n_starts = self.ids.size - self.seq_len  # valid starts are 0 .. T-S-1
        starts = self._rng.integers(0, n_starts, size=self.batch_size)  # [B]
        window = self.ids[starts[:, None] + np.arange(self.seq_len + 1)]  # [B, S+1]
        self.batches_drawn += 1
        return np.ascontiguousarray(window[:, :-1]), np.ascontiguousarray(window[:, 1:])

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable: generator state, batches drawn, and the sampler's shape."""
        return {
            "bit_generator": self._rng.bit_generator.state,
            "batches_drawn": self.batches_drawn,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "n_tokens": int(self.ids.size),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore ``state_dict()``; a state from a sampler of another shape, or one out of
        range (batches_drawn < 0, a malformed generator state) -> CheckpointError."""
        from ..storage.checkpoint import check_generator_state

        keys = {"bit_generator", "batches_drawn", "batch_size", "seq_len", "n_tokens"}
        if not isinstance(d, dict) or set(d) != keys:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise CheckpointError(f"sampler state must have the fields {sorted(keys)}, got {got}")
        shape = {"batch_size": self.batch_size, "seq_len": self.seq_len, "n_tokens": self.ids.size}
        for key, mine in shape.items():
            if d[key] != mine or isinstance(d[key], bool):
                raise CheckpointError(
                    f"sampler state has {key}={d[key]!r}, this sampler has {mine}; "
                    "an exact resume needs the same data, batch_size and seq_len"
                )
        drawn = d["batches_drawn"]
        if isinstance(drawn, bool) or not isinstance(drawn, int) or drawn < 0:
            raise CheckpointError(f"sampler state batches_drawn must be an int >= 0, got {drawn!r}")
        check_generator_state(d["bit_generator"], "sampler state bit_generator")
        self._rng.bit_generator.state = d["bit_generator"]
        self.batches_drawn = drawn


def eval_batches(
    ids: ArrayLike, batch_size: int, seq_len: int, max_batches: int | None = None
) -> list[tuple[IntArray, IntArray]]:
    """Deterministic validation batches of non-overlapping windows (inputs, targets) [B, S].

    The split holds W = (T-1) // S non-overlapping windows; up to max_batches * B of
    them are taken, evenly spread over the split. The last batch may hold fewer rows.
    """
    arr = _token_ids(ids, "ids")
    batch_size = _positive_int(batch_size, "batch_size")
    seq_len = _positive_int(seq_len, "seq_len")
    _check_windows(arr, seq_len, "validation split")
    n_windows = (arr.size - 1) // seq_len  # W
    n_take = n_windows
    if max_batches is not None:
        n_take = min(n_windows, _positive_int(max_batches, "max_batches") * batch_size)
    starts = (np.arange(n_take) * n_windows // n_take) * seq_len  # [n_take], increasing
    window = arr[starts[:, None] + np.arange(seq_len + 1)]  # [n_take, S+1]
    return [
        (np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:]))
        for w in (window[i : i + batch_size] for i in range(0, n_take, batch_size))
    ]


def unigram_entropy(ids: ArrayLike) -> float:
    """Entropy in nats of the token frequencies: H = -sum_t p_t log p_t."""
    arr = _token_ids(ids, "ids")
    if arr.size == 0 or arr.min() < 0:
        raise InputError("ids must be a non-empty array of non-negative token ids")
    counts = np.bincount(arr)
    p = counts[counts > 0] / arr.size
    return float(-(p * np.log(p)).sum())
