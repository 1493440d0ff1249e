"""The names of what nn-core writes: files of checkpoints and run directories, formats.

One place, read by the writers (``checkpoint``, ``weights``) and by ``ownership``, which
recognizes nn-core's own files by them.
"""

from __future__ import annotations

import re

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
LATEST_FILE = "latest"  # a run directory's pointer to its newest checkpoint
STEP_DIR_RE = re.compile(r"^step_(\d{6,})$")  # a run directory's checkpoints: step_000100
PLOTS_DIR = "plots"  # a run directory's plots (PNG files only), written by nn-core plot/train
RUN_MARKER = ".nn-core-run"  # marks a run directory; the writers' lock file (holds a pid)
WEIGHTS_FORMAT = "nn-core-weights"  # safetensors metadata "format" of an exported file
WEIGHTS_FORMAT_VERSION = 1
