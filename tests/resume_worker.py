"""The fresh-process half of the exact-resume test (tests/test_checkpoint.py).

    python tests/resume_worker.py CKPT STEPS OUT

Resumes a Trainer from CKPT in this new interpreter (BLAS pool fixed to one thread
with threadpoolctl, as in the test process), restores the data sampler's position,
runs STEPS more updates, then writes the trainer to OUT/final and the per-step
losses to OUT/losses.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from nn_core.data.dataset import BatchSampler
from nn_core.training.config import TrainConfig
from nn_core.training.trainer import Trainer


def make_sampler(seed: int = 1234) -> BatchSampler:
    """The test's data: fixed random token ids, windows B x S = 2 x 16."""
    ids = np.random.default_rng(11).integers(0, 1000, 2000)  # [T]
    return BatchSampler(ids, batch_size=2, seq_len=16, seed=seed)


def make_train_config() -> TrainConfig:
    return TrainConfig(
        batch_size=2, seq_len=16, lr=3e-3, warmup_steps=2, total_steps=20, grad_clip=0.5, seed=5
    )


def main(argv: list[str]) -> int:
    ckpt, steps, out = Path(argv[0]), int(argv[1]), Path(argv[2])
    with threadpool_limits(1):
        sampler = make_sampler(seed=999)  # another seed: the checkpoint must restore it
        trainer = Trainer.resume(ckpt, data_source=sampler)
        history = trainer.fit(sampler, steps, progress=False)
        trainer.save(out / "final")
    (out / "losses.json").write_text(json.dumps([m["loss"] for m in history]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
