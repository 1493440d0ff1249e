"""Tokenizers: bytes and byte-level BPE (the tokenizers library) behind one protocol, and a
run that keeps the tokenizer it was trained with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nn_core.app.cli import main
from nn_core.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    split_text,
    tokenize_splits,
    tokenizer_files,
    train_bpe,
)
from nn_core.errors import CheckpointError, InputError

TEXTS = ["", "a", "héllo  wörld\n\ttabs", "emoji 😀 and \x00 nul", "日本語のテキスト", "\r\n" * 3]
CORPUS = "".join(f"def f{i}(x, y):\n    return x * {i} + y  # ünïcode\n" for i in range(300))


def run_cli(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return train_bpe([CORPUS], 400)


def test_bpe_round_trips_any_text_and_has_the_requested_vocab(bpe):
    assert isinstance(bpe, Tokenizer)
    assert bpe.vocab_size == 400  # special tokens included
    assert (bpe.bos_id, bpe.eos_id) == (0, 1)
    for text in [*TEXTS, CORPUS[:500]]:
        ids = bpe.encode(text)
        assert ids.dtype == np.int64 and ((ids >= 0) & (ids < 400)).all()
        assert bpe.decode(ids) == text
    assert bpe.encode(CORPUS).size < len(CORPUS.encode("utf-8")) / 2  # it does merge
    framed = bpe.encode("x", add_bos=True, add_eos=True)
    assert framed[0] == 0 and framed[-1] == 1 and bpe.decode(framed) == "x"


def test_decode_shows_ids_outside_the_vocabulary_as_replacement_characters(bpe):
    a, b = bpe.encode("ab").tolist()[:1], bpe.encode("cd").tolist()[:1]
    assert bpe.decode([*a, 400, *b]) == bpe.decode(a) + "\ufffd" + bpe.decode(b)
    assert bpe.decode([-1]) == "\ufffd"
    with pytest.raises(InputError, match="1-D integer"):
        bpe.decode(np.zeros((2, 2), np.int64))


def test_the_byte_tokenizer_as_a_tokenizers_one_encodes_identically():
    byte = ByteTokenizer()
    hf = byte.to_hf()
    assert (hf.vocab_size, hf.bos_id, hf.eos_id) == (258, 256, 257)
    for text in TEXTS:
        assert hf.encode(text).tolist() == byte.encode(text).tolist()
        assert hf.decode(byte.encode(text)) == text


def test_load_tokenizer_reads_both_formats(bpe, tmp_path):
    for tok, name in ((ByteTokenizer(), "byte"), (bpe, "bpe")):
        d = tmp_path / name
        d.mkdir()
        for file, text in tokenizer_files(tok).items():
            (d / file).write_text(text, encoding="utf-8")
        back = load_tokenizer(d / "tokenizer.json")
        assert type(back) is type(tok) and back.to_dict() == tok.to_dict()
        assert back.encode(CORPUS[:300]).tolist() == tok.encode(CORPUS[:300]).tolist()
    (tmp_path / "bad.json").write_text('{"model": 3}')
    with pytest.raises(CheckpointError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_bpe_is_trained_on_the_training_split_only():
    secret = "zqxjzqxj"  # only in the held-out tail
    text = CORPUS + ("  " + secret) * 100
    train, val = split_text(text, 0.1)
    assert secret not in train and train + val == text
    tok = train_bpe([train], 400)
    tr_ids, val_ids, val_bytes = tokenize_splits(text, tok, 0.1)
    assert val_bytes == len(val.encode("utf-8"))
    assert tok.decode(val_ids) == val and tok.decode(tr_ids) == train
    assert not any("zqx" in t for t in tok.tokenizer.get_vocab())  # no merge saw it


def test_split_text_cuts_at_a_character_boundary():
    train, val = split_text("é" * 10, 0.25)  # 20 bytes; 5 held out -> cut moved to 14
    assert train + val == "é" * 10 and len(val.encode()) == 6


# ---- a run keeps its tokenizer ---------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    (root / "data.txt").write_text(CORPUS, encoding="utf-8")
    argv = ["train", "--data", root / "data.txt", "--tokenizer", "bpe", "--steps", "3"]
    argv += ["--batch-size", "2", "--seq-len", "16", "--eval-interval", "0", "--quiet"]
    argv += ["--sample-tokens", "8", "--out", root / "run"]
    assert main([str(a) for a in argv]) == 0
    return root


def test_a_bpe_run_saves_its_tokenizer_and_reports_bits_per_byte(bpe_run):
    run = bpe_run / "run"
    tok = load_tokenizer(run / "tokenizer.json")
    assert isinstance(tok, HFTokenizer) and 258 < tok.vocab_size <= 1000  # tiny: 1000
    info = json.loads((run / "run.json").read_text())
    assert info["tokenizer"] == tok.to_dict()
    summary = json.loads((run / "summary.json").read_text())
    train, val = split_text(CORPUS, 0.1)
    expect = summary["val_ce"] / np.log(2) * tok.encode(val).size / len(val.encode())
    assert summary["val_bits_per_byte"] == pytest.approx(expect, rel=1e-12)


def test_generate_evaluate_and_export_use_the_runs_tokenizer(bpe_run, capsys):
    from nn_core.app.jobs import evaluate_file, generate_many
    from nn_core.storage.hf import run_tokenizer

    run = bpe_run / "run"
    tok = load_tokenizer(run / "tokenizer.json")
    assert run_tokenizer(run).to_dict() == tok.to_dict()
    result = evaluate_file(
        run, bpe_run / "data.txt", seq_len=16, batch_size=4, max_batches=2, workers=1
    )
    assert result["tokens"] == 2 * 4 * 16
    n_tokens, n_bytes = tok.encode(CORPUS).size, len(CORPUS.encode())
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / np.log(2) * n_tokens / n_bytes)
    [text] = generate_many(run, ["def f"], max_new_tokens=4, include_prompt=True, workers=1)
    assert text.startswith("def f")
    code, out, err = run_cli(
        ["generate", "--checkpoint", run, "--prompt", "def f", "--max-new-tokens", "4"], capsys
    )
    assert code == 0 and "def f" in out, err


def test_a_run_refuses_a_different_tokenizer_on_resume_and_init(bpe_run, tmp_path, capsys):
    run = bpe_run / "run"
    code, out, err = run_cli(["train", "--resume", "--out", run, "--tokenizer", "byte"], capsys)
    assert code != 0 and "tokenizer" in one_line(err)
    code, out, err = run_cli(
        [
            "train",
            "--init",
            run,
            "--tokenizer",
            "byte",
            "--data",
            bpe_run / "data.txt",
            "--out",
            tmp_path / "ft",
        ],
        capsys,
    )
    assert code != 0 and "refusing a different one" in one_line(err)
    # the same tokenizer file is accepted: fine-tuning from --init
    argv = [
        "train",
        "--init",
        run,
        "--tokenizer",
        run / "tokenizer.json",
        "--data",
        bpe_run / "data.txt",
    ]
    argv += ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-interval", "0"]
    argv += ["--quiet", "--sample-tokens", "0", "--out", tmp_path / "ft"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert (
        load_tokenizer(tmp_path / "ft" / "tokenizer.json").to_dict()
        == load_tokenizer(run / "tokenizer.json").to_dict()
    )


def test_init_starts_from_the_given_weights(bpe_run, tmp_path, capsys):
    from nn_core.storage.checkpoint import load_model

    run = bpe_run / "run"
    argv = ["train", "--init", run, "--data", bpe_run / "data.txt", "--steps", "1", "--lr", "1e-12"]
    argv += ["--batch-size", "2", "--seq-len", "16", "--eval-interval", "0", "--warmup-steps", "0"]
    argv += ["--quiet", "--sample-tokens", "0", "--out", tmp_path / "ft"]
    assert run_cli(argv, capsys)[0] == 0
    a, b = load_model(run).flat_params, load_model(tmp_path / "ft").flat_params
    assert np.abs(a - b).max() < 1e-6  # one update at lr 1e-12 from the same weights
    code, out, err = run_cli([*argv[:-1], tmp_path / "ft2", "--config", "small"], capsys)
    assert code != 0 and "--init" in one_line(err)


def test_an_unknown_tokenizer_choice_is_one_line(tmp_path, capsys):
    (tmp_path / "d.txt").write_text(CORPUS)
    code, out, err = run_cli(
        ["train", "--data", tmp_path / "d.txt", "--tokenizer", "nonsense", "--out", tmp_path / "r"],
        capsys,
    )
    assert code != 0 and "--tokenizer must be byte, bpe or a tokenizer.json" in one_line(err)


def test_a_directory_trains_with_bpe_and_a_prepared_dataset_keeps_its_tokenizer(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"f{i}.py").write_text(CORPUS[i * 4000 : (i + 1) * 4000 + 2000])
    argv = ["--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-interval", "0"]
    argv += ["--quiet", "--sample-tokens", "0"]
    code, out, err = run_cli(["train", "--data", corpus, *argv, "--out", tmp_path / "d"], capsys)
    assert code == 0, err
    assert isinstance(load_tokenizer(tmp_path / "d" / "tokenizer.json"), HFTokenizer)
    resume = ["train", "--resume", "--out", tmp_path / "d", "--steps", "2", "--tokenizer", "bpe"]
    assert run_cli(resume, capsys)[0] == 0  # the same BPE again: accepted
    prep = ["prepare", corpus, "--out", tmp_path / "prep", "--tokenizer", "byte"]
    assert run_cli(prep, capsys)[0] == 0
    code, out, err = run_cli(
        [
            "train",
            "--data",
            tmp_path / "prep",
            "--tokenizer",
            "bpe",
            *argv,
            "--out",
            tmp_path / "p",
        ],
        capsys,
    )
    assert code != 0 and "refusing a different one" in one_line(err)
    code, out, err = run_cli(
        ["train", "--data", tmp_path / "prep", *argv, "--out", tmp_path / "p"], capsys
    )
    assert code == 0, err
    assert isinstance(load_tokenizer(tmp_path / "p" / "tokenizer.json"), ByteTokenizer)
