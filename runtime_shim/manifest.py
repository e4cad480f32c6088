"""The bundle's manifest: sha256 and size of every file, so a device can tell a whole bundle from a
damaged or edited one before it answers a single query.

``manifest.json`` lists every file of the bundle except itself, its signature ``manifest.sig`` (see
``trust.py``) and ``__pycache__`` (Python writes those on the device). Files the manifest does not list (a benchmark's JSON saved beside the model)
are ignored by :func:`verify`; a listed file that is missing or differs is refused.

This module is the one implementation: ``edgepack``'s packer imports it to write manifests, the
shim imports it to check them. Standard library only.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .readers import (  # noqa: F401  (re-exported: the shim and edgepack import them from here)
    JSON_LIMITS,
    MAX_JSON_DEPTH,
    BundleError,
    bad_path,
    no_duplicates,
    open_regular,
    parse_json,
    read_json,
    read_limited,
    regular_size,
)

FORMAT = "edgepack-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
_SKIP_DIRS = ("__pycache__",)
_CHUNK = 1 << 20
# Past this many bytes to hash, OpenSSL's sha256 is worth loading (see _sha256).
OPENSSL_PAST = 16 << 20


def _sha256(total_bytes: int):
    """A sha256 object for hashing ``total_bytes`` in all. CPython's own sha256 leaves OpenSSL unloaded:
    libcrypto's pages are 3.6 MB of a bundle process's peak memory (docs/memory.md), for hashing at
    8.8 ms/MB instead of 3.1 (files read included; 2-core AMD EPYC VM with SHA extensions, CPython
    3.11). OpenSSL's is used when this process has it loaded already, or past ``OPENSSL_PAST`` bytes
    (16 MiB: 100+ ms saved at load), and where CPython was built without its own."""
    if total_bytes <= OPENSSL_PAST and "_hashlib" not in sys.modules:
        for name in ("_sha2", "_sha256"):  # CPython 3.12+, then 3.11 and older
            with contextlib.suppress(ImportError):
                return importlib.import_module(name).sha256()
    import hashlib

    return hashlib.sha256()


def sha256_file(path: str | os.PathLike, *, total_bytes: int | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (a model never sits in memory twice). ``total_bytes``:
    how much the caller hashes in all (default: this file's size), which picks the implementation.

    Examples:
        >>> sha256_file("bundle/model.quant.onnx")  # doctest: +SKIP
        '3f5a...'
    """
    with open_regular(path) as f:
        return _hash_open(f, os.fstat(f.fileno()).st_size if total_bytes is None else total_bytes)


def _hash_open(f: Any, total_bytes: int) -> str:
    h = _sha256(total_bytes)
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def bundle_files(bundle_dir: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of the files a manifest covers, sorted.

    Examples:
        >>> bundle_files("bundle")  # doctest: +SKIP
        ['eval.jsonl', 'labels.json', 'model.quant.onnx', 'requirements.txt', 'runtime.json', ...]
    """
    root = Path(bundle_dir)
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts) or rel.as_posix() in (MANIFEST, SIGNATURE):
            continue
        # A temporary manifest or signature left by an interrupted write is not part of the bundle.
        if rel.name.startswith((f".{MANIFEST}.", f".{SIGNATURE}.")) or not p.is_file():
            continue
        out.append(rel.as_posix())
    return sorted(out)


def hash_files(bundle_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{relpath: {"sha256", "bytes"}}`` for every file of the bundle.

    Examples:
        >>> hash_files("bundle")["labels.json"]  # doctest: +SKIP
        {'sha256': '9c1e...', 'bytes': 105}
    """
    root = Path(bundle_dir)
    return {rel: {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
            for rel in bundle_files(root)}


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", *, suffix: str = "", perms: int = 0o644):
    """Open a temporary file beside ``path`` (permissions ``perms``, set before anything is written);
    on success it is renamed onto ``path``.

    The one atomic writer of the device side (edgepack's build side imports it too): an interrupted
    write never leaves a half file that looks whole, and the file stays readable to a service user
    (``mkstemp`` alone would leave it 0600).

    Examples:
        >>> import pathlib, tempfile
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "bench.txt"
        >>> with atomic_file(out) as f:
        ...     _ = f.write("p50 0.1 ms")
        >>> out.read_text()
        'p50 0.1 ms'

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import tempfile  # here, not at import: it loads shutil and random, 1.3 MB a serving process never needs

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, perms)
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike):
    """Hold ``target`` for this process alone while it is written: an exclusive lock on ``.NAME.lock``
    beside it, taken at once or refused (one line naming the process that holds it). The lock file is
    removed by its holder, still locked (a run killed outright leaves it, unlocked, to the next); a
    lock taken on a file its holder removed meanwhile is given up and taken again.

    Examples:
        >>> with writer_lock("/opt/bundles/clinc150"):  # doctest: +SKIP
        ...     pass  # no other writer of /opt/bundles/clinc150 runs meanwhile
    """
    target = Path(target)
    try:
        import fcntl
    except ImportError:  # not POSIX: one writer at a time is the caller's business
        yield
        return
    lock = target.with_name(f".{target.name}.lock")
    for _ in range(8):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise BundleError(f"{lock}: cannot create the lock for writing {target} ({e.strerror}); check the "
                              "permissions of its directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BundleError(f"{target}: another process (pid {holder}) is writing it now; wait for it to "
                              "finish, or choose another destination") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    else:
        raise BundleError(f"{target}: its lock {lock} keeps changing hands; try again")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` through :func:`atomic_file`.

    Examples:
        >>> write_bytes_atomic("report/plot.png", png)  # doctest: +SKIP
    """
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON (indented, one trailing newline) through :func:`atomic_file`.

    Examples:
        >>> write_json_atomic("results/bench.json", {"accuracy": 0.9})  # doctest: +SKIP
    """
    with atomic_file(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")


def write_manifest(bundle_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Hash every file of ``bundle_dir`` and write ``manifest.json`` (atomically); return it.

    ``fields`` (versions, target, metrics, ...) are stored beside ``format`` and ``files``; a field
    named ``files`` or ``format`` is ignored, since those are computed here.

    Examples:
        >>> m = write_manifest("bundle", versions={"onnxruntime": "1.31.1"}, metrics={"accuracy": 0.9})
        ... # doctest: +SKIP
        >>> sorted(m)  # doctest: +SKIP
        ['files', 'format', 'metrics', 'versions']
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory; pass the directory `edgepack pack` wrote")
    extra = {k: v for k, v in fields.items() if k not in ("files", "format")}
    manifest = {"format": FORMAT, **extra, "files": hash_files(root)}
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


def parse_manifest(data: bytes, path: str | os.PathLike = MANIFEST) -> dict[str, Any]:
    """Parse and check the bytes of a ``manifest.json`` (``path`` only names it in errors): its format, and
    a ``files`` table whose every path stays inside the bundle (``check_paths``) with its size and sha256.

    Examples:
        >>> parse_manifest(b'{"format": "edgepack-bundle/1", "files": {}}')["files"]
        {}
    """
    path = Path(path)
    fix = "re-run `edgepack pack` or restore the file"
    data = parse_json(data, path, fix)
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise BundleError(f"{path}: has no 'files' table; {fix}")
    fmt = data.get("format")
    if fmt != FORMAT:
        raise BundleError(f"{path}: format {str(fmt)[:40]!r} is not {FORMAT!r}; repack the bundle with this edgepack "
                          "or use the runtime_shim copied inside it")
    check_paths(path, data["files"])
    for rel, entry in data["files"].items():
        size, digest = (entry.get("bytes"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        if (isinstance(size, bool) or not isinstance(size, int) or size < 0 or not isinstance(digest, str)
                or len(digest) != 64 or digest.strip("0123456789abcdef")):
            raise BundleError(f"{path}: the entry of {rel!r} needs its 'bytes' (a size) and 'sha256' (64 hex digits); {fix}")
    return data


def check_paths(manifest_path: str | os.PathLike, files: Mapping[str, Any]) -> None:
    """Refuse a ``files`` table naming anything but files inside the bundle (``bad_path``).

    Examples:
        >>> check_paths("b/manifest.json", {"../etc/passwd": {}})
        Traceback (most recent call last):
        ...
        runtime_shim.readers.BundleError: b/manifest.json: lists '../etc/passwd', a path outside the bundle; re-pack and re-sign the bundle
    """
    for rel in files:
        why = bad_path(rel)
        if why:
            shown = repr(rel[:80] + "..." if isinstance(rel, str) and len(rel) > 80 else rel)
            raise BundleError(f"{manifest_path}: lists {shown}, {why}; re-pack and re-sign the bundle")


def read_manifest(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a bundle (``parse_manifest``), without checking any file.

    Examples:
        >>> read_manifest("bundle")["format"]  # doctest: +SKIP
        'edgepack-bundle/1'
    """
    root = Path(bundle_dir)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory; pass the directory `edgepack pack` wrote")
    if not path.exists():
        raise BundleError(f"{path}: missing, so this is not a packed bundle; re-run `edgepack pack` "
                          f"(or `python -m runtime_shim verify {root} --update` to trust the files as they are)")
    return parse_manifest(read_limited(path, JSON_LIMITS[MANIFEST], "re-run `edgepack pack` or restore the file"), path)


def verify(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Check every file listed in ``manifest.json`` (present, same size, same sha256); return the manifest.

    Raises ``BundleError`` naming the first file that is missing or differs.

    Examples:
        >>> verify("bundle")["format"]  # doctest: +SKIP
        'edgepack-bundle/1'
        >>> Path("bundle/labels.json").write_text("{}")  # doctest: +SKIP
        >>> verify("bundle")  # doctest: +SKIP
        Traceback (most recent call last):
        BundleError: bundle/labels.json: sha256 differs from manifest.json ...
    """
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    check_files(root, manifest)
    return manifest


def check_files(root: str | os.PathLike, manifest: dict[str, Any], *, fix: str | None = None) -> None:
    """Check every file a parsed ``manifest`` (``parse_manifest``) lists under ``root``: a regular file
    (``open_regular``), of the listed size and sha256.

    ``fix`` replaces the advice given with a refusal.

    Examples:
        >>> check_files("bundle", read_manifest("bundle"))  # doctest: +SKIP
    """
    root = Path(root)
    fix = fix or ("restore it from the packed bundle (or its .tar.gz), or if you changed it on purpose run "
                  f"`python -m runtime_shim verify {root} --update`")
    total = sum(e["bytes"] for e in manifest["files"].values())
    for rel, entry in sorted(manifest["files"].items()):
        path = root / rel
        with open_regular(path, fix) as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry["bytes"]:
                raise BundleError(f"{path}: {size} bytes, manifest.json says {entry['bytes']} (file changed after "
                                  f"packing); {fix}")
            if _hash_open(f, total) != entry["sha256"]:
                raise BundleError(f"{path}: sha256 differs from manifest.json (file changed after packing); {fix}")


def update_manifest(bundle_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Re-hash the files after an intended change (a tuned ``runtime.json``), keeping the other fields.

    ``fields`` replace the top-level fields of the same name; nested tables are replaced, not merged.

    Examples:
        >>> update_manifest("bundle", tuned={"intra_op_num_threads": 2})  # doctest: +SKIP
        {'format': 'edgepack-bundle/1', ..., 'tuned': {'intra_op_num_threads': 2}, 'files': {...}}
    """
    root = Path(bundle_dir)
    try:
        old = read_manifest(root)
    except BundleError:
        if (root / MANIFEST).exists():
            raise
        old = {}
    kept = {k: v for k, v in old.items() if k not in ("files", "format")}
    kept.update(fields)
    return write_manifest(root, **kept)


def bundle_bytes(bundle_dir: str | os.PathLike) -> int:
    """Bytes on disk of the whole bundle: every covered file plus ``manifest.json`` (and ``manifest.sig``).

    Examples:
        >>> bundle_bytes("bundle")  # doctest: +SKIP
        1874231
    """
    root = Path(bundle_dir)
    total = sum((root / rel).stat().st_size for rel in bundle_files(root))
    for name in (MANIFEST, SIGNATURE):
        if (root / name).is_file():
            total += (root / name).stat().st_size
    return total
