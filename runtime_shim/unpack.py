"""``python -m runtime_shim unpack BUNDLE.tar.gz DEST``: extract a bundle archive safely, verify it, and
only then move it into place.

    python -m runtime_shim unpack clinc150.tar.gz /opt/bundles/clinc150 [--keys DIR] [--allow-downgrade] [--replace]

The archive is read with tarfile's ``data`` filter (PEP 706; where this Python lacks it, the same
refusals are made here and files are extracted without their archived modes and owners). Beyond the
filter, any link (symbolic or hard) and any special file is refused, as is any path that is absolute
or climbs out with ``..``. Extraction goes into a temporary directory beside ``DEST``; the bundle is
verified there (its signature, with trusted keys configured) and renamed to ``DEST`` only when it
passes, so ``DEST`` never holds a bundle that was not checked. Nothing from the archive is imported
or loaded by this command: run it with a shim installed outside the bundle (docs/TRUST.md).

Extraction stops at a size limit, checked against each entry's header before its bytes are written:
twice the sizes the archive's ``manifest.json`` declares once that has been read (edgepack's archives
hold it before the model), and never more than 50 times the archive's own size plus 64 MiB (a bundle's
int8 model hardly compresses; an archive of zeros expands a thousandfold); ``--max-bytes N`` sets it
instead. One unpack writes a ``DEST`` at a time (``manifest.writer_lock``), and the temporary
directories a killed run left beside ``DEST`` are removed by the next one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .manifest import MANIFEST, BundleError, read_manifest, writer_lock
from .trust import Verified, trusted_keys_dir, verify_bundle

if TYPE_CHECKING:
    import tarfile  # imported where an archive is opened: predict, bench and rss register this module too

_REPACK = "re-create the archive with `edgepack pack --archive` (or `tar czf` of the bundle directory, no links)"


RATIO, FLOOR = 50, 64 << 20  # before (and above) the manifest's own figure: see the module's docstring
MAX_ENTRIES = 10_000


def check_member(m: tarfile.TarInfo, archive: str | os.PathLike) -> None:
    """Refuse an archive entry that is a link, a special or sparse file, or a path that is absolute or climbs
    out with ``..``.

    Examples:
        >>> with tarfile.open("bundle.tar.gz") as tar:  # doctest: +SKIP
        ...     check_member(tar.next(), "bundle.tar.gz")
    """
    name = m.name
    where = f"{archive}: entry {name[:120]!r}"
    if m.issym() or m.islnk():
        raise BundleError(f"{where} is a {'symbolic' if m.issym() else 'hard'} link (to {m.linkname[:120]!r}); bundles "
                          f"hold regular files only: {_REPACK}")
    if not (m.isfile() or m.isdir()) or m.issparse():
        raise BundleError(f"{where} is not a regular file or directory; {_REPACK}")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (parts and parts[0].endswith(":")) or ".." in parts or "\0" in name:
        raise BundleError(f"{where} points outside the destination (absolute or `..`); {_REPACK}")


def _extract(tar: tarfile.TarFile, archive: Path, dest: Path, max_bytes: int | None) -> None:
    """Extract entry by entry (``check_member``), stopping before the one that would pass the size limit
    (the module's docstring) or ``MAX_ENTRIES``: the archive is read only as far as it is written."""
    import tarfile

    limit = max_bytes if max_bytes is not None else RATIO * archive.stat().st_size + FLOOR
    entries, total, declared = MAX_ENTRIES, 0, False
    for count, m in enumerate(tar, 1):
        check_member(m, archive)
        total += m.size
        if total > limit or count > entries:
            basis = ("--max-bytes" if max_bytes is not None else "twice what its manifest declares" if declared
                     else f"{RATIO} times its own size")
            why = f"more than {entries} entries" if count > entries else f"more than {limit} bytes ({basis})"
            raise BundleError(f"{archive}: expands to {why}, so it is not a bundle archive (or a bigger one than "
                              "expected); stopped before writing more; pass --max-bytes N to allow more")
        if hasattr(tarfile, "data_filter"):
            tar.extract(m, dest, filter="data")
        else:  # Pythons before the PEP 706 backports: the refusals above, without archived modes or owners
            tar.extract(m, dest, set_attrs=False)
        path = PurePosixPath(m.name)
        if not declared and m.isfile() and path.name == MANIFEST and len(path.parts) <= 2:  # the bundle's own
            declared = True
            try:
                files = read_manifest((dest / m.name).parent)["files"]
            except BundleError:
                continue  # verify says what is wrong with it, once everything is out
            if max_bytes is None:
                limit = min(limit, 2 * sum(e["bytes"] for e in files.values()) + (1 << 20))
            entries = 2 * len(files) + 64


def _bundle_root(tmp: Path, archive: str | os.PathLike) -> Path:
    if (tmp / MANIFEST).is_file():
        return tmp
    top = [p for p in tmp.iterdir()]
    if len(top) == 1 and top[0].is_dir() and (top[0] / MANIFEST).is_file():
        return top[0]
    raise BundleError(f"{archive}: no {MANIFEST} at its top or in its single top directory, so it is not a bundle "
                      "archive; pass the .tar.gz `edgepack pack --archive` wrote")


def unpack(archive: str | os.PathLike, dest: str | os.PathLike, *, keys: str | os.PathLike | None = None,
           allow_downgrade: bool = False, replace: bool = False, max_bytes: int | None = None) -> Verified:
    """Extract ``archive`` beside ``dest`` (within the size limit, ``max_bytes`` if given), verify the
    bundle, then rename it to ``dest``; return what the verification established. ``dest`` must not
    exist unless ``replace``.

    Examples:
        >>> unpack("clinc150.tar.gz", "/opt/bundles/clinc150", keys="/etc/edgepack/keys").version  # doctest: +SKIP
        20261201071800
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise BundleError(f"{archive}: no such archive; pass the BUNDLE.tar.gz `edgepack pack --archive` wrote")
    if max_bytes is not None and max_bytes < 1:
        raise BundleError(f"--max-bytes {max_bytes}: pass a positive number of bytes")
    with writer_lock(dest):
        if (dest.exists() or dest.is_symlink()) and not replace:
            raise BundleError(f"{dest}: already exists; pass --replace to swap it for the new bundle once it has been "
                              "verified, or choose another DEST")
        # Under the lock, what earlier runs left beside DEST is garbage: they were killed mid-way.
        for stale in dest.parent.iterdir():
            if stale.name.startswith((f".{dest.name}.unpack-", f".{dest.name}.old-")):
                shutil.rmtree(stale, ignore_errors=True)
        return _unpack_locked(archive, dest, keys=keys, allow_downgrade=allow_downgrade, replace=replace,
                              max_bytes=max_bytes)


def _unpack_locked(archive: Path, dest: Path, *, keys: str | os.PathLike | None, allow_downgrade: bool,
                   replace: bool, max_bytes: int | None) -> Verified:
    import tarfile
    import zlib

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                _extract(tar, archive, tmp, max_bytes)
        except OSError as e:
            if e.errno is None:  # gzip's BadGzipFile
                raise BundleError(f"{archive}: not a readable tar archive ({e}); copy it again") from None
            raise BundleError(f"{archive}: cannot extract ({e.strerror}); check the space and permissions "
                              f"under {dest.parent}") from None
        except (tarfile.TarError, EOFError, zlib.error) as e:  # FilterError is a TarError
            raise BundleError(f"{archive}: not a readable, safe tar archive ({e}); copy it again or {_REPACK}") from None
        root = _bundle_root(tmp, archive)
        root.chmod(0o755)  # mkdtemp's 0700 would follow the bundle into place
        result = verify_bundle(root, keys=keys, allow_downgrade=allow_downgrade)
        _move_into_place(root, dest, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _move_into_place(src: Path, dest: Path, *, replace: bool) -> None:
    if not (replace and (dest.exists() or dest.is_symlink())):
        os.rename(src, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.rename(dest, old / dest.name)
    try:
        os.rename(src, dest)
    except BaseException:
        os.rename(old / dest.name, dest)
        raise
    finally:
        with contextlib.suppress(OSError):
            if (old / dest.name).is_symlink():
                (old / dest.name).unlink()
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------- CLI


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("unpack", help="extract a bundle archive safely, verify it, then move it into place",
                       description="Extract BUNDLE.tar.gz (no links, no paths outside DEST) beside DEST, verify the "
                       "bundle (its signature with --keys DIR or EDGEPACK_TRUSTED_KEYS), then rename it to DEST.")
    p.add_argument("archive", metavar="BUNDLE.tar.gz", help="the archive `edgepack pack --archive` wrote")
    p.add_argument("dest", metavar="DEST", help="the bundle directory to create")
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="require a signature by a public key in DIR (default: $EDGEPACK_TRUSTED_KEYS; unset: checksums only)")
    p.add_argument("--allow-downgrade", action="store_true",
                   help="accept a signed version older than the last one accepted for this bundle name")
    p.add_argument("--replace", action="store_true", help="replace an existing DEST once the new bundle is verified")
    p.add_argument("--max-bytes", type=int, default=None, metavar="N",
                   help="stop extracting past N bytes (default: twice what the archive's manifest declares, at most "
                        f"{RATIO} times the archive's size plus {FLOOR >> 20} MiB)")
    return p


def run(args: argparse.Namespace) -> int:
    keys = trusted_keys_dir(args.keys)
    result = unpack(args.archive, args.dest, keys=keys, allow_downgrade=args.allow_downgrade, replace=args.replace,
                    max_bytes=args.max_bytes)
    done = f"unpacked {args.archive} -> {args.dest}: {len(result.manifest['files'])} files match {MANIFEST}"
    if result.signed:
        print(f"{done}, signed by key {result.key_id}; {result.name} version {result.version}")
    else:
        print(f"{done}; signature not checked (no trusted keys: pass --keys DIR or set EDGEPACK_TRUSTED_KEYS)")
    return 0
