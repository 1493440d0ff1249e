"""Token sampling: greedy, temperature, top-k, top-p (nucleus), min-p, repetition penalty.

As in llama2.c's ``run.c``: a few small pure functions on rows of logits
(``sample_argmax``, ``softmax64``, ``renormalize_over``, ``sample_mult``, ``top_k_mask``,
``top_p_mask``) behind one dispatcher, ``SamplingStrategy.pick_tokens``. Each strategy is a frozen
dataclass that rejects bad parameters on construction (ConfigError).

The distribution a strategy samples from is public: ``strategy.probs(logits)`` returns
it as float64 probabilities (rows sum to 1), and ``pick_tokens`` draws by inverse CDF
over exactly that function's output -- one implementation, so the distribution can be
checked against a direct formula and the draws against the distribution:
- Temperature(t): p = softmax(logits / t).
- TopK(k, t): softmax(logits / t) over the k highest logits, 0 elsewhere.
- TopP(p, t): q = softmax(logits / t); the nucleus is the smallest set of most probable
  ids whose mass under q reaches p; q renormalized over the nucleus, 0 elsewhere.
- MinP(p_min, t): q = softmax(logits / t); keep the ids with q_i >= p_min * max_j q_j,
  renormalized over them, 0 elsewhere (the most probable id is always kept).
- RepetitionPenalty(penalty, base): every id already in the context (``history``) has
  its logit x replaced by x / penalty when x > 0 and x * penalty otherwise (so
  penalty > 1 makes repeats less likely), then ``base`` samples from the result.
- Greedy, and any strategy at temperature 0: a one-hot on the argmax.
Ties: the lower id wins (argmax, the top-k boundary, the order of the nucleus).

Randomness and reproducibility:
- Every draw comes from the ``np.random.Generator`` passed in; there is no global state.
- A stochastic strategy draws exactly ONE uniform per row, in row order
  (``rng.random(B)``), and turns it into a token by inverse CDF over the row of
  ``probs``. So ``pick_tokens`` on a batch returns the same tokens as
  ``pick_token`` row by row with a generator in the same state.
- Temperature 0 means greedy (argmax, lowest id on ties) and draws nothing.
- Probabilities are computed in float64, with the row max subtracted before scaling.

Logits may contain -inf (masked tokens); NaN, +inf or a row that is entirely -inf
raise InputError.

Shape legend: B batch rows, V vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..checks import check_int, check_number
from ..errors import ConfigError, InputError
from ..model.tensor import softmax

STRATEGY_NAMES = ("greedy", "temperature", "sample", "top_k", "top_p", "min_p")


# ---- small pure functions on [B, V] float64 logits -------------------------------------


def check_logits(logits: ArrayLike, ndim: int, *, values: bool = True) -> NDArray[np.floating]:
    """Validate logits ([V] when ndim=1, [B, V] when ndim=2); return them as a float array.

    Float logits come back as they are (no copy: greedy needs no float64); integer
    logits as float64. The values cost one reduction to check: every row's max is
    finite exactly when there is no NaN (it propagates into the max), no +inf, and no
    row that is entirely -inf. Only a failing check pays for naming the problem.
    ``values=False`` checks shape and dtype only (``sample_argmax`` checks the values
    it picks, which is the same check).
    """
    arr = np.asarray(logits)
    want = "[V]" if ndim == 1 else "[B, V]"
    if arr.ndim != ndim:
        raise InputError(f"logits must be {ndim}-D {want}, got shape {arr.shape}")
    if arr.size == 0:
        raise InputError(f"logits must be non-empty {want}, got shape {arr.shape}")
    if arr.dtype.kind != "f":
        if arr.dtype.kind not in "iu":
            raise InputError(f"logits must be a real-valued array, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    if values and not np.isfinite(arr.max(axis=-1)).all():
        _raise_non_finite(arr)
    return arr


def _raise_non_finite(x: NDArray[np.floating]) -> None:
    """The specific error for logits whose row maxima are not all finite."""
    if np.isnan(x).any():
        raise InputError("logits contain NaN; cannot sample from them")
    if np.isposinf(x).any():
        raise InputError("logits contain +inf; cannot sample from them")
    raise InputError("a logits row is entirely -inf: no token has nonzero probability")


def sample_argmax(logits: NDArray[np.floating]) -> NDArray[np.int64]:
    """Greedy: [B, V] -> [B], the highest logit (lowest id on ties).

    Also the value check of ``check_logits``, at the cost of reading the picked logits:
    argmax picks a row's first NaN if it has one, else its +inf if it has one, else -inf
    only when the whole row is -inf; so the picks are all finite exactly when every
    row's max is.
    """
    ids = np.argmax(logits, axis=-1).astype(np.int64, copy=False)  # [B]
    if logits.shape[0] == 1:  # one row: a scalar read
        ok = math.isfinite(logits[0, ids[0]])
    else:
        ok = bool(np.isfinite(logits[np.arange(logits.shape[0]), ids]).all())
    if not ok:
        _raise_non_finite(logits)
    return ids


def softmax64(logits: NDArray[np.float64], temperature: float) -> NDArray[np.float64]:
    """[B, V] -> [B, V] float64 probabilities of logits / temperature (temperature > 0):
    the model's softmax (``nn_core.model.tensor.softmax``) of the scaled logits; a
    masked (-inf) logit gets probability 0."""
    return softmax(logits / temperature, axis=-1)


def renormalize_over(q: NDArray[np.float64], keep: NDArray[np.bool_]) -> NDArray[np.float64]:
    """[B, V] probabilities q renormalized over the ids ``keep`` marks, 0 elsewhere:
    q_i / sum_{j kept} q_j (every row keeps at least one id)."""
    kept = np.where(keep, q, 0.0)  # [B, V]
    return kept / kept.sum(axis=-1, keepdims=True)


def sample_mult(probs: NDArray[np.float64], u: NDArray[np.float64]) -> NDArray[np.int64]:
    """Inverse CDF: [B, V] weights (need not sum to 1), [B] uniforms in [0, 1) -> [B] ids.

    Row b picks the first id whose cumulative weight exceeds u[b] * total weight.
    """
    cdf = np.cumsum(probs, axis=-1)  # [B, V]
    target = u * cdf[:, -1]  # [B]
    idx = np.count_nonzero(cdf <= target[:, None], axis=-1)  # [B] = searchsorted(.., 'right')
    # u * total may round up to total: fall back to the last id with nonzero weight
    last = probs.shape[-1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)  # [B]
    return np.minimum(idx, last).astype(np.int64)


def top_k_mask(logits: NDArray[np.float64], k: int) -> NDArray[np.bool_]:
    """[B, V] -> [B, V] bool, True for the k highest logits of each row (k clamped to V).

    Ties at the boundary go to the lower id (stable sort), so k=1 agrees with argmax.
    """
    k = min(k, logits.shape[-1])
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :k]  # [B, k] ids, best first
    keep = np.zeros(logits.shape, dtype=np.bool_)  # [B, V]
    np.put_along_axis(keep, order, True, axis=-1)
    return keep


def top_p_mask(probs: NDArray[np.float64], p: float) -> NDArray[np.bool_]:
    """[B, V] -> [B, V] bool: the nucleus, the smallest set of most-probable ids whose
    probability reaches p (the most probable id is always kept; p = 1 keeps all).

    Ids are ranked by probability, the lower id first on ties; an id is kept when the
    mass of the ids ranked before it is still below p.
    """
    if p >= 1.0:
        return np.ones(probs.shape, dtype=np.bool_)
    order = np.argsort(-probs, axis=-1, kind="stable")  # [B, V] ids, most probable first
    sorted_p = np.take_along_axis(probs, order, axis=-1)  # [B, V]
    mass_before = np.zeros_like(sorted_p)  # [B, V] mass strictly ahead, as a running sum
    np.cumsum(sorted_p[:, :-1], axis=-1, out=mass_before[:, 1:])
    keep = np.empty(probs.shape, dtype=np.bool_)  # [B, V]
    np.put_along_axis(keep, order, mass_before < p, axis=-1)
    return keep


def min_p_mask(probs: NDArray[np.float64], p_min: float) -> NDArray[np.bool_]:
    """[B, V] -> [B, V] bool: min-p, True where probs >= p_min * the row's max probability
    (the most probable id is always kept; p_min = 0 keeps every id)."""
    return probs >= p_min * probs.max(axis=-1, keepdims=True)


def repetition_penalize(
    logits: NDArray[np.float64], seen: NDArray[np.bool_], penalty: float
) -> NDArray[np.float64]:
    """[B, V] logits, [B, V] bool seen -> [B, V]: the repetition penalty (CTRL, Keskar et
    al. 2019, as in transformers): x -> x / penalty if x > 0 else x * penalty where seen."""
    scaled = np.where(logits > 0, logits / penalty, logits * penalty)  # [B, V]
    return np.where(seen, scaled, logits)


def seen_mask(history: Any, shape: tuple[int, int]) -> NDArray[np.bool_]:
    """The ids of ``history`` as a [B, V] bool mask: an int array [B, T] (or [T] when
    B = 1), or a sequence of B 1-D id sequences (ragged). Ids outside [0, V) -> InputError."""
    rows_n, vocab = shape
    arr = np.asarray(history) if isinstance(history, np.ndarray) else None
    if arr is not None and arr.ndim == 1 and rows_n == 1:
        arr = arr[None, :]
    rows = list(arr) if arr is not None and arr.ndim == 2 else list(history)
    if len(rows) != rows_n:
        raise InputError(
            f"history must hold one row of ids per logits row ({rows_n}), got {len(rows)}"
        )
    seen = np.zeros(shape, dtype=np.bool_)  # [B, V]
    for b, row in enumerate(rows):
        ids = np.asarray(row)
        if ids.size == 0:
            continue
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(
                f"history row {b} must be 1-D integer ids, got {ids.dtype} {ids.shape}"
            )
        if ids.min() < 0 or ids.max() >= vocab:
            raise InputError(
                f"history row {b} holds ids outside [0, {vocab}) (min {ids.min()}, max {ids.max()})"
            )
        seen[b, ids] = True
    return seen


# ---- parameter checks ------------------------------------------------------------------


def _check_temperature(temperature: Any) -> None:
    """Temperature: finite and >= 0; 0 means greedy."""
    check_number(temperature, "temperature (0 = greedy)", 0.0, math.inf, high_open=True)


# ---- strategies ------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingStrategy:
    """Turns logits into token ids. Subclasses define ``is_greedy`` and ``_probs``."""

    @property
    def is_greedy(self) -> bool:
        """True when picks are the argmax and no random number is drawn."""
        return True

    def _probs(self, logits: NDArray[np.float64]) -> NDArray[np.float64]:
        """[B, V] float64 logits -> [B, V] float64 probabilities (not greedy)."""
        raise NotImplementedError  # pragma: no cover

    @property
    def uses_history(self) -> bool:
        """True when the strategy looks at the ids already in the context (``history``)."""
        return False

    def probs(self, logits: ArrayLike, history: Any = None) -> NDArray[np.float64]:
        """The distribution ``pick_tokens`` samples from, float64; each row sums to 1.

        Logits [B, V] -> [B, V], or one row [V] -> [V]. Greedy (temperature 0): a
        one-hot on the argmax (lowest id on ties). ``history`` (the context's ids, see
        ``seen_mask``) is used only by strategies whose ``uses_history`` is True.
        """
        arr = np.asarray(logits)
        x = check_logits(arr, ndim=1 if arr.ndim == 1 else 2)  # [V] or [B, V]
        rows = x.reshape(-1, x.shape[-1])  # [B, V] (B = 1 for one row)
        if self.is_greedy:
            out = np.zeros(rows.shape, dtype=np.float64)  # [B, V]
            np.put_along_axis(out, sample_argmax(rows)[:, None], 1.0, axis=-1)
        else:
            out = self._probs(rows.astype(np.float64, copy=False))
        return out.reshape(x.shape)

    def pick_tokens(
        self, logits: ArrayLike, rng: np.random.Generator | None = None, history: Any = None
    ) -> NDArray[np.int64]:
        """Logits [B, V] -> token ids int64 [B]: inverse CDF over ``probs``, one uniform
        per row (row order); greedy takes the argmax and draws nothing."""
        greedy = self.is_greedy
        x = check_logits(logits, ndim=2, values=not greedy)  # [B, V], its own float dtype
        if greedy:  # the one-hot of probs; exact in any float dtype, no copy
            return sample_argmax(x)  # (checks the values it picks)
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"{self!r} needs an explicit np.random.Generator, got {rng!r}")
        u = rng.random((x.shape[0],))  # [B], one uniform per row, in row order
        return sample_mult(self._probs(x.astype(np.float64, copy=False)), u)

    def pick_token(
        self, logits: ArrayLike, rng: np.random.Generator | None = None, history: Any = None
    ) -> int:
        """Logits [V] -> one token id. Same result as row b of ``pick_tokens``."""
        x = check_logits(logits, ndim=1)  # [V]
        hist = None if history is None else [np.asarray(history)]
        return int(self.pick_tokens(x[None, :], rng, history=hist)[0])


@dataclass(frozen=True)
class Greedy(SamplingStrategy):
    """Always the most likely token (argmax; lowest id on ties)."""


@dataclass(frozen=True)
class Temperature(SamplingStrategy):
    """Sample from softmax(logits / temperature); temperature 0 is greedy."""

    temperature: float = 1.0  # >= 0 and finite; 0 = greedy

    def __post_init__(self) -> None:
        _check_temperature(self.temperature)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def _probs(self, logits: NDArray[np.float64]) -> NDArray[np.float64]:
        return softmax64(logits, self.temperature)  # [B, V]


@dataclass(frozen=True)
class TopK(SamplingStrategy):
    """Sample from softmax(logits / temperature) restricted to the k highest logits
    (k > vocab_size is clamped to vocab_size; ties at the boundary: lower id)."""

    k: int = 40  # >= 1
    temperature: float = 1.0  # >= 0 and finite; 0 = greedy

    def __post_init__(self) -> None:
        check_int(self.k, "k (top_k; values above vocab_size are clamped)", 1)
        _check_temperature(self.temperature)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def _probs(self, logits: NDArray[np.float64]) -> NDArray[np.float64]:
        kept = np.where(top_k_mask(logits, int(self.k)), logits, -np.inf)  # [B, V]
        return softmax64(kept, self.temperature)  # [B, V], 0 outside the top k


@dataclass(frozen=True)
class TopP(SamplingStrategy):
    """Nucleus sampling: q = softmax(logits / temperature); sample from q renormalized
    over the smallest set of most probable tokens whose mass under q reaches p."""

    p: float = 0.9  # in (0, 1]; 1 keeps every token
    temperature: float = 1.0  # >= 0 and finite; 0 = greedy

    def __post_init__(self) -> None:
        check_number(self.p, "p (top_p)", 0.0, 1.0, low_open=True)
        _check_temperature(self.temperature)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def _probs(self, logits: NDArray[np.float64]) -> NDArray[np.float64]:
        q = softmax64(logits, self.temperature)  # [B, V], with the temperature
        return renormalize_over(q, top_p_mask(q, float(self.p)))  # over the nucleus


@dataclass(frozen=True)
class MinP(SamplingStrategy):
    """Min-p sampling: q = softmax(logits / temperature); sample from q renormalized over
    the tokens with q_i >= p_min * max_j q_j (a cut relative to the most probable token)."""

    p_min: float = 0.05  # in [0, 1]; 0 keeps every token, 1 only the most probable ones
    temperature: float = 1.0  # >= 0 and finite; 0 = greedy

    def __post_init__(self) -> None:
        check_number(self.p_min, "p_min (min_p)", 0.0, 1.0)
        _check_temperature(self.temperature)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def _probs(self, logits: NDArray[np.float64]) -> NDArray[np.float64]:
        q = softmax64(logits, self.temperature)  # [B, V], with the temperature
        return renormalize_over(q, min_p_mask(q, float(self.p_min)))  # over the kept ids


@dataclass(frozen=True)
class RepetitionPenalty(SamplingStrategy):
    """``base`` sampling from logits where every id in ``history`` is penalized:
    x / penalty if x > 0, else x * penalty (``repetition_penalize``). penalty 1 changes
    nothing; > 1 discourages repeats. Without a history nothing is penalized."""

    penalty: float = 1.1  # > 0 and finite
    base: SamplingStrategy = Greedy()

    def __post_init__(self) -> None:
        check_number(
            self.penalty,
            "penalty (repetition_penalty)",
            0.0,
            math.inf,
            low_open=True,
            high_open=True,
        )
        if not isinstance(self.base, SamplingStrategy) or isinstance(self.base, RepetitionPenalty):
            raise ConfigError(
                f"base must be a SamplingStrategy other than RepetitionPenalty, got {self.base!r}"
            )

    @property
    def is_greedy(self) -> bool:
        return self.base.is_greedy

    @property
    def uses_history(self) -> bool:
        return True

    def _penalized(self, logits: ArrayLike, history: Any) -> NDArray[np.float64]:
        """Logits [B, V] or [V] -> the same shape, float64, penalized where seen."""
        arr = np.asarray(logits)
        x = check_logits(arr, ndim=1 if arr.ndim == 1 else 2)  # [V] or [B, V]
        rows = x.reshape(-1, x.shape[-1]).astype(np.float64)  # [B, V]
        if history is not None:
            if x.ndim == 1:
                history = [np.asarray(history)]
            rows = repetition_penalize(rows, seen_mask(history, rows.shape), float(self.penalty))
        return rows.reshape(x.shape)

    def probs(self, logits: ArrayLike, history: Any = None) -> NDArray[np.float64]:
        return self.base.probs(self._penalized(logits, history))

    def pick_tokens(
        self, logits: ArrayLike, rng: np.random.Generator | None = None, history: Any = None
    ) -> NDArray[np.int64]:
        x = check_logits(logits, ndim=2)  # [B, V]
        return self.base.pick_tokens(self._penalized(x, history), rng)


def make_strategy(
    name: str,
    *,
    temperature: float = 1.0,
    top_k: int = 40,
    top_p: float = 0.9,
    min_p: float = 0.05,
    repetition_penalty: float = 1.0,
) -> SamplingStrategy:
    """Build a strategy by name (for the CLI): greedy, temperature (alias sample), top_k,
    top_p, min_p; wrapped in RepetitionPenalty when ``repetition_penalty`` != 1.

    Hyphens are accepted for underscores ("top-k"). Parameters a strategy does not use
    are ignored; the ones it uses are validated (ConfigError).
    """
    key = name.strip().lower().replace("-", "_")
    strategy: SamplingStrategy
    if key == "greedy":
        strategy = Greedy()
    elif key in ("temperature", "sample"):
        strategy = Temperature(temperature)
    elif key == "top_k":
        strategy = TopK(top_k, temperature)
    elif key == "top_p":
        strategy = TopP(top_p, temperature)
    elif key == "min_p":
        strategy = MinP(min_p, temperature)
    else:
        raise ConfigError(
            "strategy must be one of greedy, temperature (alias sample), top_k, top_p, min_p; "
            f"got {name!r}"
        )
    if repetition_penalty != 1.0:
        return RepetitionPenalty(repetition_penalty, strategy)
    return strategy
