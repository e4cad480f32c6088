"""edgepack build TEACHER_DIR --data DATA --profile NAME --out BUNDLE   |   edgepack build RECIPE.toml"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgepack.commands._common import add_data_args


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("build", help="teacher -> distill -> prune -> export -> quantize -> bundle -> tune -> evaluate "
                       "(resumable)",
                       description="Run the whole chain from a fine-tuned teacher to a verified bundle. Rerunning "
                       "resumes: only stages whose config or input changed run again. A build starts from a recipe "
                       "(recipes/*.toml; default: 'default', dataset-neutral, searching student shapes for the fastest bundle "
                       "within --max-drop points of the teacher; 'clinc150': the shape measured there; "
                       "`edgepack recipes` lists them). "
                       "A recipe TOML file of your own holds the same options (top-level teacher/out/profile/recipe, "
                       "tables [data] [distill] [prune] [export] [quantize] [bundle] [tune] [evaluate] [search]) and starts "
                       "from the recipe it names; command-line options override both.")
    p.add_argument("source", type=Path, metavar="TEACHER_DIR|RECIPE.toml")
    p.add_argument("--recipe", default=None, metavar="NAME",
                   help="the recipe to start from (default: 'default', or the one the recipe file names)")
    add_data_args(p, required=False)
    p.add_argument("--out", type=Path, default=None, metavar="BUNDLE", help="the bundle directory to write")
    p.add_argument("--profile", default=None, help="a device profile in profiles/ (default: host, this machine's: its target from the CPU's "
                        "flags, its physical cores)")
    p.add_argument("--build-dir", type=Path, default=None, help="stage directories (default: BUNDLE.build)")
    p.add_argument("--domains", type=Path, default=None, help="domain -> intents JSON for per-domain accuracy")
    p.add_argument("--layers", type=int, default=None, help="student depth (teacher layers kept)")
    p.add_argument("--search", type=int, default=None, metavar="N", help="Optuna trials before distilling")
    p.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                   help="accuracy points the bundle may lose against the teacher on validation (the same "
                   "out-of-scope rule for both): a budget of the profile, and the shape search keeps the fastest "
                   "shape inside it (default: the recipe's [search] max_drop)")
    p.add_argument("--pick", default=None, metavar="SHAPE",
                   help="publish this shape of an earlier search (its name in the frontier table, e.g. L2-h1-f0.33) "
                   "instead of the search's choice; built shapes are not retrained")
    p.add_argument("--shapes", default=None, metavar="'SHAPE; SHAPE'",
                   help="the shapes to search, ';'-separated (e.g. 'layers=0; layers=1 heads=1/3 ffn=1/2'); "
                   "'none': build the recipe's one shape")
    p.add_argument("--fallback", default=None, choices=("teacher",),
                   help="a cascade: the bundle also carries the teacher's int8 model and sends it the texts its own "
                   "model is unsure of, under a confidence chosen on validation for --max-drop (every shape of a "
                   "search becomes one; a shape can ask for it alone with fallback=teacher)")
    p.add_argument("--skip", action="append", default=None, choices=("distill", "prune", "tune"),
                   help="leave a stage out (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on at most this many test rows")
    p.add_argument("--archive", action="store_true", help="also write BUNDLE.tar.gz")
    p.add_argument("--force", action="store_true", help="replace an existing bundle this build did not make")
    p.add_argument("--explain", action="store_true",
                   help="say for each stage why it ran or was skipped: no earlier run, which config field changed "
                   "(old -> new), or its input (from the ledger, BUILD/ledger/)")
    return p


def resolve(args: argparse.Namespace):
    import tomllib

    from edgepack import recipes
    from edgepack.errors import EdgepackError

    base: dict = {}
    if args.source.suffix == ".toml":
        if not args.source.is_file():
            raise EdgepackError(f"{args.source}: no such recipe file")
        try:
            base = tomllib.loads(args.source.read_text())
        except tomllib.TOMLDecodeError as e:
            raise EdgepackError(f"{args.source}: not valid TOML ({e}); fix the recipe") from None
        here = args.source.resolve().parent
        for key in ("teacher", "out", "build_dir", "domains"):
            if base.get(key) and not Path(base[key]).is_absolute():
                base[key] = str(here / base[key])
        src = (base.get("data") or {}).get("source")
        if src and (here / src).exists():
            base["data"]["source"] = str(here / src)
    else:
        base["teacher"] = str(args.source)
    data = dict(base.get("data") or {})
    if args.data is not None:
        data["source"] = str(args.data)
    for key, flag in (("text_column", "text_column"), ("label_column", "label_column"), ("oos_label", "oos_label")):
        value = getattr(args, flag)
        if value is not None and value != {"text_column": "text", "label_column": "label"}.get(key):
            data[key] = value
    base["data"] = data
    for key, value in (("out", args.out), ("profile", args.profile), ("build_dir", args.build_dir),
                       ("domains", args.domains)):
        if value is not None:
            base[key] = str(value)
    if args.skip:
        base["skip"] = list(args.skip)
    if args.layers is not None:
        base.setdefault("distill", {})["num_layers"] = args.layers
    if args.search is not None:
        base.setdefault("distill", {})["search_trials"] = args.search
    if args.limit is not None:
        base.setdefault("evaluate", {})["limit"] = args.limit
    if args.max_drop is not None:
        base.setdefault("search", {})["max_drop"] = args.max_drop
    if args.pick is not None:
        base.setdefault("search", {})["pick"] = args.pick
    if args.shapes is not None:
        shapes = [] if args.shapes.strip() == "none" else [x.strip() for x in args.shapes.split(";") if x.strip()]
        base.setdefault("search", {})["shapes"] = shapes
    if args.layers is not None and args.shapes is None:
        base.setdefault("search", {})["shapes"] = []  # --layers: that depth, not a search
    if args.fallback is not None:
        base.setdefault("cascade", {})["fallback"] = args.fallback
    if args.archive:
        base.setdefault("bundle", {})["archive"] = True
    if args.recipe is not None:
        base["recipe"] = args.recipe
    cfg = recipes.resolve(base, where=str(args.source) if args.source.suffix == ".toml" else "")
    if not cfg.data.source:
        raise EdgepackError("no dataset: pass --data DATA or set [data] source in the recipe")
    if not cfg.out:
        raise EdgepackError("no output: pass --out BUNDLE or set out in the recipe")
    return cfg


def explain(summary: dict) -> str:
    """Why each stage of a build ran or was skipped: the candidates' stages, then the build's own."""
    rows = [(c["name"], stage, why) for c in (summary.get("frontier") or {}).get("candidates", [])
            for stage, why in (c.get("why") or {}).items()]
    rows += [("", stage, why) for stage, why in summary.get("why", {}).items()]
    width = max((len(f"{n} {s}".strip()) for n, s, _ in rows), default=0)
    return "why each stage ran or was skipped:\n" + "\n".join(f"  {f'{n} {s}'.strip():<{width}}  {why}"
                                                                 for n, s, why in rows)


def run(args: argparse.Namespace) -> int:
    from edgepack import api
    from edgepack.console import quiet
    from edgepack.errors import BudgetError
    from edgepack.runner.build import build_root

    cfg = resolve(args)
    with quiet(build_root(cfg) / "build.log", verbose=args.verbose):  # native warnings beside the build
        result = api.build(cfg.teacher, cfg.data, cfg.out, recipe=cfg, force=args.force)
    if args.explain:
        print(explain(result.summary))
    if not result.ok:
        raise BudgetError(f"profile {result.summary['profile']}: missed {'; '.join(result.budget_failures)} "
                          f"(bundle and report written: {result.bundle})")
    return 0
