"""BPE and other tokenizers in prepared datasets: ``nn-core prepare`` writes exactly the
ids ``nn-core train`` re-encodes (split by bytes, BPE trained on the training split),
document separators survive, and texts go to the tokenizer in safe pieces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nn_core.app.cli import main
from nn_core.app.commands import prepare as prepare_cmd
from nn_core.app.commands.train import retokenized
from nn_core.data import corpus, retokenize
from nn_core.data.prepared import PreparedDataset, load_data
from nn_core.data.retokenize import byte_documents, text_chunks, train_bpe_on_bytes
from nn_core.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe
from nn_core.storage.checkpoint import load_model

TRAIN = ["--batch-size", "2", "--seq-len", "16", "--eval-interval", "0", "--quiet"]
TRAIN += ["--sample-tokens", "0", "--config", "tiny", "--steps", "3"]
TRICKY = ["a", "b", "Z", "9", "0", " ", " ", "  ", "\n", "\t", "'s", "'", ".", "(", "é", "€"]
TRICKY += ["ü", "\u00a0", "\u3000", "日本", "\r\n", "x1", "_", "--", "🙂", "\u0301"]


def _tricky(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(TRICKY, n))


def _words(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "délta", "valüe", "items", "€uro", "  x", "\n"]
    return " ".join(rng.choice(words, n)) + "\n"


def _docs(tmp_path: Path, texts: list[str]) -> Path:
    root = tmp_path / "docs"
    root.mkdir()
    for i, text in enumerate(texts):
        (root / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    return root


def test_safe_pieces_encode_and_train_as_the_whole_text():
    for seed in range(4):
        text = _tricky(3000, seed) + _words(500, seed)
        pieces = list(text_chunks([text[i : i + 37] for i in range(0, len(text), 37)], size=50))
        assert len(pieces) > 20 and "".join(p for p in pieces if p is not None) == text
        assert pieces == list(text_chunks([text], size=50))  # cuts: a function of the text
        whole = train_bpe([text], 600)
        chunked = train_bpe(pieces, 600)  # type: ignore[arg-type]
        assert whole.tokenizer.to_str() == chunked.tokenizer.to_str()  # the same merges
        ids = np.concatenate([whole.encode(p) for p in pieces if p is not None])
        assert np.array_equal(ids, whole.encode(text))


def test_each_document_is_decoded_on_its_own_however_the_bytes_come_in():
    rng = np.random.default_rng(0)
    docs = [_tricky(200, s).encode("utf-8")[3:-2] for s in range(3)]  # cut characters too
    ids = np.concatenate(
        [np.frombuffer(docs[0], np.uint8), [257], np.frombuffer(docs[1], np.uint8), [257]]
        + [np.frombuffer(docs[2], np.uint8)]
    ).astype(np.int64)
    cuts = np.sort(rng.choice(ids.size, 40, replace=False))
    got = list(byte_documents(np.split(ids, cuts)))
    texts = "".join("\x00" if t is None else t for t in got).split("\x00")
    assert texts == [d.decode("utf-8", "replace") for d in docs]
    assert got.count(None) == 2


def _eos_runs(ids: np.ndarray, eos: int) -> list[np.ndarray]:
    return np.split(ids, np.flatnonzero(ids == eos))


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_files_of_a_directory_are_joined_by_eos_in_train_and_prepare(tmp_path, kind):
    texts = [_words(60, s) for s in range(4)]
    root = _docs(tmp_path, texts)
    data = load_data(root, val_fraction=0.1)  # bytes, as train reads them
    tok = ByteTokenizer() if kind == "byte" else train_bpe_on_bytes([data.dataset.train], 400)
    ours, _ = retokenized(data, tok)  # what nn-core train trains on
    ids = np.concatenate([ours.dataset.train, ours.dataset.val])
    assert tok.eos_id is not None and np.count_nonzero(ids == tok.eos_id) == len(texts) - 1
    runs = _eos_runs(ids, tok.eos_id)  # each file's tokens, EOS first (but the first)
    for i, (text, run) in enumerate(zip(texts, runs, strict=True)):
        assert tok.decode(run) == text and (i == 0 or run[0] == tok.eos_id)
    spec = None if kind == "byte" else tok
    prepare_cmd.prepare(str(root), str(tmp_path / "p"), tokenizer=spec)
    prep = PreparedDataset.open(tmp_path / "p")
    assert np.array_equal(prep.tokens, ids)  # prepare writes the same ids, EOS and all
    assert int(prep.manifest["train_tokens"]) == ours.dataset.train.size


def test_prepared_bpe_streams_exactly_what_train_encodes(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "READ_CHUNK", 7)  # reads cut characters and documents
    monkeypatch.setattr(retokenize, "CHUNK_CHARS", 40)  # the tokenizer sees many pieces
    texts = [_tricky(150, 1), _words(80, 2), "é", _tricky(120, 3) + _words(40, 4)]
    root = _docs(tmp_path, texts)
    for vf in (0.1, 0.37, 0.6):  # the byte split falls in different files / characters
        data = load_data(root, val_fraction=vf)
        bpe = train_bpe_on_bytes([data.dataset.train], 500)
        ours, _ = retokenized(data, bpe)
        out = tmp_path / f"p{vf}"
        m = prepare_cmd.prepare(str(root), str(out), bpe_vocab_size=500, val_fraction=vf)
        prep = load_data(out)
        assert prep.tokenizer.to_dict() == bpe.to_dict()  # the same BPE: trained on train only
        assert np.array_equal(prep.dataset.train, ours.dataset.train)
        assert np.array_equal(prep.dataset.val, ours.dataset.val)
        assert m["val_tokens"] == ours.dataset.val.size and m["vocab_size"] == bpe.vocab_size
        assert prep.unigram_entropy == pytest.approx(ours.unigram_entropy, rel=1e-12)


def test_cli_prepare_bpe_trains_bit_for_bit_as_train_on_the_file(tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text(_words(1500, 7), encoding="utf-8")
    for source, name in ((data, "f"), (_docs(tmp_path, [_words(300, s) for s in range(3)]), "d")):
        prep = tmp_path / f"{name}.prep"
        assert main(["prepare", str(source), "--out", str(prep)]) == 0  # default: BPE 1000
        assert "tokenizer hf" in capsys.readouterr().out
        direct, prepared = tmp_path / f"{name}-direct", tmp_path / f"{name}-prepared"
        assert main(["train", "--data", str(source), *TRAIN, "--out", str(direct)]) == 0
        assert main(["train", "--data", str(prep), *TRAIN, "--out", str(prepared)]) == 0
        a, b = load_model(direct), load_model(prepared)
        for key, w in a.parameters().items():
            assert np.array_equal(w, b.parameters()[key]), key
        tok_a = (direct / "tokenizer.json").read_text()
        assert tok_a == (prepared / "tokenizer.json").read_text()
        assert isinstance(load_tokenizer(direct / "tokenizer.json"), HFTokenizer)
        ra, rb = (json.loads((p / "run.json").read_text()) for p in (direct, prepared))
        assert ra["data"]["train_tokens"] == rb["data"]["train_tokens"]
        assert ra["data"]["val_tokens"] == rb["data"]["val_tokens"]


def test_vocab_size_is_checked_and_only_for_bpe(tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text(_words(200, 1), encoding="utf-8")
    code = main(["prepare", str(data), "--out", str(tmp_path / "p"), "--vocab-size", "100"])
    assert code == 2 and "--vocab-size" in capsys.readouterr().err
    argv = ["prepare", str(data), "--out", str(tmp_path / "q"), "--tokenizer", "byte"]
    assert main([*argv, "--vocab-size", "300"]) == 2
    assert "--tokenizer bpe" in capsys.readouterr().err
    assert main(["prepare", str(data), "--out", str(tmp_path / "r"), "--vocab-size", "300"]) == 0
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["vocab_size"] <= 300
