"""Regenerate the golden file: the PyTorch reference model's outputs on a fixed batch.

    python tests/golden/make_golden.py            # needs torch; writes nothing if unchanged
    python tests/golden/make_golden.py --force    # replace golden files that differ

Everything here comes from tests/torch_reference.py (an independent torch.nn model of
the same contract, autograd for the backward) and this script's own seeded NumPy
generator -- nothing from nn-core -- so tests/test_golden.py, which needs no torch,
checks nn-core against an independent implementation.

Written (no pickle anywhere):
- moe_small.safetensors: the parameters ``param/<name>`` (float32 values, used exactly
  in float64 by both models, which halves the file), the batch ``ids`` and ``targets``
  [B, S] int64, the ``logits`` [B, S, V] float64, and gradient slices ``grad/<name>``
  float64 of the total loss L = L_ce + sum over layers of L_aux;
- moe_small.json: the config, alpha, the loss terms, the slice of every gradient
  (outer indices per dimension as in ``np.ix_``, null = the whole dimension), the
  versions that produced it and the SHA-256 of the .safetensors file.

Refuses (exit 1) to replace golden files that hold something else, unless --force.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from torch_reference import TorchMoE, load_arrays  # noqa: E402

NAME = "moe_small"
SEED = 20240615
ALPHA = 0.05  # large, so the aux loss weighs in the router's gradient
BATCH, SEQ = 2, 8
# GQA (4 query heads of 4 over 2 kv heads), NTK-scaled RoPE (alpha 2), top-2 of 4 experts
CONFIG = {
    "hidden_dim": 16,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 4,
    "n_experts": 4,
    "top_k_experts": 2,
    "ffn_dim": 32,
    "vocab_size": 64,
    "max_seq_len": 16,
    "rope_base": 10000.0,
    "rope_alpha": 2.0,
    "rms_eps": 1e-6,
}
MIN_ROUTING_GAP = 1e-6  # K-th vs (K+1)-th router probability: no near-tie in the routing


def make_parameters(model: TorchMoE, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every parameter from the generator, in the module's order, as float32 values.

    Norm gains 1 + 0.3 N(0, 1) (not all ones, so their gradients matter); the embedding
    N(0, 1); every other matrix N(0, 1) / sqrt(fan_in), the router 3x that (so routing
    is decided by clear margins).
    """
    out = {}
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if name.endswith("norm.weight"):
            values = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name == "embed.weight":
            values = rng.standard_normal(shape)
        else:
            scale = (3.0 if name.endswith("router.weight") else 1.0) / np.sqrt(shape[-1])
            values = scale * rng.standard_normal(shape)
        out[name] = values.astype(np.float32)
    return out


def grad_slices(config: dict, ids: np.ndarray, targets: np.ndarray) -> dict[str, list]:
    """Which part of each gradient to keep: outer indices per dimension, None = all."""
    h, v = config["hidden_dim"], config["vocab_size"]
    unused = sorted(set(range(v)) - set(ids.ravel().tolist()))[0]  # a row whose grad is 0
    slices: dict[str, list] = {
        "embed.weight": [[int(ids[0, 0]), int(ids[1, 5]), unused], None],
        "final_norm.weight": [None],
        "lm_head.weight": [[0, int(targets[0, 0]), v - 1], None],
    }
    for i in range(config["n_layers"]):
        p = f"layers.{i}."
        slices[p + "attn_norm.weight"] = [None]
        slices[p + "ffn_norm.weight"] = [None]
        slices[p + "attn.q_proj.weight"] = [[0, 1, 2, 3, 13], None]
        slices[p + "attn.k_proj.weight"] = [[0, 5], None]
        slices[p + "attn.v_proj.weight"] = [[1, 6], None]
        slices[p + "attn.o_proj.weight"] = [[0, h - 1], None]
        slices[p + "moe.router.weight"] = [None, None]
        slices[p + "moe.gate_proj.weight"] = [None, [0, 17], None]  # every expert
        slices[p + "moe.up_proj.weight"] = [None, [3, 31], None]
        slices[p + "moe.down_proj.weight"] = [None, [2, h - 1], None]
    return slices


def take(arr: np.ndarray, index: list) -> np.ndarray:
    """arr[np.ix_(...)] with None meaning the whole dimension."""
    full = [np.arange(n) if ix is None else np.asarray(ix) for n, ix in zip(arr.shape, index)]
    return np.ascontiguousarray(arr[np.ix_(*full)])


def routing_gaps(model: TorchMoE, ids: torch.Tensor) -> list[float]:
    """Per layer: the smallest gap between the K-th and (K+1)-th router probability."""
    logits: list[torch.Tensor] = []
    hooks = [
        layer.moe.router.register_forward_hook(lambda _m, _i, out: logits.append(out.detach()))
        for layer in model.layers
    ]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    k = CONFIG["top_k_experts"]
    gaps = []
    for z in logits:
        p = torch.sort(torch.softmax(z, dim=-1), dim=-1, descending=True).values  # [N, E]
        gaps.append(float((p[:, k - 1] - p[:, k]).min()))
    return gaps


def build() -> tuple[bytes, bytes]:
    """(safetensors bytes, JSON bytes) of the golden data."""
    rng = np.random.default_rng(SEED)
    model = TorchMoE(CONFIG, torch.float64)
    params = make_parameters(model, rng)
    load_arrays(model, params)  # float32 values -> float64 parameters, exactly
    ids = rng.integers(0, CONFIG["vocab_size"], size=(BATCH, SEQ), dtype=np.int64)
    targets = rng.integers(0, CONFIG["vocab_size"], size=(BATCH, SEQ), dtype=np.int64)
    ids_t, targets_t = torch.from_numpy(ids), torch.from_numpy(targets)

    gaps = routing_gaps(model, ids_t)
    if min(gaps) < MIN_ROUTING_GAP:
        raise SystemExit(f"make_golden: a near-tie in the routing (gaps {gaps}); change SEED")

    with torch.no_grad():
        logits = model(ids_t).numpy()  # [B, S, V]
    total, ce, aux = model.loss(ids_t, targets_t, ALPHA)
    total.backward()
    grads = {name: p.grad.numpy() for name, p in model.named_parameters()}

    slices = grad_slices(CONFIG, ids, targets)
    assert sorted(slices) == sorted(grads), "a slice for every parameter"
    tensors = {f"param/{n}": a for n, a in params.items()}
    tensors |= {"ids": ids, "targets": targets, "logits": logits}
    tensors |= {f"grad/{n}": take(grads[n], ix) for n, ix in slices.items()}
    blob = save(tensors, metadata={"json": f"{NAME}.json"})
    meta = {
        "description": "PyTorch reference (tests/torch_reference.py) outputs on a fixed batch",
        "regenerate": "python tests/golden/make_golden.py (needs torch)",
        "config": CONFIG,
        "seed": SEED,
        "aux_loss_weight": ALPHA,
        "loss": {"total": total.item(), "ce": ce.item(), "aux": aux.item()},
        "grad_slices": slices,
        "grad_slices_format": "outer indices per dimension (np.ix_); null = whole dimension",
        "routing_min_gap": gaps,
        "produced_with": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "safetensors_sha256": hashlib.sha256(blob).hexdigest(),
    }
    return blob, (json.dumps(meta, indent=1) + "\n").encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="replace golden files that differ")
    args = parser.parse_args(argv)
    blob, meta = build()
    outputs = {HERE / f"{NAME}.safetensors": blob, HERE / f"{NAME}.json": meta}
    differing = [p for p, data in outputs.items() if p.exists() and p.read_bytes() != data]
    if differing and not args.force:
        names = ", ".join(str(p) for p in differing)
        print(f"make_golden: error: {names} hold other data; --force replaces", file=sys.stderr)
        return 1
    for path, data in outputs.items():
        state = "unchanged" if path.exists() and path.read_bytes() == data else "written"
        if state == "written":
            path.write_bytes(data)
        print(f"{path} ({len(data):,} bytes): {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
