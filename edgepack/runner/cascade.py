"""The fallback of a cascade: the teacher's int8 bundle, made by the pack chain of the build's own
stages (export -> quantize -> bundle) into ``BUILD/fallback/``, through its own ledger.

A candidate whose config sets ``[cascade] fallback = "teacher"`` (``--fallback teacher``, or a shape's
``fallback=teacher``) gets this bundle, made once per build; the cascade stage (``stages.cascade``) then
puts it inside the fast bundle. The budget against the teacher becomes the cascade's ``min_accuracy``.
"""

from __future__ import annotations

from pathlib import Path

from edgepack.config import BuildConfig
from edgepack.console import Log
from edgepack.runner.chain import PACK, chain, run_links
from edgepack.runner.ledger import Ledger


def fallback_bundle(cfg: BuildConfig, ctx, root: Path, teacher: Path, teacher_hash: str, *, log: Log) -> Path:
    """The teacher's int8 bundle (built, or vouched for by the ledger in ``root/fallback``)."""
    links = chain(cfg.replace(cascade=cfg.cascade.replace(fallback="")), ctx.profile, PACK)
    ledger = Ledger(root / "fallback", log, total=len(links), prefix="fallback (the teacher, int8)")
    out, _ = run_links(links, ledger, ctx, teacher, teacher_hash)
    return out


def with_fallback(cfg: BuildConfig, bundle: Path, *, teacher_accuracy: float | None, max_drop: float | None) -> BuildConfig:
    """``cfg`` whose cascade stage reads ``bundle`` and aims at the teacher's accuracy minus the budget."""
    floor = None if teacher_accuracy is None or max_drop is None else teacher_accuracy - max_drop
    return cfg.replace(cascade=cfg.cascade.replace(fallback_bundle=str(bundle), min_accuracy=floor))
