"""The README's "Library" block, read from README.md and run as a user would paste it.

It runs in a fresh directory (it writes ``ckpt/``), statement by statement, so that the
values its comments state can be checked against what the statements return.
(The "Weights for PyTorch" block is run by tests/test_interop.py, also from README.md.)
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from readme import readme_python_block

from nn_core import Config


def run_block(source: str) -> tuple[dict[str, Any], dict[int, Any]]:
    """Execute ``source``; return its namespace and {line: value} of its bare expressions."""
    namespace: dict[str, Any] = {}
    values: dict[int, Any] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Expr):
            code = compile(ast.Expression(node.value), "README.md Library", "eval")
            values[node.lineno] = eval(code, namespace)  # the README's own text
        else:
            code = compile(ast.Module([node], type_ignores=[]), "README.md Library", "exec")
            exec(code, namespace)
    return namespace, values


def line_of(source: str, start: str) -> tuple[int, str]:
    """(1-based number, text) of the block's line starting with ``start``."""
    for number, line in enumerate(source.splitlines(), start=1):
        if line.startswith(start):
            return number, line
    raise AssertionError(f"the README's Library block has no line starting {start!r}")


def test_library_block_runs_and_its_comments_state_what_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = readme_python_block("## Library")
    monkeypatch.chdir(tmp_path)
    namespace, values = run_block(source)

    number, line = line_of(source, "cfg.total_params(), cfg.active_params()")
    stated = re.search(r"#\s*([\d,]+) / ([\d,]+); ([\d.e+]+) / ([\d.e+]+) for default_6_9b", line)
    assert stated, line
    assert values[number] == (int(stated[1].replace(",", "")), int(stated[2].replace(",", "")))
    big = Config.default_6_9b()
    assert f"{big.total_params():.2e}".replace("e+0", "e") == stated[3], line
    assert f"{big.active_params():.2e}".replace("e+0", "e") == stated[4], line

    _, line = line_of(source, "logits = model.forward(ids)")
    shape = re.search(r"#\s*\[([\d, ]+)\]", line)
    assert shape, line
    assert list(namespace["logits"].shape) == [int(n) for n in shape[1].split(",")], line
    assert np.isfinite(namespace["loss"])

    number, line = line_of(source, "trainer.train_step(")
    keys = re.search(r"#\s*\{(.*)\}", line)
    assert keys, line
    assert set(values[number]) == set(re.findall(r'"(\w+)"', keys[1])), line

    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    number, _ = line_of(source, "generate(model, [1, 2, 3], max_len=40)")
    tokens = values[number]
    assert len(tokens) == 40 and tokens[:3] == [1, 2, 3]
