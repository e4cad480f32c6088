"""edgepack verify BUNDLE [--keys DIR]: a bundle's integrity, checked as a device checks it.

Accuracy on another CPU's kernels is ``edgepack emulate accuracy``; its old spelling ``verify BUNDLE
--emulate TARGET`` still runs it (``--emulate`` tells the two apart) after a one-line note.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .emulate import add_accuracy_args, run_accuracy


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "verify", help="check a bundle's files against its manifest (and its signature, given trusted keys)",
        description="Check a bundle as a device checks it, with this installation's runtime code, never the copy "
        "inside the bundle: the size and sha256 of every file manifest.json lists; with trusted keys (--keys DIR or "
        "EDGEPACK_TRUSTED_KEYS) also manifest.sig, the bundle's name and version, no unlisted or linked file and no "
        "model with external data. Whether the version is newer than the last one a device accepted is for the "
        "device to judge (`python -m runtime_shim verify` there). Accuracy on another CPU's kernels is "
        "`edgepack emulate accuracy`.")
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="the bundle directory")
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="require a signature by a public key in DIR (default: $EDGEPACK_TRUSTED_KEYS; unset: "
                        "checksums only)")
    # The old spelling of `emulate accuracy`: accepted, not listed.
    p.add_argument("--emulate", default=None, metavar="TARGET", help=argparse.SUPPRESS)
    add_accuracy_args(p, hidden=True)
    return p


NOTE = ("note: `edgepack verify BUNDLE --emulate TARGET` is now `edgepack emulate accuracy BUNDLE --target TARGET` "
        "(verify checks integrity only); running it")
_ACCURACY_ONLY = {"data": None, "split": "test", "text_column": "text", "label_column": "label", "limit": None,
                  "root": None, "json": None}


def run(args: argparse.Namespace) -> int:
    from ..errors import EdgepackError

    if args.emulate is not None:
        print(NOTE, file=sys.stderr)
        args.target = args.emulate
        return run_accuracy(args)
    given = [name for name, default in _ACCURACY_ONLY.items() if getattr(args, name) != default]
    if given:
        flags = " ".join(f"--{n.replace('_', '-')}" for n in given)
        raise EdgepackError(f"{flags}: options of `edgepack emulate accuracy BUNDLE --target TARGET`; "
                            "`edgepack verify BUNDLE` checks integrity only")
    return check(args.bundle, keys=args.keys)


def check(bundle: Path, *, keys: str | None = None) -> int:
    """Verify ``bundle`` with ``runtime_shim.trust`` (this installation's), print one line; ``EdgepackError``
    names the first problem. The device's record of accepted versions is neither read nor written."""
    import tempfile

    from runtime_shim.manifest import MANIFEST, BundleError
    from runtime_shim.trust import trusted_keys_dir, verify_bundle

    from ..errors import EdgepackError

    try:
        trusted = trusted_keys_dir(keys)
        with tempfile.TemporaryDirectory(prefix="edgepack-verify-") as tmp:
            result = verify_bundle(bundle, keys=trusted if trusted is not None else False, allow_downgrade=True,
                                   state=Path(tmp) / "accepted.json", record=False)
    except BundleError as e:
        raise EdgepackError(str(e)) from None
    count = f"ok: {len(result.manifest['files'])} files match {bundle / MANIFEST}"
    if not result.signed:
        print(f"{count}; signature not checked (no trusted keys: pass --keys DIR or set EDGEPACK_TRUSTED_KEYS)")
    else:
        print(f"{count}, signed by key {result.key_id} ({result.key_file}); {result.name} version {result.version}; "
              "no unlisted files")
    return 0
