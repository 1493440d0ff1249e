"""Scenarios outside the suite's 22; they run only when ``--scenario`` selects them.

Shape legend: B batch, P prompt length, G generated tokens, V vocab_size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..model.config import Config
from .harness import Workload
from .ops import make_model
from .scenarios import Scenario, make_inputs, register_extra


class GreedyDecodeWorkload(Workload):
    """Greedy generation of G new tokens after a P-token prompt (decoding speed).

    ``cached``: ``nn_core.inference.generate.generate`` (prefill once, then one-token steps on
    the KV cache); otherwise ``generate_uncached``, which re-runs the whole sequence
    every step, as the suite's other implementations (Rust, Julia, Go) do. Throughput
    counts the G new tokens.
    """

    def __init__(self, sc: Scenario, context: Any = None):
        super().__init__()
        p = sc.params
        cfg = Config.preset(str(p["config"]))
        self.prompt_len, self.new = int(p["prompt_len"]), int(p["new_tokens"])
        prompt, _ = make_inputs(1, self.prompt_len, cfg.vocab_size)  # [1, P]
        self.prompt = prompt[0]  # [P]
        self.model = make_model(cfg)
        self.cached = bool(p["cached"])
        self.tokens = self.new
        self.info = {"timed": "generate(...) of G new tokens, greedy, batch 1"}

    def run(self) -> Any:
        from ..inference.generate import generate, generate_uncached

        fn = generate if self.cached else generate_uncached
        return np.asarray(fn(self.model, self.prompt, self.prompt_len + self.new), dtype=float)


for _id, _cached in (("decode_kv_256", True), ("decode_uncached_256", False)):
    register_extra(
        Scenario(
            _id,
            "decoding",
            "custom",
            {
                "config": "tiny",
                "workload": "greedy_generate_" + ("kv_cache" if _cached else "rerun_sequence"),
                "prompt_len": 16,
                "new_tokens": 256,
                "cached": _cached,
            },
            factory=GreedyDecodeWorkload,
        )
    )
