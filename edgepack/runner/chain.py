"""The build's chain of stages as data, and the loop that runs links through a ledger (shared by
the build and the shape search, ``runner.search``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edgepack.config import BuildConfig
from edgepack.console import for_stage
from edgepack.runner.ledger import Ledger, output_hash


def chain(cfg: BuildConfig, profile) -> list[tuple[str, Any, Any, dict[str, Any]]]:
    """The build's links: (stage name, its module, its config, what else its ledger key holds)."""
    from edgepack.stages import bundle, cascade, distill, export, prune, quantize, tune, verify

    quant_cfg = cfg.quantize if cfg.quantize.target != "auto" else cfg.quantize.replace(target=profile.target)
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
    # A cascade (a shape's fallback=teacher, or [cascade] fallback): the build makes the fallback bundle
    # first (runner.cascade) and names it here; its content is in the key, not only its path.
    cascade_links = []
    if cfg.cascade.fallback:
        fallback = Path(cfg.cascade.fallback_bundle) if cfg.cascade.fallback_bundle else None
        known = fallback is not None and (fallback / "manifest.json").is_file()
        cascade_links = [("cascade", cascade, cfg.cascade, {"fallback": output_hash(fallback) if known else None})]
    return [
        ("distill", distill, distill_cfg, {}),
        ("prune", prune, prune_cfg, {}),
        ("export", export, export_cfg, {}),
        ("quantize", quantize, quant_cfg, {}),
        ("bundle", bundle, cfg.bundle.replace(archive=False), {}),
        *cascade_links,
        ("tune", tune, cfg.tune, {"profile": profile.to_dict()}),
        ("verify", verify, cfg.verify, {"profile": profile.to_dict(), "domains": cfg.domains}),
    ]


def run_links(links, names, ledger: Ledger, ctx, src: Path, src_hash: str, *, data_key: dict | None = None,
              verify_kwargs: dict | None = None) -> tuple[Path, str]:
    """Each link in ``names`` through the ledger, the output of one the input of the next; returns
    the last output and its hash."""
    data_key = ctx.data_config.key_dict() if data_key is None else data_key
    for name, module, stage_cfg, extra_key in links:
        if name not in names:
            continue
        key = {name: stage_cfg.key_dict(), "data": data_key, **extra_key}
        stage_src = src

        stage_ctx = dataclasses.replace(ctx, log=for_stage(ctx.log, name))

        def run(dest: Path, module=module, stage_cfg=stage_cfg, stage_src=stage_src, name=name, stage_ctx=stage_ctx) -> None:
            if name == "verify":
                module.run(stage_cfg, stage_src, dest, stage_ctx, **(verify_kwargs or {}))
            else:
                module.run(stage_cfg, stage_src, dest, stage_ctx)

        src = ledger.stage(name, key, src_hash, run)
        src_hash = output_hash(src)
    return src, src_hash
