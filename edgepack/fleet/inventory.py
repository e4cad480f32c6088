"""``devices.toml``: the inventory, one table per device.

    [defaults]                       # optional: values every device starts from
    known_hosts = "~/.ssh/known_hosts"
    remote_dir = "~/edgepack"

    [devices.edge-1]
    host = "edge-1.lan"              # a host name, an address, or a Host alias of ~/.ssh/config
    user = "pi"                      # default: ~/.ssh/config's User, else the local user
    key_file = "~/.ssh/id_ed25519"   # default: the SSH agent (and ~/.ssh/config's IdentityFile)
    python = "/usr/bin/python3"
    profile = "raspberry-pi-5"
    groups = ["kitchen", "pi5"]      # optional: --to kitchen selects every device of the group

    [devices.haswell-emulated]
    transport = "local"              # a directory and a Python on this machine
    python = "/opt/device-venv/bin/python"
    command_prefix = "qemu-x86_64-static -cpu Haswell"   # an emulated CPU: accuracy, not latency
    cpu_flags = ["avx2", "fma", "sse4_2"]                 # the emulated CPU's (cpuinfo shows the host's)
    remote_dir = "/var/tmp/edgepack-haswell"
    profile = "edge-x86-2core"

No passwords: keys come from the agent or a key file. The file is found by ``--inventory``, else
``$EDGEPACK_DEVICES``, else ``./devices.toml``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomllib

from ..errors import EdgepackError

INVENTORY_ENV = "EDGEPACK_DEVICES"
DEFAULT_INVENTORY = "devices.toml"
TRANSPORTS = ("ssh", "local")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SECRET_KEYS = ("password", "passphrase", "pass")


@dataclasses.dataclass(frozen=True)
class Device:
    """One device of the inventory. Paths keep ``~``: a remote ``~`` is the login user's home there."""

    name: str
    profile: str
    transport: str = "ssh"
    host: str | None = None
    port: int | None = None  # None: ~/.ssh/config's Port, else 22
    user: str | None = None  # None: ~/.ssh/config's User, else the local user name
    key_file: str | None = None  # None: the SSH agent and ~/.ssh/config's IdentityFile
    jump: str | None = None  # a jump host: "[user@]host[:port]" or a ~/.ssh/config alias
    known_hosts: str = "~/.ssh/known_hosts"
    ssh_config: str | None = None  # None: ~/.ssh/config when it exists
    python: str = "python3"
    remote_dir: str = "~/edgepack"
    command_prefix: tuple[str, ...] = ()  # argv put before the Python (an emulator)
    cpu_flags: tuple[str, ...] = ()  # flags to use instead of the device's /proc/cpuinfo (emulated CPUs)
    signed_only: bool = False  # refuse unsigned bundles; verify signatures here and on the device
    # Public keys (a .pub file or a directory of them, on this machine) the device trusts: deploy checks
    # a signed_only device's bundles against them before sending a byte, and `--setup` (or `devices
    # --trust-key`) installs them into the runtime directory, where the device checks again.
    trusted_keys: str | None = None
    # The installed runtime, its keys and its rollback state, outside remote_dir and every release
    # (None: /opt/edgepack-runtime when deploy logs in as root, else ~/.local/share/edgepack-runtime).
    runtime_dir: str | None = None
    connect_timeout: float = 15.0
    groups: tuple[str, ...] = ()  # names --to accepts for every device of the group (edgepack rollout --to GROUP)
    # The model service the device runs (`runtime_shim serve`, systemd unit NAME): deploy and --rollback
    # signal it after a switch; --setup writes its unit. service_status: its status file, when it was
    # started otherwise than by that unit (default /run/NAME/status.json).
    service: str | None = None
    service_status: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or self.name == "all":
            raise ValueError(f"device name {self.name!r} is not valid: use letters, digits, '.', '_' and '-' "
                             "(and not 'all', which --to reserves)")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport={self.transport!r} is not valid; choose one of: {', '.join(TRANSPORTS)}")
        if self.transport == "ssh" and not self.host:
            raise ValueError("transport 'ssh' needs host = \"...\" (an address, a name, or a ~/.ssh/config alias)")
        if self.transport == "local" and (self.host or self.jump or self.port):
            raise ValueError("transport 'local' takes no host, port or jump; remove them or set transport = \"ssh\"")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"port={self.port} must be 1..65535")
        if not self.python:
            raise ValueError("python must name the device's Python (e.g. \"/usr/bin/python3\")")
        if not self.remote_dir:
            raise ValueError("remote_dir must name a directory on the device")
        if self.signed_only and not self.trusted_keys:
            raise ValueError("signed_only = true needs trusted_keys = \"...\" (the .pub file or directory of the "
                             "keys this device trusts): deploy checks signatures against them before sending a byte")
        if self.service is not None and not _NAME.match(self.service):
            raise ValueError(f"service={self.service!r} is not a valid unit name: use letters, digits, '.', '_' and '-'")
        if self.service_status is not None and not self.service:
            raise ValueError("service_status needs service = \"NAME\" (the service whose status file it is)")
        if self.connect_timeout <= 0:
            raise ValueError(f"connect_timeout={self.connect_timeout} must be > 0 seconds")
        bad = [g for g in self.groups if not _NAME.match(g) or g == "all"]
        if bad:
            raise ValueError(f"groups: {bad[0]!r} is not a valid group name: use letters, digits, '.', '_' and '-' "
                             "(and not 'all')")

    @property
    def emulated(self) -> bool:
        """A device whose Python runs under a command prefix (QEMU): its timings are the emulator's."""
        return bool(self.command_prefix)

    @property
    def address(self) -> str:
        """What the device is, in one short string, for tables and messages."""
        if self.transport == "local":
            return f"local:{self.remote_dir}"
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{user}{self.host}{port}"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["command_prefix"] = shlex.join(self.command_prefix) if self.command_prefix else ""
        out["cpu_flags"] = list(self.cpu_flags)
        out["groups"] = list(self.groups)
        return {k: v for k, v in out.items() if v not in (None, "", [])}


@dataclasses.dataclass(frozen=True)
class Inventory:
    path: Path
    devices: tuple[Device, ...]

    def names(self) -> list[str]:
        return [d.name for d in self.devices]

    def groups(self) -> dict[str, list[Device]]:
        """``{group: [devices]}`` in inventory order."""
        out: dict[str, list[Device]] = {}
        for d in self.devices:
            for g in d.groups:
                out.setdefault(g, []).append(d)
        return out

    def select(self, spec: str | None) -> list[Device]:
        """``None``/``"all"``: every device; else comma-separated device or group names, in the order
        given (a group's devices in inventory order), each device once."""
        if spec is None or spec.strip() == "all":
            return list(self.devices)
        by_name = {d.name: [d] for d in self.devices}
        by_name.update(self.groups())
        wanted = [s.strip() for s in spec.split(",") if s.strip()]
        unknown = [n for n in wanted if n not in by_name]
        if unknown or not wanted:
            groups = f"; groups: {', '.join(self.groups())}" if self.groups() else ""
            raise EdgepackError(f"--to {spec!r}: unknown device {', '.join(unknown) or '(none given)'}; "
                                f"{self.path} has: {', '.join(self.names()) or 'no devices'}{groups} (or pass --to all)")
        return list({d.name: d for n in wanted for d in by_name[n]}.values())


def _field_types() -> dict[str, tuple[type, ...]]:
    hints = {"name": (str,), "profile": (str,), "transport": (str,), "host": (str,), "port": (int,),
             "user": (str,), "key_file": (str,), "jump": (str,), "known_hosts": (str,), "ssh_config": (str,),
             "python": (str,), "remote_dir": (str,), "command_prefix": (str, list), "cpu_flags": (list,),
             "signed_only": (bool,), "trusted_keys": (str,), "runtime_dir": (str,),
             "connect_timeout": (int, float), "groups": (list,), "service": (str,), "service_status": (str,)}
    assert set(hints) == {f.name for f in dataclasses.fields(Device)}
    return hints


def _device(name: str, table: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> Device:
    types = _field_types()
    data = {**defaults, **table}
    secrets = sorted(k for k in data if k.lower() in _SECRET_KEYS)
    if secrets:
        raise EdgepackError(f"{where}: {', '.join(secrets)}: passwords do not belong in the inventory; "
                            "use key_file = \"...\" or the SSH agent (ssh-add)")
    unknown = sorted(set(data) - set(types) - {"name"})
    if unknown:
        raise EdgepackError(f"{where}: unknown key {', '.join(unknown)}; valid keys: "
                            f"{', '.join(k for k in types if k != 'name')}")
    if "name" in table and table["name"] != name:
        raise EdgepackError(f"{where}: name = {table['name']!r} differs from the table's name; drop the key "
                            f"or rename the table to [devices.{table['name']}]")
    for key, value in data.items():
        ok = types[key]
        if isinstance(value, bool) and bool not in ok:
            ok = ()
        if not isinstance(value, ok):
            want = " or ".join({str: "a string", int: "an integer", float: "a number", bool: "true or false",
                                list: "a list"}[t] for t in types[key])
            raise EdgepackError(f"{where}: {key} must be {want}, got {value!r}")
    if "profile" not in data:
        raise EdgepackError(f"{where}: missing profile = \"...\" (the device profile it belongs to; "
                            "`edgepack profiles` lists them)")
    prefix = data.get("command_prefix", ())
    data["command_prefix"] = tuple(shlex.split(prefix) if isinstance(prefix, str) else map(str, prefix))
    data["cpu_flags"] = tuple(str(f) for f in data.get("cpu_flags", ()))
    if not all(isinstance(g, str) for g in data.get("groups", ())):
        raise EdgepackError(f"{where}: groups must be a list of names, e.g. groups = [\"kitchen\", \"pi5\"]")
    data["groups"] = tuple(dict.fromkeys(data.get("groups", ())))
    data["connect_timeout"] = float(data.get("connect_timeout", 15.0))
    data.pop("name", None)
    try:
        return Device(name=name, **data)
    except ValueError as e:
        raise EdgepackError(f"{where}: {e}") from None


def inventory_path(path: str | os.PathLike | None = None) -> Path:
    """The inventory file: ``path``, else ``$EDGEPACK_DEVICES``, else ``./devices.toml``."""
    return Path(path or os.environ.get(INVENTORY_ENV) or DEFAULT_INVENTORY).expanduser()


def load_inventory(path: str | os.PathLike | None = None, *, check_profiles: bool = True) -> Inventory:
    """Parse and validate ``devices.toml``; every error is one line naming the file, the device and the fix.

    Example:
        >>> inv = load_inventory("devices.toml")  # doctest: +SKIP
        >>> [d.name for d in inv.select("all")]  # doctest: +SKIP
        ['edge-1', 'haswell-emulated']
    """
    file = inventory_path(path)
    if not file.is_file():
        raise EdgepackError(f"{file}: no inventory; write one table per device ([devices.NAME] with host, user, "
                            f"python, profile; see docs/FLEET.md) or pass --inventory FILE")
    try:
        data = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as e:
        raise EdgepackError(f"{file}: not valid TOML ({e})") from None
    extra = sorted(set(data) - {"defaults", "devices"})
    if extra:
        raise EdgepackError(f"{file}: unknown top-level key {', '.join(extra)}; use [defaults] and [devices.NAME] "
                            "tables")
    defaults = data.get("defaults", {})
    devices = data.get("devices", {})
    if not isinstance(defaults, dict) or not isinstance(devices, dict):
        raise EdgepackError(f"{file}: [defaults] and [devices.NAME] must be tables")
    if "name" in defaults:
        raise EdgepackError(f"{file}: [defaults] cannot set name; each device is named by its table")
    if not devices:
        raise EdgepackError(f"{file}: no devices; add a [devices.NAME] table per device")
    out = []
    for name, table in devices.items():
        where = f"{file}: [devices.{name}]"
        if not isinstance(table, dict):
            raise EdgepackError(f"{where}: must be a table of keys (host, python, profile, ...)")
        out.append(_device(name, table, defaults, where))
    clash = sorted({g for d in out for g in d.groups} & {d.name for d in out})
    if clash:
        raise EdgepackError(f"{file}: {clash[0]!r} names both a device and a group; rename one (--to would be ambiguous)")
    if check_profiles:
        from .. import profiles

        known = profiles.available()
        for d in out:
            if d.profile not in known and not d.profile.endswith(".toml"):
                raise EdgepackError(f"{file}: [devices.{d.name}] profile '{d.profile}' is not a known profile; "
                                    f"known: {', '.join(known)} (or add profiles/{d.profile}.toml)")
    return Inventory(file, tuple(out))


def format_devices(devices: Sequence[Device]) -> str:
    """The inventory as a table (``edgepack devices``)."""
    rows = [("device", "transport", "address", "python", "remote dir", "profile", "notes")]
    for d in devices:
        notes = []
        if d.jump:
            notes.append(f"via {d.jump}")
        if d.emulated:
            notes.append(f"emulated: {shlex.join(d.command_prefix)}")
        if d.signed_only:
            notes.append("signed bundles only")
        if d.key_file:
            notes.append(f"key {d.key_file}")
        if d.groups:
            notes.append(f"groups {', '.join(d.groups)}")
        rows.append((d.name, d.transport, d.address, d.python, d.remote_dir, d.profile, "; ".join(notes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
