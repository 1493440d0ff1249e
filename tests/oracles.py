"""Independent test oracles (torch, transformers) that cannot vanish silently.

A test that compares nn-core with an independent implementation imports that
implementation through ``require_oracle(name)`` instead of ``pytest.importorskip``:

- the module imports: it is returned and the test runs;
- it is missing or broken (importing it raises anything) and the environment variable
  ``NN_CORE_REQUIRE_ORACLES`` is unset (or "0"): the test is SKIPPED, with the error;
- it is missing or broken and ``NN_CORE_REQUIRE_ORACLES=1`` (CI sets it): the test
  FAILS. Called at module level, the module fails to collect and the run fails.

So a CI run cannot pass with its oracle tests quietly turned into skips.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRE_ORACLES = "NN_CORE_REQUIRE_ORACLES"


def oracles_required() -> bool:
    """True when ``NN_CORE_REQUIRE_ORACLES`` is set to anything but "" or "0"."""
    return os.environ.get(REQUIRE_ORACLES, "").strip() not in ("", "0")


def require_oracle(name: str) -> ModuleType:
    """Import the oracle module ``name``; skip, or fail when oracles are required."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install failing in any other way
        problem = f"test oracle {name!r} cannot be imported ({type(exc).__name__}: {exc})"
    # outside the except block: the report shows the problem, not a chained traceback
    if oracles_required():
        pytest.fail(f"{problem}; {REQUIRE_ORACLES}=1 requires it", pytrace=False)
    pytest.skip(problem, allow_module_level=True)
