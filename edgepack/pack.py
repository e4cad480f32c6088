"""``edgepack pack``: a classifier directory (or an ONNX export of one) -> a verified bundle.

export (fp32 ONNX, parity against PyTorch) -> quantize (the target's int8 settings) -> check
(validation accuracy and agreement against fp32; refuse a drop over the limit) -> calibrate the
out-of-scope threshold on validation -> bundle (written in a temporary directory, moved into place
when complete, manifest last).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import bundle as bundle_files
from .calibrate import apply_threshold, calibrate_threshold
from .config import DataConfig, ExportConfig, PackConfig
from .data import LabelledData, Split, load_dataset, stratified_slice, write_jsonl
from .errors import BudgetError, EdgepackError
from .export import ModelInfo, check_onnx_classifier, export_onnx, read_model_info
from .quantize import QUANT_NAME, count_ops, quantize_model
from .records import hash_tree, staging_dir, versions, write_json_atomic
from .targets import Target, detect, load


def resolve_target(name: str) -> Target:
    return detect() if name == "auto" else load(name)


def evaluate(pipe, split: Split) -> np.ndarray:
    """Softmax probabilities of ``pipe`` on ``split``, in the split's order, batched exactly as the
    benchmark harness batches them (so pack's and bench's accuracies agree)."""
    from runtime_shim.bench import predict_probs

    return predict_probs(pipe, split.texts)


def accuracy_report(probs: np.ndarray, labels: np.ndarray, oos_id: int | None, threshold: float | None) -> dict[str, float]:
    """Accuracy raw and with the threshold; in-scope accuracy and out-of-scope recall when there is
    an out-of-scope class."""
    raw = probs.argmax(axis=1)
    out = {"accuracy_raw": float((raw == labels).mean())}
    if oos_id is None:
        out["accuracy"] = out["accuracy_raw"]
        return out
    pred = apply_threshold(probs, oos_id, threshold)
    is_oos = labels == oos_id
    out.update({
        "accuracy": float((pred == labels).mean()),
        "in_scope_accuracy": float((pred[~is_oos] == labels[~is_oos]).mean()) if (~is_oos).any() else float("nan"),
        "oos_recall": float((pred[is_oos] == oos_id).mean()) if is_oos.any() else float("nan"),
        "oos_recall_raw": float((raw[is_oos] == oos_id).mean()) if is_oos.any() else float("nan"),
    })
    return out


def _source_kind(model_dir: Path) -> str:
    weights = any((model_dir / n).is_file() for n in ("model.safetensors", "pytorch_model.bin"))
    if weights:
        return "torch"
    if (model_dir / "model.onnx").is_file():
        return "onnx"
    raise EdgepackError(f"{model_dir}: no model.safetensors, pytorch_model.bin or model.onnx; pass a classifier directory")


def pack(
    cfg: PackConfig,
    model_dir: Path,
    data_cfg: DataConfig,
    out: Path,
    *,
    export_cfg: ExportConfig | None = None,
    force: bool = False,
    data: LabelledData | None = None,
    log=print,
) -> dict[str, Any]:
    """Build the bundle at ``out`` and return its manifest. ``out`` is replaced only when the new
    bundle is complete (and only with ``force``); nothing is written when a check fails."""
    import runtime_shim
    from runtime_shim.manifest import write_manifest

    started = time.time()
    model_dir, out = Path(model_dir), Path(out)
    export_cfg = export_cfg or ExportConfig()
    if not model_dir.is_dir():
        raise EdgepackError(f"{model_dir}: no such directory; pass a Hugging Face classifier directory")
    if out.exists() and not force:
        raise EdgepackError(f"{out}: already exists; pass --force to replace it (kept until the new bundle is complete)")
    info = read_model_info(model_dir)
    kind = _source_kind(model_dir)
    target = resolve_target(cfg.target)
    if cfg.embedding_bits != target.quantize.embedding_bits:
        target = dataclasses.replace(target, quantize=target.quantize.replace(embedding_bits=cfg.embedding_bits))
    if cfg.embedding_bits == 4:
        export_cfg = export_cfg.replace(embedding="gather")  # 4-bit blocks need a plain Gather on the table
    data = data or load_dataset(data_cfg, dict(enumerate(info.label_names)))
    val, test = data["validation"], data["test"]
    log(f"[pack] {model_dir} -> {out} (target {target.name}; {len(data['train'])}/{len(val)}/{len(test)} rows)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edgepack-pack-", dir=out.parent) as work_s, \
            staging_dir(out, force=force) as stage:
        work = Path(work_s)
        if kind == "torch":
            rec = export_onnx(export_cfg, model_dir, work / "export", val.texts)
            fp32 = work / "export" / "model.onnx"
            tokenizer = work / "export" / "tokenizer.json"
            parity = rec["metrics"]["parity_max_abs_diff"]
            source_bytes = rec["metrics"]["source_weight_bytes"]
            trim = rec["metrics"].get("unreachable_trimmed")
            info = ModelInfo(**{**info.to_dict(), "input_names": tuple(rec["metrics"]["input_names"])})
            if trim:
                log(f"[pack] unreachable rows trimmed (exact): vocabulary {trim['vocab_before']} -> {trim['vocab_after']}, "
                    f"positions {trim['positions_before']} -> {trim['positions_after']}")
            log(f"[pack] exported fp32 ONNX ({rec['metrics']['writer']} writer, {fp32.stat().st_size / 1e6:.1f} MB), "
                f"max |logit diff| vs PyTorch {parity:.1e}")
        else:
            fp32, tokenizer, parity = model_dir / "model.onnx", model_dir / "tokenizer.json", None
            source_bytes = fp32.stat().st_size
            inputs = check_onnx_classifier(fp32, info.num_labels)
            info = ModelInfo(**{**info.to_dict(), "input_names": inputs})
            if not tokenizer.is_file():
                raise EdgepackError(f"{model_dir}: no tokenizer.json beside model.onnx; save the fast tokenizer there")
        _write_static_files(stage, tokenizer, info, data, export_cfg, target, model_dir, cfg)
        variants_table = None
        if cfg.variants:
            from . import variants

            result = variants.search(
                target, fp32, work / "variants", info=info, pipeline_dir=stage, val_texts=val.texts,
                val_labels=val.labels, calibration_texts=stratified_slice(data["train"], target.quantize.calibration_rows).texts,
                max_accuracy_drop=cfg.max_accuracy_drop, formats=cfg.variant_formats, log=log)
            log(result.table())
            quant = variants.chosen_model(result, stage / QUANT_NAME)
            chosen = result.row(result.chosen)
            _set_session_config(stage, chosen.get("quantize", {}).get("session_config") or {})
            variants_table = result.record()
        else:
            quant = quantize_model(target.quantize, fp32, stage / QUANT_NAME, info=info)
        log(f"[pack] quantized for {target.name}: {quant.stat().st_size / 1e6:.2f} MB "
            f"({quant.stat().st_size / source_bytes:.1%} of the source model's fp32 weights, "
            f"{quant.stat().st_size / fp32.stat().st_size:.1%} of the exported fp32 ONNX)")

        pipe_q = runtime_shim.OnnxPipeline(stage, verify=False)
        pipe_f = runtime_shim.OnnxPipeline(stage, verify=False, overrides={"model": str(fp32.resolve())})
        oos_id = data.oos_id
        p_fp32, p_int8 = evaluate(pipe_f, val), evaluate(pipe_q, val)
        acc_f = float((p_fp32.argmax(1) == val.labels).mean())
        acc_q = float((p_int8.argmax(1) == val.labels).mean())
        agreement = float((p_fp32.argmax(1) == p_int8.argmax(1)).mean())
        drop = (acc_f - acc_q) * 100
        log(f"[pack] validation accuracy fp32 {acc_f:.2%}, int8 {acc_q:.2%} (drop {drop:+.2f} points), "
            f"label agreement {agreement:.2%}")
        if drop > cfg.max_accuracy_drop:
            raise BudgetError(
                f"int8 model loses {drop:.2f} points of validation accuracy ({acc_f:.2%} -> {acc_q:.2%}), over "
                f"--max-accuracy-drop {cfg.max_accuracy_drop:g}; try a target with reduce_range or per-channel "
                "weights (edgepack targets), or raise the limit")
        threshold = None
        if oos_id is not None:
            threshold = calibrate_threshold(p_int8, val.labels, oos_id, target_recall=cfg.oos_recall)
            bundle_files.write_labels(stage, list(info.label_names), data.oos_label, threshold)
            log(f"[pack] out-of-scope threshold {threshold:.3f} (calibrated on validation)")
        p_test = evaluate(pipe_q, test)
        test_metrics = accuracy_report(p_test, test.labels, oos_id, threshold)
        log("[pack] test accuracy " + ", ".join(f"{k} {v:.2%}" for k, v in test_metrics.items()))
        metrics = {
            "parity_max_abs_diff": parity,
            "fp32_bytes": fp32.stat().st_size,
            "source_fp32_bytes": source_bytes,
            "model_bytes": quant.stat().st_size,
            "size_vs_source_fp32": round(quant.stat().st_size / source_bytes, 4),
            "validation": {"accuracy_fp32": acc_f, "accuracy_int8": acc_q, "accuracy_drop_points": drop,
                           "agreement_fp32_int8": agreement,
                           **accuracy_report(p_int8, val.labels, oos_id, threshold)},
            "test": test_metrics,
            "test_rows": len(test),
            "ops": count_ops(quant),
            **({"variants": variants_table} if variants_table else {}),
        }
        del pipe_q, pipe_f
        metrics["eval"] = eval_slice_reference(stage)
        if cfg.ort_format:
            from .ortformat import write_ort

            ort_model, _ = write_ort(quant, stage)
            log(f"[pack] ORT format written: {ort_model.name} + required_operators.config")
        manifest = write_manifest(
            stage,
            format=bundle_files.BUNDLE_FORMAT,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            model=QUANT_NAME,
            source={"model_dir": str(model_dir), "model_hash": hash_tree(model_dir), "data": data.source,
                    "data_fingerprint": data.fingerprint()},
            target={"name": target.name, "arch": target.arch, "requires_flags": list(target.requires_flags),
                    "any_flags": list(target.any_flags), "quantize": target.quantize.to_dict()},
            pack=cfg.to_dict(),
            export=export_cfg.to_dict(),
            versions=versions(),
            metrics=metrics,
            build_seconds=round(time.time() - started, 2),
        )
    log(f"[pack] bundle written: {out} ({sum(f['bytes'] for f in manifest['files'].values()) / 1e6:.2f} MB)")
    if cfg.archive:
        log(f"[pack] archive written: {bundle_files.archive(out)}")
    return manifest


def eval_slice_reference(stage: Path) -> dict[str, Any]:
    """The bundle's answers on its own ``eval.jsonl``, computed by the shim's harness exactly as
    ``python -m runtime_shim bench`` computes them on a device: the build-time figure and predictions
    the fleet report compares every device with (accuracy within a tolerance, label agreement)."""
    import runtime_shim
    from runtime_shim.bench import run_benchmark
    from runtime_shim.datafiles import read_labelled

    texts, gold = read_labelled(stage / "eval.jsonl")
    r = run_benchmark(runtime_shim.OnnxPipeline(stage, verify=False), texts, gold, warmup=0, runs=1,
                      batch_sizes=(1,), rss_argv=[], throughput_batches=1)
    return {"rows": len(texts), **{k: r[k] for k in ("accuracy", "accuracy_raw", "in_scope_accuracy", "oos_recall")},
            "predictions": r["predictions"]}


def _write_static_files(stage: Path, tokenizer: Path, info: ModelInfo, data: LabelledData, export_cfg: ExportConfig,
                        target: Target, model_dir: Path, cfg: PackConfig) -> None:
    shutil.copy2(tokenizer, stage / "tokenizer.json")
    pad_id = _pad_id(stage / "tokenizer.json")
    bundle_files.write_labels(stage, list(info.label_names), data.oos_label, None)
    write_json_atomic(stage / "runtime.json", bundle_files.default_runtime(
        QUANT_NAME, max_length=export_cfg.max_length, inputs=info.input_names, pad_id=pad_id,
        session_config=target.quantize.session_config))
    # Optimum's ORTModelForSequenceClassification reads config.json beside the model (the exported
    # one, whose vocabulary and positions match the trimmed embedding tables).
    exported = tokenizer.parent / "config.json"
    config = json.loads((exported if exported.is_file() else model_dir / "config.json").read_text())
    (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_jsonl(stratified_slice(data["test"], cfg.eval_rows), data.label_names, stage / "eval.jsonl")
    (stage / "requirements.txt").write_text(bundle_files.requirements_txt())
    bundle_files.copy_shim(stage)


def _set_session_config(stage: Path, entries: dict[str, str]) -> None:
    runtime = json.loads((stage / "runtime.json").read_text())
    runtime["session_config"] = {**runtime.get("session_config", {}), **entries}
    write_json_atomic(stage / "runtime.json", runtime)


def _pad_id(tokenizer_json: Path) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    for name in ("[PAD]", "<pad>"):
        tid = tok.token_to_id(name)
        if tid is not None:
            return tid
    return 0
