"""edgepack emulate setup|status|accuracy: the CPU emulators, and a bundle's answers on another CPU's kernels."""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT_HELP = "the arm64 root (default: $EDGEPACK_ARM64_ROOT or ~/.cache/edgepack/emulate/arm64)"


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("emulate", help="a bundle's accuracy on another CPU's int8 kernels (QEMU), and the emulators",
                       description="`accuracy BUNDLE --target TARGET` runs a bundle on another CPU's int8 kernels "
                       "under QEMU. `setup arm64` builds an arm64 Debian root with Python, onnxruntime, tokenizers "
                       "and numpy (debootstrap + qemu-user-static; about 15 minutes, resumable). `status` shows "
                       "which targets can be emulated here.")
    s = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    acc = s.add_parser(
        "accuracy", help="check a bundle's answers on a target CPU's int8 kernels under QEMU emulation",
        description="Run the bundle's shim under QEMU user-mode emulation of TARGET (x86-64-avx2: qemu-x86_64 "
        "-cpu Haswell; arm64, arm64-dotprod, arm64-i8mm: an arm64 root, see `edgepack emulate setup arm64`) and "
        "natively on this CPU, on the bundle's eval.jsonl or --data, and report accuracy, in-scope accuracy, "
        "out-of-scope recall and agreement with this CPU's answers. Latency is not reported: emulated time "
        "says nothing about the device.")
    acc.add_argument("bundle", type=Path, metavar="BUNDLE", help="the bundle directory")
    acc.add_argument("--target", required=True, metavar="TARGET", help="x86-64-avx2, arm64, arm64-dotprod or arm64-i8mm")
    add_accuracy_args(acc)
    setup = s.add_parser("setup", help="prepare an emulator (arm64: the Debian root)")
    setup.add_argument("what", choices=("arm64",), help="what to prepare")
    setup.add_argument("--root", type=Path, default=None,
                       help="where (default: $EDGEPACK_ARM64_ROOT or ~/.cache/edgepack/emulate/arm64)")
    setup.add_argument("--mirror", default=None, help="Debian mirror (default: http://deb.debian.org/debian)")
    setup.add_argument("--force", action="store_true", help="rebuild a complete root")
    s.add_parser("status", help="which targets can be emulated here, and how to install what is missing")
    return p


def add_accuracy_args(p: argparse.ArgumentParser, *, hidden: bool = False) -> None:
    """``accuracy``'s options besides BUNDLE and the target (``hidden``: accepted, not listed in --help)."""

    def h(text: str) -> str:
        return argparse.SUPPRESS if hidden else text

    p.add_argument("--data", type=Path, default=None, metavar="FILE",
                   help=h("labelled rows (.jsonl/.csv/CLINC150 .json; default: the bundle's eval.jsonl)"))
    p.add_argument("--split", default="test", help=h("split of a CLINC150-style --data file (default: test)"))
    p.add_argument("--text-column", default="text", help=h("column holding the text (default: text)"))
    p.add_argument("--label-column", default="label", help=h("column holding the label (default: label)"))
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help=h("only the first N rows of a stratified order (emulation is slow: ~40 ms a row for a "
                          "small model)"))
    p.add_argument("--root", type=Path, default=None, help=h(ROOT_HELP))
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help=h("write the result here (default: BUNDLE.emulate-TARGET.json beside the bundle)"))


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


def run_accuracy(args: argparse.Namespace) -> int:
    """``emulate accuracy`` (and the old ``verify --emulate``): ``args.bundle``, ``args.target`` and
    ``add_accuracy_args``' options."""
    from runtime_shim.datafiles import DataError, read_labelled
    from runtime_shim.manifest import write_json_atomic

    from .. import emulate
    from ..errors import EdgepackError

    if not args.bundle.is_dir():
        raise EdgepackError(f"{args.bundle}: no such bundle directory; pass the directory `edgepack pack` wrote")
    target = emulate.resolve(args.target).target
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
    out = args.json or args.bundle.with_name(f"{args.bundle.name}.emulate-{target}.json")
    result = emulate.check_bundle(args.bundle, target, texts=texts, labels=labels, root=args.root, json_path=out,
                                  log=print)
    result["data"] = str(data)
    write_json_atomic(out, result)
    print(emulate.summary(result))
    print(f"written: {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from .. import emulate

    if args.action == "accuracy":
        return run_accuracy(args)
    if args.action == "status":
        for name in emulate.EMULATED:
            ok, why = emulate.available(name)
            print(f"{name:14} {'yes' if ok else 'no ':3}  {why}")
        for name, why in emulate.NOT_EMULATED.items():
            print(f"{name:14} no   {why}")
        return 0
    from ..emulate.arm64root import DEFAULT_MIRROR, setup_arm64

    setup_arm64(args.root, mirror=args.mirror or DEFAULT_MIRROR, force=args.force, log=print)
    return 0
