"""``python -m nn_core``: the nn-core command line (see nn_core.cli)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
