"""edgepack emulate setup arm64 [--root DIR]: prepare what `edgepack verify --emulate` runs in."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("emulate", help="prepare or show the CPU emulators `edgepack verify --emulate` uses",
                       description="`setup arm64` builds an arm64 Debian root with Python, onnxruntime, tokenizers "
                       "and numpy (debootstrap + qemu-user-static; about 15 minutes, resumable). `status` shows "
                       "which targets can be emulated here.")
    s = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    setup = s.add_parser("setup", help="prepare an emulator (arm64: the Debian root)")
    setup.add_argument("what", choices=("arm64",), help="what to prepare")
    setup.add_argument("--root", type=Path, default=None,
                       help="where (default: $EDGEPACK_ARM64_ROOT or ~/.cache/edgepack/emulate/arm64)")
    setup.add_argument("--mirror", default=None, help="Debian mirror (default: http://deb.debian.org/debian)")
    setup.add_argument("--force", action="store_true", help="rebuild a complete root")
    s.add_parser("status", help="which targets can be emulated here, and how to install what is missing")
    return p


def run(args: argparse.Namespace) -> int:
    from .. import emulate

    if args.action == "status":
        for name in emulate.EMULATED:
            ok, why = emulate.available(name)
            print(f"{name:14} {'yes' if ok else 'no ':3}  {why}")
        for name, why in emulate.NOT_EMULATED.items():
            print(f"{name:14} no   {why}")
        return 0
    from ..emulate.arm64root import DEFAULT_MIRROR, setup_arm64

    setup_arm64(args.root, mirror=args.mirror or DEFAULT_MIRROR, force=args.force)
    return 0
