"""Values and the candidates table: reading a row's numbers, formatting them, comparing with the baseline.

The bottom of the report package: it imports nothing from the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runtime_shim.bench import result_value as _get  # one reader of harness results

DASH = "—"
MB = 1e6  # the unit of edgepack bench and of the profiles' bundle_size_mb budget


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _pct(value: Any) -> float | None:
    v = _num(value)
    if v is None:
        return None
    return v * 100.0 if v <= 1.0 else v


def _mb(value: Any) -> float | None:
    v = _num(value)
    return None if v is None else v / MB


def _fmt_fixed(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:,.{digits}f}"


def _fmt_ms(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _fmt_qps(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _fmt_threads(value: Any) -> str:
    if value is None:
        return DASH
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or DASH
    return str(value)


@dataclass(frozen=True)
class Column:
    """One column of the candidates table: how to read it from a row, format it and compare it."""

    header: str
    value: Callable[[Mapping[str, Any]], float | None]
    fmt: Callable[[float], str]
    better: str | None = None  # "higher" or "lower": colours the comparison with the baseline
    compare: str | None = None  # "points" (difference in percentage points) or "ratio"
    title: str = ""
    headline: bool = False  # the markdown table compares only these, to stay readable as plain text


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[Column]:
    pct = _fmt_fixed(2)
    cols = [
        Column("Accuracy %", lambda r: _pct(r.get("accuracy")), pct, "higher", "points",
               "test accuracy with the calibrated out-of-scope threshold", headline=True),
        Column("Raw acc. %", lambda r: _pct(r.get("accuracy_raw")), pct, "higher", "points",
               "test accuracy without the threshold (argmax)"),
        Column("In-scope %", lambda r: _pct(r.get("in_scope_accuracy")), pct, "higher", "points",
               "accuracy on the in-scope queries"),
        Column("OOS recall %", lambda r: _pct(r.get("oos_recall")), pct, "higher", "points",
               "share of out-of-scope queries predicted out of scope"),
        Column("Agree %", lambda r: _pct(r.get("agreement")), pct, "higher", "points",
               "share of queries with the teacher's prediction"),
        Column("Model MB", lambda r: _mb(r.get("model_bytes")), _fmt_fixed(2), "lower", "ratio",
               "model file size, MB of 10^6 bytes", headline=True),
        Column("Bundle MB", lambda r: _mb(r.get("bundle_bytes")), _fmt_fixed(2), "lower", "ratio",
               "whole bundle on disk"),
        Column("p50 ms", lambda r: _num(_get(r, "latency_ms.p50")), _fmt_ms, "lower", "ratio",
               "single query end to end (tokenize + run + softmax), median", headline=True),
        Column("mean ms", lambda r: _num(_get(r, "latency_ms.mean")), _fmt_ms, "lower", "ratio"),
        Column("p95 ms", lambda r: _num(_get(r, "latency_ms.p95")), _fmt_ms, "lower", "ratio"),
        Column("p99 ms", lambda r: _num(_get(r, "latency_ms.p99")), _fmt_ms, "lower", "ratio"),
    ]
    for batch in _batch_sizes(rows):
        cols.append(Column(f"qps b{batch}", lambda r, b=batch: _num(_get(r, "throughput_qps").get(b))
                           if isinstance(_get(r, "throughput_qps"), Mapping) else None,
                           _fmt_qps, "higher", "ratio", f"throughput at batch {batch}, queries per second"))
    cols.append(Column("Peak RSS MB", lambda r: _num(r.get("peak_rss_mb")), _fmt_fixed(0), "lower", "ratio",
                       "peak resident memory of the process"))
    return cols


def _batch_sizes(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    sizes = {str(k) for r in rows if isinstance(r.get("throughput_qps"), Mapping)
             for k in r["throughput_qps"]}
    if not sizes:
        sizes = {"1", "32"}
    return sorted(sizes, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))


def _compare(col: Column, value: float | None, base: float | None) -> tuple[str, str] | None:
    """The comparison text with the baseline and its tone ("good", "bad" or "")."""
    if value is None or base is None or col.compare is None:
        return None
    if col.compare == "points":
        diff = value - base
        text = f"{diff:+.2f} pt".replace("-", "−")
        good = diff > 0 if col.better == "higher" else diff < 0
        return text, ("" if abs(diff) < 0.005 else "good" if good else "bad")
    if base == 0:
        return None
    ratio = value / base
    text = f"×{ratio:.0f}" if ratio >= 10 else f"×{ratio:.2f}" if round(ratio, 2) >= 0.1 else f"×{ratio:.2g}"
    good = ratio > 1 if col.better == "higher" else ratio < 1
    return text, ("" if abs(ratio - 1) < 0.005 else "good" if good else "bad")


def _speedup(base: float | None, value: float | None) -> str | None:
    if not base or not value:
        return None
    r = base / value
    return f"{r:.1f}×" if r < 100 else f"{r:.0f}×"


def _cell(col: Column, row: Mapping[str, Any]) -> str:
    v = col.value(row)
    return DASH if v is None else col.fmt(v)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _fmt_budget(v: Any) -> Any:
    n = _num(v)
    if n is None:
        return v
    return f"{n:g}" if abs(n) >= 0.01 or n == 0 else f"{n:.3g}"
