"""The error of the rule that stops a shape early (``edgepack.training.reach``), on the validation curves
a real build logged: for each training run in BUILD/build.log (the Trainer's per-epoch evaluation
lines), the projection after each epoch against where the curve ended, and, for a target, the epoch
the rule would have stopped it at and the epochs that saves.

    python benchmarks/reach_error.py BUILD/build.log --target 94.10          # the teacher's 95.10 minus 1 point
    python benchmarks/reach_error.py BUILD/build.log --target 94.10 --slack 0 --decay 0.7

A negative margin is the projection above the final figure (the rule was optimistic, as it must be);
a positive one would have stopped a run that got there: the rule's error. Prints a table.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgepack.training.reach import SLACK, project, reach  # noqa: E402

EVAL = re.compile(r"trainer: (\{'eval_loss'.*\})")


def curves(log: Path) -> list[list[float]]:
    """Each training run's validation curve, in points: ``eval_cal_accuracy`` (``eval_accuracy`` without
    an out-of-scope class) per epoch; a run starts where the epoch count goes back to 1."""
    out: list[list[float]] = []
    last_epoch = None
    for line in log.read_text(errors="replace").splitlines():
        m = EVAL.search(line)
        if not m:
            continue
        d = ast.literal_eval(m.group(1))
        value = d.get("eval_cal_accuracy", d.get("eval_accuracy"))
        epoch = d.get("epoch")
        if value is None or epoch is None:
            continue
        if last_epoch is None or epoch <= last_epoch:
            out.append([])
        out[-1].append(100.0 * float(value))
        last_epoch = epoch
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log", type=Path)
    p.add_argument("--target", type=float, required=True, help="validation points a shape needs")
    p.add_argument("--slack", type=float, default=SLACK)
    p.add_argument("--decay", type=float, default=1.0)
    args = p.parse_args(argv)
    rule = {"slack": args.slack, "decay": args.decay}
    print(f"{args.log}: target {args.target:.2f}%, slack {args.slack}, decay {args.decay}")
    print("| run | epochs | final | best | projection margin per epoch (final - projected) | stopped after | epochs saved |")
    print("|---|---:|---:|---:|---|---:|---:|")
    worst = float("-inf")
    for i, c in enumerate(curves(args.log), 1):
        n = len(c)
        margins = [max(c) - project(c[:k], n, **rule) for k in range(1, n)]
        worst = max([worst, *margins])
        stop = next((k for k in range(1, n + 1) if not reach(c[:k], n, args.target, **rule).reachable), None)
        shown = ", ".join("-" if k == 1 else f"{m:+.2f}" for k, m in enumerate(margins, 1))  # one point: no slope
        print(f"| {i} | {n} | {c[-1]:.2f} | {max(c):.2f} | {shown} | {stop or '-'} | {n - stop if stop else 0} |")
    print(f"\nlargest margin (positive: a run stopped that would have got there): {worst:+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
