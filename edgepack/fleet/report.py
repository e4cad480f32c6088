"""The fleet report: ``fleet.html`` (one self-contained file), ``fleet.md``, ``fleet.json`` and
``fleet.png`` from a ``fleet bench`` result set. The look follows the build report
(``edgepack/report.py``): the same palette, cards and tables."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgepack.records import write_bytes_atomic
from edgepack.report import CSS as BUILD_CSS
from runtime_shim.bench import result_value as _get

DASH = "—"
FILES = {"html": "fleet.html", "md": "fleet.md", "json": "fleet.json", "png": "fleet.png"}
STATUS = {"ok": ("pass", "PASS"), "regressed": ("fail", "REGRESSED"), "budget": ("fail", "BUDGET"),
          "failed": ("unknown", "FAILED")}

# The build report's look (edgepack.report), plus the few classes only the fleet report uses.
CSS = BUILD_CSS + """
:root { --good:#047857; --bad:#b91c1c; }
.good { color:var(--good); } .bad { color:var(--bad); } .na { color:#9ca3af; }
"""


def _pct(v: Any) -> str:
    return DASH if not isinstance(v, (int, float)) else f"{100 * v:.2f}"


def _ms(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return DASH
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def _num(v: Any, digits: int = 1) -> str:
    return DASH if not isinstance(v, (int, float)) else f"{v:,.{digits}f}"


def _drop(r: Mapping[str, Any]) -> str:
    d = _get(r, "regression.drop_points")
    return DASH if d is None else f"{0.0 - d:+.2f}".replace("-", "−")  # 0.0 - d: no "-0.00"


def _target(r: Mapping[str, Any]) -> str:
    det, prof = r.get("detected_target"), r.get("profile_target")
    if det is None and prof is None:
        return DASH
    return f"{det or '?'}" + ("" if r.get("target_match") else f" (profile: {prof or '?'})")


def _budgets(r: Mapping[str, Any]) -> str:
    bs = r.get("budgets") or []
    if not bs:
        return DASH
    failed = [b["budget"] for b in bs if b["ok"] is False]
    checked = [b for b in bs if b["ok"] is not None]
    return f"missed: {', '.join(failed)}" if failed else f"{len(checked)}/{len(checked)} met"


def _threads(r: Mapping[str, Any]) -> str:
    """Intra-op threads; ONNX Runtime reads 0 as "one per physical core", which the table says."""
    t = r.get("threads")
    return DASH if t is None else "auto (0: one per core)" if t == 0 else str(t)


def columns(doc: Mapping[str, Any]) -> list[tuple[str, Any]]:
    sizes = sorted({int(k) for r in doc["devices"] for k in (r.get("throughput_qps") or {})})
    cols: list[tuple[str, Any]] = [
        ("Device", lambda r: r["device"]),
        ("Profile", lambda r: r.get("profile")),
        ("Status", lambda r: STATUS.get(r.get("status"), ("unknown", "?"))[1]),
        ("Accuracy %", lambda r: _pct(r.get("accuracy"))),
        ("vs build (pt)", _drop),
        ("Agreement %", lambda r: _pct(r.get("agreement"))),
        ("p50 ms", lambda r: _ms(_get(r, "latency_ms.p50"))),
        ("mean ms", lambda r: _ms(_get(r, "latency_ms.mean"))),
        ("p95 ms", lambda r: _ms(_get(r, "latency_ms.p95"))),
        ("p99 ms", lambda r: _ms(_get(r, "latency_ms.p99"))),
    ]
    cols += [(f"qps@{b}", lambda r, b=b: _num(_get(r, f"throughput_qps.{b}"))) for b in sizes]
    cols += [("Peak MB", lambda r: _num(r.get("peak_rss_mb"))),
             ("Threads", _threads),
             ("Budgets", _budgets), ("Target", _target)]
    return cols


SPEED = ("p50 ms", "mean ms", "p95 ms", "p99 ms", "Peak MB", "Threads")
TEXT = ("Device", "Profile", "Status", "Budgets", "Target")


def _split(cols: list[tuple[str, Any]]) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """Two tables of the same devices (one wide table does not fit a laptop screen; markdown keeps one)."""
    speed = [c for c in cols if c[0] in SPEED or c[0].startswith("qps@")]
    return [c for c in cols if c not in speed], [cols[0], *speed]


# ------------------------------------------------------------------------------------------- plot


def plot(doc: Mapping[str, Any]) -> bytes | None:
    """Accuracy per device (with the build-time figure and the tolerance) beside latency per device."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in doc["devices"] if isinstance(r.get("accuracy"), (int, float))]
    if not rows:
        return None
    # Rows get thinner past a dozen devices (50 devices: 14 inches, not 27) and a tall chart repeats its
    # axis at the top, so the scale is in view wherever the reader is.
    per_row = 0.5 if len(rows) <= 12 else 0.25
    fig = Figure(figsize=(10.5, per_row * len(rows) + 1.9), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_lat = fig.subplots(1, 2, sharey=True)
    names = [r["device"] for r in rows]
    ys = range(len(rows))
    for ax in (ax_acc, ax_lat):
        ax.spines[["top", "right"]].set_visible(False)
        if len(rows) > 12:
            ax.tick_params(axis="x", top=True, labeltop=True)
        ax.grid(True, axis="x", color="#e5e7eb", linewidth=0.8)
        ax.set_axisbelow(True)
    colors = ["#b91c1c" if r.get("status") == "regressed" else "#0072B2" for r in rows]
    accs = [100 * r["accuracy"] for r in rows]
    ax_acc.barh(list(ys), accs, color=colors, height=0.6, zorder=2)
    for y, a in zip(ys, accs, strict=True):
        ax_acc.annotate(f"{a:.2f}", (a, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    build, tol = _get(doc, "bundle.build.accuracy"), doc.get("tolerance_points") or 0
    lo = min(accs)
    if isinstance(build, (int, float)):
        ax_acc.axvline(100 * build, color="#111827", linestyle="--", linewidth=1, label="build time")
        ax_acc.axvspan(100 * build - tol, 100 * build, color="#fde68a", alpha=0.5, label=f"tolerance {tol:g} pt")
        lo = min(lo, 100 * build - tol)
        ax_acc.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=2, frameon=False, fontsize=8)
    ax_acc.set_xlim(max(0, lo - 5), 101)
    ax_acc.set_yticks(list(ys), names, fontsize=9)
    ax_acc.invert_yaxis()
    ax_acc.set_xlabel("accuracy on the bundle's eval slice (%)")
    shades = {"p50": "#1d4ed8", "p95": "#60a5fa", "p99": "#bfdbfe"}
    h = 0.26
    top = 0.0
    budget_drawn = False
    for i, r in enumerate(rows):
        p95_budget = next((b for b in r.get("budgets") or () if b.get("budget") == "p95_latency_ms"
                           and isinstance(b.get("limit"), (int, float)) and b.get("ok") is not None), None)
        if p95_budget is not None:  # the profile's p95 budget on the device's own row; red where it was missed
            missed = p95_budget["ok"] is False
            ax_lat.plot([p95_budget["limit"]] * 2, [i - 0.45, i + 0.45], color="#b91c1c" if missed else "#6b7280",
                        linewidth=2 if missed else 1, zorder=3, label=None if budget_drawn else "p95 budget")
            budget_drawn = True
            if missed:
                ax_lat.annotate("p95 over budget", (_get(r, "latency_ms.p95") or 0, i), xytext=(4, -1),
                                textcoords="offset points", va="center", fontsize=8, color="#b91c1c")
        if r.get("emulated") or not r.get("latency_ms"):
            ax_lat.annotate("emulated: accuracy only" if r.get("emulated") else "no latency", (0, i),
                            xytext=(4, 0), textcoords="offset points", va="center", fontsize=8, color="#6b7280")
            continue
        for j, q in enumerate(shades):
            v = _get(r, f"latency_ms.{q}")
            if isinstance(v, (int, float)):
                ax_lat.barh(i + (j - 1) * h, v, height=h * 0.92, color=shades[q], label=q if i == 0 or top == 0 else None,
                            zorder=2)
                top = max(top, v)
    limits = [b["limit"] for r in rows for b in r.get("budgets") or () if b.get("budget") == "p95_latency_ms"
              and b.get("ok") is not None and isinstance(b.get("limit"), (int, float))]
    # A budget far above every bar stays off the scale (the bars would shrink to nothing); one the bars
    # reach or pass is drawn.
    near = [v for v in limits if v <= 2 * (top or 1)]
    ax_lat.set_xlim(0, max([top or 1, *near]) * 1.15)
    ax_lat.set_xlabel("latency, one query end to end (ms)")
    handles, labels = ax_lat.get_legend_handles_labels()
    if handles:
        uniq = dict(zip(labels, handles, strict=True))
        ax_lat.legend(uniq.values(), uniq.keys(), loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False,
                      fontsize=8, ncols=3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------- render


def _e(v: Any) -> str:
    return html.escape(DASH if v is None or v == "" else str(v))


def _cards(doc: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    s = doc["summary"]
    n, failed = s["devices"], len(s["failed"])
    cards = [("devices measured", f"{n - failed}/{n}", ("unreachable or failed: " + ", ".join(s["failed"]))
              if failed else "every device answered", "bad" if failed else "good")]
    gate = s["regressed"] + s["budget_missed"]
    cards.append(("gate", f"{len(s['ok'])}/{n} passed", ("flagged: " + ", ".join(gate)) if gate else
                  f"within {doc.get('tolerance_points', 0):g} pt of build time, budgets met", "bad" if gate else "good"))
    build = _get(doc, "bundle.build.accuracy")
    if isinstance(build, (int, float)):
        cards.append(("build-time accuracy", f"{100 * build:.2f}%", str(_get(doc, "bundle.build.basis") or ""), ""))
    p50s = [(r["device"], _get(r, "latency_ms.p50")) for r in doc["devices"] if _get(r, "latency_ms.p50")]
    if p50s:
        fast = min(p50s, key=lambda x: x[1])
        slow = max(p50s, key=lambda x: x[1])
        cards.append(("p50 latency", f"{_ms(fast[1])}–{_ms(slow[1])} ms", f"fastest {fast[0]}, slowest {slow[0]}", ""))
    return cards


def render_html(doc: Mapping[str, Any], png: bytes | None) -> str:
    b = doc["bundle"]
    out = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
           f'content="width=device-width, initial-scale=1"><title>fleet: {_e(b["name"])}</title>'
           f"<style>{CSS}</style></head><body><main>"]
    w = out.append
    w(f"<header><h1>Fleet report: {_e(b['name'])}</h1><p>manifest sha256 <code>{_e(b['manifest_digest'][:16])}</code>"
      f" · target {_e(b.get('target'))} · {doc['summary']['devices']} devices · generated {_e(doc['created'])}"
      "</p></header>")
    w('<div class="cards">')
    for k, v, s, tone in _cards(doc):
        w(f'<div class="card"><div class="k">{_e(k)}</div><div class="v {tone if tone == "bad" else ""}">{_e(v)}'
          f'</div><div class="s {tone}">{_e(s) if s else ""}</div></div>')
    w("</div>")
    if png:
        w('<section><h2>Accuracy and latency per device</h2><figure><img alt="accuracy and latency per device" '
          f'src="data:image/png;base64,{base64.b64encode(png).decode()}"><figcaption>Accuracy on the bundle\'s '
          "eval slice (dashed: the build-time figure; shaded: the tolerance). Latency: one query end to end "
          "(tokenize + run + softmax), percentiles after warm-up. Emulated devices report accuracy only."
          "</figcaption></figure></section>")
    w("<section><h2>Devices</h2>")
    for caption, cols in zip(("Accuracy and checks", "Speed and memory"), _split(columns(doc)), strict=True):
        w(f'<h3>{caption}</h3><div class="scroll"><table><thead><tr>')
        for head, _ in cols:
            w(f'<th class="{"" if head in TEXT else "n"}">{_e(head)}</th>')
        w("</tr></thead><tbody>")
        for r in doc["devices"]:
            w("<tr>")
            for head, fn in cols:
                w(_td(head, fn(r), r))
            w("</tr>")
        w("</tbody></table></div>")
    w(f'<p class="note">Accuracy with the calibrated out-of-scope threshold. vs build: points against '
      f'{_e(_get(doc, "bundle.build.basis"))}; a device more than {doc.get("tolerance_points", 0):g} points below '
      "is flagged. Agreement: the share of eval rows labelled as at build time. MB = 10⁶ bytes.</p></section>")
    notes = _notes(doc)
    if notes:
        w('<section><h2>Checks, warnings and failures</h2><ul class="notes">')
        for ln in notes:
            w(f"<li>{_e(ln)}</li>")
        w("</ul></section>")
    w('<section><h2>Machines and versions</h2><ul class="notes">')
    for ln in _machines(doc):
        w(f"<li>{_e(ln)}</li>")
    w("</ul></section></main></body></html>\n")
    return "".join(out)


def _td(head: str, v: Any, r: Mapping[str, Any]) -> str:
    if head == "Status":
        return f'<td><span class="badge {STATUS.get(r.get("status"), ("unknown", "?"))[0]}">{_e(v)}</span></td>'
    if head == "Device":
        return f'<td class="name">{_e(v)}</td>'
    if head in TEXT:
        bad = (head == "Budgets" and str(v).startswith("missed")) or (head == "Target" and r.get("target_match") is False)
        wrap = "" if head == "Target" else ' style="white-space:nowrap"'
        return f'<td class="{"bad" if bad else ""}"{wrap}>{_e(v)}</td>'
    bad = head == "vs build (pt)" and r.get("status") == "regressed"
    return f'<td class="n {"bad" if bad else ""}">{_e(v)}</td>'


def _notes(doc: Mapping[str, Any]) -> list[str]:
    out = []
    for r in doc["devices"]:
        if r.get("status") == "failed":
            out.append(f"FAILED {r.get('error')}")
            continue
        for bud in r.get("budgets") or []:
            state = "skipped (emulated)" if bud["ok"] is None else "ok" if bud["ok"] else "MISSED"
            out.append(f"{r['device']}: {bud['line']} [{state}]")
    from .progress import grouped

    return [*grouped([(r["device"], r["target_warning"]) for r in doc["devices"] if r.get("target_warning")]), *out]


def _machines(doc: Mapping[str, Any]) -> list[str]:
    out = [f"bundle {doc['bundle']['path']}: manifest sha256 {doc['bundle']['manifest_digest']}"]
    for r in doc["devices"]:
        cpu = r.get("cpu") or {}
        pk = ", ".join(f"{k} {v or 'missing'}" for k, v in (r.get("packages") or {}).items())
        out.append(f"{r['device']} ({r.get('address')}, {r.get('transport')}{', emulated' if r.get('emulated') else ''})"
                   f": {cpu.get('machine') or DASH}, {cpu.get('physical_cores') or DASH} physical cores, Python "
                   f"{r.get('python') or DASH}; {pk or DASH}; {r.get('seconds')} s")
    return out


def render_md(doc: Mapping[str, Any]) -> str:
    b = doc["bundle"]
    cols = columns(doc)
    out = [f"# Fleet report: {b['name']}", "",
           f"Manifest sha256 `{b['manifest_digest'][:16]}`, target {b.get('target') or DASH}, "
           f"{doc['summary']['devices']} devices, generated {doc['created']}.", ""]
    for k, v, s, _ in _cards(doc):
        out.append(f"- **{k}**: {v}" + (f" ({s})" if s else ""))
    out += ["", f"![accuracy and latency per device]({FILES['png']})", "",
            "| " + " | ".join(h for h, _ in cols) + " |",
            "|" + "|".join("---" if h in ("Device", "Profile", "Status", "Budgets", "Target") else "---:"
                           for h, _ in cols) + "|"]
    for r in doc["devices"]:
        out.append("| " + " | ".join(str(fn(r)).replace("|", "\\|") for _, fn in cols) + " |")
    out += ["", f"vs build: accuracy points against {_get(doc, 'bundle.build.basis')}; tolerance "
            f"{doc.get('tolerance_points', 0):g} points.", ""]
    notes = _notes(doc)
    if notes:
        out += ["## Checks, warnings and failures", ""] + [f"- `{n}`" for n in notes] + [""]
    out += ["## Machines and versions", ""] + [f"- {m}" for m in _machines(doc)] + [""]
    return "\n".join(out)


def _write(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)


def write_report(out_dir: Path, doc: Mapping[str, Any]) -> dict[str, Path]:
    """Write fleet.json, fleet.md, fleet.png and fleet.html into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(doc)
    paths = {k: out_dir / v for k, v in FILES.items()}
    _write(paths["json"], (json.dumps(doc, indent=2, default=str) + "\n").encode())
    if png:
        _write(paths["png"], png)
    else:
        paths.pop("png")
    _write(paths["md"], render_md(doc).encode())
    _write(paths["html"], render_html(doc, png).encode())
    return paths
