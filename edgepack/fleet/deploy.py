"""Deploy a bundle to a device, atomically, keeping the previous one; roll back; set up a venv.

On each device (layout in ``remote``):

1. refuse an unsigned bundle for a ``signed_only`` device; refuse early (before any byte is sent) a
   device whose Python lacks onnxruntime, tokenizers or numpy, unless ``--setup``;
2. upload every file into ``releases/.incoming-*`` beside the releases (same file system);
3. ``python -m runtime_shim verify`` there, with the device's Python: every sha256 of the manifest;
4. rename it to ``releases/<digest16>``; with ``--setup``, create ``<remote_dir>/venv`` from the
   bundle's ``requirements.txt`` if packages are missing;
5. load it once (``predict`` on a row of its eval slice), then point ``current`` at it with a rename
   and ``previous`` at the release it replaces.

An upload cut off at any point leaves ``current`` as it was; the stray ``.incoming-*`` directory is
removed by the next deploy. A bundle already current is verified, not sent again.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime_shim.manifest import BundleError, read_manifest

from . import DeviceError
from .remote import SETUP_VENV
from .session import Session

SIGNATURE = "manifest.sig"  # written by `edgepack sign` (the signing issue)
_SKIP = ("__pycache__",)


@dataclass
class LocalBundle:
    """A bundle on this machine, as the fleet ships it."""

    path: Path
    name: str
    manifest: dict[str, Any]
    digest: str  # sha256 of manifest.json's bytes: names the bundle in every result
    files: list[tuple[str, int]]  # (relative POSIX path, bytes), manifest.json last
    _reference: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def release(self) -> str:
        return self.digest[:16]

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self.files)

    @property
    def signed(self) -> bool:
        return (self.path / SIGNATURE).is_file()

    def first_text(self) -> str:
        try:
            with open(self.path / "eval.jsonl") as f:
                return str(json.loads(f.readline()).get("text") or "hello")
        except (OSError, ValueError, AttributeError):
            return "hello"


def load_bundle(path: str | Path, name: str | None = None) -> LocalBundle:
    """Read and check a bundle on this machine (manifest and checksums) before sending it anywhere."""
    from runtime_shim.manifest import verify

    from ..errors import EdgepackError

    root = Path(path)
    try:
        verify(root)
        manifest = read_manifest(root)
    except BundleError as e:
        raise EdgepackError(str(e)) from None
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part in _SKIP for part in rel.parts) and rel.as_posix() != "manifest.json":
            files.append((rel.as_posix(), p.stat().st_size))
    # manifest.json goes last: a directory holding it was uploaded whole (verify checks anyway).
    files.append(("manifest.json", (root / "manifest.json").stat().st_size))
    digest = hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
    bundle_name = name or str(manifest.get("name") or root.resolve().name)
    if not bundle_name or bundle_name.startswith(".") or "/" in bundle_name:
        raise EdgepackError(f"{root}: cannot name the bundle on the device ({bundle_name!r}); pass --name NAME")
    return LocalBundle(root, bundle_name, manifest, digest, files)


async def _upload(session: Session, bundle: LocalBundle, incoming: str, progress: Callable[[int], None]) -> None:
    dirs = sorted({posixpath.dirname(rel) for rel, _ in bundle.files} - {""})
    for d in dirs:
        await session.transport.makedirs(posixpath.join(incoming, d))
    for rel, _ in bundle.files:
        await session.transport.put(bundle.path / rel, posixpath.join(incoming, rel), progress)


TRUSTED_KEYS_DIR = "trusted-keys"


def keys_dir(session: Session) -> str:
    """Where a device keeps the public keys it verifies signed bundles with (``deploy --setup`` fills it)."""
    return posixpath.join(session.remote_dir, TRUSTED_KEYS_DIR)


async def push_trusted_keys(session: Session, log: Callable[[str], None]) -> int:
    """Copy the inventory's ``trusted_keys`` (``*.pub``) to the device's key directory."""
    src = Path(session.device.trusted_keys).expanduser()
    pubs = sorted(src.glob("*.pub")) if src.is_dir() else [src]
    if not pubs or not all(p.is_file() and p.suffix == ".pub" for p in pubs):
        raise DeviceError(f"{session.device.name}: trusted_keys = {src}: no public key (*.pub) there; "
                          "point it at the .pub file `edgepack keys new` wrote, or a directory of them")
    dest = keys_dir(session)
    await session.transport.makedirs(dest)
    for p in pubs:
        await session.transport.put(p, posixpath.join(dest, p.name))
    log(f"{session.device.name}: --setup: {len(pubs)} trusted public key(s) in {dest}")
    return len(pubs)


async def verify_on_device(session: Session, release_dir: str, *, load: str | None = None,
                           python: list[str] | None = None, signatures: bool = False,
                           allow_downgrade: bool = False) -> None:
    """The shim's checksum check of ``release_dir`` on the device (with ``signatures``, also the
    signature against the device's trusted keys and its rollback record); with ``load``, also
    classify one text."""
    argv = [*(python or session.python), "-m", "runtime_shim", "verify", "."]
    if signatures:
        argv += ["--keys", keys_dir(session), *(["--allow-downgrade"] if allow_downgrade else [])]
    done = await session.transport.run(argv, cwd=release_dir, timeout=600)
    if done.returncode != 0:
        raise DeviceError(f"{session.device.name}: verify failed on the device: {done.last_error()}")
    if load is not None:
        done = await session.py("-m", "runtime_shim", "predict", ".", load, "--json", "--no-verify",
                                cwd=release_dir, timeout=900)
        if done.returncode != 0:
            raise DeviceError(f"{session.device.name}: the bundle does not load on the device: {done.last_error()}")


async def setup_venv(session: Session, requirements: str, log: Callable[[str], None]) -> None:
    """``python -m venv <remote_dir>/venv`` and ``pip install -r requirements.txt`` on the device."""
    venv = posixpath.join(session.remote_dir, SETUP_VENV)
    name = session.device.name
    log(f"{name}: --setup: creating {venv} and installing {', '.join(session.missing_packages())}")
    base = [*session.device.command_prefix, session.device.python]
    done = await session.transport.run([*base, "-m", "venv", venv], timeout=600)
    if done.returncode != 0:
        raise DeviceError(f"{name}: --setup: python -m venv {venv} failed ({done.last_error()}); install the "
                          "device's python3-venv package")
    vpy = [*session.device.command_prefix, posixpath.join(venv, "bin", "python")]
    done = await session.transport.run([*vpy, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                        "-r", requirements], timeout=3600)
    if done.returncode != 0:
        raise DeviceError(f"{name}: --setup: pip install -r {requirements} failed on the device: {done.last_error()}")
    await session.probe()
    if session.missing_packages():
        raise DeviceError(f"{name}: --setup: still missing {', '.join(session.missing_packages())} in {venv}")


def _check_ready(session: Session, bundle: LocalBundle, setup: bool) -> None:
    name = session.device.name
    if session.device.signed_only and not bundle.signed:
        raise DeviceError(f"{name}: accepts signed bundles only (signed_only = true) and {bundle.path} has no "
                          f"{SIGNATURE}; sign it with `edgepack sign` first")
    missing = session.missing_packages()
    if missing and not setup:
        raise DeviceError(f"{name}: {session.python[-1]} has no {', '.join(missing)}, so the bundle cannot run "
                          "there; re-run with --setup (a venv from the bundle's requirements.txt) or install them")


async def deploy_one(session: Session, bundle: LocalBundle, *, setup: bool = False,
                     progress: Callable[[int], None] | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Deploy ``bundle`` to one connected device; returns what was done and the layout after."""
    _check_ready(session, bundle, setup)
    started = time.monotonic()
    root = session.root(bundle.name)
    state = await session.layout("state", root)
    release_dir = posixpath.join(root, "releases", bundle.release)
    sent, action = 0, "deployed"
    if state["current"] == bundle.release:
        action = "already current"
    elif bundle.release in state["releases"]:
        action = "re-activated"  # e.g. the previous release, deployed again: verified below, not re-sent
    else:
        incoming = (await session.layout("incoming", root, bundle.release))["path"]
        counted = [0]

        def on_bytes(n: int) -> None:
            counted[0] += n
            if progress:
                progress(n)

        try:
            await _upload(session, bundle, incoming, on_bytes)
            # Checksums with the inventory's Python: verify needs only the standard library.
            await verify_on_device(session, incoming, python=[*session.device.command_prefix, session.device.python])
        except BaseException:
            try:
                await session.layout("rmtree", root, incoming)
            except Exception:  # the connection is gone: the next deploy prunes it
                pass
            raise
        sent = counted[0]
        await session.layout("commit", root, incoming, bundle.release)
    if setup and session.missing_packages():
        await setup_venv(session, posixpath.join(release_dir, "requirements.txt"), log)
    if setup and session.device.trusted_keys:
        await push_trusted_keys(session, log)
    # A signed_only device checks the signature with its own keys (and remembers the version, so an
    # older bundle cannot be put back without deploy --rollback) before the bundle goes live.
    await verify_on_device(session, release_dir, load=bundle.first_text(), signatures=session.device.signed_only)
    after = await session.layout("activate", root, bundle.release)
    return {"device": session.device.name, "action": action, "bundle": bundle.name, "release": bundle.release,
            "manifest_digest": bundle.digest, "root": root, "current": after["current"],
            "previous": after["previous"], "bytes_sent": sent, "seconds": round(time.monotonic() - started, 2),
            "python": session.python[-1]}


async def find_bundle_name(session: Session, name: str | None) -> str:
    if name:
        return name
    names = await session.layout("bundles", session.remote_dir)
    if len(names) == 1:
        return str(names[0])
    raise DeviceError(f"{session.device.name}: {len(names)} bundles under {session.remote_dir} "
                      f"({', '.join(names) or 'none'}); pass --name to say which to roll back")


async def rollback_one(session: Session, name: str | None = None) -> dict[str, Any]:
    """Point ``current`` back at ``previous`` (and ``previous`` at what was current), then verify it."""
    bundle_name = await find_bundle_name(session, name)
    root = session.root(bundle_name)
    after = await session.layout("rollback", root)
    current = posixpath.join(root, "current")
    if session.device.signed_only:  # a rollback is a downgrade on purpose
        await verify_on_device(session, current, signatures=True, allow_downgrade=True)
    else:
        await verify_on_device(session, current, python=[*session.device.command_prefix, session.device.python])
    return {"device": session.device.name, "action": "rolled back", "bundle": bundle_name, "root": root,
            "current": after["current"], "previous": after["previous"]}
