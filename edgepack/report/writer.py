"""``write_report``: computes the parts once, renders both documents and writes every file atomically."""

from __future__ import annotations

import contextlib
import datetime as _dt
from pathlib import Path

from edgepack.records import write_bytes_atomic

from .analysis import _baseline, _changed_key, _final, _Parts, changed_queries, domain_accuracy
from .html import _render_html
from .load import _budget
from .markdown import _render_md
from .plots import PLOTS, _colors, plot_accuracy_latency, plot_domains, plot_frontier, plot_latency
from .tables import _columns


def write_report(
    out_dir: Path,
    rows: list[dict],
    *,
    title: str,
    budgets: list[dict] | None = None,
    domains: dict[str, list[str]] | None = None,
    changed: list[dict] | None = None,
    notes: list[str] | None = None,
    frontier: dict | None = None,
    variants: dict | None = None,
) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained: plots embedded as PNG data URIs) and ``report.md`` (linking
    the PNG files written beside it) into ``out_dir``; return their paths.

    ``budgets``: ``{"name", "limit", "measured", "unit", "passed"}`` each, shown with pass or fail.
    ``domains``: domain -> intents (CLINC150's ``domains.json``); with per-row ``predictions`` and
    ``gold`` it adds accuracy per domain. ``changed``: ``{"text", "gold", "teacher", "model"}`` for the
    queries whose prediction moved from the teacher; when None and the baseline row (else the first)
    and the final row both carry ``predictions``, it is computed from them. ``notes``: free lines
    (machine, versions). ``frontier``: a shape search's ``frontier.json`` (its plot and table).
    ``variants``: the quantize stage's variants table (``variants.json``); default: the one in the
    final row's ``build_metrics`` (a bundle's manifest holds it). Every file is written atomically.

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
    if variants is None and final is not None and isinstance(final.get("build_metrics"), dict):
        variants = final["build_metrics"].get("variants")
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
    if frontier:
        fplot = plot_frontier(frontier)
        if fplot:
            plots["frontier"] = fplot
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
        skipped=skipped, frontier=frontier, variants=variants if isinstance(variants, dict) else None, generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    # PNGs first, documents last: a reader never finds a report pointing at a plot not yet written.
    for key, png in plots.items():
        write_bytes_atomic(out_dir / PLOTS[key], png)
    for key, name in PLOTS.items():
        if key not in plots:  # a stale plot from an earlier run would contradict this report
            with contextlib.suppress(FileNotFoundError):
                (out_dir / name).unlink()
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    write_bytes_atomic(md_path, _render_md(parts).encode("utf-8"))
    write_bytes_atomic(html_path, _render_html(parts).encode("utf-8"))
    return html_path, md_path
