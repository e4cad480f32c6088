"""``edgepack distill TEACHER_DIR --data DATA --out STUDENT_DIR``: a smaller student of the teacher."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgepack.commands._common import (
    add_config_options,
    add_data_args,
    config_options,
    data_config,
    existing_dir,
)
from edgepack.config import DistillConfig
from edgepack.errors import EdgepackError


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "distill", help="train a smaller student of a fine-tuned classifier (knowledge distillation)",
        description="Distil TEACHER_DIR (a Hugging Face sequence classifier with id2label) into a student "
                    "that keeps some of its layers (--layers) or starts from another checkpoint (--student). "
                    "Loss: alpha*CE + (1-alpha)*T^2*KL against the teacher's logits, cached on disk.",
    )
    p.add_argument("teacher", type=existing_dir, metavar="TEACHER_DIR", help="the fine-tuned teacher")
    p.add_argument("--out", required=True, type=Path, help="the student directory to write")
    add_data_args(p)
    s = p.add_argument_group("student")
    s.add_argument("--layers", default=None,
                   help="teacher layers to keep: a count (2: spread over the depth, first and last kept) "
                        "or indices (0,2,5)")
    s.add_argument("--student", type=Path, default=None, metavar="DIR",
                   help="start from this checkpoint (with its own tokenizer) instead of teacher layers")
    t = p.add_argument_group("training")
    add_config_options(t, DistillConfig, "alpha", "temperature", "epochs", "learning_rate", "batch_size",
                       "hidden_weight", "attention_weight", "augment", "oos_relabel", "qat", "qat_target")
    t.add_argument("--max-length", type=int, default=None, help="tokens per text (batches pad to their longest)")
    t.add_argument("--no-ablation", dest="ablation", action="store_false", default=None,
                   help="skip the labels-only (alpha=1) run of the same student")
    t.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    o = p.add_argument_group("search")
    add_config_options(o, DistillConfig, "search_trials", "storage", "study_name")
    o.add_argument("--search-layers", action="store_true", default=None, help="let the study choose the layer count")
    p.add_argument("--config", type=Path, default=None, help="a TOML file with a [distill] table")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where teacher logits are cached (default: $EDGEPACK_CACHE/teacher or ~/.cache/edgepack/teacher)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def resolve_config(args: argparse.Namespace):
    """The DistillConfig from --config, then the flags given; bad values become one-line errors."""
    import tomllib

    from edgepack.training.student import parse_layers

    base: dict = {}
    if args.config is not None:
        try:
            doc = tomllib.loads(Path(args.config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise EdgepackError(f"--config {args.config}: cannot read as TOML ({e})") from None
        base = dict(doc.get("distill", doc))
    base.update(config_options(args, DistillConfig))
    if args.ablation is not None:
        base["ablation"] = args.ablation
    if args.search_layers:
        base["search_layers"] = True
    if args.student is not None:
        if args.layers is not None:
            raise EdgepackError("--layers and --student exclude each other; keep teacher layers or give a checkpoint")
        if not args.student.is_dir():
            raise EdgepackError(f"--student {args.student}: no such directory")
        base["student"] = str(args.student)
    if args.layers is not None:
        n, idx = parse_layers(args.layers)
        base["num_layers"], base["layers"] = n, idx
    base["seed"] = args.seed
    try:
        return DistillConfig.from_dict(base, where=str(args.config) if args.config else "")
    except (ValueError, TypeError) as e:
        raise EdgepackError(f"{e}") from None


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.out.exists() and not args.force:
        raise EdgepackError(f"{args.out} exists; pass --force to replace it or choose another --out")

    import torch

    from edgepack import stages
    from edgepack.data import load_dataset
    from edgepack.stages import distill
    from edgepack.training.student import read_id2label

    if args.threads:
        torch.set_num_threads(args.threads)
    id2label = read_id2label(args.teacher)
    dcfg = data_config(args)
    data = load_dataset(dcfg, id2label)
    record = distill.run(cfg, args.teacher, args.out, stages.Context(data=data, data_config=dcfg, cache=args.cache_dir))
    print(summary(record.record))
    print(f"wrote {args.out}")
    return 0


def summary(record: dict) -> str:
    m = record["metrics"]
    lines = [f"{'model':<22} {'test acc':>9} {'calibrated':>11} {'val cal':>8}"]

    def row(name, r):
        cal = r.get("test_accuracy_calibrated")
        vcal = r.get("val_accuracy_calibrated")
        lines.append(f"{name:<22} {100 * r['test_accuracy']:>8.2f}% "
                     f"{'-' if cal is None else f'{100 * cal:.2f}%':>11} {'-' if vcal is None else f'{100 * vcal:.2f}%':>8}")

    if "teacher" in record:
        row("teacher", record["teacher"])
    row("student (distilled)", m)
    if "ablation" in record:
        row("student (labels only)", record["ablation"])
    lines.append(f"wall time {record['wall_time_s']:.0f} s")
    return "\n".join(lines)
