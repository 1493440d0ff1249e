"""Expert telemetry: what every layer's router did, from the routing statistics of a step.

Shape legend: L layers, E experts, K top-k, N tokens, V vocab.

Computed from ``nn_core.model.moe.RoutingStats`` (per layer: assignments per expert,
summed router probabilities, summed routing entropy, tokens), the sums the forward
already builds for the aux loss (for a training step: ``Trainer.last_routing_stats``, its
whole batch over micro-batches and ranks); nothing here runs the model again. Per layer l:

    load[l][e]    f_e = c_e / (N K): the fraction of (token, slot) assignments that went
                  to expert e -- the aux loss's f_e. Sums to 1; a uniform router gives 1/E.
    prob[l][e]    P_e = (1/N) sum_t p_te: expert e's mean router probability -- the aux
                  loss's P_e. Sums to 1.
    entropy[l]    (1/N) sum_t H(p_t), H(p) = -sum_e p_e log p_e: the mean entropy (nats) of
                  each token's full softmax over experts; in [0, log E]. log E: the router
                  cannot tell the experts apart; 0: every token is sure of its expert.
    max_min[l]    max_e c_e / min_e c_e: the most loaded expert's assignments over the
                  least loaded one's (1 = perfectly balanced); None (JSON null) when an
                  expert got no assignment (the ratio is infinite).
    unused[l]     the number of experts that got no assignment (c_e = 0).

``ExpertTelemetry.as_dict`` is the ``"experts"`` field of a metrics.jsonl record (and
``"val_experts"`` of an evaluation). ``expert_report`` is the per-token view: for a text,
each expert's load and the input tokens it takes most often.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..checks import check_int
from ..errors import InputError
from ..model.config import Config
from ..model.moe import RoutingStats, routing_stats
from .distributed import sum_stats

if TYPE_CHECKING:
    from ..model.transformer import MoETransformer


@dataclass(frozen=True)
class ExpertTelemetry:
    """Per layer expert load, mean router probability and entropy (see the module doc)."""

    load: list[list[float]]  # [L][E] f_e
    prob: list[list[float]]  # [L][E] P_e
    entropy: list[float]  # [L] mean routing entropy, nats
    max_min: list[float | None]  # [L] max_e c_e / min_e c_e; None if some c_e = 0
    unused: list[int]  # [L] experts with c_e = 0
    tokens: int  # N: tokens routed in each layer

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: {"load", "prob", "entropy", "max_min", "unused", "tokens"}."""
        return {
            "load": self.load,
            "prob": self.prob,
            "entropy": self.entropy,
            "max_min": self.max_min,
            "unused": self.unused,
            "tokens": self.tokens,
        }

    @property
    def worst_max_min(self) -> float:
        """The largest max/min load ratio over the layers; inf if an expert got nothing."""
        return worst_max_min(self.as_dict())


def worst_max_min(experts: dict[str, Any]) -> float:
    """The worst layer's max/min load ratio of an ``"experts"`` record (inf: an expert
    of some layer got no token; nan: no layers)."""
    ratios = experts["max_min"]
    if not ratios:
        return math.nan
    return max(math.inf if r is None else float(r) for r in ratios)


def expert_telemetry(stats: Sequence[RoutingStats]) -> ExpertTelemetry:
    """Telemetry of one step (or of summed steps) from each layer's ``RoutingStats``."""
    if not stats:
        raise InputError("stats must hold the routing statistics of at least one layer")
    load, prob, entropy, max_min, unused = [], [], [], [], []
    tokens = int(stats[0].tokens)
    for s in stats:
        counts = [int(c) for c in np.asarray(s.counts).tolist()]  # [E] c_e (E is small)
        n, assignments = int(s.tokens), sum(counts)  # N, N K
        if n <= 0 or assignments <= 0:
            raise InputError("routing statistics of an empty batch (no tokens)")
        load.append([c / assignments for c in counts])  # f_e = c_e / (N K)
        prob.append((np.asarray(s.prob_sum, np.float64) / n).tolist())  # P_e = sum_t p_te / N
        entropy.append(float(s.entropy_sum) / n)  # (1/N) sum_t H(p_t)
        low, high = min(counts), max(counts)
        max_min.append(None if low == 0 else high / low)
        unused.append(counts.count(0))
    return ExpertTelemetry(load, prob, entropy, max_min, unused, tokens)


def empty_routing_stats(config: Config) -> list[RoutingStats]:
    """Per layer, the routing statistics of no tokens (zeros): the start of a sum
    (``nn_core.training.distributed.sum_stats`` adds two batches' statistics)."""
    e = config.n_experts
    return [
        RoutingStats(np.zeros(e, np.int64), np.zeros(e), 0.0, 0) for _ in range(config.n_layers)
    ]


# ---- which tokens each expert takes --------------------------------------------------------


class _Decoder(Protocol):
    def decode(self, ids: np.ndarray) -> str: ...


def token_text(tokenizer: _Decoder, token_id: int) -> str:
    """One token as text; a token that is no whole character alone (a UTF-8 byte of a
    longer character, BOS/EOS) as <id>."""
    text = tokenizer.decode(np.asarray([token_id], dtype=np.int64))
    return text if text and "\ufffd" not in text else f"<{token_id}>"


def expert_report(
    model: MoETransformer,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    tokenizer: _Decoder,
    *,
    top: int = 10,
) -> dict[str, Any]:
    """What each expert of each layer takes, on ``batches`` of (inputs, targets) [B, S].

    For every (token, slot) assignment to expert e the input token at that position is
    counted (at layer l > 0 the router sees the position's hidden state, which mixes in
    the context; the token is what a reader can name). Returns the telemetry of all the
    batches (``expert_telemetry``: "load", "prob", "entropy", "max_min", "unused",
    "tokens") plus "top_k" and "layers": per layer {"layer", "experts": per expert
    {"expert", "count" (assignments), "load" (f_e), "prob" (P_e), "top_tokens": the
    ``top`` most frequent input tokens, each {"id", "text", "count", "share" (of the
    expert's assignments), "lift" (share / the token's frequency in the text)}}}.
    """
    top = check_int(top, "top", 1, error=InputError)
    cfg = model.config
    n_layers, n_experts, vocab = cfg.n_layers, cfg.n_experts, cfg.vocab_size
    pairs = np.zeros((n_layers, n_experts * vocab), np.int64)  # [L, E*V] (expert, token)
    freq = np.zeros(vocab, np.int64)  # [V] tokens of the text
    total = empty_routing_stats(cfg)  # summed over the batches
    for inputs, targets in batches:
        state = model.forward_loss(inputs, targets, 0.0)
        ids = np.asarray(inputs, np.int64).reshape(-1)  # [N]
        freq += np.bincount(ids, minlength=vocab)
        for i, routing in enumerate(state.routing):
            # the (expert, token) pair of every assignment, as one index e*V + v   [N, K]
            pairs[i] += np.bincount(
                (routing.top_idx * vocab + ids[:, None]).reshape(-1), minlength=n_experts * vocab
            )
        total = sum_stats(total, [routing_stats(r) for r in state.routing])
    if total[0].tokens == 0:
        raise InputError("batches is empty: no text to route")
    tel = expert_telemetry(total)
    token_share = freq / freq.sum()  # [V] each token's frequency in the text
    layers = []
    for i in range(n_layers):
        by_expert = pairs[i].reshape(n_experts, vocab)  # [E, V]
        experts = []
        for e in range(n_experts):
            row = by_expert[e]
            count = int(row.sum())
            best = np.argsort(-row, kind="stable")[:top]
            best = best[row[best] > 0]
            experts.append(
                {
                    "expert": e,
                    "count": count,
                    "load": tel.load[i][e],
                    "prob": tel.prob[i][e],
                    "top_tokens": [
                        {
                            "id": int(v),
                            "text": token_text(tokenizer, int(v)),
                            "count": int(row[v]),
                            "share": int(row[v]) / count,
                            "lift": int(row[v]) / count / float(token_share[v]),
                        }
                        for v in best
                    ],
                }
            )
        layers.append({"layer": i, "experts": experts})
    return {**tel.as_dict(), "top_k": cfg.top_k_experts, "layers": layers}
