"""Workspaces: the buffers a model reuses from one call to the next (no fresh temporaries).

Every layer function takes ``ws`` (a ``Workspace`` or None) and a ``key`` prefix, and
gets each array it writes with ``buffer(ws, key + "name", shape, dtype)``: with a
workspace the array is allocated on the first call and reused by every later call of
the same shape; with ``ws=None`` it is a fresh ``np.empty``, so each layer function also
works on its own (the tests call them that way).

Why: a forward of the tiny config allocates ~60 arrays. Fresh NumPy temporaries of a
few hundred KB each are mmapped, page-faulted in and unmapped again on every call by
glibc's default allocator; reusing buffers removes that cost without tuning the
allocator of the process that hosts the library.

``MoETransformer`` keeps one workspace per (thread, batch shape, purpose), so forwards
running concurrently in several threads never share a buffer. A workspace's
``generation`` counts the forwards that wrote into it: a cached forward state records
it, and a backward refuses a state whose buffers a later forward has overwritten.
"""

from __future__ import annotations

import numpy as np


class Workspace:
    """Named buffers, allocated once per (name, shape, dtype) and reused."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}
        self.generation = 0

    def get(
        self, key: str, shape: tuple[int, ...], dtype: np.dtype, zero: bool = False
    ) -> np.ndarray:
        buf = self.buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
            self.buffers[key] = buf
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())


def buffer(
    ws: Workspace | None, key: str, shape: tuple[int, ...], dtype: np.dtype, zero: bool = False
) -> np.ndarray:
    """An array to write into: the workspace's buffer ``key``, or a fresh one without a
    workspace. ``zero``: filled with zeros when it is allocated (not on reuse)."""
    if ws is None:
        return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
    # the reuse case of Workspace.get inline: ~40 lookups per decoded token
    buf = ws.buffers.get(key)
    if buf is not None and buf.shape == shape and buf.dtype == dtype:
        return buf
    return ws.get(key, shape, dtype, zero)
