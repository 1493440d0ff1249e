"""nn-core against a golden file from the independent PyTorch reference; no torch needed.

tests/golden/make_golden.py ran tests/torch_reference.py (plain torch.nn, autograd) once
on parameters from its own seeded NumPy generator and a fixed batch, and stored the
logits, the loss terms (CE, aux with alpha = 0.05) and slices of every parameter's
gradient. Here nn-core loads the same parameters and must reproduce all of it. This is
the whole-model check that still runs when torch is absent (the parity tests in
tests/test_parity_torch.py need torch). When torch is present, the last test reruns
make_golden.py and checks that the committed file is what the reference produces.

Tolerance: relative error rel(a, b) = max|a - b| / max|b| per tensor (b golden) at most
TOL_FLOAT64 = 1e-12 in float64 (measured: below 1e-14), and TOL_FLOAT32 = 1e-5 for the
float32 model's logits and loss (measured: below 1e-6).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from oracles import require_oracle
from safetensors.numpy import load, load_file

from nn_core import Config, MoETransformer

GOLDEN = Path(__file__).resolve().parent / "golden"
TOL_FLOAT64 = 1e-12
TOL_FLOAT32 = 1e-5


def rel_err(a: np.ndarray | float, b: np.ndarray | float) -> float:
    """max|a - b| / max|b|  (b = golden)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = float(np.max(np.abs(b)))
    return float(np.max(np.abs(a - b))) / (scale if scale > 0 else 1.0)


def take(arr: np.ndarray, index: list) -> np.ndarray:
    """arr[np.ix_(...)] with None meaning the whole dimension (the golden file's format)."""
    full = [np.arange(n) if ix is None else np.asarray(ix) for n, ix in zip(arr.shape, index)]
    return arr[np.ix_(*full)]


@pytest.fixture(scope="module")
def golden() -> tuple[dict, dict[str, np.ndarray]]:
    blob = (GOLDEN / "moe_small.safetensors").read_bytes()
    meta = json.loads((GOLDEN / "moe_small.json").read_text())
    assert hashlib.sha256(blob).hexdigest() == meta["safetensors_sha256"], "files out of sync"
    return meta, load_file(str(GOLDEN / "moe_small.safetensors"))


def load_model(golden: tuple[dict, dict[str, np.ndarray]], dtype: type) -> MoETransformer:
    meta, tensors = golden
    model = MoETransformer(Config(**meta["config"]), seed=0, dtype=dtype)
    params = model.parameters()
    stored = {k.removeprefix("param/"): v for k, v in tensors.items() if k.startswith("param/")}
    assert sorted(stored) == sorted(params)
    for name, value in stored.items():
        assert value.shape == params[name].shape, name
        params[name][...] = value  # float32 values: exact in float64
    return model


def test_golden_file_is_small_and_covers_every_parameter_kind(golden) -> None:
    meta, tensors = golden
    assert (GOLDEN / "moe_small.safetensors").stat().st_size < 200 * 1024
    cfg = Config(**meta["config"])
    assert cfg.rope_alpha > 1 and cfg.n_kv_heads < cfg.n_heads  # NTK RoPE and GQA covered
    assert 1 < cfg.top_k_experts < cfg.n_experts
    assert set(meta["grad_slices"]) == set(MoETransformer(cfg, seed=0).parameters())
    for name, index in meta["grad_slices"].items():
        grad = tensors[f"grad/{name}"]
        assert grad.dtype == np.float64 and np.abs(grad).max() > 0, name
        if ".moe." in name and "router" not in name:
            assert index[0] is None, name  # every expert's gate/up/down
    assert tensors["logits"].dtype == np.float64


def test_float64_logits_loss_and_gradients_match_the_pytorch_golden(golden) -> None:
    meta, tensors = golden
    model = load_model(golden, np.float64)
    ids, targets = tensors["ids"], tensors["targets"]
    errors = {"logits": rel_err(model.forward(ids), tensors["logits"])}
    terms = model.loss_terms_and_grad(ids, targets, meta["aux_loss_weight"])
    for key in ("total", "ce", "aux"):
        errors[f"loss.{key}"] = rel_err(getattr(terms, key), meta["loss"][key])
    grads = model.gradients()
    for name, index in meta["grad_slices"].items():
        errors[f"grad.{name}"] = rel_err(take(grads[name], index), tensors[f"grad/{name}"])
    worst = max(errors, key=errors.__getitem__)
    print(f"\ngolden float64: worst relative error {errors[worst]:.2e} ({worst})")
    bad = {k: v for k, v in errors.items() if not v <= TOL_FLOAT64}
    assert not bad, bad


def test_float32_logits_and_loss_match_the_pytorch_golden(golden) -> None:
    meta, tensors = golden
    model = load_model(golden, np.float32)
    ids, targets = tensors["ids"], tensors["targets"]
    errors = {"logits": rel_err(model.forward(ids), tensors["logits"])}
    terms = model.loss_terms(ids, targets, meta["aux_loss_weight"])
    for key in ("total", "ce", "aux"):
        errors[f"loss.{key}"] = rel_err(getattr(terms, key), meta["loss"][key])
    print(f"\ngolden float32: worst relative error {max(errors.values()):.2e}")
    bad = {k: v for k, v in errors.items() if not v <= TOL_FLOAT32}
    assert not bad, bad


def test_the_golden_file_is_what_the_pytorch_reference_produces(golden) -> None:
    """Rerun tests/golden/make_golden.py in memory (needs torch): same inputs and
    parameters bit for bit, same outputs to float64 rounding (another machine's torch
    may round differently, so not byte for byte)."""
    require_oracle("torch")
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    assert spec is not None and spec.loader is not None
    make_golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_golden)
    blob, meta_bytes = make_golden.build()
    meta, tensors = golden
    fresh, fresh_meta = load(blob), json.loads(meta_bytes)
    assert sorted(fresh) == sorted(tensors)
    assert fresh_meta["config"] == meta["config"] and fresh_meta["seed"] == meta["seed"]
    assert fresh_meta["grad_slices"] == meta["grad_slices"]
    for name, value in tensors.items():
        if name.startswith("param/") or name in ("ids", "targets"):
            assert np.array_equal(fresh[name], value), name
        else:
            assert rel_err(fresh[name], value) <= 1e-13, name
    for key, value in meta["loss"].items():
        assert rel_err(fresh_meta["loss"][key], value) <= 1e-13, key
