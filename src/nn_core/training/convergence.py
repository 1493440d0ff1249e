"""The suite's convergence check, shared by all four languages of the suite.

Tiny config, float32, seed 42; one fixed batch B x S = 2 x 8 with inputs i mod 1000
and targets (i + 1) mod 1000 for i = 0..15; AdamW lr 1e-3, warmup 10, total_steps
1200, grad_clip 1.0, aux_loss_weight 0.01, weight_decay 0.1; 1000 updates. The
recorded loss of update t is the total loss (CE + aux) of the batch before update t.

``run_convergence`` returns the losses; ``nn-core convergence --out DIR`` writes them as
DIR/convergence.json ({"language": "python", "steps": 1000, "losses": [...]}) and
DIR/convergence.png, and exits 1 if the final loss is not below TARGET_LOSS.
"""

from __future__ import annotations

import numpy as np

from ..model.config import Config
from .config import TrainConfig
from .trainer import Trainer

TARGET_LOSS = 0.05  # the check passes when the last loss is below this


def convergence_batch(vocab_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """inputs [2, 8] = i mod V and targets [2, 8] = (i + 1) mod V for i = 0..15."""
    i = np.arange(16, dtype=np.int64).reshape(2, 8)  # [B, S]
    return i % vocab_size, (i + 1) % vocab_size


def convergence_train_config() -> TrainConfig:
    return TrainConfig(
        batch_size=2,
        seq_len=8,
        lr=1e-3,
        warmup_steps=10,
        total_steps=1200,
        grad_clip=1.0,
        aux_loss_weight=0.01,
        weight_decay=0.1,
        seed=42,
    )


def run_convergence(
    steps: int = 1000,
    *,
    seed: int = 42,
    dtype: object = np.float32,
    progress: bool = False,
) -> list[float]:
    """The per-update total losses of the convergence check (``steps`` updates).

    BLAS threads are the library's choice (one for the tiny config's products).
    """
    from ..model.transformer import MoETransformer

    model = MoETransformer(Config.tiny(), seed=seed, dtype=dtype)
    trainer = Trainer(model, convergence_train_config())
    inputs, targets = convergence_batch(model.config.vocab_size)
    history = trainer.fit(lambda: (inputs, targets), steps, progress=progress)
    return [m["loss"] for m in history]
