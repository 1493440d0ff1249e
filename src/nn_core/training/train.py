"""Training (SPEC.md section 3): LR schedule, AdamW, gradient clipping, the Trainer.

Shape legend: B batch, S sequence, P = total number of parameters (the flat buffers).

Step convention (used everywhere: schedule, optimizer, metrics, checkpoints)
    ``trainer.step`` counts the updates applied so far. The update with 0-based index
    t (``trainer.step == t`` before it) uses ``lr = get_lr(t, cfg)`` and AdamW
    bias-correction count ``t + 1``; afterwards ``trainer.step == t + 1``. A metrics
    line with ``"step": t`` describes that update (its ``loss`` is the loss of the batch
    before the update, its ``lr`` is ``get_lr(t)``). A checkpoint ``step_000100`` holds
    the state after 100 updates; resuming from it applies update 100 next.

The optimizer works on the model's flat buffers (``flat_params`` / ``flat_grads``, P
elements) and keeps its moments m and v in two more flat buffers of the same layout
and dtype, so one update is a handful of vectorized calls whatever the number of
tensors.
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import CheckpointError, ConfigError, InputError, NonFiniteError, OutputError
from ..model.config import Config, DictConfig

if TYPE_CHECKING:
    from ..model.transformer import MoETransformer

MIN_LR_RATIO = 0.1  # LR schedule: min_lr = 0.1 * lr (SPEC.md section 3)
CLIP_EPS = 1e-12  # Gradient clipping: g *= clip / (norm + 1e-12)
KERNELS = ("numpy", "numba")  # TrainConfig.kernels: reference NumPy or fused Numba passes
BLOCK_BYTES = 256 * 1024  # elementwise passes run over blocks of this many bytes per buffer

Batch = tuple[np.ndarray, np.ndarray]  # (token_ids [B, S], targets [B, S])


# ---- config ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig(DictConfig):
    """Training hyper-parameters; SPEC.md section 3 defaults. Validated on construction."""

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
    weight_decay: float = 0.1  # decoupled weight decay, applied to every parameter (SPEC)
    activation_checkpointing: bool = False  # recompute block internals in the backward
    eval_interval: int = 500  # evaluate after every this many updates (0: never)
    checkpoint_interval: int = 1000  # checkpoint after every this many updates (0: end only)
    keep_checkpoints: int = 3  # newest step checkpoints kept in a run directory
    seed: int = 42  # seed of the trainer's np.random.Generator (saved with checkpoints)
    kernels: str = "numpy"  # AdamW and gradient norm: "numpy" (reference) or "numba" (fused)

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
        }
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"{name} must be an int, got {value!r}")
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        if self.kernels not in KERNELS:
            raise ConfigError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.warmup_steps >= self.total_steps:
            raise ConfigError(
                f"warmup_steps must be < total_steps ({self.total_steps}), got {self.warmup_steps}"
            )
        floats = {  # name -> (low, high, low inclusive, high inclusive, description)
            "lr": (0.0, math.inf, False, False, "(0, inf)"),
            "grad_clip": (0.0, math.inf, False, True, "(0, inf]"),
            "aux_loss_weight": (0.0, math.inf, True, False, "[0, inf)"),
            "beta1": (0.0, 1.0, True, False, "[0, 1)"),
            "beta2": (0.0, 1.0, True, False, "[0, 1)"),
            "eps": (0.0, math.inf, False, False, "(0, inf)"),
            "weight_decay": (0.0, math.inf, True, False, "[0, inf)"),
        }
        for name, (lo, hi, lo_ok, hi_ok, desc) in floats.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            above = value > lo or (lo_ok and value == lo)
            below = value < hi or (hi_ok and value == hi)
            if math.isnan(value) or not (above and below):
                raise ConfigError(f"{name} must be in {desc}, got {value}")
        if not isinstance(self.activation_checkpointing, bool):
            raise ConfigError(
                f"activation_checkpointing must be a bool, got {self.activation_checkpointing!r}"
            )


# ---- LR schedule -----------------------------------------------------------------------


def get_lr(step: int, cfg: TrainConfig) -> float:
    """LR schedule: the learning rate of the update with 0-based index ``step``.

    Linear warmup: lr_t = lr * t / warmup_steps for t < warmup_steps (so update 0 has
    lr 0 and update ``warmup_steps`` is the first at the full lr). Then cosine:
    lr_t = min_lr + 0.5 (lr - min_lr)(1 + cos(pi * progress)),
    progress = (t - warmup_steps) / (total_steps - warmup_steps), min_lr = 0.1 * lr;
    t >= total_steps gives min_lr.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise InputError(f"step must be an int >= 0, got {step!r}")
    lr, warmup, total = cfg.lr, cfg.warmup_steps, cfg.total_steps
    if step < warmup:
        return lr * step / warmup
    min_lr = MIN_LR_RATIO * lr
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# ---- AdamW -----------------------------------------------------------------------------


def _block_len(buffer: np.ndarray) -> int:
    return max(1, BLOCK_BYTES // buffer.itemsize)


def adamw_update(
    params: np.ndarray,
    grads: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    wd: float,
    t: int,
) -> None:
    """One AdamW step in place over flat buffers [P] (the plain-NumPy reference kernel).

    SPEC.md section 3:
        m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
        m_hat = m / (1 - b1^t);  v_hat = v / (1 - b2^t)
        w -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * w)
    computed in the algebraically equal form (one division per element instead of three):
        w = w * (1 - lr wd) - (lr sqrt(bc2) / bc1) * m / (sqrt(v) + eps sqrt(bc2)),
    bc1 = 1 - b1^t, bc2 = 1 - b2^t; it agrees with the formula above to rounding.

    ``t`` is the 1-based update count. The buffers are walked in blocks of BLOCK_BYTES
    so each block's ~13 passes stay in L2, with one block-sized scratch buffer and no
    P-sized temporaries. Arithmetic is in the buffers' dtype (Python-float constants do
    not upcast float32, NEP 50). A compiled kernel with this signature can replace it
    (``AdamW(update_fn=...)``).
    """
    bc1 = 1.0 - beta1**t  # bias corrections
    bc2 = 1.0 - beta2**t
    sqrt_bc2 = math.sqrt(bc2)
    step_size = lr * sqrt_bc2 / bc1  # lr / bc1, with v_hat's sqrt(1/bc2) moved here
    eps_hat = eps * sqrt_bc2  # sqrt(v_hat) + eps = (sqrt(v) + eps sqrt(bc2)) / sqrt(bc2)
    decay = 1.0 - lr * wd  # decoupled weight decay: w -= lr * wd * w
    one_m_b1, one_m_b2 = 1.0 - beta1, 1.0 - beta2
    n = params.size
    block = _block_len(params)
    scratch = np.empty(min(block, n), dtype=params.dtype)
    for start in range(0, n, block):
        end = min(start + block, n)
        w, g, mb, vb = params[start:end], grads[start:end], m[start:end], v[start:end]
        tmp = scratch[: end - start]
        mb *= beta1  # m = b1 m + (1-b1) g
        np.multiply(g, one_m_b1, out=tmp)
        mb += tmp
        vb *= beta2  # v = b2 v + (1-b2) g^2
        np.multiply(g, g, out=tmp)
        tmp *= one_m_b2
        vb += tmp
        np.sqrt(vb, out=tmp)  # m_hat / (sqrt(v_hat) + eps), scaled by lr
        tmp += eps_hat
        np.divide(mb, tmp, out=tmp)
        tmp *= step_size
        w *= decay  # w -= lr * (... + wd * w)
        w -= tmp


UpdateFn = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, float, float, float, float, int],
    None,
]


class AdamW:
    """AdamW over one flat parameter buffer and its flat gradient buffer (both [P]).

    ``m`` and ``v`` are flat buffers of the same layout and dtype; ``t`` counts the
    updates applied (the bias-correction exponent of the next update is ``t + 1``).
    Weight decay applies to every parameter, gains and embedding included (SPEC.md).
    """

    def __init__(
        self,
        params: np.ndarray,
        grads: np.ndarray,
        *,
        beta1: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        update_fn: UpdateFn = adamw_update,
    ) -> None:
        for name, buf in (("params", params), ("grads", grads)):
            if not isinstance(buf, np.ndarray) or buf.ndim != 1 or not buf.flags.c_contiguous:
                raise InputError(f"{name} must be a contiguous 1-D ndarray (a flat buffer)")
            if buf.dtype not in (np.float32, np.float64):
                raise InputError(f"{name} must be float32 or float64, got {buf.dtype}")
        if grads.shape != params.shape or grads.dtype != params.dtype:
            raise InputError(
                f"grads must match params: got {grads.dtype}{grads.shape}, "
                f"params {params.dtype}{params.shape}"
            )
        self.params = params  # [P]
        self.grads = grads  # [P]
        self.m = np.zeros_like(params)  # [P] first moment
        self.v = np.zeros_like(params)  # [P] second moment
        self.t = 0
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.update_fn = update_fn

    @classmethod
    def for_model(cls, model: MoETransformer, cfg: TrainConfig, **kwargs: Any) -> AdamW:
        return cls(
            model.flat_params,
            model.flat_grads,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            **kwargs,
        )

    def step(self, lr: float) -> None:
        """Apply one update with learning rate ``lr`` from the current gradients."""
        self.t += 1
        self.update_fn(
            self.params,
            self.grads,
            self.m,
            self.v,
            float(lr),
            self.beta1,
            self.beta2,
            self.eps,
            self.weight_decay,
            self.t,
        )

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state: copies of m and v [P] and the update count t."""
        return {"m": self.m.copy(), "v": self.v.copy(), "t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("m", "v"):
            arr = np.asarray(state[key])
            if arr.shape != self.params.shape or arr.dtype != self.params.dtype:
                raise InputError(
                    f"optimizer state {key} must be {self.params.dtype}{self.params.shape}, "
                    f"got {arr.dtype}{arr.shape}"
                )
        np.copyto(self.m, state["m"])
        np.copyto(self.v, state["v"])
        self.t = int(state["t"])


# ---- gradient clipping -----------------------------------------------------------------


def global_norm(flat: np.ndarray) -> float:
    """L2 norm of a flat buffer, accumulated in float64 whatever the buffer's dtype.

    Blocks are copied into a float64 scratch buffer, squared and summed (NumPy's
    pairwise sum: deterministic, independent of BLAS threads); float32 squares cannot
    overflow in float64, so the norm is infinite or NaN only if an entry is.
    """
    block = _block_len(flat)
    scratch = np.empty(min(block, flat.size), dtype=np.float64)
    total = 0.0
    for start in range(0, flat.size, block):
        tmp = scratch[: min(block, flat.size - start)]
        np.copyto(tmp, flat[start : start + block])
        np.multiply(tmp, tmp, out=tmp)
        total += float(np.add.reduce(tmp))
    return math.sqrt(total)


def clip_grad_norm(
    flat_grads: np.ndarray,
    max_norm: float,
    norm_fn: Callable[[np.ndarray], float] = global_norm,
) -> float:
    """Gradient clipping over all gradients at once; returns the norm BEFORE clipping.

    SPEC.md: if norm > clip: g *= clip / (norm + 1e-12). The norm is accumulated in
    float64 (``global_norm``). A non-finite norm leaves the gradients untouched (the
    trainer refuses the step).
    """
    norm = norm_fn(flat_grads)
    if math.isfinite(norm) and norm > max_norm:
        flat_grads *= max_norm / (norm + CLIP_EPS)
    return norm


# ---- trainer ---------------------------------------------------------------------------


class DataSource(Protocol):
    """A batch source whose position can be saved (e.g. ``nn_core.data.text.BatchSampler``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _has_state(obj: object) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


def _batch_stream(batches: Any) -> Callable[[], Batch]:
    """A zero-argument function returning the next (inputs, targets); StopIteration at end."""
    if callable(getattr(batches, "next_batch", None)):  # nn_core.data.text.BatchSampler
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
    ``load_state_dict``, e.g. ``nn_core.data.text.BatchSampler``) has its state saved with
    every checkpoint and restored by ``Trainer.resume``.
    """

    def __init__(
        self,
        model: MoETransformer,
        train_config: TrainConfig | None = None,
        *,
        out_dir: str | os.PathLike[str] | None = None,
        data_source: DataSource | None = None,
    ) -> None:
        cfg = TrainConfig() if train_config is None else train_config
        if not isinstance(cfg, TrainConfig):
            raise ConfigError(f"train_config must be a TrainConfig, got {type(cfg).__name__}")
        for attr in ("flat_params", "flat_grads", "loss_terms_and_grad", "parameters"):
            if not hasattr(model, attr):
                raise InputError(f"model must be an nn_core.MoETransformer (no .{attr})")
        if data_source is not None and not _has_state(data_source):
            raise InputError("data_source must have state_dict() and load_state_dict()")
        self.model = model
        self.config = cfg
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
            terms = self.model.loss_terms_and_grad(
                token_ids,
                targets,
                cfg.aux_loss_weight,
                activation_checkpointing=cfg.activation_checkpointing,
            )
        except FloatingPointError as exc:  # a model running under np.errstate(raise)
            raise self._non_finite(t, f"floating-point error ({exc})") from exc
        total, ce, aux = (float(x) for x in terms)
        grad_norm = clip_grad_norm(self.model.flat_grads, cfg.grad_clip, self._global_norm)
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            raise self._non_finite(t, f"loss={total!r}, grad_norm={grad_norm!r}")
        self.optimizer.step(lr)
        self.step = t + 1
        return {"step": t, "loss": total, "ce": ce, "aux": aux, "grad_norm": grad_norm, "lr": lr}

    def _non_finite(self, step: int, detail: str) -> NonFiniteError:
        last = str(self.last_checkpoint) if self.last_checkpoint else "none saved yet"
        return NonFiniteError(
            f"non-finite value at step {step}: {detail}; training stopped, no update was "
            f"applied and nothing was written. Last good checkpoint: {last}"
        )

    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Token-weighted mean loss over held-out batches (no backward, no update).

        -> {"val_loss" (CE + aux), "val_ce", "val_aux"}.
        """
        sums = np.zeros(3)
        tokens = 0
        for inputs, targets in batches:
            n = int(np.asarray(inputs).size)
            sums += n * np.array(
                self.model.loss_terms(inputs, targets, self.config.aux_loss_weight), np.float64
            )
            tokens += n
        if tokens == 0:
            raise InputError("eval_batches is empty")
        loss, ce, aux = (float(x) for x in sums / tokens)
        return {"val_loss": loss, "val_ce": ce, "val_aux": aux}

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
        plus val_loss/val_ce/val_aux after every ``eval_interval`` updates when
        ``eval_batches`` is given (a re-iterable collection, or a callable returning a
        fresh iterable). A checkpoint is saved to ``checkpoint_dir`` (default ``out_dir``;
        none if both are None) after every ``checkpoint_interval`` updates and always
        at the end. The tqdm bar (stderr) shows loss, tokens/s and the ETA.

        The run directory is created if absent (its parent must exist) and must otherwise
        be empty or an nn-core run directory (``nn_core.storage.ownership``); it is locked for the
        whole call, so a second writer (process or thread) gets ``InUseError`` at once.
        """
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise InputError(f"steps must be an int >= 0, got {steps!r}")
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
                metrics = self.train_step(inputs, targets)
                elapsed = time.perf_counter() - start
                metrics["tokens_per_sec"] = np.asarray(inputs).size / max(elapsed, 1e-12)
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
                if run_dir is not None and interval and self.step % interval == 0:
                    self.save_checkpoint(run_dir)
                    saved_at = self.step
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}",
                    tok_s=f"{metrics['tokens_per_sec']:.0f}",
                    refresh=False,
                )
                bar.update(1)
            if run_dir is not None and history and saved_at != self.step:
                self.save_checkpoint(run_dir)  # always at the end
        finally:
            bar.close()
            if metrics_file is not None:
                with contextlib.suppress(OSError):  # the error that got here is the one to see
                    metrics_file.close()
        return history

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
        train_config = TrainConfig.from_dict(state["train_config"])
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
