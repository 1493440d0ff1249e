"""The rank side of tests/test_distributed.py, started by ``mpiexec -n R``.

mpiexec -n 2 python tests/mpi_worker.py equiv OUT ACCUM STEPS
    float64 tiny model, a Trainer over the job's ranks, STEPS updates on fixed batches
    of 8 x 8; every rank writes OUT/rank{r}.npz (losses, grad norms, parameters,
    the step's routing counts).
mpiexec -n 2 python tests/mpi_worker.py cli ARGS...
    ``nn-core ARGS...``; NN_CORE_TEST_FAULT="RANK:STEP:KIND" injects a fault on rank
    RANK just before update STEP: KIND "raise" (an OSError, as a full disk gives),
    "kill" (SIGKILL of this process) or "drift" (one parameter of this rank changed).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from nn_core import Config, MoETransformer
from nn_core.training.config import TrainConfig
from nn_core.training.distributed import world
from nn_core.training.trainer import Trainer

FAULT = "NN_CORE_TEST_FAULT"


def equiv_rows(step: int, b: int = 8, s: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The global batch of update ``step``: the same on every rank and in the test."""
    rng = np.random.default_rng(100 + step)
    return rng.integers(0, 256, (b, s)), rng.integers(0, 256, (b, s))  # [B, S] each


def equiv_trainer(accum: int, group: Any) -> Trainer:
    cfg = TrainConfig(
        batch_size=8,
        seq_len=8,
        lr=1e-2,
        warmup_steps=1,
        total_steps=50,
        grad_clip=0.5,  # clipping takes part
        grad_accum_steps=accum,
        seed=3,
    )
    return Trainer(MoETransformer(Config.tiny(), seed=5, dtype=np.float64), cfg, group=group)


def equiv_run(trainer: Trainer, steps: int) -> dict[str, np.ndarray]:
    losses, norms, counts = [], [], []
    for step in range(steps):
        m = trainer.train_step(*equiv_rows(step))
        losses.append([m["loss"], m["ce"], m["aux"]])
        norms.append(m["grad_norm"])
        counts.append(np.stack([s.counts for s in trainer.last_routing_stats]))
    return {
        "losses": np.array(losses),
        "norms": np.array(norms),
        "counts": np.array(counts),
        "params": trainer.model.flat_params.copy(),
        "v": trainer.optimizer.v.copy(),
    }


def equiv(out: str, accum: int, steps: int) -> int:
    group = world()
    assert group is not None and group.size == 2, "run under mpiexec -n 2"
    result = equiv_run(equiv_trainer(accum, group), steps)
    np.savez(os.path.join(out, f"rank{group.rank}.npz"), **result)
    return 0


def install_fault(spec: str) -> None:
    """Wrap Trainer.train_step to inject the fault RANK:STEP:KIND on this rank."""
    rank_s, step_s, kind = spec.split(":")
    rank = int(os.environ.get("PMI_RANK", "0"))
    if rank != int(rank_s):
        return
    original = Trainer.train_step

    def train_step(self: Trainer, token_ids: np.ndarray, targets: np.ndarray) -> Any:
        if self.step == int(step_s):
            if kind == "raise":
                raise OSError(28, "No space left on device (injected fault)", "/tmp/injected")
            if kind == "kill":
                print(f"injected kill at {time.time():.3f}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "drift":
                self.model.flat_params[0] += 1e-3
        return original(self, token_ids, targets)

    Trainer.train_step = train_step  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    with threadpool_limits(1):
        if argv[0] == "equiv":
            return equiv(argv[1], int(argv[2]), int(argv[3]))
        if argv[0] == "cli":
            if os.environ.get(FAULT):
                install_fault(os.environ[FAULT])
            from nn_core.app.cli import main as cli_main

            return cli_main(argv[1:])
    raise SystemExit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
