"""Model configuration (docs/model.md, section 1): a frozen, validated dataclass.

Shape legend used across the package:
    B batch, S sequence, H hidden_dim, nH n_heads, nKV n_kv_heads, D head_dim,
    Q = nH*D, KV = nKV*D, E n_experts, K top_k_experts, F ffn_dim, V vocab_size,
    N = B*S tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..checks import check_int, check_number
from ..errors import ConfigError, InputError

_C = TypeVar("_C", bound="DictConfig")


class DictConfig:
    """to_dict / from_dict / replace for a frozen config dataclass (validated on construction)."""

    KIND = "config"  # how errors name this kind of config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], data: dict[str, Any]) -> _C:
        """Build from a mapping; unknown keys are an error, missing keys take defaults."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.KIND} must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.KIND} field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self: _C, **changes: Any) -> _C:
        return self.from_dict({**self.to_dict(), **changes})


def ntk_rope_base(base: float, alpha: float, head_dim: int) -> float:
    """NTK-aware RoPE: base' = base * alpha^(head_dim / (head_dim - 2)) when alpha > 1."""
    if alpha == 1:
        return float(base)
    return float(base * alpha ** (head_dim / (head_dim - 2)))


@dataclass(frozen=True)
class Config(DictConfig):
    hidden_dim: int = 64  # H: width of the residual stream
    n_layers: int = 2  # number of TransformerBlocks
    n_heads: int = 4  # nH: query heads
    n_kv_heads: int = 1  # nKV: key/value heads (multi-query when 1)
    head_dim: int = 16  # D: width of one head; even, RoPE rotates pairs
    n_experts: int = 4  # E: SwiGLU experts per MoE layer
    top_k_experts: int = 2  # K: experts each token is routed to
    ffn_dim: int = 256  # F: hidden width of one expert
    vocab_size: int = 1000  # V: token ids are in [0, V)
    max_seq_len: int = 512  # longest sequence the model accepts
    rope_base: float = 10000.0  # RoPE base before NTK scaling
    rope_alpha: float = 1.0  # NTK scaling factor; 1 means plain RoPE
    rms_eps: float = 1e-6  # RMSNorm epsilon

    def __post_init__(self) -> None:
        for name in (
            "hidden_dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "n_experts",
            "top_k_experts",
            "ffn_dim",
            "vocab_size",
            "max_seq_len",
        ):
            check_int(getattr(self, name), name, 1)
        for name in ("rope_base", "rope_alpha", "rms_eps"):
            check_number(getattr(self, name), name, 0.0, math.inf, low_open=True, high_open=True)
        if self.rope_base <= 1:
            raise ConfigError(f"rope_base must be > 1, got {self.rope_base}")
        if self.rope_alpha < 1:
            raise ConfigError(
                f"rope_alpha must be >= 1 (1 = no NTK scaling), got {self.rope_alpha}"
            )
        if self.top_k_experts > self.n_experts:
            raise ConfigError(
                f"top_k_experts must be in [1, n_experts={self.n_experts}], "
                f"got {self.top_k_experts}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.rope_alpha > 1 and self.head_dim < 4:
            raise ConfigError(
                f"head_dim must be >= 4 when rope_alpha > 1 (NTK divides by head_dim - 2), "
                f"got {self.head_dim}"
            )

    # ---- presets (docs/model.md, section 1) ------------------------------------------
    @classmethod
    def tiny(cls) -> Config:
        """Tests and benchmarks: about 0.54M parameters."""
        return cls()

    @classmethod
    def small(cls) -> Config:
        """The benchmark's scale axis: about 7.1M parameters."""
        return cls(hidden_dim=256, head_dim=64, ffn_dim=1024)

    @classmethod
    def default_6_9b(cls) -> Config:
        """The reference size: about 6.9B total, 1.8B active. Never allocate it."""
        return cls(
            hidden_dim=768,
            n_layers=30,
            n_heads=12,
            n_kv_heads=1,
            head_dim=64,
            n_experts=16,
            top_k_experts=4,
            ffn_dim=6144,
            vocab_size=32000,
            max_seq_len=32768,
            rope_base=10000.0,
            rope_alpha=8.0,
        )

    PRESETS = ("tiny", "small", "default_6_9b")

    @classmethod
    def preset(cls, name: str) -> Config:
        if name not in cls.PRESETS:
            raise ConfigError(
                f"config preset must be one of {', '.join(cls.PRESETS)}, got {name!r}"
            )
        return getattr(cls, name)()

    # ---- derived sizes ----------------------------------------------------------
    @property
    def q_dim(self) -> int:
        """Q = nH * D."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """KV = nKV * D."""
        return self.n_kv_heads * self.head_dim

    @property
    def rope_theta(self) -> float:
        """The RoPE base the model uses: ``ntk_rope_base(rope_base, rope_alpha, head_dim)``."""
        return ntk_rope_base(self.rope_base, self.rope_alpha, self.head_dim)

    def _layer_params(self, experts: int) -> int:
        h = self.hidden_dim
        attn = 2 * h * self.q_dim + 2 * h * self.kv_dim  # Wq, Wo; Wk, Wv
        router = h * self.n_experts
        ffn = experts * 3 * h * self.ffn_dim  # gate, up, down per expert
        norms = 2 * h
        return attn + router + ffn + norms

    def total_params(self) -> int:
        """Every parameter: embedding, layers with all experts, final norm, LM head."""
        h, v = self.hidden_dim, self.vocab_size
        return 2 * v * h + h + self.n_layers * self._layer_params(self.n_experts)

    def active_params(self) -> int:
        """Parameters one token touches: as total, with top_k experts per layer."""
        h, v = self.hidden_dim, self.vocab_size
        return 2 * v * h + h + self.n_layers * self._layer_params(self.top_k_experts)


# ---- resolving a config: preset, file, KEY=VALUE overrides ----------------------------


def parse_assignment(item: str) -> tuple[str, Any]:
    """KEY=VALUE, the one override syntax (``--set`` everywhere): VALUE is JSON (1, 1e-3,
    true, "x"), else a float (inf), else the raw string."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    text = text.strip()
    try:
        return key.strip(), json.loads(text)
    except ValueError:
        pass
    try:
        return key.strip(), float(text)
    except ValueError:
        return key.strip(), text


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The fields of a .toml or .json config file (a table/object of fields).
    (os.path, not pathlib: pathlib and the urllib it imports are ~0.7 MiB of memory in
    every process that imports the model, most of which never read a config file.)"""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".toml", ".json"):
        raise ConfigError(
            f"config must be a preset ({', '.join(Config.PRESETS)}) or a .toml/.json file, "
            f"got {path!r}"
        )
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:  # unreadable like a data file: a runtime error
        raise InputError(f"config file {path}: {exc.strerror or exc}") from None
    try:
        if suffix == ".json":
            data = json.loads(raw.decode("utf-8"))
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ConfigError(f"{path}: TOML needs Python >= 3.11; use a .json file") from None
            data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"config file {path} is not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/object of fields")
    return data


def collect_fields(
    config: str | None, sets: Sequence[str] = (), other: Collection[str] = ()
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(name, model fields, other fields) from a preset or a config file, then KEY=VALUE
    overrides; precedence preset < file < ``sets``.

    A config file holds model fields and, optionally, fields named in ``other`` (e.g.
    TrainConfig's): at the top level (routed by name) or under [model] / [train], and an
    optional ``preset`` to start from (default tiny). Any other key is a ConfigError
    naming it and the known fields.
    """
    model_names = {f.name for f in dataclasses.fields(Config)}
    other_names = set(other)
    model: dict[str, Any] = {}
    extra: dict[str, Any] = {}

    def route(data: dict[str, Any], where: str, allow_other: bool = True) -> None:
        for key, value in data.items():
            if key in model_names:
                model[key] = value
            elif key in other_names and allow_other:
                extra[key] = value
            else:
                known = sorted(model_names) + sorted(other_names)
                raise ConfigError(f"unknown config field {key!r} in {where}; known: {known}")

    name = config or "tiny"
    if config is None or config in Config.PRESETS:
        model.update(Config.preset(name).to_dict())
    else:
        path = config
        name = os.path.splitext(os.path.basename(path))[0]
        data = read_config_file(path)
        model.update(Config.preset(str(data.pop("preset", "tiny"))).to_dict())
        for section in ("model", "train"):
            part = data.pop(section, {})
            if not isinstance(part, dict):
                raise ConfigError(f"[{section}] in {path} must be a table of fields")
            if section == "train" and part and not other_names:
                raise ConfigError(f"{path}: [train] fields are not used by this command")
            route(part, f"{path} [{section}]", allow_other=section == "train")
        route(data, str(path))
    for item in sets:
        route(dict([parse_assignment(item)]), "--set")
    return name, model, extra


def resolve_config(config: str | None = None, sets: Sequence[str] = ()) -> tuple[Config, str]:
    """(Config, its name) from a preset name or a .toml/.json file, with KEY=VALUE overrides."""
    name, model, _ = collect_fields(config, sets)
    return Config.from_dict(model), name
