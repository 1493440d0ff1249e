"""Array helpers shared by every layer: softmax, SiLU, seeded initialization.

Everything here keeps the dtype it is given (float32 stays float32): Python
float constants do not upcast under NumPy's promotion rules (NEP 50).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_dtype(dtype: object) -> np.dtype:
    """The model computes in float32 (default) or float64 (for gradient checks)."""
    try:
        dt = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError as exc:
        raise ConfigError(f"dtype must be float32 or float64, got {dtype!r}") from exc
    if dt not in SUPPORTED_DTYPES:
        raise ConfigError(f"dtype must be float32 or float64, got {dt}")
    return dt


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax: p_i = exp(x_i - max x) / sum_j exp(x_j - max x).

    A row that is entirely -inf gives zeros, not NaN (SPEC.md section 2).
    """
    m = np.max(x, axis=axis, keepdims=True)
    all_masked = None
    if not np.isfinite(m).all():  # rare: rows of -inf (or inf/NaN, which stay visible)
        all_masked = m == -np.inf
        m = np.where(all_masked, 0, m)  # exp(-inf - 0) = 0 instead of NaN from -inf - -inf
    e = np.exp(x - m)
    s = np.sum(e, axis=axis, keepdims=True)
    if all_masked is not None:
        s[all_masked] = 1
    e /= s
    return e


def softmax_backward(dp: np.ndarray, p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax backward: dz = p . (dp - sum_j p_j dp_j)."""
    return p * (dp - np.sum(p * dp, axis=axis, keepdims=True))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """sigma(x) = 1 / (1 + exp(-x)), without overflow warnings for very negative x."""
    with np.errstate(over="ignore"):
        e = np.exp(-x)
    e += 1
    return np.reciprocal(e, out=e)


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU: silu(x) = x / (1 + exp(-x)) = x sigma(x)."""
    return x * sigmoid(x)


def silu_grad(x: np.ndarray) -> np.ndarray:
    """SiLU derivative: s'(x) = sigma(x) (1 + x (1 - sigma(x)))."""
    sig = sigmoid(x)
    return sig * (1 + x * (1 - sig))


def kaiming_normal_(rng: np.random.Generator, out: np.ndarray, fan_in: int) -> None:
    """Kaiming/He init in place: normal with std = sqrt(2 / fan_in).

    Drawn in float32 straight into ``out`` (a float64 ``out`` receives the same
    float32 values, widened), so a float32 and a float64 model built from one
    seed hold identical weights, and building the model allocates no temporaries.
    """
    std = np.float32(np.sqrt(2.0 / fan_in))
    if out.dtype == np.float32:
        rng.standard_normal(dtype=np.float32, out=out)
        out *= std
    else:
        out[...] = rng.standard_normal(out.shape, dtype=np.float32) * std
