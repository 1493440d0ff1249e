"""MoETransformer: the whole model over one flat parameter buffer.

Shape legend: B batch, S sequence, H hidden, V vocab, E experts, L layers, N = B*S tokens.

    token_ids [B, S] -> Embedding [N, H] -> n_layers x TransformerBlock [N, H]
      -> final RMSNorm [N, H] -> LM head [N, V] -> logits [B, S, V]

``forward_loss`` runs the forward and the loss and keeps what the backward needs;
``backward`` is the forward's call list in reverse, one line per layer. Between the two,
the routing statistics of every layer can be read (and, for data parallelism, the aux
loss's expert fractions f_e replaced by those of a larger batch).

Buffers: every call gets its arrays from a workspace kept per (thread, purpose, batch
shape) (``nn_core.model.workspace``), so repeated calls allocate nothing but their
results, and forwards in several threads never share a buffer. A forward that no
backward follows (``forward``, ``forward_cached``) runs every layer on one set of
buffers; ``forward_loss`` keeps each layer's activations apart, for the backward.
``forward`` returns a fresh logits array. Gradients live in one shared flat buffer:
gradient calls on one model must not overlap in several threads (a second one raises
InUseError at once instead of mixing two gradients): use one model per thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np

from ..checks import check_int, check_number, check_token_ids
from ..errors import InputError, InUseError
from .attention import KVCache, KVLayer, build_rope
from .blas import blas_threads, threads_for
from .block import (
    BlockCache,
    BlockStep,
    BlockWeights,
    block_backward,
    block_forward,
    block_step,
    block_step_buffers,
    step_rmsnorm,
)
from .config import Config
from .layers import (
    FusedBackward,
    RMSNormCache,
    embedding_backward,
    embedding_forward,
    linear_backward,
    linear_forward,
    rmsnorm_backward,
    rmsnorm_forward,
)
from .loss import CECache, cross_entropy_backward, cross_entropy_forward
from .moe import MoEWeights, Routing, RoutingStats, aux_loss, routing_stats
from .params import ParamStore, Part, single, stacked
from .tensor import check_dtype, kaiming_normal_
from .workspace import Workspace, buffer

WORKSPACES_PER_THREAD = 4  # batch shapes whose buffers a thread keeps (least recently used go)


class LossTerms(NamedTuple):
    total: float  # ce + aux
    ce: float  # cross-entropy
    aux: float  # sum over layers of the aux loss, alpha included


def validate_token_ids(
    ids: object, vocab_size: int, max_seq_len: int, name: str = "token_ids"
) -> np.ndarray:
    """An integer array [B, S] of ids in [0, vocab_size) with S <= max_seq_len, as int64."""
    return check_token_ids(ids, vocab_size, max_len=max_seq_len, name=name)


# ---------------------------------------------------------------------------- parameters


def parameter_layout(
    cfg: Config,
) -> tuple[list[tuple[str, tuple[int, ...], tuple[Part, ...]]], dict[str, int | None]]:
    """The flat buffer's slabs, in order, and each tensor's fan-in (None: an RMSNorm gain).

    Linear weights are stored transposed ([in, out]); q, k, v of a layer form one slab
    [H, Q + 2KV] (one product); each expert's gate and up form one slab [E, H, 2F] (one
    product per expert). See ``nn_core.model.params`` for the layout.
    """
    h, v, e, f = cfg.hidden_dim, cfg.vocab_size, cfg.n_experts, cfg.ffn_dim
    q, kv = cfg.q_dim, cfg.kv_dim
    slabs = [single("embed.weight", (v, h))]
    fan_in: dict[str, int | None] = {"embed.weight": h}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        names = [p + "attn.q_proj.weight", p + "attn.k_proj.weight", p + "attn.v_proj.weight"]
        gate_up = [p + "moe.gate_proj.weight", p + "moe.up_proj.weight"]
        slabs += [
            single(p + "attn_norm.weight", (h,)),
            stacked(p + "attn.qkv", names, [(q, h), (kv, h), (kv, h)], 1, transposed=True),
            single(p + "attn.o_proj.weight", (h, q), transposed=True),
            single(p + "ffn_norm.weight", (h,)),
            single(p + "moe.router.weight", (e, h)),
            stacked(p + "moe.gate_up", gate_up, [(e, f, h), (e, f, h)], 2, transposed=True),
            single(p + "moe.down_proj.weight", (e, h, f), transposed=True),
        ]
        fan_in.update({n: h for n in names + gate_up})
        fan_in.update({p + "attn_norm.weight": None, p + "ffn_norm.weight": None})
        fan_in.update({p + "attn.o_proj.weight": q, p + "moe.router.weight": h})
        fan_in[p + "moe.down_proj.weight"] = f
    slabs += [single("final_norm.weight", (h,)), single("lm_head.weight", (v, h), transposed=True)]
    fan_in.update({"final_norm.weight": None, "lm_head.weight": h})
    return slabs, fan_in


def parameter_specs(cfg: Config) -> list[tuple[str, tuple[int, ...], int | None]]:
    """(name, shape, fan_in) of every parameter tensor, in buffer order."""
    slabs, fan_in = parameter_layout(cfg)
    return [(part.name, part.shape, fan_in[part.name]) for _, _, parts in slabs for part in parts]


# ---------------------------------------------------------------------------- decoding


class DecodeBuffers(NamedTuple):
    """What ``MoETransformer.decode_step`` reuses for B rows, made once per thread and B."""

    x: np.ndarray  # [B, H] the residual stream
    block: BlockStep  # every layer's arrays (the layers run one after the other)
    ws: Workspace  # the MoE's buffers when B*K is above FEW_ASSIGNMENTS
    threads: int | None  # BLAS threads for a step (blas.threads_for)

    @staticmethod
    def make(model: MoETransformer, batch: int) -> DecodeBuffers:
        dt = model.dtype
        return DecodeBuffers(
            np.empty((batch, model.config.hidden_dim), dt),
            block_step_buffers(batch, model.config, dt),
            Workspace(),
            model.blas_threads_for(batch),
        )


# ---------------------------------------------------------------------------- loss state


class LossState:
    """What ``forward_loss`` keeps for ``backward``: the loss terms, each layer's routing
    and the activations (in the workspace of the call)."""

    def __init__(
        self,
        terms: LossTerms,
        routing: list[Routing],
        *,
        ids: np.ndarray,
        alpha: float,
        inputs: list[np.ndarray],
        caches: list[BlockCache | None],
        final: tuple[np.ndarray, RMSNormCache],
        ce: CECache,
        workspace: Workspace,
    ) -> None:
        self.terms = terms
        self.routing = routing  # per layer
        self.ids = ids  # [B, S]
        self.alpha = alpha
        self.inputs = inputs  # each block's input [N, H]
        self.caches = caches  # None per block under activation checkpointing
        self.final = final  # (final-norm output y [N, H], its cache)
        self.ce = ce
        self.workspace = workspace
        self.generation = workspace.generation

    def routing_stats(self) -> list[RoutingStats]:
        """Per layer: expert counts, summed router probabilities and entropies."""
        return [routing_stats(r) for r in self.routing]


# ---------------------------------------------------------------------------- the model


class MoETransformer:
    """The model: forward, exact backward, parameters in one flat buffer."""

    def __init__(self, config: Config, seed: int = 42, dtype: object = np.float32):
        if not isinstance(config, Config):
            raise InputError(f"config must be an nn_core.Config, got {type(config).__name__}")
        self.config = config
        self.dtype = check_dtype(dtype)
        check_int(seed, "seed", 0)
        slabs, fan_in = parameter_layout(config)
        self.store = ParamStore(slabs, self.dtype)
        rng = np.random.default_rng(seed)
        for name, view in self.store.params.items():  # Kaiming/He init, gains 1, in order
            if fan_in[name] is None:
                view[...] = 1  # RMSNorm gains start at 1
            else:
                kaiming_normal_(rng, view, int(fan_in[name]))  # type: ignore[arg-type]
        self.rope = build_rope(config.rope_theta, config.head_dim, config.max_seq_len, self.dtype)
        self._views()
        self._tls = threading.local()  # per-thread workspaces
        self._grad_lock = threading.Lock()

    def _views(self) -> None:
        """The storage views the layer functions take (weights and their gradients)."""
        self._w = self._layer_views(self.store.flat)
        self._dw = self._layer_views(self.store.grad)
        self._lm_head = self.store.slab("lm_head.weight", self.store.flat)  # W^T [H, V]
        self._embed = self.store.view("embed.weight", self.store.flat)  # [V, H]
        self._final_norm = self.store.view("final_norm.weight", self.store.flat)  # [H]
        self._dlm_head = self.store.slab("lm_head.weight", self.store.grad)

    def _layer_views(self, buffer: np.ndarray) -> list[BlockWeights]:
        s = self.store
        cfg = self.config
        out = []
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            out.append(
                BlockWeights(
                    attn_norm=s.view(p + "attn_norm.weight", buffer),
                    qkv=s.slab(p + "attn.qkv", buffer),
                    o=s.slab(p + "attn.o_proj.weight", buffer),
                    ffn_norm=s.view(p + "ffn_norm.weight", buffer),
                    moe=MoEWeights(
                        s.view(p + "moe.router.weight", buffer),
                        s.slab(p + "moe.gate_up", buffer),
                        s.slab(p + "moe.down_proj.weight", buffer),
                    ),
                )
            )
        return out

    def __getstate__(self) -> dict[str, Any]:  # picklable: per-thread state is rebuilt
        state = self.__dict__.copy()
        for name in (
            "_tls",
            "_grad_lock",
            "_w",
            "_dw",
            "_lm_head",
            "_dlm_head",
            "_embed",
            "_final_norm",
        ):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.store.params = self.store.views(self.store.flat)
        self.store.grads = self.store.views(self.store.grad)
        self._views()
        self._tls = threading.local()
        self._grad_lock = threading.Lock()

    # ---- parameter access ------------------------------------------------------
    @property
    def layer_weights(self) -> list[BlockWeights]:
        """Per layer, the parameter views grouped as the block functions take them."""
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

    # ---- per-call machinery ----------------------------------------------------
    def _check_ids(self, ids: object, name: str = "token_ids") -> np.ndarray:
        return validate_token_ids(ids, self.config.vocab_size, self.config.max_seq_len, name)

    def _check_targets(self, targets: object, ids: np.ndarray) -> np.ndarray:
        t = self._check_ids(targets, "targets")
        if t.shape != ids.shape:
            raise InputError(f"targets must have the shape of token_ids {ids.shape}, got {t.shape}")
        return t

    def _workspace(self, purpose: str, shape: tuple[int, ...]) -> Workspace:
        """This thread's workspace for (purpose, shape); the least recently used go."""
        spaces: OrderedDict[tuple[Any, ...], Workspace] | None = getattr(self._tls, "spaces", None)
        if spaces is None:
            spaces = self._tls.spaces = OrderedDict()
        key = (purpose, *shape)
        ws = spaces.get(key)
        if ws is None:
            ws = spaces[key] = Workspace()
            while len(spaces) > WORKSPACES_PER_THREAD:
                spaces.popitem(last=False)
        else:
            spaces.move_to_end(key)
        return ws

    def blas_threads_for(self, n_tokens: int) -> int | None:
        """BLAS threads for a call on ``n_tokens`` rows (``blas.threads_for`` of the largest
        product: the LM head, the q|k|v projection or an expert's gate|up at even load)."""
        c = self.config
        widest = max(
            c.vocab_size, c.q_dim + 2 * c.kv_dim, 2 * c.ffn_dim * c.top_k_experts // c.n_experts
        )
        return threads_for(n_tokens * c.hidden_dim * widest)

    def _layer_key(self, i: int, checkpointing: bool) -> str:
        return "block." if checkpointing else f"l{i}."

    # ---- forward ---------------------------------------------------------------
    def forward(self, token_ids: object) -> np.ndarray:
        """Logits [B, S, V] of the model dtype for integer token ids [B, S] (a new array)."""
        ids = self._check_ids(token_ids)
        batch, seq = ids.shape
        ws = self._workspace("forward", ids.shape)
        with blas_threads(self.blas_threads_for(ids.size)):
            x = embedding_forward(ids.reshape(-1), self.store.params["embed.weight"], ws, "embed.")
            for w in self._w:  # no backward follows: every layer reuses one set of buffers
                x, _ = block_forward(x, batch, w, self.config, self.rope, ws=ws, key="block.")
            return self._head(x, ws).reshape(batch, seq, -1)

    def _head(self, x: np.ndarray, ws: Workspace, out: np.ndarray | None = None) -> np.ndarray:
        """final RMSNorm, then LM head: [N, H] -> logits [N, V] (into ``out`` or a new array)."""
        p = self.store.params
        y, _ = rmsnorm_forward(x, p["final_norm.weight"], self.config.rms_eps, ws, "final.")
        if out is None:
            out = np.empty((y.shape[0], self._lm_head.shape[1]), y.dtype)
        return linear_forward(y, self._lm_head, out=out)  # LM head: Linear H -> V

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for incremental decoding of up to ``max_len`` positions."""
        cfg = self.config
        batch_size = check_int(batch_size, "batch_size", 1, error=InputError)
        max_len = cfg.max_seq_len if max_len is None else max_len
        check_int(max_len, "max_len", 1, cfg.max_seq_len, error=InputError)
        return KVCache(cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim, max_len, self.dtype)

    def forward_cached(self, token_ids: object, cache: KVCache) -> np.ndarray:
        """Logits [B, S_new, V] of new tokens at positions cache.length.., appended to the cache.

        Equal to the matching rows of ``forward`` on the whole sequence, to float rounding.
        """
        return self._forward_cached(self._check_ids(token_ids), cache)

    def decode_step(
        self, token_ids: object, cache: KVCache, *, check_ids: bool = True
    ) -> np.ndarray:
        """Logits [B, V] of one new token per row (token_ids [B]) at position cache.length.

        The same computation as ``forward_cached(token_ids[:, None], cache)[:, 0]``.
        ``check_ids=False`` skips the id range check, for ids already known to be in
        [0, vocab_size) (a sampler's picks).
        """
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.shape[0] != cache.batch_size:
            raise InputError(
                f"token_ids must have shape [batch] = ({cache.batch_size},) (one token per "
                f"row of the KV cache), got shape {ids.shape}"
            )
        if check_ids:
            ids = check_token_ids(ids, self.config.vocab_size, ndim=1)
        return self._decode(ids, cache)

    def _forward_cached(self, ids: np.ndarray, cache: KVCache) -> np.ndarray:
        batch, seq = ids.shape
        if batch != cache.batch_size:
            raise InputError(f"token_ids batch {batch} != KV cache batch {cache.batch_size}")
        if seq == 1:  # one new token per row: the decoding arrangement
            return self._decode(ids[:, 0], cache)[:, None]
        if cache.length + seq > cache.max_len:
            raise InputError(
                f"KV cache holds {cache.length} of {cache.max_len} positions; {seq} more do not fit"
            )
        ws = self._workspace("cached", ids.shape)
        start = cache.length
        with blas_threads(self.blas_threads_for(ids.size)):
            x = embedding_forward(ids.reshape(-1), self.store.params["embed.weight"], ws, "embed.")
            for i, w in enumerate(self._w):
                kv = KVLayer(cache.k[i], cache.v[i])
                x, _ = block_forward(x, batch, w, self.config, self.rope, start, kv, ws, "block.")
            cache.length = start + seq
            return self._head(x, ws).reshape(batch, seq, -1)

    def _decode(self, ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """Logits [B, V] (a new array) of one token per row, ids [B] in range, at position
        cache.length: embedding, ``block_step`` per layer, final RMSNorm, LM head."""
        start = cache.length
        if start >= cache.max_len:
            raise InputError(
                f"KV cache holds {start} of {cache.max_len} positions; 1 more does not fit"
            )
        batch = ids.shape[0]
        steps: dict[int, DecodeBuffers] | None = getattr(self._tls, "steps", None)
        if steps is None:
            steps = self._tls.steps = {}
        b = steps.get(batch)
        if b is None:
            if len(steps) >= WORKSPACES_PER_THREAD:  # a bounded set of batch sizes
                steps.clear()
            b = steps[batch] = DecodeBuffers.make(self, batch)
        cfg, rope = self.config, self.rope
        with blas_threads(b.threads):
            x = embedding_forward(ids, self._embed, out=b.x)  # [B, H]
            for w, kv in zip(self._w, cache.layers):  # cache.layers: per layer KVLayer(k, v)
                block_step(x, w, cfg, rope, start, kv, b.block, b.ws)
            cache.length = start + 1
            y = step_rmsnorm(x, self._final_norm, cfg.rms_eps, b.block)  # final RMSNorm
            logits = np.empty((batch, self._lm_head.shape[1]), y.dtype)  # [B, V], returned
            return linear_forward(y, self._lm_head, out=logits)  # LM head: Linear H -> V

    # ---- loss and backward -----------------------------------------------------
    def forward_loss(
        self,
        token_ids: object,
        targets: object,
        aux_loss_weight: float = 0.01,
        *,
        activation_checkpointing: bool = False,
        fused: FusedBackward | None = None,
    ) -> LossState:
        """Forward and loss (CE + summed aux); returns what ``backward`` needs.

        Total loss: L = L_ce + sum over layers of L_aux. The state's activations live in
        this thread's workspace for this batch shape: call ``backward`` before the next
        ``forward_loss`` of the same shape on this thread (a stale state is refused).
        With ``activation_checkpointing`` each block keeps only its input and recomputes
        its internals in the backward: same gradients, bit for bit, less memory.
        ``fused``: compiled training lines (``layers.FusedBackward``; the forward takes its
        ``experts``), equal to the NumPy ones to rounding; pass the same to ``backward``.
        """
        ids = self._check_ids(token_ids)
        tgt = self._check_targets(targets, ids)
        alpha = check_number(aux_loss_weight, "aux_loss_weight", 0.0, np.inf, high_open=True)
        ws = self._workspace("loss", ids.shape)
        with blas_threads(self.blas_threads_for(ids.size)):
            return self._forward_loss(ids, tgt, alpha, activation_checkpointing, ws, fused)

    def _forward_loss(
        self,
        ids: np.ndarray,
        tgt: np.ndarray,
        alpha: float,
        checkpoint: bool,
        ws: Workspace,
        fused: FusedBackward | None = None,
    ) -> LossState:
        ws.generation += 1
        batch = ids.shape[0]
        params = self.store.params
        x = embedding_forward(ids.reshape(-1), params["embed.weight"], ws, "embed.")  # [N, H]
        inputs: list[np.ndarray] = []  # each block's input
        caches: list[BlockCache | None] = []
        routing: list[Routing] = []
        aux = 0.0
        for i, w in enumerate(self._w):
            if checkpoint:  # keep a copy of the input; the blocks share one set of buffers
                saved = buffer(ws, f"in{i}", x.shape, x.dtype)
                np.copyto(saved, x)
                x = saved
            inputs.append(x)
            key = self._layer_key(i, checkpoint)
            x, cache = block_forward(
                x, batch, w, self.config, self.rope, ws=ws, key=key, fused=fused
            )
            caches.append(None if checkpoint else cache)
            routing.append(cache.moe.routing)
            aux += aux_loss(cache.moe.routing, alpha)  # Total loss: L = L_ce + sum of L_aux
        y, final_cache = rmsnorm_forward(
            x, params["final_norm.weight"], self.config.rms_eps, ws, "final."
        )
        logits = linear_forward(y, self._lm_head, ws, "lm_head.")  # LM head   [N, V]
        ce, ce_cache = cross_entropy_forward(logits, tgt.reshape(-1), ws, "ce.")
        terms = LossTerms(ce + aux, ce, aux)
        return LossState(
            terms,
            routing,
            ids=ids,
            alpha=alpha,
            inputs=inputs,
            caches=caches,
            final=(y, final_cache),
            ce=ce_cache,
            workspace=ws,
        )

    def backward(
        self,
        state: LossState,
        *,
        scale: float = 1.0,
        fractions: np.ndarray | None = None,
        zero_grad: bool = False,
        fused: FusedBackward | None = None,
    ) -> None:
        """Add the gradient of ``scale`` * (the state's loss) into ``flat_grads`` (into
        zeroed gradients with ``zero_grad``: then they hold exactly that gradient).

        ``fractions`` [L, E]: each layer's aux-loss f_e taken from a larger batch this one
        is part of (data parallelism), instead of this batch's own. ``fused``: compiled
        element-wise backward lines (``layers.FusedBackward``; the trainer hands in
        ``nn_core.training.kernels.fused_backward()``), equal to the NumPy ones to
        rounding. Gradient calls on one model must not overlap in several threads
        (InUseError if they do).
        """
        if not isinstance(state, LossState):
            raise InputError(
                f"state must be a LossState from forward_loss, got {type(state).__name__}"
            )
        if state.generation != state.workspace.generation:
            raise InputError(
                "this LossState's activations were overwritten by a later forward_loss of the "
                "same batch shape on this thread; call backward before the next forward_loss"
            )
        if fractions is not None:
            fractions = np.asarray(fractions, dtype=np.float64)
            want = (self.config.n_layers, self.config.n_experts)
            if fractions.shape != want:
                raise InputError(f"fractions must have shape {want}, got {fractions.shape}")
        with self._gradient_writer(), blas_threads(self.blas_threads_for(state.ids.size)):
            # zero_grad: every gradient is written, not added (no separate zero fill)
            self._backward(state, float(scale), fractions, zero_grad, fused)

    def _gradient_writer(self) -> _GradientWriter:
        return _GradientWriter(self._grad_lock)

    def _backward(
        self,
        state: LossState,
        scale: float,
        fractions: np.ndarray | None,
        overwrite: bool = False,
        fused: FusedBackward | None = None,
    ) -> None:
        """The forward's call list in reverse, one line per layer.

        ``overwrite``: every parameter gradient is written instead of added, which
        leaves the gradient buffer holding exactly this gradient (as zero_grad, then
        adding, would, without the zero fill and the read-add-write passes).
        """
        ow = overwrite
        ws = state.workspace
        ids = state.ids
        batch = ids.shape[0]
        checkpoint = state.caches[0] is None if state.caches else False
        params, grads = self.store.params, self.store.grads
        alpha = state.alpha * scale
        y, final_cache = state.final
        dlogits = cross_entropy_backward(state.ce, scale)  # [N, V]
        dy = linear_backward(
            dlogits, y, self._lm_head, self._dlm_head, ws, "lm_head.", overwrite=ow
        )
        dx = rmsnorm_backward(
            dy,
            final_cache,
            params["final_norm.weight"],
            grads["final_norm.weight"],
            ws,
            "final.",
            overwrite=ow,
            fused=fused,
        )
        for i in reversed(range(self.config.n_layers)):
            key = self._layer_key(i, checkpoint)
            cache = state.caches[i]
            if cache is None:  # activation checkpointing: recompute the block's internals
                _, cache = block_forward(
                    state.inputs[i],
                    batch,
                    self._w[i],
                    self.config,
                    self.rope,
                    ws=ws,
                    key=key,
                    fused=fused,
                )
            f = None if fractions is None else fractions[i]
            dx = block_backward(
                dx,
                cache,
                self._w[i],
                self._dw[i],
                self.config,
                self.rope,
                alpha,
                f,
                ws,
                key,
                overwrite=ow,
                fused=fused,
            )
        embedding_backward(dx, ids.reshape(-1), grads["embed.weight"], overwrite=ow)
        ws.generation += 1  # the cross-entropy buffer was consumed: the state is spent

    def loss_terms(
        self, token_ids: object, targets: object, aux_loss_weight: float = 0.01
    ) -> LossTerms:
        """The loss without a backward (evaluation; a pending forward_loss state stays valid)."""
        ids = self._check_ids(token_ids)
        tgt = self._check_targets(targets, ids)
        alpha = check_number(aux_loss_weight, "aux_loss_weight", 0.0, np.inf, high_open=True)
        ws = self._workspace("eval", ids.shape)
        with blas_threads(self.blas_threads_for(ids.size)):
            return self._forward_loss(ids, tgt, alpha, False, ws).terms

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
        """As ``loss_and_grad``, returning (total, ce, aux)."""
        ids = self._check_ids(token_ids)
        tgt = self._check_targets(targets, ids)
        alpha = check_number(aux_loss_weight, "aux_loss_weight", 0.0, np.inf, high_open=True)
        ws = self._workspace("loss", ids.shape)
        with self._gradient_writer(), blas_threads(self.blas_threads_for(ids.size)):
            state = self._forward_loss(ids, tgt, alpha, activation_checkpointing, ws)
            self._backward(state, 1.0, None, True)  # written, not added: no zero fill
        return state.terms


class _GradientWriter:
    """Holds the model's gradient lock for one gradient call; a second, concurrent one
    is an error (the gradient buffer is shared: its result would be wrong)."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        if not self.lock.acquire(blocking=False):
            raise InUseError(
                "a gradient call (loss_and_grad / backward) is already running on this model "
                "in another thread; its gradient buffer is shared, so gradient calls must not "
                "overlap: use one model per thread"
            )

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
