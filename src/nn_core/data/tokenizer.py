"""Tokenizers: text <-> token ids.

- ``Tokenizer``: what every tokenizer offers (the protocol the rest of nn-core uses).
- ``ByteTokenizer``: ids 0-255 are the UTF-8 bytes; 256 = BOS, 257 = EOS (vocab 258,
  which fits every config: tiny has vocab_size 1000). Saved as tokenizer.json.
- ``load_tokenizer(path)``: whichever tokenizer a tokenizer.json holds.

Shape legend: T tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import CheckpointError, InputError

IntArray = NDArray[np.int64]

# ---- the protocol ----------------------------------------------------------------------


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids; what training, generation, evaluation and export need."""

    @property
    def vocab_size(self) -> int: ...  # ids are in [0, vocab_size), special tokens included

    @property
    def bos_id(self) -> int | None: ...  # beginning-of-text id, if the tokenizer has one

    @property
    def eos_id(self) -> int | None: ...  # end-of-text id, if the tokenizer has one

    def encode(self, text: str) -> IntArray: ...  # str -> int64 [T]

    def decode(self, ids: ArrayLike) -> str: ...  # 1-D ids -> str (specials skipped)

    def to_dict(self) -> dict[str, Any]: ...  # JSON-able identity (run.json records it)

    def save(self, path: str | os.PathLike[str]) -> None: ...  # write tokenizer.json


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer a tokenizer.json holds; a missing or malformed file is a
    CheckpointError naming it."""
    return ByteTokenizer.load(path)


# ---- bytes -----------------------------------------------------------------------------


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
