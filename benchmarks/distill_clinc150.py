"""Distillation on CLINC150 ('plus') with the shared MiniLM-L6 teacher: the figures of docs/results.md, "Distillation".

    nice -n 5 python benchmarks/distill_clinc150.py --work /tmp/distill-bench            # 2 and 3 layers
    nice -n 5 python benchmarks/distill_clinc150.py --work /tmp/distill-bench --layers 2 --no-ablation
    nice -n 5 python benchmarks/distill_clinc150.py --work /tmp/d-s1 --layers 0,2,5 --no-ablation -- --augment 2 --seed 1
    python benchmarks/threshold_rules.py ../shared/models/clinc150-minilm-l6 /tmp/d-s1/l0-2-5   # every threshold rule

Each run is ``edgepack distill`` with the DistillConfig defaults and only ``--layers`` changed, so the
table is what a user gets without tuning. Every run writes WORK/l<N>/ (the student and its
stage.json); the table printed at the end is docs/results.md's: test accuracy raw and with the
out-of-scope threshold calibrated on validation, for the teacher, each student and its labels-only
ablation (alpha = 1, same student, same schedule), parameters and wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _shared import DATA, TEACHER  # offline settings, this checkout on sys.path, ../shared


def run(layers: str, args) -> dict:
    from edgepack.cli import main

    out = args.work / f"l{layers.replace(',', '-')}"
    argv = ["distill", str(args.teacher), "--data", str(args.data), "--out", str(out), "--layers", layers,
            "--cache-dir", str(args.work / "cache"), "--threads", str(args.threads), "--force"]
    if args.no_ablation:
        argv.append("--no-ablation")
    argv += args.extra
    t0 = time.time()
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"edgepack {' '.join(argv)} exited {rc}")
    rec = json.loads((out / "stage.json").read_text())
    rec["bench_wall_time_s"] = round(time.time() - t0, 1)
    return rec


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def table(records: dict[str, dict]) -> str:
    lines = ["| model | parameters | test acc. (raw) | test acc. (calibrated) | OOS recall (cal.) | train time |",
             "|---|---|---|---|---|---|"]
    first = next(iter(records.values()))
    t = first["teacher"]
    lines.append(f"| teacher (6 layers) | 22.7M | {pct(t['test_accuracy'])} | {pct(t['test_accuracy_calibrated'])} "
                 f"| {pct(t.get('test_oos_recall_calibrated'))} | - |")
    for rec in records.values():
        m, s = rec["metrics"], rec["student"]
        name = f"student, teacher layers {','.join(map(str, s['teacher_layers']))}"
        params = f"{s['parameters'] / 1e6:.1f}M"
        lines.append(f"| {name} | {params} | {pct(m['test_accuracy'])} | {pct(m['test_accuracy_calibrated'])} "
                     f"| {pct(m.get('test_oos_recall_calibrated'))} | {m['train_wall_time_s'] / 60:.1f} min |")
        if "ablation" in rec:
            a = rec["ablation"]
            lines.append(f"| same, labels only (alpha=1) | {params} | {pct(a['test_accuracy'])} "
                         f"| {pct(a['test_accuracy_calibrated'])} | {pct(a.get('test_oos_recall_calibrated'))} "
                         f"| {a['wall_time_s'] / 60:.1f} min |")
    lines.append("")
    for layers, rec in records.items():
        lines.append(f"--layers {layers}: whole run (teacher cache, distillation, ablation, writing) "
                     f"{rec['wall_time_s'] / 60:.1f} min")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--teacher", type=Path, default=TEACHER)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--layers", nargs="+", default=["2", "3"], help="one run per value (a count or indices)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core box, 2 threads ran 4x slower per row than 1)")
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("extra", nargs="*", help="more `edgepack distill` flags, after --")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    records = {}
    for layers in args.layers:
        records[layers] = run(layers, args)
        (args.work / "results.json").write_text(json.dumps(records, indent=2, default=str))
    print(table(records))


if __name__ == "__main__":
    main()
