"""``python -m nn_core.bench``: see nn_core.bench.runner."""

from __future__ import annotations

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
