"""The one gradient-check helper every backward test uses.

Central differences in float64: for a scalar function L of an array x (perturbed
in place), compare the analytic gradient g with

  * a directional derivative along a random unit direction d:
      (L(x + h d) - L(x - h d)) / 2h  vs  <g, d>
  * and, on up to ``coords`` sampled coordinates, the partial derivatives.

The relative error is |fd - an| / max(|fd|, |an|, floor), floor = 1e-3 max|g|
(at least 1e-8). A central difference carries a rounding error of about
eps_64 |L| / h ~ 1e-11 |L| whatever the coordinate, so a coordinate whose
gradient is a millionth of the largest is compared on the gradient's scale,
not its own. With h = 1e-5 the truncation error is O(h^2) ~ 1e-10 relative:
exact gradients come out near 1e-9, and a tolerance of 1e-6 leaves a wide
margin while a wrong factor, sign or missing term fails by orders of magnitude
(the random direction mixes every coordinate, so no part of g escapes).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def check_gradient(
    loss: Callable[[], float],
    x: np.ndarray,
    grad: np.ndarray,
    *,
    seed: int = 0,
    coords: int = 6,
    h: float = 1e-5,
    floor_scale: float = 1e-3,
) -> float:
    """Worst relative error between ``grad`` and central differences of ``loss`` in ``x``."""
    assert x.dtype == np.float64, "gradient checks run in float64"
    assert grad.shape == x.shape
    rng = np.random.default_rng(seed)
    g = np.asarray(grad, dtype=np.float64).reshape(-1)
    original = x.reshape(-1).copy()  # x may be a strided view: it is written whole, in place
    floor = max(1e-8, floor_scale * float(np.max(np.abs(g), initial=0.0)))

    def central(direction: np.ndarray) -> float:
        x[...] = (original + h * direction).reshape(x.shape)
        up = loss()
        x[...] = (original - h * direction).reshape(x.shape)
        down = loss()
        x[...] = original.reshape(x.shape)
        return (up - down) / (2 * h)

    d = rng.standard_normal(original.size)
    d /= np.linalg.norm(d)
    pairs = [(central(d), float(g @ d))]
    for j in rng.choice(original.size, size=min(coords, original.size), replace=False):
        e = np.zeros(original.size)
        e[j] = 1.0
        pairs.append((central(e), float(g[j])))
    return max(abs(fd - an) / max(abs(fd), abs(an), floor) for fd, an in pairs)
