"""Token sampling (SPEC.md section 4): greedy, temperature, top-k and top-p (nucleus).

As in llama2.c's ``run.c``: a few small pure functions on rows of logits
(``sample_argmax``, ``softmax64``, ``sample_mult``, ``top_k_mask``, ``top_p_mask``)
behind one dispatcher, ``SamplingStrategy.pick_tokens``. Each strategy is a frozen
dataclass that rejects bad parameters on construction (ConfigError).

The distribution a strategy samples from is public: ``strategy.probs(logits)`` returns
it as float64 probabilities (rows sum to 1), and ``pick_tokens`` draws by inverse CDF
over exactly that function's output -- one implementation, so the distribution can be
checked against a direct formula and the draws against the distribution:
- Temperature(t): p = softmax(logits / t).
- TopK(k, t): softmax(logits / t) over the k highest logits, 0 elsewhere.
- TopP(p, t): q = softmax(logits / t); the nucleus is the smallest set of most probable
  ids whose mass under q reaches p; q renormalized over the nucleus, 0 elsewhere.
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

STRATEGY_NAMES = ("greedy", "temperature", "sample", "top_k", "top_p")


# ---- small pure functions on [B, V] float64 logits -------------------------------------


def check_logits(logits: ArrayLike, ndim: int) -> NDArray[np.floating]:
    """Validate logits ([V] when ndim=1, [B, V] when ndim=2); return them as a float array.

    Float logits come back as they are (no copy: greedy needs no float64); integer
    logits as float64. The values cost one reduction to check: every row's max is
    finite exactly when there is no NaN (it propagates into the max), no +inf, and no
    row that is entirely -inf. Only a failing check pays for naming the problem.
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
    if not np.isfinite(arr.max(axis=-1)).all():
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
    """Greedy: [B, V] -> [B], the highest logit (lowest id on ties)."""
    return np.argmax(logits, axis=-1).astype(np.int64)


def softmax64(logits: NDArray[np.float64], temperature: float) -> NDArray[np.float64]:
    """[B, V] -> [B, V] float64 probabilities of logits / temperature (temperature > 0):
    the model's softmax (``nn_core.model.tensor.softmax``) of the scaled logits; a
    masked (-inf) logit gets probability 0."""
    return softmax(logits / temperature, axis=-1)


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

    def probs(self, logits: ArrayLike) -> NDArray[np.float64]:
        """The distribution ``pick_tokens`` samples from, float64; each row sums to 1.

        Logits [B, V] -> [B, V], or one row [V] -> [V]. Greedy (temperature 0): a
        one-hot on the argmax (lowest id on ties).
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
        self, logits: ArrayLike, rng: np.random.Generator | None = None
    ) -> NDArray[np.int64]:
        """Logits [B, V] -> token ids int64 [B]: inverse CDF over ``probs``, one uniform
        per row (row order); greedy takes the argmax and draws nothing."""
        x = check_logits(logits, ndim=2)  # [B, V], the logits' own float dtype
        if self.is_greedy:
            return sample_argmax(x)  # the one-hot of probs; exact in any float dtype, no copy
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"{self!r} needs an explicit np.random.Generator, got {rng!r}")
        u = rng.random((x.shape[0],))  # [B], one uniform per row, in row order
        return sample_mult(self._probs(x.astype(np.float64, copy=False)), u)

    def pick_token(self, logits: ArrayLike, rng: np.random.Generator | None = None) -> int:
        """Logits [V] -> one token id. Same result as row b of ``pick_tokens``."""
        x = check_logits(logits, ndim=1)  # [V]
        return int(self.pick_tokens(x[None, :], rng)[0])


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
        kept = np.where(top_p_mask(q, float(self.p)), q, 0.0)  # [B, V], the nucleus
        return kept / kept.sum(axis=-1, keepdims=True)  # renormalized over the nucleus


def make_strategy(
    name: str, *, temperature: float = 1.0, top_k: int = 40, top_p: float = 0.9
) -> SamplingStrategy:
    """Build a strategy by name (for the CLI): greedy, temperature (alias sample), top_k, top_p.

    Hyphens are accepted for underscores ("top-k"). Parameters a strategy does not use
    are ignored; the ones it uses are validated (ConfigError).
    """
    key = name.strip().lower().replace("-", "_")
    if key == "greedy":
        return Greedy()
    if key in ("temperature", "sample"):
        return Temperature(temperature)
    if key == "top_k":
        return TopK(top_k, temperature)
    if key == "top_p":
        return TopP(top_p, temperature)
    raise ConfigError(
        f"strategy must be one of greedy, temperature (alias sample), top_k, top_p; got {name!r}"
    )
