"""The fallback of a cascade build: the teacher's int8 bundle, made by the build's own stages.

    teacher -> export -> quantize -> bundle      into BUILD/fallback/, through its own ledger

A build whose recipe sets ``[cascade] fallback = "teacher"``, or a search shape with
``fallback=teacher``, gets this bundle once; the cascade stage (``stages.cascade``) then puts it
inside the fast bundle. The budget against the teacher becomes the cascade's ``min_accuracy``.
"""

from __future__ import annotations

from pathlib import Path

from edgepack.config import BuildConfig
from edgepack.console import Log
from edgepack.runner.ledger import Ledger

FALLBACK_STAGES = ("export", "quantize", "bundle")


def fallback_bundle(cfg: BuildConfig, ctx, root: Path, teacher: Path, teacher_hash: str, *, log: Log) -> Path:
    """The teacher's int8 bundle (built, or vouched for by the ledger in ``root/fallback``)."""
    from edgepack.runner.chain import chain, run_links

    links = [link for link in chain(cfg.replace(cascade=cfg.cascade.replace(fallback="")), ctx.profile)
             if link[0] in FALLBACK_STAGES]
    ledger = Ledger(root / "fallback", log, total=len(FALLBACK_STAGES), prefix="fallback (the teacher, int8)")
    out, _ = run_links(links, FALLBACK_STAGES, ledger, ctx, teacher, teacher_hash)
    return out


def with_fallback(cfg: BuildConfig, bundle: Path, *, teacher_accuracy: float | None, max_drop: float | None) -> BuildConfig:
    """``cfg`` whose cascade stage reads ``bundle`` and aims at the teacher's accuracy minus the budget."""
    floor = None if teacher_accuracy is None or max_drop is None else teacher_accuracy - max_drop
    return cfg.replace(cascade=cfg.cascade.replace(fallback_bundle=str(bundle), min_accuracy=floor))
