"""Build recipes as data (``recipes/*.toml``): override files over :class:`BuildConfig`'s plain
defaults, each value beside the measurement that chose it.

A recipe may start from another one (``recipe = "NAME"`` at its top); a user's recipe file starts
from ``default`` unless it names another; command-line options override both. The figures in a
recipe were measured on one dataset and one CPU (the file says which): a recipe, not a law.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import tomllib

from edgepack.config import DEFAULT_RECIPE, BuildConfig, PackConfig
from edgepack.errors import EdgepackError
from edgepack.resources import data_files

SEARCH_PATH_ENV = "EDGEPACK_RECIPES_PATH"  # extra directories of recipe files, os.pathsep-separated


def available() -> dict[str, Path]:
    """Recipe names (file stems) to files; earlier search directories win."""
    return data_files("recipes", SEARCH_PATH_ENV)


def describe(path: Path) -> str:
    """The first comment line of a recipe file (its one-line summary)."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def read(name_or_path: str | Path) -> tuple[dict[str, Any], Path]:
    """A recipe's table, by name (``recipes/<name>.toml``) or path; one-line errors naming the file."""
    text = str(name_or_path)
    path = Path(text) if text.endswith(".toml") else available().get(text)
    if path is None:
        raise EdgepackError(f"unknown recipe {text!r}; known recipes: {', '.join(available())} "
                            "(edgepack recipes lists them)")
    if not path.is_file():
        raise EdgepackError(f"{path}: no such recipe file")
    try:
        return tomllib.loads(path.read_text()), path
    except tomllib.TOMLDecodeError as e:
        raise EdgepackError(f"{path}: not valid TOML ({e}); fix the recipe") from None


def resolve(data: dict[str, Any], *, where: str = "", default: str = DEFAULT_RECIPE,
            _seen: tuple[str, ...] = ()) -> BuildConfig:
    """``data`` laid over the recipe it names (``recipe = ...``, else ``default``; ``"none"``: the
    plain dataclass defaults), recursively. The result records the recipe it started from."""
    data = upgrade(dict(data), where)
    base_name = str(data.pop("recipe", None) or default)
    if base_name in _seen:
        raise EdgepackError(f"{where or base_name}: recipes start from each other in a circle "
                            f"({' -> '.join((*_seen, base_name))})")
    if base_name == "none":
        base = BuildConfig()
    else:
        base_data, base_path = read(base_name)
        # A named recipe starts from the plain defaults unless it names another recipe.
        base = resolve(base_data, where=str(base_path), default="none", _seen=(*_seen, base_name))
    try:
        return base.merged(data, where=where).replace(recipe=base_name)
    except (ValueError, TypeError) as e:
        raise EdgepackError(str(e)) from None


def upgrade(data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """A recipe table in today's spelling: ``[verify]`` is ``[evaluate]`` (the stage's name before
    "verify" came to mean integrity only); an old ``[pack]`` table (before the quantize and bundle
    stages had their own) split between them."""
    if "verify" in data:
        data["evaluate"] = {**data.pop("verify"), **data.get("evaluate", {})}
    if "pack" not in data:
        return data
    flat = data.pop("pack") or {}
    try:
        split = PackConfig.of(**flat)
    except (TypeError, ValueError) as e:
        raise EdgepackError(f"{where + ': ' if where else ''}{e}") from None
    for name, sub in (("quantize", split.quantize), ("bundle", split.bundle)):
        keys = {k: v for k, v in flat.items() if k in {f.name for f in dataclasses.fields(sub)}}
        data[name] = {**data.get(name, {}), **keys}
    return data


def load(name: str = DEFAULT_RECIPE) -> BuildConfig:
    """A named recipe resolved over what it starts from (``BuildConfig.recipe`` is its name)."""
    return resolve({"recipe": name})
