"""Build-side signing: Ed25519 key pairs (``edgepack keys new``) and signed bundles (``edgepack sign``,
``[sign] key = ...`` in a recipe).

Signing a bundle (``sign_bundle``):

1. checks it as a device would before it is blessed: every checksum matches, no symlink, no unlisted
   file, no ONNX model with external data;
2. sets the manifest's ``name`` (default: the one it has, else the bundle directory's name), ``version``
   (default: the UTC time as an integer, ``20261201071800``, and always above the version it had) and
   ``profile``; ``target`` is already there from ``pack``;
3. writes ``manifest.sig`` (format: ``runtime_shim/trust.py``) over the exact bytes of ``manifest.json``
   and checks it with the public half of the key.

Only ``manifest.json`` and ``manifest.sig`` change, each replaced atomically, the old signature removed
first and the new one written last: a kill at any point leaves every file as it was, the checksums
holding, the bundle unsigned and ready to sign again (the temporary files of a killed run are removed
by the next). A device checks signatures with ``cryptography`` (``edgepack-runtime[signed]``); the
bundle's ``requirements.txt`` lists what its own copy of the shim needs to serve.

Key files: the private key is PKCS#8 PEM, mode 0600, encrypted with ``$EDGEPACK_KEY_PASSPHRASE``
when that is set (never read from the command line: arguments show in ``ps`` and shell history); the
public key is ``SubjectPublicKeyInfo`` PEM (``-----BEGIN PUBLIC KEY-----``), the file a device's
trusted keys directory holds.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgepack.config import SignConfig  # noqa: F401  (the [sign] table; re-exported)
from edgepack.errors import EdgepackError
from runtime_shim import manifest as _manifest
from runtime_shim import trust
from runtime_shim.manifest import MANIFEST, SIGNATURE, BundleError

PASSPHRASE_ENV = "EDGEPACK_KEY_PASSPHRASE"
PRIVATE_SUFFIX = ".key"


# ------------------------------------------------------------------------------------------- keys


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def _write_bytes(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with ``mode`` from the start: a private key is never briefly readable by others."""
    with _manifest.atomic_file(path, "wb", perms=mode) as f:
        f.write(data)


def new_keypair(out_dir: str | os.PathLike, *, name: str = "signing", force: bool = False) -> tuple[Path, Path, str]:
    """Write ``OUT/NAME.key`` (private, 0600, encrypted when ``$EDGEPACK_KEY_PASSPHRASE`` is set) and
    ``OUT/NAME.pub``; return both paths and the key id.

    Examples:
        >>> new_keypair("keys")  # doctest: +SKIP
        (PosixPath('keys/signing.key'), PosixPath('keys/signing.pub'), '3c1f0a9d5e2b7c44')
    """
    out = Path(out_dir)
    if not trust.NAME_RE.fullmatch(name):
        raise EdgepackError(f"--name {name!r}: use letters, digits and . _ + - for the key's file name")
    private, public = out / f"{name}{PRIVATE_SUFFIX}", out / f"{name}{trust.PUBLIC_SUFFIX}"
    existing = [str(p) for p in (private, public) if p.exists()]
    if existing and not force:
        raise EdgepackError(f"{existing[0]}: already exists; pass --force to replace the key pair (bundles signed with "
                            "the old key then verify only on devices that keep its .pub), or choose another --out/--name")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ed25519.Ed25519PrivateKey.generate()
    phrase = _passphrase()
    encryption = (serialization.BestAvailableEncryption(phrase) if phrase else serialization.NoEncryption())
    _write_bytes(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption),
                 0o600)
    pub = key.public_key()
    _write_bytes(public, pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
    return private, public, trust.key_id(trust.raw_public_key(pub))


def load_private_key(path: str | os.PathLike) -> ed25519.Ed25519PrivateKey:
    """The Ed25519 private key of ``path`` (decrypted with ``$EDGEPACK_KEY_PASSPHRASE`` when encrypted).

    Examples:
        >>> load_private_key("keys/signing.key")  # doctest: +SKIP
        <cryptography.hazmat.bindings._rust.openssl.ed25519.Ed25519PrivateKey object at ...>
    """
    path = Path(path)
    if not path.is_file():
        raise EdgepackError(f"{path}: no such key file; create a key pair with `edgepack keys new --out DIR`")
    data = path.read_bytes()
    if b"PUBLIC KEY" in data[:64]:
        raise EdgepackError(f"{path}: a public key; signing needs the private key file ({PRIVATE_SUFFIX}) beside it")
    try:
        key = serialization.load_pem_private_key(data, password=_passphrase())
    except TypeError:
        phrase = _passphrase()
        if phrase is None:
            raise EdgepackError(f"{path}: encrypted; export {PASSPHRASE_ENV} with its passphrase") from None
        raise EdgepackError(f"{path}: not encrypted, but {PASSPHRASE_ENV} is set; unset it") from None
    except ValueError as e:
        wrong = "password" in str(e).lower() or "decrypt" in str(e).lower()
        raise EdgepackError(f"{path}: {'wrong passphrase in ' + PASSPHRASE_ENV if wrong else 'not a PEM private key'}; "
                            "pass the .key file `edgepack keys new` wrote") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise EdgepackError(f"{path}: not an Ed25519 key; create one with `edgepack keys new`")
    return key


def key_id_of(path: str | os.PathLike) -> str:
    """The key id of a public (``.pub``) or private key file.

    Examples:
        >>> key_id_of("keys/signing.pub")  # doctest: +SKIP
        '3c1f0a9d5e2b7c44'
    """
    path = Path(path)
    if path.is_file() and b"PUBLIC KEY" in path.read_bytes()[:64]:
        try:
            return trust.key_id(trust.raw_public_key(trust.load_public_key(path)))
        except BundleError as e:
            raise EdgepackError(str(e)) from None
    return trust.key_id(trust.raw_public_key(load_private_key(path).public_key()))


# ---------------------------------------------------------------------------------------- signing


def default_version(previous: Any = None, now: float | None = None) -> int:
    """The UTC time as ``YYYYMMDDHHMMSS``, or one above ``previous`` when that is not lower: versions
    only increase for a name, even when two signatures fall in the same second.

    Examples:
        >>> default_version(now=0)
        19700101000000
        >>> default_version(previous=20990101000000, now=0)
        20990101000001
    """
    stamp = int(time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() if now is None else now)))
    if isinstance(previous, int) and not isinstance(previous, bool) and previous >= stamp:
        return previous + 1
    return stamp


def default_name(bundle_dir: Path, manifest: dict[str, Any]) -> str:
    """The manifest's ``name`` if it has a valid one, else the bundle directory's name made valid."""
    name = manifest.get("name")
    if isinstance(name, str) and trust.NAME_RE.fullmatch(name):
        return name
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "-", Path(bundle_dir).resolve().name).strip("-._+")[:128]
    return cleaned or "bundle"


def write_signature(bundle_dir: str | os.PathLike, key: ed25519.Ed25519PrivateKey) -> Path:
    """Sign the exact bytes ``manifest.json`` holds now; write ``manifest.sig`` atomically; return it.

    Examples:
        >>> write_signature("bundle", load_private_key("keys/signing.key"))  # doctest: +SKIP
        PosixPath('bundle/manifest.sig')
    """
    root = Path(bundle_dir)
    data = (root / MANIFEST).read_bytes()
    signature = key.sign(trust.pae(trust.PAYLOAD_TYPE, data))
    keyid = trust.key_id(trust.raw_public_key(key.public_key()))
    path = root / SIGNATURE
    _manifest.write_json_atomic(path, trust.make_envelope(data, keyid, signature))
    return path


def _manifest_profile(manifest: dict[str, Any]) -> str | None:
    """The profile a manifest names: its own ``profile``, else the one ``build``'s verify stage recorded."""
    verified = manifest.get("verified")
    return manifest.get("profile") or (verified.get("profile") if isinstance(verified, dict) else None)


def sign_bundle(bundle_dir: Path, key_path: Path, *, name: str | None = None, version: int | None = None,
                profile: str | None = None) -> Path:
    """Check, name, version and sign a bundle in place; return the ``manifest.sig`` written.

    ``name`` defaults to the manifest's, else the directory's name (so sign the published bundle, or
    pass the name); ``version`` to ``default_version``; ``profile`` to the manifest's ``profile``, else
    the ``verified.profile`` that ``edgepack build`` records (``None`` if neither).

    Examples:
        >>> sign_bundle(Path("bundle"), Path("keys/signing.key"), profile="pi5")  # doctest: +SKIP
        PosixPath('bundle/manifest.sig')
    """
    root = Path(bundle_dir)
    key = load_private_key(key_path)  # a wrong passphrase stops here, before anything is written
    for leftover in root.glob(".manifest.*"):  # atomic_file's temporaries, from a sign killed mid-way
        if leftover.name.startswith((f".{MANIFEST}.", f".{SIGNATURE}.")) and leftover.is_file():
            leftover.unlink()
    try:
        manifest = _manifest.verify(root)
        trust.check_tree(root, manifest["files"])
        trust.check_onnx_files(root, manifest["files"])
    except BundleError as e:
        raise EdgepackError(f"not signing: {e}") from None
    if name is not None and not trust.NAME_RE.fullmatch(name):
        raise EdgepackError(f"--name {name!r}: use letters, digits and . _ + - (up to 128, starting with a letter or digit)")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
        raise EdgepackError(f"--version {version!r}: use a non-negative integer (default: the UTC time, YYYYMMDDHHMMSS)")
    fields = {"name": name or default_name(root, manifest),
              "version": default_version(manifest.get("version")) if version is None else version,
              "profile": profile if profile is not None else _manifest_profile(manifest)}
    # A crash from here on leaves an unsigned bundle whose checksums hold, never a stale signature.
    (root / SIGNATURE).unlink(missing_ok=True)
    _manifest.update_manifest(root, **fields)
    sig = write_signature(root, key)
    public = key.public_key()
    trust.check_signature(root, (root / MANIFEST).read_bytes(), {trust.key_id(trust.raw_public_key(public)):
                                                                 [(Path(key_path), public)]})
    return sig


def describe(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Name, version, profile and key id of a signed bundle (for messages and the fleet).

    Examples:
        >>> describe("bundle")  # doctest: +SKIP
        {'name': 'clinc150', 'version': 20261201071800, 'profile': 'pi5', 'key_id': '3c1f0a9d5e2b7c44'}
    """
    root = Path(bundle_dir)
    manifest = json.loads((root / MANIFEST).read_text())
    env = trust.read_envelope(root)
    return {"name": manifest.get("name"), "version": manifest.get("version"), "profile": manifest.get("profile"),
            "key_id": env["signatures"][0]["keyid"]}
