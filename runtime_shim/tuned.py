"""A device's own session settings for a bundle: what ``tune`` measured as faster there, kept beside the
releases in the runtime's state directory, never in the bundle.

    <state dir>/tuned/<sha256 of manifest.json>.json

The state directory is the rollback state's (``trust.state_path``: ``<runtime_dir>/state`` for the
installed runtime, written by the account that deploys, read-only to the serving account). Keyed by
the manifest's digest, the settings belong to one bundle on one device: the signed manifest and
``runtime.json`` are never rewritten there, and a rollback to another release does not carry them.

The file is input like any other: a regular file within a size limit, strict JSON, this format, the
digest of the bundle it is loaded for, thread settings only (no model, tokenizer or file-naming entry),
each range-checked as ``runtime.json``'s are; a file other accounts may write is refused. Any fault is
one line naming the file and the fix.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .readers import JSON_LIMITS, BundleError, read_json, read_limited

FORMAT = "edgepack-tuned/1"
# The settings tune chooses, and the only ones a device's file may hold.
SETTING_KEYS = (
    "intra_op_num_threads",
    "inter_op_num_threads",
    "execution_mode",
    "graph_optimization_level",
    "session_config",
)
TUNED_KEYS = ("session.intra_op.allow_spinning", "session.force_spinning_stop", "session.x64quantprecision")
_LIMIT = 64 << 10
_FIX = "re-run `edgepack fleet tune` for this device, or delete the file to use the bundle's own settings"


def manifest_digest(bundle_dir: str | os.PathLike) -> str:
    """sha256 of the bundle's ``manifest.json`` bytes: what names a bundle on a device.

    Example:
        >>> manifest_digest("bundle")[:16]  # doctest: +SKIP
        '5e725e4d4c00aa51'
    """
    from .manifest import _sha256  # CPython's own sha256: OpenSSL stays unloaded in a serving process

    data = read_limited(Path(bundle_dir) / "manifest.json", JSON_LIMITS["manifest.json"])
    h = _sha256(len(data))
    h.update(data)
    return h.hexdigest()


def tuned_path(digest: str, state_dir: str | os.PathLike | None = None) -> Path:
    """Where this device keeps its settings for the bundle whose manifest has sha256 ``digest``.

    Example:
        >>> tuned_path("ab" * 32, "/opt/edgepack-runtime/state").name[:8]
        'abababab'
    """
    if state_dir is None:
        from .trust import state_path

        state_dir = state_path().parent
    return Path(state_dir) / "tuned" / f"{digest}.json"


def check_settings(where: str | os.PathLike, settings: Any) -> dict[str, Any]:
    """Thread settings only, each valid as in ``runtime.json``; ``BundleError`` naming ``where`` otherwise.

    Examples:
        >>> check_settings("t.json", {"intra_op_num_threads": 2, "session_config": {}})["intra_op_num_threads"]
        2
        >>> check_settings("t.json", {"model": "/etc/passwd"})
        Traceback (most recent call last):
        ...
        runtime_shim.readers.BundleError: t.json: 'model' is not a tuned setting (only intra_op_num_threads, inter_op_num_threads, execution_mode, graph_optimization_level, session_config); re-run `edgepack fleet tune` for this device, or delete the file to use the bundle's own settings
    """
    from .session import checked_options

    if not isinstance(settings, Mapping):
        raise BundleError(f"{where}: settings must be a table of thread settings; {_FIX}")
    extra = [k for k in settings if k not in SETTING_KEYS]
    if extra:
        raise BundleError(
            f"{where}: {str(extra[0])[:60]!r} is not a tuned setting (only {', '.join(SETTING_KEYS)}); {_FIX}"
        )
    config = settings.get("session_config", {})
    if not isinstance(config, Mapping) or any(
        k not in TUNED_KEYS or v not in ("0", "1") for k, v in config.items()
    ):
        raise BundleError(
            f'{where}: session_config may hold only {", ".join(TUNED_KEYS)} set to "0" or "1"; {_FIX}'
        )
    try:
        checked_options(settings)
    except BundleError as e:
        raise BundleError(f"{where}: {str(e).removeprefix('runtime.json: ')}; {_FIX}") from None
    return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in settings.items()}


def read_tuned(digest: str, state_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The device's settings for the bundle with manifest sha256 ``digest`` (``None`` when it has none).

    Example:
        >>> read_tuned(manifest_digest("bundle"))  # doctest: +SKIP
        {'intra_op_num_threads': 2, 'session_config': {'session.intra_op.allow_spinning': '0'}, ...}
    """
    path = tuned_path(digest, state_dir)
    if not os.path.lexists(path):
        return None
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o022:
        raise BundleError(
            f"{path}: other accounts may write it (mode {stat.S_IMODE(st.st_mode):o}), so it cannot "
            f"choose this device's settings; {_FIX}"
        )
    data = read_json(path, _FIX, limit=_LIMIT)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{path}: not an {FORMAT} file; {_FIX}")
    if data.get("manifest_sha256") != digest:
        raise BundleError(
            f"{path}: holds settings for manifest {str(data.get('manifest_sha256'))[:64]}, not {digest}; {_FIX}"
        )
    return check_settings(path, data.get("settings"))


def write_tuned(
    digest: str,
    settings: Mapping[str, Any],
    record: Mapping[str, Any],
    state_dir: str | os.PathLike | None = None,
) -> Path:
    """Write the device's settings for one bundle (checked first), readable by every account, atomically.

    Example:
        >>> write_tuned(manifest_digest("bundle"), {"intra_op_num_threads": 2}, {"winner": "t2-spin-off"})  # doctest: +SKIP
        PosixPath('/opt/edgepack-runtime/state/tuned/5e72....json')
    """
    from .manifest import write_json_atomic

    path = tuned_path(digest, state_dir)
    clean = check_settings(path, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o755)
    write_json_atomic(
        path,
        {
            **dict(record),
            "format": FORMAT,
            "manifest_sha256": digest,
            "settings": clean,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return path
