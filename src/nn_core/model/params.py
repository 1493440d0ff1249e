"""The flat parameter store: one contiguous buffer, named views into it.

Parameters live in one 1-D buffer and gradients in a second buffer with the
same layout, so AdamW, global-norm clipping, zero_grad and checkpoint I/O are
each a handful of vectorized calls over all tensors at once.
"""

from __future__ import annotations

import math

import numpy as np


class ParamStore:
    """Named tensors laid out back to back in ``flat`` (and ``grad``)."""

    def __init__(self, specs: list[tuple[str, tuple[int, ...]]], dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, shape in specs:
            if name in self.shapes:
                raise ValueError(f"duplicate parameter name {name!r}")
            self.shapes[name] = tuple(shape)
            self.offsets[name] = offset
            offset += math.prod(shape)
        self.size = offset
        self.flat = np.zeros(offset, dtype=self.dtype)  # all parameters
        self.grad = np.zeros(offset, dtype=self.dtype)  # all gradients, same layout
        self.params = {name: self._view(self.flat, name) for name in self.shapes}
        self.grads = {name: self._view(self.grad, name) for name in self.shapes}

    def _view(self, buffer: np.ndarray, name: str) -> np.ndarray:
        start = self.offsets[name]
        shape = self.shapes[name]
        return buffer[start : start + math.prod(shape)].reshape(shape)

    def span(self, first: str, last: str, buffer: np.ndarray) -> np.ndarray:
        """A 2-D view over consecutive tensors ``first..last`` stacked by rows.

        Used to fuse the q, k and v projections into one matrix product: their
        weights are adjacent in the layout, so ``[Wq; Wk; Wv]`` needs no copy.
        """
        start = self.offsets[first]
        end = self.offsets[last] + math.prod(self.shapes[last])
        cols = self.shapes[first][-1]
        if any(self.shapes[n][-1] != cols for n in (first, last)):
            raise ValueError("span needs tensors with the same number of columns")
        return buffer[start:end].reshape(-1, cols)
