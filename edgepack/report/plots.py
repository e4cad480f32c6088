"""The plots, as PNG bytes: accuracy against latency, latency percentiles, accuracy per domain.

matplotlib is imported inside the functions: importing the report stays cheap for ``edgepack --help``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from runtime_shim.bench import result_value as _get  # one reader of harness results

from .analysis import _final
from .tables import MB, _fmt_ms, _num, _pct

PLOTS = {
    "scatter": "report_accuracy_latency.png",
    "latency": "report_latency.png",
    "domains": "report_domains.png",
    "frontier": "report_frontier.png",
}
# Colour-blind friendly (Okabe-Ito) first, then tab20 for long candidate lists.
_PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


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


def frontier_points(frontier: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The built candidates of a shape search (``BUILD/search/frontier.json``) on the frontier by its
    latency objective: none faster at least as accurate.

    >>> [c["name"] for c in frontier_points({"objective": "p95", "candidates": [
    ...     {"name": "a", "status": "built", "p95_ms": 1.0, "validation_accuracy": 90.0},
    ...     {"name": "b", "status": "built", "p95_ms": 2.0, "validation_accuracy": 89.0},
    ...     {"name": "c", "status": "built", "p95_ms": 3.0, "validation_accuracy": 91.0}]})]
    ['a', 'c']
    """
    key = f"{_objective(frontier)}_ms"
    built = [c for c in frontier.get("candidates", []) if c.get("status") == "built" and c.get(key)]
    return [c for c in sorted(built, key=lambda c: (c[key], -c["validation_accuracy"]))
            if not any(o is not c and o[key] <= c[key] and o["validation_accuracy"] > c["validation_accuracy"]
                       for o in built)]


def _objective(frontier: Mapping[str, Any]) -> str:
    return frontier.get("objective") or "p50"  # a frontier.json from before the objective: chosen by p50


VERDICT_COLORS = {"inside": "#009E73", "inside, not significant": "#56B4E9"}  # else orange: outside


def plot_frontier(frontier: Mapping[str, Any]) -> bytes | None:
    """Every candidate of the shape search: validation accuracy against end-to-end latency on this CPU
    by the search's objective, each shape's p50-p95 range drawn as a bar with its mean as a tick, the
    frontier drawn through the ones nothing beats, the teacher and its budget as lines, the chosen
    shape ringed. None when no candidate was built."""
    objective = _objective(frontier)
    key = f"{objective}_ms"
    built = [c for c in frontier.get("candidates", []) if c.get("status") == "built" and c.get(key)]
    if not built:
        return None
    fig = _new_figure(9.5, 5.2)
    ax = fig.add_subplot()
    _style_axes(ax)
    teacher, budget = frontier.get("teacher_validation_accuracy"), frontier.get("max_drop")
    front = frontier_points(frontier)
    ax.plot([c[key] for c in front], [c["validation_accuracy"] for c in front], color="#0072B2",
            linewidth=1.5, zorder=2, label=f"frontier by {objective}")
    for i, c in enumerate(built):
        chosen = c["name"] == frontier.get("chosen")
        y = c["validation_accuracy"]
        if c.get("p50_ms") and c.get("p95_ms"):
            ax.plot([c["p50_ms"], c["p95_ms"]], [y, y], color="#6B7280", linewidth=1.0, zorder=1,
                    label=None if i else "p50 to p95 (tick: mean)")
            if c.get("mean_ms"):
                ax.scatter([c["mean_ms"]], [y], marker="|", s=120, color="#6B7280", zorder=2)
        color = VERDICT_COLORS.get(c.get("verdict"), "#D55E00") if budget is not None else "#009E73"
        ax.scatter([c[key]], [y], s=140 if chosen else 60, zorder=3, color=color,
                   edgecolors="#111827" if chosen else "white", linewidths=2.0 if chosen else 0.8)
        cascade = c.get("sent_on") is not None
        ax.annotate(c["name"] + (f" ({c['sent_on']:.0%} sent on)" if cascade else "") + ("  (chosen)" if chosen else ""),
                    (c[key], y), xytext=(6, 6), textcoords="offset points", fontsize=8.5)
    if teacher is not None:
        ax.axhline(teacher, color="#111827", linestyle="--", linewidth=1.0, label=f"teacher {teacher:.2f}%")
        if budget is not None:
            ax.axhline(teacher - budget, color="#E69F00", linestyle=":", linewidth=1.5,
                       label=f"budget: {budget:g} points below the teacher")
    ax.set_xscale("log")
    ax.set_xlabel(f"end-to-end {objective} latency, one query (ms, log scale; the search's objective)")
    ax.set_ylabel("validation accuracy (%)")
    cpu = f" (latency on {str(frontier['cpu']).split(' (')[0]})" if frontier.get("cpu") else ""
    ax.set_title("Student shapes tried: green inside the budget, blue inside on the point estimate only, "
                 f"orange outside{cpu}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8.5, frameon=False)
    return _png(fig)
