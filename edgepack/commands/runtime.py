"""``edgepack runtime wheel --out DIR``: the device runtime (``edgepack-runtime``) as a wheel, built from
this machine's installed ``runtime_shim`` (what ``edgepack deploy --setup`` installs on a device)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("runtime", help="build the device runtime (edgepack-runtime) as a wheel",
                       description="The device runtime as its own distribution: runtime_shim with onnxruntime, "
                                   "tokenizers and numpy (cryptography as the 'signed' extra), built from this "
                                   "machine's installed edgepack, byte for byte the same on every run, offline.")
    actions = p.add_subparsers(dest="runtime_command", metavar="ACTION", required=True)
    wheel = actions.add_parser("wheel", help="write edgepack_runtime-VERSION-py3-none-any.whl into DIR")
    wheel.add_argument("--out", type=Path, default=Path("dist"), metavar="DIR", help="where the wheel goes (default: dist)")
    return p


def run(args: argparse.Namespace) -> int:
    import hashlib

    from edgepack.runtime_dist import build_wheel

    path = build_wheel(args.out)
    print(f"wrote {path} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}); on a device: pip install '{path.name}[signed]', "
          "then python -m runtime_shim predict BUNDLE TEXT from any directory")
    return 0
