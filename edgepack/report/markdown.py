"""``report.md``: the same report as plain Markdown, linking the PNG files written beside it."""

from __future__ import annotations

from typing import Any

from .analysis import MAX_CHANGED, _changed_summary, _latency_caption, _Parts, _summary
from .plots import PLOTS
from .tables import DASH, _cell, _compare, _fmt_budget, _fmt_threads, _plural


def _md(value: Any) -> str:
    text = DASH if value is None or value == "" else str(value)
    return " ".join(text.split()).replace("\\", "\\\\").replace("|", "\\|")


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
    if p.frontier:
        from .analysis import FRONTIER_HEADERS, frontier_caption, frontier_rows

        out += ["## Student shapes: the accuracy-latency frontier", ""]
        if "frontier" in p.plots:
            out += [f"![validation accuracy against p50 latency of every shape tried]({PLOTS['frontier']})", ""]
        out += [frontier_caption(p.frontier), "", "| " + " | ".join(FRONTIER_HEADERS) + " |",
                "|" + "|".join(["---"] * len(FRONTIER_HEADERS)) + "|"]
        out += ["| " + " | ".join(_md(v) for v in row) + " |" for row in frontier_rows(p.frontier)]
        out.append("")
    if p.variants:
        from .analysis import VARIANTS_HEADERS, variants_caption, variants_rows

        out += ["## Quantization variants", "", variants_caption(p.variants), "",
                "| " + " | ".join(VARIANTS_HEADERS) + " |", "|" + "|".join(["---"] * len(VARIANTS_HEADERS)) + "|"]
        out += ["| " + " | ".join(_md(v) for v in row) + " |" for row in variants_rows(p.variants)]
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
