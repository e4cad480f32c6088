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
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .manifest import MANIFEST, BundleError
from .trust import Verified, trusted_keys_dir, verify_bundle

if TYPE_CHECKING:
    import tarfile  # imported where an archive is opened: predict, bench and rss register this module too

_REPACK = "re-create the archive with `edgepack pack --archive` (or `tar czf` of the bundle directory, no links)"


def checked_members(tar: tarfile.TarFile, archive: str | os.PathLike) -> list[tarfile.TarInfo]:
    """The archive's entries, refusing links, special files, absolute paths and ``..``.

    Examples:
        >>> with tarfile.open("bundle.tar.gz") as tar:  # doctest: +SKIP
        ...     [m.name for m in checked_members(tar, "bundle.tar.gz")][:2]
        ['bundle', 'bundle/config.json']
    """
    members = []
    for m in tar.getmembers():
        name = m.name
        where = f"{archive}: entry {name!r}"
        if m.issym() or m.islnk():
            raise BundleError(f"{where} is a {'symbolic' if m.issym() else 'hard'} link (to {m.linkname!r}); bundles "
                              f"hold regular files only: {_REPACK}")
        if not (m.isfile() or m.isdir()):
            raise BundleError(f"{where} is not a regular file or directory; {_REPACK}")
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or (parts and parts[0].endswith(":")) or ".." in parts or "\0" in name:
            raise BundleError(f"{where} points outside the destination (absolute or `..`); {_REPACK}")
        members.append(m)
    return members


def _extract(tar: tarfile.TarFile, members: list[tarfile.TarInfo], dest: Path) -> None:
    import tarfile

    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, members=members, filter="data")
        return
    # Pythons before the PEP 706 backports: links and escaping paths are refused above; extract without
    # the archive's modes, owners and times (what the data filter would also drop or sanitize).
    for m in members:
        tar.extract(m, dest, set_attrs=False)


def _bundle_root(tmp: Path, archive: str | os.PathLike) -> Path:
    if (tmp / MANIFEST).is_file():
        return tmp
    top = [p for p in tmp.iterdir()]
    if len(top) == 1 and top[0].is_dir() and (top[0] / MANIFEST).is_file():
        return top[0]
    raise BundleError(f"{archive}: no {MANIFEST} at its top or in its single top directory, so it is not a bundle "
                      "archive; pass the .tar.gz `edgepack pack --archive` wrote")


def unpack(archive: str | os.PathLike, dest: str | os.PathLike, *, keys: str | os.PathLike | None = None,
           allow_downgrade: bool = False, replace: bool = False) -> Verified:
    """Extract ``archive`` beside ``dest``, verify the bundle, then rename it to ``dest``; return what
    the verification established. ``dest`` must not exist unless ``replace``.

    Examples:
        >>> unpack("clinc150.tar.gz", "/opt/bundles/clinc150", keys="/etc/edgepack/keys").version  # doctest: +SKIP
        20261201071800
    """
    import tarfile
    import zlib

    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise BundleError(f"{archive}: no such archive; pass the BUNDLE.tar.gz `edgepack pack --archive` wrote")
    if (dest.exists() or dest.is_symlink()) and not replace:
        raise BundleError(f"{dest}: already exists; pass --replace to swap it for the new bundle once it has been "
                          "verified, or choose another DEST")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                _extract(tar, checked_members(tar, archive), tmp)
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
    return p


def run(args: argparse.Namespace) -> int:
    keys = trusted_keys_dir(args.keys)
    result = unpack(args.archive, args.dest, keys=keys, allow_downgrade=args.allow_downgrade, replace=args.replace)
    done = f"unpacked {args.archive} -> {args.dest}: {len(result.manifest['files'])} files match {MANIFEST}"
    if result.signed:
        print(f"{done}, signed by key {result.key_id}; {result.name} version {result.version}")
    else:
        print(f"{done}; signature not checked (no trusted keys: pass --keys DIR or set EDGEPACK_TRUSTED_KEYS)")
    return 0
