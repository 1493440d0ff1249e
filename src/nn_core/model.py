"""MoETransformer: the whole model over one flat parameter buffer.

Shape legend: B batch, S sequence, H hidden, V vocab, N = B*S tokens.

    token_ids [B, S] -> Embedding [N, H] -> n_layers x TransformerBlock [N, H]
      -> final RMSNorm [N, H] -> LM head [N, V] -> logits [B, S, V]

The backward (``_backward``) is the forward's call list in reverse. A forward
keeps no per-call state on the model: caches are returned, not stored, so one
model can serve forwards (``forward``, ``forward_cached`` with a cache per thread,
``loss_terms``) to several threads at once. The gradient is different: it lives in
one buffer per model (``flat_grads``), so ``loss_and_grad`` / ``loss_terms_and_grad``
run one at a time per model; a second call from another thread while one runs raises
``InUseError`` at once instead of mixing two gradients. Use one model per thread.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .attention import KVLayerCache, build_rope
from .config import Config
from .errors import InputError, InUseError
from .layers import embedding_backward, embedding_forward, rmsnorm_backward, rmsnorm_forward
from .loss import cross_entropy_backward, cross_entropy_forward
from .moe import BlockCache, BlockWeights, MoEWeights, aux_loss, block_backward, block_forward
from .params import ParamStore
from .tensor import check_dtype, kaiming_normal_


class LossTerms(NamedTuple):
    total: float  # ce + aux
    ce: float  # cross-entropy
    aux: float  # sum over layers of the aux loss, alpha included


def validate_token_ids(
    ids: object, vocab_size: int, max_seq_len: int, name: str = "token_ids"
) -> np.ndarray:
    """Check ``ids`` is an integer array [B, S] of values in [0, vocab_size), S <= max_seq_len.

    NumPy would silently wrap negative indices, so this is checked here. Returns int64 [B, S].
    """
    arr = np.asarray(ids)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise InputError(f"{name} must have shape [batch, seq] (2 dims), got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(f"{name} must have batch >= 1 and seq >= 1, got shape {arr.shape}")
    if arr.shape[1] > max_seq_len:
        raise InputError(f"{name} has sequence length {arr.shape[1]} > max_seq_len {max_seq_len}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(f"{name} must be in [0, {vocab_size}) (vocab_size), found {bad}")
    return arr.astype(np.int64, copy=False)


def parameter_specs(cfg: Config) -> list[tuple[str, tuple[int, ...], int | None]]:
    """(name, shape, fan_in) of every parameter in buffer order; fan_in None = RMSNorm gain.

    q, k, v of a layer are adjacent, so ``[Wq; Wk; Wv]`` is one view (a fused product).
    """
    h, v, e, f = cfg.hidden_dim, cfg.vocab_size, cfg.n_experts, cfg.ffn_dim
    q, kv = cfg.q_dim, cfg.kv_dim
    specs: list[tuple[str, tuple[int, ...], int | None]] = [("embed.weight", (v, h), h)]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        specs += [
            (p + "attn_norm.weight", (h,), None),
            (p + "attn.q_proj.weight", (q, h), h),
            (p + "attn.k_proj.weight", (kv, h), h),
            (p + "attn.v_proj.weight", (kv, h), h),
            (p + "attn.o_proj.weight", (h, q), q),
            (p + "ffn_norm.weight", (h,), None),
            (p + "moe.router.weight", (e, h), h),
            (p + "moe.gate_proj.weight", (e, f, h), h),
            (p + "moe.up_proj.weight", (e, f, h), h),
            (p + "moe.down_proj.weight", (e, h, f), f),
        ]
    specs += [("final_norm.weight", (h,), None), ("lm_head.weight", (v, h), h)]
    return specs


class KVCache:
    """Per-layer rotated keys and values for incremental decoding."""

    def __init__(self, cfg: Config, batch_size: int, max_len: int, dtype: np.dtype):
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if not 1 <= max_len <= cfg.max_seq_len:
            raise InputError(f"max_len must be in [1, {cfg.max_seq_len}], got {max_len}")
        shape = (batch_size, max_len, cfg.n_kv_heads, cfg.head_dim)  # [B, T_max, nKV, D]
        self.layers = [
            KVLayerCache(np.zeros(shape, dtype), np.zeros(shape, dtype))
            for _ in range(cfg.n_layers)
        ]
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0  # positions filled so far


class MoETransformer:
    """The SPEC.md model: forward, exact backward, parameters in one flat buffer."""

    def __init__(self, config: Config, seed: int = 42, dtype: object = np.float32):
        if not isinstance(config, Config):
            raise InputError(f"config must be an nn_core.Config, got {type(config).__name__}")
        self.config = config
        self.dtype = check_dtype(dtype)
        specs = parameter_specs(config)
        self.store = ParamStore([(name, shape) for name, shape, _ in specs], self.dtype)
        rng = np.random.default_rng(seed)
        for name, _, fan_in in specs:  # Kaiming/He init, gains 1, in buffer order
            view = self.store.params[name]
            if fan_in is None:
                view[...] = 1  # RMSNorm gains start at 1
            else:
                kaiming_normal_(rng, view, fan_in)
        self.rope = build_rope(
            config.rope_theta,
            config.head_dim,
            config.max_seq_len,
            config.n_heads,
            config.n_kv_heads,
            self.dtype,
        )
        self._w = self._layer_views(self.store.flat, self.store.params)
        self._dw = self._layer_views(self.store.grad, self.store.grads)
        self._grad_lock = threading.Lock()  # one gradient computation at a time

    def __getstate__(self) -> dict[str, Any]:  # pickling: a lock is not picklable
        state = dict(self.__dict__)
        del state["_grad_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._grad_lock = threading.Lock()

    def _layer_views(self, buffer: np.ndarray, named: dict[str, np.ndarray]) -> list[BlockWeights]:
        out = []
        for i in range(self.config.n_layers):
            p = f"layers.{i}."
            out.append(
                BlockWeights(
                    attn_norm=named[p + "attn_norm.weight"],
                    qkv=self.store.span(p + "attn.q_proj.weight", p + "attn.v_proj.weight", buffer),
                    o=named[p + "attn.o_proj.weight"],
                    ffn_norm=named[p + "ffn_norm.weight"],
                    moe=MoEWeights(
                        *(
                            named[p + f"moe.{n}.weight"]
                            for n in ("router", "gate_proj", "up_proj", "down_proj")
                        )
                    ),
                )
            )
        return out

    # ---- parameter access ------------------------------------------------------
    @property
    def layer_weights(self) -> list[BlockWeights]:
        """Per layer, the parameter views grouped as the block functions take them
        (``qkv`` is the adjacent Wq|Wk|Wv rows as one [Q + 2KV, H] matrix)."""
        return self._w

    @property
    def flat_params(self) -> np.ndarray:
        """All parameters, one 1-D buffer."""
        return self.store.flat

    @property
    def flat_grads(self) -> np.ndarray:
        """All gradients, the same layout as ``flat_params``."""
        return self.store.grad

    def parameters(self) -> dict[str, np.ndarray]:
        """Name -> writable view into the flat parameter buffer."""
        return dict(self.store.params)

    def gradients(self) -> dict[str, np.ndarray]:
        """Name -> view into the flat gradient buffer."""
        return dict(self.store.grads)

    def zero_grad(self) -> None:
        self.store.grad.fill(0)

    def num_params(self) -> int:
        return self.store.size

    # ---- input checks ----------------------------------------------------------
    def _check_ids(self, ids: object, name: str = "token_ids") -> np.ndarray:
        return validate_token_ids(ids, self.config.vocab_size, self.config.max_seq_len, name)

    def _check_targets(self, targets: object, ids: np.ndarray) -> np.ndarray:
        t = self._check_ids(targets, "targets")
        if t.shape != ids.shape:
            raise InputError(f"targets must have the shape of token_ids {ids.shape}, got {t.shape}")
        return t

    # ---- forward ---------------------------------------------------------------
    def forward(self, token_ids: object) -> np.ndarray:
        """Logits [B, S, V] of the model dtype for integer token ids [B, S]."""
        ids = self._check_ids(token_ids)
        batch, seq = ids.shape
        x = embedding_forward(ids.reshape(-1), self.store.params["embed.weight"])  # [N, H]
        for w in self._w:
            x, _ = block_forward(x, batch, w, self.config, self.rope)
        return self._head(x).reshape(batch, seq, -1)

    def _head(self, x: np.ndarray) -> np.ndarray:
        """final RMSNorm, then LM head: [N, H] -> logits [N, V]."""
        y, _ = rmsnorm_forward(x, self.store.params["final_norm.weight"], self.config.rms_eps)
        return y @ self.store.params["lm_head.weight"].T

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for incremental decoding of up to ``max_len`` positions."""
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len, self.dtype)

    def forward_cached(self, token_ids: object, cache: KVCache) -> np.ndarray:
        """Logits [B, S_new, V] of new tokens at positions cache.length.., appended to the cache.

        Equal to the matching rows of ``forward`` on the whole sequence, to float rounding.
        """
        ids = self._check_ids(token_ids)
        batch, seq = ids.shape
        if batch != cache.batch_size:
            raise InputError(f"token_ids batch {batch} != KV cache batch {cache.batch_size}")
        if cache.length + seq > cache.max_len:
            raise InputError(
                f"KV cache holds {cache.length} of {cache.max_len} positions; {seq} more do not fit"
            )
        x = embedding_forward(ids.reshape(-1), self.store.params["embed.weight"])
        for w, kv in zip(self._w, cache.layers):
            x, _ = block_forward(x, batch, w, self.config, self.rope, cache.length, kv)
        cache.length += seq
        return self._head(x).reshape(batch, seq, -1)

    # ---- loss and backward -----------------------------------------------------
    def loss_terms(
        self, token_ids: object, targets: object, aux_loss_weight: float = 0.01
    ) -> LossTerms:
        """The loss without a backward (evaluation)."""
        ids = self._check_ids(token_ids)
        tgt = self._check_targets(targets, ids)
        return self._forward_loss(ids, tgt, aux_loss_weight, keep=False)[0]

    def loss_and_grad(
        self,
        token_ids: object,
        targets: object,
        aux_loss_weight: float = 0.01,
        *,
        activation_checkpointing: bool = False,
    ) -> float:
        """Zero the gradients, forward, CE + summed aux loss, backward; the total loss.

        Leaves the exact gradient of that loss in ``gradients()``.
        """
        return self.loss_terms_and_grad(
            token_ids, targets, aux_loss_weight, activation_checkpointing=activation_checkpointing
        ).total

    def loss_terms_and_grad(
        self,
        token_ids: object,
        targets: object,
        aux_loss_weight: float = 0.01,
        *,
        activation_checkpointing: bool = False,
    ) -> LossTerms:
        """As ``loss_and_grad``, returning (total, ce, aux).

        With ``activation_checkpointing`` each block keeps only its input during the
        forward and recomputes its internals in the backward: same gradients, bit for
        bit, less memory at long sequences.

        The gradient buffer is the model's own: while one call runs, another from a
        different thread raises ``InUseError`` (it would mix two gradients); use one
        model per thread.
        """
        ids = self._check_ids(token_ids)
        tgt = self._check_targets(targets, ids)
        if not self._grad_lock.acquire(blocking=False):
            raise InUseError(
                "loss_and_grad/loss_terms_and_grad is already running on this model in "
                "another thread; the gradient buffer (flat_grads) is shared, so concurrent "
                "calls would mix their gradients: use one model per thread (forwards may share)"
            )
        try:
            self.zero_grad()
            terms, state = self._forward_loss(
                ids, tgt, aux_loss_weight, keep=True, checkpoint=activation_checkpointing
            )
            self._backward(ids, state, aux_loss_weight)
        finally:
            self._grad_lock.release()
        return terms

    def _forward_loss(
        self, ids: np.ndarray, tgt: np.ndarray, alpha: float, keep: bool, checkpoint: bool = False
    ) -> tuple[LossTerms, tuple]:
        batch = ids.shape[0]
        params = self.store.params
        x = embedding_forward(ids.reshape(-1), params["embed.weight"])  # [N, H]
        inputs: list[np.ndarray] = []  # each block's input (checkpointing)
        caches: list[BlockCache | None] = []
        aux = 0.0
        for w in self._w:
            inputs.append(x)
            x, cache = block_forward(x, batch, w, self.config, self.rope)
            caches.append(None if checkpoint else cache)
            aux += aux_loss(cache.moe.routing, alpha)  # Total loss: L = L_ce + sum of L_aux
        y, final_cache = rmsnorm_forward(x, params["final_norm.weight"], self.config.rms_eps)
        logits = y @ params["lm_head.weight"].T  # LM head   [N, V]
        ce, ce_cache = cross_entropy_forward(logits, tgt.reshape(-1))
        terms = LossTerms(ce + aux, ce, aux)
        state = (inputs, caches, y, final_cache, ce_cache) if keep else ()
        return terms, state

    def _backward(self, ids: np.ndarray, state: tuple, alpha: float) -> None:
        """The forward's call list in reverse, one line per layer."""
        inputs, caches, y, final_cache, ce_cache = state
        batch = ids.shape[0]
        params, grads = self.store.params, self.store.grads
        dlogits = cross_entropy_backward(ce_cache)  # [N, V]
        grads["lm_head.weight"] += dlogits.T @ y
        dy = dlogits @ params["lm_head.weight"]  # [N, H]
        dx = rmsnorm_backward(
            dy, final_cache, params["final_norm.weight"], grads["final_norm.weight"]
        )
        for i in reversed(range(self.config.n_layers)):
            cache = caches[i]
            if cache is None:  # activation checkpointing: recompute the block's internals
                _, cache = block_forward(inputs[i], batch, self._w[i], self.config, self.rope)
            dx = block_backward(dx, cache, self._w[i], self._dw[i], self.config, self.rope, alpha)
        embedding_backward(dx, ids.reshape(-1), grads["embed.weight"])

    # ---- weights on disk -------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write the weights and config (safetensors + JSON, no pickle) to directory ``path``.

        ``path`` must be absent, empty or an nn-core model directory; another nn-core
        directory is replaced only with ``overwrite=True``; anything else never
        (``nn_core.checkpoint.save_model``)."""
        from .checkpoint import save_model

        save_model(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> MoETransformer:
        """Load a model written by ``save`` (or a training checkpoint), verifying it."""
        from .checkpoint import load_model

        return load_model(path)
