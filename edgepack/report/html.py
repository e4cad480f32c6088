"""``report.html``: one self-contained file (its CSS inline, the plots as PNG data URIs, no script)."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any

from runtime_shim.bench import result_value as _get  # one reader of harness results

from .analysis import MAX_CHANGED, _changed_summary, _latency_caption, _Parts, _summary
from .tables import DASH, Column, _compare, _fmt_budget, _fmt_ms, _fmt_threads, _num, _plural


def _e(value: Any) -> str:
    return html.escape(DASH if value is None or value == "" else str(value))


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

    if p.frontier:
        from .analysis import FRONTIER_HEADERS, frontier_caption, frontier_rows

        w("<section><h2>Student shapes: the accuracy-latency frontier</h2>")
        if "frontier" in p.plots:
            w(f'<figure><img alt="validation accuracy against p50 latency of every shape tried" '
              f'src="{_data_uri(p.plots["frontier"])}"></figure>')
        w(f"<p>{_e(frontier_caption(p.frontier))}</p>")
        w(_plain_table(FRONTIER_HEADERS, frontier_rows(p.frontier)) + "</section>")

    if p.variants:
        from .analysis import VARIANTS_HEADERS, variants_caption, variants_rows

        w(f"<section><h2>Quantization variants</h2><p>{_e(variants_caption(p.variants))}</p>")
        w(_plain_table(VARIANTS_HEADERS, variants_rows(p.variants)) + "</section>")

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


def _plain_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A scrolling table of escaped text: a header row, then the rows."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
