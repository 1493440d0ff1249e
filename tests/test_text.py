"""Tests of nn_core.data: tokenizer, default corpus, text loading, splits and batches."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from timeouts import SUBPROCESS_TIMEOUT

from nn_core.data.corpus import (
    DEFAULT_CORPUS_MODULES,
    default_corpus,
    describe_default_corpus,
    load_text,
)
from nn_core.data.dataset import (
    BatchSampler,
    TokenDataset,
    eval_batches,
    split_tokens,
    unigram_entropy,
)
from nn_core.data.tokenizer import ByteTokenizer
from nn_core.errors import CheckpointError, ConfigError, InputError

TOK = ByteTokenizer()


# ---- tokenizer -------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "hello, world\n", "naïve café — 日本語 🙂", "\x00\x7f\t"])
def test_encode_decode_round_trip(text):
    ids = TOK.encode(text)
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert ids.size == len(text.encode("utf-8"))
    assert ((ids >= 0) & (ids < 256)).all()
    assert TOK.decode(ids) == text
    assert TOK.decode(ids.tolist()) == text


def test_special_ids_and_vocab():
    assert (TOK.bos_id, TOK.eos_id, TOK.vocab_size) == (256, 257, 258)
    ids = TOK.encode("héllo", add_bos=True, add_eos=True)
    assert ids[0] == 256 and ids[-1] == 257
    assert TOK.decode(ids) == "héllo"
    assert TOK.decode([256, 104, 257, 105, 256]) == "hi"


def test_decode_replaces_bad_bytes_and_unknown_ids():
    assert TOK.decode([104, 0xFF, 105]) == "h\ufffdi"  # invalid UTF-8
    assert TOK.decode([104, 999, 105, -1]) == "h\ufffdi\ufffd"  # ids outside [0, 258)
    assert TOK.decode(np.zeros(0, dtype=np.int64)) == ""
    with pytest.raises(InputError, match="ids"):
        TOK.decode(np.zeros((2, 2), dtype=np.int64))


def test_tokenizer_save_load(tmp_path):
    path = tmp_path / "tokenizer.json"
    TOK.save(path)
    d = json.loads(path.read_text())
    assert d["type"] == "byte" and d["vocab_size"] == 258
    assert ByteTokenizer.load(path) == TOK
    assert ByteTokenizer.from_dict(TOK.to_dict()) == TOK


def test_tokenizer_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer"):
        ByteTokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="bad.json"):
        ByteTokenizer.load(tmp_path / "bad.json")
    with pytest.raises(CheckpointError, match="type"):
        ByteTokenizer.from_dict({"type": "bpe"})
    with pytest.raises(CheckpointError, match="bos_id"):
        ByteTokenizer.from_dict({"type": "byte", "bos_id": 1})


# ---- corpus and files ------------------------------------------------------------------


def test_default_corpus():
    text = default_corpus()
    assert len(text.encode("utf-8")) > 200_000
    assert default_corpus() == text
    ids = TOK.encode(text)
    assert ids.max() < 256
    assert list(DEFAULT_CORPUS_MODULES) == sorted(DEFAULT_CORPUS_MODULES)
    assert 30 <= len(DEFAULT_CORPUS_MODULES) <= 40
    assert "# ===== argparse (argparse.py) =====\n" in text
    assert "# ===== collections (collections/__init__.py) =====\n" in text


def test_default_corpus_is_deterministic_across_processes():
    code = (
        "import hashlib, nn_core.data.corpus as t; "
        "print(hashlib.sha256(t.default_corpus().encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=SUBPROCESS_TIMEOUT,
        ).stdout
        for _ in range(2)
    }
    assert len(digests) == 1


def test_describe_default_corpus():
    line = describe_default_corpus()
    assert "\n" not in line
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in line
    assert f"{len(default_corpus().encode('utf-8')):,}" in line


def test_load_text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("héllo\n", encoding="utf-8")
    assert load_text(path) == "héllo\n"
    assert load_text(str(path)) == "héllo\n"


def _invalid_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    return path, "UTF-8"


def _empty(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    return path, "empty"


@pytest.mark.parametrize(
    "make",
    [
        lambda d: (d / "missing.txt", "no such file"),
        lambda d: (d, "directory"),
        _invalid_utf8,
        _empty,
    ],
)
def test_load_text_errors_name_the_path(tmp_path, make):
    path, what = make(tmp_path)
    with pytest.raises(InputError) as info:
        load_text(path)
    assert str(path) in str(info.value)
    assert what in str(info.value)
    assert isinstance(info.value, ValueError)


def test_load_text_unreadable(tmp_path, monkeypatch):
    """The permission branch, whatever the user id (root reads a chmod 0 file)."""
    path = tmp_path / "secret.txt"
    path.write_text("x")

    def denied(self):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(type(path), "read_bytes", denied)
    with pytest.raises(InputError, match=r"secret\.txt: permission denied$"):
        load_text(path)


# Write-only sysctl files: the kernel refuses to read them even to root (EACCES).
WRITE_ONLY = [Path("/proc/sys/vm/drop_caches"), Path("/proc/sys/vm/compact_memory")]


@pytest.mark.skipif(not any(p.exists() for p in WRITE_ONLY), reason="Linux /proc/sys only")
def test_load_text_permission_denied_by_the_os():
    path = next(p for p in WRITE_ONLY if p.exists())
    with pytest.raises(InputError, match=rf"^text file {path}: permission denied$"):
        load_text(path)


def test_load_text_other_os_errors_name_the_cause(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(InputError, match=r"a_file/t\.txt: cannot read \(Not a directory\)"):
        load_text(a_file / "t.txt")  # ENOTDIR: the parent is a file
    if Path("/proc/self/mem").exists():  # EIO: address 0 of a process is never mapped
        with pytest.raises(InputError, match=r"cannot read \(Input/output error\)"):
            load_text("/proc/self/mem")


# ---- splits and batches ----------------------------------------------------------------


def test_split_tokens():
    ids = np.arange(1000)
    train, val = split_tokens(ids, 0.1)
    assert (train.size, val.size) == (900, 100)
    assert np.array_equal(np.concatenate([train, val]), ids)
    assert train.dtype == val.dtype == np.int64
    train, val = split_tokens(np.arange(5), 0.01)
    assert (train.size, val.size) == (4, 1)  # val keeps at least one token
    with pytest.raises(ConfigError, match="val_fraction"):
        split_tokens(ids, 1.0)
    with pytest.raises(InputError):
        split_tokens([7], 0.5)


def test_token_dataset_from_text():
    ds = TokenDataset.from_text("abcdefghij" * 10, val_fraction=0.2)
    assert (ds.train.size, ds.val.size) == (80, 20)
    assert TOK.decode(ds.train) + TOK.decode(ds.val) == "abcdefghij" * 10


def test_sampler_shapes_and_shift():
    ids = np.arange(500) * 3 % 256
    sampler = BatchSampler(ids, batch_size=4, seq_len=16, seed=0)
    for _ in range(20):
        x, y = sampler.next_batch()
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int64
        assert np.array_equal(x[:, 1:], y[:, :-1])
        assert np.array_equal(y, (x + 3) % 256)  # ids[i + 1] = ids[i] + 3 (mod 256)
    assert sampler.batches_drawn == 20


def test_sampler_windows_come_from_the_data():
    ids = np.arange(100)
    x, y = BatchSampler(ids, 8, 10, seed=1).next_batch()
    assert np.array_equal(x, x[:, :1] + np.arange(10))
    assert np.array_equal(y, x + 1)
    assert x.min() >= 0 and y.max() <= 99


def test_sampler_is_deterministic():
    ids = np.arange(300)
    a, b, c = (BatchSampler(ids, 3, 8, seed=s) for s in (5, 5, 6))
    batches_a = [a.next_batch()[0] for _ in range(5)]
    batches_b = [b.next_batch()[0] for _ in range(5)]
    batches_c = [c.next_batch()[0] for _ in range(5)]
    assert all(np.array_equal(p, q) for p, q in zip(batches_a, batches_b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(batches_a, batches_c, strict=True))


def test_sampler_state_round_trip_through_json():
    ids = np.arange(1000) % 97
    original = BatchSampler(ids, 4, 12, seed=123)
    for _ in range(7):
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))
    restored = BatchSampler(ids, 4, 12, seed=999)  # a different seed: the state wins
    restored.load_state_dict(state)
    assert restored.batches_drawn == 7
    for _ in range(5):
        (xa, ya), (xb, yb) = original.next_batch(), restored.next_batch()
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


def test_sampler_state_from_another_shape_is_rejected():
    state = BatchSampler(np.arange(100), 4, 8, seed=0).state_dict()
    with pytest.raises(CheckpointError, match="batch_size"):
        BatchSampler(np.arange(100), 2, 8, seed=0).load_state_dict(state)
    with pytest.raises(CheckpointError, match="malformed"):
        BatchSampler(np.arange(100), 4, 8, seed=0).load_state_dict({**state, "bit_generator": {}})


def test_sampler_needs_enough_tokens():
    BatchSampler(np.arange(9), 2, 8, seed=0).next_batch()  # exactly seq_len + 1 tokens: ok
    with pytest.raises(InputError, match="val.*8 tokens.*seq_len=8"):
        BatchSampler(np.arange(8), 2, 8, seed=0, name="val split")
    with pytest.raises(ConfigError, match="batch_size"):
        BatchSampler(np.arange(100), 0, 8, seed=0)
    with pytest.raises(ConfigError, match="seq_len"):
        BatchSampler(np.arange(100), 2, 0, seed=0)
    with pytest.raises(ConfigError, match="seed"):
        BatchSampler(np.arange(100), 2, 4, seed=-1)
    with pytest.raises(InputError):
        BatchSampler(np.zeros((10, 10), dtype=np.int64), 2, 4, seed=0)


def test_eval_batches():
    ids = np.arange(101)  # W = 100 // 10 = 10 windows
    batches = eval_batches(ids, batch_size=4, seq_len=10)
    assert [b[0].shape for b in batches] == [(4, 10), (4, 10), (2, 10)]
    starts = np.concatenate([x[:, 0] for x, _ in batches])
    assert starts.tolist() == list(range(0, 100, 10))  # non-overlapping, all covered
    for x, y in batches:
        assert np.array_equal(y, x + 1)
    again = eval_batches(ids, batch_size=4, seq_len=10)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))


def test_eval_batches_max_batches_spreads_windows():
    ids = np.arange(1001)  # W = 100 windows of 10
    batches = eval_batches(ids, batch_size=2, seq_len=10, max_batches=2)
    starts = np.concatenate([x[:, 0] for x, _ in batches]).tolist()
    assert starts == [0, 250, 500, 750]
    with pytest.raises(InputError):
        eval_batches(np.arange(5), 2, 10)


def test_unigram_entropy():
    for n in (1, 2, 10, 256):
        assert math.isclose(unigram_entropy(np.arange(n)), math.log(n), abs_tol=1e-12)
        assert math.isclose(unigram_entropy(np.tile(np.arange(n), 7)), math.log(n), abs_tol=1e-12)
    assert unigram_entropy(np.full(50, 42)) == 0.0
    assert math.isclose(
        unigram_entropy([0, 0, 0, 1]), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    )
    with pytest.raises(InputError):
        unigram_entropy(np.zeros(0, dtype=np.int64))
