"""The one setting every subprocess timeout in the tests derives from.

``NN_CORE_TEST_TIMEOUT`` (seconds, default 600) bounds each subprocess a test starts,
so that a hung child fails its test instead of hanging the run. It is a guard against
hangs, not a speed check: on a slow or loaded machine raise it; no test asserts how
fast anything runs (the benchmark measures that). A test that legitimately needs
more uses a multiple of it.
"""

from __future__ import annotations

import math
import os


def _read_timeout(name: str = "NN_CORE_TEST_TIMEOUT", default: str = "600") -> float:
    raw = os.environ.get(name, default)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a number of seconds > 0, got {raw!r}")
    return value


SUBPROCESS_TIMEOUT = _read_timeout()  # seconds, for one subprocess.run in a test
