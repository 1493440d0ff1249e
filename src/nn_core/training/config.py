"""Training configuration: ``TrainConfig`` and the one place for training defaults.

The dataclass defaults are the contract's values (batch 4 x 2048, lr 1e-4, warmup 1000,
100,000 steps: sized for the 6.9B reference model). ``DEFAULT_RUN`` holds what
``nn-core train`` starts from when no option is given: the tiny config trains on the
default corpus in about 2.5 minutes on 2 cores (measured; README).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..checks import check_bool, check_choice, check_int, check_number
from ..errors import ConfigError
from ..model.config import Config, DictConfig, collect_fields

KERNELS = ("numpy", "numba")  # TrainConfig.kernels: reference NumPy or fused Numba passes

# ``nn-core train`` with no options (TrainConfig fields; the rest keep their defaults)
DEFAULT_RUN: dict[str, Any] = {
    "batch_size": 8,
    "seq_len": 128,
    "lr": 5e-3,
    "warmup_steps": 100,
    "total_steps": 3000,
    "eval_interval": 250,
    "checkpoint_interval": 500,
    "seed": 42,
}


@dataclass(frozen=True)
class TrainConfig(DictConfig):
    """Training hyper-parameters; the suite's defaults (docs/training.md, TrainConfig).
    Validated on construction."""

    KIND = "train config"  # how errors name it (not a field: no annotation)

    batch_size: int = 4  # B: rows per batch (for the data pipeline; train_step takes any B)
    seq_len: int = 2048  # S: tokens per row (likewise)
    lr: float = 1e-4  # peak learning rate, reached at the end of the warmup
    warmup_steps: int = 1000  # linear warmup 0 -> lr over updates 0..warmup_steps
    total_steps: int = 100_000  # cosine reaches min_lr = 0.1 * lr here, stays there after
    grad_clip: float = 1.0  # max global L2 norm of the gradient (math.inf: never clip)
    aux_loss_weight: float = 0.01  # alpha of the load-balancing loss
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    weight_decay: float = 0.1  # decoupled weight decay, every parameter (docs/training.md)
    activation_checkpointing: bool = False  # recompute block internals in the backward
    eval_interval: int = 500  # evaluate after every this many updates (0: never)
    checkpoint_interval: int = 1000  # checkpoint after every this many updates (0: end only)
    keep_checkpoints: int = 3  # newest step checkpoints kept in a run directory
    seed: int = 42  # seed of the trainer's np.random.Generator (saved with checkpoints)
    kernels: str = "numba"  # AdamW and gradient norm: "numba" (fused) or "numpy" (reference)
    # M: the batch_size rows of an update run as M micro-batches of batch_size / M rows
    # (gradients summed, one AdamW step): the same update, in 1/M of the activation memory
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        ints = {  # name -> smallest allowed value
            "batch_size": 1,
            "seq_len": 1,
            "warmup_steps": 0,
            "total_steps": 1,
            "eval_interval": 0,
            "checkpoint_interval": 0,
            "keep_checkpoints": 1,
            "seed": 0,
            "grad_accum_steps": 1,
        }
        for name, low in ints.items():
            check_int(getattr(self, name), name, low)
        check_choice(self.kernels, "kernels", KERNELS)
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"grad_accum_steps must divide batch_size ({self.batch_size}) into equal "
                f"micro-batches, got {self.grad_accum_steps}"
            )
        if self.warmup_steps >= self.total_steps:
            raise ConfigError(
                f"warmup_steps must be < total_steps ({self.total_steps}), got {self.warmup_steps}"
            )
        inf = math.inf
        check_number(self.lr, "lr", 0.0, inf, low_open=True, high_open=True)
        check_number(self.grad_clip, "grad_clip", 0.0, inf, low_open=True)  # inf: never clip
        check_number(self.aux_loss_weight, "aux_loss_weight", 0.0, inf, high_open=True)
        check_number(self.beta1, "beta1", 0.0, 1.0, high_open=True)
        check_number(self.beta2, "beta2", 0.0, 1.0, high_open=True)
        check_number(self.eps, "eps", 0.0, inf, low_open=True, high_open=True)
        check_number(self.weight_decay, "weight_decay", 0.0, inf, high_open=True)
        check_bool(self.activation_checkpointing, "activation_checkpointing")


def resolve_run_config(
    config: str | None = None,
    sets: Sequence[str] = (),
    overrides: dict[str, Any] | None = None,
    start: dict[str, Any] | None = None,
) -> tuple[Config, str, TrainConfig]:
    """(model Config, its name, TrainConfig) of a training run.

    Precedence: ``start`` (default ``DEFAULT_RUN``) < preset or config file < KEY=VALUE
    ``sets`` (model or train fields, ``collect_fields``) < ``overrides`` (train fields,
    e.g. the CLI's explicit options). A run shorter than its warmup, with no warmup
    given, warms up over its first 10 %.
    """
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    name, model, train = collect_fields(config, sets, names)
    given = {**train, **(overrides or {})}
    fields = {**(DEFAULT_RUN if start is None else start), **given}
    total = fields.get("total_steps", TrainConfig.total_steps)
    if "warmup_steps" not in given and fields.get("warmup_steps", 0) >= total:
        fields["warmup_steps"] = total // 10
    return Config.from_dict(model), name, TrainConfig.from_dict(fields)
