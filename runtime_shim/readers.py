"""Reading a bundle's files as data, the one way every part of the shim does: regular files only (a pipe
or device node is refused before it is opened), within a size limit, as strict JSON of bounded depth
with no key twice, and file names that stay inside the bundle. Each refusal is a ``BundleError``: one
line naming the file and the fix. Standard library only.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

# The most a bundle's JSON files are read up to (real ones are far below; a bigger file is refused
# unread, so an endless or huge file cannot fill the memory), and how deep their values may nest
# (Python's parser and copy.deepcopy recurse, and fail with a traceback some hundreds of levels down).
JSON_LIMITS = {"manifest.json": 16 << 20, "manifest.sig": 64 << 10, "runtime.json": 1 << 20, "labels.json": 16 << 20,
               "tokenizer.json": 64 << 20}
MAX_JSON_DEPTH = 32
# File names in a bundle: a part as long as Linux file systems allow, the whole well under PATH_MAX.
MAX_PART_BYTES, MAX_PATH_CHARS = 255, 1024


class BundleError(ValueError):
    """A bundle that cannot be used as it is. ``str(err)`` is one line naming the file and the fix.

    Examples:
        >>> try:
        ...     verify("bundle")
        ... except BundleError as e:
        ...     print(e)  # doctest: +SKIP
        bundle/labels.json: sha256 differs from manifest.json (file changed after packing); ...
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def open_regular(path: str | os.PathLike, fix: str = "restore the file"):
    """Open a regular file for reading (binary); ``BundleError`` naming it when it is missing or is a pipe,
    device or socket, which is refused before it is opened (reading a pipe waits for a writer forever, a
    device node can be endless or act on open). A file swapped for one of those in between is refused
    after a non-blocking open.

    Examples:
        >>> with open_regular("bundle/labels.json") as f:  # doctest: +SKIP
        ...     f.read(1)
        b'{'
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise BundleError(f"{path}: not a regular file (a pipe, device or socket); bundles hold regular files "
                              f"only: {fix}")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise BundleError(f"{path}: missing from the bundle; {fix}") from None
    except OSError as e:
        raise BundleError(f"{path}: cannot be read ({e.strerror}); {fix}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"{path}: not a regular file (a pipe, device or socket); bundles hold regular files only: {fix}")
    return os.fdopen(fd, "rb")


def read_limited(path: str | os.PathLike, limit: int, fix: str = "restore the file") -> bytes:
    """The bytes of a regular file (``open_regular``) of at most ``limit`` bytes; ``BundleError`` for a larger one,
    before reading it.

    Examples:
        >>> len(read_limited("bundle/runtime.json", JSON_LIMITS["runtime.json"]))  # doctest: +SKIP
        341
    """
    with open_regular(path, fix) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise BundleError(f"{path}: {max(size, len(data))} bytes, more than the {limit} such a file may have; {fix}")
    return data


def regular_size(path: str | os.PathLike, limit: int, fix: str = "restore the file") -> int:
    """The size of a regular file (``open_regular``) of at most ``limit`` bytes, for a reader of its own
    (``tokenizers``); ``BundleError`` otherwise.

    Examples:
        >>> regular_size("bundle/tokenizer.json", JSON_LIMITS["tokenizer.json"])  # doctest: +SKIP
        711396
    """
    with open_regular(path, fix) as f:
        size = os.fstat(f.fileno()).st_size
    if size > limit:
        raise BundleError(f"{path}: {size} bytes, more than the {limit} such a file may have; {fix}")
    return size


_NOT_A_NUMBER = " is not a JSON number"


def _no_constant(name: str) -> Any:
    raise ValueError(name + _NOT_A_NUMBER)


def _too_deep(value: Any, limit: int) -> bool:
    """Whether containers nest more than ``limit`` levels in ``value`` (walked without recursion)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        v, depth = stack.pop()
        for child in v.values() if isinstance(v, dict) else v:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def parse_json(data: bytes, path: str | os.PathLike, fix: str, *, unique: bool = True,
               depth: int | None = MAX_JSON_DEPTH) -> Any:
    """Parse JSON bytes read from ``path`` (which only names it in errors): strict JSON (no NaN or Infinity),
    no key twice in an object (``unique``: ``no_duplicates``), nested at most ``depth`` levels (None: as
    deep as the parser goes). ``BundleError`` (one line naming the file, then ``fix``) otherwise.

    Examples:
        >>> parse_json(b'{"a": [1]}', "x.json", "fix it")
        {'a': [1]}
        >>> parse_json(b'{"t": NaN}', "x.json", "fix it")
        Traceback (most recent call last):
        ...
        runtime_shim.readers.BundleError: x.json: not valid JSON (NaN is not a JSON number in 't'); fix it
    """
    deep = f"{path}: nested deeper than {depth or MAX_JSON_DEPTH} levels, which no bundle file is; {fix}"
    try:
        value = json.loads(data, object_pairs_hook=no_duplicates if unique else None, parse_constant=_no_constant)
    except RecursionError:
        raise BundleError(deep) from None
    except (ValueError, UnicodeDecodeError) as e:
        why = str(e)[:160]
        if why.endswith(_NOT_A_NUMBER):  # name the field: which setting holds it is the useful half
            import re

            key = re.search(rb'"([^"\\]{1,80})"\s*:\s*(?:NaN|-?Infinity)', data if isinstance(data, bytes) else data.encode())
            why = f"{why} in {key.group(1).decode(errors='replace')!r}" if key else why
        raise BundleError(f"{path}: not valid JSON ({why}); {fix}") from None
    if depth is not None and _too_deep(value, depth):
        raise BundleError(deep)
    return value


def read_json(path: str | os.PathLike, fix: str, *, limit: int | None = None, unique: bool = True,
              depth: int | None = MAX_JSON_DEPTH) -> Any:
    """``parse_json`` of a regular file of at most ``limit`` bytes (default: its name's in ``JSON_LIMITS``,
    else 1 MiB).

    Examples:
        >>> read_json("bundle/labels.json", "re-run `edgepack pack`")["labels"][:2]  # doctest: +SKIP
        ['alarm', 'balance']
    """
    limit = limit if limit is not None else JSON_LIMITS.get(Path(path).name, 1 << 20)
    return parse_json(read_limited(path, limit, fix), path, fix, unique=unique, depth=depth)


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` ``object_pairs_hook`` refusing a repeated key: parsers disagree on which copy wins, so a
    manifest with two ``files`` tables could read one way where it was signed and another here.

    Examples:
        >>> json.loads('{"a": 1, "a": 2}', object_pairs_hook=no_duplicates)
        Traceback (most recent call last):
        ...
        ValueError: duplicated key 'a'
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicated key {key!r}")
        out[key] = value
    return out


def bad_path(rel: Any) -> str | None:
    """Why ``rel`` cannot name a file inside a bundle (None when it can): a relative POSIX path without
    ``..``, ``.`` or empty parts, backslashes or NUL, not the manifest or its signature, of bounded length.

    Examples:
        >>> bad_path("runtime_shim/trust.py") is None
        True
        >>> bad_path("../etc/passwd")
        'a path outside the bundle'
    """
    if not isinstance(rel, str):
        return "not a path"
    parts = rel.split("/")
    if (rel.startswith("/") or "\\" in rel or "\0" in rel or any(p in ("", ".", "..") for p in parts)
            or rel in ("manifest.json", "manifest.sig")):
        return "a path outside the bundle"
    if len(rel) > MAX_PATH_CHARS or any(len(p.encode(errors="surrogatepass")) > MAX_PART_BYTES for p in parts):
        return (f"a name longer than a bundle's may be ({MAX_PART_BYTES} bytes a part, {MAX_PATH_CHARS} characters "
                "in all)")
    return None
