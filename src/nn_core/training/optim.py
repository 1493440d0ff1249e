"""The optimizer side of training: LR schedule, AdamW, global-norm gradient clipping.

Shape legend: P = total number of parameters (the flat buffers).

Step convention (used everywhere: schedule, optimizer, metrics, checkpoints)
    ``trainer.step`` counts the updates applied so far. The update with 0-based index
    t (``trainer.step == t`` before it) uses ``lr = get_lr(t, cfg)`` and AdamW
    bias-correction count ``t + 1``; afterwards ``trainer.step == t + 1``.

The optimizer works on the model's flat buffers (``flat_params`` / ``flat_grads``, P
elements) and keeps its moments m and v in two more flat buffers of the same layout
and dtype, so one update is a handful of vectorized calls whatever the number of
tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..checks import check_int
from ..errors import InputError
from .config import TrainConfig

if TYPE_CHECKING:
    from ..model.transformer import MoETransformer

MIN_LR_RATIO = 0.1  # LR schedule: min_lr = 0.1 * lr
CLIP_EPS = 1e-12  # Gradient clipping: g *= clip / (norm + 1e-12)
BLOCK_BYTES = 256 * 1024  # elementwise passes run over blocks of this many bytes per buffer


# ---- LR schedule -----------------------------------------------------------------------


def get_lr(step: int, cfg: TrainConfig) -> float:
    """LR schedule: the learning rate of the update with 0-based index ``step``.

    Linear warmup: lr_t = lr * t / warmup_steps for t < warmup_steps (so update 0 has
    lr 0 and update ``warmup_steps`` is the first at the full lr). Then cosine:
    lr_t = min_lr + 0.5 (lr - min_lr)(1 + cos(pi * progress)),
    progress = (t - warmup_steps) / (total_steps - warmup_steps), min_lr = 0.1 * lr;
    t >= total_steps gives min_lr.
    """
    check_int(step, "step", 0, error=InputError)
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
    grad_scale: float = 1.0,
) -> None:
    """One AdamW step in place over flat buffers [P] (the plain-NumPy reference kernel).

    The AdamW formula (docs/training.md, section 4):
        m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
        m_hat = m / (1 - b1^t);  v_hat = v / (1 - b2^t)
        w -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * w)
    computed in the algebraically equal form (one division per element instead of three):
        w = w * (1 - lr wd) - (lr sqrt(bc2) / bc1) * m / (sqrt(v) + eps sqrt(bc2)),
    bc1 = 1 - b1^t, bc2 = 1 - b2^t; it agrees with the formula above to rounding.

    ``t`` is the 1-based update count. ``grad_scale`` != 1 first scales the gradients in
    place, g *= grad_scale (the clipping factor, ``clip_factor``). The buffers are walked
    in blocks of BLOCK_BYTES so each block's ~13 passes stay in L2, with one block-sized
    scratch buffer and no P-sized temporaries. Arithmetic is in the buffers' dtype
    (Python-float constants do not upcast float32, NEP 50). A compiled kernel with this
    signature can replace it (``AdamW(update_fn=...)``).
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
        if grad_scale != 1.0:
            g *= grad_scale  # Gradient clipping: g *= clip / (norm + 1e-12)
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
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, float, float, float, float, int, float],
    None,
]


class AdamW:
    """AdamW over one flat parameter buffer and its flat gradient buffer (both [P]).

    ``m`` and ``v`` are flat buffers of the same layout and dtype; ``t`` counts the
    updates applied (the bias-correction exponent of the next update is ``t + 1``).
    Weight decay applies to every parameter, gains and embedding included
    (docs/training.md, section 4).
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

    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        """Apply one update with learning rate ``lr`` from the current gradients, first
        scaled in place by ``grad_scale`` (the clipping factor, ``clip_factor``)."""
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
            float(grad_scale),
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


def clip_factor(norm: float, max_norm: float) -> float:
    """Gradient clipping: the factor the gradients are multiplied by, clip / (norm + 1e-12)
    if norm > clip, else 1 (also for a non-finite norm: such a step is refused)."""
    if math.isfinite(norm) and norm > max_norm:
        return max_norm / (norm + CLIP_EPS)
    return 1.0


def clip_grad_norm(
    flat_grads: np.ndarray,
    max_norm: float,
    norm_fn: Callable[[np.ndarray], float] = global_norm,
) -> float:
    """Gradient clipping over all gradients at once; returns the norm BEFORE clipping.

    docs/training.md, section 3: if norm > clip: g *= clip / (norm + 1e-12). The norm is
    accumulated in float64 (``global_norm``). A non-finite norm leaves the gradients
    untouched (the trainer refuses the step). The trainer does not call this: it takes
    the same ``clip_factor`` and lets the AdamW pass apply it (``AdamW.step``).
    """
    norm = norm_fn(flat_grads)
    factor = clip_factor(norm, max_norm)
    if factor != 1.0:
        flat_grads *= factor
    return norm
