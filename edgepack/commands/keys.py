"""edgepack keys new --out DIR [--name signing] [--force] | edgepack keys id FILE"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("keys", help="create an Ed25519 signing key pair, or print a key's id",
                       description="Signing keys for bundles. The private key is encrypted with the passphrase in "
                       "$EDGEPACK_KEY_PASSPHRASE when it is set (never taken from the command line).")
    keys = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    new = keys.add_parser("new", help="write NAME.key (private, mode 0600) and NAME.pub into DIR; print the key id")
    new.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for the key pair")
    new.add_argument("--name", default="signing", help="file name of the pair, without suffix (default: signing)")
    new.add_argument("--force", action="store_true", help="replace an existing key pair of that name")
    show = keys.add_parser("id", help="print the key id of a .pub or .key file")
    show.add_argument("file", type=Path, metavar="FILE")
    return p


def run(args: argparse.Namespace) -> int:
    from edgepack.signing import PASSPHRASE_ENV, key_id_of, new_keypair

    if args.keys_command == "id":
        print(key_id_of(args.file))
        return 0
    private, public, keyid = new_keypair(args.out, name=args.name, force=args.force)
    encrypted = (f"encrypted with ${PASSPHRASE_ENV}" if os.environ.get(PASSPHRASE_ENV)
                 else f"NOT encrypted: set ${PASSPHRASE_ENV} to encrypt it")
    print(f"wrote {private} (private key, mode 0600, {encrypted}; keep it off devices)")
    print(f"wrote {public} (public key: copy it into each device's trusted keys directory)")
    print(f"key id: {keyid}")
    return 0
