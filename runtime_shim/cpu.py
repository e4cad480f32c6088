"""This CPU as the bundle sees it: architecture, flags, physical cores, and the one load-time warning
when the bundle was built for a CPU this one is not.

Standard library only, and no import of the package (``pipeline`` imports it at load; ``tune`` re-exports
these names; ``edgepack.fleet.remote`` sends this file to a device as a program of its own).

ONNX Runtime picks its int8 kernels from the CPU it runs on, so a bundle checked on the build machine
may answer differently on a device with other kernels: on x86-64 without VNNI, U8S8 products are
summed in pairs into a saturating 16-bit register (VPMADDUBSW), which flips answers of a model
quantized at full range; ARM64 and x86-64 kernels round differently by design. The warning says
which flags are missing and that the risk is accuracy, not only speed.

``EDGEPACK_CPU_FLAGS`` fakes the CPU for tests and emulation: ``"avx2 fma"`` (flags, comma- or
space-separated) or ``"arm64:asimd asimddp"`` (an architecture first). Under QEMU user-mode
emulation ``/proc/cpuinfo`` is the host's, so the emulator sets it to the emulated CPU's flags.
"""

from __future__ import annotations

import os
import platform
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FLAGS_ENV = "EDGEPACK_CPU_FLAGS"
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


class BundleWarning(UserWarning):
    """The bundle runs here on something it was not checked on (another CPU's int8 kernels, an older ONNX
    Runtime): its answers may differ from the build's. Issued once per process and message; a command line
    prints it as one ``warning: ...`` line. Silence it with ``warnings.simplefilter("ignore", BundleWarning)``.
    """


class CpuTargetWarning(BundleWarning):
    """The bundle was built for a CPU with flags this one lacks: its int8 answers may differ here.

    Silence it with ``warnings.simplefilter("ignore", CpuTargetWarning)``.
    """


def _arch(machine: str) -> str:
    machine = machine.lower()
    return "arm64" if machine in ("arm64", "aarch64") else "x86_64" if machine in ("x86_64", "amd64") else machine


def faked_cpu(value: str | None = None) -> tuple[str, set[str]] | None:
    """The CPU ``EDGEPACK_CPU_FLAGS`` (or ``value``) describes, or None when it is unset or empty.

    Examples:
        >>> arch, flags = faked_cpu("arm64:asimd, asimddp")
        >>> arch, sorted(flags)
        ('arm64', ['asimd', 'asimddp'])
        >>> faked_cpu("avx2")[1]
        {'avx2'}
    """
    value = os.environ.get(FLAGS_ENV) if value is None else value
    if not value or not value.strip():
        return None
    arch, sep, rest = value.partition(":")
    if not sep:
        arch, rest = platform.machine(), value
    return _arch(arch.strip()), set(rest.replace(",", " ").split())


def cpu_flags() -> tuple[str, set[str]]:
    """This CPU's architecture family (``x86_64``/``arm64``) and flags, from the standard library
    (``EDGEPACK_CPU_FLAGS`` overrides both).

    Examples:
        >>> arch, flags = cpu_flags()  # doctest: +SKIP
        >>> arch, "avx2" in flags  # doctest: +SKIP
        ('x86_64', True)
    """
    faked = faked_cpu()
    if faked is not None:
        return faked
    arch = _arch(platform.machine())
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        if platform.system() == "Darwin":
            import subprocess  # macOS only: on Linux the shim never starts a process to load a bundle

            try:
                out = subprocess.run(["sysctl", "-a"], capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.TimeoutExpired):
                out = ""
            for line in out.splitlines():
                key, _, value = line.partition(":")
                if key.startswith("hw.optional.") and value.strip() == "1":
                    feat = key.rsplit(".", 1)[-1].lower()
                    flags.add({"feat_dotprod": "asimddp", "feat_i8mm": "i8mm"}.get(feat, feat))
    return arch, flags


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once).

    Linux: the ``core_id``/``physical_package_id`` pairs of the CPUs in this process's affinity mask;
    macOS: ``hw.physicalcpu``; else ``os.cpu_count()``.

    Examples:
        >>> physical_cores()  # doctest: +SKIP
        2
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores = set()
            break
    if cores:
        return len(cores)
    if platform.system() == "Darwin":
        import subprocess

        try:
            return int(subprocess.run(["sysctl", "-n", "hw.physicalcpu"], capture_output=True, text=True,
                                      timeout=5).stdout.strip())
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
    return max(1, len(cpus))


def _risk(target: Mapping[str, Any], arch: str, flags: set[str]) -> str:
    """What may go wrong with the answers on this CPU (one clause)."""
    quant = target.get("quantize") if isinstance(target.get("quantize"), Mapping) else {}
    if arch == "x86_64" and not set(VNNI_FLAGS) & flags:
        u8s8 = quant.get("weight_type", "qint8") == "qint8"
        full_range = not quant.get("reduce_range", False)
        if u8s8 and (full_range or not quant):
            return ("accuracy risk: without VNNI, ONNX Runtime's U8S8 kernel sums u8*s8 pairs in a saturating "
                    "16-bit register (VPMADDUBSW), which can flip answers of weights quantized at full range")
        return "accuracy risk: ONNX Runtime runs other int8 kernels here than the bundle was checked with"
    return "accuracy risk: ONNX Runtime runs other int8 kernels here than the bundle was checked with"


def target_warning(manifest: Mapping[str, Any], arch: str | None = None, flags: set[str] | None = None) -> str | None:
    """One line when this CPU lacks the flags of the target the bundle was built for, else None.

    Examples:
        >>> target_warning({"target": {"name": "x86-64-vnni", "arch": "x86_64",
        ...                            "any_flags": ["avx512_vnni", "avx_vnni"]}}, "x86_64", {"avx2"})
        ... # doctest: +ELLIPSIS
        "bundle built for target 'x86-64-vnni' needs CPU flags this CPU lacks: avx512_vnni or avx_vnni; accuracy risk: ..."
    """
    target = manifest.get("target")
    if not isinstance(target, Mapping):
        return None
    if arch is None or flags is None:
        host_arch, host_flags = cpu_flags()
        arch = host_arch if arch is None else arch
        flags = host_flags if flags is None else flags
    name = target.get("name", "?")
    check = "; check it with `edgepack emulate accuracy BUNDLE --target TARGET` or rebuild with --target auto"
    if target.get("arch") and target["arch"] != arch:
        return (f"bundle built for target '{name}' ({target['arch']}) but this CPU is {arch}; "
                f"{_risk(target, arch, flags)}{check}")
    missing = sorted(set(target.get("requires_flags") or ()) - flags)
    any_flags = list(target.get("any_flags") or ())
    if any_flags and not set(any_flags) & flags:
        missing.append(" or ".join(any_flags))
    if missing:
        return (f"bundle built for target '{name}' needs CPU flags this CPU lacks: {', '.join(missing)}; "
                f"{_risk(target, arch, flags)}{check}")
    return None


_warned: set[str] = set()


def warn_target_once(manifest: Mapping[str, Any], *, stacklevel: int = 3) -> str | None:
    """Issue ``target_warning`` as a ``CpuTargetWarning`` the first time this process sees it; return
    the message (None when this CPU has the target's flags). Called when a bundle is loaded.

    Examples:
        >>> warn_target_once({})  # no target recorded: nothing to say
    """
    msg = target_warning(manifest)
    if msg is None:
        return None
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, CpuTargetWarning, stacklevel=stacklevel)
    return msg


def one_line_warnings() -> None:
    """Print a ``BundleWarning`` (``CpuTargetWarning``, ``session.OrtVersionWarning``) as ``warning: ...`` on
    one line (a command line's console), other warnings as before; recording them (``warnings.catch_warnings(record=True)``) is unchanged.
    Called by the ``python -m runtime_shim`` and ``edgepack`` entry points."""
    fmt = warnings.formatwarning
    if getattr(fmt, "_edgepack_one_line", False):
        return

    def one_line(message, category, filename, lineno, line=None):
        if isinstance(category, type) and issubclass(category, BundleWarning):
            return f"warning: {message}\n"
        return fmt(message, category, filename, lineno, line)

    one_line._edgepack_one_line = True  # type: ignore[attr-defined]
    warnings.formatwarning = one_line
