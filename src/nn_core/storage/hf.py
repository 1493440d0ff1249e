"""Hugging Face interop: nn-core checkpoints <-> Mixtral-format directories.

    export_hf(checkpoint, out_dir)   checkpoint / model / run dir -> a directory that
                                     transformers' AutoModelForCausalLM and AutoTokenizer
                                     load (config.json, model.safetensors,
                                     generation_config.json, tokenizer.json,
                                     tokenizer_config.json)
    import_hf(hf_dir, out_dir)       a Mixtral directory (config.json, model.safetensors or
                                     shards + model.safetensors.index.json, a tokenizer if
                                     present) -> an nn-core model directory

nn-core's model is Mixtral's architecture (RMSNorm, grouped-query attention with RoPE,
softmax router with renormalized top-k, SwiGLU experts, untied head); the conversion is
a renaming plus two fixed permutations (legend: nH heads, nKV kv heads, A = nH/nKV, D
head_dim, H hidden, E experts, F ffn, V vocab, L layers):

- RoPE layout. nn-core rotates adjacent pairs (x[2k], x[2k+1]) by angle t f_k;
  transformers rotates halves (x[k], x[k + D/2]) (``rotate_half``). Within each head,
  transformers' row r is nn-core's row ``ROPE_PERM[r]``, ROPE_PERM = [0, 2, ..., D-2, 1,
  3, ..., D-1], for q_proj and k_proj; q.k is a sum over rows, so it is unchanged.
- Query-head order. nn-core groups query heads as h = a*nKV + j (query head h reads kv
  head h mod nKV); transformers as h = j*A + a (``repeat_kv``: head h reads kv head
  h div A). q_proj rows and o_proj columns are moved by head (identity when nKV = 1 or
  nKV = nH).
- Experts. On disk transformers (``save_pretrained``) writes Mixtral's per-expert
  layout ``block_sparse_moe.experts.{e}.w1/w2/w3`` (gate [F, H], down [H, F], up [F, H]);
  in memory it stacks them (``mlp.experts.gate_up_proj`` [E, 2F, H], gate = first F
  rows; ``mlp.experts.down_proj`` [E, H, F]). Export writes the on-disk layout; import
  reads either.
- Static NTK scaling is a different RoPE base: exported as rope_theta =
  ``Config.rope_theta`` (rope_alpha folded in), imported with rope_alpha = 1.

Import refuses, in one line naming the field, what nn-core does not compute: another
architecture, an active sliding window, biases, a RoPE scaling type, dropout or router
jitter, a quantized model, an activation other than SiLU, unknown or missing tensors.
A tied head (tie_word_embeddings) is imported as an untied copy of the embedding.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.tokenizer import (
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_files,
)
from ..errors import CheckpointError, ConfigError, OutputError
from ..model.config import Config
from .checkpoint import (
    _chmod_default,
    atomic_write_file,
    load_model,
    save_model,
    write_safetensors,
)

if TYPE_CHECKING:
    from ..model.transformer import MoETransformer

PathLike = str | os.PathLike[str]

HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
HF_GENERATION_FILE = "generation_config.json"
HF_EXPORT_FILES = frozenset(
    {HF_CONFIG_FILE, HF_WEIGHTS_FILE, HF_GENERATION_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE}
)
PRODUCER = "nn-core"  # model.safetensors metadata "producer" of an export (ownership)
ARCHITECTURE = "MixtralForCausalLM"
DEFAULT_AUX_LOSS_WEIGHT = 0.01  # TrainConfig's default alpha, when no run says otherwise

# transformers' defaults for fields a config.json may leave out (MixtralConfig, 5.23)
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096 * 32,
    "rms_norm_eps": 1e-5,
    "num_experts_per_tok": 2,
    "num_local_experts": 8,
    "rope_theta": 1e6,
}
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}

__all__ = [
    "ARCHITECTURE",
    "export_hf",
    "hf_aux_loss",
    "hf_config",
    "hf_tensors",
    "import_hf",
    "is_hf_export",
    "load_hf",
    "nn_core_config",
    "rope_permutation",
]


# ---- the two permutations --------------------------------------------------------------


def rope_permutation(head_dim: int) -> np.ndarray:
    """ROPE_PERM [D]: transformers' row r of a q/k head is nn-core's row ROPE_PERM[r]
    (rotate_half's pair (k, k + D/2) is nn-core's adjacent pair (2k, 2k + 1))."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def head_order(n_heads: int, n_kv_heads: int) -> np.ndarray:
    """[nH]: transformers' query head h_hf = j*A + a is nn-core's head a*nKV + j."""
    a = n_heads // n_kv_heads
    h_hf = np.arange(n_heads)
    return (h_hf % a) * n_kv_heads + h_hf // a


def _q_to_hf(w: np.ndarray, cfg: Config) -> np.ndarray:
    """nn-core q_proj [Q, H] -> transformers' (heads reordered, rows in rotate_half order)."""
    d, h = cfg.head_dim, cfg.hidden_dim
    w3 = w.reshape(cfg.n_heads, d, h)[head_order(cfg.n_heads, cfg.n_kv_heads)]  # [nH, D, H]
    return w3[:, rope_permutation(d)].reshape(cfg.q_dim, h)


def _q_from_hf(w: np.ndarray, cfg: Config) -> np.ndarray:
    d, h = cfg.head_dim, cfg.hidden_dim
    out = np.empty((cfg.n_heads, d, h), w.dtype)
    out[:, rope_permutation(d)] = w.reshape(cfg.n_heads, d, h)
    heads = np.empty_like(out)
    heads[head_order(cfg.n_heads, cfg.n_kv_heads)] = out
    return heads.reshape(cfg.q_dim, h)


def _k_to_hf(w: np.ndarray, cfg: Config) -> np.ndarray:
    """nn-core k_proj [KV, H] -> transformers' (rows in rotate_half order per kv head)."""
    d, h = cfg.head_dim, cfg.hidden_dim
    return w.reshape(cfg.n_kv_heads, d, h)[:, rope_permutation(d)].reshape(cfg.kv_dim, h)


def _k_from_hf(w: np.ndarray, cfg: Config) -> np.ndarray:
    d, h = cfg.head_dim, cfg.hidden_dim
    out = np.empty((cfg.n_kv_heads, d, h), w.dtype)
    out[:, rope_permutation(d)] = w.reshape(cfg.n_kv_heads, d, h)
    return out.reshape(cfg.kv_dim, h)


def _o_to_hf(w: np.ndarray, cfg: Config) -> np.ndarray:
    """nn-core o_proj [H, Q] -> transformers' (column blocks moved by query head)."""
    h, d = cfg.hidden_dim, cfg.head_dim
    order = head_order(cfg.n_heads, cfg.n_kv_heads)
    return w.reshape(h, cfg.n_heads, d)[:, order].reshape(h, cfg.q_dim)


def _o_from_hf(w: np.ndarray, cfg: Config) -> np.ndarray:
    h, d = cfg.hidden_dim, cfg.head_dim
    out = np.empty((h, cfg.n_heads, d), w.dtype)
    out[:, head_order(cfg.n_heads, cfg.n_kv_heads)] = w.reshape(h, cfg.n_heads, d)
    return out.reshape(h, cfg.q_dim)


# ---- configs ---------------------------------------------------------------------------


def hf_aux_loss_coef(aux_loss_weight: float, cfg: Config) -> float:
    """router_aux_loss_coef for a run trained with alpha = ``aux_loss_weight``.

    Ours: alpha * sum_l E sum_e f_le P_le, f = fraction of (token, slot) assignments.
    transformers' ``load_balancing_loss_func``: E sum_e T_e R_e with T_e = K * mean_l
    f_le and R_e = mean_l P_le, times router_aux_loss_coef. For one layer ours/alpha =
    theirs/K; over L layers routing alike, ours/alpha = L * theirs/K. So coef = alpha L/K
    (exact for L = 1; across layers the two differ in the mean of products vs the
    product of means, see ``hf_aux_loss``)."""
    return float(aux_loss_weight * cfg.n_layers / cfg.top_k_experts)


def hf_config(
    cfg: Config,
    tokenizer: Tokenizer,
    *,
    dtype: str = "float32",
    aux_loss_weight: float = DEFAULT_AUX_LOSS_WEIGHT,
) -> dict[str, Any]:
    """config.json of a Mixtral model with nn-core's ``cfg`` (MixtralConfig fields)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k_experts,
        "router_aux_loss_coef": hf_aux_loss_coef(aux_loss_weight, cfg),
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": None,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype,
    }


def _refuse(where: Path, field: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: {field} = {value!r}: {why}; nn-core cannot import it")


def nn_core_config(hf: dict[str, Any], where: Path) -> tuple[Config, bool]:
    """(nn-core Config, tied head?) of a Mixtral config.json; CheckpointError in one line
    naming the first field nn-core does not implement."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{where} must hold a JSON object")
    model_type = hf.get("model_type", "mixtral")
    if model_type != "mixtral":
        raise _refuse(where, "model_type", model_type, "only Mixtral's architecture is known")
    arch = hf.get("architectures", [ARCHITECTURE])
    if arch != [ARCHITECTURE]:
        raise _refuse(where, "architectures", arch, f"only [{ARCHITECTURE!r}] is known")
    fields: dict[str, Any] = {**_HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}

    def get(key: str, default: Any = None) -> Any:
        return fields.get(key, default)

    checks: list[tuple[str, Any, Callable[[Any], bool], str]] = [
        ("hidden_act", get("hidden_act", "silu"), lambda v: v == "silu", "experts are SwiGLU"),
        ("attention_bias", get("attention_bias", False), lambda v: not v, "no biases"),
        ("mlp_bias", get("mlp_bias", False), lambda v: not v, "no biases"),
        ("attention_dropout", get("attention_dropout", 0.0), lambda v: v == 0, "no dropout"),
        ("router_jitter_noise", get("router_jitter_noise", 0.0), lambda v: v == 0, "no jitter"),
        ("quantization_config", hf.get("quantization_config"), lambda v: v is None, "float only"),
        ("rope_scaling", hf.get("rope_scaling"), lambda v: v is None, "plain RoPE only"),
    ]
    for field, value, ok, why in checks:
        if not ok(value):
            raise _refuse(where, field, value, why)
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise _refuse(where, "rope_parameters", rope, "must be an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise _refuse(where, "rope_parameters.rope_type", rope_type, "plain RoPE only")
    try:
        max_len = int(get("max_position_embeddings"))
        window = hf.get("sliding_window")
        if window is not None and int(window) < max_len:
            raise _refuse(
                where, "sliding_window", window, f"attention is full-length ({max_len} positions)"
            )
        n_heads = int(get("num_attention_heads"))
        n_kv = (
            n_heads if "num_key_value_heads" in hf and hf["num_key_value_heads"] is None else None
        )
        cfg = Config(
            hidden_dim=get("hidden_size"),
            n_layers=get("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv or get("num_key_value_heads"),
            head_dim=hf.get("head_dim") or int(get("hidden_size")) // n_heads,
            n_experts=get("num_local_experts"),
            top_k_experts=get("num_experts_per_tok"),
            ffn_dim=get("intermediate_size"),
            vocab_size=get("vocab_size"),
            max_seq_len=max_len,
            rope_base=float(rope.get("rope_theta", get("rope_theta"))),
            rope_alpha=1.0,
            rms_eps=float(get("rms_norm_eps")),
        )
    except CheckpointError:
        raise
    except (ConfigError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return cfg, bool(hf.get("tie_word_embeddings", False))


# ---- tensors ---------------------------------------------------------------------------


def hf_tensors(model: MoETransformer) -> dict[str, np.ndarray]:
    """The model's parameters under transformers' on-disk Mixtral names and layouts."""
    cfg, p = model.config, model.parameters()
    out = {
        "model.embed_tokens.weight": p["embed.weight"],
        "model.norm.weight": p["final_norm.weight"],
        "lm_head.weight": p["lm_head.weight"],
    }
    for i in range(cfg.n_layers):
        a, b = f"layers.{i}.", f"model.layers.{i}."
        moe = b + "block_sparse_moe."
        out[b + "input_layernorm.weight"] = p[a + "attn_norm.weight"]
        out[b + "post_attention_layernorm.weight"] = p[a + "ffn_norm.weight"]
        out[b + "self_attn.q_proj.weight"] = _q_to_hf(p[a + "attn.q_proj.weight"], cfg)
        out[b + "self_attn.k_proj.weight"] = _k_to_hf(p[a + "attn.k_proj.weight"], cfg)
        out[b + "self_attn.v_proj.weight"] = p[a + "attn.v_proj.weight"]
        out[b + "self_attn.o_proj.weight"] = _o_to_hf(p[a + "attn.o_proj.weight"], cfg)
        out[moe + "gate.weight"] = p[a + "moe.router.weight"]
        for e in range(cfg.n_experts):
            out[moe + f"experts.{e}.w1.weight"] = p[a + "moe.gate_proj.weight"][e]  # [F, H]
            out[moe + f"experts.{e}.w2.weight"] = p[a + "moe.down_proj.weight"][e]  # [H, F]
            out[moe + f"experts.{e}.w3.weight"] = p[a + "moe.up_proj.weight"][e]  # [F, H]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


class _Tensors:
    """The tensors of a directory's safetensors files, read on demand (F64, F32, F16, BF16
    -> NumPy); ``take`` hands each out once, so what is left over is unexpected."""

    def __init__(self, hf_dir: Path) -> None:
        self.dir = hf_dir
        self.where: dict[str, tuple[Path, dict[str, Any], int]] = {}
        index = hf_dir / HF_INDEX_FILE
        if index.is_file():
            try:
                files = sorted(
                    set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
                )
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index} is not a safetensors index: {exc!r}") from None
        elif (hf_dir / HF_WEIGHTS_FILE).is_file():
            files = [HF_WEIGHTS_FILE]
        else:
            raise CheckpointError(
                f"{hf_dir} holds neither {HF_WEIGHTS_FILE} nor {HF_INDEX_FILE} "
                "(only safetensors weights are read; no pickle)"
            )
        for name in files:
            self._scan(hf_dir / name)
        self.dtypes = {info["dtype"] for _, info, _ in self.where.values()}

    def _scan(self, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size).decode("utf-8"))
        except (OSError, ValueError, struct.error, RecursionError) as exc:
            raise CheckpointError(f"{path} is not a valid safetensors file: {exc!r}") from None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in self.where:
                raise CheckpointError(f"{path}: tensor {name} is also in another shard")
            if info.get("dtype") not in (*_ST_DTYPES, "BF16"):
                raise CheckpointError(
                    f"{path}: tensor {name} has dtype {info.get('dtype')}; "
                    "float (F64, F32, F16, BF16) only"
                )
            self.where[name] = (path, info, 8 + size)

    def names(self) -> set[str]:
        return set(self.where)

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor ``name`` as a float64 array of ``shape`` (checked; finite)."""
        if name not in self.where:
            raise CheckpointError(f"{self.dir}: tensor {name} is missing")
        path, info, base = self.where.pop(name)
        if tuple(info["shape"]) != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(info['shape'])}, expected {shape}"
            )
        start, end = info["data_offsets"]
        code = info["dtype"]
        raw = np.memmap(path, np.uint8, "r", offset=base + start, shape=(end - start,))
        if code == "BF16":  # bfloat16 = the top 16 bits of a float32
            arr = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.view(np.dtype(_ST_DTYPES[code]).newbyteorder("<"))
        if arr.size != int(np.prod(shape)):
            raise CheckpointError(f"{path}: tensor {name} has the wrong number of bytes")
        out = arr.astype(np.float64).reshape(shape)
        if not np.isfinite(out).all():
            raise CheckpointError(f"{path}: tensor {name} holds non-finite values")
        return out


def _set_from_hf(model: MoETransformer, t: _Tensors, tied: bool) -> None:
    """Fill ``model``'s parameters from transformers' tensors (either expert layout)."""
    cfg, p = model.config, model.parameters()
    h, e, f, v = cfg.hidden_dim, cfg.n_experts, cfg.ffn_dim, cfg.vocab_size
    biases = sorted(n for n in t.names() if n.endswith(".bias"))
    if biases:
        raise CheckpointError(f"{t.dir}: tensor {biases[0]} is a bias; nn-core has no biases")
    p["embed.weight"][...] = t.take("model.embed_tokens.weight", (v, h))
    p["final_norm.weight"][...] = t.take("model.norm.weight", (h,))
    if tied:
        p["lm_head.weight"][...] = p["embed.weight"]
        if "lm_head.weight" in t.names():
            t.take("lm_head.weight", (v, h))  # the tied copy transformers may also store
    else:
        p["lm_head.weight"][...] = t.take("lm_head.weight", (v, h))
    for i in range(cfg.n_layers):
        a, b = f"layers.{i}.", f"model.layers.{i}."
        p[a + "attn_norm.weight"][...] = t.take(b + "input_layernorm.weight", (h,))
        p[a + "ffn_norm.weight"][...] = t.take(b + "post_attention_layernorm.weight", (h,))
        sa = b + "self_attn."
        p[a + "attn.q_proj.weight"][...] = _q_from_hf(
            t.take(sa + "q_proj.weight", (cfg.q_dim, h)), cfg
        )
        p[a + "attn.k_proj.weight"][...] = _k_from_hf(
            t.take(sa + "k_proj.weight", (cfg.kv_dim, h)), cfg
        )
        p[a + "attn.v_proj.weight"][...] = t.take(sa + "v_proj.weight", (cfg.kv_dim, h))
        p[a + "attn.o_proj.weight"][...] = _o_from_hf(
            t.take(sa + "o_proj.weight", (h, cfg.q_dim)), cfg
        )
        gate, up, down = (p[a + f"moe.{n}_proj.weight"] for n in ("gate", "up", "down"))
        if b + "mlp.experts.gate_up_proj" in t.names():  # transformers' in-memory layout
            p[a + "moe.router.weight"][...] = t.take(b + "mlp.gate.weight", (e, h))
            gate_up = t.take(b + "mlp.experts.gate_up_proj", (e, 2 * f, h))  # [E, 2F, H]
            gate[...], up[...] = gate_up[:, :f], gate_up[:, f:]
            down[...] = t.take(b + "mlp.experts.down_proj", (e, h, f))
        else:  # the on-disk Mixtral layout, one tensor per expert
            moe = b + "block_sparse_moe."
            p[a + "moe.router.weight"][...] = t.take(moe + "gate.weight", (e, h))
            for x in range(e):
                gate[x] = t.take(moe + f"experts.{x}.w1.weight", (f, h))
                down[x] = t.take(moe + f"experts.{x}.w2.weight", (h, f))
                up[x] = t.take(moe + f"experts.{x}.w3.weight", (f, h))
    left = sorted(t.names())
    if left:
        more = f" and {len(left) - 1} more" if len(left) > 1 else ""
        raise CheckpointError(f"{t.dir}: unexpected tensor {left[0]}{more}")


# ---- import ----------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc!r}") from None


def load_hf(hf_dir: PathLike, *, dtype: object = None) -> tuple[MoETransformer, Tokenizer | None]:
    """(nn-core model, tokenizer or None) of a Mixtral directory, verified.

    ``dtype``: the model's (float32 / float64); default float64 if every tensor is F64,
    else float32."""
    from ..model.transformer import MoETransformer

    d = Path(hf_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory (a Hugging Face model is a directory)")
    cfg, tied = nn_core_config(_read_json(d / HF_CONFIG_FILE), d / HF_CONFIG_FILE)
    tensors = _Tensors(d)
    if dtype is None:
        dtype = np.float64 if tensors.dtypes == {"F64"} else np.float32
    model = MoETransformer(cfg, seed=0, dtype=dtype)
    _set_from_hf(model, tensors, tied)
    tokenizer: Tokenizer | None = None
    if (d / TOKENIZER_FILE).is_file():
        tokenizer = load_tokenizer(d / TOKENIZER_FILE)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise CheckpointError(
                f"{d / TOKENIZER_FILE}: {tokenizer.vocab_size} tokens, more than the model's "
                f"vocab_size {cfg.vocab_size}"
            )
    return model, tokenizer


def import_hf(
    hf_dir: PathLike, out_dir: PathLike, *, overwrite: bool = False, dtype: object = None
) -> tuple[Path, Tokenizer | None]:
    """A Mixtral directory -> an nn-core model directory (model.safetensors, state.json,
    and the tokenizer's files if the directory has one); returns (directory, tokenizer).

    ``out_dir``: absent, empty or an nn-core model directory; another nn-core directory
    only with ``overwrite``; never a foreign one (checked before reading)."""
    from .ownership import MODEL, check_dir_output

    check_dir_output(out_dir, MODEL, overwrite=overwrite)
    model, tokenizer = load_hf(hf_dir, dtype=dtype)
    out = save_model(model, out_dir, overwrite=overwrite)
    if tokenizer is not None:
        for name, text in tokenizer_files(tokenizer).items():
            _write_text(Path(out) / name, text)
    return Path(out), tokenizer


# ---- export ----------------------------------------------------------------------------


def run_tokenizer(checkpoint: PathLike) -> Tokenizer | None:
    """The tokenizer of a checkpoint: tokenizer.json in it, in its run directory (its
    parent) or, for a run directory, in it; None if there is none."""
    from .checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    for where in (ckpt, ckpt.parent):
        if (where / TOKENIZER_FILE).is_file():
            return load_tokenizer(where / TOKENIZER_FILE)
    return None


def _run_aux_weight(checkpoint: PathLike) -> float:
    """alpha the run was trained with (its state.json's train_config), else the default."""
    from .checkpoint import read_state, resolve_checkpoint

    try:
        state = read_state(resolve_checkpoint(checkpoint))
        return float(state["train_config"]["aux_loss_weight"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return DEFAULT_AUX_LOSS_WEIGHT


def is_hf_export(path: PathLike) -> bool:
    """A directory holding only the files of ``export_hf``, its weights marked as ours."""
    p = Path(path)
    if not p.is_dir() or p.is_symlink():
        return False
    entries = set(os.listdir(p))
    if not entries or not entries <= HF_EXPORT_FILES or HF_WEIGHTS_FILE not in entries:
        return False
    try:
        with open(p / HF_WEIGHTS_FILE, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 << 20:
                return False
            meta = json.loads(f.read(size).decode("utf-8")).get("__metadata__", {})
    except (OSError, ValueError, struct.error, AttributeError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("producer") == PRODUCER


def check_hf_output(path: PathLike, *, overwrite: bool = False) -> None:
    """May ``export_hf`` write directory ``path``? Absent, empty or an earlier export:
    yes; an nn-core checkpoint or run only with ``overwrite``; anything else never."""
    from .ownership import (
        ABSENT,
        EMPTY,
        MODEL,
        RUN,
        TRAINING,
        WHAT,
        check_not_cwd,
        check_parent,
        classify,
        refuse_foreign,
    )

    p = Path(path)
    check_not_cwd(p)
    check_parent(p)
    info = classify(p)
    if info.kind in (ABSENT, EMPTY) or is_hf_export(p):
        return
    if info.kind in (MODEL, TRAINING) or (info.kind == RUN and not info.foreign):
        if overwrite:
            return
        raise OutputError(
            f"{p} holds {WHAT[info.kind]}; refusing to replace it with a Hugging Face "
            "export (--force replaces it)"
        )
    raise refuse_foreign(info, "--force")


def _write_text(path: Path, text: str) -> None:
    atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def export_hf(
    checkpoint: PathLike,
    out_dir: PathLike,
    *,
    overwrite: bool = False,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Write a checkpoint (model dir, training checkpoint or run dir: its latest) as a
    Mixtral directory transformers loads; returns it.

    The tokenizer is the run's (``run_tokenizer``), else ``tokenizer``, else the byte
    tokenizer; it is written as a ``tokenizers`` tokenizer.json with BOS / EOS in
    tokenizer_config.json. Written into a temp directory beside ``out_dir``, then renamed
    into place (an earlier export there is replaced)."""
    import shutil
    import tempfile

    from .ownership import delete_moved, move_aside

    out = Path(out_dir)
    check_hf_output(out, overwrite=overwrite)
    model = load_model(checkpoint)
    tok = run_tokenizer(checkpoint) or tokenizer or ByteTokenizer()
    hf_tok = tok.to_hf() if isinstance(tok, ByteTokenizer) else tok
    if not isinstance(hf_tok, HFTokenizer):
        raise CheckpointError(f"cannot export a tokenizer of type {type(tok).__name__}")
    cfg = model.config
    dtype = str(np.dtype(model.dtype))
    config = hf_config(cfg, hf_tok, dtype=dtype, aux_loss_weight=_run_aux_weight(checkpoint))
    generation = {"bos_token_id": hf_tok.bos_id, "eos_token_id": hf_tok.eos_id}
    absolute = Path(os.path.abspath(out))
    tmp = Path(tempfile.mkdtemp(prefix=f".{absolute.name}.tmp-", dir=absolute.parent))
    try:
        _chmod_default(tmp, 0o777)  # mkdtemp makes 0700; an export gets the umask's mode
        meta = {"format": "pt", "producer": PRODUCER}
        write_safetensors(tmp / HF_WEIGHTS_FILE, hf_tensors(model), meta)
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / HF_GENERATION_FILE).write_text(
            json.dumps(generation, indent=2) + "\n", encoding="utf-8"
        )
        for name, text in tokenizer_files(hf_tok, cfg.max_seq_len).items():
            (tmp / name).write_text(text, encoding="utf-8")
        check_hf_output(out, overwrite=overwrite)  # still so after the work
        old = move_aside(absolute) if os.path.lexists(absolute) else None
        os.rename(tmp, absolute)
        if old is not None:
            delete_moved(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---- the aux loss in transformers' convention ------------------------------------------


def hf_aux_loss(fractions: np.ndarray, prob_means: np.ndarray, top_k: int) -> float:
    """transformers' ``load_balancing_loss_func`` from nn-core's per-layer statistics.

    fractions [L, E]: f_le, the fraction of layer l's (token, slot) assignments going to
    expert e (``moe.expert_fractions``); prob_means [L, E]: P_le, layer l's mean router
    probability. transformers: E * sum_e (K * mean_l f_le) * (mean_l P_le). nn-core's
    aux loss (alpha = 1) is sum_l E sum_e f_le P_le; for one layer the two differ by K."""
    f = np.asarray(fractions, np.float64)
    p = np.asarray(prob_means, np.float64)
    n_experts = f.shape[1]
    return float(n_experts * np.dot(top_k * f.mean(axis=0), p.mean(axis=0)))
