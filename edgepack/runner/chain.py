"""The build's chain of stages as data, and the loop that runs links through a ledger.

    candidate  distill -> prune -> export -> quantize -> bundle [-> cascade]   one per shape
    release    tune -> evaluate                                              the chosen candidate
    pack       export -> quantize -> bundle                  ``edgepack pack``, a cascade's fallback
    probe      distill (untrained) -> prune -> export -> quantize            the search's cost model

Each is the same chain cut to other stages; every runner runs its links with :func:`run_links`.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepack.config import BUILD_STAGES, BuildConfig, QuantizeConfig
from edgepack.console import for_stage
from edgepack.runner.ledger import Ledger, output_hash

CANDIDATE = ("distill", "prune", "export", "quantize", "bundle", "cascade")
RELEASE = ("tune", "evaluate")
PACK = ("export", "quantize", "bundle")
PROBE = ("distill", "prune", "export", "quantize")


@dataclasses.dataclass(frozen=True)
class Link:
    """One stage of a chain: its module (``run(cfg, src, out, ctx)``), its config, and what else its
    ledger key holds besides the config and the data."""

    name: str
    module: Any
    cfg: Any
    key: dict[str, Any] = dataclasses.field(default_factory=dict)


def chain(cfg: BuildConfig, profile, stages: tuple[str, ...] = BUILD_STAGES, *, untrained: bool = False,
          frontier: Any = None, reach: float | None = None) -> list[Link]:
    """The links of ``stages`` for ``cfg`` (those in ``cfg.skip`` and a cascade without a fallback left
    out). ``untrained``: the distill link builds the student without training it (the probes).
    ``frontier``: what of the search the report shows, in the evaluate link's key. ``reach``: the
    accuracy (points) the search's stop rule holds the training to, in the distill link's key (a
    student stopped for one budget is not one trained to the end for another)."""
    from edgepack.stages import bundle, cascade, distill, evaluate, export, prune, quantize, tune

    quant_cfg = cfg.quantize if cfg.quantize.target != "auto" else cfg.quantize.replace(target=profile.target)
    if quant_cfg.confidence == QuantizeConfig.confidence:  # at its default: one level for the whole build
        quant_cfg = quant_cfg.replace(confidence=cfg.search.confidence)
    if quant_cfg.objective == QuantizeConfig.objective:  # at its default: variants ranked as shapes are
        quant_cfg = quant_cfg.replace(objective=cfg.search.objective)
    export_cfg = cfg.export
    if quantize.target_for(quant_cfg).quantize.embedding_bits == 4:
        export_cfg = export_cfg.replace(embedding="gather")  # 4-bit blocks need a plain Gather on the table
    # QAT simulates the quantize target's rounding: name the target in the configs, so a changed
    # target reruns the training (without QAT it does not matter to them).
    distill_cfg = cfg.distill
    if distill_cfg.qat and distill_cfg.qat_target == "auto":
        distill_cfg = distill_cfg.replace(qat_target=quant_cfg.target)
    prune_cfg = cfg.prune
    if prune_cfg.recover and not prune_cfg.cuts:
        # Nothing cut but the vocabulary: a recovery would only restart training a converged student. On
        # CLINC150 the 3-layer student keeping every head and its whole FFN went from 94.65% raw / 94.32%
        # calibrated on validation after distillation to 94.00% / 93.58% after the recipe's 6 recovery
        # epochs at lr 5e-4 (one run, 2-core x86-64 VM).
        prune_cfg = prune_cfg.replace(recover=False)
    if prune_cfg.recovery.qat and prune_cfg.recovery.qat_target == "auto":
        prune_cfg = prune_cfg.replace(recovery=prune_cfg.recovery.replace(qat_target=quant_cfg.target))
    # A cascade's fallback bundle is made first (runner.cascade) and named in its config; its content
    # is in the key, not only its path.
    fallback = Path(cfg.cascade.fallback_bundle) if cfg.cascade.fallback_bundle else None
    known = fallback is not None and (fallback / "manifest.json").is_file()
    distill_link = (Link("distill", types.SimpleNamespace(run=distill.untrained), distill_cfg, {"probe": True})
                    if untrained else Link("distill", distill, distill_cfg, {"reach": reach} if reach is not None else {}))
    host = profile.to_dict() if profile is not None else None
    links = [
        distill_link,
        Link("prune", prune, prune_cfg),
        Link("export", export, export_cfg),
        Link("quantize", quantize, quant_cfg),
        Link("bundle", bundle, cfg.bundle.replace(archive=False)),
        *([Link("cascade", cascade, cfg.cascade, {"fallback": output_hash(fallback) if known else None})]
          if cfg.cascade.fallback else []),
        Link("tune", tune, cfg.tune, {"profile": host}),
        Link("evaluate", evaluate, cfg.evaluate, {"profile": host, "domains": cfg.domains,
                                                  **({"frontier": frontier} if frontier is not None else {})}),
    ]
    return [link for link in links if link.name in stages and link.name not in cfg.skip]


def run_links(links: list[Link], ledger: Ledger, ctx, src: Path, src_hash: str, *,
              until: Callable[[Path], Any] | None = None) -> tuple[Path, str]:
    """Each link through the ledger, the output of one the input of the next, each stage's progress
    on its own logger; returns the last output and its hash. ``until(output)`` true ends the chain
    after that link (a student the search's stop rule stopped goes no further)."""
    data_key = ctx.data_config.key_dict()
    for link in links:
        stage_ctx = dataclasses.replace(ctx, log=for_stage(ctx.log, link.name))

        def run(dest: Path, link=link, stage_src=src, stage_ctx=stage_ctx) -> None:
            link.module.run(link.cfg, stage_src, dest, stage_ctx)

        src = ledger.stage(link.name, {link.name: link.cfg.key_dict(), "data": data_key, **link.key}, src_hash, run)
        src_hash = output_hash(src)
        if until is not None and until(src):
            break
    return src, src_hash
