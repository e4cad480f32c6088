"""Trust on the device: a bundle is accepted only when a key provisioned on the device signed its
manifest, the manifest lists every file there is, and its version is not older than the last one
accepted under its name.

Checksums (``manifest.py``) catch corruption; anyone who can write the bundle can also rewrite the
manifest. Signatures move the trust to keys kept outside the bundle:

- **Trusted keys**: a directory of Ed25519 public keys, one PEM file (``SubjectPublicKeyInfo``,
  ``-----BEGIN PUBLIC KEY-----``) per key, named ``*.pub`` (what ``edgepack keys new`` writes). It is
  named by ``EDGEPACK_TRUSTED_KEYS``, ``OnnxPipeline(..., trusted_keys=DIR)`` or ``--keys DIR``.
- **Key id**: the first 16 hex digits of the sha256 of the raw 32-byte public key (64 bits: a name to
  find the key by, not what makes the signature hold; every key with that id is tried).
- **manifest.sig**: a JSON envelope modelled on DSSE; the signature is over DSSE's pre-authentication
  encoding of the exact bytes of ``manifest.json`` (``pae``)::

      {"format": "edgepack-signature/1",
       "payloadType": "application/vnd.edgepack.manifest+json",
       "payload": "manifest.json",
       "payloadSha256": "<hex sha256 of manifest.json>",
       "signatures": [{"keyid": "<16 hex>", "alg": "ed25519", "sig": "<base64 of 64 bytes>"}]}

  Unlike DSSE the payload is not embedded: it is the file beside the envelope.
- **State**: the highest version accepted per bundle name, in ``EDGEPACK_STATE`` (a file path) or
  ``$XDG_STATE_HOME/edgepack/accepted.json`` (default ``~/.local/state/edgepack/accepted.json``).
- **An installed runtime's anchors**: ``edgepack deploy --setup`` installs the runtime into a virtual
  environment and writes ``<sys.prefix>/edgepack-runtime.json`` (``runtime_anchors``), naming the
  device's keys directory and state file outside every bundle; the runtime there uses them when
  neither the caller nor the environment names others.

``cryptography`` is imported only when a signature is checked, so a device serving unsigned bundles
needs onnxruntime, tokenizers and numpy only. Standard library otherwise.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from . import manifest as _manifest
from .manifest import MANIFEST, SIGNATURE, BundleError
from .onnxcheck import check_onnx_files, onnx_external_tensors  # noqa: F401  (re-exported)

SIG_FORMAT = "edgepack-signature/1"
PAYLOAD_TYPE = "application/vnd.edgepack.manifest+json"
ALGORITHM = "ed25519"
KEYS_ENV = "EDGEPACK_TRUSTED_KEYS"
STATE_ENV = "EDGEPACK_STATE"
STATE_FORMAT = "edgepack-accepted/1"
PUBLIC_SUFFIX = ".pub"
KEY_ID_HEX = 16
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_MAX_SIG_BYTES = 64 * 1024  # a real envelope is ~300 bytes; never read a huge file into memory
_SHIM_DIR = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------ primitives


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is signed, so that a signature over one payload type
    can never be replayed as another.

    Examples:
        >>> pae("t", b"ab")
        b'DSSEv1 1 t 2 ab'
    """
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def key_id(raw_public_key: bytes) -> str:
    """The id of an Ed25519 public key: the first 16 hex digits of sha256 over its 32 raw bytes.

    Examples:
        >>> key_id(bytes(32))
        '66687aadf862bd77'
    """
    import hashlib  # with trusted keys only: OpenSSL's pages stay unloaded otherwise (manifest._sha256)

    return hashlib.sha256(raw_public_key).hexdigest()[:KEY_ID_HEX]


def _crypto():
    """``cryptography``'s Ed25519 and serialization modules, imported on first need."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BundleError("checking a signed bundle needs the `cryptography` package, which is not installed; "
                          "pip install 'cryptography>=42' (the installed runtime's extra: edgepack-runtime[signed])") from None
    return ed25519, serialization, InvalidSignature


def raw_public_key(public_key) -> bytes:
    """The 32 raw bytes of an ``Ed25519PublicKey``.

    Examples:
        >>> len(raw_public_key(load_public_key("keys/signing.pub")))  # doctest: +SKIP
        32
    """
    _, serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(path: str | os.PathLike):
    """An ``Ed25519PublicKey`` from a PEM file; ``BundleError`` naming the file otherwise.

    Examples:
        >>> load_public_key("keys/signing.pub")  # doctest: +SKIP
        <cryptography.hazmat.bindings._rust.openssl.ed25519.Ed25519PublicKey object at ...>
    """
    ed25519, serialization, _ = _crypto()
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes()[:_MAX_SIG_BYTES])
    except (OSError, ValueError, TypeError) as e:
        raise BundleError(f"{path}: not a PEM public key ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); "
                          "copy the .pub file `edgepack keys new` wrote, or remove this file") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BundleError(f"{path}: not an Ed25519 public key; create one with `edgepack keys new`")
    return key


RUNTIME_FILE = "edgepack-runtime.json"
RUNTIME_FORMAT = "edgepack-runtime/1"


def runtime_anchors() -> dict[str, Any]:
    """The trust anchors of the installed runtime running now: ``<sys.prefix>/edgepack-runtime.json``
    (``{"keys": DIR or null, "state": FILE, ...}``, written by ``edgepack deploy --setup``, owned by
    the deploying account); ``{}`` where there is none (a development install, a bundle's own shim).

    Example:
        >>> runtime_anchors().get("keys")  # doctest: +SKIP
        '/opt/edgepack-runtime/keys'
    """
    path = Path(sys.prefix) / RUNTIME_FILE
    try:
        raw = path.read_bytes()[:_MAX_SIG_BYTES]
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise BundleError(f"{path}: cannot read the runtime's trust anchors ({e.strerror}); re-run "
                          "`edgepack deploy --setup` for this device") from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or data.get("format") != RUNTIME_FORMAT:
        raise BundleError(f"{path}: not an {RUNTIME_FORMAT} file; re-run `edgepack deploy --setup` for this device")
    return data


def trusted_keys_dir(explicit: str | os.PathLike | bool | None = None) -> Path | None:
    """The trusted keys directory: ``explicit``, else ``$EDGEPACK_TRUSTED_KEYS``, else the installed
    runtime's (``runtime_anchors``), else ``None`` (signatures are not checked). ``False`` means none
    whatever the environment says (the build machine's own checks of the unsigned bundles it is making).

    Examples:
        >>> trusted_keys_dir("/etc/edgepack/keys")
        PosixPath('/etc/edgepack/keys')
        >>> trusted_keys_dir(False) is None
        True
    """
    if explicit is False:
        return None
    named = explicit if explicit is not None else os.environ.get(KEYS_ENV)
    if named is not None and not str(named):  # set, but to nothing: a typo must not turn the checks off
        raise BundleError(f"{'--keys' if explicit is not None else KEYS_ENV} is empty; name the trusted keys "
                          f"directory, or {'leave it out' if explicit is not None else 'unset it'} to check checksums only")
    value = explicit if explicit is not None else os.environ.get(KEYS_ENV, "")
    if not str(value):
        value = runtime_anchors().get("keys") or ""
    return Path(value) if str(value) else None


def refuse_no_verify_with_keys(explicit: str | os.PathLike | None) -> None:
    """``--no-verify`` skips every check of the bundle: refused where trusted keys are configured
    (``explicit`` or as ``trusted_keys_dir`` finds them), which say that this device checks signatures.

    Examples:
        >>> refuse_no_verify_with_keys("/etc/edgepack/keys")
        Traceback (most recent call last):
        ...
        runtime_shim.readers.BundleError: --no-verify: trusted keys are configured (/etc/edgepack/keys), so this device checks every bundle it runs; drop --no-verify (or the keys)
    """
    keys = trusted_keys_dir(explicit)
    if keys is not None:
        raise BundleError(f"--no-verify: trusted keys are configured ({keys}), so this device checks every bundle it "
                          "runs; drop --no-verify (or the keys)")


def load_trusted_keys(directory: str | os.PathLike) -> dict[str, list[tuple[Path, Any]]]:
    """``{key id: [(file, Ed25519PublicKey)]}`` for every ``*.pub`` file of ``directory``.

    Examples:
        >>> sorted(load_trusted_keys("/etc/edgepack/keys"))  # doctest: +SKIP
        ['3c1f0a9d5e2b7c44']
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"{directory}: trusted keys directory not found; create it and copy the signer's "
                          f".pub file into it (or unset {KEYS_ENV})")
    keys: dict[str, list[tuple[Path, Any]]] = {}
    for path in sorted(directory.glob(f"*{PUBLIC_SUFFIX}")):
        key = load_public_key(path)
        keys.setdefault(key_id(raw_public_key(key)), []).append((path, key))
    if not keys:
        raise BundleError(f"{directory}: no *{PUBLIC_SUFFIX} public keys in the trusted keys directory; copy the "
                          "signer's .pub file (from `edgepack keys new`) into it")
    return keys


# -------------------------------------------------------------------------------------- envelope


def signature_path(bundle_dir: str | os.PathLike) -> Path:
    return Path(bundle_dir) / SIGNATURE


def is_signed(bundle_dir: str | os.PathLike) -> bool:
    """Whether the bundle carries a well-formed ``manifest.sig``. Says nothing about whether the
    signature holds or whom it is by: only a device's trusted keys can say that (``verify_bundle``).

    Examples:
        >>> is_signed("bundle")  # doctest: +SKIP
        True
    """
    try:
        read_envelope(bundle_dir)
    except BundleError:
        return False
    return True


def make_envelope(manifest_bytes: bytes, keyid: str, signature: bytes) -> dict[str, Any]:
    """The ``manifest.sig`` envelope for one Ed25519 signature over ``pae(PAYLOAD_TYPE, manifest_bytes)``.

    Examples:
        >>> make_envelope(b"{}", "66687aadf862bd77", bytes(64))["signatures"][0]["alg"]
        'ed25519'
    """
    import hashlib

    return {"format": SIG_FORMAT, "payloadType": PAYLOAD_TYPE, "payload": MANIFEST,
            "payloadSha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "signatures": [{"keyid": keyid, "alg": ALGORITHM, "sig": base64.b64encode(signature).decode()}]}


def read_envelope(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed, structurally checked ``manifest.sig``; ``BundleError`` naming it otherwise.

    Examples:
        >>> read_envelope("bundle")["signatures"][0]["keyid"]  # doctest: +SKIP
        '3c1f0a9d5e2b7c44'
    """
    path = signature_path(bundle_dir)
    fix = "restore the signed bundle (or its .tar.gz), or re-sign it with `edgepack sign`"
    if path.is_symlink() or not path.is_file():
        raise BundleError(f"{path}: missing, so the bundle is unsigned and this device accepts signed bundles "
                          f"only; sign it with `edgepack sign {Path(bundle_dir)} --key KEY`")
    env = _manifest.read_json(path, fix)  # size and depth limits, before any signature is checked
    sigs = env.get("signatures") if isinstance(env, dict) else None
    if (not isinstance(env, dict) or env.get("format") != SIG_FORMAT or env.get("payloadType") != PAYLOAD_TYPE
            or env.get("payload") != MANIFEST or not isinstance(sigs, list) or not sigs):
        raise BundleError(f"{path}: not an {SIG_FORMAT} envelope over {MANIFEST}; {fix}")
    for s in sigs:
        if not (isinstance(s, dict) and isinstance(s.get("keyid"), str) and s.get("alg") == ALGORITHM
                and isinstance(s.get("sig"), str)):
            raise BundleError(f"{path}: a signature entry lacks keyid, alg {ALGORITHM!r} or sig; {fix}")
    return env


def _decode_sig(text: str) -> bytes | None:
    try:
        sig = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return sig if len(sig) == 64 else None


def check_signature(bundle_dir: str | os.PathLike, manifest_bytes: bytes,
                    keys: Mapping[str, list[tuple[Path, Any]]], *, keys_dir: str | os.PathLike = "the trusted keys"
                    ) -> tuple[str, Path]:
    """``(key id, key file)`` of the trusted key whose signature in ``manifest.sig`` holds over
    ``manifest_bytes``; ``BundleError`` (unsigned, unknown key, mismatch, garbled) otherwise.

    Examples:
        >>> root = Path("bundle")  # doctest: +SKIP
        >>> check_signature(root, (root / "manifest.json").read_bytes(), load_trusted_keys("keys"))  # doctest: +SKIP
        ('3c1f0a9d5e2b7c44', PosixPath('keys/signing.pub'))
    """
    _, _, invalid = _crypto()
    root = Path(bundle_dir)
    path = signature_path(root)
    env = read_envelope(root)
    message = pae(PAYLOAD_TYPE, manifest_bytes)
    known = [s for s in env["signatures"] if s["keyid"] in keys]
    if not known:
        ids = ", ".join(sorted({s["keyid"] for s in env["signatures"]}))
        raise BundleError(f"{path}: signed by key {ids}, which is not in {keys_dir}; if you trust the signer, copy "
                          "their .pub file there, else get a bundle signed with a key this device trusts")
    for s in known:
        sig = _decode_sig(s["sig"])
        if sig is None:
            raise BundleError(f"{path}: the signature by key {s['keyid']} is not 64 bytes of base64 (truncated or "
                              "garbled); restore the signed bundle (or its .tar.gz), or re-sign it with `edgepack sign`")
        for key_file, key in keys[s["keyid"]]:
            try:
                key.verify(sig, message)
            except invalid:
                continue
            return s["keyid"], key_file
    raise BundleError(f"{root / MANIFEST}: does not match its signature in {SIGNATURE} (changed after signing, e.g. by "
                      "an edit, `verify --update` or `tune`); restore the signed bundle, or re-sign it with `edgepack sign`")


# ---------------------------------------------------------------------------------- bundle layout


def _walk(root: Path, rel: str = "") -> Iterator[tuple[str, os.DirEntry]]:
    with os.scandir(root / rel if rel else root) as it:
        for entry in sorted(it, key=lambda e: e.name):
            path = f"{rel}/{entry.name}" if rel else entry.name
            yield path, entry
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(root, path)


def check_not_own_shim(root: Path) -> None:
    """Refuse to vouch for a bundle whose own ``runtime_shim`` is the code running now (``python -m
    runtime_shim`` started inside the bundle): that code ran before any check could.

    Example:
        >>> check_not_own_shim(Path("bundle"))  # doctest: +SKIP
    """
    try:
        own = (root / "runtime_shim").resolve() == _SHIM_DIR
    except OSError:
        own = False
    if own:
        raise BundleError(f"{root / 'runtime_shim'}: the shim checking this bundle is the bundle's own copy, which ran "
                          "before any check; run the installed runtime from another directory (`edgepack runtime "
                          "wheel`, then `edgepack-runtime verify BUNDLE` or `python -I -m runtime_shim ...`)")


def check_tree(root: str | os.PathLike, listed: set[str] | Mapping[str, Any]) -> None:
    """Refuse symlinks, special files and any file the manifest does not list (``manifest.json`` and
    ``manifest.sig`` aside). The bundle directory itself may be a symlink (``current -> bundle-v3``).

    Examples:
        >>> check_tree("bundle", read_manifest("bundle")["files"])  # doctest: +SKIP
    """
    root = Path(root)
    listed = set(listed)
    for rel, entry in _walk(root):
        path = root / rel
        if entry.is_symlink():
            raise BundleError(f"{path}: a symlink inside the bundle (to {os.readlink(path)!r}); bundles hold regular "
                              "files only: delete it, or unpack the bundle again with `python -m runtime_shim unpack`")
        if entry.is_dir(follow_symlinks=False):
            continue
        if not entry.is_file(follow_symlinks=False):
            raise BundleError(f"{path}: not a regular file (a device, pipe or socket); delete it")
        if entry.stat(follow_symlinks=False).st_nlink != 1:
            # Another name for the same bytes, outside the bundle or in it, changes them after the check.
            raise BundleError(f"{path}: has {entry.stat(follow_symlinks=False).st_nlink} hard links; bundles hold files "
                              "of one link only: copy it (cp, not ln), or unpack the bundle again")
        if rel in listed or rel in (MANIFEST, SIGNATURE):
            continue
        hint = (" (Python compiled it when the bundle's own shim ran; a .pyc there runs instead of the verified "
                ".py: run the installed runtime, see docs/TRUST.md)" if "__pycache__" in rel.split("/") else "")
        raise BundleError(f"{path}: not listed in {MANIFEST}{hint}; delete it, or restore the bundle from its "
                          "signed .tar.gz")


# --------------------------------------------------------------------------------------- rollback


def state_path() -> Path:
    """Where the versions accepted on this device are kept: ``$EDGEPACK_STATE``, else the installed
    runtime's (``runtime_anchors``), else ``$XDG_STATE_HOME/edgepack/accepted.json``, else
    ``~/.local/state/edgepack/accepted.json``.

    Examples:
        >>> state_path()  # doctest: +SKIP
        PosixPath('/home/pi/.local/state/edgepack/accepted.json')
    """
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    installed = runtime_anchors().get("state")
    if installed:
        return Path(installed)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "edgepack" / "accepted.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the state file, so two processes accepting bundles at once cannot
    write an older version over a newer one."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (one process at a time is the caller's business)
        yield
        return
    lock = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a")  # noqa: SIM115 (closed below)
    except PermissionError:
        # An account that may read the device's state but not write it (the serving user): flock needs
        # no write access, so it still waits for a deploy writing the file.
        f = open(lock) if lock.exists() else None  # noqa: SIM115
    if f is None:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_state(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{name: {"version", "manifest_sha256", "key_id", "accepted"}}`` from the state file (empty when
    there is none yet).

    Examples:
        >>> read_state()  # doctest: +SKIP
        {'clinc150': {'version': 20261201071800, 'manifest_sha256': '...', 'key_id': '...', 'accepted': '...'}}
    """
    path = Path(path) if path else state_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(), object_pairs_hook=_manifest.no_duplicates)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        data = e
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT or not isinstance(data.get("bundles"), dict):
        raise BundleError(f"{path}: not an {STATE_FORMAT} state file; restore it, or delete it to forget the versions "
                          f"accepted so far (or point {STATE_ENV} at another file)")
    return data["bundles"]


def _check_and_record(name: str, version: int, digest: str, keyid: str, *, allow_downgrade: bool,
                      state: Path, write: bool = True) -> None:
    with _locked(state):
        bundles = read_state(state)
        last = bundles.get(name)
        if isinstance(last, dict) and isinstance(last.get("version"), int) and not allow_downgrade:
            if version < last["version"]:
                raise BundleError(f"{name}: version {version} is older than version {last['version']} accepted on this "
                                  f"device ({last.get('accepted', '?')}, {state}); deploy a newer bundle, or pass "
                                  "--allow-downgrade (OnnxPipeline(allow_downgrade=True)) to go back on purpose")
            if version == last["version"] and digest != last.get("manifest_sha256"):
                raise BundleError(f"{name}: version {version} was accepted on this device with a different manifest "
                                  f"({state}); re-sign the bundle with a higher --version, or pass --allow-downgrade")
        if not write or (isinstance(last, dict) and last.get("version") == version
                         and last.get("manifest_sha256") == digest):
            return  # checked only, or the same bundle again: nothing to write
        bundles[name] = {"version": version, "manifest_sha256": digest, "key_id": keyid,
                         "accepted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            _manifest.write_json_atomic(state, {"format": STATE_FORMAT, "bundles": bundles})
        except OSError as e:
            raise BundleError(f"{state}: cannot record {name} version {version} as accepted ({e.strerror}); a new "
                              "version is accepted by the account that owns the device's state (`edgepack deploy`), "
                              f"or point {STATE_ENV} at a writable file") from None


# ------------------------------------------------------------------------------------- verification


class Verified(NamedTuple):
    """What ``verify_bundle`` established. ``signed`` is False when no trusted keys were configured:
    then only the checksums were checked. A ``NamedTuple`` (immutable), not a dataclass: ``dataclasses``
    imports ``inspect``, 1.4 MB of a device process's peak memory (docs/memory.md).

    Examples:
        >>> verify_bundle("bundle", keys="keys").key_id  # doctest: +SKIP
        '3c1f0a9d5e2b7c44'
    """

    manifest: dict[str, Any]
    signed: bool = False
    key_id: str | None = None
    key_file: Path | None = None
    name: str | None = None
    version: int | None = None


def signed_fields(root: Path, manifest: Mapping[str, Any]) -> tuple[str, int]:
    """The ``name`` and ``version`` a signed manifest must carry."""
    name, version = manifest.get("name"), manifest.get("version")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BundleError(f"{root / MANIFEST}: name {name!r} is not a bundle name (letters, digits, . _ + -); "
                          "re-sign with `edgepack sign --name NAME`")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise BundleError(f"{root / MANIFEST}: version {version!r} is not a non-negative integer; re-sign with "
                          "`edgepack sign --version N`")
    return name, version


def verify_bundle(bundle_dir: str | os.PathLike, *, keys: str | os.PathLike | bool | None = None,
                  allow_downgrade: bool = False, state: str | os.PathLike | None = None,
                  record: bool = True) -> Verified:
    """Verify a bundle as this device is configured to.

    Without trusted keys (``keys`` None and ``EDGEPACK_TRUSTED_KEYS`` unset): the checksums, as
    ``manifest.verify``. With them, in this order: a trusted key's signature over the exact bytes of
    ``manifest.json``; no duplicated JSON key; a name and version; safe paths; no symlink, special or
    unlisted file; every checksum; no ONNX model with external data; a version not older than the last
    one accepted for the name (kept in ``state``, default ``state_path()``; ``record=False`` checks
    without writing it).

    Examples:
        >>> v = verify_bundle("bundle", keys="/etc/edgepack/keys")  # doctest: +SKIP
        >>> v.name, v.version, v.key_id  # doctest: +SKIP
        ('clinc150', 20261201071800, '3c1f0a9d5e2b7c44')
    """
    root = Path(bundle_dir)
    keys_dir = trusted_keys_dir(keys)
    if keys_dir is None:
        return Verified(manifest=_manifest.verify(root))
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory; pass the directory `edgepack pack` wrote")
    check_not_own_shim(root)
    trusted = load_trusted_keys(keys_dir)
    manifest_path = root / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing or not a regular file; restore the signed bundle (or its .tar.gz)")
    import hashlib

    # Read once, within the size limit: the bytes checked are the bytes parsed.
    data = _manifest.read_limited(manifest_path, _manifest.JSON_LIMITS[MANIFEST], "restore the signed bundle")
    keyid, key_file = check_signature(root, data, trusted, keys_dir=keys_dir)
    manifest = _manifest.parse_manifest(data, manifest_path)  # its paths too (check_paths)
    name, version = signed_fields(root, manifest)
    check_tree(root, manifest["files"])
    _manifest.check_files(root, manifest, fix="restore the signed bundle (or its .tar.gz); a file changed on purpose "
                          "needs the bundle re-signed with `edgepack sign`")
    check_onnx_files(root, manifest["files"])
    _check_and_record(name, version, hashlib.sha256(data).hexdigest(), keyid, allow_downgrade=allow_downgrade,
                      state=Path(state) if state else state_path(), write=record)
    return Verified(manifest=manifest, signed=True, key_id=keyid, key_file=key_file, name=name, version=version)
