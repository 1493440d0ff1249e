"""Generation that stops and continues: EOS, stop strings (also streamed), the sliding
window past max_seq_len, the repetition penalty inside the decoding loop, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from nn_core import Config, MoETransformer
from nn_core.app.cli import main
from nn_core.data.tokenizer import ByteTokenizer
from nn_core.errors import ConfigError
from nn_core.inference.generate import (
    cut_at_stop,
    generate,
    generate_batch,
    generate_text,
    generate_uncached,
    stop_prefix_len,
    stream,
    stream_text,
)
from nn_core.inference.sampling import Greedy, MinP, RepetitionPenalty, Temperature, TopK
from nn_core.storage.checkpoint import save_model

CFG = Config.tiny().replace(max_seq_len=32)  # short window: slides are cheap to reach
TOK = ByteTokenizer()
PROMPT = TOK.encode("def f(x):")  # 9 byte tokens
LIMIT = TOK.vocab_size


@pytest.fixture(scope="module")
def model() -> MoETransformer:
    return MoETransformer(CFG, seed=3, dtype=np.float64)


# ---- EOS and stop strings ---------------------------------------------------------------


@pytest.mark.parametrize("strategy", [Greedy(), TopK(20, 1.5)], ids=repr)
def test_generation_ends_after_the_eos_id(model, strategy):
    full = generate(model, PROMPT, 30, strategy, seed=4, vocab_limit=LIMIT)
    new = full[PROMPT.size :]
    eos = new[5]  # pretend the sixth new token is end-of-text
    first = new.index(eos)
    got = generate(model, PROMPT, 30, strategy, seed=4, vocab_limit=LIMIT, eos_id=eos)
    assert got == full[: PROMPT.size + first + 1]  # up to and including the EOS
    streamed = list(stream(model, PROMPT, 21, strategy, seed=4, vocab_limit=LIMIT, eos_id=eos))
    assert streamed == got[PROMPT.size :]
    assert generate(model, PROMPT, 30, strategy, seed=4, vocab_limit=LIMIT, eos_id=None) == full


def test_stop_strings_end_the_ids_and_are_cut_from_the_text(model):
    strategy = TopK(30, 1.5)
    seed = 6  # a draw whose text reaches the EOS id halfway (new token 14 of 23)
    full = generate(model, PROMPT, 32, strategy, seed=seed, vocab_limit=LIMIT)
    text = TOK.decode(np.array(full[PROMPT.size :]))
    stop = text[6:8]  # a string that occurs in the new text
    at = text.find(stop)
    want_text = text[:at]
    ids = generate(
        model, PROMPT, 32, strategy, seed=seed, vocab_limit=LIMIT, stop=[stop], tokenizer=TOK
    )
    new_text = TOK.decode(np.array(ids[PROMPT.size :]))
    assert new_text.endswith(stop) and new_text.find(stop) == at  # ends with the completing token
    kw = dict(stop=[stop, "never occurs"], seed=seed, ignore_eos=True)
    assert generate_text(model, TOK, "def f(x):", 23, strategy, **kw) == want_text
    pieces = list(stream_text(model, TOK, PROMPT, 23, strategy, **kw))
    assert "".join(pieces) == want_text and all(stop not in p for p in pieces)
    # no stop: the whole text, or up to the tokenizer's EOS, which is on by default
    assert generate_text(model, TOK, PROMPT, 23, strategy, seed=seed, ignore_eos=True) == text
    at_eos = generate(model, PROMPT, 32, strategy, seed=seed, vocab_limit=LIMIT, eos_id=TOK.eos_id)
    assert TOK.eos_id in full and at_eos[-1] == TOK.eos_id and len(at_eos) < len(full)
    assert generate_text(model, TOK, PROMPT, 23, strategy, seed=seed) == TOK.decode(at_eos[9:])


def test_stream_holds_back_text_that_may_start_a_stop_string(model):
    new = generate(model, PROMPT, 30, Greedy(), vocab_limit=LIMIT)[PROMPT.size :]
    text = TOK.decode(np.array(new))
    stop = text[4:6] + "\x00never"  # starts like the text, but is never completed
    pieces = list(stream_text(model, TOK, PROMPT, 21, Greedy(), stop=[stop]))
    assert "".join(pieces) == text
    sent = 0
    for piece in pieces:  # the held text came out only once the next tokens settled it
        sent += len(piece)
        assert sent <= 4 or sent >= 6


def test_stop_helpers():
    assert cut_at_stop("abcXYdefXY", ["XY", "de"]) == ("abc", True)
    assert cut_at_stop("abc", ["z"]) == ("abc", False)
    assert stop_prefix_len("hello wor", ["world", "or"]) == 3  # "wor" may become "world"
    assert stop_prefix_len("hello", ["xyz"]) == 0
    assert stop_prefix_len("ab", ["abc", "b"]) == 2


def test_batch_rows_stop_on_their_own(model):
    strategy = TopK(20, 1.3)
    rngs = [np.random.default_rng(s) for s in (1, 2, 3)]
    free = generate_batch(model, [PROMPT] * 3, 30, strategy, rng=rngs, vocab_limit=LIMIT)
    eos = free[0][PROMPT.size + 3]
    rngs = [np.random.default_rng(s) for s in (1, 2, 3)]
    got = generate_batch(model, [PROMPT] * 3, 30, strategy, rng=rngs, vocab_limit=LIMIT, eos_id=eos)
    for row, want in zip(got, free):
        new = want[PROMPT.size :]
        cut = new.index(eos) + 1 if eos in new else len(new)
        assert row == want[: PROMPT.size + cut]


def test_bad_stop_arguments_are_config_errors(model):
    with pytest.raises(ConfigError, match="eos_id"):
        generate(model, PROMPT, 20, eos_id=CFG.vocab_size)
    with pytest.raises(ConfigError, match="tokenizer"):
        generate(model, PROMPT, 20, stop=["x"])
    with pytest.raises(ConfigError, match="stop"):
        generate(model, PROMPT, 20, stop=[""], tokenizer=TOK)
    with pytest.raises(ConfigError, match="slide_keep"):
        generate(model, PROMPT, 40, slide_keep=CFG.max_seq_len)
    with pytest.raises(ConfigError, match="max_len"):
        generate(model, PROMPT, CFG.max_seq_len + 1)  # no sliding unless asked


# ---- the sliding window ------------------------------------------------------------------


@pytest.mark.parametrize("keep", [8, 16, 31])
@pytest.mark.parametrize(
    "strategy", [Greedy(), TopK(10, 1.2), RepetitionPenalty(1.5, MinP(0.05, 1.0))], ids=repr
)
def test_sliding_equals_generating_from_the_cropped_context(model, strategy, keep):
    m = CFG.max_seq_len
    total = 90  # several slides
    got = generate(model, PROMPT, total, strategy, rng=np.random.default_rng(5), slide_keep=keep)
    assert len(got) == total
    # replay: the first window as usual, then every slide as a fresh prompt of `keep` tokens
    rng = np.random.default_rng(5)
    want = generate(model, PROMPT, m, strategy, rng=rng)
    while len(want) < total:
        n = min(m, keep + total - len(want))
        want += generate(model, want[-keep:], n, strategy, rng=rng)[keep:]
    assert got == want
    uncached = generate_uncached(
        model, PROMPT, total, strategy, rng=np.random.default_rng(5), slide_keep=keep
    )
    assert uncached == got
    streamed = stream(model, PROMPT, total - PROMPT.size, strategy, seed=0, slide_keep=keep)
    assert len(list(streamed)) == total - PROMPT.size


def test_sliding_in_a_batch_equals_one_row_at_a_time(model):
    prompts = [PROMPT, PROMPT[::-1]]
    rngs = [np.random.default_rng(s) for s in (7, 8)]
    rows = generate_batch(model, prompts, 70, Temperature(1.0), rng=rngs, slide_keep=12)
    for p, row, s in zip(prompts, rows, (7, 8)):
        one = generate(model, p, 70, Temperature(1.0), rng=np.random.default_rng(s), slide_keep=12)
        assert row == one


def test_repetition_penalty_sees_the_context_when_decoding(model):
    """The loop passes the ids so far: equal to a direct loop over full forwards."""
    strategy = RepetitionPenalty(0.2, Greedy())  # < 1: repeats favoured, visibly
    got = generate(model, PROMPT, 24, strategy, vocab_limit=LIMIT)
    seq = list(PROMPT)
    while len(seq) < 24:
        logits = model.forward(np.array([seq]))[:, -1, :LIMIT]
        seq.append(int(strategy.pick_tokens(logits, history=[np.array(seq)])[0]))
    assert got == seq
    assert got != generate(model, PROMPT, 24, Greedy(), vocab_limit=LIMIT)  # it mattered


# ---- the command line ---------------------------------------------------------------------


def test_cli_stop_eos_slide_min_p_and_repetition_penalty(model, tmp_path, capsys):
    ckpt = save_model(model, tmp_path / "model")
    base = ["generate", "--checkpoint", str(ckpt), "--prompt", "def f(x):", "--seed", "2"]

    def out(*extra: str) -> str:
        capsys.readouterr()
        assert main([*base, *extra]) == 0
        return capsys.readouterr().out

    full = out("--max-new-tokens", "20")
    new = full[len("def f(x):") : -1]
    stop = new[5:7]
    cut = "def f(x):" + new[: new.find(stop)] + "\n"
    assert out("--max-new-tokens", "20", "--stop", stop) == cut
    assert out("--max-new-tokens", "20", "--stop", stop, "--stream") == cut
    two = out("--max-new-tokens", "20", "--stop", stop, "--num-samples", "2")
    assert cut.rstrip("\n") in two
    long = out("--max-new-tokens", "60", "--slide", "--ignore-eos", "--stream")
    assert len(long.encode()) >= len("def f(x):") + 1  # past max_seq_len 32 without error
    assert out("--max-new-tokens", "60", "--slide", "--ignore-eos") == long
    assert out("--max-new-tokens", "10", "--min-p", "0.1")
    assert out("--max-new-tokens", "10", "--repetition-penalty", "1.3")
    capsys.readouterr()
    assert main([*base, "--max-new-tokens", "40"]) == 2  # no --slide: refused, one line
    assert "--slide" in capsys.readouterr().err
