"""Data parallelism over MPI: N processes, one model each, the same update on every one.

Shape legend: L layers, E experts, P parameters, M = grad_accum_steps, R = ranks.

    mpiexec -n R nn-core train ...        (pip install "nn-core[mpi]": mpi4py and MPICH)

Every rank holds the whole model, its AdamW moments and the same seeded batch sampler.
The batch of an update (``batch_size`` rows, the same on every rank) is cut into M x R
equal shards of b = batch_size / (M R) rows: micro-batch m of rank r is the rows
[(m R + r) b, (m R + r + 1) b). For each micro-batch a rank runs the forward, the ranks
sum their routing statistics (one small ``Allreduce``), and each backward uses the
expert fractions f_e of the micro-batch over all ranks; after the last micro-batch one
``Allreduce`` sums the flat gradient buffer. Each shard's loss is scaled by 1 / (M R),
so the summed gradient is the mean over the update's rows: the gradient the same batch
gives in one process. Clipping and AdamW then see the same bits on every rank, so the
parameters stay bitwise identical; ``check_in_sync`` verifies it with a hash.

Without mpi4py, outside ``mpiexec`` or with one rank, ``world()`` is None and training is
the one-process code path, untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import NNCoreError
from ..model.moe import RoutingStats

# Environment variables through which launchers tell a process how many ranks there are
# (MPICH / Intel MPI hydra, Open MPI). Absent: no launcher, one process, no MPI import.
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
SYNC_CHECK_INTERVAL = 100  # updates between two parameter-hash comparisons across ranks
# A rank other than 0 that fails waits this long before reporting and aborting: if rank 0
# fails with the same error (bad input fails everywhere), its abort ends this rank first,
# so the error is printed once.
ABORT_GRACE_SECONDS = 1.0
# An error that every rank raises at the same point (marked ``every_rank``: parameters
# out of sync, a non-finite reduced gradient) is left to rank 0: the others wait up to
# this long for its abort before they report too.
EVERY_RANK_GRACE_SECONDS = 30.0
# Between a rank's last line and its MPI_Abort: the launcher relays a rank's output through
# a pipe, and the abort tears that down, so a line printed just before could be lost (seen
# under load: exit status 1 and an empty stderr).
RELAY_SECONDS = 0.5


class DistributedError(NNCoreError):
    """The ranks of a data-parallel run disagree, or MPI cannot be used."""


class ProcessGroup:
    """The ranks of one ``mpiexec`` job (an mpi4py communicator) and the few collectives
    training needs. Every method is collective: all ranks call it, in the same order."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Sum ``array`` over ranks, in place (a contiguous float array); returns it."""
        from mpi4py import MPI

        if not array.flags.c_contiguous:
            raise ValueError("allreduce_sum needs a contiguous array")
        self.comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)
        return array

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (pickled) on every rank."""
        return self.comm.bcast(obj, root=0)

    def broadcast_array(self, array: np.ndarray) -> np.ndarray:
        """Overwrite ``array`` (same shape and dtype on every rank) with rank 0's."""
        self.comm.Bcast(array, root=0)
        return array

    def allgather(self, obj: Any) -> list[Any]:
        return list(self.comm.allgather(obj))

    def abort(self, status: int) -> None:
        """End every rank of the job now (MPI_Abort): no rank is left waiting."""
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        time.sleep(RELAY_SECONDS)
        self.comm.Abort(int(status))
        os._exit(int(status))  # MPICH's Abort may return before the launcher ends the job


def launched_size() -> int:
    """Ranks the launcher started (1 when not started by mpiexec)."""
    for name in SIZE_VARIABLES:
        raw = os.environ.get(name)
        if raw is not None and raw.strip().isdigit():
            return int(raw)
    return 1


def world() -> ProcessGroup | None:
    """The job's ranks when started by ``mpiexec -n R`` with R > 1, else None (one
    process: MPI is not even imported)."""
    size = launched_size()
    if size <= 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistributedError(
            f"started by mpiexec as one of {size} processes, but mpi4py is not installed: "
            'pip install "nn-core[mpi]"'
        ) from None
    comm = MPI.COMM_WORLD
    return None if comm.Get_size() == 1 else ProcessGroup(comm)


def run_ranks(
    group: ProcessGroup, main: Callable[[], int], report: Callable[[BaseException], int]
) -> int:
    """Run ``main`` on this rank. If it raises, ``report`` prints the error (one line) and
    gives the exit status, and every rank of the job is aborted: a rank waiting in a
    collective for the failed one can never hang. Rank 0 reports at once; another rank
    first waits ABORT_GRACE_SECONDS, or EVERY_RANK_GRACE_SECONDS for an error marked
    ``every_rank`` (so an error every rank raises is printed once, by rank 0)."""
    try:
        return main()
    except BaseException as exc:
        if group.rank != 0:
            every = getattr(exc, "every_rank", False)
            time.sleep(EVERY_RANK_GRACE_SECONDS if every else ABORT_GRACE_SECONDS)
        status = report(exc)
        group.abort(status)
        raise  # not reached: abort ends the process


# ---- routing statistics over ranks -------------------------------------------------------


def pack_stats(stats: list[RoutingStats], ce_sum: float) -> np.ndarray:
    """[L (2E + 2) + 1] float64: per layer counts, prob_sum, entropy_sum, tokens; then the
    summed cross-entropy. Counts and token counts stay exact in float64 (< 2^53)."""
    rows = [np.concatenate([s.counts, s.prob_sum, [s.entropy_sum, s.tokens]]) for s in stats]
    return np.concatenate([np.asarray(rows, np.float64).reshape(-1), [ce_sum]])


def unpack_stats(packed: np.ndarray, n_layers: int) -> tuple[list[RoutingStats], float]:
    """Inverse of ``pack_stats``."""
    per_layer = packed[:-1].reshape(n_layers, -1)  # [L, 2E + 2]
    n_experts = (per_layer.shape[1] - 2) // 2
    stats = [
        RoutingStats(
            np.rint(row[:n_experts]).astype(np.int64),
            row[n_experts : 2 * n_experts].copy(),
            float(row[-2]),
            int(round(row[-1])),
        )
        for row in per_layer
    ]
    return stats, float(packed[-1])


def sum_stats(a: list[RoutingStats], b: list[RoutingStats]) -> list[RoutingStats]:
    """Per layer, the statistics of two batches together (every field is a sum)."""
    return [
        RoutingStats(
            x.counts + y.counts,
            x.prob_sum + y.prob_sum,
            x.entropy_sum + y.entropy_sum,
            x.tokens + y.tokens,
        )
        for x, y in zip(a, b)
    ]


def fractions_of(stats: list[RoutingStats]) -> np.ndarray:
    """[L, E] f_e = fraction of (token, slot) assignments going to expert e (as
    ``nn_core.model.moe.expert_fractions``: counts / their total, N K)."""
    return np.stack([s.counts / s.counts.sum() for s in stats])


def aux_of(stats: list[RoutingStats], alpha: float) -> float:
    """Summed over layers, the aux loss of the batch the statistics describe:
    L_aux = alpha * E * sum_e f_e * P_e, with P_e = prob_sum_e / N (``moe.aux_loss``)."""
    total = 0.0
    for s in stats:
        f = s.counts / s.counts.sum()  # [E]
        total += float(alpha * s.counts.size * np.dot(f, s.prob_sum / s.tokens))
    return total


# ---- parameters identical on every rank --------------------------------------------------


def params_digest(flat: np.ndarray) -> str:
    """A hash of the parameter bits (BLAKE2b, 128 bits)."""
    return hashlib.blake2b(np.ascontiguousarray(flat).tobytes(), digest_size=16).hexdigest()


def check_in_sync(group: ProcessGroup, flat: np.ndarray, step: int) -> None:
    """Compare the parameters' hash across ranks; DistributedError on every rank if any
    rank differs from rank 0 (the run must stop: its ranks no longer train one model)."""
    digests = group.allgather(params_digest(flat))
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise every_rank(
            DistributedError(
                f"the parameters of rank(s) {bad} differ from rank 0's after step {step} "
                f"({group.size} ranks): the ranks no longer train the same model; training "
                "stopped before writing anything of this step (resume from the last checkpoint)"
            )
        )


def every_rank(exc: BaseException) -> BaseException:
    """Mark ``exc`` as raised by every rank at the same point (see ``run_ranks``)."""
    exc.every_rank = True  # type: ignore[attr-defined]
    return exc
