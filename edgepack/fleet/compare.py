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
    out = [f"# Fleet tune: {doc['bundle']['name']} `{doc['bundle']['manifest_digest'][:16]}`", "",
           "| Device | Status | Winner | Threads | Spinning | Graph | p50 b2b | p95 b2b | p50 gap | p95 gap |",
           "|---|---|---|---:|---|---|---:|---:|---:|---:|"]
    for r in doc["devices"]:
        t = r.get("tune") or {}
        st = r.get("status")
        if st == "failed" or t.get("skipped"):
            out.append(f"| {r['device']} | {st if st == 'failed' else 'skipped'} | {r.get('error') or t.get('skipped')}"
                       " | | | | | | | |")
            continue
        desc = next((c.get("describe", {}) for c in t.get("confirm", []) if c.get("name") == t.get("winner")), {})
        ratios = t.get("ratios") or {}
        out.append(f"| {r['device']} | ok | {t.get('winner')} | {desc.get('threads', DASH)} | "
                   f"{desc.get('spinning', DASH)} | {desc.get('graph', DASH)} | "
                   + " | ".join(f"x{ratios[k]:.2f}" if k in ratios else DASH
                                for k in ("b2b_p50", "b2b_p95", "gap_p50", "gap_p95")) + " |")
    out += ["", "Ratios: the winner's latency over ONNX Runtime's defaults in the confirmation round (below 1 is "
            "faster). The winner is written into the device's runtime.json.", ""]
    return "\n".join(out)
