"""Byte data in another tokenizer's ids: the one rule ``nn-core train`` and ``nn-core
prepare`` share for every tokenizer other than bytes (a BPE, a tokenizer.json).

Every corpus is first seen as byte tokens -- ids 0-255 are the UTF-8 bytes, and the
byte tokenizer's EOS (257) stands between two files of a directory -- and split by the
byte rule (``split_point``: the last fraction of the byte tokens is validation). Then
each split, on its own, becomes the tokenizer's ids:

    split        = doc_1 EOS_byte doc_2 EOS_byte ... doc_n      (a file's split: n = 1)
    text(doc_i)  = UTF-8 decoding of its bytes (errors="replace": the split may cut a
                   character, whose bytes then become U+FFFD, as ByteTokenizer.decode does)
    ids(split)   = enc(text(doc_1)) [EOS] enc(text(doc_2)) ... [EOS] enc(text(doc_n))

with the tokenizer's own EOS id (nothing when it has none), so document boundaries
survive re-encoding. A BPE (``train_bpe_on_bytes``) is trained on the texts of the
TRAINING split only: nothing of the validation text reaches its merges.

Texts reach the tokenizer in pieces of about ``CHUNK_CHARS`` characters
(``text_chunks``), cut only between an ASCII letter or digit and a space. The
byte-level BPE's pre-tokenizer (the GPT-2 pattern: `` ?\\p{L}+``, `` ?\\p{N}+``, ...)
always splits there, and no merge crosses a pre-token, so enc(a) + enc(b) equals
enc(a + b) and the BPE trainer counts the same words as on the whole text (both
tested): memory holds pieces, not the corpus. ``train`` passes in-memory splits,
``prepare`` streams files through the same functions, so a prepared dataset holds
exactly the ids training on the text would use.

Shape legend: T tokens.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator

import numpy as np
from numpy.typing import ArrayLike

from ..errors import InputError
from .tokenizer import ByteTokenizer, HFTokenizer, IntArray, Tokenizer, train_bpe

CHUNK_CHARS = 1 << 16  # characters per piece handed to the tokenizer, at least
BYTE_EOS = ByteTokenizer.eos_id  # 257: the document separator among byte tokens
_CUT = re.compile(r"[A-Za-z0-9](?= )")  # a safe cut is right after such a character


def text_chunks(items: Iterable[str | None], size: int | None = None) -> Iterator[str | None]:
    """Text pieces (None = a document ends) -> pieces of at least ``size`` (default
    CHUNK_CHARS) characters (a document's last piece may be shorter), cut only at safe
    places (module doc), which depend only on the document's text, not on how it comes
    in; a None is passed on after its document's last piece. Concatenating the pieces of
    a document gives its text."""
    size = CHUNK_CHARS if size is None else size
    buf = ""
    for item in items:
        if item is None:
            if buf:
                yield buf
            buf = ""
            yield None
            continue
        buf += item
        start = 0
        while (m := _CUT.search(buf, start + size - 1)) is not None:
            cut = m.end()  # the piece ends with the letter or digit, the next starts " "
            yield buf[start:cut]
            start = cut
        buf = buf[start:]
    if buf:
        yield buf


def byte_documents(pieces: Iterable[ArrayLike]) -> Iterator[str | None]:
    """Byte tokens (in pieces of any size, cut anywhere) -> their text in pieces, None
    at each BYTE_EOS: every document decoded on its own, errors="replace"."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for piece in pieces:
        arr = np.asarray(piece)  # [T]
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise InputError(f"byte tokens must be a 1-D integer array, got {arr.dtype}")
        bad = (arr < 0) | ((arr > 255) & (arr != BYTE_EOS))
        if bad.any():
            raise InputError(
                f"byte tokens must be in [0, 255] or {BYTE_EOS}, got {int(arr[bad][0])}"
            )
        start = 0
        for sep in [*np.flatnonzero(arr == BYTE_EOS).tolist(), arr.size]:
            last = sep < arr.size  # a document ends at sep
            # final=True flushes an incomplete character (U+FFFD) and resets the decoder
            text = dec.decode(arr[start:sep].astype(np.uint8).tobytes(), final=last)
            if text:
                yield text
            if last:
                yield None
            start = sep + 1
    tail = dec.decode(b"", final=True)
    if tail:
        yield tail


def training_texts(train_pieces: Iterable[ArrayLike]) -> Iterator[str]:
    """The texts a BPE is trained on: the training split's documents, in safe pieces."""
    return (t for t in text_chunks(byte_documents(train_pieces)) if t is not None)


def train_bpe_on_bytes(train_pieces: Iterable[ArrayLike], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE of ``vocab_size`` ids trained on the training split's byte tokens
    (``train_bpe`` on ``training_texts``)."""
    return train_bpe(training_texts(train_pieces), vocab_size)


def encode_bytes(pieces: Iterable[ArrayLike], tokenizer: Tokenizer) -> Iterator[IntArray]:
    """One split's byte tokens -> ``tokenizer``'s ids, in pieces: each document's text
    encoded (in safe pieces), the tokenizer's EOS where BYTE_EOS was."""
    eos = np.array([] if tokenizer.eos_id is None else [tokenizer.eos_id], dtype=np.int64)
    for text in text_chunks(byte_documents(pieces)):
        yield eos if text is None else tokenizer.encode(text)


def retokenize(ids: ArrayLike, tokenizer: Tokenizer) -> IntArray:
    """One split's byte tokens [T] in memory -> ``tokenizer``'s ids [T'] (int64)."""
    out = [np.zeros(0, dtype=np.int64), *encode_bytes([ids], tokenizer)]
    return np.concatenate(out).astype(np.int64)
