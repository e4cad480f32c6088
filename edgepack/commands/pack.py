"""edgepack pack MODEL_DIR --data DATA --out BUNDLE [--target NAME]"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgepack.commands._common import add_data_args, add_gate_args, data_config


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("pack", help="export, quantize, check and bundle a classifier for a device",
                       description="Export a Hugging Face classifier to ONNX, quantize it with ONNX Runtime for a "
                       "target CPU, check accuracy against fp32, calibrate the out-of-scope threshold and write a "
                       "self-contained bundle.")
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR",
                   help="a Hugging Face classifier directory (or one holding model.onnx, config.json, tokenizer.json)")
    add_data_args(p)
    p.add_argument("--out", type=Path, required=True, metavar="BUNDLE", help="the bundle directory to write")
    p.add_argument("--target", default="auto", help="a target in targets/ (default: detect this CPU's)")
    add_gate_args(p)
    p.add_argument("--oos-recall", type=float, default=None, metavar="R",
                   help="calibrate the out-of-scope threshold to reach this validation recall (default: the largest "
                        "threshold within one standard error of the best validation accuracy)")
    p.add_argument("--embedding-bits", type=int, choices=(8, 4), default=None,
                   help="store the word-embedding table in 8-bit or 4-bit blocks (default: the target's setting, 8 in "
                        "every shipped target)")
    p.add_argument("--writer", choices=("auto", "fused", "torch"), default="auto",
                   help="ONNX export: ORT's fused operators written directly (BERT), torch.onnx.export, or "
                        "auto (fused where supported; default)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per query (default: 64)")
    p.add_argument("--eval-rows", type=int, default=1000, help="rows of the test split shipped as eval.jsonl")
    p.add_argument("--archive", action="store_true", help="also write BUNDLE.tar.gz to copy to a device")
    p.add_argument("--ort-format", action="store_true", help="also write model.ort for minimal ONNX Runtime builds")
    p.add_argument("--variants", action="store_true",
                   help="build and measure the target's quantization variants; keep the fastest within the accuracy limit")
    p.add_argument("--force", action="store_true", help="replace an existing bundle (once the new one is complete)")
    return p


def run(args: argparse.Namespace) -> int:
    from edgepack import api
    from edgepack.errors import EdgepackError

    try:
        data_cfg = data_config(args)
    except ValueError as e:
        raise EdgepackError(str(e)) from None
    api.pack(args.model_dir, data_cfg, args.out, target=args.target, writer=args.writer, force=args.force,
             max_accuracy_drop=args.max_accuracy_drop, min_agreement=args.min_agreement, oos_recall=args.oos_recall,
             eval_rows=args.eval_rows, archive=args.archive, ort_format=args.ort_format, variants=args.variants,
             embedding_bits=args.embedding_bits)
    print(f"try it:  python -m runtime_shim predict {args.out} \"your text here\"")
    return 0
