"""``edgepack distill TEACHER_DIR --data DATA --out STUDENT_DIR``: a smaller student of the teacher."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgepack.commands._common import add_data_args, data_config, existing_dir
from edgepack.errors import EdgepackError

# CLI flag -> DistillConfig field (flags left unset keep the --config file's or the default value).
_FIELDS = {
    "alpha": "alpha", "temperature": "temperature", "epochs": "epochs", "learning_rate": "learning_rate",
    "batch_size": "batch_size", "hidden_weight": "hidden_weight", "attention_weight": "attention_weight",
    "augment": "augment", "oos_relabel": "oos_relabel", "search": "search_trials", "storage": "storage", "study_name": "study_name",
    "qat": "qat", "qat_target": "qat_target",
}


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
    t.add_argument("--alpha", type=float, default=None, help="weight of the gold-label CE, in [0, 1]")
    t.add_argument("-T", "--temperature", type=float, default=None, help="softmax temperature, > 0")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--max-length", type=int, default=None, help="tokens per text (batches pad to their longest)")
    t.add_argument("--hidden-weight", type=float, default=None,
                   help="weight of the [CLS] hidden-state MSE against the mapped teacher layers (0: off)")
    t.add_argument("--attention-weight", type=float, default=None,
                   help="weight of MiniLM's self-attention transfer from the teacher's last layer (0: off; "
                        "teacher-layer students only)")
    t.add_argument("--augment", type=int, default=None,
                   help="teacher-labelled noisy copies of each training text (default: 1; 0: off)")
    t.add_argument("--oos-relabel", type=float, default=None, metavar="W",
                   help="on augmented rows the teacher's threshold calls out of scope, move this share of "
                        "the target to the out-of-scope label, in [0, 1] (default: 0.5; 0: off)")
    t.add_argument("--qat", action="store_true", default=None,
                   help="quantization-aware training: the int8 rounding of --qat-target simulated (see the docs, 'Emulated CPUs')")
    t.add_argument("--qat-target", default=None, metavar="TARGET",
                   help="the target in targets/ whose rounding --qat simulates (default: this CPU's)")
    t.add_argument("--no-ablation", dest="ablation", action="store_false", default=None,
                   help="skip the labels-only (alpha=1) run of the same student")
    t.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    o = p.add_argument_group("search")
    o.add_argument("--search", type=int, default=None, metavar="N",
                   help="run an Optuna study of N trials (over the whole study) before the final run")
    o.add_argument("--search-layers", action="store_true", default=None, help="let the study choose the layer count")
    o.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage URL shared by workers (default: a SQLite file kept with --out)")
    o.add_argument("--study-name", default=None)
    p.add_argument("--config", type=Path, default=None, help="a TOML file with a [distill] table")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where teacher logits are cached (default: $EDGEPACK_CACHE/teacher or ~/.cache/edgepack/teacher)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def resolve_config(args: argparse.Namespace):
    """The DistillConfig from --config, then the flags given; bad values become one-line errors."""
    import tomllib

    from edgepack.config import DistillConfig
    from edgepack.training.student import parse_layers

    base: dict = {}
    if args.config is not None:
        try:
            doc = tomllib.loads(Path(args.config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise EdgepackError(f"--config {args.config}: cannot read as TOML ({e})") from None
        base = dict(doc.get("distill", doc))
    for flag, field in _FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            base[field] = value
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
