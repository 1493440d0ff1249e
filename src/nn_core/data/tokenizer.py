"""Tokenizers: text <-> token ids.

- ``Tokenizer``: what every tokenizer offers (the protocol the rest of nn-core uses).
- ``ByteTokenizer``: ids 0-255 are the UTF-8 bytes; 256 = BOS, 257 = EOS (vocab 258,
  which fits every config: tiny has vocab_size 1000). Saved as tokenizer.json.
- ``HFTokenizer``: a Hugging Face ``tokenizers`` tokenizer (byte-level BPE, or any
  tokenizer.json); ``train_bpe(texts, vocab_size)`` trains one with BOS/EOS included.
- ``load_tokenizer(path)``: whichever tokenizer a tokenizer.json holds (nn-core's byte
  format or the ``tokenizers`` library's format, BOS/EOS named by a tokenizer_config.json
  beside it, else by the usual names).
- ``choose_tokenizer(spec, ...)``, ``split_text``, ``tokenize_splits``: what ``nn-core
  train --tokenizer byte|bpe|FILE`` uses (BPE is trained on the training split only).

Shape legend: T tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..checks import check_int
from ..errors import CheckpointError, ConfigError, InputError

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


TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # HF convention: names BOS / EOS


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer a tokenizer.json holds: nn-core's byte tokenizer ({"type": "byte"})
    or a ``tokenizers`` library file ({"model": ...}, read as ``HFTokenizer``, its BOS /
    EOS named by a tokenizer_config.json beside it). A missing or malformed file is a
    CheckpointError naming it."""
    p = Path(path)
    d = _read_json(p)
    if isinstance(d, dict) and "model" in d and "type" not in d:
        return HFTokenizer.load(p)
    return ByteTokenizer.from_dict(d)


def tokenizer_files(tokenizer: Tokenizer, max_len: int | None = None) -> dict[str, str]:
    """{file name: text} of what saves ``tokenizer`` into a directory (a run, a model
    directory, a Hugging Face export): tokenizer.json, plus tokenizer_config.json for an
    ``HFTokenizer`` (BOS / EOS names, what transformers' AutoTokenizer reads)."""
    if isinstance(tokenizer, HFTokenizer):
        return {
            TOKENIZER_FILE: tokenizer.to_json(),
            TOKENIZER_CONFIG_FILE: json.dumps(tokenizer.hf_config(max_len), indent=2) + "\n",
        }
    if isinstance(tokenizer, ByteTokenizer):
        return {TOKENIZER_FILE: json.dumps(tokenizer.to_dict(), indent=2) + "\n"}
    raise InputError(f"cannot save a tokenizer of type {type(tokenizer).__name__}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"cannot read tokenizer file {path}: {exc!r}") from None


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
        return cls.from_dict(_read_json(Path(path)))

    def to_hf(self) -> HFTokenizer:
        """The same tokenizer as a ``tokenizers`` one (for a Hugging Face export): a BPE
        without merges over the 256 byte symbols (id = byte), BOS 256, EOS 257; it
        encodes every text to the same ids as ``encode``."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        vocab = {ch: b for b, ch in enumerate(byte_symbols())}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [AddedToken(BOS_TOKEN, special=True), AddedToken(EOS_TOKEN, special=True)]
        )
        return HFTokenizer(tok, BOS_TOKEN, EOS_TOKEN)


# ---- Hugging Face tokenizers -------------------------------------------------------------

BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"  # the specials of the tokenizers nn-core makes
# names a tokenizer.json without a tokenizer_config.json is searched for, in order
_BOS_NAMES = (BOS_TOKEN, "<|begin_of_text|>", "<bos>", "<|bos|>", "<|startoftext|>")
_EOS_NAMES = (EOS_TOKEN, "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eos|>")


def byte_symbols() -> list[str]:
    """Byte-level BPE's printable stand-in of each byte 0-255 (GPT-2's bytes_to_unicode:
    printable Latin-1 bytes stand for themselves, the others map to U+0100 onwards)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _special_name(value: Any) -> str | None:
    """A tokenizer_config.json's bos_token / eos_token: a string or {"content": str}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (byte-level BPE trained here, or any tokenizer.json)
    behind the ``Tokenizer`` protocol.

    ``encode`` adds no special tokens (BOS / EOS only on request); ``decode`` skips the
    special tokens and shows ids outside [0, vocab_size) as U+FFFD, as ``ByteTokenizer``.
    Identity (``to_dict``): vocab size, BOS / EOS and the SHA-256 of the canonical JSON.
    """

    type_name: ClassVar[str] = "hf"

    def __init__(self, tokenizer: Any, bos_token: str | None, eos_token: str | None) -> None:
        self._tok = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        for role, name in (("bos_token", bos_token), ("eos_token", eos_token)):
            if name is not None and tokenizer.token_to_id(name) is None:
                raise CheckpointError(f"tokenizer {role} {name!r} is not in its vocabulary")

    @property
    def tokenizer(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else int(self._tok.token_to_id(self.bos_token))

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else int(self._tok.token_to_id(self.eos_token))

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> IntArray:
        """str -> int64 [T], optionally framed by BOS / EOS."""
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        head = [self.bos_id] if add_bos and self.bos_id is not None else []
        tail = [self.eos_id] if add_eos and self.eos_id is not None else []
        return np.array([*head, *ids, *tail], dtype=np.int64)  # [T]

    def decode(self, ids: ArrayLike) -> str:
        """1-D ids -> str (specials skipped, ids outside the vocabulary become U+FFFD)."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise InputError(f"ids must be a 1-D integer array, got {arr.dtype} {arr.shape}")
        arr = arr.astype(np.int64)
        pieces, start = [], 0
        for bad in np.flatnonzero((arr < 0) | (arr >= self.vocab_size)):
            pieces.append(self._tok.decode(arr[start:bad].tolist(), skip_special_tokens=True))
            start = bad + 1
        pieces.append(self._tok.decode(arr[start:].tolist(), skip_special_tokens=True))
        return "\ufffd".join(pieces)

    def to_json(self) -> str:
        """The ``tokenizers`` library's tokenizer.json text."""
        return str(self._tok.to_str(pretty=True)) + "\n"

    def sha256(self) -> str:
        """SHA-256 of the canonical (compact) tokenizer.json: the tokenizer's identity."""
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type_name,
            "vocab_size": self.vocab_size,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "sha256": self.sha256(),
        }

    def hf_config(self, max_len: int | None = None) -> dict[str, Any]:
        """tokenizer_config.json as transformers' AutoTokenizer reads it."""
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
        }
        if max_len is not None:
            cfg["model_max_length"] = int(max_len)
        return cfg

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write tokenizer.json (BOS / EOS go in tokenizer_config.json: ``tokenizer_files``)."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HFTokenizer:
        """Read a ``tokenizers`` tokenizer.json; BOS / EOS from tokenizer_config.json
        beside it, else the first of the usual names the vocabulary holds."""
        from tokenizers import Tokenizer as _Tok

        p = Path(path)
        try:
            tok = _Tok.from_str(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read tokenizer file {p}: {exc!r}") from None
        except Exception as exc:  # the tokenizers library raises its own Exception
            raise CheckpointError(f"{p} is not a valid tokenizer.json: {exc}") from None
        bos = eos = None
        side = p.with_name(TOKENIZER_CONFIG_FILE)
        if side.is_file():
            cfg = _read_json(side)
            if isinstance(cfg, dict):
                bos, eos = _special_name(cfg.get("bos_token")), _special_name(cfg.get("eos_token"))
        if bos is None:
            bos = next((n for n in _BOS_NAMES if tok.token_to_id(n) is not None), None)
        if eos is None:
            eos = next((n for n in _EOS_NAMES if tok.token_to_id(n) is not None), None)
        return cls(tok, bos, eos)


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE trained on ``texts`` with ``vocab_size`` ids in all: BOS "<s>" = 0,
    EOS "</s>" = 1, the 256 byte symbols, then merges (fewer if the text runs out of
    pairs). Deterministic: the same texts give the same tokenizer."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    vocab_size = check_int(vocab_size, "vocab_size", 258, 1 << 24)  # the trainer preallocates
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok, BOS_TOKEN, EOS_TOKEN)


# ---- choosing the tokenizer of a training run ------------------------------------------

TOKENIZER_CHOICES = ("byte", "bpe")  # or a tokenizer.json file


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train text, validation text): the last ``val_fraction`` of the UTF-8 bytes held
    out, the cut moved back to a character boundary; the byte tokenizer's split."""
    data = text.encode("utf-8")
    n_val = min(max(int(len(data) * val_fraction), 1), len(data) - 1)
    cut = len(data) - n_val
    while cut > 0 and (data[cut] & 0xC0) == 0x80:  # a UTF-8 continuation byte
        cut -= 1
    return data[:cut].decode("utf-8"), data[cut:].decode("utf-8")


def tokenize_splits(
    text: str, tokenizer: Tokenizer, val_fraction: float
) -> tuple[IntArray, IntArray, int]:
    """(train ids [T_train], validation ids [T_val], validation bytes): each split of
    ``split_text`` encoded on its own, so nothing of the validation text reaches the
    training ids (nor, with ``choose_tokenizer``, the BPE's merges)."""
    train, val = split_text(text, val_fraction)
    return tokenizer.encode(train), tokenizer.encode(val), len(val.encode("utf-8"))


def choose_tokenizer(spec: str, train_texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """``nn-core train --tokenizer``: "byte", "bpe" (trained on ``train_texts``, the
    training split's texts as ``nn_core.data.retokenize.training_texts`` gives them, with
    the config's ``vocab_size``) or the path of a tokenizer.json; its vocabulary must fit
    ``vocab_size`` (ConfigError otherwise)."""
    tok: Tokenizer
    if spec == "byte":
        tok = ByteTokenizer()
    elif spec == "bpe":
        tok = train_bpe([train_texts] if isinstance(train_texts, str) else train_texts, vocab_size)
    else:
        if not Path(spec).is_file():
            raise InputError(
                f"--tokenizer must be byte, bpe or a tokenizer.json file, got {spec!r}"
            )
        tok = load_tokenizer(spec)
    if tok.vocab_size > vocab_size:
        raise ConfigError(
            f"vocab_size must be >= {tok.vocab_size} for this tokenizer, got {vocab_size}"
        )
    return tok


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Do two ``to_dict`` identities name the same tokenizer?"""
    keys = ("type", "vocab_size", "bos_id", "eos_id", "sha256")
    return all(a.get(k) == b.get(k) for k in keys)


def check_same_tokenizer(mine: Tokenizer, theirs: Tokenizer, where: str) -> None:
    """ConfigError in one line unless ``theirs`` (e.g. what --tokenizer gives) is the
    tokenizer ``mine`` (the run's) is."""
    if not same_tokenizer(mine.to_dict(), theirs.to_dict()):
        a, b = mine.to_dict(), theirs.to_dict()
        raise ConfigError(
            f"{where} was trained with tokenizer {a['type']} (vocab {a['vocab_size']}); "
            f"refusing a different one ({b['type']}, vocab {b['vocab_size']})"
        )
