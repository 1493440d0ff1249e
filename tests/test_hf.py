"""Hugging Face interop, checked against transformers itself (offline, tiny random models).

- a random MixtralForCausalLM -> save_pretrained -> ``nn-core import``: logits equal in
  float32 (relative 2e-6) and float64 (1e-12, with transformers' float32 casts lifted),
  router probabilities equal; sharded files, the stacked expert layout, a tied head;
- an nn-core model trained a few steps -> ``nn-core export --format hf``: transformers'
  logits and greedy generate() equal nn-core's, AutoTokenizer encodes as nn-core does;
- the aux loss in transformers' convention (``load_balancing_loss_func``) vs ours;
- refusals, one line each, naming the field nn-core does not implement.

transformers and torch are oracles (tests/oracles.py): with NN_CORE_REQUIRE_ORACLES=1 a
missing one fails the run instead of skipping.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from oracles import require_oracle

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = require_oracle("torch")
transformers = require_oracle("transformers")

from nn_core.app.cli import main  # noqa: E402
from nn_core.data.tokenizer import tokenizer_files, train_bpe  # noqa: E402
from nn_core.inference.generate import generate  # noqa: E402
from nn_core.inference.sampling import Greedy  # noqa: E402
from nn_core.model.config import Config  # noqa: E402
from nn_core.model.moe import expert_fractions  # noqa: E402
from nn_core.model.transformer import MoETransformer  # noqa: E402
from nn_core.storage.checkpoint import load_model, save_model  # noqa: E402
from nn_core.storage.hf import hf_aux_loss, hf_aux_loss_coef, rope_permutation  # noqa: E402
from nn_core.training.config import TrainConfig  # noqa: E402
from nn_core.training.trainer import Trainer  # noqa: E402

mixtral = transformers.models.mixtral.modeling_mixtral
F32_TOL = 2e-6  # relative (to the largest |logit|): float32 rounding of two summation orders
F64_TOL = 1e-12

# nH = 4, nKV = 2: both the RoPE permutation and the query-head order are exercised
HF_FIELDS = dict(
    vocab_size=61,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
)


def run_cli(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def hf_model(seed: int = 0, **changes: object) -> object:
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(**{**HF_FIELDS, **changes})
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # norms are initialised to 1: make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def ids_batch(vocab: int, shape: tuple[int, int] = (2, 12)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, shape)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "tiny"
    hf_model().save_pretrained(out)
    return out


@pytest.fixture
def float64_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers computes RMSNorm, the router softmax and the RoPE angles in float32
    even for a float64 model; lift those casts (same formulas, input dtype) so float64
    compares to 1e-12 and shows the mapping exact, not approximately right."""

    def rmsnorm(self, x):
        return self.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    def router(self, x):
        logits = torch.nn.functional.linear(x.reshape(-1, self.hidden_dim), self.weight)
        top, idx = torch.topk(torch.softmax(logits, -1), self.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx

    def rope(self, x, position_ids):
        d = 2 * self.inv_freq.numel()
        theta = self.config.rope_parameters["rope_theta"]
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), -1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    monkeypatch.setattr(mixtral.MixtralRMSNorm, "forward", rmsnorm)
    monkeypatch.setattr(mixtral.MixtralTopKRouter, "forward", router)
    monkeypatch.setattr(mixtral.MixtralRotaryEmbedding, "forward", rope)


# ---- import ----------------------------------------------------------------------------


def test_import_float32_logits_equal_transformers(hf_dir, tmp_path, capsys):
    code, out, err = run_cli(["import", hf_dir, "--out", tmp_path / "m"], capsys)
    assert code == 0, err
    model = load_model(tmp_path / "m")
    assert model.dtype == np.float32
    assert model.config.rope_theta == 500.0 and model.config.n_kv_heads == 2
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = ids_batch(61)
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    assert rel_err(model.forward(ids), ref) < F32_TOL


def test_import_float64_logits_and_router_equal_transformers(
    hf_dir, tmp_path, capsys, float64_transformers
):
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float64, experts_implementation="eager"
    ).eval()
    ref_model.save_pretrained(tmp_path / "hf64")
    assert run_cli(["import", tmp_path / "hf64", "--out", tmp_path / "m"], capsys)[0] == 0
    model = load_model(tmp_path / "m")
    assert model.dtype == np.float64
    ids = ids_batch(61)
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids), output_router_logits=True)
    assert rel_err(model.forward(ids), ref.logits.numpy()) < F64_TOL
    state = model.forward_loss(ids, ids, aux_loss_weight=1.0)
    for layer, logits in enumerate(ref.router_logits):
        probs = torch.softmax(logits, -1).numpy()  # [N, E], tokens in the same order
        np.testing.assert_allclose(state.routing[layer].probs, probs, rtol=0, atol=F64_TOL)


def test_import_reads_shards_the_stacked_layout_and_a_tied_head(tmp_path):
    from safetensors.torch import save_file

    from nn_core.storage.hf import import_hf

    ids = ids_batch(61)
    # shards with an index
    sharded = hf_model(seed=1)
    sharded.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    # transformers' in-memory names (mlp.experts.gate_up_proj [E, 2F, H]) in one file
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    (stacked / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    save_file(
        {k: v.contiguous() for k, v in sharded.state_dict().items()}, stacked / "model.safetensors"
    )
    assert any("gate_up_proj" in k for k in sharded.state_dict())
    tied = hf_model(seed=2, tie_word_embeddings=True)
    tied.save_pretrained(tmp_path / "tied")
    for name, ref_model in (("sharded", sharded), ("stacked", sharded), ("tied", tied)):
        src = stacked if name == "stacked" else tmp_path / name
        out, _ = import_hf(src, tmp_path / f"{name}-nn")
        with torch.no_grad():
            ref = ref_model(torch.tensor(ids)).logits.numpy()
        assert rel_err(load_model(out).forward(ids), ref) < F32_TOL, name


REFUSALS = [
    ({"sliding_window": 8}, "sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "llama"}, "model_type"),
    ({"architectures": ["MixtralForSequenceClassification"]}, "architectures"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}}, "rope_type"),
    ({"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
    ({"head_dim": 7, "num_attention_heads": 2}, "head_dim"),
]


@pytest.mark.parametrize(("change", "field"), REFUSALS, ids=[f for _, f in REFUSALS])
def test_import_refuses_what_nn_core_does_not_implement(hf_dir, tmp_path, capsys, change, field):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **change}))
    code, out, err = run_cli(["import", bad, "--out", tmp_path / "m"], capsys)
    assert code != 0 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and field in lines[0], err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("kind", ["bias", "missing", "extra"])
def test_import_refuses_biases_missing_and_unknown_tensors(hf_dir, tmp_path, capsys, kind):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(hf_dir / "model.safetensors")
    if kind == "bias":
        tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    elif kind == "missing":
        del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    else:
        tensors["model.layers.0.self_attn.rotary.weight"] = np.zeros(4, np.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    code, out, err = run_cli(["import", bad, "--out", tmp_path / "m"], capsys)
    want = {"bias": "q_proj.bias", "missing": "experts.3.w2.weight", "extra": "rotary"}[kind]
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and want in lines[0], err


# ---- export ----------------------------------------------------------------------------

SMALL = Config(
    hidden_dim=16,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    n_experts=4,
    top_k_experts=2,
    ffn_dim=24,
    vocab_size=300,
    max_seq_len=64,
    rope_alpha=2.0,  # static NTK scaling: exported folded into rope_theta
)
TEXT = "".join(f"def f{i}(a, b):\n    return a + b * {i % 7}  # é\n" for i in range(60))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A model directory: SMALL trained 5 steps on BPE tokens, with its tokenizer."""
    tok = train_bpe([TEXT], SMALL.vocab_size)
    ids = tok.encode(TEXT)
    trainer = Trainer(
        MoETransformer(SMALL, seed=3),
        TrainConfig(batch_size=2, seq_len=16, lr=1e-2, warmup_steps=1, total_steps=5),
    )
    rng = np.random.default_rng(0)
    for _ in range(5):
        starts = rng.integers(0, ids.size - 17, 2)
        window = ids[starts[:, None] + np.arange(17)]
        trainer.train_step(window[:, :-1], window[:, 1:])
    out = tmp_path_factory.mktemp("trained") / "model"
    save_model(trainer.model, out)
    for name, text in tokenizer_files(tok).items():
        (out / name).write_text(text, encoding="utf-8")
    return out, tok


def test_export_loads_in_transformers_with_equal_logits_and_greedy_tokens(
    trained, tmp_path, capsys
):
    ckpt, tok = trained
    hf = tmp_path / "hf"
    code, out, err = run_cli(
        ["export", "--format", "hf", "--checkpoint", ckpt, "--out", hf], capsys
    )
    assert code == 0, err
    assert {p.name for p in hf.iterdir()} == {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["rope_parameters"]["rope_theta"] == SMALL.rope_theta != SMALL.rope_base
    model = load_model(ckpt)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    prompt_text = "def f3(a, b):\n    return"
    prompt = tok.encode(prompt_text)
    assert hf_tok(prompt_text)["input_ids"] == prompt.tolist()
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.bos_id, tok.eos_id) == (0, 1)
    ids = tok.encode(TEXT[:200])[None, :40]
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    assert rel_err(model.forward(ids), ref) < F32_TOL
    n_new = 20
    with torch.no_grad():
        hf_ids = ref_model.generate(
            torch.tensor(prompt[None]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False
        )[0].numpy()
    ours = np.asarray(generate(model, prompt, prompt.size + n_new, Greedy()))
    assert hf_ids.tolist() == ours.tolist()
    assert hf_tok.decode(hf_ids, skip_special_tokens=True) == tok.decode(ours)


def test_export_then_import_gives_back_the_same_weights(trained, tmp_path, capsys):
    ckpt, tok = trained
    assert (
        run_cli(
            ["export", "--format", "hf", "--checkpoint", ckpt, "--out", tmp_path / "hf"], capsys
        )[0]
        == 0
    )
    code, out, err = run_cli(["import", tmp_path / "hf", "--out", tmp_path / "back"], capsys)
    assert code == 0, err
    a, b = load_model(ckpt).parameters(), load_model(tmp_path / "back").parameters()
    for name in a:  # rope_alpha is folded into rope_base; the weights are bit-identical
        assert np.array_equal(a[name], b[name]), name
    assert load_model(tmp_path / "back").config.rope_theta == pytest.approx(SMALL.rope_theta)
    assert (tmp_path / "back" / "tokenizer.json").read_text() == (
        ckpt / "tokenizer.json"
    ).read_text()


def test_export_replaces_its_own_export_and_refuses_other_directories(trained, tmp_path, capsys):
    ckpt, _ = trained
    hf = tmp_path / "hf"
    args = ["export", "--format", "hf", "--checkpoint", ckpt, "--out", hf]
    assert run_cli(args, capsys)[0] == 0
    assert run_cli(args, capsys)[0] == 0  # an earlier export is replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for force in ([], ["--force"]):
        code, out, err = run_cli([*args[:-1], foreign, *force], capsys)
        assert code != 0 and len(err.strip().splitlines()) == 1, err
        assert (foreign / "notes.txt").read_text() == "mine"


def test_the_byte_tokenizer_exports_as_a_tokenizer_transformers_reads(tmp_path, capsys):
    cfg = SMALL.replace(vocab_size=258, rope_alpha=1.0)
    save_model(MoETransformer(cfg, seed=0), tmp_path / "m")  # no tokenizer.json: bytes
    assert (
        run_cli(
            ["export", "--format", "hf", "--checkpoint", tmp_path / "m", "--out", tmp_path / "hf"],
            capsys,
        )[0]
        == 0
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "héllo\n\tworld 😀"
    assert hf_tok(text)["input_ids"] == list(text.encode("utf-8"))
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (256, 257)


# ---- the aux loss ----------------------------------------------------------------------


def test_aux_loss_conversion_to_transformers_load_balancing_loss(hf_dir, tmp_path):
    from nn_core.storage.hf import import_hf

    out, _ = import_hf(hf_dir, tmp_path / "m", dtype=np.float64)
    model = load_model(out)
    k, e = model.config.top_k_experts, model.config.n_experts
    ids = ids_batch(61, (3, 16))
    state = model.forward_loss(ids, ids, aux_loss_weight=1.0)
    ours = []  # per layer, alpha = 1: E sum_e f_e P_e
    for routing in state.routing:
        ours.append(
            state.alpha * e * float(np.dot(expert_fractions(routing), routing.probs.mean(0)))
        )
    gate_logits = tuple(torch.log(torch.tensor(r.probs)) for r in state.routing)  # softmax^-1
    for layer, logits in enumerate(gate_logits):  # one layer: theirs = K * ours
        theirs = float(mixtral.load_balancing_loss_func((logits,), e, k))
        assert theirs == pytest.approx(k * ours[layer], rel=1e-6)
    theirs_all = float(mixtral.load_balancing_loss_func(gate_logits, e, k))
    fractions = np.stack([expert_fractions(r) for r in state.routing])  # [L, E]
    means = np.stack([r.probs.mean(0) for r in state.routing])  # [L, E]
    assert theirs_all == pytest.approx(hf_aux_loss(fractions, means, k), rel=1e-6)
    assert state.terms.aux == pytest.approx(sum(ours), rel=1e-12)  # ours sums the layers
    # the exported coefficient: alpha L / K (exact when every layer routes alike)
    cfg = model.config
    assert hf_aux_loss_coef(0.01, cfg) * k / cfg.n_layers == pytest.approx(0.01)


def test_rope_permutation_pairs_rotate_half_with_adjacent_pairs():
    perm = rope_permutation(8)
    assert perm.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    # transformers' pair (k, k + D/2) is nn-core's (2k, 2k + 1)
    for k in range(4):
        assert (perm[k], perm[k + 4]) == (2 * k, 2 * k + 1)
