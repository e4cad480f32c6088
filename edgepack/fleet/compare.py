"""Two ``fleet bench`` result sets side by side (``edgepack fleet compare A B``), and the ``fleet tune``
summary table."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime_shim.bench import result_value as _get

from .report import DASH, FILES, _ms, _num, _pct


def load_doc(path: str | Path) -> dict[str, Any]:
    from ..errors import EdgepackError

    p = Path(path)
    p = p / FILES["json"] if p.is_dir() else p
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise EdgepackError(f"{p}: not a readable fleet result ({e}); pass the fleet.json (or its directory) "
                            "that `edgepack fleet bench` wrote") from None
    if not isinstance(doc, dict) or doc.get("format") != "edgepack-fleet/1" or doc.get("kind") != "bench":
        raise EdgepackError(f"{p}: not a `fleet bench` result (format edgepack-fleet/1, kind bench)")
    return doc


def compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """Two result sets device by device: accuracy in points, latency and throughput as ratios B/A."""
    da = {r["device"]: r for r in a["devices"]}
    db = {r["device"]: r for r in b["devices"]}
    ida, idb = a["bundle"]["manifest_digest"][:16], b["bundle"]["manifest_digest"][:16]
    lines = [f"A: {a['bundle']['name']} {ida} ({a['created']})", f"B: {b['bundle']['name']} {idb} ({b['created']})"]
    if ida == idb:
        lines.append("(the same manifest: a re-run of one bundle, not two bundles)")
    rows = [("device", "acc A %", "acc B %", "Δ pt", "p50 A", "p50 B", "B/A", "p95 A", "p95 B", "B/A", "qps@1 B/A",
             "peak MB A", "peak MB B")]

    def ratio(x: Any, y: Any) -> str:
        return f"x{y / x:.2f}" if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x else DASH

    for name in [n for n in da if n in db] + [n for n in db if n not in da] + [n for n in da if n not in db]:
        ra, rb = da.get(name, {}), db.get(name, {})
        acc_a, acc_b = ra.get("accuracy"), rb.get("accuracy")
        delta = (f"{100 * (acc_b - acc_a):+.2f}" if isinstance(acc_a, (int, float)) and isinstance(acc_b, (int, float))
                 else DASH)
        pa, pb = _get(ra, "latency_ms.p50"), _get(rb, "latency_ms.p50")
        qa, qb = _get(ra, "latency_ms.p95"), _get(rb, "latency_ms.p95")
        rows.append((name, _pct(acc_a), _pct(acc_b), delta, _ms(pa), _ms(pb), ratio(pa, pb), _ms(qa), _ms(qb),
                     ratio(qa, qb), ratio(_get(ra, "throughput_qps.1"), _get(rb, "throughput_qps.1")),
                     _num(ra.get("peak_rss_mb")), _num(rb.get("peak_rss_mb"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
              .rstrip() for r in rows]
    lines.append("(accuracy on each bundle's eval slice; Δ pt = B − A; B/A below 1 is faster; — not measured "
                 "or the device is absent from one set)")
    return "\n".join(lines)


def tune_markdown(doc: Mapping[str, Any]) -> str:
    """``tune.md``: per device, the winner, then every candidate it measured (the search and the
    confirmation round) with its figures and its verdict against the settings the device ran with."""
    out = [f"# Fleet tune: {doc['bundle']['name']} `{doc['bundle']['manifest_digest'][:16]}`", "",
           "| Device | Status | Winner | Threads | Spinning | Graph | vs current (confirmation) |",
           "|---|---|---|---:|---|---|---|"]
    for r in doc["devices"]:
        t = r.get("tune") or {}
        st = r.get("status")
        if st == "failed" or t.get("skipped"):
            out.append(f"| {r['device']} | {st if st == 'failed' else 'skipped'} | {r.get('error') or t.get('skipped')}"
                       " | | | | |")
            continue
        desc = next((c.get("describe", {}) for c in t.get("confirm", []) if c.get("name") == t.get("winner")), {})
        ratios = t.get("ratios") or {}
        vs = ", ".join(f"{k.replace('_', ' ')} x{v:.2f}" for k, v in ratios.items()) if t.get("winner") != "current" \
            else "kept: no candidate faster and slower on nothing"
        out.append(f"| {r['device']} | ok | {t.get('winner')} | {desc.get('threads', DASH)} | "
                   f"{desc.get('spinning', DASH)} | {desc.get('graph', DASH)} | {vs} |")
    figures = [f"{m} {f}" for m in ("b2b", "gap") for f in ("p50", "mean", "p95")]
    for r in doc["devices"]:
        t = r.get("tune") or {}
        if r.get("status") == "failed" or t.get("skipped"):
            continue
        out += ["", f"## {r['device']}", "", "| Round | Candidate | Threads | Spinning | Graph | "
                + " | ".join(figures) + " | vs current | Verdict |", "|---|---|---:|---|---|" + "---:|" * 7 + "---|"]
        for section, rows in (("search", t.get("rows") or []), ("confirmation", t.get("confirm") or [])):
            for c in rows:
                d = c.get("describe") or {}
                cells = [_num(c.get(m, {}).get(f)) for m in ("b2b", "gap") for f in ("p50", "mean", "p95")]
                name = f"**{c['name']}**" if section == "confirmation" and c["name"] == t.get("winner") else c["name"]
                out.append(f"| {section} | {name} | {d.get('threads', DASH)} | {d.get('spinning', DASH)} | "
                           f"{d.get('graph', DASH)} | " + " | ".join(cells) + f" | {_num(c.get('score'))} | "
                           f"{_verdict(c)} |")
    out += ["", "Figures in ms, end to end (b2b: back to back; gap: with a pause between queries). vs current: the "
            "geometric mean of the six ratios to the settings the device ran with (below 1 is faster). A candidate "
            "replaces them only when it is faster on one figure and slower on none beyond the 95% bootstrap "
            "interval; the winner is kept in the device's runtime state for this bundle, not in the bundle.", ""]
    return "\n".join(out)


def _verdict(row: Mapping[str, Any]) -> str:
    from runtime_shim.tune import verdict

    return verdict(row) if row.get("name") else DASH
