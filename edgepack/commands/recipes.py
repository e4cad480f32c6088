"""edgepack recipes [NAME]: list the build recipes, or show one resolved."""

from __future__ import annotations

import argparse


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("recipes", help="list the build recipes (recipes/*.toml), or show one resolved",
                       description="Build recipes are override files over the plain defaults, each value beside the "
                       "measurement that chose it. `edgepack build --recipe NAME` starts from one.")
    p.add_argument("name", nargs="?", help="show this recipe, resolved over what it starts from, as TOML")
    return p


def run(args: argparse.Namespace) -> int:
    from edgepack import recipes
    from edgepack.config import DEFAULT_RECIPE

    if args.name:
        cfg = recipes.load(args.name)
        print(f"# recipe {args.name} ({recipes.available()[args.name]}), resolved")
        print(cfg.to_toml(), end="")
        return 0
    for name, path in recipes.available().items():
        mark = " (default)" if name == DEFAULT_RECIPE else ""
        print(f"{name:<14} {recipes.describe(path)}{mark}")
    return 0
