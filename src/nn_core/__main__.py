"""``python -m nn_core``: the nn-core command line (see nn_core.app.cli)."""

from __future__ import annotations

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
