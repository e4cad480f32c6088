"""Instruction-set targets as data (``targets/*.toml``): how to quantize for a CPU family and how to
recognise it from the CPU's flags. Adding a CPU family is adding a file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edgepack.config import ConfigBase, QuantSettings
from edgepack.errors import EdgepackError
from edgepack.resources import data_files
from runtime_shim.tune import cpu_flags  # the device runtime detects the same way

SEARCH_PATH_ENV = "EDGEPACK_TARGETS_PATH"  # extra directories of target files, os.pathsep-separated


@dataclasses.dataclass(frozen=True)
class Target(ConfigBase):
    name: str = ""
    description: str = ""
    arch: str = "x86_64"  # platform.machine() family: x86_64 or arm64
    requires_flags: tuple[str, ...] = ()  # every one of these must be present
    any_flags: tuple[str, ...] = ()  # at least one of these (when given)
    priority: int = 0  # among matching targets, detection picks the highest
    quantize: QuantSettings = dataclasses.field(default_factory=QuantSettings)

    def __post_init__(self) -> None:
        if self.arch not in ("x86_64", "arm64"):
            raise ValueError(f"arch={self.arch!r} is not valid; choose one of: x86_64, arm64")

    def matches(self, arch: str, flags: set[str]) -> bool:
        return (arch == self.arch and set(self.requires_flags) <= flags
                and (not self.any_flags or bool(set(self.any_flags) & flags)))

    def missing_flags(self, flags: set[str]) -> list[str]:
        missing = sorted(set(self.requires_flags) - flags)
        if self.any_flags and not set(self.any_flags) & flags:
            missing.append(" or ".join(self.any_flags))
        return missing

    def matched_flags(self, flags: set[str]) -> list[str]:
        """The identifying flags this CPU has (for ``edgepack targets --detect``)."""
        return sorted((set(self.requires_flags) | set(self.any_flags)) & flags)

    def manifest_entry(self) -> dict:
        """What a bundle records about its target, so the device can check its own CPU against it
        (``runtime_shim.tune`` and ``host_warning`` read these keys)."""
        return {"name": self.name, "arch": self.arch, "requires_flags": list(self.requires_flags),
                "any_flags": list(self.any_flags)}


def available() -> dict[str, Path]:
    """Target names (file stems) to files; earlier search directories win."""
    return data_files("targets", SEARCH_PATH_ENV)


def load(name: str) -> Target:
    files = available()
    path = Path(name) if name.endswith(".toml") else files.get(name)
    if path is None or not path.is_file():
        raise EdgepackError(f"unknown target '{name}'; known targets: {', '.join(files)} (or add targets/{name}.toml)")
    try:
        target = Target.from_toml(path)
    except (ValueError, TypeError) as e:
        raise EdgepackError(f"{path}: {e}") from None
    return target if target.name else target.replace(name=path.stem)


def detect(arch: str | None = None, flags: set[str] | None = None) -> Target:
    """The highest-priority target whose flags this CPU (or the given ``arch``/``flags``) has."""
    if arch is None or flags is None:
        host_arch, host_flags = cpu_flags()
        arch = host_arch if arch is None else arch
        flags = host_flags if flags is None else flags
    matching = [t for t in (load(n) for n in available()) if t.matches(arch, flags)]
    if not matching:
        raise EdgepackError(f"no target in targets/ matches this CPU ({arch}); pass --target NAME or add a target file")
    return max(matching, key=lambda t: (t.priority, len(t.requires_flags)))


def all_targets() -> list[Target]:
    """Every target file, loaded (a broken file raises its one-line error)."""
    return [load(n) for n in available()]


def host_warning(target: Target | dict, arch: str | None = None, flags: set[str] | None = None) -> str | None:
    """One line when this CPU (or the given ``arch``/``flags``) lacks what ``target`` was built for,
    else None. A bundle still runs on a CPU without its flags (MLAS falls back to slower kernels, and
    on x86 without VNNI a U8S8 model built at full range may saturate), so this warns, not fails."""
    if isinstance(target, dict):
        target = Target(name=str(target.get("name", "?")), arch=str(target.get("arch", "x86_64")),
                        requires_flags=tuple(target.get("requires_flags", ())),
                        any_flags=tuple(target.get("any_flags", ())))
    if arch is None or flags is None:
        host_arch, host_flags = cpu_flags()
        arch = host_arch if arch is None else arch
        flags = host_flags if flags is None else flags
    if arch != target.arch:
        return f"warning: bundle built for target '{target.name}' ({target.arch}) but this CPU is {arch}"
    missing = target.missing_flags(flags)
    if missing:
        return (f"warning: bundle built for target '{target.name}' needs CPU flags this CPU lacks: "
                f"{', '.join(missing)}; expect slower kernels (or rebuild with --target auto)")
    return None
