"""What the benchmark builds: models, trainers and the one timed operation of each.

Shape legend: B batch, S sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..model.config import Config
from .scenarios import SEED, Scenario, make_inputs


def make_model(cfg: Config) -> Any:
    """nn_core.MoETransformer(cfg, seed=42), float32."""
    from ..model.transformer import MoETransformer

    return MoETransformer(cfg, seed=SEED, dtype=np.float32)


def make_trainer(model: Any, batch: int, seq: int, train_options: dict[str, Any]) -> Any:
    """Trainer(model, TrainConfig(batch_size=B, seq_len=S, **train_options)); the
    TrainConfig defaults otherwise."""
    from ..training.config import TrainConfig
    from ..training.trainer import Trainer

    return Trainer(model, TrainConfig(batch_size=batch, seq_len=seq, **train_options))


def model_op(
    kind: str, cfg: Config, batch: int, seq: int, train_options: dict[str, Any]
) -> Callable[[], Any]:
    """A zero-argument callable: one forward (logits) or one train step (its metrics dict)."""
    return model_and_op(kind, cfg, batch, seq, train_options)[1]


def model_and_op(
    kind: str, cfg: Config, batch: int, seq: int, train_options: dict[str, Any]
) -> tuple[Any, Callable[[], Any]]:
    """The model and ``model_op``'s callable on it."""
    if kind not in ("forward", "parallel_forward", "train", "parallel_train"):
        raise ValueError(f"model_op kind must be forward or train, got {kind!r}")
    ids, targets = make_inputs(batch, seq, cfg.vocab_size)  # [B, S] int64
    model = make_model(cfg)
    if kind in ("forward", "parallel_forward"):
        return model, lambda: model.forward(ids)
    trainer = make_trainer(model, batch, seq, train_options)
    return model, lambda: trainer.train_step(ids, targets)


def config_of(sc: Scenario) -> Config:
    return Config.preset(str(sc.params.get("config", "tiny")))
