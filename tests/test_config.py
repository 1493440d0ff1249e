"""Config presets, parameter counts and validation of every field."""

from __future__ import annotations

import pytest

from nn_core import Config, ConfigError


def test_presets_match_the_spec_table():
    tiny, small, big = Config.tiny(), Config.small(), Config.default_6_9b()
    assert (tiny.hidden_dim, tiny.n_layers, tiny.n_heads, tiny.n_kv_heads, tiny.head_dim) == (
        64,
        2,
        4,
        1,
        16,
    )
    assert (tiny.n_experts, tiny.top_k_experts, tiny.ffn_dim, tiny.vocab_size) == (4, 2, 256, 1000)
    assert (small.hidden_dim, small.head_dim, small.ffn_dim) == (256, 64, 1024)
    assert (big.hidden_dim, big.n_layers, big.n_heads, big.n_experts, big.top_k_experts) == (
        768,
        30,
        12,
        16,
        4,
    )
    assert (big.ffn_dim, big.vocab_size, big.max_seq_len, big.rope_alpha) == (
        6144,
        32000,
        32768,
        8.0,
    )


def test_parameter_counts():
    tiny = Config.tiny()
    h, v, f = 64, 1000, 256
    per_layer = 2 * h * 64 + 2 * h * 16 + h * 4 + 2 * h
    assert tiny.total_params() == 2 * v * h + h + 2 * (per_layer + 4 * 3 * h * f)
    assert tiny.active_params() == 2 * v * h + h + 2 * (per_layer + 2 * 3 * h * f)
    big = Config.default_6_9b()  # reported without allocating anything
    assert big.total_params() == pytest.approx(6.9e9, rel=0.01)
    assert big.active_params() == pytest.approx(1.8e9, rel=0.01)


@pytest.mark.parametrize(
    "field",
    [
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
    ],
)
@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", True])
def test_every_size_field_must_be_a_positive_int(field, bad):
    with pytest.raises(ConfigError, match=field):
        Config(**{field: bad})


@pytest.mark.parametrize(
    "field,bad",
    [
        ("rope_base", 0.0),
        ("rope_base", 1.0),
        ("rope_base", float("inf")),
        ("rope_base", "x"),
        ("rope_alpha", 0.5),
        ("rope_alpha", float("nan")),
        ("rms_eps", 0.0),
        ("rms_eps", -1e-6),
    ],
)
def test_float_fields(field, bad):
    with pytest.raises(ConfigError, match=field):
        Config(**{field: bad})


def test_relations_between_fields():
    with pytest.raises(ConfigError, match="top_k_experts"):
        Config(n_experts=4, top_k_experts=5)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        Config(n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="head_dim"):
        Config(head_dim=15)
    with pytest.raises(ConfigError, match="head_dim"):
        Config(head_dim=2, rope_alpha=2.0)
    assert issubclass(ConfigError, ValueError)


def test_round_trip_and_unknown_fields():
    cfg = Config.small()
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(n_layers=3).n_layers == 3
    with pytest.raises(ConfigError, match="hiden_dim"):
        Config.from_dict({"hiden_dim": 3})
    with pytest.raises(ConfigError, match="preset"):
        Config.preset("huge")
