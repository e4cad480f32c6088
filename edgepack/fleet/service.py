"""The model service on a device (``python -m runtime_shim serve``), as the inventory names it
(``service = "NAME"``): ``--setup`` writes its systemd unit, and ``deploy`` (and ``--rollback``) tell
it about a switch of ``current`` with SIGHUP, then wait for its status file to show the release it
now serves, or the one line saying why it refused it.

The unit runs the installed runtime, isolated, on ``<remote_dir>/<bundle>/current``, listening on
``/run/NAME/serve.sock`` and writing ``/run/NAME/status.json`` (``service_status`` in the inventory
names another status file, for a service started some other way); the device's systemd starts it.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import DeviceError
from .runtime import runtime_of
from .session import Session

Log = Callable[[str], None]
RELOAD_TIMEOUT = 300.0  # seconds a service may take to verify and load a release

UNIT = """\
[Unit]
Description=edgepack model service {name} ({current})
After=network.target

[Service]
ExecStart={python} -I -B -m runtime_shim serve {current} --socket /run/{name}/serve.sock --status-file /run/{name}/status.json
ExecReload=/bin/kill -HUP $MAINPID
WorkingDirectory={runtime_dir}
# An account of its own with no rights to the runtime, its keys or its state; the socket open to
# every local program (the service is for them), the directory around it created by systemd.
DynamicUser=yes
RuntimeDirectory={name}
RuntimeDirectoryMode=0755
UMask=0000
NoNewPrivileges=yes
ProtectSystem=strict
PrivateTmp=yes
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""

# Run by the device's own Python (standard library): signal the service whose status file this is,
# after checking the pid is a runtime_shim serve process, and wait for it to report the release.
SIGNAL = r"""
import json, os, signal, sys, time
status, want, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
def read():
    try:
        with open(status) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
doc = read()
if not isinstance(doc, dict) or not isinstance(doc.get("pid"), int):
    print(json.dumps({"running": False, "why": f"no status file {status}"})); sys.exit(0)
pid = doc["pid"]
try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
except OSError:
    print(json.dumps({"running": False, "why": f"pid {pid} of {status} is not running"})); sys.exit(0)
if b"runtime_shim" not in argv or b"serve" not in argv:
    print(json.dumps({"running": False, "why": f"pid {pid} of {status} is not a runtime_shim serve process"})); sys.exit(0)
before = doc.get("time")
os.kill(pid, signal.SIGHUP)
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    doc = read() or {}
    if doc.get("release") == want:
        print(json.dumps({"running": True, "release": want, "state": doc.get("state"), "pid": pid})); sys.exit(0)
    if doc.get("time") != before and str(doc.get("state", "")).startswith("refused") and want in doc["state"]:
        print(json.dumps({"running": True, "refused": doc["state"], "release": doc.get("release"), "pid": pid}))
        sys.exit(0)
    time.sleep(0.1)
print(json.dumps({"running": True, "timeout": True, "release": doc.get("release"), "pid": pid}))
"""


def status_file(session: Session) -> str:
    device = session.device
    return device.service_status or f"/run/{device.service}/status.json"


def unit_text(session: Session, root: str) -> str:
    """The systemd unit of the device's service for the bundle slot ``root``."""
    rt = runtime_of(session)
    return UNIT.format(
        name=session.device.service,
        current=posixpath.join(root, "current"),
        python=rt.python,
        runtime_dir=rt.root,
    )


async def write_unit(session: Session, root: str, log: Log) -> str:
    """Write ``<runtime_dir>/systemd/NAME.service`` on the device; returns its path."""
    name = session.device.service
    path = posixpath.join(runtime_of(session).root, "systemd", f"{name}.service")
    await session.transport.makedirs(posixpath.dirname(path))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / f"{name}.service"
        local.write_text(unit_text(session, root))
        await session.transport.put(local, path)
    log(
        f"{session.device.name}: --setup: wrote the service unit {path}; start it with "
        f"`systemctl link {path} && systemctl enable --now {name}`"
    )
    return path


async def tell_service(session: Session, release: str, log: Log) -> dict[str, Any]:
    """SIGHUP the device's service after ``current`` moved to ``release``; wait until it serves it.
    ``DeviceError`` when it refused the release (it keeps serving the old one); a service that is not
    running is reported, not an error (it loads ``current`` when it starts)."""
    name = session.device.name
    argv = [
        *session.device.command_prefix,
        session.device.python,
        "-I",
        "-c",
        SIGNAL,
        status_file(session),
        release,
        str(RELOAD_TIMEOUT),
    ]
    done = await session.transport.run(argv, timeout=RELOAD_TIMEOUT + 60)
    try:
        out = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise DeviceError(
            f"{name}: could not signal the service {session.device.service}: {done.last_error()}"
        ) from None
    if not out.get("running"):
        log(
            f"{name}: service {session.device.service} not signalled: {out['why']}; it serves current when it starts"
        )
        return {"running": False, "why": out["why"]}
    if out.get("refused"):
        raise DeviceError(
            f"{name}: current now points at {release}, but the service {session.device.service} refused "
            f"it ({out['refused']}) and still serves {out.get('release')}; fix the release and deploy "
            "again, or deploy --rollback"
        )
    if out.get("timeout"):
        raise DeviceError(
            f"{name}: the service {session.device.service} did not take {release} within "
            f"{RELOAD_TIMEOUT:g} s (still serving {out.get('release')}); see its log"
        )
    log(f"{name}: service {session.device.service} (pid {out['pid']}) now serves {release}")
    return {"running": True, "release": release, "pid": out["pid"]}
