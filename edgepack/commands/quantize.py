"""edgepack quantize MODEL.onnx --out DIR [--target NAME] [--data DATA]: enter the chain with an ONNX
model exported elsewhere."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgepack.commands._common import add_data_args, add_gate_args, data_config


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("quantize", help="quantize an exported ONNX classifier for a target CPU",
                       description="The quantize stage on its own: an fp32 ONNX model in, model.quant.onnx (with the "
                       "target's int8 settings) and its stage.json out. With --data, and config.json + tokenizer.json "
                       "beside the model, the accuracy gate against fp32 runs on validation too and the output runs "
                       "as a pipeline (python -m runtime_shim predict DIR ...); edgepack pack then makes the bundle.")
    p.add_argument("model", type=Path, metavar="MODEL.onnx", help="an fp32 ONNX model (or a directory holding model.onnx)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the directory to write")
    p.add_argument("--target", default="auto", help="a target in targets/ (default: detect this CPU's)")
    add_gate_args(p, when="with --data: ")
    p.add_argument("--variants", action="store_true", help="with --data: measure the target's variants, keep the fastest")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    add_data_args(p, required=False)
    return p


def run(args: argparse.Namespace) -> int:
    import shutil
    import tempfile
    import time

    from edgepack import stages
    from edgepack.config import QuantizeConfig
    from edgepack.errors import EdgepackError
    from edgepack.modeling import ModelInfo, read_model_info
    from edgepack.records import hash_tree, staging_dir, write_stage_record
    from edgepack.stages import export, quantize
    from edgepack.stages.quantize.formats import QUANT_NAME, count_ops, quantize_model

    model = args.model / "model.onnx" if args.model.is_dir() else args.model
    if not model.is_file():
        raise EdgepackError(f"{args.model}: no such ONNX model; pass MODEL.onnx or a directory holding model.onnx")
    if args.out.exists() and not args.force:
        raise EdgepackError(f"{args.out}: already exists; pass --force to replace it")
    try:
        cfg = QuantizeConfig(target=args.target, max_accuracy_drop=args.max_accuracy_drop, min_agreement=args.min_agreement, variants=args.variants)
    except ValueError as e:
        raise EdgepackError(str(e)) from None
    target = quantize.target_for(cfg)
    if args.data is not None:
        from edgepack.data import load_dataset

        info = read_model_info(model.parent)
        dcfg = data_config(args)
        ctx = stages.Context(data=load_dataset(dcfg, dict(enumerate(info.label_names))), data_config=dcfg)
        with tempfile.TemporaryDirectory(prefix=".edgepack-quantize-", dir=args.out.parent if args.out.parent.exists()
                                         else None) as work:
            src = Path(work) / "given"
            src.mkdir()
            for name in ("config.json", "tokenizer.json"):
                if not (model.parent / name).is_file():
                    raise EdgepackError(f"{model.parent}: no {name} beside the model; --data needs it to read the rows")
                shutil.copy2(model.parent / name, src / name)
            shutil.copy2(model, src / "model.onnx")
            exported = export.run(export.ExportConfig(), src, Path(work) / "export", ctx)
            rec = quantize.run(cfg.replace(target=target.name), exported.out, args.out, ctx)
        v = rec.metrics["validation"]
        print(f"quantize: {args.out / QUANT_NAME} ({target.name}): {rec.metrics['model_bytes'] / 1e6:.2f} MB, "
              f"validation accuracy fp32 {v['accuracy_fp32']:.2%}, int8 {v['accuracy_int8']:.2%} "
              f"({v['accuracy_drop_points']:+.2f} points, {v['confidence']:.0%} interval {v['drop_low']:+.2f} to "
              f"{v['drop_high']:+.2f}: {v['verdict_text']}), agreement {v['agreement_fp32_int8']:.2%}")
        return 0
    started = time.time()
    cfg_path = model.parent / "config.json"
    info = read_model_info(model.parent) if cfg_path.is_file() else ModelInfo("bert", 0, (), 0, 0, 0, ())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(args.out, force=True) as tmp:
        quant = quantize_model(target.quantize, model, tmp / QUANT_NAME, info=info)
        metrics = {"fp32_bytes": model.stat().st_size, "model_bytes": quant.stat().st_size, "ops": count_ops(quant)}
        write_stage_record(tmp, stage="quantize", config={**cfg.to_dict(), "resolved_target": target.name},
                           input_hash=hash_tree(model), metrics=metrics, started=started,
                           extra={"target": {"name": target.name, "quantize": target.quantize.to_dict()}})
    print(f"quantize: {args.out / QUANT_NAME} ({target.name}): {metrics['fp32_bytes'] / 1e6:.2f} MB -> "
          f"{metrics['model_bytes'] / 1e6:.2f} MB (no accuracy check: pass --data for one)")
    return 0
