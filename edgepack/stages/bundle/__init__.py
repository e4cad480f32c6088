"""The bundle stage: the quantized model -> the self-contained directory a device runs.

``run(cfg, src, out, ctx)`` reads the quantize directory, calibrates the out-of-scope threshold on
validation (the int8 model's own probabilities), measures test accuracy, writes the held-out
``eval.jsonl`` slice, ``requirements.txt``, ``config.json`` (Optimum can load the model too) and a
copy of ``runtime_shim/``, and writes ``manifest.json`` last: the sha256 of every file and where the
bundle came from. The model is the quantized one with the answer output appended (``answer``: a single
query's top probability and label computed by ONNX Runtime; checked against the logits on validation).
Helpers: ``answer``, ``ortformat`` (the optional ``model.ort`` for minimal ORT builds).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from edgepack import bundle_files
from edgepack.bundle_files import QUANT_NAME
from edgepack.config import BundleConfig
from edgepack.data import stratified_slice, write_jsonl
from edgepack.metrics import accuracy_report, calibrate_threshold, evaluate
from edgepack.records import hash_tree, staging_dir, versions, write_json_atomic
from edgepack.stages import StageRecord
from edgepack.stages.bundle.answer import ANSWER, add_answer, check_answer

ANSWER_CHECK_ROWS = 1000  # validation rows on which the answer output must equal the logits' (a structural check)


def run(cfg: BundleConfig, src: Path, out: Path, ctx, *, manifest_extra: dict | None = None) -> StageRecord:
    """The stage: ``src`` (a quantize directory) -> the bundle at ``out`` (replaced atomically).
    ``manifest_extra`` adds top-level manifest fields (the pack command records its flat config)."""
    import runtime_shim
    from runtime_shim.manifest import write_manifest

    started = time.time()
    src, out = Path(src), Path(out)
    quant = StageRecord.read(src)
    export = quant.record["export"]
    source_dir = Path(export["source_dir"])
    data, log = ctx.data, ctx.log
    val, test = data["validation"], data["test"]
    info_names = list(export["metrics"]["info"]["label_names"])
    with staging_dir(out, force=True) as stage:
        shutil.copy2(src / "tokenizer.json", stage / "tokenizer.json")
        bundle_files.write_labels(stage, info_names, data.oos_label, None)
        shutil.copy2(src / "runtime.json", stage / "runtime.json")
        # Optimum's ORTModelForSequenceClassification reads config.json beside the model (the exported
        # one, whose vocabulary and positions match the trimmed embedding tables).
        config = json.loads((src / "config.json").read_text())
        (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_jsonl(stratified_slice(data["test"], cfg.eval_rows), data.label_names, stage / "eval.jsonl")
        (stage / "requirements.txt").write_text(bundle_files.requirements_txt())
        bundle_files.copy_shim(stage)
        add_answer(src / QUANT_NAME, stage / QUANT_NAME)
        runtime = json.loads((stage / "runtime.json").read_text())
        write_json_atomic(stage / "runtime.json", {**runtime, "answer": ANSWER})

        pipe_q = runtime_shim.OnnxPipeline(stage, verify=False)
        p_int8 = evaluate(pipe_q, val)
        texts = list(val.texts)[:ANSWER_CHECK_ROWS]
        answer_check = check_answer(stage / QUANT_NAME, (pipe_q.encode(texts[i:i + 32]) for i in range(0, len(texts), 32)))
        oos_id = data.oos_id
        threshold = None
        if oos_id is not None:
            threshold = calibrate_threshold(p_int8, val.labels, oos_id, target_recall=cfg.oos_recall)
            bundle_files.write_labels(stage, info_names, data.oos_label, threshold)
            log(f"[bundle] out-of-scope threshold {threshold:.3f} (calibrated on validation)")
        p_test = evaluate(pipe_q, test)
        del pipe_q
        test_metrics = accuracy_report(p_test, test.labels, oos_id, threshold)
        log("[bundle] test accuracy " + ", ".join(f"{k} {v:.2%}" for k, v in test_metrics.items() if v is not None))
        model_bytes = (stage / QUANT_NAME).stat().st_size
        source_bytes = export["metrics"].get("source_weight_bytes") or quant.metrics["fp32_bytes"]
        trim = export["metrics"].get("unreachable_trimmed")
        metrics = {
            "parity_max_abs_diff": export["metrics"].get("parity_max_abs_diff"),
            "fp32_bytes": quant.metrics["fp32_bytes"],
            "source_fp32_bytes": source_bytes,
            "model_bytes": model_bytes,
            "size_vs_source_fp32": round(model_bytes / source_bytes, 4),
            "validation": {**quant.metrics["validation"], **accuracy_report(p_int8, val.labels, oos_id, threshold)},
            "test": test_metrics,
            "test_rows": len(test),
            "ops": quant.metrics["ops"],
            "answer_check": answer_check,
            **({"variants": quant.metrics["variants"]} if quant.metrics.get("variants") else {}),
            **({"unreachable_trimmed": trim} if trim else {}),
        }
        metrics["eval"] = bundle_files.eval_slice_reference(stage)
        if cfg.ort_format:
            from edgepack.stages.bundle.ortformat import write_ort

            write_ort(stage / QUANT_NAME, stage)
            log("[bundle] ORT format written: model.ort + required_operators.config")
        seconds = sum(float(r.get("wall_time_s") or 0) for r in (quant.record, export)) + (time.time() - started)
        manifest = write_manifest(
            stage,
            format=bundle_files.BUNDLE_FORMAT,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            model=QUANT_NAME,
            source={"model_dir": str(source_dir), "model_hash": hash_tree(source_dir), "data": data.source,
                    "data_fingerprint": data.fingerprint()},
            target=quant.record["target"],
            pack={**{k: v for k, v in quant.record["config"].items() if k != "resolved_target"}, **cfg.to_dict()},
            export=export.get("config") or {},
            versions=versions(),
            metrics=metrics,
            build_seconds=round(seconds, 2),
            **(manifest_extra or {}),
        )
    log(f"[bundle] written: {out} ({sum(f['bytes'] for f in manifest['files'].values()) / 1e6:.2f} MB)")
    return StageRecord(out, {"stage": "bundle", "config": cfg.to_dict(), "metrics": metrics, "manifest": manifest})
