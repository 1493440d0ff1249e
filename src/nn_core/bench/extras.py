"""Scenarios outside the suite's 22; they run only when ``--scenario`` selects them.

Shape legend: B batch, P prompt length, G generated tokens, V vocab_size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import Config
from .harness import Workload
from .scenarios import Scenario, make_inputs, register_extra
from .workloads import make_model


class GreedyDecodeWorkload(Workload):
    """Prefill a [B, P] prompt into a fresh KV cache, then G-1 greedy single-token steps.

    One run yields G new tokens per row; throughput counts those B*G tokens.
    """

    def __init__(self, sc: Scenario, context: Any = None):
        super().__init__()
        p = sc.params
        cfg = Config.preset(str(p["config"]))
        self.batch, self.prompt_len, self.new = (
            int(p["batch"]),
            int(p["prompt_len"]),
            int(p["new_tokens"]),
        )
        self.prompt, _ = make_inputs(self.batch, self.prompt_len, cfg.vocab_size)  # [B, P]
        self.model = make_model(cfg)
        self.tokens = self.batch * self.new
        self.info = {"timed": "new_kv_cache + prefill + (G-1) cached single-token forwards"}

    def run(self) -> Any:
        model = self.model
        cache = model.new_kv_cache(self.batch, self.prompt_len + self.new)
        logits = model.forward_cached(self.prompt, cache)  # [B, P, V]
        out = np.empty((self.batch, self.new), dtype=np.int64)  # [B, G]
        for g in range(self.new):
            out[:, g] = np.argmax(logits[:, -1, :], axis=-1)
            if g + 1 < self.new:
                logits = model.forward_cached(out[:, g : g + 1], cache)  # [B, 1, V]
        return logits


register_extra(
    Scenario(
        "decode_greedy_kv",
        "decoding",
        "custom",
        {
            "config": "tiny",
            "workload": "greedy_decode",
            "batch": 1,
            "prompt_len": 8,
            "new_tokens": 32,
        },
        factory=GreedyDecodeWorkload,
    )
)
