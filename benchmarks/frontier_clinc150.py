"""The accuracy-latency frontier on CLINC150 ('plus'): ``edgepack build`` with a shape search over the
CLINC150 recipe, every shape built (``explore``), the budget against the teacher stated.

    nice python benchmarks/frontier_clinc150.py --work /tmp/clinc-bench --max-drop 0.5
    python benchmarks/frontier_clinc150.py --work /tmp/clinc-bench --shapes "recipe=static; layers=1 heads=1/3 ffn=1/2"

Uses WORK/edgepack-bundle.build as the build directory, so the shape ``benchmarks/clinc150.py`` built
there (the CLINC150 recipe's) is taken, not retrained, and a rerun resumes. Writes the report with the
frontier plot (WORK/edgepack-frontier.build/report.html), copies the plot to ``--plot`` and prints
the table, with the cost model's figure for each shape (its untrained graph's p50 and the error
against the trained bundle). Latency: end to end, single queries, this CPU, interleaved rounds. Skips
politely without ../shared.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _shared import DATA, DOMAINS, TEACHER  # offline settings, this checkout on sys.path, ../shared

SHAPES = ("recipe=static; layers=1 heads=1/3 ffn=1/2; layers=2 heads=1 ffn=1/3 embedding_bits=4; "
          "layers=3 heads=1 ffn=1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--build-dir", type=Path, default=None, help="default: WORK/edgepack-bundle.build")
    ap.add_argument("--max-drop", type=float, default=0.5)
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--explore", type=int, default=10, help="shapes built after the first inside the budget")
    ap.add_argument("--plot", type=Path, default=None, help="also copy the frontier plot here")
    ap.add_argument("--profile", default="host")
    args = ap.parse_args()
    if not (TEACHER.is_dir() and DATA.is_file()):
        print(f"skipped: {TEACHER} or {DATA} missing (../shared beside the checkout)")
        return 0
    from edgepack import recipes
    from edgepack.config import DataConfig
    from edgepack.runner.build import build

    build_dir = args.build_dir or args.work / "edgepack-bundle.build"
    out = args.work / "edgepack-frontier"
    cfg = recipes.resolve({"recipe": "clinc150", "teacher": str(TEACHER), "out": str(out), "profile": args.profile,
                           "build_dir": str(build_dir), "domains": str(DOMAINS),
                           "data": DataConfig(source=str(DATA)).to_dict(),
                           "search": {"max_drop": args.max_drop, "explore": args.explore,
                                      "shapes": [s.strip() for s in args.shapes.split(";") if s.strip()]}})
    summary = build(cfg, force=True)
    if summary["budget_failures"]:
        print(f"[frontier] missed {'; '.join(summary['budget_failures'])}")
    frontier = json.loads((build_dir / "search" / "frontier.json").read_text())
    if frontier.get("latency_model"):
        m = frontier["latency_model"]
        print(f"cost model (untrained graphs timed beside the trained bundles): error median {m['median_abs']:.0%}, "
              f"largest {m['max_abs']:.0%} over {m['shapes']} shapes")
    print(f"\nteacher {frontier['teacher_validation_accuracy']:.2f}% (validation), budget {frontier['max_drop']} "
          f"points, CPU {frontier['cpu']}")
    for c in frontier["candidates"]:
        if c["status"] == "built":
            probe = (f"  untrained {c['probe_p50_ms']:.3f} ms ({c['probe_error']:+.0%})"
                     if c.get("probe_error") is not None else "")
            print(f"{c['name']:<22} {c['validation_accuracy']:6.2f}%  {c['teacher_drop']:+6.2f} pt  "
                  f"p50 {c['p50_ms']:.3f} ms ± {c['noise_ms']:.3f}  {c['bundle_bytes'] / 1e6:5.2f} MB{probe}"
                  + ("  <- chosen" if c["name"] == frontier["chosen"] else ""))
        else:
            print(f"{c['name']:<22} {c['status']}")
    summary = json.loads((build_dir / "summary.json").read_text())
    final = summary["rows"][-1]
    print(f"published {frontier['chosen']}: test accuracy {100 * final['accuracy']:.2f}% calibrated, "
          f"{100 * final['accuracy_raw']:.2f}% raw; end-to-end p50 {final['latency_ms']['p50']:.3f} ms")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / "report_frontier.png", args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
