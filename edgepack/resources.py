"""Where the data directories (``targets/``, ``profiles/``, ``recipes/``) are found."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def data_dir(kind: str) -> Path:
    """``targets``, ``profiles`` or ``recipes``: the source tree's top-level directory in a checkout, else the copy
    the wheel carries as ``edgepack.<kind minus s>_files``."""
    here = Path(__file__).resolve().parents[1] / kind
    if here.is_dir():
        return here
    # An installed wheel: the directory beside this module. (resources.files() of these folders, which have
    # no __init__.py, is a MultiplexedPath, whose str() is no path at all.)
    installed = Path(__file__).resolve().parent / f"{kind[:-1]}_files"
    if installed.is_dir():
        return installed
    return Path(str(resources.files(f"edgepack.{kind[:-1]}_files")))


def demo_data() -> Path:
    """The embedded demo dataset (CLINC150 JSON layout; see ``edgepack/demo_data/README.md``)."""
    return Path(str(resources.files("edgepack"))) / "demo_data" / "assistant_intents.json"


def data_files(kind: str, env: str) -> dict[str, Path]:
    """``{stem: path}`` of the ``*.toml`` files of ``kind``: the directories in ``$env``
    (``os.pathsep``-separated) first, then the project's own; an earlier directory wins a name."""
    dirs = [Path(p) for p in os.environ.get(env, "").split(os.pathsep) if p] + [data_dir(kind)]
    found: dict[str, Path] = {}
    for d in dirs:
        for f in sorted(d.glob("*.toml")):
            found.setdefault(f.stem, f)
    return found
