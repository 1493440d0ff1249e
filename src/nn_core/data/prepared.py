"""Prepared datasets: a corpus tokenized once into a memory-mapped binary of token ids.

A prepared dataset is a directory (written by ``prepare``, CLI ``nn-core prepare``):

    tokens.bin      every token id, little-endian uint16 when the vocabulary fits in
                    65,536 ids, else uint32; the train split first, then validation
    tokenizer.json  the tokenizer that made them (``load_tokenizer`` reads it)
    manifest.json   what the directory holds (``MANIFEST_FIELDS``, docs/data.md)

The split is the one ``split_tokens`` makes in memory (the last ``val_fraction`` of the
tokens, ``split_point``), so a prepared file trains on exactly the tokens and batches
the file itself gives. Training reads ``tokens.bin`` through ``np.memmap``: only the
windows of each batch are read, and released again (``gather_windows``), so resident
memory does not grow with the corpus.

``write_prepared`` fills an empty directory; ``nn-core prepare`` makes that directory
beside its target (``.NAME.tmp-XXXX``) and renames it into place at the end, so an
interrupted prepare leaves no directory that looks complete (and the manifest is
written last). It writes only into a path that is absent, an empty directory or a
prepared dataset; another nn-core directory only with --force; anything else never.

``load_data`` is the one entry point for every kind of --data: nothing (the default
corpus), a file, a directory or a prepared dataset.

Shape legend: T tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .corpus import (
    BadFile,
    bad_files_error,
    byte_chunks,
    corpus_files,
    default_corpus,
    describe_default_corpus,
    document_separator,
    file_tokens,
    read_corpus,
)
from .dataset import TokenDataset, entropy_of_counts, split_point, split_tokens
from .retokenize import BYTE_EOS, encode_bytes, train_bpe_on_bytes
from .tokenizer import ByteTokenizer, IntArray, Tokenizer, load_tokenizer

FORMAT = "nn-core-prepared"
VERSION = 1
TOKENS_FILE, TOKENIZER_FILE, MANIFEST_FILE = "tokens.bin", "tokenizer.json", "manifest.json"
FILES = (MANIFEST_FILE, TOKENIZER_FILE, TOKENS_FILE)
MANIFEST_FIELDS = (
    "format", "version", "dtype", "n_tokens", "train_tokens", "val_tokens", "val_fraction",
    "vocab_size", "tokenizer", "source", "unigram_entropy", "sha256", "created",
)  # fmt: skip
HASH_CHUNK = 1 << 24  # bytes hashed at a time


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; little-endian."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# ---- the dataset on disk ----------------------------------------------------------------


def is_prepared(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a directory holding a prepared dataset's manifest."""
    return _read_manifest(Path(path), strict=False) is not None


def _read_manifest(path: Path, strict: bool = True) -> dict[str, Any] | None:
    """The checked manifest of a prepared dataset; not one -> None, or (strict)
    InputError naming what is wrong."""
    file = path / MANIFEST_FILE
    try:
        if not path.is_dir() or file.is_symlink() or file.stat().st_size > 1 << 20:
            raise ValueError("no manifest.json")
        doc = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"manifest.json is not of format {FORMAT!r}")
        missing = [k for k in MANIFEST_FIELDS if k not in doc]
        if missing:
            raise ValueError(f"manifest.json lacks {missing}")
        if doc["version"] != VERSION or doc["dtype"] not in ("uint16", "uint32"):
            raise ValueError(f"unsupported version {doc['version']!r} or dtype {doc['dtype']!r}")
        n, n_train, n_val = (int(doc[k]) for k in ("n_tokens", "train_tokens", "val_tokens"))
        if n_train + n_val != n or n_train < 1 or n_val < 1:
            raise ValueError(f"token counts disagree ({n_train} + {n_val} != {n})")
    except (OSError, ValueError, TypeError, RecursionError) as exc:
        if strict:
            raise InputError(f"prepared dataset {path}: {exc}") from None
        return None
    return doc


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset opened for reading: its manifest, tokenizer and memory map."""

    path: Path
    manifest: dict[str, Any]
    tokenizer: Tokenizer
    tokens: np.memmap  # [T] uint16 or uint32, read-only

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> PreparedDataset:
        """Open and check (manifest fields, file size = n_tokens * itemsize, tokenizer);
        the token checksum is checked by ``verify`` (it reads the whole file)."""
        p = Path(path)
        doc = _read_manifest(p)
        assert doc is not None
        dtype = np.dtype("<u2" if doc["dtype"] == "uint16" else "<u4")
        tokens_file = p / TOKENS_FILE
        want = int(doc["n_tokens"]) * dtype.itemsize
        try:
            size = tokens_file.stat().st_size
        except OSError as exc:
            raise InputError(f"prepared dataset {p}: {TOKENS_FILE}: {exc.strerror}") from None
        if size != want:
            raise InputError(
                f"prepared dataset {p}: {TOKENS_FILE} has {size:,} bytes, the manifest says "
                f"{want:,} (truncated or replaced?); prepare it again"
            )
        try:
            tokenizer = load_tokenizer(p / TOKENIZER_FILE)
        except ValueError as exc:
            raise InputError(f"prepared dataset {p}: {exc}") from None
        if tokenizer.to_dict() != doc["tokenizer"]:
            raise InputError(f"prepared dataset {p}: tokenizer.json differs from the manifest")
        tokens = np.memmap(tokens_file, dtype=dtype, mode="r", shape=(int(doc["n_tokens"]),))
        return cls(p, doc, tokenizer, tokens)

    @property
    def dataset(self) -> TokenDataset:
        """Train and validation splits: views of the memory map (nothing is read)."""
        n_train = int(self.manifest["train_tokens"])
        return TokenDataset(self.tokens[:n_train], self.tokens[n_train:])

    def verify(self) -> None:
        """Hash tokens.bin (in chunks, not through the map) against the manifest."""
        if _sha256_file(self.path / TOKENS_FILE) != self.manifest["sha256"]:
            raise InputError(f"prepared dataset {self.path}: {TOKENS_FILE} checksum differs")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---- prepare ----------------------------------------------------------------------------


def write_prepared(
    source: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    tokenizer: Tokenizer | None = None,
    bpe_vocab_size: int | None = None,
    val_fraction: float = 0.1,
    glob: str | None = None,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Tokenize a file or a directory into ``directory`` (existing and empty; the caller
    renames it into place, see ``nn_core.app.commands.prepare``); returns the manifest,
    written last. ``tokenizer`` None means bytes; ``bpe_vocab_size`` N instead trains a
    byte-level BPE of N ids on the training split. Files are streamed, so memory does not
    grow with the corpus: bytes are split by the token rule; any other tokenizer is
    applied as ``nn-core train`` applies it (split by bytes, each split re-encoded,
    ``nn_core.data.retokenize``), so a prepared dataset holds the ids training on the text
    would use. Unusable files of a directory -> one InputError naming them, unless
    ``skip_bad`` (then listed in the manifest's source.skipped)."""
    if bpe_vocab_size is not None and tokenizer is not None:
        raise InputError("give a tokenizer or a BPE vocabulary size, not both")
    tok = ByteTokenizer() if tokenizer is None else tokenizer
    split_point(2, val_fraction)  # checks val_fraction before any work
    kind, files = corpus_files(source, glob)
    tmp = Path(directory)
    if not tmp.is_dir() or any(tmp.iterdir()):
        raise InputError(f"{tmp} must be an existing empty directory")
    if bpe_vocab_size is not None or type(tok) is not ByteTokenizer:
        manifest, tok = _write_retokenized(
            tmp, files, kind, tok, bpe_vocab_size, val_fraction, skip_bad, source, glob
        )
    else:
        manifest = _write_tokens(tmp, files, kind, tok, skip_bad, source, glob)
        n = manifest["n_tokens"]
        n_val = split_point(n, val_fraction)
        manifest.update(train_tokens=n - n_val, val_tokens=n_val, val_fraction=val_fraction)
    tok.save(tmp / TOKENIZER_FILE)
    manifest = {k: manifest[k] for k in MANIFEST_FIELDS}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
    return manifest


def _write_tokens(
    tmp: Path,
    files: list[Path],
    kind: str,
    tok: Tokenizer,
    skip_bad: bool,
    source: Any,
    glob: str | None,
) -> dict[str, Any]:
    """Stream the files' tokens into tmp/tokens.bin; the manifest fields known so far."""
    dtype = token_dtype(tok.vocab_size)
    counts = np.zeros(tok.vocab_size, dtype=np.int64)  # [V] unigram counts, for the entropy
    sep = document_separator(tok, len(files))
    bad: list[BadFile] = []
    n_bytes = used = 0
    with open(tmp / TOKENS_FILE, "wb") as f:
        for path in files:
            start, file_counts, file_bytes = f.tell(), np.zeros_like(counts), 0
            try:
                if used and sep.size:
                    f.write(sep.astype(dtype).tobytes())
                    file_counts += np.bincount(sep, minlength=tok.vocab_size)
                for ids in file_tokens(path, tok):
                    if ids.size and (ids.min() < 0 or ids.max() >= tok.vocab_size):
                        raise InputError(
                            f"text file {path}: the tokenizer gave ids outside its vocab"
                        )
                    f.write(ids.astype(dtype).tobytes())
                    file_counts += np.bincount(ids, minlength=tok.vocab_size)
                    file_bytes += int(ids.size) if type(tok) is ByteTokenizer else 0
            except InputError as exc:
                if kind == "file":
                    raise
                bad.append(BadFile(path, str(exc).split(": ", 1)[-1]))
                f.seek(start)
                f.truncate()
                continue
            counts += file_counts
            n_bytes += file_bytes or path.stat().st_size
            used += 1
    if bad and not skip_bad:
        raise bad_files_error(source, bad)
    if not used:
        raise InputError(f"data directory {source}: every file was skipped as unusable")
    split_point(int(counts.sum()), 0.5)  # at least 2 tokens
    return _manifest(tmp, tok, counts, kind, source, glob, used, n_bytes, bad)


def _manifest(
    tmp: Path,
    tok: Tokenizer,
    counts: Any,
    kind: str,
    source: Any,
    glob: str | None,
    used: int,
    n_bytes: int,
    bad: list[BadFile],
) -> dict[str, Any]:
    """The manifest fields known once tmp/tokens.bin is written (``counts``: [V] ids)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": "uint16" if token_dtype(tok.vocab_size).itemsize == 2 else "uint32",
        "n_tokens": int(counts.sum()),
        "vocab_size": tok.vocab_size,
        "tokenizer": tok.to_dict(),
        "source": {
            "path": str(Path(source).resolve()),
            "kind": kind,
            "glob": glob,
            "files": used,
            "bytes": n_bytes,
            "skipped": [str(b) for b in bad],
        },
        "unigram_entropy": entropy_of_counts(counts),
        "sha256": _sha256_file(tmp / TOKENS_FILE),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write_retokenized(
    tmp: Path,
    files: list[Path],
    kind: str,
    tok: Tokenizer,
    bpe_vocab_size: int | None,
    val_fraction: float,
    skip_bad: bool,
    source: Any,
    glob: str | None,
) -> tuple[dict[str, Any], Tokenizer]:
    """A non-byte tokenizer (or a BPE trained here): (the manifest fields, the tokenizer).
    Pass 1 checks every file (UTF-8, not empty) and counts its bytes, which fixes the
    byte split; pass 2 trains the BPE on the training bytes (if asked); pass 3 writes
    each split's ids. Each pass streams the files."""
    good: list[tuple[Path, int]] = []
    bad: list[BadFile] = []
    for path in files:
        try:
            good.append((path, sum(int(ids.size) for ids in file_tokens(path, ByteTokenizer()))))
        except InputError as exc:
            if kind == "file":
                raise
            bad.append(BadFile(path, str(exc).split(": ", 1)[-1]))
    if bad and not skip_bad:
        raise bad_files_error(source, bad)
    if not good:
        raise InputError(f"data directory {source}: every file was skipped as unusable")
    n_bytes = sum(size for _, size in good)
    total = n_bytes + len(good) - 1  # byte tokens: the files, BYTE_EOS between two
    cut = total - split_point(total, val_fraction)  # train = byte tokens [0, cut)
    if bpe_vocab_size is not None:
        tok = train_bpe_on_bytes(_byte_tokens(good, 0, cut), bpe_vocab_size)
    dtype = token_dtype(tok.vocab_size)
    counts = np.zeros(tok.vocab_size, dtype=np.int64)  # [V] unigram counts, for the entropy
    n_split = []
    with open(tmp / TOKENS_FILE, "wb") as f:
        for lo, hi in ((0, cut), (cut, total)):
            n = 0
            for ids in encode_bytes(_byte_tokens(good, lo, hi), tok):
                if ids.size and (ids.min() < 0 or ids.max() >= tok.vocab_size):
                    raise InputError(f"data {source}: the tokenizer gave ids outside its vocab")
                f.write(ids.astype(dtype).tobytes())
                counts += np.bincount(ids, minlength=tok.vocab_size)
                n += int(ids.size)
            n_split.append(n)
    if min(n_split) < 1:
        raise InputError(f"data {source}: a split has no tokens; lower or raise --val-fraction")
    manifest = _manifest(tmp, tok, counts, kind, source, glob, len(good), n_bytes, bad)
    manifest.update(train_tokens=n_split[0], val_tokens=n_split[1], val_fraction=val_fraction)
    return manifest, tok


def _byte_tokens(files: list[tuple[Path, int]], lo: int, hi: int) -> Iterator[IntArray]:
    """Byte tokens [lo, hi) of the files joined by BYTE_EOS, read in chunks (uint8 pieces;
    the separators as int64 [1]). A file whose size changed since pass 1 -> InputError."""
    pos = 0  # index of the next byte token
    for i, (path, size) in enumerate(files):
        if i:
            if lo <= pos < hi:
                yield np.array([BYTE_EOS], dtype=np.int64)
            pos += 1
        if pos + size <= lo or pos >= hi:
            pos += size
            continue
        seen, stop = 0, min(hi - pos, size)  # this file's bytes [.., stop) are wanted
        for chunk in byte_chunks(path):
            a, b = max(lo - pos - seen, 0), min(stop - seen, len(chunk))
            if a < b:
                yield np.frombuffer(chunk, dtype=np.uint8)[a:b]  # type: ignore[misc]
            seen += len(chunk)
            if seen >= stop:
                break
        if seen < stop or (stop == size and seen > size):
            raise InputError(f"text file {path}: changed while being prepared")
        pos += size


# ---- every kind of --data ---------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """Training data ready to sample: splits, tokenizer, and what identifies it."""

    dataset: TokenDataset
    tokenizer: Tokenizer
    kind: str  # "default", "file", "directory" or "prepared"
    description: str  # one line for the CLI and run.json
    sha256: str  # file: its text's; directory: its token ids'; prepared: tokens.bin's
    val_fraction: float
    unigram_entropy: float  # nats/token over both splits
    skipped: tuple[str, ...] = field(default=())  # unusable files left out (--skip-bad)

    @property
    def options(self) -> dict[str, Any]:
        """What run.json records besides the path, to read the same data on resume."""
        return {"kind": self.kind, "skipped": list(self.skipped)}


def load_data(
    source: str | os.PathLike[str] | None,
    *,
    val_fraction: float | None = None,
    glob: str | None = None,
    skip_bad: bool = False,
    tokenizer: Tokenizer | None = None,
) -> DataSource:
    """Any --data: None (the default corpus), a UTF-8 file, a directory (recursively,
    ``glob`` to filter, ``skip_bad`` to leave out unusable files) or a prepared dataset
    (its own split and tokenizer: ``val_fraction`` must be None or the same, ``tokenizer``
    None or the same). ``val_fraction`` defaults to 0.1."""
    from .dataset import unigram_entropy

    if source is not None and is_prepared(source):
        if glob is not None:
            raise InputError(f"--glob filters a directory of text, but {source} is prepared")
        ds = PreparedDataset.open(source)
        doc = ds.manifest
        if val_fraction is not None and val_fraction != doc["val_fraction"]:
            raise InputError(
                f"prepared dataset {source} was split with val_fraction {doc['val_fraction']}, "
                f"not {val_fraction}; prepare it again with --val-fraction {val_fraction}"
            )
        if tokenizer is not None and tokenizer.to_dict() != ds.tokenizer.to_dict():
            raise InputError(
                f"prepared dataset {source} was tokenized with {doc['tokenizer'].get('type')!r}, "
                "not the tokenizer asked for; prepare it again with that tokenizer"
            )
        desc = (
            f"{source} (prepared: {doc['n_tokens']:,} {doc['tokenizer'].get('type')} tokens "
            f"from {doc['source']['files']:,} file(s))"
        )
        return DataSource(
            ds.dataset, ds.tokenizer, "prepared", desc, doc["sha256"], doc["val_fraction"],
            float(doc["unigram_entropy"]), tuple(doc["source"]["skipped"]),
        )  # fmt: skip
    tok = ByteTokenizer() if tokenizer is None else tokenizer
    vf = 0.1 if val_fraction is None else val_fraction
    if source is None:
        text = default_corpus()
        ids = tok.encode(text)
        desc = "default corpus: " + describe_default_corpus()
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        kind, bad = "default", list[BadFile]()
    else:
        ids, desc, bad, sha = read_corpus(source, tok, glob=glob, skip_bad=skip_bad)
        kind = "directory" if Path(source).is_dir() else "file"
    dataset = TokenDataset(*split_tokens(ids, vf))
    skipped = tuple(str(b) for b in bad)
    return DataSource(dataset, tok, kind, desc, sha, vf, unigram_entropy(ids), skipped)


def report_skipped(data: DataSource, note: Any) -> None:
    """Tell ``note`` (one line each) which unusable files were left out (--skip-bad)."""
    for bad in data.skipped:
        note(f"skipped: {bad}")


def evaluation_tokens(source: str | os.PathLike[str], tokenizer: Tokenizer) -> Any:
    """Every token id [T] of --data for evaluation (both splits): a file's or a directory's
    (in memory), or a prepared dataset's memory map (whose tokenizer must be ``tokenizer``)."""
    if is_prepared(source):
        ds = PreparedDataset.open(source)
        if ds.tokenizer.to_dict() != tokenizer.to_dict():
            raise InputError(
                f"prepared dataset {source} was tokenized with "
                f"{ds.manifest['tokenizer'].get('type')!r}, not this checkpoint's tokenizer"
            )
        return ds.tokens
    return read_corpus(source, tokenizer)[0]
