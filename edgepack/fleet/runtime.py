"""The installed runtime on a device: ``edgepack-runtime`` (this machine's own ``runtime_shim``, as a
wheel) in a virtual environment, with the trust anchors beside it, outside ``remote_dir`` and every
release::

    <runtime_dir>/venv/                        the runtime: edgepack-runtime + onnxruntime, tokenizers, numpy
                                               (+ cryptography on a signed_only device)
    <runtime_dir>/venv/edgepack-runtime.json   its anchors: where its keys and state are, which wheel it is
    <runtime_dir>/keys/<key id>.pub            the keys the device trusts (only --setup and --trust-key add any)
    <runtime_dir>/state/accepted.json          the highest version accepted per bundle name (rollback)
    <runtime_dir>/state/slots.json             the bundle name each <remote_dir>/<bundle> slot accepted
    <runtime_dir>/wheels/                      the wheel last installed

Everything there is written by the account deploy logs in as, with modes that let every account read
it and no other account write it: logged in as root, the serving account cannot change the runtime,
the keys or the state. Logged in as the serving account itself, nothing protects the device from
that account, and ``--setup`` says so.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import posixpath
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime_shim.trust import RUNTIME_FILE, RUNTIME_FORMAT

from ..console import Log
from ..runtime_dist import SIGNED_EXTRA, runtime_version, wheel_bytes, wheel_name
from . import DeviceError
from .remote import ANCHORS, PROBED_PACKAGES, RUNTIME_PACKAGES, RUNTIME_VENV
from .session import Session


@dataclass(frozen=True)
class RuntimeDir:
    """The paths of the runtime directory on a device."""

    root: str

    @property
    def venv(self) -> str:
        return posixpath.join(self.root, RUNTIME_VENV)

    @property
    def python(self) -> str:
        return posixpath.join(self.venv, "bin", "python")

    @property
    def anchors(self) -> str:
        return posixpath.join(self.venv, RUNTIME_FILE)

    @property
    def keys(self) -> str:
        return posixpath.join(self.root, "keys")

    @property
    def accepted(self) -> str:
        return posixpath.join(self.root, "state", "accepted.json")

    @property
    def slots(self) -> str:
        return posixpath.join(self.root, "state", "slots.json")

    @property
    def wheels(self) -> str:
        return posixpath.join(self.root, "wheels")


def runtime_of(session: Session) -> RuntimeDir:
    return RuntimeDir(session.runtime_dir)


@functools.lru_cache(maxsize=1)
def local_wheel() -> tuple[Path, str]:
    """``(path, sha256)`` of this machine's runtime wheel, built once per process into a temporary directory."""
    data = wheel_bytes()
    tmp = Path(tempfile.mkdtemp(prefix="edgepack-runtime-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    path = tmp / wheel_name()
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def trusted_key_files(device_name: str, trusted_keys: str) -> list[Path]:
    """The ``*.pub`` files ``trusted_keys`` names on this machine (a file or a directory of them), each
    checked to be an Ed25519 public key."""
    from ..errors import EdgepackError
    from ..signing import key_id_of

    src = Path(trusted_keys).expanduser()
    pubs = sorted(src.glob("*.pub")) if src.is_dir() else [src]
    if not pubs or not all(p.is_file() and p.suffix == ".pub" for p in pubs):
        raise DeviceError(f"{device_name}: trusted_keys = {src}: no public key (*.pub) there; point it at the .pub "
                          "file `edgepack keys new` wrote, or a directory of them")
    for p in pubs:
        try:
            key_id_of(p)
        except EdgepackError as e:
            raise DeviceError(f"{device_name}: {e}") from None
    return pubs


def protection(session: Session) -> str | None:
    """``None`` when the serving accounts cannot write the runtime directory; else one line saying why
    the device is not protected against its own user, and what to do."""
    name, rt = session.device.name, session.runtime_dir
    if session.info.get("uid") != 0:
        return (f"{name}: NOT PROTECTED against its own user: deploy logs in as a non-root account, so the runtime, "
                f"trusted keys and rollback state in {rt} belong to that account and anything running as it can "
                "change them; to protect the device, deploy as root (user = \"root\") and serve the model from "
                "another account, then re-run --setup")
    exposed = session.info.get("runtime_exposed") or []
    if exposed:
        return (f"{name}: NOT PROTECTED: {', '.join(exposed)} is owned by or writable by an account other than root, "
                f"which could replace {rt}; set runtime_dir to a path that only root can write (default "
                "/opt/edgepack-runtime)")
    return None


async def _check(session: Session, argv: list[str], what: str, fix: str, timeout: float = 600) -> str:
    done = await session.transport.run(argv, cwd="/", timeout=timeout)
    if done.returncode != 0:
        raise DeviceError(f"{session.device.name}: --setup: {what} failed on the device ({done.last_error()}); {fix}")
    return done.stdout


async def install_keys(session: Session, pubs: list[Path], log: Log) -> None:
    """Copy public keys into the device's runtime key directory (added, never removed) with read-only modes."""
    rt = runtime_of(session)
    base = [*session.device.command_prefix, session.device.python, "-I"]
    await _check(session, [*base, "-c", ANCHORS, rt.root], "creating the runtime directory", "check runtime_dir")
    from ..signing import key_id_of

    for p in pubs:  # named by key id: a new key never replaces another one of the same file name
        await session.transport.put(p, posixpath.join(rt.keys, f"{key_id_of(p)}.pub"))
    await _check(session, [*base, "-c", ANCHORS, rt.root], "setting the key files' modes", "check runtime_dir")
    log(f"{session.device.name}: {len(pubs)} trusted public key(s) in {rt.keys}")


async def setup_runtime(session: Session, log: Log) -> None:
    """Install this machine's runtime wheel (and its packages) into ``<runtime_dir>/venv`` on the device,
    the inventory's trusted keys into ``<runtime_dir>/keys``, and the anchors file naming them.

    The three runtime packages come from the device's package index, at the versions its own Python
    already has when it has them; ``cryptography`` too on a ``signed_only`` device."""
    device, name = session.device, session.device.name
    old = session.python_too_old()
    if old:
        raise DeviceError(old)
    rt = runtime_of(session)
    wheel, digest = local_wheel()
    base = [*device.command_prefix, device.python, "-I"]
    log(f"{name}: --setup: installing edgepack-runtime {runtime_version()} into {rt.venv}")
    await _check(session, [*base, "-c", ANCHORS, rt.root], "creating the runtime directory",
                 "check runtime_dir and that the deploy account may create it")
    if not session.info.get("runtime_python"):
        await _check(session, [*base, "-m", "venv", rt.venv], f"python -m venv {rt.venv}",
                     "install the device's python3-venv package")
    remote_wheel = posixpath.join(rt.wheels, wheel.name)
    await session.transport.put(wheel, remote_wheel)
    pip = [*device.command_prefix, rt.python, "-I", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    await _check(session, [*pip, "--no-deps", "--force-reinstall", remote_wheel], "pip install edgepack-runtime",
                 "check the device's pip")
    have = session.info.get("base_packages") or session.info.get("packages") or {}
    pins = [f"{n}=={have[n]}" for n in PROBED_PACKAGES if have.get(n) and (n in RUNTIME_PACKAGES or device.signed_only)]
    extra = f"[{SIGNED_EXTRA}]" if device.signed_only else ""
    await _check(session, [*pip, f"{remote_wheel}{extra}", *pins], f"pip install {', '.join(RUNTIME_PACKAGES)}"
                 + (" and cryptography" if extra else ""), "check that the device reaches its package index",
                 timeout=3600)
    if device.trusted_keys:
        await install_keys(session, trusted_key_files(name, device.trusted_keys), log)
    anchors = {"format": RUNTIME_FORMAT, "version": runtime_version(), "wheel_sha256": digest,
               "keys": rt.keys if device.signed_only else None, "state": rt.accepted}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / RUNTIME_FILE
        local.write_text(json.dumps(anchors, indent=1) + "\n")
        await session.transport.put(local, rt.anchors)
    await _check(session, [*base, "-c", ANCHORS, rt.root], "setting the runtime directory's modes", "check runtime_dir")
    await session.probe()
    problem = require_runtime(session, setup=False, quiet=True)
    if problem:
        raise DeviceError(problem)
    log(protection(session) or f"{name}: --setup: {rt.root} is root's: serving accounts can read the runtime, its "
                                f"keys and its state, not change them")


def require_runtime(session: Session, *, setup: bool, quiet: bool = False) -> str | None:
    """Refuse a device whose installed runtime is missing, not this machine's, or incomplete (``--setup``
    mends each). ``quiet``: return the reason instead of raising."""
    name, rt = session.device.name, session.runtime_dir
    installed = session.info.get("runtime") or {}
    _, digest = local_wheel()
    reason = None
    if not session.info.get("runtime_python") or not installed:
        reason = f"{name}: no edgepack runtime in {rt} on the device"
    elif installed.get("wheel_sha256") != digest:
        reason = (f"{name}: the edgepack runtime in {rt} (version {installed.get('version')}) is not this machine's "
                  f"(version {runtime_version()}, another build)")
    elif session.missing_packages():
        reason = f"{name}: the runtime in {rt} lacks {', '.join(session.missing_packages())}"
    elif session.device.signed_only and not installed.get("keys"):
        reason = f"{name}: signed_only, but the runtime in {rt} was set up without trusted keys"
    if reason is None or setup:
        return None
    reason += f"; run `edgepack devices --setup --to {name}` (or deploy with --setup)"
    if quiet:
        return reason
    raise DeviceError(reason)
