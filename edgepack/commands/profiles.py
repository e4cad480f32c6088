"""``edgepack profiles``: list the device profiles (``profiles/*.toml``) and their budgets."""

from __future__ import annotations

import argparse


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("profiles", help="list device profiles (profiles/*.toml) and their budgets",
                       description="List the device profiles: target, physical cores, memory, thread defaults "
                                   "and the budgets `edgepack bench --profile NAME` checks.")
    p.add_argument("name", nargs="?", help="show one profile in full")
    return p


def run(args: argparse.Namespace) -> int:
    from edgepack import profiles

    if args.name:
        prof = profiles.load(args.name)
        print(f"{prof.name}: {prof.description}")
        print(f"  target {prof.target}, {prof.physical_cores} physical cores, {prof.memory_mb} MB")
        for key, value in prof.budgets.to_dict().items():
            if value is not None:  # max_teacher_drop: set by a build's --max-drop unless the file sets it
                print(f"  budget {key} = {value:g}")
        for key, value in prof.threads.to_dict().items():
            print(f"  threads {key} = {value}")
        return 0
    rows = [("profile", "target", "cores", "mem MB", "p95 ms", "peak MB", "bundle MB", "max drop", "threads")]
    for p in profiles.all_profiles():
        b = p.budgets
        rows.append((p.name, p.target, str(p.physical_cores), str(p.memory_mb), f"{b.p95_latency_ms:g}",
                     f"{b.peak_memory_mb:g}", f"{b.bundle_size_mb:g}", f"{b.max_accuracy_drop:g}",
                     f"{p.threads.intra_op_num_threads}/{p.threads.spinning}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0
