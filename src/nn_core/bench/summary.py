"""``--summary``: a markdown table of medians from benchmark JSON files of the suite schema.

Reads this package's output and the siblings' (Rust, Julia, Go) alike: only
``scenarios[].id`` and ``median_ns`` (or ``timings_ns``) are needed; anything
else missing is tolerated. Ratios are other / first, so 2.00x means "takes twice
as long as the first file".
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


def sources(docs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """One line per file: language, CPU, OS, timestamp (what is known)."""
    out = []
    for lab, doc in docs:
        m = doc.get("metadata") or {}
        bits = [str(m[k]) for k in ("cpu_model", "os", "timestamp") if m.get(k)]
        out.append(f"- {lab}: " + (", ".join(bits) if bits else "no metadata"))
    return "\n".join(out)


def summarize(paths: Sequence[str]) -> str:
    """The table for ``paths`` (ratios against the first), then the sources."""
    docs = [(label(doc, p), doc) for p, doc in ((p, load(p)) for p in paths)]
    return summary_table(docs) + "\n\n" + sources(docs)
