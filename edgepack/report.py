"""The build report: ``report.html`` (one self-contained file) and ``report.md`` from benchmark rows.

A row is one candidate or stage (teacher, student, pruned, ONNX fp32, each quantized variant, the final
bundle) as the benchmark harness writes it: ``name``, ``accuracy`` (with the calibrated out-of-scope
threshold), ``accuracy_raw``, ``in_scope_accuracy``, ``oos_recall``, ``agreement``, ``model_bytes``,
``bundle_bytes``, ``latency_ms`` {p50, p95, p99, n}, ``tokenize_ms`` {p50}, ``model_ms`` {p50},
``throughput_qps`` {"1", "32"}, ``peak_rss_mb``, ``threads`` and optionally ``predictions``, ``gold`` and
``texts`` (lists, one item per test query). Any key may be missing; the report shows "—". Two optional
flags steer the comparison: ``"baseline": True`` marks the row the others are compared with (ratios in
the table, the "changed" list) and ``"final": True`` the row the summary is about (default: the last).

Accuracies are fractions in [0, 1] as the harness writes them (a value above 1 is taken as a percent
already). Sizes are in MB of 10**6 bytes, as ``edgepack bench`` and the profiles' budgets count them
(the reference recipe's published sizes are MiB: its 418.16 MB teacher is 438.5 MB here).

    write_report(Path("build"), rows, title="clinc150 build", budgets=[...], domains=json.load(...))

writes ``build/report.html``, ``build/report.md`` and the PNG plots the markdown links to.
Command line: ``python -m edgepack.report OUT_DIR RESULT.json... [--domains domains.json] [--title T]``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as _dt
import html
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime_shim.bench import result_value as _get  # one reader of harness results

from .errors import EdgepackError, ExitCode

DASH = "—"
MB = 1e6  # the unit of edgepack bench and of the profiles' bundle_size_mb budget
MAX_CHANGED = 50
OOS_LABELS = ("oos", "out_of_scope", "out-of-scope")
PLOTS = {
    "scatter": "report_accuracy_latency.png",
    "latency": "report_latency.png",
    "domains": "report_domains.png",
}
# Colour-blind friendly (Okabe-Ito) first, then tab20 for long candidate lists.
_PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


# ---------------------------------------------------------------- values


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


# ---------------------------------------------------------------- analyses


def _baseline(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return next((r for r in rows if r.get("baseline")), None)


def _final(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return next((r for r in rows if r.get("final")), rows[-1] if rows else None)


def _shared_list(rows: Sequence[Mapping[str, Any]], row: Mapping[str, Any], key: str, n: int) -> list | None:
    """``row[key]``, else the same list from another row of the same length (gold and texts are shared)."""
    own = row.get(key)
    if isinstance(own, list) and len(own) == n:
        return own
    return next((r[key] for r in rows if isinstance(r.get(key), list) and len(r[key]) == n), None)


def domain_accuracy(rows: Sequence[Mapping[str, Any]], domains: Mapping[str, Sequence[str]]
                    ) -> tuple[list[str], dict[str, dict[str, tuple[float, int]]]]:
    """Per-row accuracy on the queries of each domain, by gold label: ``(domain names, {row: {domain:
    (accuracy %, count)}})``. Gold labels in no domain form the "oos" group (CLINC150's out-of-scope
    class) or "other". Rows without predictions are left out."""
    to_domain = {intent: d for d, intents in domains.items() for intent in intents}
    names: list[str] = list(domains)
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for row in rows:
        preds = row.get("predictions")
        if not isinstance(preds, list) or not preds:
            continue
        gold = _shared_list(rows, row, "gold", len(preds))
        if gold is None:
            continue
        hits: dict[str, list[int]] = {}
        for p, g in zip(preds, gold, strict=True):
            d = to_domain.get(g) or ("oos" if str(g).lower() in OOS_LABELS else "other")
            h = hits.setdefault(d, [0, 0])
            h[0] += p == g
            h[1] += 1
        for extra in ("oos", "other"):
            if extra in hits and extra not in names:
                names.append(extra)
        out[str(row.get("name", "?"))] = {d: (100.0 * c / n, n) for d, (c, n) in hits.items()}
    return names, out


def changed_queries(reference: Mapping[str, Any], model: Mapping[str, Any],
                    rows: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]] | None:
    """Queries whose prediction differs between two rows with ``predictions`` (None when either lacks
    them or their lengths differ). Texts and gold come from either row or another row of the same length."""
    ref, new = reference.get("predictions"), model.get("predictions")
    if not isinstance(ref, list) or not isinstance(new, list) or len(ref) != len(new):
        return None
    pool = [model, reference, *rows]
    texts = _shared_list(pool, model, "texts", len(new)) or [None] * len(new)
    gold = _shared_list(pool, model, "gold", len(new)) or [None] * len(new)
    return [{"text": t, "gold": g, "teacher": a, "model": b}
            for t, g, a, b in zip(texts, gold, ref, new, strict=True) if a != b]


# ---------------------------------------------------------------- plots


def _colors(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    import matplotlib

    names = [str(r.get("name", "?")) for r in rows]
    if len(names) <= len(_PALETTE):
        return dict(zip(names, _PALETTE, strict=False))
    cmap = matplotlib.colormaps["tab20"]
    return {n: matplotlib.colors.to_hex(cmap(i % 20)) for i, n in enumerate(names)}


def _new_figure(w: float, h: float):
    # A bare Figure with its own Agg canvas: no pyplot, so the caller's backend and global state are
    # left alone and the report can be written from a build running in any thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def _style_axes(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)


def _log_if_spread(ax, values: Sequence[float], axis: str) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    vals = [v for v in values if v and v > 0]
    if vals and max(vals) / min(vals) > 8:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        target = ax.xaxis if axis == "x" else ax.yaxis
        target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        target.set_minor_formatter(NullFormatter())


def plot_accuracy_latency(rows: Sequence[Mapping[str, Any]]) -> tuple[bytes | None, list[str]]:
    """The reference recipe's ``plot_metrics``: accuracy against p50 latency, one point per model whose
    area is proportional to its model size, labelled, with a dashed line at the best accuracy.
    Returns the PNG (None when no row has both numbers) and the names left out."""
    from matplotlib.lines import Line2D

    colors = _colors(rows)
    pts, skipped = [], []
    for r in rows:
        acc, p50 = _pct(r.get("accuracy")), _num(_get(r, "latency_ms.p50"))
        if acc is None or p50 is None or p50 <= 0:
            skipped.append(str(r.get("name", "?")))
            continue
        pts.append((str(r.get("name", "?")), p50, acc, _num(r.get("model_bytes")), r))
    if not pts:
        return None, skipped
    fig = _new_figure(9.5, 5.6)
    ax = fig.add_subplot()
    _style_axes(ax)
    max_bytes = max((b for *_, b, _r in pts if b), default=None)
    s_max = 2600.0  # points^2 for the largest model; area, not radius, is proportional to bytes
    final = _final(rows)
    anns, obstacles = [], []
    for name, x, y, b, r in pts:
        s = max(s_max * b / max_bytes, 18.0) if (b and max_bytes) else 40.0
        ax.scatter([x], [y], s=s, color=colors[name], alpha=0.55 if b else 0.9,
                   marker="o" if b else "X", edgecolors="#111827" if r is final else colors[name],
                   linewidths=2.0 if r is final else 1.0, zorder=3)
        radius_pt = math.sqrt(s) / 2
        obstacles.append((x, y, radius_pt))
        anns.append(ax.annotate(name, (x, y), xytext=(radius_pt + 4, 0), textcoords="offset points",
                                va="center", fontsize=9, color="#111827", zorder=4))
    best = max(pts, key=lambda p: p[2])
    ax.axhline(best[2], color="#6b7280", linestyle="--", linewidth=1.0, zorder=1)
    # Named in a legend outside the axes, not on the line, where it would collide with point labels.
    best_handle = Line2D([], [], color="#6b7280", linestyle="--", linewidth=1.0,
                         label=f"best accuracy\n{best[2]:.2f}% ({best[0]})")
    xs = [p[1] for p in pts]
    _log_if_spread(ax, xs, "x")
    lo, hi = min(xs), max(xs)
    if ax.get_xscale() == "log":
        ax.set_xlim(lo / 1.6, hi * 6.0)  # room for the rightmost labels inside the axes
    else:
        pad = (hi - lo) * 0.15 or hi * 0.3
        ax.set_xlim(max(0.0, lo - pad), hi + pad * 2)
    ys = [p[2] for p in pts]
    span = max(ys) - min(ys)
    pad = max(span * 0.25, 0.6)
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.set_xlabel("p50 latency, single query end to end (ms" + (", log scale)" if ax.get_xscale() == "log" else ")"))
    ax.set_ylabel("accuracy (%)")
    handles, spacing, handlelength = [best_handle], 0.8, 2.0
    if max_bytes:
        # Size key: circles for round sizes within the candidates' range, scaled like the points.
        sizes = sorted({b for *_, b, _r in pts if b})
        keys = [k for k in (0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000)
                if sizes[0] / MB / 1.5 <= k <= sizes[-1] / MB]
        if len(keys) > 3:
            keys = [keys[0], keys[len(keys) // 2], keys[-1]]
        diameters = [math.sqrt(max(s_max * k * MB / max_bytes, 18.0)) for k in keys]  # points
        if keys:
            handles.append(Line2D([], [], linestyle="", label="model size\n(area ∝ bytes)"))
            handles += [Line2D([], [], linestyle="", marker="o", markersize=d, markerfacecolor="#e5e7eb",
                               markeredgecolor="#9ca3af", label=f"{k:g} MB") for k, d in zip(keys, diameters,
                                                                                              strict=True)]
            spacing, handlelength = max(1.2, diameters[-1] / 9.0), max(2.0, diameters[-1] / 8.0)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8,
              labelspacing=spacing, handlelength=handlelength, handletextpad=0.8, borderpad=0.6)
    _declutter(fig, anns, obstacles)
    return _png(fig), skipped


def _declutter(fig, anns, obstacles, fixed=()) -> None:
    """Move point labels off each other and off other points (candidates cluster: int8 variants).
    ``obstacles``: the points as (x, y, radius in points); ``fixed``: other texts to avoid. Tries the
    label's own row first, then rows alternately below and above it."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()
    px = fig.dpi / 72.0
    ax = anns[0].axes if anns else None
    boxes = []
    for x, y, r in obstacles:
        cx, cy = ax.transData.transform((x, y))
        boxes.append(Bbox.from_extents(cx - r * px, cy - r * px, cx + r * px, cy + r * px))
    placed: list = [t.get_window_extent(renderer) for t in fixed]
    for ann in sorted(anns, key=lambda a: -a.xy[1]):
        dx, dy0 = ann.xyann
        h = ann.get_window_extent(renderer).height / px + 1.5
        for step in (0, -1, 1, -2, 2, -3, 3, -4, 4, -5, 5):
            ann.xyann = (dx, dy0 + step * h)
            bb = ann.get_window_extent(renderer)
            if not any(bb.overlaps(o) for o in placed + boxes):
                break
        else:
            step = 0
            ann.xyann = (dx, dy0)
        if step:  # a leader line back to the point it names
            ax.annotate("", xy=ann.xy, xytext=ann.xyann, textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "color": "#9ca3af", "linewidth": 0.7, "shrinkA": 1,
                                    "shrinkB": abs(dx) - 4})
        placed.append(ann.get_window_extent(renderer))


def plot_latency(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Horizontal bars of p50/p95/p99 per model, with the p50 split into tokenize and model time."""
    data = [(str(r.get("name", "?")), [_num(_get(r, f"latency_ms.{q}")) for q in ("p50", "p95", "p99")])
            for r in rows]
    data = [(n, v) for n, v in data if any(x is not None for x in v)]
    if not data:
        return None
    fig = _new_figure(9.5, 0.42 * len(data) + 1.3)
    ax = fig.add_subplot()
    _style_axes(ax)
    ax.grid(axis="y", visible=False)
    shades = {"p50": "#1d4ed8", "p95": "#60a5fa", "p99": "#bfdbfe"}
    h = 0.26
    for i, (_name, vals) in enumerate(data):
        for j, (q, v) in enumerate(zip(shades, vals, strict=True)):
            if v is None:
                continue
            y = i + (j - 1) * h
            ax.barh(y, v, height=h * 0.92, color=shades[q], label=q if i == 0 else None, zorder=2)
            ax.annotate(_fmt_ms(v), (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7,
                        color="#374151")
    ax.set_yticks(range(len(data)), [n for n, _ in data], fontsize=9)
    ax.invert_yaxis()
    allv = [v for _, vals in data for v in vals if v]
    _log_if_spread(ax, allv, "x")
    if ax.get_xscale() == "log":
        ax.set_xlim(min(allv) / 1.5, max(allv) * 2.5)
    else:
        ax.set_xlim(0, max(allv) * 1.15)
    ax.set_xlabel("latency, single query end to end (ms" + (", log scale)" if ax.get_xscale() == "log" else ")"))
    ax.legend(loc="lower right", frameon=False, fontsize=8, ncols=3)
    return _png(fig)


def plot_domains(names: Sequence[str], acc: Mapping[str, Mapping[str, tuple[float, int]]],
                 colors: Mapping[str, str]) -> bytes | None:
    """Grouped bars: accuracy per domain, one bar per model."""
    if not acc or not names:
        return None
    models = list(acc)
    fig = _new_figure(min(max(9.5, 0.09 * len(names) * len(models) + 2.5), 12.0), 4.4)
    ax = fig.add_subplot()
    _style_axes(ax)
    ax.grid(axis="x", visible=False)
    width = 0.8 / len(models)
    lows = []
    for j, m in enumerate(models):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(names))]
        ys = [acc[m].get(d, (math.nan, 0))[0] for d in names]
        lows += [y for y in ys if not math.isnan(y)]
        ax.bar(xs, ys, width=width * 0.9, color=colors.get(m, "#6b7280"), label=m, zorder=2)
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=30, ha="right", fontsize=9)
    floor = min(lows, default=0.0)
    ax.set_ylim(max(0.0, math.floor((floor - 5) / 10) * 10), 100.5)
    ax.set_ylabel("accuracy (%)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    return _png(fig)


# ---------------------------------------------------------------- writers


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be read and served
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _e(value: Any) -> str:
    return html.escape(DASH if value is None or value == "" else str(value))


def _md(value: Any) -> str:
    text = DASH if value is None or value == "" else str(value)
    return " ".join(text.split()).replace("\\", "\\\\").replace("|", "\\|")


def _cell(col: Column, row: Mapping[str, Any]) -> str:
    v = col.value(row)
    return DASH if v is None else col.fmt(v)


CSS = """
:root { --fg:#111827; --muted:#6b7280; --line:#e5e7eb; --soft:#f9fafb; --good:#047857; --bad:#b91c1c;
        --accent:#1d4ed8; }
* { box-sizing: border-box; }
body { margin:0; background:#f3f4f6; color:var(--fg);
       font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; }
main { max-width:1180px; margin:0 auto; padding:28px 24px 48px; }
header h1 { margin:0 0 2px; font-size:24px; letter-spacing:-0.01em; }
header p { margin:0; color:var(--muted); }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 20px; margin-top:18px; }
h2 { margin:0 0 12px; font-size:16px; }
h3 { margin:14px 0 6px; font-size:13px; color:var(--muted); font-weight:600; }
h2 + h3 { margin-top:0; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(200px,1fr)); gap:12px; margin-top:18px; }
.card { background:#fff; border:1px solid var(--line); border-radius:10px; padding:14px 16px; }
.card .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .v { font-size:26px; font-weight:650; margin-top:2px; font-variant-numeric:tabular-nums; }
.card .s { color:var(--muted); font-size:12.5px; margin-top:2px; }
.scroll { overflow-x:auto; }
table { border-collapse:collapse; width:100%; font-size:13px; }
th, td { padding:6px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
th { text-align:left; font-weight:600; color:#374151; background:var(--soft); white-space:nowrap;
     border-bottom:2px solid var(--line); }
th.n, td.n { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
tbody tr:nth-child(even) td { background:#fcfcfd; }
tr.final td { background:#eff6ff !important; }
td.name { font-weight:600; white-space:nowrap; }
.tag { display:inline-block; font-size:10.5px; font-weight:600; padding:0 6px; border-radius:9px; margin-left:6px;
       background:#e5e7eb; color:#374151; vertical-align:1px; }
.tag.final { background:#dbeafe; color:#1e40af; }
.cmp { display:block; font-size:11px; color:var(--muted); }
.cmp.good, .good { color:var(--good); } .cmp.bad, .bad { color:var(--bad); }
.na { color:#9ca3af; }
.badge { display:inline-block; min-width:44px; text-align:center; font-size:11.5px; font-weight:700;
         padding:2px 8px; border-radius:10px; letter-spacing:.03em; }
.badge.pass { background:#d1fae5; color:#065f46; } .badge.fail { background:#fee2e2; color:#991b1b; }
.badge.unknown { background:#e5e7eb; color:#374151; }
figure { margin:0; } figure img { display:block; max-width:100%; height:auto; margin:0 auto; }
figcaption, .note { color:var(--muted); font-size:12.5px; margin-top:8px; }
td.text { max-width:520px; }
ul.notes { margin:0; padding-left:18px; } ul.notes li { margin:2px 0; font-family:ui-monospace,monospace;
  font-size:12.5px; }
"""


@dataclass
class _Parts:
    """Everything both renderers need, computed once."""

    title: str
    rows: list[Mapping[str, Any]]
    columns: list[Column]
    baseline: Mapping[str, Any] | None
    final: Mapping[str, Any] | None
    budgets: list[Mapping[str, Any]]
    domain_names: list[str]
    domain_acc: dict[str, dict[str, tuple[float, int]]]
    changed: list[Mapping[str, Any]] | None
    changed_from: str
    changed_to: str
    notes: list[str]
    plots: dict[str, bytes]
    skipped: list[str]
    generated: str


def _summary(p: _Parts) -> list[tuple[str, str, str, str]]:
    """Headline cards: (key, value, comparison, tone)."""
    f, b = p.final, p.baseline
    if f is None:
        return []
    bname = str(b.get("name")) if b is not None and b is not f else None
    cards = []
    acc = _pct(f.get("accuracy"))
    if acc is not None:
        sub, tone = "", ""
        if bname:
            bacc = _pct(b.get("accuracy"))
            if bacc is not None:
                d = acc - bacc
                sub, tone = f"{d:+.2f} pt vs {bname}".replace("-", "−"), "good" if d >= 0 else "bad"
        raw = _pct(f.get("accuracy_raw"))
        if not sub and raw is not None:
            sub = f"{raw:.2f}% without threshold"
        cards.append(("accuracy", f"{acc:.2f}%", sub, tone))
    size = _mb(f.get("model_bytes"))
    if size is not None:
        sub = ""
        if bname and _mb(b.get("model_bytes")):
            sub = f"{_speedup(_mb(b.get('model_bytes')), size)} smaller than {bname}"
        cards.append(("model size", f"{size:.2f} MB", sub, ""))
    p50 = _num(_get(f, "latency_ms.p50"))
    if p50 is not None:
        sub = ""
        if bname and _num(_get(b, "latency_ms.p50")):
            sub = f"{_speedup(_num(_get(b, 'latency_ms.p50')), p50)} faster than {bname}"
        cards.append(("p50 latency", f"{_fmt_ms(p50)} ms", sub, ""))
    if p.budgets:
        failed = [str(x.get("name")) for x in p.budgets if x.get("passed") is False]
        passed = sum(1 for x in p.budgets if x.get("passed") is True)
        if failed:
            cards.append(("budgets", f"{len(failed)} failed", ", ".join(failed), "bad"))
        else:
            cards.append(("budgets", f"{passed}/{len(p.budgets)} passed", "", "good" if passed else ""))
    return cards


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _latency_caption(rows: Sequence[Mapping[str, Any]]) -> str:
    ns = {_get(r, "latency_ms.n") for r in rows} - {None}
    over = f" over {next(iter(ns))} calls" if len(ns) == 1 else " over the calls each JSON states" if ns else ""
    return f"Latency: one query end to end (tokenize + run + softmax), percentiles{over} after warm-up."


def _render_html(p: _Parts) -> str:
    out: list[str] = []
    w = out.append
    w(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
      f'<meta name="viewport" content="width=device-width, initial-scale=1">'
      f"<title>{_e(p.title)}</title><style>{CSS}</style></head><body><main>")
    w(f"<header><h1>{_e(p.title)}</h1><p>edgepack report · {_plural(len(p.rows), 'candidate')}"
      f" · generated {_e(p.generated)}"
      + (f" · baseline <b>{_e(p.baseline.get('name'))}</b>" if p.baseline is not None else "") + "</p></header>")

    cards = _summary(p)
    if cards:
        w('<div class="cards">')
        for k, v, s, tone in cards:
            w(f'<div class="card"><div class="k">{_e(k)}'
              + (f" · {_e(p.final.get('name'))}" if k != "budgets" else "")
              + f'</div><div class="v{" bad" if k == "budgets" and tone == "bad" else ""}">{_e(v)}</div>'
              f'<div class="s {tone}">{html.escape(s)}</div></div>')
        w("</div>")

    if "scatter" in p.plots:
        w("<section><h2>Accuracy against latency</h2><figure>")
        w('<img alt="accuracy against p50 latency, area proportional to model size" '
          f'src="{_data_uri(p.plots["scatter"])}">')
        cap = "Each point is a candidate; its area is proportional to the model file size. Dashed: best accuracy."
        if p.skipped:
            cap += f" Not plotted (no accuracy or latency): {', '.join(p.skipped)}."
        w(f"<figcaption>{_e(cap)}</figcaption></figure></section>")

    # Two tables of the same rows: one wide table does not fit a laptop screen (the markdown keeps one).
    accuracy_cols = [c for c in p.columns if c.compare == "points"]
    speed_cols = [c for c in p.columns if c.compare != "points"]
    w("<section><h2>Candidates</h2>")
    for caption, cols, threads in (("Accuracy", accuracy_cols, False), ("Size and speed", speed_cols, True)):
        w(f'<h3>{caption}</h3><div class="scroll"><table><thead><tr><th>Model</th>')
        for c in cols:
            w(f'<th class="n" title="{_e(c.title)}">{_e(c.header)}</th>')
        if threads:
            w('<th class="n" title="session threads">Threads</th>')
        w("</tr></thead><tbody>")
        for r in p.rows:
            w(_html_row(p, r, cols, threads))
        w("</tbody></table></div>")
    cap = _latency_caption(p.rows) + " MB = 10⁶ bytes."
    if p.baseline is not None:
        cap += (f" Under each value: the difference from {p.baseline.get('name')} (percentage points for"
                " accuracies, a ratio otherwise; green is better).")
    w(f'<p class="note">{_e(cap)}</p></section>')

    if p.budgets:
        w('<section><h2>Budgets</h2><table style="max-width:760px"><thead><tr><th>Budget</th><th class="n">Limit</th>'
          '<th class="n">Measured</th><th>Unit</th><th>Result</th></tr></thead><tbody>')
        for bud in p.budgets:
            state = {True: ("pass", "PASS"), False: ("fail", "FAIL")}.get(bud.get("passed"), ("unknown", DASH))
            w(f'<tr><td class="name">{_e(bud.get("name"))}</td><td class="n">{_e(_fmt_budget(bud.get("limit")))}</td>'
              f'<td class="n">{_e(_fmt_budget(bud.get("measured")))}</td><td>{_e(bud.get("unit"))}</td>'
              f'<td><span class="badge {state[0]}">{state[1]}</span></td></tr>')
        w("</tbody></table></section>")

    if "latency" in p.plots:
        w("<section><h2>Latency</h2><figure>")
        w(f'<img alt="latency percentiles per candidate" src="{_data_uri(p.plots["latency"])}">')
        split = [(str(r.get("name")), _num(_get(r, "tokenize_ms.p50")), _num(_get(r, "model_ms.p50")))
                 for r in p.rows]
        split = [s for s in split if s[1] is not None or s[2] is not None]
        w(f"<figcaption>{_e(_latency_caption(p.rows))}</figcaption></figure>")
        if split:
            w('<table style="margin-top:12px;max-width:560px"><thead><tr><th>Model</th>'
              '<th class="n">Tokenize p50 ms</th><th class="n">Model p50 ms</th></tr></thead><tbody>')
            for n, t, m in split:
                w(f'<tr><td class="name">{_e(n)}</td><td class="n">{_e(_fmt_ms(t) if t is not None else None)}</td>'
                  f'<td class="n">{_e(_fmt_ms(m) if m is not None else None)}</td></tr>')
            w("</tbody></table>")
        w("</section>")

    if p.domain_acc:
        w("<section><h2>Accuracy per domain</h2>")
        if "domains" in p.plots:
            w(f'<figure><img alt="accuracy per domain" src="{_data_uri(p.plots["domains"])}"></figure>')
        models = list(p.domain_acc)
        w('<div class="scroll"><table style="margin-top:12px"><thead><tr><th>Domain</th><th class="n">Queries</th>')
        for m in models:
            w(f'<th class="n">{_e(m)} %</th>')
        w("</tr></thead><tbody>")
        for d in p.domain_names:
            count = next((p.domain_acc[m][d][1] for m in models if d in p.domain_acc[m]), None)
            w(f'<tr><td class="name">{_e(d.replace("_", " "))}</td><td class="n">{_e(count)}</td>')
            for m in models:
                v = p.domain_acc[m].get(d)
                w(f'<td class="n">{_e(f"{v[0]:.1f}" if v else None)}</td>')
            w("</tr>")
        w("</tbody></table></div></section>")

    if p.changed is not None:
        n = len(p.changed)
        w(f"<section><h2>Predictions changed from {_e(p.changed_from)}</h2>")
        w(f'<p class="note" style="margin-top:0">{_e(_changed_summary(p))}</p>')
        if n:
            w(f'<div class="scroll"><table><thead><tr><th>Query</th><th>Gold</th><th>{_e(p.changed_from)}</th>'
              f"<th>{_e(p.changed_to)}</th></tr></thead><tbody>")
            for c in p.changed[:MAX_CHANGED]:
                gold, t, m = c.get("gold"), c.get("teacher"), c.get("model")
                tone_t = "good" if gold is not None and t == gold else ""
                tone_m = "good" if gold is not None and m == gold else "bad" if gold is not None else ""
                w(f'<tr><td class="text">{_e(c.get("text"))}</td><td>{_e(gold)}</td>'
                  f'<td class="{tone_t}">{_e(t)}</td><td class="{tone_m}">{_e(m)}</td></tr>')
            w("</tbody></table></div>")
        w("</section>")

    if p.notes:
        w('<section><h2>Machine and versions</h2><ul class="notes">')
        for line in p.notes:
            w(f"<li>{_e(line)}</li>")
        w("</ul></section>")
    w("</main></body></html>\n")
    return "".join(out)


def _changed_key(c: Mapping[str, Any]) -> int:
    """Regressions first (the reference was right, the model is not), then both wrong, then fixes."""
    gold = c.get("gold")
    if gold is None:
        return 1
    return 0 if c.get("teacher") == gold else 2 if c.get("model") == gold else 1


def _changed_summary(p: _Parts) -> str:
    n = len(p.changed or [])
    text = f"{_plural(n, 'query')} predicted differently by {p.changed_to}".replace("querys", "queries")
    keys = [_changed_key(c) for c in p.changed or []]
    if any(c.get("gold") is not None for c in p.changed or []):
        text += (f": {keys.count(0)} newly wrong, {keys.count(2)} newly right, {keys.count(1)} wrong either way"
                 " (listed in that order)")
    return text + (f"; the first {MAX_CHANGED} are shown." if n > MAX_CHANGED else ".")


def _html_row(p: _Parts, r: Mapping[str, Any], cols: Sequence[Column], threads: bool) -> str:
    final = r is p.final and len(p.rows) > 1
    tags = ('<span class="tag">baseline</span>' if r.get("baseline") else "") + (
        '<span class="tag final">final</span>' if final else "")
    cells = [f'<tr{" class=final" if final else ""}><td class="name">{_e(r.get("name"))}{tags}</td>']
    for c in cols:
        v = c.value(r)
        txt = f'<span class="na">{DASH}</span>' if v is None else _e(c.fmt(v))
        if p.baseline is not None and r is not p.baseline:
            cmp = _compare(c, v, c.value(p.baseline))
            if cmp:
                txt += f'<span class="cmp {cmp[1]}">{_e(cmp[0])}</span>'
        cells.append(f'<td class="n">{txt}</td>')
    if threads:
        th = _fmt_threads(r.get("threads"))
        cells.append(f'<td class="n">{_e(th) if th != DASH else f"<span class=na>{DASH}</span>"}</td>')
    return "".join(cells) + "</tr>"


def _fmt_budget(v: Any) -> Any:
    n = _num(v)
    if n is None:
        return v
    return f"{n:g}" if abs(n) >= 0.01 or n == 0 else f"{n:.3g}"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _render_md(p: _Parts) -> str:
    out = [f"# {_md(p.title)}", "",
           f"edgepack report · {_plural(len(p.rows), 'candidate')} · generated {p.generated}"]
    if p.baseline is not None:
        out[-1] += f" · baseline **{_md(p.baseline.get('name'))}**"
    out.append("")
    cards = _summary(p)
    if cards:
        name = _md(p.final.get("name")) if p.final is not None else ""
        out.append(f"**{name}**: " + "; ".join(f"{k} {v}" + (f" ({s})" if s else "") for k, v, s, _ in cards))
        out.append("")
    if "scatter" in p.plots:
        out += ["## Accuracy against latency", "",
                f"![accuracy against p50 latency, area proportional to model size]({PLOTS['scatter']})", ""]
        if p.skipped:
            out += [f"Not plotted (no accuracy or latency): {', '.join(p.skipped)}.", ""]
    out += ["## Candidates", ""]
    headers = ["Model", *[c.header for c in p.columns], "Threads"]
    out.append("| " + " | ".join(headers) + " |")
    out.append("|" + "|".join([":---", *["---:"] * (len(headers) - 1)]) + "|")
    for r in p.rows:
        name = _md(r.get("name"))
        if r.get("baseline"):
            name += " (baseline)"
        cells = [f"**{name}**" if r is p.final and len(p.rows) > 1 else name]
        for c in p.columns:
            v = c.value(r)
            txt = _cell(c, r)
            if p.baseline is not None and r is not p.baseline and c.headline:
                cmp = _compare(c, v, c.value(p.baseline))
                if cmp:
                    txt += f" ({cmp[0]})"
            cells.append(txt)
        cells.append(_md(_fmt_threads(r.get("threads"))))
        out.append("| " + " | ".join(cells) + " |")
    out += ["", _latency_caption(p.rows) + " MB = 10^6 bytes."
            + (f" In parentheses: the difference from {p.baseline.get('name')} (percentage points for accuracy,"
               " a ratio for size and latency)." if p.baseline is not None else ""), ""]
    if p.budgets:
        out += ["## Budgets", "", "| Budget | Limit | Measured | Unit | Result |", "|:---|---:|---:|:---|:---|"]
        for b in p.budgets:
            res = {True: "✅ PASS", False: "❌ FAIL"}.get(b.get("passed"), DASH)
            out.append(f"| {_md(b.get('name'))} | {_md(_fmt_budget(b.get('limit')))} | "
                       f"{_md(_fmt_budget(b.get('measured')))} | {_md(b.get('unit'))} | {res} |")
        out.append("")
    if "latency" in p.plots:
        out += ["## Latency", "", f"![latency percentiles per candidate]({PLOTS['latency']})", ""]
    if p.domain_acc:
        out += ["## Accuracy per domain", ""]
        if "domains" in p.plots:
            out += [f"![accuracy per domain]({PLOTS['domains']})", ""]
        models = list(p.domain_acc)
        out.append("| Domain | Queries | " + " | ".join(f"{_md(m)} %" for m in models) + " |")
        out.append("|:---|---:|" + "---:|" * len(models))
        for d in p.domain_names:
            count = next((p.domain_acc[m][d][1] for m in models if d in p.domain_acc[m]), None)
            vals = [f"{p.domain_acc[m][d][0]:.1f}" if d in p.domain_acc[m] else DASH for m in models]
            out.append(f"| {_md(d.replace('_', ' '))} | {_md(count)} | " + " | ".join(vals) + " |")
        out.append("")
    if p.changed is not None:
        n = len(p.changed)
        out += [f"## Predictions changed from {_md(p.changed_from)}", "",
                _md(_changed_summary(p)), ""]
        if n:
            out += [f"| Query | Gold | {_md(p.changed_from)} | {_md(p.changed_to)} |", "|:---|:---|:---|:---|"]
            for c in p.changed[:MAX_CHANGED]:
                out.append(f"| {_md(c.get('text'))} | {_md(c.get('gold'))} | {_md(c.get('teacher'))} | "
                           f"{_md(c.get('model'))} |")
            out.append("")
    if p.notes:
        out += ["## Machine and versions", "", *[f"- {_md(line)}" for line in p.notes], ""]
    return "\n".join(out)


def write_report(
    out_dir: Path,
    rows: list[dict],
    *,
    title: str,
    budgets: list[dict] | None = None,
    domains: dict[str, list[str]] | None = None,
    changed: list[dict] | None = None,
    notes: list[str] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained: plots embedded as PNG data URIs) and ``report.md`` (linking
    the PNG files written beside it) into ``out_dir``; return their paths.

    ``budgets``: ``{"name", "limit", "measured", "unit", "passed"}`` each, shown with pass or fail.
    ``domains``: domain -> intents (CLINC150's ``domains.json``); with per-row ``predictions`` and
    ``gold`` it adds accuracy per domain. ``changed``: ``{"text", "gold", "teacher", "model"}`` for the
    queries whose prediction moved from the teacher; when None and the baseline row (else the first)
    and the final row both carry ``predictions``, it is computed from them. ``notes``: free lines
    (machine, versions). Every file is written atomically.

    >>> write_report(Path("build"), [{"name": "teacher", "accuracy": 0.9038, "baseline": True},
    ...                              {"name": "bundle", "accuracy": 0.901}], title="demo")  # doctest: +SKIP
    (PosixPath('build/report.html'), PosixPath('build/report.md'))
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [dict(r) for r in rows]
    for i, r in enumerate(rows):
        r.setdefault("name", f"candidate {i + 1}")
    baseline, final = _baseline(rows), _final(rows)
    reference = baseline if baseline is not None else (rows[0] if rows else None)
    changed_from = str(reference.get("name")) if reference is not None else "teacher"
    changed_to = str(final.get("name")) if final is not None else "model"
    if changed is None and reference is not None and final is not None and reference is not final:
        changed = changed_queries(reference, final, rows)

    plots: dict[str, bytes] = {}
    skipped: list[str] = []
    if rows:
        scatter, skipped = plot_accuracy_latency(rows)
        if scatter:
            plots["scatter"] = scatter
        lat = plot_latency(rows)
        if lat:
            plots["latency"] = lat
    dnames, dacc = domain_accuracy(rows, domains) if domains else ([], {})
    if dacc:
        dplot = plot_domains(dnames, dacc, _colors(rows))
        if dplot:
            plots["domains"] = dplot

    parts = _Parts(
        title=title, rows=rows, columns=_columns(rows), baseline=baseline, final=final,
        budgets=[_budget(b) for b in budgets or []], domain_names=dnames, domain_acc=dacc,
        changed=None if changed is None else sorted(changed, key=_changed_key),
        changed_from=changed_from, changed_to=changed_to, notes=[str(n) for n in notes or []], plots=plots,
        skipped=skipped, generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    # PNGs first, documents last: a reader never finds a report pointing at a plot not yet written.
    for key, png in plots.items():
        _write_atomic(out_dir / PLOTS[key], png)
    for key, name in PLOTS.items():
        if key not in plots:  # a stale plot from an earlier run would contradict this report
            with contextlib.suppress(FileNotFoundError):
                (out_dir / name).unlink()
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    _write_atomic(md_path, _render_md(parts).encode("utf-8"))
    _write_atomic(html_path, _render_html(parts).encode("utf-8"))
    return html_path, md_path


# ---------------------------------------------------------------- inputs and command line


_UNITS = (("_ms", "ms"), ("_mb", "MB"), ("_bytes", "bytes"), ("_drop", "points"), ("_qps", "qps"))


def _budget(b: Any) -> dict[str, Any]:
    """A budget as ``{"name", "limit", "measured", "unit", "passed"}``; also takes ``edgepack.profiles``'
    ``BudgetCheck`` (``budget``, ``limit``, ``value``, ``ok``) or its dict, guessing the unit from the name."""
    if dataclasses.is_dataclass(b) and not isinstance(b, type):
        b = dataclasses.asdict(b)
    b = dict(b)
    name = b.get("name", b.get("budget"))
    unit = b.get("unit")
    if unit is None and isinstance(name, str):
        unit = next((u for suffix, u in _UNITS if name.endswith(suffix)), None)
    return {"name": name, "limit": b.get("limit"), "measured": b.get("measured", b.get("value")), "unit": unit,
            "passed": b.get("passed", b.get("ok"))}


def attach_eval_data(rows: list[dict], texts: Sequence[str], gold: Sequence[str]) -> int:
    """Give ``texts`` and ``gold`` to the rows whose ``predictions`` have their length (the harness JSON
    holds predictions only); return how many rows got them. A row whose ``accuracy`` (the thresholded
    predictions' score) disagrees with its predictions scored against ``gold`` raises: the file is not the one
    the row was measured on, or its order differs, and per-domain figures would be wrong."""
    attached = 0
    for row in rows:
        preds = row.get("predictions")
        if not isinstance(preds, list) or len(preds) != len(gold):
            continue
        acc = sum(p == g for p, g in zip(preds, gold, strict=True)) / len(gold)
        stored = _num(row.get("accuracy"))
        if stored is not None and abs((stored if stored <= 1 else stored / 100) - acc) > 1e-6:
            raise EdgepackError(f"row {row.get('name')}: its predictions score {acc:.4f} against the given data"
                                f" but it reports accuracy {stored:.4f}; pass the file and split it was measured on")
        row.setdefault("texts", list(texts))
        row.setdefault("gold", list(gold))
        attached += 1
    return attached


def host_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Notes from the ``host`` block the harness writes: machine, CPU count, versions (once each)."""
    out: list[str] = []
    for r in rows:
        host = r.get("host")
        if not isinstance(host, Mapping):
            continue
        machine = " ".join(str(host[k]) for k in ("system", "machine") if host.get(k))
        line = f"machine: {machine}" + (f", {host['cpus']} CPUs" if host.get("cpus") else "")
        versions = host.get("versions")
        if isinstance(versions, Mapping) and versions:
            line += " · " + ", ".join(f"{k} {v}" for k, v in versions.items())
        line += f" ({r.get('name')})"
        if not any(line.rsplit(" (", 1)[0] == o.rsplit(" (", 1)[0] for o in out):
            out.append(line)
    if len(out) == 1:
        out[0] = out[0].rsplit(" (", 1)[0]
    return out


def load_rows(paths: Iterable[Path | str]) -> list[dict]:
    """Rows from benchmark JSON files: one row (a dict), a list of rows, ``{"rows": [...]}``, or a stage
    record (``stage.json``: its ``metrics`` with the stage as name). A row without ``name`` is named
    after its file."""
    rows: list[dict] = []
    for path in map(Path, paths):
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise EdgepackError(f"{path}: no such file; pass the JSON written by `edgepack bench --json`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EdgepackError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, Mapping) and isinstance(data.get("rows"), list):
            items = data["rows"]
        elif isinstance(data, Mapping) and isinstance(data.get("metrics"), Mapping) and "accuracy" not in data:
            items = [{"name": data.get("stage"), **data["metrics"]}]
        elif isinstance(data, list):
            items = data
        else:
            items = [data]
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise EdgepackError(f"{path}: expected an object per row, found {type(item).__name__} at index {i}")
            row = dict(item)
            if not row.get("name"):
                row["name"] = path.stem if len(items) == 1 else f"{path.stem}[{i}]"
            rows.append(row)
    return rows


def _load_json(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EdgepackError(f"--{what} {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise EdgepackError(f"--{what} {path}: not valid JSON ({e})") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgepack.report",
        description="Write report.html and report.md from benchmark JSON results.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="directory to write the report into")
    parser.add_argument("results", metavar="RESULT.json", nargs="+", help="benchmark results, one row per candidate")
    parser.add_argument("--domains", metavar="FILE", help="domain -> intents JSON (CLINC150's domains.json)")
    parser.add_argument("--data", metavar="FILE",
                        help="the labelled file the results were measured on, for accuracy per domain and the "
                             "changed queries (JSON lines, CSV or CLINC150 JSON)")
    parser.add_argument("--split", default="test", help="split of a CLINC150 JSON --data (default: test)")
    parser.add_argument("--budgets", metavar="FILE", help='JSON list of {"name","limit","measured","unit","passed"}')
    parser.add_argument("--baseline", metavar="NAME", help="the row the others are compared with")
    parser.add_argument("--title", default="edgepack report", help="report title (default: edgepack report)")
    parser.add_argument("--note", action="append", default=[], metavar="TEXT", help="a line for the notes (repeatable)")
    args = parser.parse_args(argv)
    try:
        rows = load_rows(args.results)
        if args.baseline:
            names = [str(r.get("name")) for r in rows]
            if args.baseline not in names:
                raise EdgepackError(f"--baseline {args.baseline}: no such row; rows are {', '.join(names)}")
            for r in rows:
                r["baseline"] = str(r.get("name")) == args.baseline
        if args.data:
            from runtime_shim.datafiles import DataError, read_labelled

            try:
                texts, gold = read_labelled(args.data, split=args.split)
            except DataError as e:
                raise EdgepackError(str(e)) from None
            if not attach_eval_data(rows, texts, gold):
                raise EdgepackError(f"--data {args.data}: {len(gold)} rows, but no result holds that many "
                                    "predictions; pass the file and split the results were measured on")
        domains = _load_json(args.domains, "domains") if args.domains else None
        if domains is not None and not (isinstance(domains, Mapping)
                                        and all(isinstance(v, list) for v in domains.values())):
            raise EdgepackError(f"--domains {args.domains}: expected an object mapping each domain to a list "
                                "of labels")
        budgets = _load_json(args.budgets, "budgets") if args.budgets else None
        if budgets is not None and not isinstance(budgets, list):
            raise EdgepackError(f"--budgets {args.budgets}: expected a list of budget objects")
        html_path, md_path = write_report(args.out_dir, rows, title=args.title, budgets=budgets, domains=domains,
                                          notes=args.note or host_notes(rows))
    except EdgepackError as e:
        print(f"edgepack report: error: {e}", file=sys.stderr)
        return e.exit_code
    print(html_path)
    print(md_path)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
