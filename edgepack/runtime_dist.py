"""The device runtime as its own distribution, ``edgepack-runtime``: a wheel of the ``runtime_shim``
package this machine has installed (the operator's trusted copy), never of a bundle's copy.

    >>> wheel = build_wheel("dist")                  # doctest: +SKIP
    >>> wheel.name                                   # doctest: +SKIP
    'edgepack_runtime-0.1.0-py3-none-any.whl'

Written by hand rather than by a build backend: ``edgepack deploy --setup`` builds it on the
operator's machine, which may hold an installed edgepack but no source tree, and the result must be
the same bytes every time (fixed timestamps and modes, sorted entries) without a network or an
isolated build environment. It depends on onnxruntime, tokenizers and numpy at edgepack's own floors;
``cryptography`` is the ``signed`` extra (a device that checks signatures).
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import zipfile
from importlib import metadata
from pathlib import Path

import runtime_shim

DIST_NAME = "edgepack-runtime"
MIN_PYTHON = (3, 10)  # the runtime's syntax and library calls (zip(strict=True), X | Y at run time)
RUNTIME_DEPENDENCIES = ("onnxruntime", "tokenizers", "numpy")
SIGNED_EXTRA = "signed"
SCRIPT = "edgepack-runtime"  # a console script: its sys.path[0] is the script's directory, never the cwd
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold: no build time in the bytes


def shim_dir() -> Path:
    """The installed ``runtime_shim`` package the wheel is made of."""
    return Path(runtime_shim.__file__).resolve().parent


def runtime_version() -> str:
    """The runtime's version: edgepack's (one version for both distributions)."""
    return runtime_shim.__version__


def shim_files(src: Path | None = None) -> list[Path]:
    """The package's files, sorted, without byte code (what a bundle copies too)."""
    src = src or shim_dir()
    return sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix not in (".pyc", ".pyo"))


def _floors() -> dict[str, str]:
    """``{name: "name>=X"}`` from edgepack's own requirements (the versions it supports)."""
    out = {}
    try:
        requires = metadata.requires("edgepack") or []
    except metadata.PackageNotFoundError:
        requires = []
    for req in requires:
        if ";" in req:
            continue
        name = re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0].strip().lower()
        out[name] = req.strip()
    return out


def requirements() -> tuple[list[str], list[str]]:
    """``(requires, signed extra)``: the runtime's dependencies as ``Requires-Dist`` strings."""
    floors = _floors()
    return [floors.get(n, n) for n in RUNTIME_DEPENDENCIES], [floors.get("cryptography", "cryptography")]


def metadata_text() -> str:
    requires, signed = requirements()
    lines = ["Metadata-Version: 2.1", f"Name: {DIST_NAME}", f"Version: {runtime_version()}",
             "Summary: edgepack's device runtime: verify, run, benchmark and tune edgepack bundles",
             "License: Apache-2.0", f"Requires-Python: >={MIN_PYTHON[0]}.{MIN_PYTHON[1]}",
             *(f"Requires-Dist: {r}" for r in requires), f"Provides-Extra: {SIGNED_EXTRA}",
             *(f'Requires-Dist: {r}; extra == "{SIGNED_EXTRA}"' for r in signed)]
    return "\n".join(lines) + "\n"


def wheel_name() -> str:
    return f"{DIST_NAME.replace('-', '_')}-{runtime_version()}-py3-none-any.whl"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheel_bytes(src: Path | None = None) -> bytes:
    """The wheel's bytes: the same for the same installed files (deterministic)."""
    src = src or shim_dir()
    info = f"{DIST_NAME.replace('-', '_')}-{runtime_version()}.dist-info"
    entries = [(f"runtime_shim/{p.relative_to(src).as_posix()}", p.read_bytes()) for p in shim_files(src)]
    entries += [
        (f"{info}/METADATA", metadata_text().encode()),
        (f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: edgepack\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
        (f"{info}/entry_points.txt", f"[console_scripts]\n{SCRIPT} = runtime_shim.__main__:console\n".encode()),
    ]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries) + f"{info}/RECORD,,\n"
    entries.append((f"{info}/RECORD", record.encode()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries:
            zi = zipfile.ZipInfo(name, date_time=_EPOCH)
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, data, compresslevel=9)
    return buf.getvalue()


def build_wheel(out_dir: str | Path) -> Path:
    """Write ``edgepack_runtime-VERSION-py3-none-any.whl`` into ``out_dir`` (atomically); return its path.

    Example:
        >>> build_wheel("dist").name  # doctest: +SKIP
        'edgepack_runtime-0.1.0-py3-none-any.whl'
    """
    from edgepack.records import write_bytes_atomic

    out = Path(out_dir) / wheel_name()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, wheel_bytes())
    return out
