"""``edgepack emulate setup arm64``: prepare the arm64 Debian root the arm64 checks run in.

Steps (each leaves a marker in the partial root, so an interrupted setup resumes where it stopped):

1. ``debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,...``
   into ``ROOT.partial`` (about 10 minutes on 2 cores: the second stage runs under QEMU through
   binfmt_misc, which is mounted and enabled first when it is not);
2. the aarch64 wheels of onnxruntime, tokenizers and numpy, downloaded on the host with
   ``pip download --platform manylinux..._aarch64`` (pip inside the root may not reach the index),
   at the versions this machine runs so both sides use the same kernels' code;
3. a venv in the root (``/opt/edgepack/venv``) and ``pip install --no-index`` of those wheels under
   emulation (about 6 minutes);
4. a smoke test (import the three packages), ``opt/edgepack/ready.json``, and the rename of
   ``ROOT.partial`` to ``ROOT``: a root that exists is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import EdgepackError
from . import QUIET, ROOT_PATH, ROOT_PYTHON, ROOT_QEMU, ROOT_READY, arm64_root

PACKAGES = ("onnxruntime", "tokenizers", "numpy")
DEBIAN_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SUITE = "bookworm"  # Python 3.11
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64", "manylinux_2_17_aarch64", "any")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
INSTALL = "apt-get install debootstrap binfmt-support qemu-user-static"


def _stream(argv: list[str], log: Callable[[str], Any], *, label: str, env: dict[str, str] | None = None,
            every: float = 15.0) -> None:
    """Run ``argv``, showing a line of its output at most every ``every`` seconds."""
    log(f"[emulate] {label}: {' '.join(argv[:4])}{' ...' if len(argv) > 4 else ''}")
    started = last = time.time()
    tail: list[str] = []
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            tail = (tail + [line])[-15:]
            if time.time() - last > every:
                log(f"[emulate] {label} ({time.time() - started:.0f} s): {line[:120]}")
                last = time.time()
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        raise EdgepackError(f"{label} failed (exit {rc}): {' / '.join(tail[-3:])[:400]}")
    log(f"[emulate] {label}: done in {time.time() - started:.0f} s")


def _check_tools() -> None:
    missing = [t for t in ("debootstrap", "qemu-aarch64-static", "chroot") if shutil.which(t) is None]
    if missing:
        raise EdgepackError(f"{', '.join(missing)} not found; install them: {INSTALL}")
    if os.geteuid() != 0:
        raise EdgepackError("debootstrap and chroot need root; run `sudo edgepack emulate setup arm64`")


def ensure_binfmt(log: Callable[[str], Any] = QUIET) -> None:
    """Make the kernel run arm64 binaries through QEMU (debootstrap's second stage execs them):
    mount binfmt_misc when absent and enable the qemu-aarch64 entry."""
    if not (BINFMT / "register").exists():
        log("[emulate] mounting binfmt_misc")
        r = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True, text=True)
        if r.returncode != 0:
            raise EdgepackError(f"cannot mount binfmt_misc ({r.stderr.strip()[:200]}); on the host run: "
                                f"mount -t binfmt_misc binfmt_misc {BINFMT} && update-binfmts --enable qemu-aarch64")
    entry = BINFMT / "qemu-aarch64"
    if not entry.is_file() or "enabled" not in entry.read_text():
        tool = shutil.which("update-binfmts")
        if tool is None:
            raise EdgepackError(f"binfmt_misc has no qemu-aarch64 entry and update-binfmts is missing; install: {INSTALL}")
        subprocess.run([tool, "--enable", "qemu-aarch64"], capture_output=True, text=True)
        if not entry.is_file() or "enabled" not in entry.read_text():
            raise EdgepackError("binfmt_misc has no enabled qemu-aarch64 entry; run: update-binfmts --enable qemu-aarch64 "
                                f"(package binfmt-support, {INSTALL})")


def _python_version(root: Path) -> str:
    """``3.11`` for the root's ``/usr/bin/python3``."""
    link = root / "usr/bin/python3"
    target = os.readlink(link) if link.is_symlink() else ""
    version = target.rsplit("python", 1)[-1]
    if not version or not version[0].isdigit():
        candidates = sorted(p.name[len("python"):] for p in (root / "usr/bin").glob("python3.*")
                            if p.name[len("python"):].replace(".", "").isdigit())
        version = candidates[-1] if candidates else ""
    if not version:
        raise EdgepackError(f"{root}: no python3 in the root; remove {root} and rerun the setup")
    return version


def _requirements() -> list[str]:
    """The runtime packages at the versions this machine has (so both sides run the same code)."""
    out = []
    for name in PACKAGES:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def download_wheels(dest: Path, python_version: str, log: Callable[[str], Any] = QUIET) -> list[str]:
    """aarch64 wheels of the runtime packages into ``dest`` (on the host: pip in the root may be
    offline); falls back to the newest release when this machine's version has no aarch64 wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
            "--python-version", python_version, "-d", str(dest)]
    for plat in PLATFORMS:
        base += ["--platform", plat]
    reqs = _requirements()
    try:
        _stream(base + reqs, log, label="aarch64 wheels")
    except EdgepackError:
        log("[emulate] no aarch64 wheels at this machine's versions; taking the newest releases")
        reqs = list(PACKAGES)
        _stream(base + reqs, log, label="aarch64 wheels")
    return reqs


def _in_root(root: Path, argv: list[str]) -> list[str]:
    return ["chroot", str(root), *argv]


def setup_arm64(root: str | os.PathLike | None = None, *, mirror: str = DEFAULT_MIRROR, suite: str = DEFAULT_SUITE,
                force: bool = False, log: Callable[[str], Any] = QUIET) -> Path:
    """Prepare the arm64 root at ``root`` (default: ``arm64_root()``) and return it.

    Built in ``ROOT.partial`` and renamed when complete; rerunning after an interruption resumes from
    the last finished step. ``force`` rebuilds a complete root.

    Example:
        >>> setup_arm64("/tmp/arm64")  # doctest: +SKIP
        PosixPath('/tmp/arm64')
    """
    final = arm64_root(root)
    if (final / ROOT_READY).is_file() and not force:
        log(f"[emulate] arm64 root ready at {final} (pass --force to rebuild)")
        return final
    _check_tools()
    ensure_binfmt(log)
    partial = final.with_name(final.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    marks = partial / "opt/edgepack/setup"
    started = time.time()

    if not (marks / "debootstrap").is_file():
        log(f"[emulate] step 1/3: Debian {suite} arm64 into {partial} (about 10 minutes)")
        _stream(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}",
                 suite, str(partial), mirror], log, label="debootstrap")
        marks.mkdir(parents=True, exist_ok=True)
        (marks / "debootstrap").write_text(suite + "\n")
    # A static QEMU inside the root runs its Python without binfmt_misc once the root is built.
    qemu = shutil.which("qemu-aarch64-static")
    if qemu and not (partial / ROOT_QEMU).is_file():
        shutil.copy2(qemu, partial / ROOT_QEMU)

    wheels = partial / "opt/edgepack/wheels"
    pyver = _python_version(partial)
    if not (marks / "wheels").is_file():
        log(f"[emulate] step 2/3: aarch64 wheels for Python {pyver}")
        reqs = download_wheels(wheels, pyver, log)
        (marks / "wheels").write_text("\n".join(reqs) + "\n")
    reqs = (marks / "wheels").read_text().split()

    env = {"PATH": ROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    venv = "/" + str(Path(ROOT_PYTHON).parent.parent).lstrip("/")
    if not (marks / "venv").is_file():
        log("[emulate] step 3/3: a venv in the root and the wheels installed under emulation (about 6 minutes)")
        if (partial / venv.lstrip("/")).exists():
            shutil.rmtree(partial / venv.lstrip("/"))
        _stream(_in_root(partial, ["/usr/bin/python3", "-m", "venv", venv]), log, label="venv", env=env)
        _stream(_in_root(partial, [ROOT_PYTHON, "-m", "pip", "install", "--disable-pip-version-check", "--no-index",
                                   "--find-links", "/opt/edgepack/wheels", *reqs]), log, label="pip install", env=env)
        (marks / "venv").write_text("\n".join(reqs) + "\n")

    probe = ("import json, platform, numpy, onnxruntime, tokenizers; print(json.dumps({'machine': platform.machine(), "
             "'python': platform.python_version(), 'onnxruntime': onnxruntime.__version__, "
             "'tokenizers': tokenizers.__version__, 'numpy': numpy.__version__}))")
    r = subprocess.run(_in_root(partial, [ROOT_PYTHON, "-c", probe]), capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise EdgepackError(f"{partial}: the runtime packages do not import in the root "
                            f"({(r.stderr.strip().splitlines() or ['?'])[-1][:200]}); remove {marks / 'venv'} and rerun")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    info.update({"suite": suite, "mirror": mirror, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    tmp = partial / (ROOT_READY + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, partial / ROOT_READY)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(partial, final)
    log(f"[emulate] arm64 root ready at {final} in {time.time() - started:.0f} s: Python {info['python']}, "
        f"onnxruntime {info['onnxruntime']}, tokenizers {info['tokenizers']}, numpy {info['numpy']}")
    return final
