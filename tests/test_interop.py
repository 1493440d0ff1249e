"""Weights PyTorch can load: export, the README's PyTorch lines, import checks.

The PyTorch part runs ``README_SNIPPET`` -- the lines the README shows, read from
README.md -- on an exported file, and compares its greedy tokens and logits with
nn-core's. Without torch installed those tests are reported SKIPPED (they fail under
NN_CORE_REQUIRE_ORACLES=1, see tests/oracles.py); the import checks need no torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from oracles import require_oracle
from readme import readme_python_block
from safetensors.numpy import load_file, save_file

from nn_core import CheckpointError, Config, MoETransformer
from nn_core.data.tokenizer import ByteTokenizer
from nn_core.inference.generate import generate
from nn_core.model.transformer import parameter_specs
from nn_core.storage.checkpoint import STATE_FILE, load_model, save_model
from nn_core.storage.weights import (
    CONFIG_KEY,
    WEIGHTS_FORMAT,
    export_weights,
    import_weights,
    load_weights,
    read_weights_metadata,
)
from nn_core.training.config import TrainConfig
from nn_core.training.trainer import Trainer

TINY = Config.tiny()
TESTS = Path(__file__).resolve().parent

# The README's lines, read from README.md: load an exported file into the reference
# module (tests/torch_reference.py) and generate greedy tokens.
README_SNIPPET = readme_python_block("### Weights for PyTorch")


def text_batches(steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Byte-token windows of some Python source: inputs, targets [2, 16]."""
    ids = ByteTokenizer().encode(Path(__file__).read_text(encoding="utf-8"))
    out = []
    for s in range(steps):
        starts = np.array([40 * s, 40 * s + 700])
        window = ids[starts[:, None] + np.arange(17)]  # [2, 17]
        out.append((window[:, :-1], window[:, 1:]))
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose ``latest`` is a training checkpoint after 6 updates."""
    cfg = TrainConfig(batch_size=2, seq_len=16, lr=3e-3, warmup_steps=1, total_steps=20)
    trainer = Trainer(MoETransformer(TINY, seed=5), cfg)
    for inputs, targets in text_batches(6):
        trainer.train_step(inputs, targets)
    out = tmp_path_factory.mktemp("run")
    trainer.save_checkpoint(out)
    return out


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_weights(run_dir, tmp_path_factory.mktemp("export") / "model.safetensors")


# ---- export ----------------------------------------------------------------------------


def test_export_writes_documented_names_config_and_format(run_dir: Path, exported: Path) -> None:
    model = load_model(run_dir)
    meta = read_weights_metadata(exported)
    assert meta["format"] == WEIGHTS_FORMAT and meta["format_version"] == "1"
    assert json.loads(meta[CONFIG_KEY]) == TINY.to_dict()
    assert meta["dtype"] == "float32"
    tensors = load_file(str(exported))
    assert sorted(tensors) == sorted(name for name, _, _ in parameter_specs(TINY))
    for name, param in model.parameters().items():
        assert tensors[name].dtype == np.float32 and tensors[name].flags.c_contiguous
        assert np.array_equal(tensors[name], param), name
    assert [p.name for p in exported.parent.iterdir()] == ["model.safetensors"]  # no temp left


def test_export_replaces_an_existing_file_and_refuses_a_directory(
    run_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(ValueError, match="not an nn-core weights file.*overwrite=True"):
        export_weights(run_dir, out)  # not ours: replaced only when asked
    assert out.read_bytes() == b"old"
    assert export_weights(run_dir, out, overwrite=True) == out
    assert set(load_file(str(out))) == set(load_model(run_dir).parameters())
    assert export_weights(run_dir, out) == out  # an nn-core weights file is replaced
    with pytest.raises(ValueError, match="is a directory"):
        export_weights(run_dir, tmp_path)


def test_export_verifies_the_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        export_weights(tmp_path / "nowhere", tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()


# ---- PyTorch loads it and decodes the same tokens --------------------------------------


def test_readme_snippet_loads_into_torch_and_matches_greedy_tokens_and_logits(
    run_dir: Path, exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = require_oracle("torch")
    monkeypatch.chdir(exported.parent)
    monkeypatch.syspath_prepend(str(TESTS))
    namespace: dict = {}
    exec(compile(README_SNIPPET, "README snippet", "exec"), namespace)  # exactly the README

    model = load_model(run_dir)
    prompt = list(b"def ")
    ours = generate(model, prompt, 24)  # Greedy by default, KV-cached
    assert namespace["tokens"] == ours
    assert len(set(ours[len(prompt) :])) > 1  # a trained model, not one repeated token

    ids = np.array([ours[:-1]], dtype=np.int64)  # [1, 23]
    with torch.no_grad():
        theirs = namespace["model"](torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(model.forward(ids), theirs, rtol=1e-4, atol=1e-4)


# ---- import ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_export_import_is_bitwise(dtype: type, tmp_path: Path) -> None:
    model = MoETransformer(TINY, seed=11, dtype=dtype)
    for i, p in enumerate(model.parameters().values()):  # non-trivial gains too
        p += np.asarray(0.01 * (i + 1), dtype)
    save_model(model, tmp_path / "src")
    file = export_weights(tmp_path / "src", tmp_path / "w.safetensors")
    out = import_weights(file, tmp_path / "imported")
    assert json.loads((out / STATE_FILE).read_text())["kind"] == "model"
    back = load_model(out)
    assert back.config == TINY and back.dtype == dtype
    assert back.flat_params.tobytes() == model.flat_params.tobytes()


def test_import_of_a_foreign_file_with_explicit_config(exported: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(exported)), str(bare))  # the tensors, no metadata at all
    with pytest.raises(CheckpointError, match="has no model config"):
        import_weights(bare, tmp_path / "a")
    out = import_weights(bare, tmp_path / "b", config=TINY)
    assert np.array_equal(load_model(out).flat_params, load_weights(exported).flat_params)
    # config under the plain key "config", as another tool might write it
    other = tmp_path / "other.safetensors"
    save_file(load_file(str(exported)), str(other), {"config": json.dumps(TINY.to_dict())})
    assert load_weights(other).config == TINY
    with pytest.raises(CheckpointError, match=r"different config \(n_layers: file 2"):
        load_weights(exported, config=TINY.replace(n_layers=3))


def rewrite(
    src: Path,
    dst: Path,
    change: Callable[[dict[str, np.ndarray]], None],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Copy a weights file with its tensors changed in place by ``change``."""
    tensors = load_file(str(src))
    change(tensors)
    save_file(tensors, str(dst), read_weights_metadata(src) if metadata is None else metadata)
    return dst


def _set(name: str, value: np.ndarray) -> Callable[[dict[str, np.ndarray]], None]:
    return lambda t: t.__setitem__(name, value)


def _nan(t: dict[str, np.ndarray]) -> None:
    t["layers.1.moe.up_proj.weight"][2, 3, 4] = np.nan


def _inf(t: dict[str, np.ndarray]) -> None:
    t["final_norm.weight"][0] = np.inf


BAD_TENSORS = {
    "wrong shape": (
        _set("layers.0.attn.k_proj.weight", np.zeros((32, 64), np.float32)),
        r"tensor layers\.0\.attn\.k_proj\.weight has shape \(32, 64\), the config needs \(16, 64\)",
    ),
    "missing tensor": (
        lambda t: t.pop("lm_head.weight"),
        r"is missing tensor\(s\) \['lm_head\.weight'\]",
    ),
    "extra tensor": (
        _set("layers.2.attn_norm.weight", np.ones(64, np.float32)),
        r"has unexpected tensor\(s\) \['layers\.2\.attn_norm\.weight'\]",
    ),
    "wrong dtype": (
        _set("embed.weight", np.zeros((1000, 64), np.float64)),
        r"tensor embed\.weight has dtype float64, expected float32",
    ),
    "wrong dtype of one": (
        _set("layers.0.ffn_norm.weight", np.ones(64, np.float16)),
        r"tensor layers\.0\.ffn_norm\.weight has dtype float16, expected float32",
    ),
    "NaN": (_nan, r"tensor layers\.1\.moe\.up_proj\.weight holds 1 non-finite value"),
    "Inf": (_inf, r"tensor final_norm\.weight holds 1 non-finite value"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_import_rejects_bad_tensors(case: str, exported: Path, tmp_path: Path) -> None:
    change, message = BAD_TENSORS[case]
    bad = rewrite(exported, tmp_path / "bad.safetensors", change)
    with pytest.raises(CheckpointError, match=message):
        import_weights(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_import_rejects_a_file_whose_dtype_is_not_float32_or_64(
    exported: Path, tmp_path: Path
) -> None:
    half = {k: v.astype(np.float16) for k, v in load_file(str(exported)).items()}
    bare = tmp_path / "half.safetensors"
    save_file(half, str(bare), {CONFIG_KEY: json.dumps(TINY.to_dict())})
    with pytest.raises(CheckpointError, match="dtype must be float32 or float64, got float16"):
        import_weights(bare, tmp_path / "out")


def test_import_rejects_bad_metadata(exported: Path, tmp_path: Path) -> None:
    meta = read_weights_metadata(exported)
    future = rewrite(
        exported, tmp_path / "v2.safetensors", lambda t: None, {**meta, "format_version": "2"}
    )
    with pytest.raises(
        CheckpointError, match=r"weights format version '2', this nn-core reads version 1"
    ):
        import_weights(future, tmp_path / "out")
    broken = rewrite(
        exported, tmp_path / "c.safetensors", lambda t: None, {**meta, CONFIG_KEY: "{"}
    )
    with pytest.raises(CheckpointError, match=r"invalid config in metadata 'nn_core_config'"):
        import_weights(broken, tmp_path / "out")
    bad_cfg = {**TINY.to_dict(), "top_k_experts": 9}
    invalid = rewrite(
        exported,
        tmp_path / "i.safetensors",
        lambda t: None,
        {**meta, CONFIG_KEY: json.dumps(bad_cfg)},
    )
    with pytest.raises(CheckpointError, match=r"invalid config in metadata.*top_k"):
        import_weights(invalid, tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "header"])
def test_import_rejects_a_corrupt_file(damage: str, exported: Path, tmp_path: Path) -> None:
    data = exported.read_bytes()
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(
        {
            "truncated": data[: len(data) - 1000],
            "garbage": b"\x89not a safetensors file at all" * 10,
            "empty": b"",
            "header": data[:8] + b"[" + data[9:],  # the JSON header no longer parses
        }[damage]
    )
    with pytest.raises(CheckpointError, match="is not a valid safetensors file"):
        import_weights(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is missing"):
        import_weights(tmp_path / "none.safetensors", tmp_path / "out")
    with pytest.raises(CheckpointError, match="is not a file"):
        import_weights(tmp_path, tmp_path / "out")
