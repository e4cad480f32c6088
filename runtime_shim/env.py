"""The bundle's ``runtime.json`` ``env`` table, applied before numpy loads (standard library only).

Its own module so the command line and ``tune`` share it without importing each other.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def apply_bundle_env(bundle: str | os.PathLike) -> dict[str, str]:
    """Set the ``env`` entries of the bundle's ``runtime.json`` that are not already set; return them.

    Only before numpy is first imported (BLAS reads its thread variables once, at load): called later,
    it changes nothing. Values the user exported win over the bundle's.

    Example:
        >>> apply_bundle_env("bundle")  # doctest: +SKIP
        {'OMP_NUM_THREADS': '1'}
    """
    if "numpy" in sys.modules:
        return {}
    try:
        env = json.loads((Path(bundle) / "runtime.json").read_text()).get("env") or {}
    except (OSError, ValueError, AttributeError):
        return {}  # loading the pipeline reports a missing or broken runtime.json properly
    applied = {}
    if isinstance(env, dict):
        for key, value in env.items():
            if str(key) not in os.environ:
                os.environ[str(key)] = applied[str(key)] = str(value)
    return applied
