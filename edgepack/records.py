"""Provenance and atomic writes: every stage directory holds ``stage.json`` written last.

A stage record says what the stage was asked to do (its resolved config), what it read (the hash of
its input), what it measured, the versions it ran with and how long it took. Resume trusts a stage
only when both hashes match (the ledger, ``edgepack.runner.ledger``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

# One implementation of hashing, atomic JSON and the writer's lock, shared with the device runtime.
from runtime_shim.manifest import (
    BundleError,
    atomic_file,
    read_manifest,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
    writer_lock,
)

__all__ = ["atomic_file", "write_bytes_atomic", "write_json_atomic", "sha256_file", "STAGE_RECORD", "hash_tree",
           "hash_config", "versions", "staging_dir", "claimed_output", "write_stage_record", "read_stage_record"]

STAGE_RECORD = "stage.json"


def hash_tree(path: Path, *, ignore: tuple[str, ...] = (STAGE_RECORD, "__pycache__")) -> str:
    """One sha256 over the relative paths and contents of every file below ``path`` (or of one file)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if any(part in ignore for part in rel.parts):
            continue
        h.update(str(rel.as_posix()).encode())
        h.update(b"\0")
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def hash_config(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def versions(*packages: str) -> dict[str, str]:
    names = packages or ("edgepack", "torch", "transformers", "tokenizers", "onnx", "onnxruntime", "numpy")
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@contextlib.contextmanager
def staging_dir(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; on success it replaces ``out`` atomically.

    On any failure the temporary directory is removed and ``out`` (if it existed) is untouched.
    ``out`` is only replaced when ``force`` is set or it does not exist; callers check existence
    first so the error names the flag.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A run killed outright (SIGKILL, power loss) leaves its partial directory: it never became
    # ``out``, so it is only garbage.
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would follow the bundle to the device
    try:
        yield tmp
        if out.exists():
            if not force:
                raise FileExistsError(out)
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def claimed_output(out: Path, *, replace: bool, inputs: Sequence[Path] = (),
                   refusal: str = "pass --force to replace it (kept until the new bundle is complete)") -> Iterator[None]:
    """Hold the output directory of a ``pack`` or ``build`` for the whole run: ``writer_lock`` (a second
    run writing ``out`` stops at once, with one line naming the first), and where ``out`` exists, replace
    it only when ``replace`` (else ``refusal``), and even then only an edgepack bundle or an empty
    directory, never an input of the run (``inputs``) or a directory holding one.

    Examples:
        >>> with claimed_output(Path("bundle"), replace=True, inputs=[Path("teacher")]):  # doctest: +SKIP
        ...     pack_into(Path("bundle"))
    """
    from edgepack.errors import EdgepackError

    out = Path(out)
    lock = contextlib.ExitStack()
    try:
        lock.enter_context(writer_lock(out))
    except BundleError as e:  # another run holds it (or its directory is not writable)
        raise EdgepackError(str(e)) from None
    with lock:
        if out.exists() or out.is_symlink():
            where = out.resolve()
            for src in (Path(p).resolve() for p in inputs):
                if where == src or where in src.parents:
                    held = "an input of this run" if where == src else f"the directory holding {src}, an input of this run"
                    raise EdgepackError(f"{out}: is {held}, so it is never replaced; pass another --out")
            if not replace:
                raise EdgepackError(f"{out}: already exists; {refusal}")
            if out.is_symlink() or not out.is_dir():
                raise EdgepackError(f"{out}: {'a symbolic link' if out.is_symlink() else 'a file'}, not a bundle "
                                    "directory, so it is not replaced; remove it yourself or pass another --out")
            if any(out.iterdir()):
                try:
                    read_manifest(out)
                except BundleError:
                    raise EdgepackError(f"{out}: holds files but no edgepack manifest, so it is not replaced (--force "
                                        "replaces a bundle or an empty directory); remove it yourself or pass another "
                                        "--out") from None
        yield


def write_stage_record(
    stage_dir: Path,
    *,
    stage: str,
    config: Mapping[str, Any],
    input_hash: str,
    metrics: Mapping[str, Any],
    started: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``stage.json`` (last, atomically) and return it."""
    record = {
        "stage": stage,
        "config": dict(config),
        "config_hash": hash_config(config),
        "input_hash": input_hash,
        "metrics": dict(metrics),
        "versions": versions(),
        "wall_time_s": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(dict(extra) if extra else {}),
    }
    write_json_atomic(Path(stage_dir) / STAGE_RECORD, record)
    return record


def read_stage_record(stage_dir: Path) -> dict[str, Any] | None:
    p = Path(stage_dir) / STAGE_RECORD
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
