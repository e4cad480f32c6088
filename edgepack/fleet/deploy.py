"""Deploy a bundle to a device, atomically, keeping the previous one; roll back.

For a ``signed_only`` device the bundle is first checked here, against the inventory's
``trusted_keys``, exactly as the device will check it (signature, unlisted files, checksums): a bad
bundle stops before a byte is sent. Then, on each device (layout in ``remote``):

1. refuse a Python older than the runtime supports, and a device whose installed runtime (``runtime``)
   is missing or not this machine's, unless ``--setup`` (which installs it);
2. refuse a slot (``<remote_dir>/<bundle>``) bound to another bundle name, unless ``rename``;
3. upload the files the manifest lists (nothing else) into ``releases/.incoming-*``;
4. check them there with the installed runtime, isolated (``Session.runtime``): ``verify`` (with the
   device's own keys and rollback state on a ``signed_only`` device) and ``predict`` on a row of the
   eval slice; nothing of the bundle is imported;
5. rename to ``releases/<digest16>``, bind the slot to the bundle's name, point ``current`` at it with
   a rename and ``previous`` at the release it replaces.

Before an upload the free space under ``remote_dir`` is checked against the bundle's size plus
``ROOM``; a disk that fills anyway is reported as a full disk, in one line. An upload cut off or
interrupted at any point leaves ``current`` as it was and its ``.incoming-*`` directory is removed
(by the next deploy when the link is gone). A release already there is checked again on the device
every time and replaced when it fails.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime_shim.manifest import BundleError

from . import QUIET, DeviceError
from .inventory import Device
from .runtime import require_runtime, runtime_of, setup_runtime, trusted_key_files
from .service import tell_service, write_unit
from .session import Session

SIGNATURE = "manifest.sig"  # written by `edgepack sign`


@dataclass
class LocalBundle:
    """A bundle on this machine, as the fleet ships it."""

    path: Path
    name: str
    manifest: dict[str, Any]
    digest: str  # sha256 of manifest.json's bytes: names the bundle in every result
    files: list[tuple[str, int]]  # (relative POSIX path, bytes): the listed files, manifest.sig, manifest.json last
    _reference: dict[str, Any] | None = field(default=None, repr=False)
    _checked: dict[str, str | None] = field(default_factory=dict, repr=False)

    @property
    def release(self) -> str:
        return self.digest[:16]

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self.files)

    @property
    def signed(self) -> bool:
        return (self.path / SIGNATURE).is_file()

    @property
    def signed_name(self) -> str:
        """The name the manifest gives the bundle (signed, on a signed bundle): what a slot binds to."""
        return str(self.manifest.get("name") or self.name)

    def first_text(self) -> str:
        try:
            with open(self.path / "eval.jsonl") as f:
                return str(json.loads(f.readline()).get("text") or "hello")
        except (OSError, ValueError, AttributeError):
            return "hello"


def load_bundle(path: str | Path, name: str | None = None) -> LocalBundle:
    """Read and check a bundle on this machine (manifest and checksums) before sending it anywhere.
    Only what the manifest lists is shipped (with ``manifest.sig``): a file beside them stays here."""
    from runtime_shim.manifest import verify

    from ..errors import EdgepackError

    root = Path(path)
    try:
        manifest = verify(root)  # its paths too: none outside the bundle (manifest.check_paths)
    except BundleError as e:
        raise EdgepackError(str(e)) from None
    listed = sorted(manifest["files"]) + ([SIGNATURE] if (root / SIGNATURE).is_file() else [])
    files = [(rel, (root / rel).stat().st_size) for rel in listed]
    # manifest.json goes last: a directory holding it was uploaded whole (verify checks anyway).
    files.append(("manifest.json", (root / "manifest.json").stat().st_size))
    digest = hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
    bundle_name = name or str(manifest.get("name") or root.resolve().name)
    if not bundle_name or bundle_name.startswith(".") or "/" in bundle_name:
        raise EdgepackError(f"{root}: cannot name the bundle on the device ({bundle_name!r}); pass --name NAME")
    return LocalBundle(root, bundle_name, manifest, digest, files)


def signature_problem(bundle: LocalBundle, device: Device) -> str | None:
    """Check ``bundle`` here as a ``signed_only`` device will, against the inventory's ``trusted_keys``
    (signature, names, unlisted files, checksums, external data; the version is the device's to judge):
    ``None`` when it passes, else one line. Cached per key set."""
    if not device.signed_only:
        return None
    keys = str(Path(device.trusted_keys or "").expanduser().resolve())
    if keys not in bundle._checked:
        from runtime_shim.trust import verify_bundle

        if not bundle.signed:
            problem = (f"accepts signed bundles only (signed_only = true) and {bundle.path} has no {SIGNATURE}; "
                       "sign it with `edgepack sign` first")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                trusted = Path(tmp) / "keys"
                trusted.mkdir()
                try:
                    for p in trusted_key_files(device.name, device.trusted_keys or ""):
                        shutil.copy(p, trusted / p.name)
                    verify_bundle(bundle.path, keys=trusted, allow_downgrade=True, state=Path(tmp) / "state.json",
                                  record=False)
                    problem = None
                except (BundleError, DeviceError) as e:
                    problem = f"refused before upload (checked against trusted_keys = {device.trusted_keys}): {e}"
        bundle._checked[keys] = problem
    problem = bundle._checked[keys]
    return f"{device.name}: {problem}" if problem else None


def check_before_upload(bundle: LocalBundle, devices: Sequence[Device]) -> None:
    """``EdgepackError`` (one line) when ``bundle`` fails the check of any ``signed_only`` device among
    ``devices``: the command stops before connecting to any of them."""
    from ..errors import EdgepackError

    for device in devices:
        problem = signature_problem(bundle, device)
        if problem:
            raise EdgepackError(problem)


ROOM = 4 << 20  # bytes beyond the bundle an upload needs free: results and the runtime's small writes


def room_needed(bundle: LocalBundle) -> int:
    """Free bytes under ``remote_dir`` an upload of ``bundle`` needs: the bundle plus ``ROOM``. A device
    holds ``current`` and ``previous`` and, during an upload, the new release beside them: three
    releases at the most (older ones are removed when the new one goes live)."""
    return bundle.total_bytes + ROOM


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def disk_full(session: Session, bundle: LocalBundle, doing: str, *, free: int | None = None,
              current: str | None = None) -> str:
    """One line for a full disk under ``remote_dir``: where, while doing what, what is still live, the fix."""
    have = f" ({_mb(free)} free, an upload of this bundle needs {_mb(room_needed(bundle))})" if free is not None else ""
    live = f"; the live release {current} is untouched" if current else ""
    return (f"{session.device.name}: no space left on the device under {session.remote_dir} while {doing}{have}{live}; "
            f"free space there (or point remote_dir at a larger file system: a device needs room for three releases "
            f"of the bundle, see docs/FLEET.md) and run again")


def no_space(text: str) -> bool:
    return "No space left on device" in text or "Errno 28" in text or "ENOSPC" in text


async def free_bytes(session: Session) -> int | None:
    try:
        return int((await session.layout("space", session.remote_dir))["free"])
    except (DeviceError, KeyError, TypeError, ValueError):
        return None


async def _upload(session: Session, bundle: LocalBundle, incoming: str, on_bytes: Callable[[int], None],
                  current: str | None) -> None:
    from .transport import UploadError

    dirs = sorted({posixpath.dirname(rel) for rel, _ in bundle.files} - {""})
    try:
        for d in dirs:
            await session.transport.makedirs(posixpath.join(incoming, d))
        for rel, _ in bundle.files:
            await session.transport.put(bundle.path / rel, posixpath.join(incoming, rel), on_bytes)
    except UploadError as e:
        if e.kind in ("failed", "full"):  # OpenSSH's server answers a full disk with a bare "Failure"
            free = await free_bytes(session)
            if e.kind == "full" or (free is not None and free < ROOM):
                raise DeviceError(disk_full(session, bundle, "uploading", free=free, current=current)) from None
        raise


def keys_args(session: Session) -> list[str]:
    """``--keys <runtime_dir>/keys`` on a ``signed_only`` device: its runtime checks with its own keys."""
    return ["--keys", runtime_of(session).keys] if session.device.signed_only else []


async def verify_on_device(session: Session, bundle_dir: str, *, load: str | None = None,
                           allow_downgrade: bool = False) -> str:
    """The installed runtime's ``verify`` of ``bundle_dir`` on the device (on a ``signed_only`` device
    with its keys and rollback state); with ``load``, also classify one text. Returns verify's line."""
    name = session.device.name
    done = await session.runtime("verify", bundle_dir, *keys_args(session),
                                 *(["--allow-downgrade"] if allow_downgrade else []), timeout=600)
    if done.returncode != 0:
        raise DeviceError(f"{name}: verify failed on the device: {done.last_error()}")
    if load is not None:
        loaded = await session.runtime("predict", bundle_dir, load, "--json", *keys_args(session),
                                       *(["--allow-downgrade"] if allow_downgrade else []), timeout=900)
        if loaded.returncode != 0:
            raise DeviceError(f"{name}: the bundle does not load on the device: {loaded.last_error()}")
    return (done.stdout.strip().splitlines() or [""])[-1]


def _check_ready(session: Session, bundle: LocalBundle, setup: bool) -> None:
    too_old = session.python_too_old()
    if too_old:
        raise DeviceError(too_old)
    problem = signature_problem(bundle, session.device)
    if problem:
        raise DeviceError(problem)
    require_runtime(session, setup=setup)


async def _bind(session: Session, root: str, bundle: LocalBundle, *, write: bool, rename: bool) -> dict[str, Any]:
    return await session.layout("slot", root, runtime_of(session).slots, bundle.signed_name,
                                "1" if write else "0", "1" if rename else "0")


async def deploy_one(session: Session, bundle: LocalBundle, *, setup: bool = False, rename: bool = False,
                     progress: Callable[[int], None] | None = None,
                     log: Callable[[str], None] = QUIET) -> dict[str, Any]:
    """Deploy ``bundle`` to one connected device; returns what was done and the layout after.

    A release already on the device (live or kept as ``previous``) is checked there again, every time;
    one that fails its check is uploaded again and replaced. ``progress`` gets the bytes sent, as they
    go, beside ``session.progress``."""
    from .transport import ConnectionDropped

    _check_ready(session, bundle, setup)
    if setup:
        session.progress.state("installing the runtime (--setup)")
        await setup_runtime(session, log)
    started = time.monotonic()
    root = session.root(bundle.name)
    if setup and session.device.service:
        await write_unit(session, root, log)
    await _bind(session, root, bundle, write=False, rename=rename)
    state = await session.layout("state", root)
    current = state["current"]
    release_dir = posixpath.join(root, "releases", bundle.release)
    sent, action, checked = 0, "deployed", None
    if bundle.release in state["releases"]:
        action = "already current" if current == bundle.release else "re-activated"
        session.progress.state(f"checking the release there ({bundle.release}{', live' if current == bundle.release else ''})")
        try:
            checked = await verify_on_device(session, release_dir, load=bundle.first_text())
        except ConnectionDropped:
            raise
        except DeviceError as e:  # damaged there (a truncated file, a stray one): send it again
            action = "repaired"
            session.progress.state(f"the release there fails its check ({str(e).partition(': ')[2]}): sending it again")
    incoming = None
    try:
        if checked is None:
            free = await free_bytes(session)
            if free is not None and free < room_needed(bundle):
                raise DeviceError(disk_full(session, bundle, "checking before the upload", free=free, current=current))
            counter = session.progress.counter("uploading", bundle.total_bytes, "B")
            token = uuid.uuid4().hex[:8]
            incoming = posixpath.join(root, "releases", f".incoming-{bundle.release}-{token}")
            await session.layout("incoming", root, bundle.release, token)
            counted = [0]

            def on_bytes(n: int) -> None:
                counted[0] += n
                counter(n)
                if progress:
                    progress(n)

            await _upload(session, bundle, incoming, on_bytes, current)
            session.progress.end_counter()
            sent = counted[0]
            # Checked where it lies, before it can go live: a signed_only device with its own keys (and
            # its record of versions, so an older bundle cannot come back without deploy --rollback).
            session.progress.state("verifying on the device")
            checked = await verify_on_device(session, incoming, load=bundle.first_text())
            session.progress.state("switching")
            await session.layout("commit", root, incoming, bundle.release)
            incoming = None
    except BaseException:
        if incoming is not None:
            try:
                await session.layout("rmtree", root, incoming)
                session.progress.cleanup = f"its upload was removed; current is still {current or 'none'}"
            except BaseException:  # the connection is gone: the next deploy prunes it
                session.progress.cleanup = (f"its upload {posixpath.basename(incoming)} is left until the next "
                                            f"deploy; current is still {current or 'none'}")
        raise
    await _bind(session, root, bundle, write=True, rename=rename)
    after = await session.layout("activate", root, bundle.release)
    out = {"device": session.device.name, "action": action, "bundle": bundle.name, "release": bundle.release,
           "manifest_digest": bundle.digest, "root": root, "current": after["current"],
           "previous": after["previous"], "bytes_sent": sent, "seconds": round(time.monotonic() - started, 2),
           "python": session.python[-1], "checked": checked, "signed": session.device.signed_only}
    if session.device.service:  # the service running on the device takes the new current (SIGHUP)
        out["service"] = await tell_service(session, bundle.release, log)
    return out


async def find_bundle_name(session: Session, name: str | None) -> str:
    if name:
        return name
    names = await session.layout("bundles", session.remote_dir)
    if len(names) == 1:
        return str(names[0])
    raise DeviceError(f"{session.device.name}: {len(names)} bundles under {session.remote_dir} "
                      f"({', '.join(names) or 'none'}); pass --name to say which to roll back")


async def rollback_one(session: Session, name: str | None = None, *,
                       log: Callable[[str], None] = QUIET) -> dict[str, Any]:
    """Check ``previous`` on the device (a downgrade on purpose), then point ``current`` back at it
    (and ``previous`` at what was current)."""
    require_runtime(session, setup=False)
    bundle_name = await find_bundle_name(session, name)
    root = session.root(bundle_name)
    state = await session.layout("state", root)
    if not state["previous"]:
        raise DeviceError(f"{session.device.name}: no previous release under {root}; nothing to roll back to")
    await verify_on_device(session, posixpath.join(root, "releases", state["previous"]), allow_downgrade=True)
    after = await session.layout("rollback", root)
    out = {"device": session.device.name, "action": "rolled back", "bundle": bundle_name, "root": root,
           "current": after["current"], "previous": after["previous"]}
    if session.device.service:
        out["service"] = await tell_service(session, after["current"], log)
    return out
