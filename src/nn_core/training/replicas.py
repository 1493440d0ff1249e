"""One starting state on every rank of a data-parallel run (``distributed``).

Rank 0 builds or resumes its trainer as one process would and sends it whole; the
other ranks rebuild it from what they receive, bit for bit, with no shared file system.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..model.config import Config
from ..model.transformer import MoETransformer
from .config import TrainConfig
from .distributed import ProcessGroup
from .trainer import DataSource, Trainer


def share_trainer(group: ProcessGroup, trainer: Trainer) -> None:
    """Rank 0: send the trainer's whole state (model config, TrainConfig, step, RNG and
    data state, parameters, AdamW moments) to the other ranks (``receive_trainer``).
    ConfigError (before anything is sent) if the batch does not split into equal shards."""
    cfg = trainer.config
    if cfg.batch_size % (cfg.grad_accum_steps * group.size):
        raise ConfigError(
            f"batch_size ({cfg.batch_size}) must be divisible by grad_accum_steps "
            f"({cfg.grad_accum_steps}) x ranks ({group.size}): every rank takes an equal "
            "shard of every micro-batch"
        )
    group.broadcast(
        {
            "config": trainer.model.config.to_dict(),
            "dtype": trainer.model.flat_params.dtype.name,
            "state": trainer.state(),
        }
    )
    for array in (trainer.model.flat_params, trainer.optimizer.m, trainer.optimizer.v):
        group.broadcast_array(array)
    trainer.group = group


def receive_trainer(group: ProcessGroup, data_source: DataSource | None = None) -> Trainer:
    """Another rank: a trainer equal to rank 0's, bit for bit (``share_trainer``); the
    data state goes into ``data_source``. Works without a shared file system."""
    sent = group.broadcast(None)
    state = sent["state"]
    model = MoETransformer(Config.from_dict(sent["config"]), dtype=np.dtype(sent["dtype"]))
    trainer = Trainer(model, TrainConfig.from_dict(state["train_config"]), group=group)
    trainer.step = state["step"]
    trainer.rng.bit_generator.state = state["rng_state"]
    m, v = np.empty_like(trainer.optimizer.m), np.empty_like(trainer.optimizer.v)
    for array in (model.flat_params, m, v):
        group.broadcast_array(array)
    trainer.optimizer.load_state_dict({"m": m, "v": v, "t": state["optimizer"]["t"]})
    if data_source is not None and state["data_state"] is not None:
        data_source.load_state_dict(state["data_state"])
    trainer.data_source = data_source
    return trainer
