"""Quantization candidates for a target, built and measured: keep the fastest inside the accuracy budget.

For a target (``targets/*.toml``) the candidates are its own dynamic-int8 settings and their
neighbours: U8S8 against U8U8 weights, reduce_range on and off, per-channel on and off, with and
without ORT's transformer fusions (fused *before* quantizing, so Attention is quantized whole),
static QDQ calibrated on training rows, and 4-bit ``MatMulNBits`` (weight-only, int8 compute).
Each is measured on the validation split (accuracy, agreement with fp32) and for single-query model
latency, all candidates interleaved in rounds so a noisy machine slows them alike. A candidate's drop
below fp32 is paired on the same rows and judged as a shape's drop below the teacher is
(``metrics.budget_verdict``: an interval at a stated confidence, "inside" only when the whole interval
is). The table goes into the pack record and the report; ``search`` returns it with the chosen row
marked.

The formats themselves are built by ``edgepack.stages.quantize.formats``; this module only lists,
builds through it and measures the candidates.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.config import QuantSettings
from edgepack.console import Log, Progress
from edgepack.errors import BudgetError
from edgepack.metrics import (
    CONFIDENCE,
    LATENCY_OBJECTIVES,
    VERDICT_TEXT,
    agreement,
    apply_threshold,
    budget_verdict,
    calibrate_threshold,
    label_metrics,
    leads,
    noise_key,
)
from edgepack.modeling import ModelInfo
from edgepack.records import write_json_atomic
from edgepack.stages.quantize.formats import Feed, quantize_model, quantize_other, written_fused
from edgepack.targets import Target

VARIANTS_JSON = "variants.json"


# --------------------------------------------------------------------------------------- candidates


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    quantize: QuantSettings
    why: str  # what the candidate tests, for the table


def variant_name(q: QuantSettings) -> str:
    """A short, stable label: ``dyn-u8s8-pc``, ``dyn-u8s8-pt-rr-fused``, ``qdq-u8s8-pc``, ``nbits4-b32``."""
    if q.format == "matmul-nbits":
        return f"nbits4-b{q.nbits_block_size}"
    kind = "dyn" if q.format == "dynamic" else "qdq"
    act = "u8" if q.activation_type == "quint8" else "s8"
    w = "s8" if q.weight_type == "qint8" else "u8"
    parts = [kind, f"{act}{w}", "pc" if q.per_channel else "pt"]
    if q.reduce_range:
        parts.append("rr")
    if q.fuse:
        parts.append("fused")
    return "-".join(parts)


def candidates(target: Target, *, formats: Sequence[str] = ("dynamic", "static-qdq", "matmul-nbits")) -> list[Variant]:
    """The target's own settings first, then one change at a time (deduplicated)."""
    base = target.quantize.replace(format="dynamic", activation_type="quint8")
    flips: list[tuple[QuantSettings, str]] = [(base, f"{target.name}'s settings")]
    flips.append((base.replace(weight_type="quint8" if base.weight_type == "qint8" else "qint8"),
                  "U8U8 vs U8S8: exact everywhere (16-bit widening), slower where U8S8 has a fast path"))
    flips.append((base.replace(reduce_range=not base.reduce_range),
                  "7-bit weights: guards VPMADDUBSW saturation on x86 without VNNI, costs precision"))
    flips.append((base.replace(per_channel=not base.per_channel), "per-channel vs per-tensor weight scales"))
    flips.append((base.replace(fuse=not base.fuse), "ORT transformer fusions before quantizing"))
    if "static-qdq" in formats:
        flips.append((base.replace(format="static-qdq", fuse=False, op_types=("MatMul",)),
                      "static QDQ: activation ranges calibrated on training rows, no run-time min/max"))
    if "matmul-nbits" in formats:
        flips.append((base.replace(format="matmul-nbits", fuse=False, op_types=("MatMul",)),
                      "4-bit weights (MatMulNBits, int8 compute): built for memory-bound decoding"))
    seen: set[str] = set()
    out = []
    for q, why in flips:
        if q.format not in formats:
            continue
        name = variant_name(q)
        if name not in seen:
            seen.add(name)
            out.append(Variant(name, q, why))
    return out


# -------------------------------------------------------------------------------- the other formats


def build(variant: Variant, src: Path, out: Path, *, info: ModelInfo,
          calibration: Callable[[], Iterable[Feed]] | None = None) -> Path:
    """One candidate model at ``out`` (dynamic through ``edgepack.stages.quantize.formats``)."""

    q = variant.quantize
    if q.format == "dynamic":  # fused or not: quantize_model fuses first when asked
        return quantize_model(q, src, out, info=info)
    return quantize_other(q, src, out, info=info, calibration=calibration() if calibration else None)


# ------------------------------------------------------------------------------------ measurement


def _percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else float("nan")


def accuracy_probs(pipe, texts: Sequence[str]) -> np.ndarray:
    """Softmax probabilities of an ``OnnxPipeline`` on ``texts``, batched exactly as ``pack`` and
    ``bench`` score (``runtime_shim.bench.predict_probs``): dynamic int8 computes each activation
    scale over the whole batch tensor, so batch composition moves a few predictions."""
    from runtime_shim.bench import predict_probs

    return predict_probs(pipe, list(texts))


def round_summary(blocks: Sequence[Sequence[float]]) -> dict[str, Any]:
    """One candidate's ``time_interleaved`` rounds: p50, p95 and mean over every call, and the noise a
    lead in each figure must beat: that figure's spread over the rounds (for p50 the round medians')."""
    flat = [t for b in blocks for t in b]
    per_round = {"p50": [_percentile(b, 50) for b in blocks], "mean": [sum(b) / len(b) for b in blocks],
                 "p95": [_percentile(b, 95) for b in blocks]}
    return {"p50_ms": _percentile(flat, 50), "p95_ms": _percentile(flat, 95), "mean_ms": sum(flat) / len(flat),
            "n": len(flat), "round_p50_ms": [round(m, 5) for m in per_round["p50"]],
            **{noise_key(o): max(v) - min(v) for o, v in per_round.items()}}


def time_interleaved(runners: Mapping[str, Callable[[Feed], Any]], feeds: Sequence[Feed], *, warmup: int = 50,
                     runs: int = 210, rounds: int = 7) -> dict[str, list[list[float]]]:
    """Milliseconds per call of each runner on single-query ``feeds``, measured in ``rounds`` rotated
    blocks so slow spells of a shared machine fall on every candidate alike; one list per round (the
    spread of the round medians is the noise a lead must beat). Warm-up is untimed."""
    names = list(runners)
    for name in names:
        for i in range(warmup):
            runners[name](feeds[i % len(feeds)])
    per_round = max(1, runs // rounds)
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    k = 0
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            run = runners[name]
            run(feeds[k % len(feeds)])  # one untimed call: the block's first call pays the switch
            block = []
            for _ in range(per_round):
                feed = feeds[k % len(feeds)]
                k += 1
                t0 = time.perf_counter_ns()
                run(feed)
                block.append((time.perf_counter_ns() - t0) / 1e6)
            times[name].append(block)
    return times


def judge(ref_correct, correct, max_drop: float, *, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """A candidate's drop below fp32 on the same validation rows (``accuracy_drop``, points; per-row
    correctness of each) with its paired-bootstrap interval ``drop_low``..``drop_high`` and what that
    says of ``max_drop``: ``metrics.budget_verdict``, the rule the shape search applies against the
    teacher. ``inside`` is the point estimate's answer (what makes a candidate eligible), ``verdict``
    says whether the interval agrees.

    >>> fp32 = np.ones(1000, bool)
    >>> r = judge(fp32, np.r_[np.ones(997, bool), np.zeros(3, bool)], 1.0)   # 0.3 points: 3 rows of 1,000
    >>> r["verdict"], r["drop_high"] <= 1.0
    ('inside', True)
    >>> r = judge(fp32[:200], np.r_[np.ones(199, bool), [False]], 1.0)       # 0.5 points: 1 row of 200
    >>> r["verdict"], r["inside"], r["drop_high"] > 1.0
    ('inside, not significant', True, True)
    """
    v = budget_verdict(ref_correct, correct, max_drop, confidence=confidence)
    return {"accuracy_drop": float(v["drop"]), "drop_low": round(float(v["low"]), 4),
            "drop_high": round(float(v["high"]), 4), "verdict": v["verdict"], "verdict_text": VERDICT_TEXT[v["verdict"]],
            "confidence": confidence, "inside": bool(v["inside_point"])}


def drop_text(row: Mapping[str, Any]) -> str:
    """``+0.32 (-0.10..+0.74)``: the drop with its interval (a row from before intervals: the drop)."""
    if row.get("drop_low") is None:
        return f"{row['accuracy_drop']:+.2f}"
    return f"{row['accuracy_drop']:+.2f} ({row['drop_low']:+.2f}..{row['drop_high']:+.2f})"


# The order a chosen candidate is taken from, as the shape search ranks shapes (metrics.choose_shape).
TIERS = ("inside", "inside, not significant")


def eligible(rows: Sequence[Mapping[str, Any]], *, min_agreement: float) -> tuple[list[Mapping[str, Any]], bool]:
    """The candidates the choice is made among: inside the accuracy budget on the point estimate (as a
    shape is, for the teacher's budget) and agreeing with fp32 on at least ``min_agreement`` of the
    labels. When none agrees that often: those inside the budget, and True (the caller says so)."""
    measured = [r for r in rows if r["name"] != "fp32" and "error" not in r]
    ok = [r for r in measured if r["inside"] and r["agreement"] >= min_agreement]
    if ok:
        return ok, False
    return [r for r in measured if r["inside"]], True


def choose(rows: Sequence[Mapping[str, Any]], *, objective: str = "p95", tie_pct: float = 3.0) -> str | None:
    """The kept candidate among eligible ``rows`` (each with ``agreement``, the ``objective`` figure
    (``p95_ms``) and its noise (:func:`noise_key`) and, from :func:`judge`, ``verdict``).

    Candidates the interval puts inside the budget come first, then those inside on the point estimate
    only (rows without a verdict are one group). Within that group, a candidate is beaten when another
    is faster by ``objective`` by more than the measured noise (the larger of the two candidates'
    spreads of that figure over the rounds, and at least ``tie_pct`` percent): that lead is real, so the
    faster wins whatever their accuracies, as between shapes inside the budget. Among the candidates
    nothing beats, the one agreeing most with fp32 wins (then the faster): agreement counts every
    flipped label, even flips that cancel in the accuracy. So the same inputs give the same choice
    however the timing wobbles within its noise.

    >>> choose([{"name": "a", "p50_ms": 1.00, "noise_ms": 0.05, "agreement": 0.995},
    ...         {"name": "b", "p50_ms": 0.97, "noise_ms": 0.05, "agreement": 0.990}], objective="p50")
    'a'
    >>> choose([{"name": "a", "p50_ms": 1.00, "noise_ms": 0.05, "agreement": 0.995},
    ...         {"name": "b", "p50_ms": 0.60, "noise_ms": 0.05, "agreement": 0.990}], objective="p50")
    'b'
    """
    if objective not in LATENCY_OBJECTIVES:
        raise ValueError(f"objective={objective!r}; choose one of: {', '.join(LATENCY_OBJECTIVES)}")
    fig = f"{objective}_ms"

    def tier(r: Mapping[str, Any]) -> int:
        return TIERS.index(r["verdict"]) if r.get("verdict") in TIERS else len(TIERS)

    top = min((tier(r) for r in rows), default=0)
    rows = [r for r in rows if tier(r) == top]
    front = [r for r in rows if not any(leads(o, r, objective, tie_pct) for o in rows if o is not r)]
    if not front:
        return None
    return min(front, key=lambda r: (-r["agreement"], r[fig], r["name"]))["name"]


@dataclasses.dataclass
class VariantSearch:
    """The measured table. ``rows[0]`` is the fp32 reference; ``chosen`` names the kept candidate."""

    rows: list[dict[str, Any]]
    chosen: str | None
    max_accuracy_drop: float
    threads: int
    tie_pct: float = 3.0
    min_agreement: float = 0.0
    confidence: float = CONFIDENCE  # of each candidate's interval against fp32
    objective: str = "p95"  # the latency figure the ranking compares

    def row(self, name: str) -> dict[str, Any]:
        return next(r for r in self.rows if r["name"] == name)

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "max_accuracy_drop": self.max_accuracy_drop, "confidence": self.confidence,
                "objective": self.objective, "min_agreement": self.min_agreement, "threads": self.threads, "rows": self.rows}

    def record(self) -> dict[str, Any]:
        """``to_dict`` without the work-directory paths: for the pack record and the manifest."""
        d = self.to_dict()
        d["rows"] = [{k: v for k, v in r.items() if k != "path"} for r in self.rows]
        return d

    def table(self) -> str:
        o = self.objective
        figures = tuple(f"{k} ms" + (" (ranked)" if k == o else "") for k in ("p50", "mean", "p95"))
        head = ("", "variant", "MB", "val acc", "drop pts (interval)", "budget", "agree", "cal acc", *figures,
                f"{o} vs fp32", "note")
        lines = [head]
        ref = self.rows[0]
        for r in self.rows:
            mark = "*" if r["name"] == self.chosen else ("x" if r.get("error") or not r.get("within_budget", True) else "")
            if r.get("error"):
                lines.append((mark, r["name"], *["-"] * (len(head) - 3), r["error"][:60]))
                continue
            lines.append((mark, r["name"], f"{r['model_mb']:.2f}", f"{r['accuracy']:.2%}", drop_text(r),
                          r.get("verdict", "-"), f"{r['agreement']:.2%}",
                          f"{r['accuracy_calibrated']:.2%}" if "accuracy_calibrated" in r else "-", f"{r['p50_ms']:.3f}",
                          f"{r['mean_ms']:.3f}", f"{r['p95_ms']:.3f}",
                          f"{ref[f'{o}_ms'] / r[f'{o}_ms']:.2f}x" if r[f"{o}_ms"] else "-", r.get("note", "")))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(head) - 1)]
        out = ["  ".join(str(c).ljust(w) for c, w in zip(line[:-1], widths, strict=True)) + "  " + str(line[-1])
               for line in lines]
        out.append(f"(* chosen: within {self.max_accuracy_drop:g} points of fp32 validation accuracy on the point "
                   f"estimate and agreeing with fp32 on at least {self.min_agreement:.0%} of labels, those whose "
                   f"{self.confidence:.0%} paired-bootstrap interval is inside first, then the one agreeing most among "
                   f"those no other is faster than by {o} by more than the measured noise (spread of the round "
                   f"{'median' if o == 'p50' else o}s, at least {self.tie_pct:g}%); x: over budget or failed; "
                   f"single-query model latency, {self.threads} intra-op thread(s), candidates interleaved in the same run)")
        return "\n".join(out)


def search(
    target: Target,
    fp32_onnx: Path,
    work_dir: Path,
    *,
    info: ModelInfo,
    pipeline_dir: Path,
    val_texts: Sequence[str],
    val_labels: np.ndarray,
    calibration_texts: Sequence[str],
    max_accuracy_drop: float = 1.0,
    min_agreement: float = 0.0,
    threads: int = 1,
    runs: int = 210,
    warmup: int = 50,
    latency_texts: int = 64,
    formats: Sequence[str] = ("dynamic", "static-qdq", "matmul-nbits"),
    tie_pct: float = 3.0,
    confidence: float = CONFIDENCE,
    objective: str = "p95",
    log: Log | None = None,
) -> VariantSearch:
    """Build every candidate for ``target`` into ``work_dir/<name>.onnx``, measure them and choose.

    ``pipeline_dir`` is any directory ``runtime_shim.OnnxPipeline`` loads (``tokenizer.json``,
    ``runtime.json``, ``labels.json``: a bundle or pack's staging directory, whose tokenizer matches
    ``fp32_onnx``); each candidate runs through it with ``overrides={"model": path}``, so encoding
    matches the bundle exactly. Each candidate's drop below fp32 is paired on the validation rows and
    judged at ``confidence`` (:func:`judge`); eligible rows lose at most ``max_accuracy_drop`` points on
    the point estimate and agree with fp32 on at least ``min_agreement`` of the labels (:func:`eligible`);
    the chosen one is :func:`choose`'s: those the interval puts inside first, then a faster candidate
    by ``objective`` (p50, mean or p95) wins only by a lead larger than that figure's measured noise,
    otherwise the one agreeing most with fp32.
    With an out-of-scope label, ``accuracy_calibrated`` is each candidate's validation
    accuracy under its own best threshold (shown, not gated: 100 out-of-scope rows make it noisy).
    Writes ``work_dir/variants.json``. Raises ``BudgetError`` when no candidate is inside the budget.
    """
    log = log or Progress("quantize")
    from runtime_shim import OnnxPipeline

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    val_labels = np.asarray(val_labels)
    overrides = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    ref_pipe = OnnxPipeline(pipeline_dir, verify=False, overrides={**overrides, "model": str(Path(fp32_onnx).resolve())})

    def calibration() -> Iterable[Feed]:
        # One row per feed: padding would add pad-token activations to the calibrated ranges.
        for text in calibration_texts:
            yield ref_pipe.encode([text])

    variants = candidates(target, formats=formats)

    if written_fused(Path(fp32_onnx)):  # already fused: the "fuse" flip would build the same model twice
        variants = [v for v in variants if v.quantize.fuse == target.quantize.fuse or v.quantize.format != "dynamic"]
    pipes: dict[str, Any] = {"fp32": ref_pipe}
    rows: dict[str, dict[str, Any]] = {"fp32": {"name": "fp32", "format": "fp32", "note": "reference",
                                                "model_mb": Path(fp32_onnx).stat().st_size / 1e6}}
    for v in variants:
        path = work_dir / f"{v.name}.onnx"
        row: dict[str, Any] = {"name": v.name, "format": v.quantize.format, "note": v.why,
                               "quantize": v.quantize.to_dict(), "path": str(path)}
        t0 = time.time()
        try:
            build(v, Path(fp32_onnx), path, info=info, calibration=calibration)
            pipes[v.name] = OnnxPipeline(pipeline_dir, verify=False, overrides={**overrides, "model": str(path.resolve()),
                                                                                "session_config": dict(v.quantize.session_config)})
            row["model_mb"] = path.stat().st_size / 1e6
            row["build_s"] = round(time.time() - t0, 2)
        except Exception as e:  # a format this ORT cannot build or run is a row of the table, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log(f"[variants] {v.name}: failed ({row['error'][:120]})")
        rows[v.name] = row

    ref_probs = accuracy_probs(ref_pipe, val_texts)
    ref_pred = ref_probs.argmax(1)
    ref_acc = label_metrics(ref_pred, val_labels, None)["accuracy"]
    ref_correct = ref_pred == val_labels
    oos_id = ref_pipe.oos_id
    for name, pipe in pipes.items():
        probs = ref_probs if name == "fp32" else accuracy_probs(pipe, val_texts)
        pred = probs.argmax(1)
        acc = label_metrics(pred, val_labels, None)["accuracy"]
        rows[name].update(accuracy=acc, accuracy_drop=(ref_acc - acc) * 100, agreement=agreement(pred, ref_pred))
        if name != "fp32":  # paired on the same rows as fp32's
            rows[name].update(judge(ref_correct, pred == val_labels, max_accuracy_drop, confidence=confidence))
        if oos_id is not None:
            thr = calibrate_threshold(probs, val_labels, oos_id)
            rows[name]["accuracy_calibrated"] = label_metrics(apply_threshold(probs, oos_id, thr), val_labels,
                                                              None)["accuracy"]

    sample = list(val_texts[:latency_texts]) or ["hello"]
    feeds = [ref_pipe.encode([t]) for t in sample]
    runners = {name: pipe.forward for name, pipe in pipes.items()}
    times = time_interleaved(runners, feeds, warmup=warmup, runs=runs)
    for name, blocks in times.items():
        rows[name].update(round_summary(blocks))

    for n, r in rows.items():
        if n != "fp32" and "error" not in r:
            r["within_budget"] = r["inside"] and r["agreement"] >= min_agreement
    # Nothing agrees with fp32 as often as asked: those within the accuracy budget are ranked anyway
    # (the most agreeing wins the ties), and the log says so; refusing is for the accuracy budget.
    ok, relaxed = eligible(list(rows.values()), min_agreement=min_agreement)
    if ok and relaxed:
        log(f"[variants] no variant agrees with fp32 on {min_agreement:.0%} of validation labels; ranking "
            "those within the accuracy budget by agreement")
    chosen = choose(ok, objective=objective, tie_pct=tie_pct) if ok else None
    result = VariantSearch(rows=[rows["fp32"], *(rows[v.name] for v in variants)], chosen=chosen,
                           max_accuracy_drop=max_accuracy_drop, threads=threads, tie_pct=tie_pct,
                           min_agreement=min_agreement, confidence=confidence, objective=objective)
    write_json_atomic(work_dir / VARIANTS_JSON, result.to_dict())
    if chosen is None:
        measured = [r for n, r in rows.items() if n != "fp32" and "error" not in r]
        closest = min(measured, key=lambda r: r["accuracy_drop"], default=None)
        raise BudgetError(f"no quantization variant for {target.name} stays within {max_accuracy_drop:g} points of "
                          f"fp32 validation accuracy ({ref_acc:.2%})"
                          + (f": the closest, {closest['name']}, loses {closest['accuracy_drop']:.2f} points "
                             f"({confidence:.0%} interval {closest['drop_low']:+.2f} to {closest['drop_high']:+.2f}, "
                             f"{closest['verdict_text']})" if closest else ": every variant failed to build")
                          + f"; see {work_dir / VARIANTS_JSON} or raise --max-accuracy-drop")
    return result


def chosen_model(result: VariantSearch, dest: Path) -> Path:
    """Copy the chosen candidate's model to ``dest`` (e.g. the bundle's ``model.quant.onnx``)."""
    src = Path(result.row(result.chosen)["path"])
    shutil.copy2(src, dest)
    return dest
