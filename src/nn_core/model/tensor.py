"""Array helpers shared by every layer: softmax, SiLU, seeded initialization.

Everything here keeps the dtype it is given (float32 stays float32): Python float
constants do not upcast under NumPy's promotion rules (NEP 50). Functions that take
``out`` write their result there (any array of the right shape, views included).
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


# ---------------------------------------------------------------------------- scalars

_SCALARS: dict[tuple[float, np.dtype], np.ndarray] = {}


def dtype_scalar(value: float, dtype: np.dtype) -> np.ndarray:
    """``value`` as a read-only 0-d array of ``dtype``, made once per (value, dtype).

    An in-place op with it gives what the Python float gives (NEP 50 casts the float to
    the array's dtype first) about a microsecond faster: the conversion is done once.
    """
    k = (value, dtype)
    c = _SCALARS.get(k)
    if c is None:
        if len(_SCALARS) >= 256:  # a bounded cache: eps and 1/H take a handful of entries
            _SCALARS.clear()
        c = _SCALARS[k] = np.array(value, dtype)
        c.flags.writeable = False
    return c


# ---------------------------------------------------------------------------- softmax


def exp_shifted(
    x: np.ndarray, axis: int = -1, out: np.ndarray | None = None, *, may_be_masked: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The parts of a softmax along ``axis``: (e = exp(x - max x), max x, sum e), the last
    two with the reduced axis kept (NumPy scalars for a 1-D x).

    ``softmax`` divides e by its sum; the cross-entropy takes log softmax at the target
    from the same parts (x_t - max - log sum). A row that is entirely -inf has max -inf;
    with ``may_be_masked`` it gets e = 0 and sum 1 (so softmax gives zeros, not NaN).
    Callers that know every row has a finite entry (attention: a query always sees its
    own key) pass ``may_be_masked=False`` and save the check.
    """
    # ufunc.reduce directly (positional axis, dtype, out): np.max / np.sum add a Python
    # wrapper layer per call. A 1-D x reduces to NumPy scalars (no keepdims): the
    # subtraction and the division then take NumPy's scalar fast path, not broadcasting.
    keep = x.ndim > 1
    if not keep:  # one vector: the max by argmax (the first NaN, else the largest
        # value: what maximum.reduce returns, at a fifth of its cost) and the sum by a
        # BLAS dot with ones (a third of add.reduce's; a different summation order)
        m = x[x.argmax()]
    else:
        m = np.maximum.reduce(x, axis, None, None, keepdims=True)  # type: ignore[call-overload]
    masked = None
    if may_be_masked:  # rare: rows of -inf (NaN/+inf stay visible)
        if not keep:
            if m == -np.inf:
                masked, m = True, x.dtype.type(0)
        elif m.item() == -np.inf if m.size == 1 else _has_neg_inf(m):
            masked = m == -np.inf
            m[masked] = 0  # exp(-inf - 0) = 0 instead of NaN from -inf - -inf
    e = np.subtract(x, m, out=out)
    np.exp(e, e)
    if keep:
        s = np.add.reduce(e, axis, None, None, keepdims=True)  # type: ignore[call-overload]
    else:
        s = e.dot(_ones(e.shape[0], e.dtype))
    if masked is not None:
        if keep:
            s[masked] = 1
        else:
            s = x.dtype.type(1)
    return e, m, s


_ONES: dict[tuple[int, np.dtype], np.ndarray] = {}


def _ones(n: int, dtype: np.dtype) -> np.ndarray:
    """A read-only vector of n ones, made once per (n, dtype) (a bounded cache)."""
    v = _ONES.get((n, dtype))
    if v is None:
        if len(_ONES) >= 16:
            _ONES.clear()
        v = _ONES[(n, dtype)] = np.ones(n, dtype)
        v.flags.writeable = False
    return v


def _has_neg_inf(m: np.ndarray) -> bool:
    """Whether an array holds -inf: its minimum ignoring NaN (fmin) is -inf."""
    return bool(np.fmin.reduce(m, None) == -np.inf)


def softmax(
    x: np.ndarray, axis: int = -1, out: np.ndarray | None = None, *, may_be_masked: bool = True
) -> np.ndarray:
    """Softmax: p_i = exp(x_i - max x) / sum_j exp(x_j - max x).

    A row that is entirely -inf gives zeros, not NaN. ``out`` may be ``x`` (in place).
    """
    e, _, s = exp_shifted(x, axis, out, may_be_masked=may_be_masked)
    e /= s
    return e


def softmax_backward(
    dp: np.ndarray, p: np.ndarray, axis: int = -1, out: np.ndarray | None = None
) -> np.ndarray:
    """Softmax backward: dz = p . (dp - sum_j p_j dp_j).   ``out`` may be ``dp``."""
    dot = np.add.reduce(p * dp, axis=axis, keepdims=True)  # sum_j p_j dp_j
    dz = np.subtract(dp, dot, out=out)
    dz *= p
    return dz


# ---------------------------------------------------------------------------- SiLU


def sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """sigma(x) = 1 / (1 + exp(-x)), without overflow warnings for very negative x
    (exp(-x) = inf gives exactly 0)."""
    e = np.negative(x, out=out)
    with np.errstate(over="ignore"):
        np.exp(e, out=e)
    one = dtype_scalar(1.0, e.dtype)
    e += one
    # 1 / (1 + e) as a division: the same correctly rounded quotient as np.reciprocal,
    # which NumPy does not vectorize for float32 (half the speed on large arrays)
    return np.divide(one, e, out=e)


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU: silu(x) = x / (1 + exp(-x)) = x sigma(x)."""
    return x * sigmoid(x)


def silu_grad(x: np.ndarray) -> np.ndarray:
    """SiLU derivative: s'(x) = sigma(x) (1 + x (1 - sigma(x)))."""
    sig = sigmoid(x)
    return sig * (1 + x * (1 - sig))


# ---------------------------------------------------------------------------- init


def standard_normal_f32(rng: np.random.Generator, n: int) -> np.ndarray:
    """n standard normal draws [n], float32, by the Box-Muller transform.

    From uniform pairs u1 in (0, 1], u2 in [0, 1):
        z1 = sqrt(-2 ln u1) cos(2 pi u2),   z2 = sqrt(-2 ln u1) sin(2 pi u2),
    two independent standard normals per pair. The uniforms are ``rng.random``'s float32
    draws (multiples of 2^-24), so |z| <= sqrt(2 ln 2^24) = 5.77. The same seed gives the
    same values on every machine NumPy's float32 log, sqrt, cos and sin round alike; it
    runs in well under half the time of ``rng.standard_normal`` on float32 (vectorized
    transcendental functions against a scalar ziggurat loop).
    """
    m = (n + 1) // 2
    u = rng.random(2 * m, dtype=np.float32)
    radius, angle = u[:m], u[m:]
    np.subtract(np.float32(1), radius, radius)  # u1 = 1 - u in (0, 1]: ln u1 is finite
    np.log(radius, radius)
    radius *= np.float32(-2)
    np.sqrt(radius, radius)  # sqrt(-2 ln u1)
    angle *= np.float32(2 * np.pi)  # 2 pi u2
    z = np.empty(2 * m, np.float32)
    np.cos(angle, z[:m])
    np.sin(angle, z[m:])
    z[:m] *= radius
    z[m:] *= radius
    return z[:n]


def kaiming_normal_(rng: np.random.Generator, out: np.ndarray, fan_in: int) -> None:
    """Kaiming/He init in place: normal with std = sqrt(2 / fan_in) (``standard_normal_f32``
    draws, scaled).

    Drawn in float32 (a float64 ``out`` receives the same float32 values, widened), so a
    float32 and a float64 model built from one seed hold identical weights. ``out`` may
    be a strided view; the draws fill it in C order either way.
    """
    z = standard_normal_f32(rng, out.size).reshape(out.shape)
    z *= np.float32(np.sqrt(2.0 / fan_in))
    out[...] = z
