"""Instruction-set targets as data (``targets/*.toml``): how to quantize for a CPU family and how to
recognise it from the CPU's flags. Adding a CPU family is adding a file."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
from pathlib import Path

from .config import ConfigBase, QuantizeConfig
from .errors import EdgepackError
from .resources import data_dir

SEARCH_PATH_ENV = "EDGEPACK_TARGETS_PATH"  # extra directories of target files, os.pathsep-separated


@dataclasses.dataclass(frozen=True)
class Target(ConfigBase):
    name: str = ""
    description: str = ""
    arch: str = "x86_64"  # platform.machine() family: x86_64 or arm64
    requires_flags: tuple[str, ...] = ()  # every one of these must be present
    any_flags: tuple[str, ...] = ()  # at least one of these (when given)
    priority: int = 0  # among matching targets, detection picks the highest
    quantize: QuantizeConfig = dataclasses.field(default_factory=QuantizeConfig)

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


def _dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get(SEARCH_PATH_ENV, "").split(os.pathsep) if p]
    return [*extra, data_dir("targets")]


def available() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in _dirs():
        for f in sorted(d.glob("*.toml")):
            found.setdefault(f.stem, f)
    return found


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


def cpu_flags() -> tuple[str, set[str]]:
    """This CPU's architecture family and feature flags (Linux /proc/cpuinfo, macOS sysctl)."""
    machine = platform.machine().lower()
    arch = "arm64" if machine in ("arm64", "aarch64") else "x86_64" if machine in ("x86_64", "amd64") else machine
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags.update(value.split())
    elif platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-a"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        for line in out.splitlines():
            key, _, value = line.partition(":")
            # hw.optional.arm.FEAT_DotProd: 1 -> asimddp; FEAT_I8MM -> i8mm
            if key.startswith("hw.optional.") and value.strip() == "1":
                feat = key.rsplit(".", 1)[-1].lower()
                flags.add({"feat_dotprod": "asimddp", "feat_i8mm": "i8mm"}.get(feat, feat))
    return arch, flags


def detect() -> Target:
    arch, flags = cpu_flags()
    matching = [t for t in (load(n) for n in available()) if t.matches(arch, flags)]
    if not matching:
        raise EdgepackError(f"no target in targets/ matches this CPU ({arch}); pass --target NAME or add a target file")
    return max(matching, key=lambda t: (t.priority, len(t.requires_flags)))
