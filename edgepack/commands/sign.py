"""edgepack sign BUNDLE --key KEY [--name NAME] [--version N] [--profile NAME]"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("sign", help="sign a bundle's manifest (manifest.sig) with an Ed25519 key",
                       description="Check a bundle as a device would, set its name and version in manifest.json "
                       "and sign it into manifest.sig (atomically: a killed sign leaves the bundle unsigned and whole). "
                       "An encrypted key is opened with $EDGEPACK_KEY_PASSPHRASE.")
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="the bundle directory")
    p.add_argument("--key", type=Path, required=True, metavar="KEY", help="the private key (.key) from `edgepack keys new`")
    p.add_argument("--name", default=None, help="the bundle's name on devices (default: the manifest's, else BUNDLE's "
                   "directory name)")
    p.add_argument("--version", type=int, default=None, metavar="N",
                   help="a version above the last one devices accepted for the name (default: the UTC time, "
                        "YYYYMMDDHHMMSS)")
    p.add_argument("--profile", default=None, help="the device profile the bundle is for (default: the manifest's)")
    return p


def run(args: argparse.Namespace) -> int:
    from edgepack.signing import describe, sign_bundle

    sig = sign_bundle(args.bundle, args.key, name=args.name, version=args.version, profile=args.profile)
    d = describe(args.bundle)
    print(f"signed {args.bundle}: {d['name']} version {d['version']}"
          f"{' for profile ' + d['profile'] if d['profile'] else ''}, key id {d['key_id']} (wrote {sig})")
    return 0
