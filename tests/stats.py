"""Reference statistics for the sampling tests, in plain Python (no SciPy).

``inverse_cdf`` is inverse-transform sampling written out as a loop; ``chi_squared_test``
is Pearson's goodness of fit.

``chi2_sf`` is the exact survival function of the chi-squared distribution for
integer degrees of freedom, from the closed forms of the regularized upper
incomplete gamma function Q(df/2, x/2) at integer and half-integer order:

    df = 2m:      Q = e^-y sum_{i=0}^{m-1} y^i / i!                      (y = x/2)
    df = 2m + 1:  Q = erfc(sqrt y) + e^-y sum_{i=1}^{m} y^(i-1/2) / Gamma(i + 1/2)

each term computed in log space (no overflow for large df or x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-squared with ``df`` >= 1 degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    if x <= 0:
        return 1.0
    y = x / 2.0
    m, odd = divmod(int(df), 2)
    if odd:
        total = math.erfc(math.sqrt(y))
        total += sum(
            math.exp(-y + (i - 0.5) * math.log(y) - math.lgamma(i + 0.5)) for i in range(1, m + 1)
        )
    else:
        total = sum(math.exp(-y + i * math.log(y) - math.lgamma(i + 1)) for i in range(m))
    return min(1.0, total)


def chi_squared_test(
    counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0
) -> tuple[float, int, float]:
    """Pearson's test of ``counts`` [V] against the distribution ``probs`` [V].

    Returns (statistic, degrees of freedom, p-value). A draw of a token whose
    probability is 0 gives (inf, 0, 0.0). Tokens expected fewer than ``min_expected``
    times are pooled into one bin (merged into the smallest other bin if the pool is
    still below ``min_expected``), as the chi-squared approximation needs.
    """
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    if np.any(counts[probs == 0] > 0):
        return math.inf, 0, 0.0
    expected = counts.sum() * probs
    big = expected >= min_expected
    small = (probs > 0) & ~big
    obs, exp = list(counts[big]), list(expected[big])
    if small.any():
        pooled_obs, pooled_exp = float(counts[small].sum()), float(expected[small].sum())
        if pooled_exp >= min_expected or not exp:
            obs.append(pooled_obs)
            exp.append(pooled_exp)
        else:
            j = int(np.argmin(exp))
            obs[j] += pooled_obs
            exp[j] += pooled_exp
    if len(obs) < 2:
        return 0.0, 0, 1.0  # one bin holds every draw: nothing to test
    stat = float(sum((o - e) ** 2 / e for o, e in zip(obs, exp)))
    df = len(obs) - 1
    return stat, df, chi2_sf(stat, df)


def inverse_cdf(probs: Sequence[float], u: float) -> int:
    """The first token whose cumulative probability (a running sum) exceeds u * total."""
    cumulative = [0.0]
    for p_i in probs:
        cumulative.append(cumulative[-1] + p_i)
    target = u * cumulative[-1]
    return next(i for i, p_i in enumerate(probs) if p_i > 0 and cumulative[i + 1] > target)
