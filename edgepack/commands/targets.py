"""``edgepack targets [--detect]``: list the instruction-set targets, or name this CPU's."""

from __future__ import annotations

import argparse


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("targets", help="list instruction-set targets (targets/*.toml) or detect this CPU's",
                       description="List the instruction-set targets, or with --detect name the one this CPU "
                                   "matches from its flags (/proc/cpuinfo, or sysctl on macOS).")
    p.add_argument("--detect", action="store_true", help="name this CPU's target and the flags that chose it")
    return p


def run(args: argparse.Namespace) -> int:
    from edgepack import targets

    arch, flags = targets.cpu_flags()
    if args.detect:
        t = targets.detect(arch, flags)
        matched = t.matched_flags(flags)
        print(f"{t.name}: {t.description}")
        print(f"  arch {arch}; flags {', '.join(matched) if matched else '(baseline: none required)'}")
        q = t.quantize
        print(f"  quantize: weights {q.weight_type}, reduce_range {str(q.reduce_range).lower()}, "
              f"per_channel {str(q.per_channel).lower()}, fuse {str(q.fuse).lower()}")
        return 0
    rows = []
    for t in sorted(targets.all_targets(), key=lambda t: (t.arch, t.priority)):
        ident = list(t.requires_flags) + ([" or ".join(t.any_flags)] if t.any_flags else [])
        rows.append(("*" if t.matches(arch, flags) else " ", t.name, t.arch, ", ".join(ident) or "-", t.description))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for mark, name, t_arch, ident, desc in rows:
        print(f"{mark} {name:<{w[1]}}  {t_arch:<{w[2]}}  {ident:<{w[3]}}  {desc}")
    print("(* = this CPU has the flags; `edgepack targets --detect` names the best match)")
    return 0
