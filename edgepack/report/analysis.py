"""What the report says about the rows: baseline and final row, accuracy per domain, the changed queries,
the headline cards, and ``_Parts``, everything both renderers need computed once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runtime_shim.bench import result_value as _get  # one reader of harness results

from .tables import Column, _fmt_ms, _mb, _num, _pct, _plural, _speedup

MAX_CHANGED = 50
OOS_LABELS = ("oos", "out_of_scope", "out-of-scope")


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
    frontier: Mapping[str, Any] | None = None  # a shape search's frontier.json
    variants: Mapping[str, Any] | None = None  # the quantize stage's variants table (variants.json)


def frontier_rows(frontier: Mapping[str, Any]) -> list[list[str]]:
    """The shape search as table rows: shape, status, validation accuracy, points below the teacher
    with their paired interval, p50 (its spread), mean, p95, a cascade's share of validation texts
    sent to its fallback, the cost model's figure, size, the budget's verdict, chosen."""
    def num(c: Mapping[str, Any], key: str, fmt: str) -> str:
        return fmt.format(c[key]) if c.get("status") == "built" and c.get(key) is not None else ""

    out = []
    for c in frontier.get("candidates", []):
        built = c.get("status") == "built"
        status = c.get("status", "") + (f" ({(c.get('why') or {}).get('search', '')})" if c.get("reach") else "")
        out.append([c["name"], c.get("shape", ""), status, num(c, "validation_accuracy", "{:.2f}%"),
                    num(c, "teacher_drop", "{:+.2f}")
                    + (f" ({c['drop_low']:+.2f} to {c['drop_high']:+.2f})" if built and c.get("drop_low") is not None else ""),
                    (f"{c['p50_ms']:.3f} ± {c['noise_ms']:.3f}" if built and c.get("p50_ms") else ""),
                    num(c, "mean_ms", "{:.3f}"), num(c, "p95_ms", "{:.3f}"), num(c, "sent_on", "{:.1%}"),
                    _probe_cell(c), num(c, "bundle_bytes", "{:,}"),
                    (c.get("verdict_text") or "") if built and frontier.get("max_drop") is not None else "",
                    "chosen" if c["name"] == frontier.get("chosen") else ""])
    return out


FRONTIER_HEADERS = ("Shape", "Spec", "Status", "Validation accuracy", "Points below teacher (interval)",
                    "p50 ms (± spread)", "mean ms", "p95 ms", "Sent to the fallback", "Untrained p50 ms (error)",
                    "Bundle bytes", "Budget", "")


VARIANTS_HEADERS = ("Variant", "Format", "Model MB", "Validation accuracy", "Points below fp32 (interval)", "Budget",
                    "Agreement", "p50 ms (± spread)", "mean ms", "p95 ms", "")


def variants_rows(variants: Mapping[str, Any]) -> list[list[str]]:
    """The quantize stage's candidates as table rows: name, format, size, validation accuracy, points
    below fp32 with their paired interval, the verdict, agreement with fp32, p50 (its spread), mean,
    p95, chosen or why it was not. A table written before the intervals shows the drop alone."""
    def num(r: Mapping[str, Any], key: str, fmt: str) -> str:
        return fmt.format(r[key]) if r.get(key) is not None else ""

    out = []
    for r in variants.get("rows", []):
        drop = num(r, "accuracy_drop", "{:+.2f}") + (f" ({r['drop_low']:+.2f} to {r['drop_high']:+.2f})"
                                                      if r.get("drop_low") is not None else "")
        mark = ("chosen" if r.get("name") == variants.get("chosen") else "reference" if r.get("name") == "fp32"
                else f"failed: {r['error'][:80]}" if r.get("error")
                else "over the gate" if r.get("within_budget") is False else "")
        out.append([str(r.get("name", "")), str(r.get("format", "")), num(r, "model_mb", "{:.2f}"),
                    num(r, "accuracy", "{:.2%}"), drop if r.get("name") != "fp32" else "",
                    str(r.get("verdict_text") or ""), num(r, "agreement", "{:.2%}"),
                    (f"{r['p50_ms']:.3f} ± {r['noise_ms']:.3f}" if r.get("p50_ms") is not None
                     and r.get("noise_ms") is not None else num(r, "p50_ms", "{:.3f}")),
                    num(r, "mean_ms", "{:.3f}"), num(r, "p95_ms", "{:.3f}"), mark])
    return out


def variants_caption(variants: Mapping[str, Any]) -> str:
    conf, agree = variants.get("confidence"), variants.get("min_agreement")
    objective = variants.get("objective") or "p50"  # a table from before the objective: ranked by p50
    return ("Each int8 candidate of the quantize stage against its own fp32 model on the same validation rows"
            + (f": the drop with its {conf:.0%} paired-bootstrap interval" if conf is not None else "")
            + f". A candidate may be kept when its drop is within {variants.get('max_accuracy_drop', 0):g} points on "
            "the point estimate" + (f" and it gives fp32's label on at least {agree:.0%} of rows" if agree else "")
            + ("; those whose whole interval is inside come first" if conf is not None else "")
            + f"; then a faster one wins by a {objective} lead larger than the timing spread (the spread of its round "
            + ("medians" if objective == "p50" else f"{objective}s") + "), otherwise the one agreeing most with fp32. "
            "Single-query model latency, "
            f"{variants.get('threads', 1)} intra-op thread(s), candidates interleaved in one run. "
            f"Chosen: {variants.get('chosen')}.")


def _probe_cell(c: Mapping[str, Any]) -> str:
    """The cost model's figure for a shape: its untrained graph's p50 beside the trained bundle (and
    that error), or the p50 it was ordered by when the shape was not built."""
    if c.get("probe_p50_ms") is not None and c.get("probe_error") is not None:
        return f"{c['probe_p50_ms']:.3f} ({c['probe_error']:+.0%})"
    return f"{c['predicted_p50_ms']:.3f}" if c.get("predicted_p50_ms") is not None else ""


def frontier_caption(frontier: Mapping[str, Any]) -> str:
    t, b = frontier.get("teacher_validation_accuracy"), frontier.get("max_drop")
    conf, objective = frontier.get("confidence"), frontier.get("objective")
    return (f"Teacher {t:.2f}% on validation; budget: " + (f"at most {b:g} points below it" if b is not None else "none")
            + (f"; each drop is paired on the same validation rows, with its {conf:.0%} paired-bootstrap interval, and a "
               f"shape is inside only when the whole interval is" if conf is not None else "")
            + (f"; between shapes McNemar's test cannot tell apart, the faster by {objective} wins" if objective else "")
            + f". Chosen: {frontier.get('chosen')} ({frontier.get('why', '')}). Latency measured on "
            f"{frontier.get('cpu', 'this CPU')}, interleaved rounds; the spread is that of the round medians. "
            + _order_sentence(frontier) + _cascade_sentence(frontier)
            + "`edgepack build --pick SHAPE` publishes another built shape without retraining.")


def _cascade_sentence(frontier: Mapping[str, Any]) -> str:
    if not any(c.get("sent_on") is not None for c in frontier.get("candidates", [])):
        return ""
    return ("A shape ending in +teacher is a cascade: its model answers the texts it is sure of and sends the others "
            "to the teacher's int8 model inside the bundle, so its p50 is the first model's while its mean and p95 "
            "carry the share sent on. ")


def _order_sentence(frontier: Mapping[str, Any]) -> str:
    if frontier.get("order") != "latency":
        return "Shapes were tried in the recipe's order. "
    m = frontier.get("latency_model")
    err = (f"; against the trained bundles, timed in the same rounds, its error was {m['median_abs']:.0%} median, "
           f"{m['max_abs']:.0%} at most ({m['shapes']} shapes)") if m else ""
    return ("Shapes were tried fastest first by a cost model: each built untrained (the teacher's weights cut to it) "
            f"and timed here{err}. ")


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


def _latency_caption(rows: Sequence[Mapping[str, Any]]) -> str:
    ns = {_get(r, "latency_ms.n") for r in rows} - {None}
    over = f" over {next(iter(ns))} calls" if len(ns) == 1 else " over the calls each JSON states" if ns else ""
    return f"Latency: one query end to end (tokenize + run + softmax), percentiles{over} after warm-up."


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
