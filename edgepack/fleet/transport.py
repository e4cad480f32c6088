"""How commands run and files travel to a device: over SSH (asyncssh) or on this machine.

SSH follows OpenSSH's conventions. The host key is checked against ``known_hosts`` by asyncssh; a
host that is not there is refused unless ``trust_new_host`` (then the key is fetched, its SHA256
fingerprint printed and recorded, and the connection made against the recorded key); a host whose
key differs from the recorded one is always refused, naming the host and the fingerprint it
presented. Keys come from the agent or the inventory's ``key_file``; password and keyboard-interactive
authentication are off. ``~/.ssh/config`` (or the inventory's ``ssh_config``) supplies what the
inventory leaves out (HostName, Port, User, IdentityFile of a Host alias).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import QUIET, DeviceError
from .inventory import Device
from .remote import GUARD

Progress = Callable[[int], None]  # called with bytes sent since the last call
OnLine = Callable[[str], None]  # called with each line the command writes to stderr, as it comes


class ConnectionDropped(DeviceError):
    """The link to the device went while a command ran: its output so far is not its answer."""


class UploadError(DeviceError):
    """An upload failed; ``kind`` says how: ``"lost"`` (the connection dropped), ``"denied"``, or
    ``"failed"`` (SFTP's catch-all, which is also what OpenSSH's server answers to a full disk)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str

    def last_error(self) -> str:
        lines = [ln for ln in (self.stderr or self.stdout).strip().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else f"exit status {self.returncode}, no output"


class Transport:
    """What the fleet needs of a device connection (``SSHTransport``, ``LocalTransport``)."""

    device: Device

    async def run(self, argv: Sequence[str], *, cwd: str | None = None, timeout: float | None = None,
                  on_line: OnLine | None = None) -> Completed:
        """Run ``argv`` on the device. Cancelled (Ctrl-C), timed out or cut off, the command and
        everything it started there are stopped: nothing keeps running on the device."""
        raise NotImplementedError

    async def put(self, local: Path, remote: str, progress: Progress | None = None) -> None:
        """Copy one file to ``remote`` (its directory exists)."""
        raise NotImplementedError

    async def makedirs(self, remote: str) -> None:
        raise NotImplementedError

    async def get(self, remote: str, local: Path) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return None


# ------------------------------------------------------------------------------------------- local


def _clean_env() -> dict[str, str]:
    # The device's Python must see its own packages, not this process's virtual environment.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


class LocalTransport(Transport):
    """A directory and a Python on this machine (a runtime-only virtual environment is a device)."""

    def __init__(self, device: Device):
        self.device = device

    async def run(self, argv: Sequence[str], *, cwd: str | None = None, timeout: float | None = None,
                  on_line: OnLine | None = None) -> Completed:
        try:
            # Its own process group: a Ctrl-C here reaches this process only, which then stops the
            # whole group (the bench's memory probe included) and reports what it left.
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=cwd, env=_clean_env(), stdin=subprocess.DEVNULL, start_new_session=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            return Completed(127, "", f"{argv[0]}: {e.strerror or e}")
        out: list[str] = []
        err: list[str] = []
        try:
            await asyncio.wait_for(asyncio.gather(_pump(proc.stdout, out, None), _pump(proc.stderr, err, on_line),
                                                  proc.wait()), timeout)
        except asyncio.TimeoutError:
            await _stop_group(proc)
            raise DeviceError(f"{self.device.name}: {shlex.join(argv[:4])}... did not finish in {timeout:g} s") from None
        except BaseException:
            await _stop_group(proc)
            raise
        return Completed(proc.returncode or 0, "".join(out), "".join(err))

    async def put(self, local: Path, remote: str, progress: Progress | None = None) -> None:
        def copy() -> None:
            with open(local, "rb") as src, open(remote, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    if progress:
                        progress(len(chunk))

        try:
            await asyncio.to_thread(copy)
        except OSError as e:
            kind = "full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "denied" if e.errno == errno.EACCES else "failed"
            raise UploadError(f"{self.device.name}: upload of {local.name} failed ({e.strerror or e})", kind) from None

    async def makedirs(self, remote: str) -> None:
        os.makedirs(remote, exist_ok=True)

    async def get(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(shutil.copyfile, remote, local)


def describe(argv: Sequence[str]) -> str:
    """A command as a person would name it: ``runtime_shim bench``, ``layout state``, ``python3 -m venv``.

    Examples:
        >>> describe(["/rt/venv/bin/python", "-I", "-B", "-m", "runtime_shim", "bench", "/srv/x/current"])
        'runtime_shim bench'
        >>> describe(["python3", "-I", "-c", "import sys", "state", "/srv/x"])
        'python3 -c ... state'
    """
    argv = list(argv)
    if "runtime_shim" in argv:
        return " ".join(argv[argv.index("runtime_shim"):][:2])
    if "-c" in argv:
        i = argv.index("-c")
        return " ".join([os.path.basename(argv[0]), "-c", "...", *argv[i + 2:i + 3]])
    return " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(argv[:3]))


async def _pump(stream: Any, sink: list[str], on_line: OnLine | None) -> None:
    while True:
        line = await stream.readline()
        if not line:
            return
        text = line.decode(errors="replace") if isinstance(line, bytes) else line
        sink.append(text)
        if on_line and text.strip():
            on_line(text.rstrip("\n"))


async def _stop_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


# --------------------------------------------------------------------------------------------- ssh


def known_hosts_name(host: str, port: int) -> str:
    """The host pattern OpenSSH writes: ``host`` on port 22, ``[host]:port`` elsewhere."""
    return host if port == 22 else f"[{host}]:{port}"


def _known_keys(path: Path, host: str, port: int) -> list[Any]:
    """Keys ``known_hosts`` holds for ``host`` at ``port`` (empty when the file or the host is absent)."""
    import asyncssh

    if not path.is_file():
        return []
    try:
        matched = asyncssh.read_known_hosts(str(path)).match(host, "", port)
    except (OSError, ValueError, asyncssh.KeyImportError) as e:
        raise DeviceError(f"{path}: cannot read known_hosts ({e}); fix or remove the broken line") from None
    return list(matched[0])


def _fingerprint(key: Any) -> str:
    return f"{key.get_algorithm()} {key.get_fingerprint('sha256')}"


class SSHTransport(Transport):
    """One asyncssh connection (and one SFTP session) to a device."""

    def __init__(self, device: Device, conn: Any, sftp: Any):
        self.device, self._conn, self._sftp = device, conn, sftp

    @classmethod
    async def open(cls, device: Device, *, trust_new_host: bool = False,
                   log: Callable[[str], None] = QUIET) -> SSHTransport:
        import asyncssh

        known_hosts = Path(device.known_hosts).expanduser()
        options: dict[str, Any] = {"password_auth": False, "kbdint_auth": False,
                                   "connect_timeout": device.connect_timeout}
        if device.ssh_config:
            options["config"] = [str(Path(device.ssh_config).expanduser())]
        if device.port:
            options["port"] = device.port
        if device.user:
            options["username"] = device.user
        if device.key_file:
            options["client_keys"] = [str(Path(device.key_file).expanduser())]
            options["agent_path"] = None  # the named key only, as ssh -o IdentitiesOnly=yes
        tunnel = None
        if device.jump:
            tunnel = await cls._connect(device, device.jump, {k: v for k, v in options.items()
                                                              if k not in ("port", "username")},
                                        known_hosts, trust_new_host, log, what="jump host")
            options["tunnel"] = tunnel
        conn = await cls._connect(device, device.host or "", options, known_hosts, trust_new_host, log)
        try:
            sftp = await conn.start_sftp_client()
        except (asyncssh.Error, OSError) as e:
            conn.close()
            raise DeviceError(f"{device.name}: SFTP refused by {device.address} ({e}); enable the sftp "
                              "subsystem in the device's sshd_config") from None
        return cls(device, conn, sftp)

    @staticmethod
    async def _connect(device: Device, target: str, options: dict[str, Any], known_hosts: Path,
                       trust_new_host: bool, log: Callable[[str], None], what: str = "device") -> Any:
        import asyncssh

        host, opts = target, dict(options)
        if what == "jump host":  # "[user@]host[:port]" or an alias
            user, _, rest = target.rpartition("@")
            host, _, port_s = rest.partition(":")
            if user:
                opts["username"] = user
            if port_s:
                opts["port"] = int(port_s)

        async def attempt() -> Any:
            # An absent file trusts nothing (b""), rather than falling back to ~/.ssh/known_hosts.
            return await asyncssh.connect(host, known_hosts=str(known_hosts) if known_hosts.is_file() else b"",
                                          **opts)

        where = f"{device.name}: {what} {host}" + (f":{opts['port']}" if opts.get("port") else "")
        try:
            try:
                return await attempt()
            except asyncssh.HostKeyNotVerifiable:
                pass
            # Name what was presented: fetch the key again (no authentication), compare with the file.
            key_opts = {k: opts[k] for k in ("port", "config", "tunnel") if k in opts}
            key = await asyncio.wait_for(asyncssh.get_server_host_key(host, **key_opts), device.connect_timeout)
            # known_hosts records the HostName a ~/.ssh/config alias resolves to (or its HostKeyAlias).
            resolved = asyncssh.SSHClientConnectionOptions(host=host, **{k: opts[k] for k in ("port", "config")
                                                                         if k in opts})
            key_host, key_port = resolved.host_key_alias or resolved.host, int(resolved.port or 22)
            pattern = known_hosts_name(key_host, key_port)
            if key is None:
                raise DeviceError(f"{where}: presented no host key; refusing to connect")
            if _known_keys(known_hosts, key_host, key_port):
                raise DeviceError(
                    f"{where}: HOST KEY CHANGED: {pattern} now presents {_fingerprint(key)}, which is not the key "
                    f"recorded in {known_hosts}; refusing to connect. If the device was re-installed, check the "
                    f"fingerprint on its console and remove the old entry: ssh-keygen -R '{pattern}' -f {known_hosts}")
            if not trust_new_host:
                raise DeviceError(
                    f"{where}: {pattern} is not in {known_hosts} (it presents {_fingerprint(key)}); check the "
                    "fingerprint and re-run with --trust-new-host to record it")
            known_hosts.parent.mkdir(parents=True, exist_ok=True)
            algorithm, blob = key.export_public_key("openssh").decode().split()[:2]
            with open(known_hosts, "a") as f:
                f.write(f"{pattern} {algorithm} {blob}\n")
            with contextlib.suppress(OSError):
                os.chmod(known_hosts, 0o600)
            log(f"{device.name}: trusted new host {pattern}: {_fingerprint(key)} (recorded in {known_hosts})")
            return await attempt()
        except DeviceError:
            raise
        except asyncssh.PermissionDenied as e:
            raise DeviceError(f"{where}: login refused ({e.reason}); check user and key_file in the inventory, or "
                              "add the key to the agent (ssh-add) and its public half to the device's "
                              "authorized_keys") from None
        except asyncssh.HostKeyNotVerifiable as e:
            raise DeviceError(f"{where}: host key not verified ({e.reason}); check {known_hosts}") from None
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as e:
            errno = getattr(e, "errno", None)
            reason = (os.strerror(errno).lower() if isinstance(errno, int) else getattr(e, "reason", None) or str(e)
                      or ("no answer in time" if isinstance(e, asyncio.TimeoutError) else type(e).__name__))
            raise DeviceError(f"{where}: unreachable ({reason})") from None

    def _guarded(self, argv: Sequence[str]) -> list[str]:
        # OpenSSH leaves a command without a terminal running when its channel closes (Ctrl-C here,
        # a dropped link): GUARD runs it in its own process group and stops that group when the
        # channel's stdin closes. Under a command prefix the device's Python is the prefix's.
        if self.device.command_prefix:
            return list(argv)
        return [self.device.python, "-I", "-c", GUARD, *argv]

    async def run(self, argv: Sequence[str], *, cwd: str | None = None, timeout: float | None = None,
                  on_line: OnLine | None = None) -> Completed:
        import asyncssh

        command = shlex.join(self._guarded(argv))
        if cwd:
            command = f"cd {shlex.quote(cwd)} && {command}"
        what = describe(argv)
        out: list[str] = []
        err: list[str] = []
        proc = None
        try:
            proc = await self._conn.create_process(command, encoding="utf-8", errors="replace")
            await asyncio.wait_for(asyncio.gather(_pump(proc.stdout, out, None), _pump(proc.stderr, err, on_line),
                                                  proc.wait_closed()), timeout)
        except asyncio.TimeoutError:
            proc and proc.close()
            raise DeviceError(f"{self.device.name}: {shlex.join(argv[:4])}... did not finish in {timeout:g} s") from None
        except (asyncssh.Error, OSError) as e:
            raise ConnectionDropped(f"{self.device.name}: the connection to {self.device.address} dropped while running "
                              f"{what} ({getattr(e, 'reason', None) or e or type(e).__name__})") from None
        except AssertionError:
            # asyncssh asserts on a channel whose connection closed while it opened: a dropped link too.
            if not self._conn.is_closed():
                raise
            raise ConnectionDropped(f"{self.device.name}: the connection to {self.device.address} dropped while "
                                    f"opening a channel for {what}") from None
        except BaseException:
            if proc is not None:
                proc.close()  # the channel closes: GUARD stops the command on the device
            raise
        if proc.exit_status is None and proc.exit_signal is None:
            # No exit status: the link went, not the command (its output so far is not its answer).
            raise ConnectionDropped(f"{self.device.name}: the connection to {self.device.address} dropped while running "
                              f"{what}; run the command again when the device is reachable")
        status = proc.exit_status if proc.exit_status is not None and proc.exit_status >= 0 else 255
        return Completed(status, "".join(out), "".join(err))

    async def put(self, local: Path, remote: str, progress: Progress | None = None) -> None:
        import asyncssh

        sent = [0]

        def handler(_src: bytes, _dst: bytes, copied: int, _total: int) -> None:
            if progress:
                progress(copied - sent[0])
            sent[0] = copied

        try:
            await self._sftp.put(str(local), remote, progress_handler=handler)
        except (asyncssh.SFTPConnectionLost, asyncssh.ConnectionLost, asyncssh.DisconnectError,
                ConnectionError) as e:
            raise UploadError(f"{self.device.name}: the connection to {self.device.address} dropped during the upload "
                              f"({getattr(e, 'reason', None) or type(e).__name__})", "lost") from None
        except asyncssh.SFTPPermissionDenied:
            raise UploadError(f"{self.device.name}: permission denied writing {remote}; check that the login account "
                              "owns remote_dir", "denied") from None
        except (asyncssh.Error, OSError) as e:
            kind = "full" if isinstance(e, (asyncssh.SFTPNoSpaceOnFilesystem, asyncssh.SFTPQuotaExceeded)) else "failed"
            raise UploadError(f"{self.device.name}: upload of {local.name} failed ({getattr(e, 'reason', e)})",
                              kind) from None

    async def makedirs(self, remote: str) -> None:
        await self._sftp.makedirs(remote, exist_ok=True)

    async def get(self, remote: str, local: Path) -> None:
        import asyncssh

        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            await self._sftp.get(remote, str(local))
        except (asyncssh.Error, OSError) as e:
            raise DeviceError(f"{self.device.name}: download of {remote} failed ({getattr(e, 'reason', e)})") from None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self._sftp.exit()
        self._conn.close()
        with contextlib.suppress(Exception):
            await self._conn.wait_closed()


async def open_transport(device: Device, *, trust_new_host: bool = False,
                         log: Callable[[str], None] = QUIET) -> Transport:
    if device.transport == "local":
        return LocalTransport(device)
    return await SSHTransport.open(device, trust_new_host=trust_new_host, log=log)
