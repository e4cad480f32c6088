"""Better 1-layer students at the same latency: each training change alone, over seeds.

    nice -n 5 python benchmarks/student_tries.py --work /tmp/tries                       # all, seeds 0 1
    nice -n 5 python benchmarks/student_tries.py --work /tmp/tries --variants base att1 --seeds 0

Every run is ``edgepack distill`` of the CLINC150 recipe's student (the teacher's last layer, 64 tokens,
one teacher-labelled copy per text, ``--oos-relabel 0.5``, no labels-only ablation, torch's threads)
with one change: ``--augment 3`` (more teacher-labelled text), ``--epochs 10`` (a longer schedule) or
``--attention-weight 1`` (MiniLM's self-attention transfer from the teacher's last layer). The student
keeps all its heads and FFN here: these are distill-stage figures in PyTorch fp32, before the build's
prune, recovery and int8 (which the frontier build measures). Runs one at a time: on the 2-core machine
concurrent training jobs slow each other 4x. A finished run (WORK/<variant>-s<seed>/stage.json) is
reused. Prints the table of docs/results.md's "Better 1-layer students" and writes WORK/tries.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _shared import DATA, TEACHER  # offline settings, this checkout on sys.path, ../shared

BASE = ["--layers", "1", "--max-length", "64", "--no-ablation"]
VARIANTS = {
    "base": ([], "the CLINC150 recipe's distillation (5 epochs, `--augment 1`)"),
    "aug3": (["--augment", "3"], "three teacher-labelled copies per text (`--augment 3`)"),
    "ep10": (["--epochs", "10"], "twice the schedule (`--epochs 10`)"),
    "att1": (["--attention-weight", "1"], "MiniLM attention transfer (`--attention-weight 1`)"),
}
METRICS = ("val_accuracy", "val_accuracy_calibrated", "test_accuracy", "test_accuracy_calibrated")


def run(variant: str, seed: int, args) -> dict:
    from edgepack.cli import main

    out = args.work / f"{variant}-s{seed}"
    if (out / "stage.json").is_file():
        print(f"{out.name}: reused", flush=True)
        return json.loads((out / "stage.json").read_text())
    argv = ["distill", str(args.teacher), "--data", str(args.data), "--out", str(out), "--seed", str(seed),
            "--cache-dir", str(args.work / "cache"), "--force", *BASE, *VARIANTS[variant][0]]
    t0 = time.time()
    if main(argv) != 0:
        raise SystemExit(f"edgepack {' '.join(argv)} failed")
    print(f"{out.name}: {time.time() - t0:.0f} s", flush=True)
    return json.loads((out / "stage.json").read_text())


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _teacher(records: dict[str, dict[int, dict]]) -> dict:
    """The teacher's figures, as the first run recorded them (every run measures the same teacher)."""
    return next(iter(next(iter(records.values())).values()))["teacher"]


def table(records: dict[str, dict[int, dict]]) -> str:
    teacher = _teacher(records)
    base_runs = records.get("base", {})
    lines = ["| student (1 layer) | seeds | val raw | val calibrated | test raw | test calibrated | train time |",
             "|---|---|---|---|---|---|---|",
             "| teacher (6 layers) | - | " + " | ".join(pct(teacher[k]) for k in METRICS) + " | - |"]
    for variant, runs in records.items():
        cells = []
        for k in METRICS:
            vals = [r["metrics"][k] for r in runs.values()]
            mean = statistics.mean(vals)
            each = " / ".join(f"{100 * v:.2f}" for v in vals)
            paired = [base_runs[seed]["metrics"][k] for seed in runs if seed in base_runs]
            delta = "" if variant == "base" or len(paired) < len(runs) else \
                f" ({100 * (mean - statistics.mean(paired)):+.2f})"
            cells.append(f"{pct(mean)}{delta} [{each}]")
        minutes = statistics.mean(r["metrics"]["train_wall_time_s"] for r in runs.values()) / 60
        lines.append(f"| {VARIANTS[variant][1]} | {','.join(map(str, runs))} | " + " | ".join(cells)
                     + f" | {minutes:.1f} min |")
    lines.append("")
    lines.append("Each cell: the mean over the seeds (its difference to the base row's mean over the same "
                 "seeds) [each seed].")
    return "\n".join(lines)


def plot(records: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=False)
    teacher = _teacher(records)
    for ax, key, title in zip(axes, ("val_accuracy_calibrated", "test_accuracy_calibrated"),
                              ("validation (the budget's split)", "test"), strict=True):
        for x, runs in enumerate(records.values()):
            vals = [100 * r["metrics"][key] for r in runs.values()]
            ax.bar(x, statistics.mean(vals), color="#9ecae1", width=0.6)
            ax.scatter([x] * len(vals), vals, color="#08519c", zorder=3, s=14)
        ax.axhline(100 * teacher[key], color="#a50f15", lw=1, ls="--", label="teacher")
        lo = min(100 * r["metrics"][key] for runs in records.values() for r in runs.values())
        ax.set_ylim(lo - 1.0, 100 * teacher[key] + 0.5)
        ax.set_xticks(range(len(records)), list(records))
        ax.set_title(f"{title}, calibrated", fontsize=9)
        ax.set_ylabel("accuracy, %")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("1-layer CLINC150 students: bars the seeds' mean, dots each seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--teacher", type=Path, default=TEACHER)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--table-only", action="store_true", help="train nothing: the table of the finished runs")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[int, dict]] = {}
    for seed in args.seeds:  # every variant's seed 0 before any seed 1: a partial run still compares
        for variant in args.variants:
            if args.table_only and not (args.work / f"{variant}-s{seed}" / "stage.json").is_file():
                continue
            records.setdefault(variant, {})[seed] = run(variant, seed, args)
            (args.work / "results.json").write_text(json.dumps(records, indent=2, default=str))
    print(table(records))
    plot(records, args.work / "tries.png")
    print(f"plot: {args.work / 'tries.png'}")


if __name__ == "__main__":
    main()
