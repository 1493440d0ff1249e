"""An independent PyTorch implementation of the nn-core model: the parity oracle.

Written from the formulas of docs/model.md and docs/training.md with plain ``torch`` ops,
straightforwardly (a loop over heads, a loop over experts): clarity over speed.
Its backward is torch autograd, so it is a second opinion on nn-core's
hand-derived gradients. It shares no code with nn-core; the config is a plain
dict (``nn_core.Config(...).to_dict()`` or a config JSON), so the module also
works standalone, e.g. to load exported weights:

    model = TorchMoE(json.load(open("config.json")), torch.float32)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    tokens = greedy_generate(model, [1, 2, 3], max_len=16)

Parameter names equal nn-core's (docs/model.md, section 16), so a state dict moves 1:1.

Shape legend: B batch, S sequence, H hidden_dim, nH n_heads, nKV n_kv_heads,
D head_dim, E n_experts, K top_k_experts, F ffn_dim, V vocab_size, N = B*S.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _as_config_dict(config: Any) -> dict[str, Any]:
    """Accept a plain mapping or anything with ``to_dict()`` (e.g. nn_core.Config)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return dict(config)


def _as_torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = getattr(dtype, "__name__", None) or str(dtype)  # np.float64 / "float64"
    return {"float32": torch.float32, "float64": torch.float64}[name]


class ExpertWeights(nn.Module):
    """A stack of E expert matrices, stored [E, out_features, in_features]."""

    def __init__(self, n_experts: int, out_features: int, in_features: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features, dtype=dtype))


class RMSNorm(nn.Module):
    """RMSNorm: y = x * 1/sqrt(mean(x^2) + eps) * gamma."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))  # [H], gamma init 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


def rope_theta(config: Mapping[str, Any]) -> float:
    """NTK-aware RoPE: base' = base * alpha^(D / (D - 2)) when alpha > 1."""
    base, alpha, d = float(config["rope_base"]), float(config["rope_alpha"]), config["head_dim"]
    return base * alpha ** (d / (d - 2)) if alpha > 1 else base


def apply_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on interleaved pairs (x[2i], x[2i+1]) of every head vector.

    x: [B, S, nHeads, D]; position t = index along S; f_i = 1 / theta^(2i/D);
    pair -> [x0 cos(t f_i) - x1 sin(t f_i), x0 sin(t f_i) + x1 cos(t f_i)].
    """
    _, s, _, d = x.shape
    i = torch.arange(d // 2, dtype=torch.float64)  # [D/2]
    freqs = 1.0 / theta ** (2.0 * i / d)  # [D/2]  f_i
    angles = torch.arange(s, dtype=torch.float64)[:, None] * freqs[None, :]  # [S, D/2]  t * f_i
    cos = torch.cos(angles).to(x.dtype)[None, :, None, :]  # [1, S, 1, D/2]
    sin = torch.sin(angles).to(x.dtype)[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]  # [B, S, nHeads, D/2] each
    out0 = x0 * cos - x1 * sin
    out1 = x0 * sin + x1 * cos
    return torch.stack((out0, out1), dim=-1).flatten(-2)  # [B, S, nHeads, D], re-interleaved


class Attention(nn.Module):
    """Multi-query attention: query head h reads kv head h % nKV; causal; 1/sqrt(D)."""

    def __init__(self, config: Mapping[str, Any], dtype: torch.dtype):
        super().__init__()
        h, d = config["hidden_dim"], config["head_dim"]
        self.n_heads, self.n_kv_heads, self.head_dim = config["n_heads"], config["n_kv_heads"], d
        self.theta = rope_theta(config)
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False, dtype=dtype)  # W [Q, H]
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=False, dtype=dtype)  # W [KV, H]
        self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=False, dtype=dtype)  # W [KV, H]
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False, dtype=dtype)  # W [H, Q]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, H] -> [B, S, H]
        b, s, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, s, self.n_heads, d)  # [B, S, nH, D]
        k = self.k_proj(x).view(b, s, self.n_kv_heads, d)  # [B, S, nKV, D]
        v = self.v_proj(x).view(b, s, self.n_kv_heads, d)  # [B, S, nKV, D]
        q, k = apply_rope(q, self.theta), apply_rope(k, self.theta)
        future = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)  # [S, S] True above
        heads = []
        for hq in range(self.n_heads):
            hkv = hq % self.n_kv_heads  # query head h uses kv head h % nKV
            scores = q[:, :, hq] @ k[:, :, hkv].transpose(-1, -2) / math.sqrt(d)  # [B, S, S]
            scores = scores.masked_fill(future, float("-inf"))  # causal mask
            probs = torch.softmax(scores, dim=-1)  # [B, S, S]
            heads.append(probs @ v[:, :, hkv])  # [B, S, D]
        return self.o_proj(torch.cat(heads, dim=-1))  # heads concatenated [B, S, Q] -> [B, S, H]


class MoE(nn.Module):
    """Router (softmax -> top-k -> renormalize) over E SwiGLU experts, plus the aux loss."""

    def __init__(self, config: Mapping[str, Any], dtype: torch.dtype):
        super().__init__()
        h, e, f = config["hidden_dim"], config["n_experts"], config["ffn_dim"]
        self.n_experts, self.top_k = e, config["top_k_experts"]
        self.router = nn.Linear(h, e, bias=False, dtype=dtype)  # Wr [E, H]
        self.gate_proj = ExpertWeights(e, f, h, dtype)  # Wg [E, F, H]
        self.up_proj = ExpertWeights(e, f, h, dtype)  # Wu [E, F, H]
        self.down_proj = ExpertWeights(e, h, f, dtype)  # Wd [E, H, F]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:  # [n, H] -> [n, H]
        """SwiGLU expert: Down(SiLU(Gate(x)) * Up(x))."""
        g = x @ self.gate_proj.weight[e].T  # [n, F]
        u = x @ self.up_proj.weight[e].T  # [n, F]
        return (F.silu(g) * u) @ self.down_proj.weight[e].T  # [n, H]

    def forward(self, x: torch.Tensor, aux_loss_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, H] -> (out [B, S, H], L_aux scalar)."""
        b, s, h = x.shape
        xf = x.reshape(b * s, h)  # [N, H]
        probs = torch.softmax(self.router(xf), dim=-1)  # [N, E]  probs = softmax(x Wr^T)
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)  # [N, K] kept experts
        weights = top_p / top_p.sum(dim=-1, keepdim=True)  # [N, K]  w_k = p_k / sum_K p_j
        out = torch.zeros_like(xf)  # [N, H]
        for e in range(self.n_experts):
            chosen = top_i == e  # [N, K]
            tokens = chosen.any(dim=-1).nonzero().flatten()  # [n] tokens routed to e
            if tokens.numel() == 0:
                continue
            w_e = (weights * chosen).sum(dim=-1)[tokens]  # [n]
            out = out.index_add(0, tokens, w_e[:, None] * self.expert(e, xf[tokens]))
        # L_aux = alpha * E * sum_e f_e * P_e; f_e constant, P_e differentiable
        with torch.no_grad():
            counts = torch.bincount(top_i.flatten(), minlength=self.n_experts)  # [E]
            f = counts.to(x.dtype) / top_i.numel()  # fraction of (token, slot) assignments
        p_mean = probs.mean(dim=0)  # [E]  P_e
        aux = aux_loss_weight * self.n_experts * (f * p_mean).sum()
        return out.view(b, s, h), aux


class Block(nn.Module):
    """h = x + Attention(RMSNorm_attn(x)); out = h + MoE(RMSNorm_ffn(h))."""

    def __init__(self, config: Mapping[str, Any], dtype: torch.dtype):
        super().__init__()
        h, eps = config["hidden_dim"], float(config["rms_eps"])
        self.attn_norm = RMSNorm(h, eps, dtype)
        self.attn = Attention(config, dtype)
        self.ffn_norm = RMSNorm(h, eps, dtype)
        self.moe = MoE(config, dtype)

    def forward(self, x: torch.Tensor, aux_loss_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + self.attn(self.attn_norm(x))
        m, aux = self.moe(self.ffn_norm(h), aux_loss_weight)
        return h + m, aux


class TorchMoE(nn.Module):
    """The MoE transformer of docs/model.md; parameter names equal nn-core's."""

    def __init__(self, config: Any, dtype: Any = torch.float32, seed: int = 0):
        super().__init__()
        self.config = _as_config_dict(config)
        cfg, dtype = self.config, _as_torch_dtype(dtype)
        self.embed = nn.Embedding(cfg["vocab_size"], cfg["hidden_dim"], dtype=dtype)  # [V, H]
        self.layers = nn.ModuleList(Block(cfg, dtype) for _ in range(cfg["n_layers"]))
        self.final_norm = RMSNorm(cfg["hidden_dim"], float(cfg["rms_eps"]), dtype)
        self.lm_head = nn.Linear(cfg["hidden_dim"], cfg["vocab_size"], bias=False, dtype=dtype)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Kaiming normal, std = sqrt(2 / fan_in) (fan_in = H for the embedding); gains 1.

        Only for standalone use; parity tests load nn-core's parameters instead.
        """
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                fan_in = p.shape[-1]  # in_features; H for the embedding [V, H]
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
                p.mul_(math.sqrt(2.0 / fan_in))

    def forward_with_aux(
        self, token_ids: torch.Tensor, aux_loss_weight: float = 0.01
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """token_ids [B, S] -> (logits [B, S, V], sum over layers of L_aux)."""
        x = self.embed.weight[token_ids]  # [B, S, H]  out = W[token_id, :]
        aux_total = x.new_zeros(())
        for layer in self.layers:
            x, aux = layer(x, aux_loss_weight)
            aux_total = aux_total + aux
        return self.lm_head(self.final_norm(x)), aux_total  # [B, S, V]

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, V]
        return self.forward_with_aux(as_ids(token_ids))[0]

    def loss(
        self, token_ids: Any, targets: Any, aux_loss_weight: float = 0.01
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, ce, aux): L = L_ce + sum over layers of L_aux; L_ce mean over N tokens."""
        token_ids, targets = as_ids(token_ids), as_ids(targets)
        logits, aux = self.forward_with_aux(token_ids, aux_loss_weight)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return ce + aux, ce, aux


def as_ids(ids: Any) -> torch.Tensor:
    """Token ids (array, list or tensor) as an int64 tensor."""
    return torch.as_tensor(ids).to(torch.int64)


def load_arrays(model: TorchMoE, arrays: Mapping[str, Any]) -> TorchMoE:
    """Load ``{name: ndarray}`` (e.g. nn-core's ``parameters()``) into the module, strictly.

    The arrays are copied and cast to the module's dtype.
    """
    dtype = next(model.parameters()).dtype
    state = {name: torch.as_tensor(arr).clone().to(dtype) for name, arr in arrays.items()}
    model.load_state_dict(state, strict=True)
    return model


@torch.no_grad()
def greedy_generate(model: TorchMoE, prompt_ids: Sequence[int], max_len: int) -> list[int]:
    """The prompt followed by argmax tokens until the sequence holds max_len tokens.

    Re-runs the full sequence per step (no KV cache): the simplest correct decoder.
    """
    seq = [int(t) for t in prompt_ids]
    while len(seq) < max_len:
        logits = model(torch.tensor([seq], dtype=torch.int64))  # [1, S, V]
        seq.append(int(torch.argmax(logits[0, -1]).item()))  # first maximum, like np.argmax
    return seq
