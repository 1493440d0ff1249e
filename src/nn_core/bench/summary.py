"""``--summary``: markdown tables from benchmark JSON files of the suite schema.

Reads this package's output and that of the suite's other implementations (Rust,
Julia, Go) alike: only ``scenarios[].id`` and ``median_ns`` (or ``timings_ns``) are
needed; anything else missing is tolerated (shown as '-').

1. The medians: a row per scenario, a column per file and a ratio column (other /
   first, so 2.00x means "takes twice as long as the first file").
2. The headline figures, a column per file (``headline_figures``): inference/s and
   train steps/s at T4, the T2/T1 and T4/T1 speed-ups of both, the cold/warm ratio
   and the matmul kernel's GFLOP/s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


def fmt_ns(ns: float | None) -> str:
    """A duration in the unit that keeps 3-4 significant digits; '-' when missing."""
    if ns is None:
        return "-"
    if ns < 1e3:
        return f"{ns:.0f} ns"
    if ns < 1e6:
        return f"{ns / 1e3:.2f} us"
    if ns < 1e9:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.2f} s"


def fmt_ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base <= 0:
        return "-"
    return f"{value / base:.2f}x"


def load(path: str) -> dict[str, Any]:
    """A benchmark document; raises ValueError naming the file if it is not one."""
    with open(path) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or "scenarios" not in doc:
        raise ValueError(f"{path} has no 'scenarios' (not a benchmark result)")
    return doc


def scenario_records(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The scenario objects (the suite's, then any extras), whether stored as a list or as
    a mapping id -> object."""
    out: list[dict[str, Any]] = []
    for key in ("scenarios", "extras"):
        sc = doc.get(key) or []
        if isinstance(sc, dict):
            out += [{"id": k, **v} for k, v in sc.items() if isinstance(v, dict)]
        else:
            out += [r for r in sc if isinstance(r, dict) and "id" in r]
    return out


def median_of(rec: dict[str, Any]) -> float | None:
    """median_ns, else the median of timings_ns, else None."""
    med = rec.get("median_ns")
    if isinstance(med, (int, float)) and not isinstance(med, bool):
        return float(med)
    timings = rec.get("timings_ns")
    if isinstance(timings, list) and timings:
        try:
            return float(np.median(np.asarray(timings, dtype=np.float64)))
        except (TypeError, ValueError):
            return None
    return None


def label(doc: dict[str, Any], path: str) -> str:
    lang = (doc.get("metadata") or {}).get("language")
    name = os.path.basename(path)
    return f"{lang} ({name})" if lang else name


def summary_table(docs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Markdown: one row per scenario id (first file's order, then new ids), a median
    column per file and a ratio column (file / first) for every file after the first."""
    if not docs:
        raise ValueError("summary needs at least one file")
    tables: list[dict[str, dict[str, Any]]] = []
    order: list[str] = []
    for _, doc in docs:
        recs = {r["id"]: r for r in scenario_records(doc)}
        tables.append(recs)
        order.extend(i for i in recs if i not in order)
    first_label = docs[0][0]
    header = ["scenario", "axis", first_label]
    for lab, _ in docs[1:]:
        header += [lab, f"ratio vs {first_label}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for sid in order:
        axis = next((t[sid].get("axis") for t in tables if sid in t and t[sid].get("axis")), "")
        base = median_of(tables[0][sid]) if sid in tables[0] else None
        cells = [sid, str(axis or "-"), fmt_ns(base)]
        for t in tables[1:]:
            med = median_of(t[sid]) if sid in t else None
            cells += [fmt_ns(med), fmt_ratio(med, base)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _by_id(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in scenario_records(doc)}


def ops_per_sec(recs: dict[str, dict[str, Any]], sid: str, t: int) -> float | None:
    """Operations per second of a parallel scenario: T instances' ops / median wall time."""
    med = median_of(recs[sid]) if sid in recs else None
    return t / (med * 1e-9) if med else None


def speedup(recs: dict[str, dict[str, Any]], prefix: str, t: int) -> float | None:
    """Throughput at T over throughput at T1: (T / median_T) / (1 / median_T1)."""
    fast, base = ops_per_sec(recs, f"{prefix}{t}", t), ops_per_sec(recs, f"{prefix}1", 1)
    return fast / base if fast is not None and base else None


def matmul_flops(rec: dict[str, Any]) -> int:
    """The matmul kernel's flops per call: known_flops, else 2 M K N from its params
    (the suite's ``M``/``K``/``N`` or our ``m``/``k``/``n``), else the suite's 64^3."""
    known = rec.get("known_flops")
    if isinstance(known, (int, float)) and not isinstance(known, bool) and known > 0:
        return int(known)
    p = rec.get("params") or {}
    try:
        dims = [int(p.get(a, p.get(a.lower(), 64))) for a in "MKN"]
    except (TypeError, ValueError):
        dims = [64, 64, 64]
    return 2 * dims[0] * dims[1] * dims[2]


def headline_figures(recs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The figures of one file, by label (None where its scenarios are missing)."""
    warm = median_of(recs["dispatch_warm"]) if "dispatch_warm" in recs else None
    cold = median_of(recs["dispatch_cold"]) if "dispatch_cold" in recs else None
    mm = recs.get("kernel_matmul")
    mm_med = median_of(mm) if mm is not None else None
    return {
        "inference/s at T4 (parallel_T4)": ops_per_sec(recs, "parallel_T4", 4),
        "train steps/s at T4 (parallel_train_T4)": ops_per_sec(recs, "parallel_train_T4", 4),
        "forward speed-up T2/T1": speedup(recs, "parallel_T", 2),
        "forward speed-up T4/T1": speedup(recs, "parallel_T", 4),
        "train speed-up T2/T1": speedup(recs, "parallel_train_T", 2),
        "train speed-up T4/T1": speedup(recs, "parallel_train_T", 4),
        "cold/warm (dispatch_cold / dispatch_warm)": cold / warm if cold and warm else None,
        "GFLOP/s (kernel_matmul)": (
            matmul_flops(mm) / mm_med if mm is not None and mm_med else None
        ),
    }


def _fmt_figure(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    if "speed-up" in name or "cold/warm" in name:
        return f"{value:.2f}x"
    if "GFLOP/s" in name:
        return f"{value:.2f}"
    return f"{value:,.0f}"


def headline_table(docs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Markdown: a row per headline figure, a column per file."""
    figures = [headline_figures(_by_id(doc)) for _, doc in docs]
    header = ["figure", *(lab for lab, _ in docs)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in figures[0]:
        cells = [name, *(_fmt_figure(name, f[name]) for f in figures)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sources(docs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """One line per file: language, CPU, OS, timestamp (what is known)."""
    out = []
    for lab, doc in docs:
        m = doc.get("metadata") or {}
        bits = [str(m[k]) for k in ("cpu_model", "os", "timestamp") if m.get(k)]
        out.append(f"- {lab}: " + (", ".join(bits) if bits else "no metadata"))
    return "\n".join(out)


def summarize(paths: Sequence[str]) -> str:
    """The medians (ratios against the first file), the headline figures, the sources."""
    docs = [(label(doc, p), doc) for p, doc in ((p, load(p)) for p in paths)]
    return "\n\n".join((summary_table(docs), headline_table(docs), sources(docs)))
