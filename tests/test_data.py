"""Any corpus: files, directories (sorted, bad files named or skipped) and prepared
(memory-mapped) datasets that give exactly the tokens and batches of the text itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from nn_core.app.cli import main
from nn_core.app.commands import prepare as prepare_cmd
from nn_core.data.corpus import list_files, read_corpus
from nn_core.data.dataset import BatchSampler, eval_batches, gather_windows
from nn_core.data.prepared import (
    MANIFEST_FIELDS,
    PreparedDataset,
    is_prepared,
    load_data,
    token_dtype,
    write_prepared,
)
from nn_core.data.tokenizer import ByteTokenizer
from nn_core.errors import InputError, OutputError
from nn_core.storage.checkpoint import load_model

TOK = ByteTokenizer()
TRAIN = ["--batch-size", "4", "--seq-len", "32", "--eval-interval", "0", "--quiet"]
TRAIN += ["--checkpoint-interval", "2", "--sample-tokens", "0", "--config", "tiny"]
TRAIN += ["--tokenizer", "byte"]  # token counts here are byte counts


def _text(n: int = 200, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "délta", "valüe", "items", "€uro"]
    return "".join(f"{' '.join(rng.choice(words, 5))} = {i}\n" for i in range(n))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text(_text(50, 1), encoding="utf-8")
    (root / "b" / "z.py").write_text(_text(60, 2), encoding="utf-8")
    (root / "b" / "deep" / "c.txt").write_text(_text(40, 3), encoding="utf-8")
    (root / "m.py").write_text(_text(30, 4), encoding="utf-8")
    return root


def test_directory_files_are_sorted_and_filtered(corpus):
    rel = [p.relative_to(corpus).as_posix() for p in list_files(corpus)]
    assert rel == ["a.txt", "b/deep/c.txt", "b/z.py", "m.py"]
    assert [p.name for p in list_files(corpus, "*.py")] == ["z.py", "m.py"]
    ids, desc, bad, _ = read_corpus(corpus, TOK)
    parts = [TOK.encode(p.read_text(encoding="utf-8")) for p in list_files(corpus)]
    eos = np.array([TOK.eos_id])
    want = np.concatenate([parts[0], eos, parts[1], eos, parts[2], eos, parts[3]])
    assert np.array_equal(ids, want) and bad == [] and "4 files" in desc


def test_bad_files_are_named_and_skipped_only_when_asked(corpus):
    good = read_corpus(corpus, TOK)[0]  # the four good files
    (corpus / "latin1.txt").write_bytes("café".encode("latin-1"))
    (corpus / "empty.txt").write_bytes(b"")
    os.symlink(corpus / "gone", corpus / "dangling.txt")  # unreadable: no such file
    with pytest.raises(InputError) as err:
        read_corpus(corpus, TOK)
    msg = str(err.value)
    assert "\n" not in msg and "3 unusable" in msg and "--skip-bad" in msg
    for name, why in [("latin1.txt", "not valid UTF-8"), ("empty.txt", "is empty")]:
        assert f"{name} ({why}" in msg
    assert "dangling.txt (no such file)" in msg
    ids, desc, bad, _ = read_corpus(corpus, TOK, skip_bad=True)
    assert sorted(b.path.name for b in bad) == ["dangling.txt", "empty.txt", "latin1.txt"]
    assert "3 skipped" in desc
    assert np.array_equal(ids, good)


def test_prepared_file_gives_the_same_tokens_and_batches_as_the_file(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(_text(400), encoding="utf-8")
    prep = tmp_path / "prep"
    prepare_cmd.prepare(str(data), str(prep), val_fraction=0.15)
    direct, prepared = load_data(data, val_fraction=0.15), load_data(prep)
    assert prepared.kind == "prepared" and isinstance(prepared.dataset.train, np.memmap)
    assert prepared.dataset.train.dtype == np.uint16
    for split in ("train", "val"):
        a, b = getattr(direct.dataset, split), getattr(prepared.dataset, split)
        assert a.dtype == np.int64 and np.array_equal(a, b)
    assert prepared.unigram_entropy == pytest.approx(direct.unigram_entropy, rel=1e-12)
    s1 = BatchSampler(direct.dataset.train, 4, 32, seed=5)
    s2 = BatchSampler(prepared.dataset.train, 4, 32, seed=5)
    for _ in range(20):
        (x1, y1), (x2, y2) = s1.next_batch(), s2.next_batch()
        assert x2.dtype == np.int64 and np.array_equal(x1, x2) and np.array_equal(y1, y2)
    e1, e2 = eval_batches(direct.dataset.val, 4, 32), eval_batches(prepared.dataset.val, 4, 32)
    assert all(np.array_equal(a, b) for u, v in zip(e1, e2) for a, b in zip(u, v))
    # the sampler over the map resumes exactly
    state = json.loads(json.dumps(s2.state_dict()))
    want = [s2.next_batch() for _ in range(3)]
    s3 = BatchSampler(prepared.dataset.train, 4, 32, seed=99)
    s3.load_state_dict(state)
    assert all(
        np.array_equal(a[0], b[0]) for a, b in zip(want, [s3.next_batch() for _ in range(3)])
    )


def test_prepared_directory_equals_the_directory_and_records_the_skipped(corpus, tmp_path):
    (corpus / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(InputError, match=r"bad.txt \(not valid UTF-8"):
        prepare_cmd.prepare(str(corpus), str(tmp_path / "p0"))
    assert not (tmp_path / "p0").exists()  # nothing half-written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    m = prepare_cmd.prepare(str(corpus), str(tmp_path / "p"), skip_bad=True)
    assert list(m) == list(MANIFEST_FIELDS) and m["source"]["files"] == 4
    assert m["source"]["skipped"] == [f"{corpus / 'bad.txt'} (not valid UTF-8 (byte offset 0))"]
    direct = load_data(corpus, skip_bad=True)
    prepared = load_data(tmp_path / "p")
    assert np.array_equal(direct.dataset.train, prepared.dataset.train)
    assert np.array_equal(direct.dataset.val, prepared.dataset.val)
    assert m["sha256"] == prepared.sha256
    PreparedDataset.open(tmp_path / "p").verify()


def test_manifest_and_damage_are_checked(tmp_path):
    data = tmp_path / "t.txt"
    data.write_text(_text(100), encoding="utf-8")
    prep = tmp_path / "p"
    m = prepare_cmd.prepare(str(data), str(prep))
    doc = json.loads((prep / "manifest.json").read_text())
    assert doc == m and doc["dtype"] == "uint16" and doc["vocab_size"] == 258
    assert doc["n_tokens"] == len(data.read_bytes()) == doc["train_tokens"] + doc["val_tokens"]
    assert (prep / "tokens.bin").stat().st_size == 2 * doc["n_tokens"]
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    with pytest.raises(InputError, match="val_fraction"):
        load_data(prep, val_fraction=0.2)
    with pytest.raises(InputError, match="--glob"):
        load_data(prep, glob="*.txt")
    with open(prep / "tokens.bin", "r+b") as f:
        f.seek(10)
        f.write(b"\x00\x01")
    with pytest.raises(InputError, match="checksum"):
        PreparedDataset.open(prep).verify()
    with open(prep / "tokens.bin", "r+b") as f:
        f.truncate(20)
    with pytest.raises(InputError, match="truncated"):
        load_data(prep)


def test_uint32_ids_when_the_vocabulary_does_not_fit(tmp_path):
    class Wide(ByteTokenizer):  # a vocabulary of 70,000: ids shifted past 65,535
        @property
        def vocab_size(self) -> int:
            return 70_000

        def encode(self, text: str, **kw: object) -> np.ndarray:
            return super().encode(text) + 69_000

    data = tmp_path / "t.txt"
    data.write_text("hello world", encoding="utf-8")
    out = tmp_path / "w"
    out.mkdir()
    m = write_prepared(data, out, tokenizer=Wide())
    ids = np.fromfile(out / "tokens.bin", dtype="<u4")
    assert m["dtype"] == "uint32" and np.array_equal(ids, Wide().encode("hello world"))


def test_prepare_owns_only_what_it_wrote_and_is_atomic(tmp_path, monkeypatch):
    data = tmp_path / "t.txt"
    data.write_text(_text(50), encoding="utf-8")
    out = tmp_path / "p"
    prepare_cmd.prepare(str(data), str(out))
    prepare_cmd.prepare(str(data), str(out), val_fraction=0.2)  # its own kind: replaced
    assert load_data(out).val_fraction == 0.2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(OutputError, match="never deletes"):
            prepare_cmd.prepare(str(data), str(foreign), force=force)
    assert (foreign / "notes.txt").read_text() == "keep me"

    def interrupted(*args: object, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("nn_core.data.prepared._sha256_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_cmd.prepare(str(data), str(tmp_path / "half"))
    with pytest.raises(KeyboardInterrupt):
        prepare_cmd.prepare(str(data), str(out))  # the old dataset stays, whole
    assert not (tmp_path / "half").exists() and is_prepared(out)
    assert load_data(out).val_fraction == 0.2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "p", "t.txt"]


def test_gather_windows_releases_nothing_it_should_keep(tmp_path):
    ids = np.arange(100_000, dtype=np.uint16)
    ids.tofile(tmp_path / "x.bin")
    mm = np.memmap(tmp_path / "x.bin", dtype=np.uint16, mode="r")
    starts = np.array([0, 4095, 50_000, 99_000])
    got = gather_windows(mm[10:], starts, 33)
    assert np.array_equal(got, gather_windows(ids[10:], starts, 33))
    assert got.dtype == np.int64 and np.array_equal(mm, ids)  # the map still reads right


def test_cli_prepare_train_and_resume_exactly(tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text(_text(300), encoding="utf-8")
    prep = tmp_path / "prep"
    assert main(["prepare", str(data), "--out", str(prep), "--tokenizer", "byte"]) == 0
    assert "tokens (uint16" in capsys.readouterr().out
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", "--data", str(prep), "--steps", "4", *TRAIN, "--out", str(straight)]) == 0
    assert (
        main(["train", "--data", str(data), "--steps", "4", *TRAIN, "--out", str(tmp_path / "f")])
        == 0
    )
    base = ["train", "--data", str(prep), "--steps", "4", *TRAIN, "--out", str(split)]
    assert main([*base, "--stop-at", "2"]) == 0
    assert main(["train", "--resume", "--out", str(split), "--quiet"]) == 0
    a, b, c = (load_model(p) for p in (straight, split, tmp_path / "f"))
    for name, w in a.parameters().items():  # resumed == straight == trained on the file
        pb, pc = b.parameters()[name], c.parameters()[name]
        assert np.array_equal(w, pb) and np.array_equal(w, pc), name
    run = json.loads((split / "run.json").read_text())
    assert run["data"]["options"]["kind"] == "prepared"
    capsys.readouterr()
    assert (
        main(["train", "--data", str(prep), "--glob", "*.txt", "--out", str(tmp_path / "g")]) == 1
    )
    assert "--glob" in capsys.readouterr().err


def test_evaluate_reads_a_prepared_dataset_and_a_directory(tmp_path, corpus):
    from concurrent.futures import ThreadPoolExecutor

    from nn_core import Config, MoETransformer
    from nn_core.app.jobs import evaluate_file
    from nn_core.storage.checkpoint import save_model

    ckpt = save_model(MoETransformer(Config.tiny(), seed=1), tmp_path / "m")
    data = tmp_path / "t.txt"
    data.write_text(_text(100), encoding="utf-8")
    prepare_cmd.prepare(str(data), str(tmp_path / "p"))
    prepare_cmd.prepare(str(corpus), str(tmp_path / "pd"))
    kw = dict(seq_len=32, batch_size=4, max_batches=3)
    with ThreadPoolExecutor(2) as ex:
        file_result = evaluate_file(ckpt, data, executor=ex, **kw)
        assert evaluate_file(ckpt, tmp_path / "p", executor=ex, **kw) == file_result
        on_dir = evaluate_file(ckpt, corpus, executor=ex, **kw)
        assert evaluate_file(ckpt, tmp_path / "pd", executor=ex, **kw) == on_dir


def test_cli_train_on_a_directory_names_bad_files_and_skips_them_when_asked(corpus, capsys):
    (corpus / "bad.txt").write_bytes(b"ok \xc3")  # a truncated UTF-8 character
    out = corpus.parent / "run"
    argv = ["train", "--data", str(corpus), "--steps", "1", *TRAIN, "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bad.txt (not valid UTF-8" in err and "--skip-bad" in err
    assert main([*argv, "--skip-bad", "--glob", "*.txt"]) == 0
    err = capsys.readouterr().err
    assert "skipped:" in err and "bad.txt" in err
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["options"]["glob"] == "*.txt" and len(run["data"]["options"]["skipped"]) == 1
    assert run["data"]["train_tokens"] + run["data"]["val_tokens"] == len(
        read_corpus(corpus, TOK, glob="*.txt", skip_bad=True)[0]
    )
