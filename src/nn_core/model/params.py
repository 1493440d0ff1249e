"""The flat parameter store: one contiguous buffer, named views into it.

Parameters live in one 1-D buffer and gradients in a second buffer with the same
layout, so AdamW, global-norm clipping, zero_grad and checkpoint I/O are each a handful
of vectorized calls over all tensors at once (the AdamW moments use two more buffers of
the same layout).

The buffer is cut into *slabs*, each a contiguous block that one matrix product reads
whole. A slab holds one or more named tensors, and a matrix may be stored transposed:

    slab                       storage shape     named tensors (views, their own shapes)
    layers.{i}.attn.qkv        [H, Q + 2KV]      q_proj [Q, H], k_proj [KV, H], v_proj [KV, H]
    layers.{i}.attn.o_proj     [Q, H]            o_proj [H, Q]
    layers.{i}.moe.gate_up     [E, H, 2F]        gate_proj [E, F, H], up_proj [E, F, H]
    layers.{i}.moe.down_proj   [E, F, H]         down_proj [E, H, F]
    lm_head                    [H, V]            lm_head [V, H]
    (any other)                its own shape     itself

Linear weights are named and shaped [out_features, in_features] (PyTorch's layout: what
checkpoints, exports and users see through ``views``), but stored [in, out]: the
forward product X W^T then reads a contiguous W^T (BLAS's "NN" case, measurably faster
on small matrices than a transposed operand), and q|k|v, each expert's gate|up, are
each one product.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Part(NamedTuple):
    """A named tensor inside a slab: [start, stop) along the slab's axis ``axis``, seen
    with its last two axes swapped when ``transposed``."""

    name: str
    shape: tuple[int, ...]  # the tensor's own shape
    axis: int  # the slab axis the part is cut along
    start: int
    stop: int
    transposed: bool = False


class Slab(NamedTuple):
    name: str
    shape: tuple[int, ...]  # storage shape
    offset: int  # into the flat buffer
    parts: tuple[Part, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _stored(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
    return (*shape[:-2], shape[-1], shape[-2]) if transposed else tuple(shape)


def stacked(
    slab: str,
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    axis: int = 0,
    transposed: bool = False,
) -> tuple[str, tuple[int, ...], tuple[Part, ...]]:
    """A slab of tensors stacked along the storage axis ``axis`` (other dimensions equal);
    ``transposed``: each is stored with its last two axes swapped."""
    stored = [_stored(tuple(s), transposed) for s in shapes]
    others = {s[:axis] + s[axis + 1 :] for s in stored}
    if len(others) != 1:
        raise ValueError(f"slab {slab}: shapes {list(shapes)} differ off axis {axis}")
    parts, start = [], 0
    for name, shape, st in zip(names, shapes, stored):
        parts.append(Part(name, tuple(shape), axis, start, start + st[axis], transposed))
        start += st[axis]
    first = stored[0]
    return slab, first[:axis] + (start,) + first[axis + 1 :], tuple(parts)


def single(
    name: str, shape: tuple[int, ...], transposed: bool = False
) -> tuple[str, tuple[int, ...], tuple[Part, ...]]:
    """A slab holding exactly one tensor (stored transposed if asked)."""
    stored = _stored(tuple(shape), transposed)
    return name, stored, (Part(name, tuple(shape), 0, 0, stored[0], transposed),)


class ParamStore:
    """Named tensors laid out back to back in ``flat`` (and ``grad``), slab by slab."""

    def __init__(
        self, layout: Sequence[tuple[str, tuple[int, ...], tuple[Part, ...]]], dtype: np.dtype
    ):
        self.dtype = np.dtype(dtype)
        self.slabs: dict[str, Slab] = {}
        self.parts: dict[str, tuple[Slab, Part]] = {}
        offset = 0
        for slab_name, shape, parts in layout:
            slab = Slab(slab_name, tuple(shape), offset, tuple(parts))
            if slab_name in self.slabs:
                raise ValueError(f"duplicate slab name {slab_name!r}")
            self.slabs[slab_name] = slab
            for part in parts:
                if part.name in self.parts:
                    raise ValueError(f"duplicate parameter name {part.name!r}")
                self.parts[part.name] = (slab, part)
            offset += slab.size
        self.size = offset
        self.flat = np.zeros(offset, dtype=self.dtype)  # all parameters   [P]
        self.grad = np.zeros(offset, dtype=self.dtype)  # all gradients, same layout   [P]
        self.params = self.views(self.flat)
        self.grads = self.views(self.grad)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each named tensor's shape, in layout order."""
        return {name: part.shape for name, (_, part) in self.parts.items()}

    def slab(self, name: str, buffer: np.ndarray) -> np.ndarray:
        """The storage view of slab ``name`` in ``buffer`` (a flat buffer of this layout)."""
        s = self.slabs[name]
        return buffer[s.offset : s.offset + s.size].reshape(s.shape)

    def view(self, name: str, buffer: np.ndarray) -> np.ndarray:
        """Tensor ``name`` in ``buffer``: a view with the tensor's own shape."""
        slab, part = self.parts[name]
        whole = self.slab(slab.name, buffer)
        index = (slice(None),) * part.axis + (slice(part.start, part.stop),)
        view = whole[index]
        return view.swapaxes(-1, -2) if part.transposed else view

    def views(self, buffer: np.ndarray) -> dict[str, np.ndarray]:
        """Name -> view, for every tensor, in layout order (params, grads, AdamW moments)."""
        if buffer.shape != (self.size,):
            raise ValueError(f"a flat buffer of this layout has shape ({self.size},)")
        return {name: self.view(name, buffer) for name in self.parts}
