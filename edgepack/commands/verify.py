"""edgepack verify BUNDLE --emulate TARGET [--data FILE]: the bundle's answers on another CPU's kernels."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "verify", help="check a bundle's answers on a target CPU's int8 kernels under QEMU emulation",
        description="Run the bundle's shim under QEMU user-mode emulation of TARGET (x86-64-avx2: qemu-x86_64 "
        "-cpu Haswell; arm64, arm64-dotprod, arm64-i8mm: an arm64 root, see `edgepack emulate setup arm64`) and "
        "natively on this CPU, on the bundle's eval.jsonl or --data, and report accuracy, in-scope accuracy, "
        "out-of-scope recall and agreement with this CPU's answers. Latency is not reported: emulated time "
        "says nothing about the device.")
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="the bundle directory")
    p.add_argument("--emulate", required=True, metavar="TARGET",
                   help="x86-64-avx2, arm64, arm64-dotprod or arm64-i8mm")
    p.add_argument("--data", type=Path, default=None, metavar="FILE",
                   help="labelled rows (.jsonl/.csv/CLINC150 .json; default: the bundle's eval.jsonl)")
    p.add_argument("--split", default="test", help="split of a CLINC150-style --data file (default: test)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N rows of a stratified order (emulation is slow: ~40 ms a row for a small model)")
    p.add_argument("--root", type=Path, default=None, help="the arm64 root (default: $EDGEPACK_ARM64_ROOT or "
                   "~/.cache/edgepack/emulate/arm64)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="write the result here (default: BUNDLE.verify-TARGET.json beside the bundle)")
    return p


def _stratified(texts: list[str], labels: list[str], n: int) -> tuple[list[str], list[str]]:
    """``n`` rows with every label in proportion (its k-th row ranks at (k + 0.5) / its count), in
    file order; the same rows every time.

    >>> _stratified(["a1", "a2", "a3", "a4", "b1", "b2"], ["a", "a", "a", "a", "b", "b"], 3)
    (['a1', 'a2', 'b1'], ['a', 'a', 'b'])
    """
    total: dict[str, int] = {}
    for lab in labels:
        total[lab] = total.get(lab, 0) + 1
    seen: dict[str, int] = {}
    keys = []
    for i, lab in enumerate(labels):
        keys.append(((seen.get(lab, 0) + 0.5) / total[lab], lab, i))
        seen[lab] = seen.get(lab, 0) + 1
    picked = sorted(i for _, _, i in sorted(keys)[:n])
    return [texts[i] for i in picked], [labels[i] for i in picked]


def run(args: argparse.Namespace) -> int:
    from runtime_shim.datafiles import DataError, read_labelled

    from .. import emulate
    from ..errors import EdgepackError

    if not args.bundle.is_dir():
        raise EdgepackError(f"{args.bundle}: no such bundle directory; pass the directory `edgepack pack` wrote")
    target = emulate.resolve(args.emulate).target
    data = args.data or args.bundle / "eval.jsonl"
    try:
        texts, labels = read_labelled(data, split=args.split, text_column=args.text_column,
                                      label_column=args.label_column)
    except DataError as e:
        raise EdgepackError(str(e)) from None
    if args.limit is not None:
        if args.limit < 1:
            raise EdgepackError(f"--limit {args.limit}: pass a positive number of rows")
        texts, labels = _stratified(texts, labels, args.limit)
    out = args.json or args.bundle.with_name(f"{args.bundle.name}.verify-{target}.json")
    result = emulate.check_bundle(args.bundle, target, texts=texts, labels=labels, root=args.root, json_path=out)
    result["data"] = str(data)
    from runtime_shim.manifest import write_json_atomic

    write_json_atomic(out, result)
    print(emulate.summary(result))
    print(f"written: {out}")
    return 0
