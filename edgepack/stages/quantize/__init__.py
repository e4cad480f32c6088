"""The quantize stage: the export's fp32 ONNX -> int8 for the target CPU, checked against fp32.

``run(cfg, src, out, ctx)`` reads the export directory (``model.onnx`` and its runtime skeleton),
quantizes with the target's settings (``targets/*.toml``) or, with ``cfg.variants``, builds and times
every variant the target allows (``variants``) and keeps the fastest by ``cfg.objective`` within
the gate; the gate compares validation accuracy with the fp32 model, paired on the same rows with an
interval at ``cfg.confidence`` (``variants.judge``), and refuses a drop over ``cfg.max_accuracy_drop``.
``out`` holds ``model.quant.onnx`` with the same skeleton (so it runs as a pipeline), and
``stage.json`` records the target, the settings, the accuracies and the agreement with fp32.

Helpers: ``formats`` (dynamic, static QDQ, 4-bit MatMulNBits, the optional fusion) and ``variants``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

from edgepack import bundle_files
from edgepack.config import QuantizeConfig
from edgepack.data import stratified_slice
from edgepack.errors import BudgetError, EdgepackError
from edgepack.metrics import agreement, evaluate, label_metrics
from edgepack.modeling import ModelInfo
from edgepack.records import hash_tree, staging_dir, write_json_atomic, write_stage_record
from edgepack.stages import StageRecord
from edgepack.stages.quantize.formats import QUANT_NAME, count_ops, quantize_model
from edgepack.targets import Target, detect, load

SOURCE_FILES = ("tokenizer.json", "config.json", "labels.json")


def resolve_target(name: str) -> Target:
    """A target by name; ``auto``: this CPU's."""
    return detect() if name == "auto" else load(name)


def target_for(cfg: QuantizeConfig) -> Target:
    """The target with ``cfg.embedding_bits`` laid over its own setting (when given)."""
    target = resolve_target(cfg.target)
    if cfg.embedding_bits is not None and cfg.embedding_bits != target.quantize.embedding_bits:
        target = dataclasses.replace(target, quantize=target.quantize.replace(embedding_bits=cfg.embedding_bits))
    return target


def run(cfg: QuantizeConfig, src: Path, out: Path, ctx) -> StageRecord:
    """The stage: ``src`` (an export directory) -> ``out``. Raises ``BudgetError`` (nothing written)
    when the int8 model loses more validation accuracy than ``cfg.max_accuracy_drop``."""
    import runtime_shim

    started = time.time()
    src, out = Path(src), Path(out)
    fp32 = src / "model.onnx"
    if not fp32.is_file():
        raise EdgepackError(f"{src}: no model.onnx; run the export stage first (edgepack pack does both)")
    export = StageRecord.read(src)
    info = ModelInfo(**{**export.metrics["info"], "input_names": tuple(export.metrics["input_names"]),
                        "label_names": tuple(export.metrics["info"]["label_names"])})
    target = target_for(cfg)
    val = ctx.data["validation"]
    log = ctx.log
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=out.parent) as work_s, \
            staging_dir(out, force=True) as tmp:
        work = Path(work_s)
        for name in SOURCE_FILES:
            shutil.copy2(src / name, tmp / name)
        write_json_atomic(tmp / "runtime.json", bundle_files.default_runtime(
            QUANT_NAME, max_length=ctx.max_length, inputs=info.input_names,
            pad_id=bundle_files.pad_id(tmp / "tokenizer.json"), session_config=target.quantize.session_config))
        variants_table = None
        settings = target.quantize.to_dict()
        if cfg.variants:
            from edgepack.stages.quantize import variants

            result = variants.search(
                target, fp32, work / "variants", info=info, pipeline_dir=tmp, val_texts=val.texts,
                val_labels=val.labels,
                calibration_texts=stratified_slice(ctx.data["train"], target.quantize.calibration_rows).texts,
                max_accuracy_drop=cfg.max_accuracy_drop, min_agreement=cfg.min_agreement, formats=cfg.variant_formats,
                confidence=cfg.confidence, objective=cfg.objective, log=log)
            log(result.table())
            quant = variants.chosen_model(result, tmp / QUANT_NAME)
            chosen = result.row(result.chosen)
            _set_session_config(tmp, chosen.get("quantize", {}).get("session_config") or {})
            variants_table = result.record()
            settings = chosen.get("quantize", settings)
        else:
            quant = quantize_model(target.quantize, fp32, tmp / QUANT_NAME, info=info)
        source_bytes = export.metrics.get("source_weight_bytes") or fp32.stat().st_size
        log(f"[quantize] {target.name}: {quant.stat().st_size / 1e6:.2f} MB "
            f"({quant.stat().st_size / source_bytes:.1%} of the source model's fp32 weights, "
            f"{quant.stat().st_size / fp32.stat().st_size:.1%} of the exported fp32 ONNX)")
        pipe_q = runtime_shim.OnnxPipeline(tmp, verify=False)
        pipe_f = runtime_shim.OnnxPipeline(tmp, verify=False, overrides={"model": str(fp32.resolve())})
        p_fp32, p_int8 = evaluate(pipe_f, val), evaluate(pipe_q, val)
        del pipe_q, pipe_f
        from edgepack.stages.quantize.variants import drop_text, judge

        acc_f = label_metrics(p_fp32.argmax(1), val.labels, None)["accuracy"]
        acc_q = label_metrics(p_int8.argmax(1), val.labels, None)["accuracy"]
        agree = agreement(p_fp32.argmax(1), p_int8.argmax(1))
        gate = judge(p_fp32.argmax(1) == val.labels, p_int8.argmax(1) == val.labels, cfg.max_accuracy_drop,
                     confidence=cfg.confidence)
        drop = gate["accuracy_drop"]
        log(f"[quantize] validation accuracy fp32 {acc_f:.2%}, int8 {acc_q:.2%} (drop {drop_text(gate)} points, "
            f"{cfg.confidence:.0%} interval; {gate['verdict_text']}), label agreement {agree:.2%}")
        if not gate["inside"]:
            raise BudgetError(
                f"int8 model loses {drop:.2f} points of validation accuracy ({acc_f:.2%} -> {acc_q:.2%}; "
                f"{cfg.confidence:.0%} interval {gate['drop_low']:+.2f} to {gate['drop_high']:+.2f}), over "
                f"--max-accuracy-drop {cfg.max_accuracy_drop:g}; try a target with reduce_range or per-channel "
                "weights (edgepack targets), or raise the limit")
        if agree < cfg.min_agreement and not cfg.variants:
            raise BudgetError(
                f"int8 model gives another label than fp32 on {1 - agree:.2%} of validation rows (agreement "
                f"{agree:.2%}, under --min-agreement {cfg.min_agreement:g}); try --variants (measures the target's "
                "other settings), a target with per-channel weights, or lower the limit")
        metrics = {
            "fp32_bytes": fp32.stat().st_size,
            "model_bytes": quant.stat().st_size,
            "validation": {"accuracy_fp32": acc_f, "accuracy_int8": acc_q, "accuracy_drop_points": drop,
                           "agreement_fp32_int8": agree,
                           **{k: gate[k] for k in ("drop_low", "drop_high", "verdict", "verdict_text", "confidence")}},
            "ops": count_ops(quant),
            **({"variants": variants_table} if variants_table else {}),
        }
        target_record = {"name": target.name, "arch": target.arch, "requires_flags": list(target.requires_flags),
                         "any_flags": list(target.any_flags), "quantize": target.quantize.to_dict()}
        write_stage_record(tmp, stage="quantize", config={**cfg.to_dict(), "resolved_target": target.name},
                           input_hash=hash_tree(src), metrics=metrics, started=started,
                           extra={"target": target_record, "settings": settings,
                                  "export": {"config": export.record.get("config"), "metrics": export.metrics,
                                             "source_dir": export.record.get("source_dir")}})
    return StageRecord.read(out)


def _set_session_config(stage: Path, entries: dict[str, str]) -> None:
    runtime = json.loads((stage / "runtime.json").read_text())
    runtime["session_config"] = {**runtime.get("session_config", {}), **entries}
    write_json_atomic(stage / "runtime.json", runtime)
