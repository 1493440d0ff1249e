"""Token datasets: train/validation split, seeded batch sampling, validation batches.

- ``split_tokens`` / ``TokenDataset``: contiguous split, the last fraction is validation.
- ``BatchSampler``: random training windows from a seeded PCG64 generator whose state
  can be saved and restored, so resumed training sees exactly the batches it would have
  seen.
- ``eval_batches``: deterministic non-overlapping validation windows.
- ``unigram_entropy``: the loss of the best context-free model, a baseline for val loss.

Shape legend: B batch, S sequence (seq_len), T number of tokens in a split.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..checks import check_generator_state, check_int
from ..errors import CheckpointError, ConfigError, InputError
from .tokenizer import ByteTokenizer, IntArray

GATHER_ROWS = 32  # windows read from a memory map between two releases of its pages

# ---- splits and batches ----------------------------------------------------------------


def _token_ids(ids: ArrayLike, name: str) -> IntArray:
    """A 1-D integer array as it is (a memory map stays one: nothing is read or copied);
    anything else converted to int64."""
    if isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype.kind in "iu":
        return ids  # type: ignore[return-value]
    arr = np.asarray(ids)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{name} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def split_point(n_tokens: int, val_fraction: float) -> int:
    """T_val of the split rule: floor(T * val_fraction), clamped to [1, T - 1]."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if n_tokens < 2:
        raise InputError(f"need at least 2 tokens to split into train and val, got {n_tokens}")
    return min(max(int(n_tokens * val_fraction), 1), n_tokens - 1)


def split_tokens(ids: ArrayLike, val_fraction: float = 0.1) -> tuple[IntArray, IntArray]:
    """Contiguous split [T] -> (train [T - T_val], val [T_val]); the last fraction is val.

    T_val = floor(T * val_fraction), clamped so that both splits hold at least one token.
    """
    arr = np.asarray(ids)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"ids must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    n_val = split_point(arr.size, val_fraction)
    return arr[:-n_val].astype(np.int64), arr[-n_val:].astype(np.int64)


def gather_windows(ids: IntArray, starts: IntArray, length: int) -> IntArray:
    """ids[starts[b] : starts[b] + length] for each b -> int64 [B, length].

    On a memory map (``np.memmap``) only the pages of those windows are read, and the
    map's pages are released from this process's resident memory afterwards (madvise
    DONTNEED; the file stays in the page cache), so a corpus of any size keeps memory flat.
    """
    offsets = np.arange(length)  # [L]
    mm = getattr(ids, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return np.array(ids[starts[:, None] + offsets], dtype=np.int64)  # [B, L]
    window = np.empty((starts.size, length), dtype=np.int64)  # [B, L]
    for lo in range(0, starts.size, GATHER_ROWS):  # a few rows at a time, then release:
        rows = starts[lo : lo + GATHER_ROWS]
        window[lo : lo + rows.size] = ids[rows[:, None] + offsets]
        # the whole map: the kernel also maps the pages around each one read
        # ("fault-around"); dropping a range with nothing resident costs one syscall
        mm.madvise(mmap.MADV_DONTNEED)
    return window


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
        self.batch_size = check_int(batch_size, "batch_size", 1)
        self.seq_len = check_int(seq_len, "seq_len", 1)
        check_int(seed, "seed", 0)
        _check_windows(self.ids, self.seq_len, name)
        self._rng = np.random.Generator(np.random.PCG64(int(seed)))
        self.batches_drawn = 0

    def next_batch(self) -> tuple[IntArray, IntArray]:
        """-> (inputs int64 [B, S], targets int64 [B, S]), targets = inputs shifted by one."""
        n_starts = self.ids.size - self.seq_len  # valid starts are 0 .. T-S-1
        starts = self._rng.integers(0, n_starts, size=self.batch_size)  # [B]
        window = gather_windows(self.ids, starts, self.seq_len + 1)  # [B, S+1]
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
        check_int(drawn, "sampler state batches_drawn", 0, error=CheckpointError)
        check_generator_state(
            d["bit_generator"], "sampler state bit_generator", error=CheckpointError
        )
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
    batch_size = check_int(batch_size, "batch_size", 1)
    seq_len = check_int(seq_len, "seq_len", 1)
    _check_windows(arr, seq_len, "validation split")
    n_windows = (arr.size - 1) // seq_len  # W
    n_take = n_windows
    if max_batches is not None:
        n_take = min(n_windows, check_int(max_batches, "max_batches", 1) * batch_size)
    starts = (np.arange(n_take) * n_windows // n_take) * seq_len  # [n_take], increasing
    window = gather_windows(arr, starts, seq_len + 1)  # [n_take, S+1]
    return [
        (np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:]))
        for w in (window[i : i + batch_size] for i in range(0, n_take, batch_size))
    ]


def unigram_entropy(ids: ArrayLike) -> float:
    """Entropy in nats of the token frequencies: H = -sum_t p_t log p_t."""
    arr = _token_ids(ids, "ids")
    if arr.size == 0 or arr.min() < 0:
        raise InputError("ids must be a non-empty array of non-negative token ids")
    return entropy_of_counts(np.bincount(arr))


def entropy_of_counts(counts: ArrayLike) -> float:
    """H = -sum_t p_t log p_t of token counts [V] (p_t = counts_t / total)."""
    counts = np.asarray(counts)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
