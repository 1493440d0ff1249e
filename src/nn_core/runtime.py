"""Process-level settings for programs that run the model (the CLI, the benchmark).

A library should not change its host process behind its back, so nothing here runs
on import: ``nn-core train`` and ``python -m nn_core.bench`` call these explicitly
and the benchmark records what it applied in its metadata.
"""

from __future__ import annotations

import sys


def tune_malloc() -> bool:
    """glibc only: keep freed blocks up to 64 MiB in the heap instead of unmapping them.

    Every training step allocates multi-MB NumPy temporaries (logits [N, V], expert
    activations ...). With glibc's default thresholds each is a fresh mmap that is
    page-faulted in and unmapped again; on the 2-core reference machine that was ~30%
    of the time in the kernel and made `nn-core train` about 1.5-2x slower. mallopt
    changes that for this process only. Returns True if applied; no-op elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    ok = mallopt(m_mmap_threshold, 64 << 20) == 1
    ok = mallopt(m_trim_threshold, 256 << 20) == 1 and ok
    return mallopt(m_top_pad, 16 << 20) == 1 and ok
