"""Argument checks shared by every part of nn-core (configs, sampling, generation, data, jobs).

Each check returns the value in its canonical type or raises the given error class (a
``ValueError`` subclass from ``nn_core.errors``) with a message that names the argument
and the allowed range, e.g. ``batch_size must be an int >= 1, got 0``.

NumPy integers count as ints and NumPy floats as numbers; ``bool`` never does (``True``
is an ``int`` in Python, but a flag passed as a size is a mistake).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import ConfigError, InputError


def is_int(value: Any) -> bool:
    """An int or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """An int or float (NumPy's too), not a bool."""
    return is_int(value) or isinstance(value, (float, np.floating))


def int_range(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"an int in [{low}, {high}]"
    if low is not None:
        return f"an int >= {low}"
    if high is not None:
        return f"an int <= {high}"
    return "an int"


def check_int(
    value: Any,
    name: str,
    low: int | None = None,
    high: int | None = None,
    *,
    error: type[Exception] = ConfigError,
) -> int:
    """``value`` as an int in [low, high] (a bound of None is open)."""
    if (
        not is_int(value)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        raise error(f"{name} must be {int_range(low, high)}, got {value!r}")
    return int(value)


def number_range(low: float, high: float, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_number(
    value: Any,
    name: str,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    error: type[Exception] = ConfigError,
) -> float:
    """``value`` as a float in the interval; NaN never passes, and an infinity only where
    the interval includes it (``high=math.inf`` with ``high_open=False``)."""
    if is_number(value):
        v = float(value)
        above = v > low or (not low_open and v == low)
        below = v < high or (not high_open and v == high)
        if above and below:  # NaN fails both comparisons
            return v
    raise error(
        f"{name} must be a number in {number_range(low, high, low_open, high_open)}, got {value!r}"
    )


def check_bool(value: Any, name: str, *, error: type[Exception] = ConfigError) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise error(f"{name} must be a bool (true or false), got {value!r}")
    return bool(value)


def check_choice(
    value: Any, name: str, choices: Iterable[str], *, error: type[Exception] = ConfigError
) -> str:
    allowed = tuple(choices)
    if not isinstance(value, str) or value not in allowed:
        raise error(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def check_token_ids(
    ids: Any,
    vocab_size: int,
    *,
    max_len: int | None = None,
    ndim: int = 2,
    name: str = "token_ids",
) -> np.ndarray:
    """An integer array of token ids in [0, vocab_size), as int64.

    ``ndim=2``: [B, S] with B, S >= 1 (and S <= ``max_len``); ``ndim=1``: [T] with T >= 1
    (and T <= ``max_len``). NumPy would wrap a negative id silently, so the range is
    checked here, on every path that indexes an embedding with ids.
    """
    arr = np.asarray(ids)
    if arr.dtype == np.bool_ or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        want = "[batch, seq] (2 dims)" if ndim == 2 else f"{ndim} dim(s)"
        raise InputError(f"{name} must have shape {want}, got shape {arr.shape}")
    if arr.size == 0:
        what = "batch >= 1 and seq >= 1" if ndim == 2 else "at least one token"
        raise InputError(f"{name} must have {what}, got shape {arr.shape}")
    length = arr.shape[-1]
    if max_len is not None and length > max_len:
        raise InputError(f"{name} has sequence length {length} > max_seq_len {max_len}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(f"{name} must be in [0, {vocab_size}) (vocab_size), found {bad}")
    return arr.astype(np.int64, copy=False)


def check_generator_state(state: Any, what: str, *, error: type[Exception] = InputError) -> None:
    """A NumPy PCG64 ``bit_generator.state`` dict (``Generator.bit_generator.state``), every
    field in range; else ``error`` naming ``what``."""
    ok = (
        isinstance(state, dict)
        and set(state) == {"bit_generator", "state", "has_uint32", "uinteger"}
        and state["bit_generator"] == "PCG64"
        and isinstance(state["state"], dict)
        and set(state["state"]) == {"state", "inc"}
        and all(is_int(x) and 0 <= x < 2**128 for x in state["state"].values())
        and state["state"]["inc"] % 2 == 1
        and state["has_uint32"] in (0, 1)
        and is_int(state["has_uint32"])
        and is_int(state["uinteger"])
        and 0 <= state["uinteger"] < 2**32
    )
    if not ok:
        raise error(
            f"{what} is malformed: not a PCG64 generator state (bit_generator 'PCG64', state/inc "
            f"< 2**128 with inc odd, has_uint32 0/1, uinteger < 2**32): {str(state)[:120]}"
        )
