"""The cascade stage: a bundle -> the same bundle with a more accurate fallback model inside it.

``run(cfg, src, out, ctx)`` copies the bundle at ``src`` (the fast model) and the fallback bundle
(``cfg.fallback_bundle``: the teacher's int8 bundle the build made) into ``out/fallback/``, chooses
the escalation point ``below`` on validation, and rewrites ``runtime.json`` and ``manifest.json``.
The shim (``runtime_shim.OnnxPipeline``) then answers a text with the fast model when its top
probability is at least ``below`` and with the fallback otherwise, under the fallback's out-of-scope
threshold.

``below`` is chosen from both models' validation probabilities: the lowest value on a 0.01 grid, at
or above both out-of-scope thresholds (so the fast model never answers "out of scope" itself),
whose validation accuracy reaches ``cfg.min_accuracy``, i.e. the fewest texts sent on for the
budget. Chosen and measured on the same rows, like the threshold itself: read it as optimistic, and
the test split as the check. The fallback's probabilities are its answers to each text alone, as the
shim runs it, so the grid's accuracy at ``below`` is the bundle's (the stage measures it again).
Latency is not modelled here: the search times the cascade end to end.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from edgepack import bundle_files
from edgepack.config import CascadeConfig
from edgepack.errors import EdgepackError
from edgepack.metrics import accuracy_report, evaluate
from edgepack.records import staging_dir
from edgepack.stages import StageRecord

FALLBACK_DIR = "fallback"
# What of the fallback bundle the cascade needs: the model and what reads its answers. Its shim,
# eval slice and manifest stay out (the outer bundle's cover both models).
FALLBACK_FILES = ("model.quant.onnx", "tokenizer.json", "labels.json", "runtime.json", "config.json")


def cascade_answers(p_fast: np.ndarray, p_fallback: np.ndarray, below: float) -> tuple[np.ndarray, np.ndarray]:
    """The cascade's probabilities (the fast model's rows at or above ``below``, the fallback's under it)
    and which rows went on.

    >>> p, sent = cascade_answers(np.array([[0.9, 0.1], [0.55, 0.45]]), np.array([[0.2, 0.8], [0.3, 0.7]]), 0.6)
    >>> p.tolist(), sent.tolist()
    ([[0.9, 0.1], [0.3, 0.7]], [False, True])
    """
    sent = p_fast.max(axis=1) < below
    return np.where(sent[:, None], p_fallback, p_fast), sent


def grid(floor: float) -> list[float]:
    """The values ``below`` is chosen from: 0.01 steps from ``floor`` (rounded up) to 1.

    >>> grid(0.475)[:3], grid(0.475)[-1]
    ([0.48, 0.49, 0.5], 1.0)
    """
    return [round(float(b), 2) for b in np.arange(np.ceil(round(floor * 100, 6)) / 100, 1.0001, 0.01)]


def points(p_fast: np.ndarray, p_fallback: np.ndarray, labels: np.ndarray, oos_id: int | None,
           threshold: float | None, belows: list[float]) -> list[dict]:
    """The cascade at each of ``belows``: accuracy in points (under the fallback's ``threshold``) and the
    share of texts sent on."""
    rows = []
    for b in belows:
        p, sent = cascade_answers(p_fast, p_fallback, b)
        acc = 100.0 * float(accuracy_report(p, labels, oos_id, threshold)["accuracy"])
        rows.append({"below": b, "accuracy": round(acc, 4), "sent_on": round(float(sent.mean()), 4)})
    return rows


def choose_below(rows: list[dict], min_accuracy: float | None) -> float:
    """The lowest ``below`` (the fewest texts sent on) whose accuracy reaches ``min_accuracy``; none does,
    or no budget: the most accurate (the lowest of equals).

    >>> rows = [{"below": 0.5, "accuracy": 90.0}, {"below": 0.6, "accuracy": 93.0}, {"below": 0.7, "accuracy": 93.0}]
    >>> choose_below(rows, 92.0), choose_below(rows, 95.0), choose_below(rows, None)
    (0.6, 0.6, 0.6)
    """
    if min_accuracy is not None:
        inside = [r for r in rows if r["accuracy"] >= min_accuracy - 1e-9]
        if inside:
            return inside[0]["below"]
    best = max(r["accuracy"] for r in rows)
    return next(r["below"] for r in rows if r["accuracy"] == best)


def run(cfg: CascadeConfig, src: Path, out: Path, ctx) -> StageRecord:
    """The stage: ``src`` (a bundle) -> ``out`` (the cascade bundle, replaced atomically)."""
    import runtime_shim
    from runtime_shim.bench import predict_probs
    from runtime_shim.manifest import read_manifest, write_manifest

    started = time.time()
    src, out = Path(src), Path(out)
    fallback = Path(cfg.fallback_bundle)
    if not (fallback / "manifest.json").is_file():
        raise EdgepackError(f"{fallback}: no fallback bundle there ([cascade] fallback_bundle is set by the build); "
                            "re-run `edgepack build`")
    data, log = ctx.data, ctx.log
    val, test = data["validation"], data["test"]
    fast = runtime_shim.OnnxPipeline(src, verify=False)
    slow = runtime_shim.OnnxPipeline(fallback, verify=False)
    if fast.label_names != slow.label_names:
        raise EdgepackError(f"{fallback / 'labels.json'}: its labels differ from {src / 'labels.json'}; "
                            "a cascade needs one label set")
    oos_id = data.oos_id
    # the fast model batched as every measurement batches it; the fallback one text at a time, as the
    # shim runs it in a cascade (runtime_shim.cascade): so the grid's accuracies are the bundle's
    p_fast, p_slow = evaluate(fast, val), predict_probs(slow, val.texts, batch_size=1)
    floor = max([t for t in (fast.oos_threshold, slow.oos_threshold) if t is not None] + [0.0])
    if cfg.below is not None and cfg.below < floor:
        raise EdgepackError(f"[cascade] below = {cfg.below}: under an out-of-scope threshold ({floor:.3f}); "
                            f"set it to {floor:.2f} or more")
    rows = points(p_fast, p_slow, np.asarray(val.labels), oos_id, slow.oos_threshold,
                  [cfg.below] if cfg.below is not None else grid(floor))
    below = choose_below(rows, cfg.min_accuracy)
    point = next(r for r in rows if r["below"] == below)
    sent_test = float((evaluate(fast, test).max(axis=1) < below).mean())
    threshold = slow.oos_threshold  # the cascade answers under the fallback's out-of-scope threshold
    del fast, slow
    manifest = read_manifest(src)
    with staging_dir(out, force=True) as stage:
        shutil.copytree(src, stage, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        (stage / FALLBACK_DIR).mkdir()
        for name in FALLBACK_FILES:
            if (fallback / name).is_file():
                shutil.copy2(fallback / name, stage / FALLBACK_DIR / name)
        runtime = json.loads((stage / "runtime.json").read_text())
        runtime["cascade"] = {"fallback": FALLBACK_DIR, "below": below}
        (stage / "runtime.json").write_text(json.dumps(runtime, indent=2) + "\n")
        pipe = runtime_shim.OnnxPipeline(stage, verify=False)
        p_val, p_test = evaluate(pipe, val), evaluate(pipe, test)
        del pipe
        metrics = dict(manifest.get("metrics") or {})
        fast_metrics = {k: metrics.get(k) for k in ("validation", "test")}
        fallback_metrics = {k: (read_manifest(fallback).get("metrics") or {}).get(k) for k in ("validation", "test")}
        # The int8-against-fp32 drop (the profile's max_accuracy_drop) of a cascade: the larger of its two
        # models' (each passed its quantize gate on validation); the accuracies are the cascade's own.
        drops = [m["validation"].get("accuracy_drop_points") for m in (fast_metrics, fallback_metrics)
                 if isinstance(m.get("validation"), dict)]
        drops = [d for d in drops if d is not None]
        metrics.update(
            validation={**(fast_metrics["validation"] or {}),
                        **({"accuracy_drop_points": max(drops)} if drops else {}),
                        **accuracy_report(p_val, np.asarray(val.labels), oos_id, threshold)},
            test=accuracy_report(p_test, np.asarray(test.labels), oos_id, threshold),
            model_bytes=sum((stage / n).stat().st_size for n in ("model.quant.onnx", f"{FALLBACK_DIR}/model.quant.onnx")),
            cascade={"below": below, "sent_on_validation": point["sent_on"], "sent_on_test": round(sent_test, 4),
                     "validation_accuracy_at_below": point["accuracy"], "min_accuracy": cfg.min_accuracy,
                     "grid": rows, "fast": fast_metrics, "fallback": fallback_metrics})
        metrics["eval"] = bundle_files.eval_slice_reference(stage)
        fields = {k: v for k, v in manifest.items() if k not in ("files", "format")}
        fields.update(metrics=metrics, cascade={"fallback": FALLBACK_DIR, "below": below, "fallback_source": str(fallback)},
                      build_seconds=round(float(manifest.get("build_seconds") or 0) + time.time() - started, 2))
        write_manifest(stage, **fields)
    log(f"[cascade] below {below:.2f}: {point['sent_on']:.1%} of validation texts go to the fallback, "
        f"validation {point['accuracy']:.2f}%; test {metrics['test']['accuracy']:.2%} ({sent_test:.1%} sent on)")
    return StageRecord(out, {"stage": "cascade", "config": cfg.to_dict(), "metrics": metrics})

