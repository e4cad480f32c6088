"""A connected device (``Session``: transport, what the probe read there, the Python to use) and the
runner that works on many devices at once, each failing alone.

    outcomes = run_shown("deploy", devices, job, trust_new_host=False)  # job(session, log)
    [o.error for o in outcomes if not o.ok]   # one line per device that failed

Ctrl-C stops every device's work where it is (the commands running there with it, see ``GUARD``),
lets each job clean up what it made, and raises ``FleetInterrupted`` naming the state each device
was left in.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..console import Log
from ..errors import EdgepackError, ExitCode
from ..runtime_dist import MIN_PYTHON
from . import QUIET, DeviceError
from .inventory import Device
from .progress import DeviceProgress, FleetProgress
from .remote import LAYOUT, PROBE, RUNTIME_PACKAGES
from .transport import Completed, Transport, open_transport


@dataclass
class Session:
    device: Device
    transport: Transport
    info: dict[str, Any]  # what PROBE printed on the device
    progress: DeviceProgress = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.progress is None:
            self.progress = DeviceProgress(None, self.device.name)

    @classmethod
    async def open(cls, device: Device, *, trust_new_host: bool = False, log: Log = QUIET,
                   progress: DeviceProgress | None = None, allow_old_python: bool = False) -> Session:
        """Connect and probe. A Python older than the runtime supports is refused here in one line
        (``allow_old_python``: kept, for ``devices --check`` to show)."""
        transport = await open_transport(device, trust_new_host=trust_new_host, log=log)
        try:
            session = cls(device, transport, {}, progress)
            await session.probe()
            too_old = session.python_too_old()
            if too_old and not allow_old_python:
                raise DeviceError(too_old)
            return session
        except BaseException:
            await transport.close()
            raise

    async def probe(self) -> dict[str, Any]:
        """Read Python, packages, CPU, the account, the release layout's home and the installed runtime
        on the device (again after --setup)."""
        self.info = await self._probe(self.device.python)
        if self.info.get("too_old"):  # the probe stopped at the version check: nothing else was read
            return self.info
        if self.info.get("runtime_python"):  # the installed runtime: its packages are what counts
            base = self.info
            self.info = {**await self._probe(base["runtime_python"]), "base_python": self.device.python,
                         "base_version": base["python"], "base_packages": base.get("packages") or {}}
        if self.device.cpu_flags:  # an emulated CPU: /proc/cpuinfo under the emulator is the host's
            self.info["flags_read"] = self.info["flags"]
            self.info["flags"] = sorted(self.device.cpu_flags)
        return self.info

    async def _probe(self, python: str) -> dict[str, Any]:
        argv = [*self.device.command_prefix, python, "-I", "-c", PROBE, self.device.remote_dir,
                self.device.runtime_dir or ""]
        done = await self.transport.run(argv, timeout=300)
        if done.returncode != 0:
            raise DeviceError(f"{self.device.name}: {python} did not run on the device "
                              f"({done.last_error()}); set python = \"...\" in the inventory to the device's Python")
        try:
            return json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise DeviceError(f"{self.device.name}: the probe printed no JSON ({done.last_error()})") from None

    # ------------------------------------------------------------------------------- what is there

    @property
    def python(self) -> list[str]:
        """The argv that starts the device's Python: the installed runtime's once it exists."""
        return [*self.device.command_prefix, self.info.get("runtime_python") or self.device.python]

    @property
    def remote_dir(self) -> str:
        return str(self.info["remote_dir"])

    @property
    def runtime_dir(self) -> str:
        """Where the runtime, the trusted keys and the rollback state live on the device (``RuntimeDir``)."""
        return str(self.info["runtime_dir"])

    def python_too_old(self) -> str | None:
        """One line when the device's Python is older than the runtime supports, else ``None``."""
        version = str(self.info.get("base_version") or self.info.get("python") or "0")
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if parts >= MIN_PYTHON:
            return None
        return (f"{self.device.name}: Python {version} ({self.device.python}) is older than "
                f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]}, the oldest the edgepack runtime supports; set python = \"...\" "
                "in the inventory to a newer Python on the device")

    def root(self, bundle_name: str) -> str:
        return posixpath.join(self.remote_dir, bundle_name)

    def missing_packages(self) -> list[str]:
        """Runtime packages the device's Python (the installed runtime's, once there) lacks; with
        ``signed_only``, ``cryptography`` too."""
        packages = self.info.get("packages") or {}
        needed = (*RUNTIME_PACKAGES, "cryptography") if self.device.signed_only else RUNTIME_PACKAGES
        return [n for n in needed if not packages.get(n)]

    def cpu(self) -> tuple[str, set[str]]:
        return str(self.info.get("arch")), set(self.info.get("flags") or ())

    def target_check(self) -> dict[str, Any]:
        return target_check(self.device, self.info)

    # ------------------------------------------------------------------------------------ commands

    async def runtime(self, *args: str, timeout: float | None = 600,
                      on_line: Callable[[str], None] | None = None) -> Completed:
        """Run ``python -m runtime_shim ARGS`` on the device with its installed runtime, isolated.

        The Python is ``<runtime_dir>/venv/bin/python`` (installed by ``deploy --setup`` from this
        machine's own ``runtime_shim``, never from a bundle), started with ``-I`` (no working
        directory, ``PYTHON*`` variables or user site on ``sys.path``) and ``-B`` (no byte code written
        anywhere, a release included), in the runtime directory: no file of a bundle can be imported,
        whatever the bundle holds. Pass bundle paths as absolute paths. ``DeviceError`` when no
        runtime is installed there; the caller reads ``returncode``, ``stdout`` and ``last_error()``.
        ``on_line`` gets each line of stderr as it comes (progress); a cancelled call stops the
        command on the device.

        Example:
            >>> await session.runtime("verify", "/srv/edgepack/tiny/current", "--keys", keys)  # doctest: +SKIP
            Completed(returncode=0, stdout='ok: 27 files match ...', stderr='')
        """
        python = self.info.get("runtime_python")
        if not python:
            raise DeviceError(f"{self.device.name}: no edgepack runtime in {self.runtime_dir} on the device; run "
                              f"`edgepack devices --setup --to {self.device.name}` (or deploy with --setup)")
        argv = [*self.device.command_prefix, python, "-I", "-B", "-m", "runtime_shim", *args]
        return await self.transport.run(argv, cwd=self.runtime_dir, timeout=timeout, on_line=on_line)

    async def layout(self, command: str, root: str, *args: str) -> dict[str, Any]:
        # The layout program needs only the standard library: the inventory's Python runs it even
        # where the runtime packages are missing.
        argv = [*self.device.command_prefix, self.device.python, "-I", "-c", LAYOUT, command, root, *args]
        done = await self.transport.run(argv, timeout=300)
        try:
            out = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out = None
        if done.returncode != 0 or out is None or (isinstance(out, dict) and "error" in out):
            reason = out["error"] if isinstance(out, dict) and "error" in out else done.last_error()
            if "No space left on device" in reason:
                raise DeviceError(f"{self.device.name}: no space left on the device under {root} ({command} of the "
                                  "release layout); free space there (see docs/FLEET.md for the room a device "
                                  "needs) and run again")
            raise DeviceError(f"{self.device.name}: {command} {root}: {reason}")
        return out

    def describe(self) -> str:
        return f"{self.device.name} ({self.device.address}, {shlex.join(self.python)})"

    async def close(self) -> None:
        await self.transport.close()


def target_check(device: Device, info: dict[str, Any]) -> dict[str, Any]:
    """The target edgepack detects from a device's CPU (as probed), and whether its profile says the same."""
    from .. import profiles, targets
    from ..errors import EdgepackError

    arch, flags = str(info.get("arch")), set(info.get("flags") or ())
    out: dict[str, Any] = {"profile": device.profile}
    try:
        out["detected_target"] = targets.detect(arch, flags).name
    except EdgepackError as e:
        out["detected_target"], out["detect_error"] = None, str(e)
    try:
        out["profile_target"] = profiles.load(device.profile).target
    except EdgepackError as e:
        out["profile_target"], out["profile_error"] = None, str(e)
    out["target_match"] = out["detected_target"] is not None and out["detected_target"] == out["profile_target"]
    return out


@dataclass
class Outcome:
    device: Device
    ok: bool
    value: Any = None
    error: str | None = None
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


class FleetInterrupted(EdgepackError):
    """Ctrl-C: every device's work was stopped; ``states`` says where each one was left."""

    exit_code = ExitCode.INTERRUPTED

    def __init__(self, states: dict[str, str]):
        self.states = states
        stopped = [n for n, s in states.items() if s.startswith("interrupted")]
        super().__init__(f"interrupted: {len(stopped)} device(s) stopped mid-way, "
                         f"{sum(s == 'not started' for s in states.values())} not started "
                         "(each device's state is above; nothing runs on them now)")


Job = Callable[[Session], Awaitable[Any]]


async def _one(device: Device, job: Job, sem: asyncio.Semaphore, trust_new_host: bool, log: Log,
               fleet: FleetProgress | None, allow_old_python: bool, left: dict[str, str]) -> Outcome:
    started = time.monotonic()
    progress = DeviceProgress(fleet, device.name)
    async with sem:
        session = None
        try:
            progress.state(f"connecting to {device.address}")
            session = await Session.open(device, trust_new_host=trust_new_host, log=log, progress=progress,
                                         allow_old_python=allow_old_python)
            progress.state(f"connected (Python {session.info.get('python')})")
            value = await job(session)
            if fleet is not None:
                fleet.finish(device.name, True, f"done ({time.monotonic() - started:.1f} s)")
            return Outcome(device, True, value, seconds=time.monotonic() - started, info=session.info)
        except asyncio.CancelledError:
            left[device.name] = f"interrupted while {progress.last}" + (
                f"; {progress.cleanup}" if getattr(progress, "cleanup", None) else "")
            if fleet is not None:
                fleet.state(device.name, left[device.name])
            raise
        except DeviceError as e:
            if fleet is not None:
                fleet.finish(device.name, False, str(e))
            return Outcome(device, False, error=str(e), seconds=time.monotonic() - started,
                           info=session.info if session else {})
        except Exception as e:  # one device's surprise must not take the others down
            if fleet is not None:
                fleet.finish(device.name, False, f"{type(e).__name__}: {e}")
            return Outcome(device, False, error=f"{device.name}: {type(e).__name__}: {e}",
                           seconds=time.monotonic() - started, info=session.info if session else {})
        finally:
            if session is not None:
                await session.close()


def run_devices(devices: Sequence[Device], job: Job, *, jobs: int = 8, trust_new_host: bool = False,
                log: Log = QUIET, progress: FleetProgress | None = None,
                allow_old_python: bool = False) -> list[Outcome]:
    """Run ``job`` on every device in parallel (``jobs`` at a time); one ``Outcome`` per device, in order.
    ``progress`` shows each device's state as it changes (``session.progress`` in a job).
    ``FleetInterrupted`` on Ctrl-C, after every job has stopped and cleaned up."""
    left: dict[str, str] = {}

    async def main() -> list[Outcome]:
        sem = asyncio.Semaphore(max(1, jobs))
        return list(await asyncio.gather(*(_one(d, job, sem, trust_new_host, log, progress, allow_old_python, left)
                                           for d in devices)))

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        states = {d.name: left.get(d.name) or _settled(progress, d.name) for d in devices}
        if progress is not None:
            progress.close()
        else:
            for name, state in states.items():
                print(f"{name}: {state}", file=sys.stderr)
        raise FleetInterrupted(states) from None


def run_shown(what: str, devices: Sequence[Device], job: Callable[[Session, Log], Awaitable[Any]], *,
              jobs: int = 8, trust_new_host: bool = False, allow_old_python: bool = False,
              progress: Callable[[str, list[str]], FleetProgress] | None = FleetProgress,
              log: Log = QUIET) -> list[Outcome]:
    """``run_devices`` with ``progress(what, names)`` shown while it runs and closed after (Ctrl-C too);
    ``job(session, log)`` logs through it. ``progress=None``: no display, ``log`` as given."""
    shown = progress(what, [d.name for d in devices]) if progress else None
    say = shown.log if shown else log
    try:
        return run_devices(devices, lambda session: job(session, say), jobs=jobs, trust_new_host=trust_new_host,
                           log=say, progress=shown, allow_old_python=allow_old_python)
    finally:
        if shown:
            shown.close()


def _settled(progress: FleetProgress | None, name: str) -> str:
    state = progress.states.get(name, "queued") if progress is not None else "queued"
    return "not started" if state == "queued" else state
