"""The Trainer: steps, evaluation, metrics, checkpoints and exact resume.

Shape legend: B batch, S sequence, P = total number of parameters.

Step convention (see ``optim``): ``trainer.step`` counts the updates applied so far. A
metrics line with ``"step": t`` describes update t (its ``loss`` is the loss of the
batch before the update, its ``lr`` is ``get_lr(t)``). A checkpoint ``step_000100``
holds the state after 100 updates; resuming from it applies update 100 next.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..checks import check_int
from ..errors import CheckpointError, ConfigError, InputError, NonFiniteError, OutputError
from ..model.config import Config
from .config import TrainConfig
from .optim import AdamW, clip_factor, get_lr, global_norm

if TYPE_CHECKING:
    from ..model.layers import FusedBackward
    from ..model.moe import Routing, RoutingStats
    from ..model.transformer import LossTerms, MoETransformer
    from .distributed import ProcessGroup
    from .telemetry import ExpertTelemetry

Batch = tuple[np.ndarray, np.ndarray]  # (token_ids [B, S], targets [B, S])


# ---- trainer ---------------------------------------------------------------------------


class DataSource(Protocol):
    """A batch source whose position can be saved (e.g. ``nn_core.data.BatchSampler``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _has_state(obj: object) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


def _batch_stream(batches: Any) -> Callable[[], Batch]:
    """A zero-argument function returning the next (inputs, targets); StopIteration at end."""
    if callable(getattr(batches, "next_batch", None)):  # nn_core.data.BatchSampler
        return batches.next_batch
    if hasattr(batches, "__next__"):  # an iterator
        return lambda: next(batches)
    if callable(batches):
        return batches
    if isinstance(batches, Iterable):
        iterator = iter(batches)
        return lambda: next(iterator)
    raise InputError(
        "batches must be a sampler with next_batch(), an iterator/iterable of "
        f"(inputs, targets), or a callable returning one; got {type(batches).__name__}"
    )


class Trainer:
    """Runs training steps of a model: schedule, clipping, AdamW, metrics, checkpoints.

    ``model`` is an ``nn_core.MoETransformer`` (anything with its flat-buffer and
    ``loss_terms_and_grad`` API). ``out_dir`` is the run directory ``fit`` uses by
    default for checkpoints (``out_dir/step_000100``, ``out_dir/latest``) and metrics
    (``out_dir/metrics.jsonl``). ``data_source`` (an object with ``state_dict`` /
    ``load_state_dict``, e.g. ``nn_core.data.BatchSampler``) has its state saved with
    every checkpoint and restored by ``Trainer.resume``.
    """

    def __init__(
        self,
        model: MoETransformer,
        train_config: TrainConfig | None = None,
        *,
        out_dir: str | os.PathLike[str] | None = None,
        data_source: DataSource | None = None,
        group: ProcessGroup | None = None,
    ) -> None:
        cfg = TrainConfig() if train_config is None else train_config
        if not isinstance(cfg, TrainConfig):
            raise ConfigError(f"train_config must be a TrainConfig, got {type(cfg).__name__}")
        for attr in ("flat_params", "flat_grads", "forward_loss", "backward", "parameters"):
            if not hasattr(model, attr):
                raise InputError(f"model must be an nn_core.MoETransformer (no .{attr})")
        if data_source is not None and not _has_state(data_source):
            raise InputError("data_source must have state_dict() and load_state_dict()")
        self.model = model
        self.config = cfg
        self._fused: FusedBackward | None = None  # compiled backward lines, from the 1st step
        if cfg.kernels == "numba":  # fused one-pass kernels; equal to the reference to rounding
            from .kernels import adamw_update_fused, global_norm_fused

            self.optimizer = AdamW.for_model(model, cfg, update_fn=adamw_update_fused)
            self._global_norm: Callable[[np.ndarray], float] = global_norm_fused
        else:
            self.optimizer = AdamW.for_model(model, cfg)
            self._global_norm = global_norm
        self.step = 0  # updates applied so far
        self.rng = np.random.default_rng(cfg.seed)  # for callers; saved with checkpoints
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.data_source = data_source
        self.last_checkpoint: Path | None = None  # the newest checkpoint saved or resumed
        self.last_routing: list[Routing] = []  # each layer's routing in the last step
        # data parallelism: the ranks of an mpiexec job (nn_core.training.distributed);
        # None: this process alone. Rank 0 alone writes metrics, checkpoints, the bar.
        self.group = group
        self._routing_stats: list[RoutingStats] | None = None  # of the whole last step
        self.comm_seconds = 0.0  # time the last step spent in collectives (with group)

    # ---- one step ----------------------------------------------------------------------
    def train_step(self, token_ids: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        """Forward, backward, clip, AdamW with lr = get_lr(step); advances ``step``.

        Returns {"step", "loss", "ce", "aux", "grad_norm" (before clipping), "lr"}; "step"
        is the 0-based index of this update. A NaN/Inf loss or gradient norm raises
        NonFiniteError before any update: parameters, moments and step stay as they were.
        """
        cfg, t = self.config, self.step
        lr = get_lr(t, cfg)
        try:
            terms = self._gradient(token_ids, targets)
        except FloatingPointError as exc:  # a model running under np.errstate(raise)
            raise self._non_finite(t, f"floating-point error ({exc})") from exc
        total, ce, aux = (float(x) for x in terms)
        grad_norm = self._global_norm(self.model.flat_grads)  # before clipping
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            error = self._non_finite(t, f"loss={total!r}, grad_norm={grad_norm!r}")
            if self.group is not None:  # reduced values: every rank raises it here
                error.every_rank = True  # type: ignore[attr-defined]
            raise error
        # clip_grad_norm's clipping, applied by the AdamW pass (no pass of its own)
        self.optimizer.step(lr, grad_scale=clip_factor(grad_norm, cfg.grad_clip))
        self.step = t + 1
        return {"step": t, "loss": total, "ce": ce, "aux": aux, "grad_norm": grad_norm, "lr": lr}

    def _gradient(self, token_ids: np.ndarray, targets: np.ndarray) -> LossTerms:
        """Leave the gradient of this step's loss in ``model.flat_grads``; its loss terms.

        The forward keeps its state (``model.forward_loss``); the backward zeroes the
        gradients and adds this step's, under the model's gradient lock.
        ``self.last_routing`` keeps each layer's routing (``nn_core.model.moe.Routing``).
        """
        model, cfg = self.model, self.config
        if cfg.grad_accum_steps > 1 or self.group is not None:
            return self._shards_gradient(token_ids, targets)
        state = model.forward_loss(
            token_ids,
            targets,
            cfg.aux_loss_weight,
            activation_checkpointing=cfg.activation_checkpointing,
            fused=self._fused_backward(),
        )
        model.backward(state, zero_grad=True, fused=self._fused_backward())
        self.last_routing = state.routing
        self._routing_stats = None  # computed from last_routing when asked for
        return state.terms

    def _fused_backward(self) -> FusedBackward | None:
        """With ``kernels="numba"``: the compiled element-wise backward lines
        (``kernels.fused_backward``), looked up at the first step (Numba is imported
        then, as for AdamW, never when a trainer is built); None with ``"numpy"``."""
        if self._fused is None and self.config.kernels == "numba":
            from .kernels import fused_backward

            self._fused = fused_backward()
        return self._fused

    def _shards_gradient(self, token_ids: np.ndarray, targets: np.ndarray) -> LossTerms:
        """``_gradient`` over M = grad_accum_steps micro-batches and R ranks.

        The B rows are cut into M x R shards of b = B / (M R) rows; micro-batch m of rank
        r is rows [(m R + r) b, (m R + r + 1) b). Each shard's loss is scaled by 1 / (M R)
        and the gradients add up (over micro-batches in ``flat_grads``, over ranks in one
        Allreduce), so the cross-entropy and its gradient are those of the B rows at once.
        Aux loss: f_e is taken over micro-batch m on all ranks (its routing statistics are
        summed over ranks before the backward), so with M = 1 the aux loss and its gradient
        are those of the whole batch; with M > 1 the aux loss is the mean over micro-batches
        of each micro-batch's aux loss (docs/distributed.md states the difference).
        """
        from ..model.transformer import LossTerms
        from .distributed import aux_of, fractions_of, pack_stats, sum_stats, unpack_stats

        model, cfg, group = self.model, self.config, self.group
        ids, tgt = np.asarray(token_ids), np.asarray(targets)
        n_micro, n_ranks = cfg.grad_accum_steps, 1 if group is None else group.size
        rank = 0 if group is None else group.rank
        rows = ids.shape[0] if ids.ndim == 2 else 0
        if rows == 0 or rows % (n_micro * n_ranks) or tgt.shape != ids.shape:
            raise InputError(
                f"token_ids and targets must be [B, S] with B divisible by grad_accum_steps "
                f"({n_micro}) x ranks ({n_ranks}), got {ids.shape} and {tgt.shape}"
            )
        b = rows // (n_micro * n_ranks)
        scale = 1.0 / (n_micro * n_ranks)
        total = ce = aux = comm = 0.0
        step_stats: list[RoutingStats] | None = None
        for m in range(n_micro):
            lo = (m * n_ranks + rank) * b
            state = model.forward_loss(
                ids[lo : lo + b],
                tgt[lo : lo + b],
                cfg.aux_loss_weight,
                activation_checkpointing=cfg.activation_checkpointing,
                fused=self._fused_backward(),
            )
            stats = state.routing_stats()
            fractions = None  # one process: each micro-batch's own f_e
            terms = state.terms
            if group is not None:  # sum the routing statistics and CE over ranks
                start = time.perf_counter()
                packed = group.allreduce_sum(pack_stats(stats, terms.ce * state.ids.size))
                comm += time.perf_counter() - start
                stats, ce_sum = unpack_stats(packed, len(stats))
                fractions = fractions_of(stats)  # f_e of micro-batch m on all ranks   [L, E]
                micro_aux = aux_of(stats, cfg.aux_loss_weight)
                micro_ce = ce_sum / stats[0].tokens
                terms = LossTerms(micro_ce + micro_aux, micro_ce, micro_aux)
            model.backward(
                state,
                scale=scale,
                fractions=fractions,
                zero_grad=m == 0,
                fused=self._fused_backward(),
            )
            step_stats = stats if step_stats is None else sum_stats(step_stats, stats)
            total, ce, aux = total + terms.total, ce + terms.ce, aux + terms.aux
            self.last_routing = state.routing
        if group is not None:
            start = time.perf_counter()
            group.allreduce_sum(model.flat_grads)  # the one exchange of the gradient
            self.comm_seconds = comm + time.perf_counter() - start
        self._routing_stats = step_stats
        return LossTerms(total / n_micro, ce / n_micro, aux / n_micro)

    @property
    def last_routing_stats(self) -> list[RoutingStats]:
        """Per layer, the routing statistics (``nn_core.model.moe.RoutingStats``: counts,
        summed probabilities and entropies, tokens) of the last step's WHOLE batch: summed
        over its micro-batches and over all ranks."""
        if self._routing_stats is None:
            from ..model.moe import routing_stats

            self._routing_stats = [routing_stats(r) for r in self.last_routing]
        return self._routing_stats

    def expert_telemetry(self) -> ExpertTelemetry:
        """Per layer expert load, router probability and entropy of the last step's whole
        batch, from ``last_routing_stats`` (``nn_core.training.telemetry``)."""
        from .telemetry import expert_telemetry

        return expert_telemetry(self.last_routing_stats)

    def _non_finite(self, step: int, detail: str) -> NonFiniteError:
        last = str(self.last_checkpoint) if self.last_checkpoint else "none saved yet"
        return NonFiniteError(
            f"non-finite value at step {step}: {detail}; training stopped, no update was "
            f"applied and nothing was written. Last good checkpoint: {last}"
        )

    def evaluate(self, batches: Iterable[Batch]) -> dict[str, Any]:
        """Token-weighted mean loss over held-out batches (no backward, no update).

        -> {"val_loss" (CE + aux), "val_ce", "val_aux", "val_experts" (the expert
        telemetry of all the batches' routing, ``nn_core.training.telemetry``)}. With
        ``group``, every rank is given the same batches and evaluates every R-th (rank r:
        batches r, r + R, ...); the sums are reduced over ranks, so every rank returns the
        result of all batches.
        """
        from .distributed import pack_stats, sum_stats, unpack_stats
        from .telemetry import empty_routing_stats, expert_telemetry

        sums = np.zeros(3)
        tokens = 0
        group = self.group
        routed = empty_routing_stats(self.model.config)  # summed over the batches
        for i, (inputs, targets) in enumerate(batches):
            if group is not None and i % group.size != group.rank:
                continue
            n = int(np.asarray(inputs).size)
            state = self.model.forward_loss(inputs, targets, self.config.aux_loss_weight)
            sums += n * np.array(state.terms, np.float64)
            routed = sum_stats(routed, state.routing_stats())
            tokens += n
        if group is not None:  # token-weighted sums, token counts, routing of all ranks
            totals = group.allreduce_sum(np.append(sums, float(tokens)))
            sums, tokens = totals[:3], int(round(totals[3]))
            packed = group.allreduce_sum(pack_stats(routed, 0.0))
            routed = unpack_stats(packed, len(routed))[0]
        if tokens == 0:
            raise InputError("eval_batches is empty")
        loss, ce, aux = (float(x) for x in sums / tokens)
        experts = expert_telemetry(routed).as_dict()
        return {"val_loss": loss, "val_ce": ce, "val_aux": aux, "val_experts": experts}

    # ---- many steps --------------------------------------------------------------------
    def fit(
        self,
        batches: Any,
        steps: int,
        *,
        eval_batches: Iterable[Batch] | Callable[[], Iterable[Batch]] | None = None,
        metrics_path: str | os.PathLike[str] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> list[dict[str, float]]:
        """Run ``steps`` more updates; return their metrics (one dict per update).

        ``batches``: a sampler with ``next_batch()`` (e.g. ``text.BatchSampler``), an
        iterator or iterable of (inputs, targets), or a zero-argument callable returning
        one. If it runs out early, training stops there with a warning. A sampler with
        ``state_dict``/``load_state_dict`` becomes the trainer's ``data_source`` when none
        was given, so its position is checkpointed.

        Each update appends one JSON line to ``metrics_path`` (default
        ``out_dir/metrics.jsonl``): step, loss, ce, aux, grad_norm, lr, tokens_per_sec,
        experts (``nn_core.training.telemetry``),
        plus val_loss/val_ce/val_aux/val_experts after every ``eval_interval`` updates when
        ``eval_batches`` is given (a re-iterable collection, or a callable returning a
        fresh iterable). A checkpoint is saved to ``checkpoint_dir`` (default ``out_dir``;
        none if both are None) after every ``checkpoint_interval`` updates and always
        at the end. The tqdm bar (stderr) shows loss, tokens/s, the worst layer's max/min
        expert load and the ETA.

        The run directory is created if absent (its parent must exist) and must otherwise
        be empty or an nn-core run directory (``nn_core.storage.ownership``); it is locked for the
        whole call, so a second writer (process or thread) gets ``InUseError`` at once.
        """
        check_int(steps, "steps", 0, error=InputError)
        next_batch = _batch_stream(batches)  # a bad argument fails before anything is written
        if self.data_source is None and _has_state(batches):
            self.data_source = batches
        get_eval: Callable[[], Iterable[Batch]] | None = None
        if eval_batches is not None:
            if callable(eval_batches):
                get_eval = eval_batches
            else:
                held_out = list(eval_batches)
                get_eval = lambda: held_out  # noqa: E731
        if metrics_path is None and self.out_dir is not None:
            metrics_path = self.out_dir / "metrics.jsonl"
        run_dir = Path(checkpoint_dir) if checkpoint_dir is not None else self.out_dir
        if self.group is not None and self.group.rank != 0:  # rank 0 alone writes
            metrics_path, run_dir, progress = None, None, False
        with contextlib.ExitStack() as stack:
            if run_dir is not None:  # created if absent; locked: one writer per run directory
                from ..storage.ownership import run_dir_writer

                stack.enter_context(run_dir_writer(run_dir))
            return self._fit(next_batch, steps, get_eval, metrics_path, run_dir, progress)

    def _fit(
        self,
        next_batch: Callable[[], Batch],
        steps: int,
        get_eval: Callable[[], Iterable[Batch]] | None,
        metrics_path: str | os.PathLike[str] | None,
        run_dir: Path | None,
        progress: bool,
    ) -> list[dict[str, float]]:
        from tqdm.auto import tqdm

        from .telemetry import worst_max_min

        cfg = self.config
        history: list[dict[str, float]] = []
        saved_at = -1  # step of the newest checkpoint written by this call
        metrics_file = None
        bar = tqdm(total=steps, desc="train", unit="step", file=sys.stderr, disable=not progress)
        try:
            if metrics_path is not None:
                if not Path(metrics_path).parent.is_dir():
                    raise OutputError(
                        f"cannot write metrics file {metrics_path}: its directory does not exist"
                    )
                metrics_file = open(metrics_path, "a", encoding="utf-8")  # noqa: SIM115
            self._check_in_sync(force=True)  # every rank starts from the same parameters
            for _ in range(steps):
                try:
                    inputs, targets = next_batch()
                except StopIteration:
                    warnings.warn(
                        f"batches ran out after {len(history)} of {steps} steps; "
                        "training stopped early",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    break
                start = time.perf_counter()
                metrics: dict[str, Any] = self.train_step(inputs, targets)
                elapsed = time.perf_counter() - start
                metrics["experts"] = self.expert_telemetry().as_dict()
                metrics["tokens_per_sec"] = np.asarray(inputs).size / max(elapsed, 1e-12)
                if self.group is not None:  # data parallelism: the collectives' share
                    metrics["comm_seconds"], metrics["step_seconds"] = self.comm_seconds, elapsed
                if (
                    get_eval is not None
                    and cfg.eval_interval
                    and self.step % cfg.eval_interval == 0
                ):
                    metrics.update(self.evaluate(get_eval()))
                history.append(metrics)
                if metrics_file is not None:
                    try:
                        metrics_file.write(json.dumps(metrics) + "\n")
                        metrics_file.flush()
                    except OSError as exc:  # e.g. a full disk: name the file
                        raise OSError(exc.errno, exc.strerror, str(metrics_path)) from exc
                interval = cfg.checkpoint_interval
                self._check_in_sync(force=bool(interval) and self.step % interval == 0)
                if run_dir is not None and interval and self.step % interval == 0:
                    self.save_checkpoint(run_dir)
                    saved_at = self.step
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}",
                    tok_s=f"{metrics['tokens_per_sec']:.0f}",
                    max_min=f"{worst_max_min(metrics['experts']):.2f}",  # worst layer's load
                    refresh=False,
                )
                bar.update(1)
            self._check_in_sync(force=True)
            if run_dir is not None and history and saved_at != self.step:
                self.save_checkpoint(run_dir)  # always at the end
        finally:
            bar.close()
            if metrics_file is not None:
                with contextlib.suppress(OSError):  # the error that got here is the one to see
                    metrics_file.close()
        return history

    def _check_in_sync(self, force: bool) -> None:
        """With ``group``: every SYNC_CHECK_INTERVAL updates, before every checkpoint and
        at the start and end of ``fit``, compare a hash of the parameters across ranks
        (``distributed.check_in_sync``: DistributedError on every rank if they differ)."""
        if self.group is None:
            return
        from .distributed import SYNC_CHECK_INTERVAL, check_in_sync

        if force or self.step % SYNC_CHECK_INTERVAL == 0:
            check_in_sync(self.group, self.model.flat_params, self.step)

    # ---- checkpoints -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The JSON part of the training state (state.json, without file hashes)."""
        data_state = None if self.data_source is None else self.data_source.state_dict()
        return {
            "train_config": self.config.to_dict(),
            "step": self.step,
            "optimizer": {"type": "AdamW", "t": self.optimizer.t},
            "rng_state": self.rng.bit_generator.state,
            "data_state": data_state,
        }

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write everything (weights, m, v, step, configs, RNG and data state) to directory
        ``path``, atomically. ``path`` must be absent, empty or an nn-core training
        checkpoint (replaced); another nn-core directory only with ``overwrite=True``;
        anything else never. See ``nn_core.storage.checkpoint``."""
        from ..storage.checkpoint import save_training_checkpoint

        out = save_training_checkpoint(
            path,
            self.model,
            self.optimizer.m,
            self.optimizer.v,
            self.state(),
            overwrite=overwrite,
        )
        self.last_checkpoint = out
        return out

    def save_checkpoint(self, run_dir: str | os.PathLike[str] | None = None) -> Path:
        """Save to ``run_dir/step_XXXXXX``, point ``run_dir/latest`` at it, then keep the
        newest ``keep_checkpoints`` step checkpoints. ``run_dir`` defaults to ``out_dir``;
        it is created if absent and locked while writing (see ``fit``)."""
        from ..storage.checkpoint import prune_checkpoints, step_dir_name, update_latest
        from ..storage.ownership import run_dir_writer

        target_dir = Path(run_dir) if run_dir is not None else self.out_dir
        if target_dir is None:
            raise InputError("save_checkpoint needs run_dir (or the trainer's out_dir)")
        with run_dir_writer(target_dir):
            path = self.save(target_dir / step_dir_name(self.step))
            update_latest(target_dir, path.name)
            prune_checkpoints(target_dir, self.config.keep_checkpoints)
        return path

    @classmethod
    def resume(
        cls,
        path: str | os.PathLike[str],
        *,
        data_source: DataSource | None = None,
        out_dir: str | os.PathLike[str] | None = None,
        config: Config | None = None,
    ) -> Trainer:
        """Rebuild a trainer from a checkpoint directory, or a run directory's ``latest``.

        Restores weights, m, v, t, step, TrainConfig, the RNG state and (into
        ``data_source``, if given) the data state: the resumed trainer continues exactly
        as the saved one would have. ``config`` (a model Config), if given, must equal
        the checkpoint's, else CheckpointError.
        """
        from ..storage.checkpoint import load_training_checkpoint

        ckpt = load_training_checkpoint(path, config=config)  # every field range-checked
        state = ckpt.state
        try:
            train_config = TrainConfig.from_dict(state["train_config"])
        except (ConfigError, TypeError) as exc:
            raise CheckpointError(f"{ckpt.path}: invalid train_config: {exc}") from None
        trainer = cls(ckpt.model, train_config, out_dir=out_dir, data_source=data_source)
        trainer.step = state["step"]
        trainer.rng.bit_generator.state = state["rng_state"]
        t = state["optimizer"]["t"]
        trainer.optimizer.load_state_dict({"m": ckpt.m, "v": ckpt.v, "t": t})
        if data_source is not None:
            if state["data_state"] is None:
                raise CheckpointError(
                    f"{ckpt.path}: the checkpoint holds no data state, but data_source was given"
                )
            data_source.load_state_dict(state["data_state"])
        trainer.last_checkpoint = ckpt.path
        return trainer
